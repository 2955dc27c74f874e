//! The HTTP front door (axum): KServe Open Inference Protocol v2 with Triton's binary tensor
//! data, classification, statistics and model-configuration extensions. It decodes and
//! encodes; the serving core does the rest.

pub mod admin;
pub mod codec;
pub mod json;
mod routes;

use std::sync::Arc;

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
