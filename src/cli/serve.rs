//! `sluice serve`: serve a model repository over HTTP and gRPC (Triton's flags and ports).

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use crate::control::auth::AdminToken;

use crate::engine::Layout;
use crate::protocol::grpc::GrpcLimits;
use crate::protocol::http::HttpLimits;
use crate::server::{self, ServerConfig};
use crate::serving::LoadOptions;

/// Arguments of `sluice serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Folder with one sub-folder per model (config.toml, weights, calibration).
    #[arg(long, env = "SLUICE_MODEL_REPOSITORY", default_value = "deploy/models")]
    pub model_repository: PathBuf,
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
    /// Activation and weight memory layout.
    #[arg(long, env = "SLUICE_LAYOUT", value_enum, default_value = "channels-last")]
    pub layout: Layout,
    /// Largest HTTP request body in bytes.
    #[arg(long, env = "SLUICE_HTTP_MAX_BODY_BYTES", default_value_t = 64 << 20)]
    pub http_max_body_bytes: usize,
    /// Largest gRPC message in bytes (clients allow up to 2 GiB; tonic's default is 4 MiB).
    #[arg(long, env = "SLUICE_GRPC_MAX_MESSAGE_BYTES", default_value_t = 256 << 20)]
    pub grpc_max_message_bytes: usize,
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
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let models = crate::repository::scan(&args.model_repository)?;
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
    let config = ServerConfig {
        model_repository: args.model_repository.clone(),
        address: args.address,
        http_port: args.http_port,
        grpc_port: args.grpc_port,
        metrics_port: args.metrics_port,
        load: LoadOptions {
            intra_op_threads: threads,
            instances: args.instances,
            min_request_budget: args.min_request_budget,
            layout: args.layout,
            persist_policy: !args.no_persist_policy,
        },
        admin_token: admin_token(args)?,
        admin_port: args.admin_port,
        http: HttpLimits { max_body_bytes: args.http_max_body_bytes },
        grpc: GrpcLimits { max_message_bytes: args.grpc_max_message_bytes },
        shutdown_timeout: Duration::from_secs(args.shutdown_timeout),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let example =
        models.iter().find(|m| m.config.input.dims == [1, 28, 28] && m.config.input.image.is_none());
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
