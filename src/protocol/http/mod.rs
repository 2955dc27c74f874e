//! The HTTP front door (axum): KServe Open Inference Protocol v2 with Triton's binary tensor
//! data, classification, statistics and model-configuration extensions. It decodes and
//! encodes; the serving core does the rest.

pub mod admin;
pub mod codec;
mod routes;

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;

pub use routes::{EXTENSIONS, HttpLimits, admin_router, router};

use crate::control::auth::AdminAccess;
use crate::serving::ServingCore;

/// Serves `router` on `listener` (TCP_NODELAY on every accepted socket) until `shutdown`
/// resolves, then lets in-flight requests finish.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    axum::serve(listener, app.into_make_service_with_connect_info::<std::net::SocketAddr>())
        .with_graceful_shutdown(shutdown)
        .await
}

/// The shared state of the HTTP handlers.
#[derive(Clone)]
pub struct HttpState {
    pub core: Arc<ServingCore>,
    pub limits: HttpLimits,
    /// Who may call the control API on this listener.
    pub admin: AdminAccess,
}
