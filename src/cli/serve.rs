//! `sluice serve`: serve a model repository over HTTP and gRPC (Triton's flags and ports).

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use crate::control::auth::AdminToken;

use crate::control::policy_file::PolicyFile;
use crate::engine::{Layout, Precision};
use crate::protocol::conn::ConnectionLimits;
use crate::protocol::grpc::GrpcLimits;
use crate::protocol::http::HttpLimits;
use crate::repository::InputDatatype;
use crate::server::{self, ServerConfig};
use crate::serving::limits::ServerLimits;
use crate::serving::{FollowedFile, LoadOptions};

/// Arguments of `sluice serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Folder with one sub-folder per model (config.toml, weights, calibration), or one
    /// model's folder (config.toml inside), served alone.
    #[arg(long, env = "SLUICE_MODEL_REPOSITORY", default_value = "deploy/models")]
    pub model_repository: PathBuf,
    /// Serve the repository's one model under this name instead of its config's (KServe
    /// passes the InferenceService's name).
    #[arg(long, env = "SLUICE_MODEL_NAME")]
    pub model_name: Option<String>,
    /// Follow this policy file (TOML: `version`, then `[models.<name>]` policies; a mounted
    /// ConfigMap): every model's policy comes from it, changes are applied within one poll
    /// interval, and the control API's policy changes are refused (docs/deploy.md).
    #[arg(long, env = "SLUICE_POLICY_FILE")]
    pub policy_file: Option<PathBuf>,
    /// How often the policy file is read, in milliseconds (50 to 60000).
    #[arg(long, env = "SLUICE_POLICY_FILE_POLL_MS", default_value_t = 500)]
    pub policy_file_poll_ms: u64,
    /// Address to listen on.
    #[arg(long, env = "SLUICE_ADDRESS", default_value = "0.0.0.0")]
    pub address: IpAddr,
    /// HTTP port (0: any free port; the chosen one is logged).
    #[arg(long, env = "SLUICE_HTTP_PORT", default_value_t = 8000)]
    pub http_port: u16,
    /// gRPC port (0: any free port).
    #[arg(long, env = "SLUICE_GRPC_PORT", default_value_t = 8001)]
    pub grpc_port: u16,
    /// Prometheus metrics port (0: any free port).
    #[arg(long, env = "SLUICE_METRICS_PORT", default_value_t = 8002)]
    pub metrics_port: u16,
    /// Engine instances per model (overrides each config's batching.instances).
    #[arg(long, env = "SLUICE_INSTANCES")]
    pub instances: Option<usize>,
    /// libtorch threads per engine instance, for models whose config sets no
    /// `batching.threads` (default: cores / the most instances any model has, at least 1;
    /// models that are busy at the same time share the cores).
    #[arg(long, env = "SLUICE_ENGINE_THREADS")]
    pub engine_threads: Option<usize>,
    /// Activation and weight memory layout: channels-last, nchw or onednn (fused oneDNN
    /// convolutions on weights reordered once at load for the model's input size).
    #[arg(long, env = "SLUICE_LAYOUT", default_value = "onednn")]
    pub layout: Layout,
    /// Number format for every model, overriding each config's `precision`: fp32 or bf16
    /// (bf16 needs AVX512-BF16 or AMX; a model that cannot have it fails to load).
    #[arg(long, env = "SLUICE_PRECISION")]
    pub precision: Option<Precision>,
    /// A cap on every model's HTTP body limit, in bytes (by default each model's own limit:
    /// max_batch_size × the item's size; docs/security.md).
    #[arg(long, env = "SLUICE_HTTP_MAX_BODY_BYTES")]
    pub http_max_body_bytes: Option<usize>,
    /// A cap on the gRPC message limit, in bytes (by default the largest any model accepts).
    #[arg(long, env = "SLUICE_GRPC_MAX_MESSAGE_BYTES")]
    pub grpc_max_message_bytes: Option<usize>,
    /// Requests admitted and not yet answered, over every model (429 / RESOURCE_EXHAUSTED
    /// beyond).
    #[arg(long, env = "SLUICE_MAX_INFLIGHT_REQUESTS", default_value_t = 4096)]
    pub max_inflight_requests: usize,
    /// Request bytes held at once over every request: each request reserves its body's bytes
    /// as they arrive, before they are buffered (429 / RESOURCE_EXHAUSTED when spent).
    #[arg(long, env = "SLUICE_MAX_INFLIGHT_BODY_BYTES", default_value_t = 256 << 20)]
    pub max_inflight_body_bytes: usize,
    /// Threads that decode large bodies and images and encode large responses (default: cores).
    #[arg(long, env = "SLUICE_DECODE_THREADS")]
    pub decode_threads: Option<usize>,
    /// Open connections per listener; more are closed at once.
    #[arg(long, env = "SLUICE_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,
    /// Seconds a client has to send a request's headers (HTTP/1.1); also how long an idle
    /// keep-alive connection is kept.
    #[arg(long, env = "SLUICE_HEADER_READ_TIMEOUT", default_value_t = 10.0)]
    pub header_read_timeout: f64,
    /// Seconds a client has to send a request's whole body (408 beyond).
    #[arg(long, env = "SLUICE_BODY_READ_TIMEOUT", default_value_t = 30.0)]
    pub body_read_timeout: f64,
    /// Seconds to let in-flight requests finish after SIGTERM.
    #[arg(long, env = "SLUICE_SHUTDOWN_TIMEOUT", default_value_t = 30)]
    pub shutdown_timeout: u64,
    /// The least compute budget a single request may ask for (a floor on per-request gating).
    #[arg(long, env = "SLUICE_MIN_REQUEST_BUDGET")]
    pub min_request_budget: Option<f64>,
    /// Don't keep policy changes in policy.json beside each model (a restart then starts
    /// from config.toml's policy).
    #[arg(long, env = "SLUICE_NO_PERSIST_POLICY")]
    pub no_persist_policy: bool,
    /// Bearer token of the control API; with one, the API is served on the HTTP and gRPC
    /// ports. Without one, only on the loopback admin listener.
    #[arg(long, env = "SLUICE_ADMIN_TOKEN", hide_env_values = true, conflicts_with = "admin_token_file")]
    pub admin_token: Option<String>,
    /// A file holding the bearer token of the control API.
    #[arg(long, env = "SLUICE_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Port of the loopback admin listener (HTTP and gRPC control API; used when no token
    /// is configured; 0: any free port).
    #[arg(long, env = "SLUICE_ADMIN_PORT", default_value_t = 8003)]
    pub admin_port: u16,
}

