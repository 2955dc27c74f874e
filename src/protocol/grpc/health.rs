//! `grpc.health.v1.Health`, answered from the serving core's readiness at the moment of the
//! call (models loaded, an engine running for each, not shutting down) rather than from a
//! status someone has to remember to update.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use crate::serving::ServingCore;

/// How often a watch looks at readiness again.
const WATCH_INTERVAL: Duration = Duration::from_millis(500);

/// The health service over `core`.
pub fn service(core: Arc<ServingCore>) -> HealthServer<ReadinessHealth> {
    HealthServer::new(ReadinessHealth { core })
}

/// Health that is the core's readiness.
pub struct ReadinessHealth {
    core: Arc<ServingCore>,
}

fn status_of(core: &ServingCore, service: &str) -> Result<ServingStatus, Status> {
    match service {
        "" | "inference.GRPCInferenceService" => {
            Ok(if core.is_ready() { ServingStatus::Serving } else { ServingStatus::NotServing })
        }
        other => Err(Status::not_found(format!("unknown service `{other}`"))),
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for ReadinessHealth {
    async fn check(&self, r: Request<HealthCheckRequest>) -> Result<Response<HealthCheckResponse>, Status> {
        let status = status_of(&self.core, &r.into_inner().service)?;
        Ok(Response::new(HealthCheckResponse { status: status as i32 }))
    }

    type WatchStream = WatchStream;

    /// The current status at once, then each change (until the client goes away).
    async fn watch(&self, r: Request<HealthCheckRequest>) -> Result<Response<WatchStream>, Status> {
        let service = r.into_inner().service;
        let first = status_of(&self.core, &service)?;
        let core = self.core.clone();
        let changes =
            futures_util::stream::unfold((core, service, None), |(core, service, last)| async move {
                let mut tick = tokio::time::interval(WATCH_INTERVAL);
                loop {
                    tick.tick().await;
                    let now = status_of(&core, &service).unwrap_or(ServingStatus::ServiceUnknown);
                    if last != Some(now) {
                        return Some((
                            Ok(HealthCheckResponse { status: now as i32 }),
                            (core, service, Some(now)),
                        ));
                    }
                }
            });
        let stream =
            futures_util::stream::once(async move { Ok(HealthCheckResponse { status: first as i32 }) })
                .chain(changes);
        Ok(Response::new(Box::pin(stream)))
    }
}
