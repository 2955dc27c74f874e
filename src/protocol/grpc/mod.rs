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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use axum::extract::State;
use tokio::net::TcpListener;

pub use service::{InferenceService, grpc_timeout};

use crate::control::auth::AdminAccess;
use crate::protocol::conn::{self, ConnectionLimits, ListenerMetrics};
use crate::serving::limits::Reservation;
use crate::serving::{ApiError, Protocol, ServingCore};

/// Limits of the gRPC front door (docs/security.md).
#[derive(Clone, Copy, Debug)]
pub struct GrpcLimits {
    /// A cap on the message limit (by default the largest any model accepts).
    pub max_message_bytes: Option<usize>,
    /// Time a client has to send a whole message.
    pub body_read_timeout: std::time::Duration,
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
        .layer(axum::middleware::from_fn_with_state(
            MessageGate { core: core.clone(), body_timeout: limits.body_read_timeout, max_message },
            admit_messages,
        ));
    let (open, refused) = core.metrics.listener("grpc");
    conn::serve(listener, app, limits.connections, ListenerMetrics { open, refused }, shutdown).await
}

/// Admission of inference calls before their message is read: a request slot of the
/// server's budget, then the message's bytes reserved as they arrive (refused at once with
/// RESOURCE_EXHAUSTED when the budget is spent), all held until the call is answered. A
/// message whose 5-byte gRPC header declares more than the limit is refused unread, and the
/// whole message must arrive within the body timeout. Calls that never reach the service
/// are counted here.
async fn admit_messages(
    State(gate): State<MessageGate>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if req.uri().path() != MODEL_INFER {
        return next.run(req).await;
    }
    let started = Instant::now();
    let core = &gate.core;
    let refuse = |e: ApiError| {
        core.record(Protocol::Grpc, None, e.outcome(), started);
        tonic::Status::from(e).into_http()
    };
    let reservation = match core.reserve(0) {
        Ok(r) => Arc::new(Mutex::new(r)),
        Err(e) => return refuse(e),
    };
    let exhausted = Arc::new(AtomicBool::new(false));
    let deadline = tokio::time::Instant::now() + gate.body_timeout;
    let budget = BodyBudget { reservation: reservation.clone(), exhausted: exhausted.clone() };
    let (mut req, declared) = match peek_message_length(req, deadline, budget).await {
        Ok(peeked) => peeked,
        Err(e) => return refuse(e),
    };
    let limit = gate.max_message;
    if declared > limit {
        return refuse(ApiError::PayloadTooLarge(format!(
            "a message of {declared} bytes exceeds the limit of {limit} bytes (the largest model's \
             max_batch_size × item size; --grpc-max-message-bytes)"
        )));
    }
    let recorded = service::Recorded::default();
    req.extensions_mut().insert(recorded.clone());
    let response = next.run(req).await;
    if exhausted.load(Ordering::Acquire) {
        // The message was cut off when the byte budget ran out: say so, not "bad message".
        return refuse(ApiError::Busy(
            "the server holds its limit of request bytes in flight (--max-inflight-body-bytes); retry later"
                .into(),
        ));
    }
    if !recorded.0.load(Ordering::Acquire) {
        let code = response
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i32>().ok())
            .map(tonic::Code::from);
        let outcome = match code {
            Some(tonic::Code::OutOfRange | tonic::Code::ResourceExhausted) => "too_large",
            Some(tonic::Code::DeadlineExceeded | tonic::Code::Cancelled) => "timeout",
            Some(tonic::Code::Unavailable) => "server_error",
            _ => "client_error",
        };
        core.record(Protocol::Grpc, None, outcome, started);
    }
    drop(reservation);
    response
}

/// What the admission layer needs.
#[derive(Clone)]
struct MessageGate {
    core: Arc<ServingCore>,
    body_timeout: std::time::Duration,
    max_message: usize,
}

/// A call's reservation, grown by its body as bytes arrive.
#[derive(Clone)]
struct BodyBudget {
    reservation: Arc<Mutex<Reservation>>,
    exhausted: Arc<AtomicBool>,
}

impl BodyBudget {
    fn grow(&self, n: usize) -> Result<(), ApiError> {
        let grown = self.reservation.lock().unwrap_or_else(PoisonError::into_inner).grow(n);
        if grown.is_err() {
            self.exhausted.store(true, Ordering::Release);
        }
        grown
    }
}

/// Reads the request body up to the first message's 5-byte header and returns the request
/// with its body whole again (what was read, then the rest, which must arrive by `deadline`
/// and whose bytes are reserved in `budget` as they come) and the message length the
/// header declares.
async fn peek_message_length(
    req: axum::extract::Request,
    deadline: tokio::time::Instant,
    budget: BodyBudget,
) -> Result<(axum::extract::Request, usize), ApiError> {
    use futures_util::StreamExt;
    use http_body_util::BodyExt;

    let timed_out =
        || ApiError::RequestTimeout("the gRPC message did not arrive within --body-read-timeout".into());
    let (parts, mut body) = req.into_parts();
    let mut head = bytes::BytesMut::new();
    while head.len() < 5 {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return Err(timed_out()),
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(ApiError::BadRequest(format!("cannot read the gRPC message: {e}")));
            }
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    budget.grow(data.len())?;
                    head.extend_from_slice(&data);
                }
            }
        }
    }
    let declared = match head.get(..5) {
        Some(h) => u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize,
        None => 0, // no whole header: the decoder reports the malformed call
    };
    let first = futures_util::stream::once(async move { Ok(http_body::Frame::data(head.freeze())) });
    let failed = |message: &str| Err(axum::Error::new(std::io::Error::other(message.to_string())));
    let rest = futures_util::stream::unfold(Some(body), move |body| {
        let budget = budget.clone();
        async move {
            let mut body = body?;
            match tokio::time::timeout_at(deadline, body.frame()).await {
                Ok(Some(Ok(frame))) => {
                    let size = frame.data_ref().map_or(0, |d| d.len());
                    match budget.grow(size) {
                        Ok(()) => Some((Ok(frame), Some(body))),
                        Err(_) => Some((failed("the server's in-flight byte budget is spent"), None)),
                    }
                }
                Ok(Some(Err(e))) => Some((Err(e), None)),
                Ok(None) => None,
                Err(_) => Some((failed("the gRPC message did not arrive within --body-read-timeout"), None)),
            }
        }
    });
    let body = axum::body::Body::new(http_body_util::StreamBody::new(first.chain(rest)));
    Ok((axum::extract::Request::from_parts(parts, body), declared))
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
            ApiError::Conflict(_) => tonic::Status::failed_precondition(message),
            ApiError::Internal(_) => tonic::Status::internal(message),
        }
    }
}
