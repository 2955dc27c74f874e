//! The composition root of `sluice serve`: read the repository's configurations, bind the
//! HTTP, gRPC, metrics (on a runtime of its own) and admin listeners, load the models, serve
//! until SIGTERM/Ctrl-C, then stop accepting, finish in-flight work under a timeout and exit.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::control::auth::{AdminAccess, AdminToken};
use crate::protocol::conn::{self, ConnectionLimits, ListenerMetrics};
use crate::protocol::grpc::{self, GrpcLimits};
use crate::protocol::http::{self, HttpLimits};
use crate::serving::limits::ServerLimits;
use crate::serving::{AbortOnDrop, LoadOptions, ServingCore};

/// Everything `serve` needs (from the command line).
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub model_repository: std::path::PathBuf,
    /// Serve the repository's one model under this name (`--model-name`).
    pub model_name: Option<String>,
    /// How often the policy file (`load.policy_file`) is read.
    pub policy_file_poll: Duration,
    pub address: std::net::IpAddr,
    pub http_port: u16,
    pub grpc_port: u16,
    pub metrics_port: u16,
    pub load: LoadOptions,
    pub limits: ServerLimits,
    pub http: HttpLimits,
    pub grpc: GrpcLimits,
    pub shutdown_timeout: Duration,
    /// With a token the control API is on the HTTP and gRPC ports; without one, only on
    /// the loopback admin listener at `admin_port`.
    pub admin_token: Option<AdminToken>,
    pub admin_port: u16,
}

/// The bound addresses (ports chosen by the OS when 0 was asked).
#[derive(Clone, Copy, Debug)]
pub struct BoundAddresses {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub metrics: SocketAddr,
    /// The loopback admin listener (only when no admin token is configured).
    pub admin: Option<SocketAddr>,
}

