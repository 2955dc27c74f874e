//! Observability: the Prometheus registry and its typed handles, and log/tracing set-up.

pub mod exposition;
pub mod logging;
pub mod metrics;

pub use metrics::{BlockGates, Metrics, ModelMetrics, NO_MODEL, OUTCOMES, RequestMetrics};
