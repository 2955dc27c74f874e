//! The HTTP front door (axum): KServe Open Inference Protocol v2 with Triton's binary tensor
//! data, classification, statistics and model-configuration extensions. It decodes and
//! encodes; the serving core does the rest.

pub mod admin;
pub mod codec;
pub mod json;
mod routes;

use std::sync::Arc;

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

pub use routes::{ADMIN_MAX_BODY_BYTES, HttpLimits, admin_router, router};

use crate::control::auth::AdminAccess;
use crate::serving::ServingCore;

/// The shared state of the HTTP handlers.
#[derive(Clone)]
pub struct HttpState {
    pub core: Arc<ServingCore>,
    pub limits: HttpLimits,
    /// Who may call the control API on this listener.
    pub admin: AdminAccess,
}

/// The metrics listener's routes: `/metrics` in the Prometheus text format.
pub fn metrics_router(metrics: Arc<crate::observability::Metrics>) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            async move {
                ([(header::CONTENT_TYPE, crate::observability::metrics::CONTENT_TYPE)], metrics.render())
                    .into_response()
            }
        }),
    )
}
