//! The gRPC front door (tonic): `inference.GRPCInferenceService`, wire-compatible with
//! KServe/Triton (proto/grpc_service.proto), plus the standard `grpc.health.v1` service.
//! Replies always carry `raw_output_contents` (tritonclient reads only those).

pub mod admin;
pub mod codec;
mod convert;
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

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

pub use service::InferenceService;

use crate::control::auth::AdminAccess;
use crate::serving::ServingCore;

/// Message size limits of the gRPC front door.
#[derive(Clone, Copy, Debug)]
pub struct GrpcLimits {
    pub max_message_bytes: usize,
}

/// Serves the inference, health and (guarded by `admin`) control services on `listener`
/// until `shutdown` resolves, then lets in-flight calls finish.
pub async fn serve(
    listener: TcpListener,
    core: Arc<ServingCore>,
    limits: GrpcLimits,
    admin: AdminAccess,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_service_status("", ServingStatus::Serving).await;
    health_reporter.set_service_status("inference.GRPCInferenceService", ServingStatus::Serving).await;
    let control = admin::service(core.clone(), admin);
    let inference =
        pb::grpc_inference_service_server::GrpcInferenceServiceServer::new(InferenceService::new(core))
            .max_decoding_message_size(limits.max_message_bytes)
            .max_encoding_message_size(limits.max_message_bytes);
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let shutdown = async move {
        shutdown.await;
        health_reporter.set_service_status("", ServingStatus::NotServing).await;
    };
    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(inference)
        .add_service(control)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}
