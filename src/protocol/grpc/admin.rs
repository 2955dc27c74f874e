//! The control API over gRPC: `sluice.admin.v1.GatingAdmin` (get, replace, patch, and a
//! server-streaming watch of policy changes), guarded by the listener's [`AdminAccess`].

use std::pin::Pin;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use tokio::sync::broadcast::error::RecvError;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

use super::admin_pb::gating_admin_server::{GatingAdmin, GatingAdminServer};
use super::admin_pb::{self as pb};
use crate::control::auth::{AdminAccess, Denied};
use crate::control::controller::{ControllerChange, Percentile};
use crate::control::policy::parse_mode;
use crate::control::{ChangeKind, PolicyChange};
use crate::engine::{ChannelMode, GatePolicy};
use crate::observability::Metrics;
use crate::serving::ApiError;
use crate::serving::adaptive::{ControllerState, ControllerView};
use crate::serving::{ModelRuntime, ServingCore};

/// The service implementation.
pub struct GatingAdminService {
    core: Arc<ServingCore>,
}

/// The service wrapped in the access check of its listener.
pub type GuardedAdmin = InterceptedService<GatingAdminServer<GatingAdminService>, AdminGuard>;

/// Builds the guarded service.
pub fn service(core: Arc<ServingCore>, access: AdminAccess) -> GuardedAdmin {
    let guard = AdminGuard { access, metrics: core.metrics.clone() };
    InterceptedService::new(GatingAdminServer::new(GatingAdminService { core }), guard)
}

/// Checks `authorization` metadata against the listener's access rule.
#[derive(Clone)]
pub struct AdminGuard {
    access: AdminAccess,
    metrics: Arc<Metrics>,
}

impl tonic::service::Interceptor for AdminGuard {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let auth = req.metadata().get("authorization").and_then(|v| v.to_str().ok());
        match self.access.check(auth) {
            Ok(()) => Ok(req),
            Err(denied) => {
                self.metrics.admin_rejected(denied.reason());
                tracing::warn!(reason = denied.reason(), peer = ?req.remote_addr(), "control API call refused");
                Err(match denied {
                    Denied::MissingToken => Status::unauthenticated(denied.message()),
                    _ => Status::permission_denied(denied.message()),
                })
            }
        }
    }
}

fn mode_name(m: ChannelMode) -> String {
    match m {
        ChannelMode::Slice => "slice".into(),
        ChannelMode::Select => "select".into(),
    }
}

fn policy(p: &GatePolicy) -> pb::Policy {
    pb::Policy {
        version: p.version,
        budget: p.budget,
        channel_threshold: p.channel_threshold,
        block_threshold: p.block_threshold,
        exit_threshold: p.exit_threshold,
        channel_mode: mode_name(p.channel_mode),
        overrides: p.overrides.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        source: p.source.as_str().into(),
    }
}

fn controller_status(v: &ControllerView) -> pb::ControllerStatus {
    let c = &v.config;
    pb::ControllerStatus {
        enabled: c.enabled,
        percentile: c.percentile.as_str().into(),
        target_ms: c.target_ms,
        max_accuracy_drop: c.max_accuracy_drop,
        min_budget: c.min_budget,
        state: match v.state {
            ControllerState::Off => "off",
            ControllerState::Suspended => "suspended",
            ControllerState::Active => "active",
        }
        .into(),
        reason: v.reason.clone().unwrap_or_default(),
        budget: v.budget,
        ceiling: v.ceiling,
        floor: v.floor,
        at_floor: v.at_floor,
        cannot_meet: v.cannot_meet,
        predicted_ms: v.predicted_ms,
        measured_ms: v.measured_ms,
        arrival_rate: v.arrival_rate,
        seconds_at_floor: v.seconds_at_floor,
        changes: v.changes,
        tick_ms: c.tick_ms,
        hold_ticks: c.hold_ticks,
    }
}

fn controller_change(c: Option<pb::ControllerChange>, actor: &str) -> Result<ControllerChange, Status> {
    let c = c.unwrap_or_default();
    let percentile = match &c.percentile {
        Some(p) => Some(p.parse::<Percentile>().map_err(Status::invalid_argument)?),
        None => None,
    };
    Ok(ControllerChange {
        enabled: c.enabled,
        percentile,
        target_ms: c.target_ms,
        max_accuracy_drop: c.max_accuracy_drop,
        min_budget: c.min_budget,
        actor: (!actor.is_empty()).then(|| actor.to_string()),
    })
}

fn state(m: &ModelRuntime, p: &GatePolicy) -> pb::GatingState {
    let calibration = m
        .policy
        .calibration()
        .map(|t| {
            t.budgets
                .iter()
                .map(|e| pb::CalibrationPoint {
                    budget: e.budget,
                    channel_threshold: e.point.channel_threshold,
                    block_threshold: e.point.block_threshold,
                    exit_threshold: e.point.exit_threshold,
                    validation_accuracy: e.point.validation_accuracy,
                    flop_fraction: e.point.flop_fraction,
                    latency_ratio: e.latency_ratio,
                })
                .collect()
        })
        .unwrap_or_default();
    pb::GatingState {
        model: m.interface.name.clone(),
        policy: Some(policy(p)),
        calibration,
        gates: m.policy.gate_ids().to_vec(),
        controller: Some(controller_status(&m.adaptive.view())),
        operator_policy: Some(policy(&m.policy.operator_policy())),
        policy_file: m.policy.file().map(|f| pb::PolicyFileStatus {
            path: f.path,
            version: f.version,
            sha256: f.sha256,
        }),
    }
}

