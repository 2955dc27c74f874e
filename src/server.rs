//! The composition root of `sluice serve`: load the repository, bind the HTTP, gRPC and
//! metrics listeners, serve until SIGTERM/Ctrl-C, then stop accepting, finish in-flight
//! work under a timeout and exit.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::control::auth::{AdminAccess, AdminToken};
use crate::protocol::grpc::{self, GrpcLimits};
use crate::protocol::http::{self, HttpLimits};
use crate::serving::{LoadOptions, ServingCore};

/// Everything `serve` needs (from the command line).
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub model_repository: std::path::PathBuf,
    pub address: std::net::IpAddr,
    pub http_port: u16,
    pub grpc_port: u16,
    pub metrics_port: u16,
    pub load: LoadOptions,
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

/// Runs the server until `stop` resolves (normally a signal), then drains.
pub async fn run(
    config: ServerConfig,
    stop: impl std::future::Future<Output = ()>,
    on_ready: impl FnOnce(BoundAddresses),
) -> anyhow::Result<()> {
    let core =
        Arc::new(ServingCore::load(&config.model_repository, &config.load).await.with_context(|| {
            format!("loading the model repository {}", config.model_repository.display())
        })?);
    let bind = |port: u16, what: &'static str| {
        let addr = SocketAddr::new(config.address, port);
        async move { TcpListener::bind(addr).await.with_context(|| format!("binding the {what} port {addr}")) }
    };
    let http_listener = bind(config.http_port, "HTTP").await?;
    let grpc_listener = bind(config.grpc_port, "gRPC").await?;
    let metrics_listener = bind(config.metrics_port, "metrics").await?;
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
    let http_task = tokio::spawn(http::serve(
        http_listener,
        http::router(core.clone(), config.http, public_admin.clone()),
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
        tokio::spawn(http::serve(l, app, signal(stopping.clone())))
    });
    let metrics_task = tokio::spawn(http::serve(
        metrics_listener,
        crate::observability::metrics_router(core.metrics.clone()),
        signal(stopping.clone()),
    ));
    info!(http = %addresses.http, grpc = %addresses.grpc, metrics = %addresses.metrics, admin = ?addresses.admin, "sluice listening");
    on_ready(addresses);

    stop.await;
    info!("shutting down: no new connections; finishing in-flight requests");
    core.begin_shutdown();
    let _ = stopping_tx.send(true);
    let drained = tokio::time::timeout(config.shutdown_timeout, async {
        let _ = http_task.await;
        let _ = grpc_task.await;
        let _ = metrics_task.await;
        if let Some(t) = admin_task {
            let _ = t.await;
        }
    })
    .await;
    if drained.is_err() {
        warn!(timeout = ?config.shutdown_timeout, "in-flight requests did not finish in time; exiting anyway");
    } else {
        info!("all requests finished");
    }
    Ok(())
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