fn admin_token(args: &ServeArgs) -> anyhow::Result<Option<AdminToken>> {
    let text = match (&args.admin_token, &args.admin_token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(path)) => {
            std::fs::read_to_string(path).with_context(|| format!("--admin-token-file {}", path.display()))?
        }
        (None, None) => return Ok(None),
    };
    AdminToken::new(&text).map(Some).ok_or_else(|| anyhow::anyhow!("the admin token is empty"))
}

pub fn run(args: &ServeArgs) -> anyhow::Result<()> {
    quiet_caught_decoder_panics();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut models = crate::repository::scan(&args.model_repository)?;
    if let Some(name) = &args.model_name {
        crate::repository::rename_single(&mut models, name)?;
    }
    // One model's instances run side by side under load, so they split the cores; different
    // models take turns (a repository is rarely busy everywhere at once), so each model's
    // engines may use every core.
    let instances: usize = models
        .iter()
        .map(|m| args.instances.unwrap_or(m.config.batching.instances).max(1))
        .max()
        .unwrap_or(1);
    let threads = args.engine_threads.unwrap_or((cores / instances).max(1));
    if threads * instances > cores {
        tracing::warn!(
            threads,
            instances,
            cores,
            "a model's engine instances × threads exceed the cores: expect contention"
        );
    }
    let seconds = |name: &str, s: f64| {
        if s.is_finite() && s > 0.0 && s <= 3600.0 {
            Ok(Duration::from_secs_f64(s))
        } else {
            Err(anyhow::anyhow!("--{name} must be a number of seconds in (0, 3600], got {s}"))
        }
    };
    let connections = ConnectionLimits {
        max_connections: args.max_connections.max(1),
        header_read_timeout: seconds("header-read-timeout", args.header_read_timeout)?,
        ..ConnectionLimits::default()
    };
    let defaults = ServerLimits::default();
    let limits = ServerLimits {
        max_inflight_requests: args.max_inflight_requests.max(1),
        max_inflight_body_bytes: args.max_inflight_body_bytes.max(1),
        decode_threads: args.decode_threads.unwrap_or(defaults.decode_threads).max(1),
        ..defaults
    };
    if !crate::serving::policy_watch::POLL_RANGE_MS.contains(&args.policy_file_poll_ms) {
        anyhow::bail!(
            "--policy-file-poll-ms must be within {:?}, got {}",
            crate::serving::policy_watch::POLL_RANGE_MS,
            args.policy_file_poll_ms
        );
    }
    let policy_file = match &args.policy_file {
        Some(path) => {
            // Read once, before anything loads: a broken file stops the start, with the reason.
            let bytes = PolicyFile::read_bytes(path).map_err(|e| anyhow::anyhow!("--policy-file: {e}"))?;
            let file =
                PolicyFile::from_bytes(path, &bytes).map_err(|e| anyhow::anyhow!("--policy-file: {e}"))?;
            Some(Arc::new(FollowedFile { path: path.clone(), file, bytes }))
        }
        None => None,
    };
    let config = ServerConfig {
        model_repository: args.model_repository.clone(),
        model_name: args.model_name.clone(),
        policy_file_poll: Duration::from_millis(args.policy_file_poll_ms),
        address: args.address,
        http_port: args.http_port,
        grpc_port: args.grpc_port,
        metrics_port: args.metrics_port,
        load: LoadOptions {
            intra_op_threads: threads,
            instances: args.instances,
            min_request_budget: args.min_request_budget,
            layout: args.layout,
            precision: args.precision,
            persist_policy: !args.no_persist_policy,
            policy_file,
        },
        admin_token: admin_token(args)?,
        admin_port: args.admin_port,
        limits,
        http: HttpLimits {
            max_body_bytes: args.http_max_body_bytes,
            body_read_timeout: seconds("body-read-timeout", args.body_read_timeout)?,
            connections,
        },
        grpc: GrpcLimits {
            max_message_bytes: args.grpc_max_message_bytes,
            body_read_timeout: seconds("body-read-timeout", args.body_read_timeout)?,
            connections,
        },
        shutdown_timeout: Duration::from_secs(args.shutdown_timeout),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let example = models
        .iter()
        .find(|m| m.config.input.dims == [1, 28, 28] && m.config.input.datatype == InputDatatype::Fp32);
    let example = example.map(|m| m.config.name.clone());
    let first = models.first().map(|m| m.config.name.clone()).unwrap_or_default();
    runtime.block_on(server::run(config, server::shutdown_signal(), |a| {
        // One machine-readable line on stdout: tests and scripts read the chosen ports here.
        let admin = a.admin.map_or("none".to_string(), |x| x.to_string());
        println!("sluice ready: http={} grpc={} metrics={} admin={admin}", a.http, a.grpc, a.metrics);
        println!("try: curl -s http://{}/v2/models/{first}", a.http);
        if let Some(name) = example {
            println!(
                "     curl -s -X POST http://{}/v2/models/{name}/infer -d @deploy/examples/request.json",
                a.http
            );
        }
    }))
}

/// Panics inside an image decoder are caught and answered 400 (`serving::image::decode`);
/// without this, Rust's default hook would also print each one to stderr, and one bad image
/// per request would flood the log. They are logged at debug level instead; every other
/// panic goes to the default hook as before.
fn quiet_caught_decoder_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if crate::serving::image::in_guarded_decoder() {
            tracing::debug!(panic = %info, "an image decoder panicked; the request is answered 400");
        } else {
            default(info);
        }
    }));
}