/// Runs the server until `stop` resolves (normally a signal), then drains. The listeners
/// bind first (health answers, not ready), then the models load; `on_ready` runs once every
/// model serves.
pub async fn run(
    config: ServerConfig,
    stop: impl std::future::Future<Output = ()>,
    on_ready: impl FnOnce(BoundAddresses),
) -> anyhow::Result<()> {
    let repository = &config.model_repository;
    let dirs = crate::serving::scan_repository(repository, config.model_name.as_deref())
        .with_context(|| format!("reading the model repository {}", repository.display()))?;
    if let Some(f) = &config.load.policy_file {
        let served: Vec<&str> = dirs.iter().map(|d| d.config.name.as_str()).collect();
        for name in f
            .file
            .unserved(&served)
            .map_err(|e| anyhow::anyhow!("--policy-file {}: {e}", f.path.display()))?
        {
            warn!(file = %f.path.display(), model = %name, "the policy file names a model this server does not serve");
        }
    }
    let fd_limit = crate::protocol::conn::raise_fd_limit();
    let wanted = (config.http.connections.max_connections + config.grpc.connections.max_connections) as u64;
    if fd_limit < wanted + 256 {
        warn!(
            fd_limit,
            wanted, "the open-file limit is below the connection limits: accepts will fail first"
        );
    }
    let core = Arc::new(ServingCore::new(&dirs, config.limits));
    let bind = |port: u16, what: &'static str| {
        let addr = SocketAddr::new(config.address, port);
        async move { TcpListener::bind(addr).await.with_context(|| format!("binding the {what} port {addr}")) }
    };
    let http_listener = bind(config.http_port, "HTTP").await?;
    let grpc_listener = bind(config.grpc_port, "gRPC").await?;
    let metrics_addr = SocketAddr::new(config.address, config.metrics_port);
    let metrics_listener = std::net::TcpListener::bind(metrics_addr)
        .with_context(|| format!("binding the metrics port {metrics_addr}"))?;
    let admin_listener = match &config.admin_token {
        Some(_) => None,
        None => {
            let addr = SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), config.admin_port);
            Some(TcpListener::bind(addr).await.with_context(|| format!("binding the admin port {addr}"))?)
        }
    };
    let addresses = BoundAddresses {
        http: http_listener.local_addr()?,
        grpc: grpc_listener.local_addr()?,
        metrics: metrics_listener.local_addr()?,
        admin: admin_listener.as_ref().map(|l| l.local_addr()).transpose()?,
    };
    let public_admin = match &config.admin_token {
        Some(t) => AdminAccess::Token(t.clone()),
        None => AdminAccess::LoopbackOnly,
    };
    let (stopping_tx, stopping) = watch::channel(false);
    let signal = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let listener_metrics = |name: &str| {
        let (open, refused) = core.metrics.listener(name);
        ListenerMetrics { open, refused }
    };
    let http_task = tokio::spawn(conn::serve(
        http_listener,
        http::router(core.clone(), config.http, public_admin.clone()),
        config.http.connections,
        listener_metrics("http"),
        signal(stopping.clone()),
    ));
    let grpc_task = tokio::spawn(grpc::serve(
        grpc_listener,
        core.clone(),
        config.grpc,
        public_admin,
        signal(stopping.clone()),
    ));
    let admin_task = admin_listener.map(|l| {
        // Loopback only, no token: the control API over HTTP and gRPC on one port.
        let grpc_admin = tonic::service::Routes::new(grpc::admin::service(core.clone(), AdminAccess::Open))
            .into_axum_router();
        let app = http::admin_router(core.clone(), config.http).merge(grpc_admin);
        tokio::spawn(conn::serve(
            l,
            app,
            config.http.connections,
            listener_metrics("admin"),
            signal(stopping.clone()),
        ))
    });
    let metrics_done = serve_metrics_apart(
        metrics_listener,
        core.metrics.clone(),
        config.http.connections,
        listener_metrics("metrics"),
        signal(stopping.clone()),
    )?;
    info!(http = %addresses.http, grpc = %addresses.grpc, metrics = %addresses.metrics, admin = ?addresses.admin, "sluice listening; loading models");

    tokio::pin!(stop);
    let loaded = tokio::select! {
        loaded = core.load_models(dirs, &config.load) => Some(loaded),
        () = &mut stop => None,
    };
    match loaded {
        Some(Ok(())) => {
            // Follows the policy file from the contents the models loaded with.
            let _follower = config.load.policy_file.as_ref().map(|f| {
                core.metrics.policy_file_applied(f.file.version);
                let task = crate::serving::policy_watch::follow(
                    core.clone(),
                    f.path.clone(),
                    config.policy_file_poll,
                    f.bytes.clone(),
                );
                AbortOnDrop(tokio::spawn(task).abort_handle())
            });
            on_ready(addresses);
            stop.await;
        }
        Some(Err(e)) => {
            let _ = stopping_tx.send(true);
            return Err(e.context(format!("loading the model repository {}", repository.display())));
        }
        None => warn!("stopped while loading models"),
    }
    info!("shutting down: no new connections; finishing in-flight requests");
    core.begin_shutdown();
    let _ = stopping_tx.send(true);
    let drained = tokio::time::timeout(config.shutdown_timeout, async {
        let _ = http_task.await;
        let _ = grpc_task.await;
        if let Some(t) = admin_task {
            let _ = t.await;
        }
        let _ = metrics_done.await;
    })
    .await;
    if drained.is_err() {
        warn!(timeout = ?config.shutdown_timeout, "in-flight requests did not finish in time; exiting anyway");
    } else {
        info!("all requests finished");
    }
    Ok(())
}

/// Serves `/metrics` on a runtime and thread of its own, so a scrape is answered however
/// busy the request path is; the returned receiver resolves when it has stopped.
fn serve_metrics_apart(
    listener: std::net::TcpListener,
    metrics: Arc<crate::observability::Metrics>,
    limits: ConnectionLimits,
    gauges: ListenerMetrics,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<tokio::sync::oneshot::Receiver<()>> {
    listener.set_nonblocking(true)?;
    let (done_tx, done) = tokio::sync::oneshot::channel();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::Builder::new().name("metrics".into()).spawn(move || {
        // A scrape is small and should not wait behind bulk work for a core.
        crate::serving::raise_priority(5);
        runtime.block_on(async move {
            match TcpListener::from_std(listener) {
                Ok(l) => {
                    let app = http::metrics_router(metrics);
                    if let Err(e) = conn::serve(l, app, limits, gauges, shutdown).await {
                        warn!(error = %e, "the metrics listener stopped");
                    }
                }
                Err(e) => warn!(error = %e, "cannot serve metrics"),
            }
        });
        let _ = done_tx.send(());
    })?;
    Ok(done)
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
