//! The gRPC front door (tonic): `inference.GRPCInferenceService`, wire-compatible with
//! KServe/Triton (proto/grpc_service.proto), plus the standard `grpc.health.v1` service.
//! Replies always carry `raw_output_contents` (tritonclient reads only those).

pub mod admin;
pub mod codec;
pub mod convert;
pub mod health;
mod service;

/// Code generated from proto/grpc_service.proto.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("inference");
}

/// Code generated from proto/sluice_admin.proto.
#[allow(clippy::all, missing_docs)]
pub mod admin_pb {
    tonic::include_proto!("sluice.admin.v1");
}

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use tokio::net::TcpListener;

pub use service::{InferenceService, grpc_timeout};

use crate::control::auth::AdminAccess;
use crate::protocol::conn::{self, ConnectionLimits, ListenerMetrics};
use crate::serving::{ApiError, Protocol, ServingCore};

/// Limits of the gRPC front door (docs/security.md).
#[derive(Clone, Copy, Debug)]
pub struct GrpcLimits {
    /// A cap on the message limit (by default the largest any model accepts).
    pub max_message_bytes: Option<usize>,
    pub connections: ConnectionLimits,
}

/// The path of the inference call, the one whose messages are large.
const MODEL_INFER: &str = "/inference.GRPCInferenceService/ModelInfer";

/// Serves the inference, health and (guarded by `admin`) control services on `listener`
/// until `shutdown` resolves, then lets in-flight calls finish.
pub async fn serve(
    listener: TcpListener,
    core: Arc<ServingCore>,
    limits: GrpcLimits,
    admin: AdminAccess,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let control = admin::service(core.clone(), admin);
    let max_message =
        limits.max_message_bytes.map_or(core.max_body_bytes(), |cap| cap.min(core.max_body_bytes()));
    let inference = pb::grpc_inference_service_server::GrpcInferenceServiceServer::new(
        InferenceService::new(core.clone()),
    )
    .max_decoding_message_size(max_message)
    .max_encoding_message_size(max_message.max(64 << 20));
    let app = tonic::service::Routes::new(health::service(core.clone()))
        .add_service(inference)
        .add_service(control)
        .into_axum_router()
        .layer(axum::middleware::from_fn_with_state(core.clone(), admit_messages));
    let (open, refused) = core.metrics.listener("grpc");
    conn::serve(listener, app, limits.connections, ListenerMetrics { open, refused }, shutdown).await
}

/// Admission of inference calls before their message is read: a share of the server's byte
/// budget the size of the largest message (refused at once with RESOURCE_EXHAUSTED when
/// the budget is spent), held until the call is answered. Calls that never reach the
/// service (a message too large or malformed) are counted here.
async fn admit_messages(
    State(core): State<Arc<ServingCore>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if req.uri().path() != MODEL_INFER {
        return next.run(req).await;
    }
    let started = Instant::now();
    let reservation = match core.reserve_message() {
        Ok(r) => r,
        Err(e) => {
            core.record(Protocol::Grpc, None, e.outcome(), started);
            return tonic::Status::from(e).into_http();
        }
    };
    let recorded = service::Recorded::default();
    req.extensions_mut().insert(recorded.clone());
    let response = next.run(req).await;
    if !recorded.0.load(std::sync::atomic::Ordering::Acquire) {
        let code = response
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i32>().ok())
            .map(tonic::Code::from);
        let outcome = match code {
            Some(tonic::Code::OutOfRange | tonic::Code::ResourceExhausted) => "too_large",
            Some(tonic::Code::Unavailable) => "server_error",
            _ => "client_error",
        };
        core.record(Protocol::Grpc, None, outcome, started);
    }
    drop(reservation);
    response
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        let message = e.public_message();
        match e {
            ApiError::BadRequest(_) => tonic::Status::invalid_argument(message),
            ApiError::NotFound(_) => tonic::Status::not_found(message),
            ApiError::PayloadTooLarge(_) | ApiError::Busy(_) => tonic::Status::resource_exhausted(message),
            ApiError::RequestTimeout(_) | ApiError::DeadlineExceeded(_) => {
                tonic::Status::deadline_exceeded(message)
            }
            ApiError::Unavailable(_) => tonic::Status::unavailable(message),
            ApiError::Unauthenticated(_) => tonic::Status::unauthenticated(message),
            ApiError::PermissionDenied(_) => tonic::Status::permission_denied(message),
            ApiError::Internal(_) => tonic::Status::internal(message),
        }
    }
}