fn change(c: Option<pb::PolicyChange>, actor: &str) -> Result<PolicyChange, Status> {
    let c = c.unwrap_or_default();
    let channel_mode = match &c.channel_mode {
        Some(m) => Some(parse_mode(m).map_err(|e| Status::invalid_argument(e.0))?),
        None => None,
    };
    Ok(PolicyChange {
        budget: c.budget,
        channel_threshold: c.channel_threshold,
        block_threshold: c.block_threshold,
        exit_threshold: c.exit_threshold,
        channel_mode,
        overrides: (!c.overrides.is_empty()).then(|| c.overrides.into_iter().collect()),
        clear_overrides: c.clear_overrides,
        actor: (!actor.is_empty()).then(|| actor.to_string()),
    })
}

impl GatingAdminService {
    fn model(&self, name: &str) -> Result<Arc<ModelRuntime>, Status> {
        Ok(self.core.model(name, None)?)
    }

    fn apply(
        &self,
        r: Request<pb::ChangeGatingRequest>,
        kind: ChangeKind,
    ) -> Result<Response<pb::GatingState>, Status> {
        let peer = r.remote_addr();
        let r = r.into_inner();
        let m = self.model(&r.model)?;
        let change = change(r.change, &r.actor)?;
        let who = format!(
            "{} via grpc from {}",
            change.actor.as_deref().unwrap_or("anonymous"),
            peer.map_or("?".into(), |p| p.to_string())
        );
        let new = m.change_policy(&change, kind, &who).map_err(|e| Status::from(ApiError::from(e)))?;
        Ok(Response::new(state(&m, &new)))
    }

    fn apply_controller(
        &self,
        r: Request<pb::ChangeControllerRequest>,
        replace: bool,
    ) -> Result<Response<pb::GatingState>, Status> {
        let peer = r.remote_addr();
        let r = r.into_inner();
        let m = self.model(&r.model)?;
        let change = controller_change(r.change, &r.actor)?;
        let who = format!(
            "{} via grpc from {}",
            change.actor.as_deref().unwrap_or("anonymous"),
            peer.map_or("?".into(), |p| p.to_string())
        );
        m.change_controller(&change, replace, &who).map_err(|e| Status::from(ApiError::from(e)))?;
        Ok(Response::new(state(&m, &m.policy.snapshot())))
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::GatingState, Status>> + Send>>;

#[tonic::async_trait]
impl GatingAdmin for GatingAdminService {
    async fn get_gating(
        &self,
        r: Request<pb::GetGatingRequest>,
    ) -> Result<Response<pb::GatingState>, Status> {
        let m = self.model(&r.into_inner().model)?;
        Ok(Response::new(state(&m, &m.policy.snapshot())))
    }

    async fn set_gating(
        &self,
        r: Request<pb::ChangeGatingRequest>,
    ) -> Result<Response<pb::GatingState>, Status> {
        self.apply(r, ChangeKind::Replace)
    }

    async fn patch_gating(
        &self,
        r: Request<pb::ChangeGatingRequest>,
    ) -> Result<Response<pb::GatingState>, Status> {
        self.apply(r, ChangeKind::Patch)
    }

    async fn set_controller(
        &self,
        r: Request<pb::ChangeControllerRequest>,
    ) -> Result<Response<pb::GatingState>, Status> {
        self.apply_controller(r, true)
    }

    async fn patch_controller(
        &self,
        r: Request<pb::ChangeControllerRequest>,
    ) -> Result<Response<pb::GatingState>, Status> {
        self.apply_controller(r, false)
    }

    type WatchGatingStream = WatchStream;

    async fn watch_gating(&self, r: Request<pb::GetGatingRequest>) -> Result<Response<WatchStream>, Status> {
        let m = self.model(&r.into_inner().model)?.clone();
        // The current state first, then every later version in order; a reader more than
        // WATCH_BACKLOG changes behind skips the oldest (the versions show the gap).
        let (now, rx) = m.policy.subscribe();
        let first = state(&m, &now);
        let later = futures_util::stream::unfold((rx, m, now.version), |(mut rx, m, last)| async move {
            loop {
                match rx.recv().await {
                    Ok(p) if p.version > last => {
                        let item = Ok(state(&m, &p));
                        return Some((item, (rx, m, p.version)));
                    }
                    Ok(_) | Err(RecvError::Lagged(_)) => continue,
                    Err(RecvError::Closed) => return None,
                }
            }
        });
        let stream = futures_util::stream::once(std::future::ready(Ok(first))).chain(later);
        Ok(Response::new(Box::pin(stream)))
    }
}
