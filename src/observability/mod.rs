//! Observability: the Prometheus registry and its typed handles, and log/tracing set-up.

pub mod logging;
pub mod metrics;

pub use metrics::{BlockGates, Metrics, ModelMetrics, NO_MODEL, OUTCOMES, RequestMetrics};

use std::sync::Arc;

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

/// The metrics listener's routes: `/metrics` in the Prometheus text format.
pub fn metrics_router(metrics: Arc<Metrics>) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            async move {
                ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], metrics.render()).into_response()
            }
        }),
    )
}
