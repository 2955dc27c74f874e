//! The control API over HTTP: `GET`, `PUT` (replace) and `PATCH` (merge)
//! `/v2/models/{model}/gating`, guarded by the listener's [`AdminAccess`].

use std::net::SocketAddr;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use serde_json::{Value, json};

use super::HttpState;
use crate::control::controller::ControllerChange;
use crate::control::{ChangeKind, PolicyChange};
use crate::engine::GatePolicy;
use crate::serving::ApiError;
use crate::serving::ModelRuntime;

/// Checks the caller against the listener's access rule (and counts refusals).
fn authorize(state: &HttpState, headers: &HeaderMap, peer: Option<SocketAddr>) -> Result<(), ApiError> {
    let auth = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok());
    state.admin.check(auth).map_err(|denied| {
        state.core.metrics.admin_rejected(denied.reason());
        tracing::warn!(reason = denied.reason(), peer = ?peer, "control API call refused");
        match denied {
            crate::control::auth::Denied::MissingToken => ApiError::Unauthenticated(denied.message().into()),
            _ => ApiError::PermissionDenied(denied.message().into()),
        }
    })
}

/// The JSON view of a policy (its `source` always named).
pub fn policy_json(p: &GatePolicy) -> Value {
    let mut v = serde_json::to_value(p).unwrap_or(Value::Null);
    if let Some(o) = v.as_object_mut() {
        o.insert("source".into(), Value::from(p.source.as_str()));
    }
    v
}

/// The whole gating state of a model: live policy, the operator's (which the controller
/// never exceeds), the controller's settings and state, calibration table, gate ids.
pub fn state_json(m: &ModelRuntime) -> Value {
    let calibration = m.policy.calibration().map(|t| serde_json::to_value(&t.budgets).unwrap_or(Value::Null));
    json!({
        "model": m.interface.name,
        "policy": policy_json(&m.policy.snapshot()),
        "operator_policy": policy_json(&m.policy.operator_policy()),
        "controller": serde_json::to_value(m.adaptive.view()).unwrap_or(Value::Null),
        "policy_file": m.policy.file(),
        "calibration": calibration,
        "gates": m.policy.gate_ids(),
    })
}

pub async fn get_gating(
    State(s): State<HttpState>,
    Path(model): Path<String>,
    headers: HeaderMap,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Result<Json<Value>, ApiError> {
    authorize(&s, &headers, Some(peer))?;
    let m = s.core.model(&model, None)?;
    Ok(Json(state_json(&m)))
}

pub async fn put_gating(
    state: State<HttpState>,
    model: Path<String>,
    headers: HeaderMap,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    change(state, model, headers, peer, body, Changing::Policy(ChangeKind::Replace)).await
}

pub async fn patch_gating(
    state: State<HttpState>,
    model: Path<String>,
    headers: HeaderMap,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    change(state, model, headers, peer, body, Changing::Policy(ChangeKind::Patch)).await
}

pub async fn put_controller(
    state: State<HttpState>,
    model: Path<String>,
    headers: HeaderMap,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    change(state, model, headers, peer, body, Changing::Controller(ChangeKind::Replace)).await
}

pub async fn patch_controller(
    state: State<HttpState>,
    model: Path<String>,
    headers: HeaderMap,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    change(state, model, headers, peer, body, Changing::Controller(ChangeKind::Patch)).await
}

/// What a `PUT`/`PATCH` changes.
enum Changing {
    Policy(ChangeKind),
    Controller(ChangeKind),
}

/// `PUT` (replace) or `PATCH` (merge) of the policy or the controller's settings; answers
/// the model's whole gating state.
async fn change(
    State(s): State<HttpState>,
    Path(model): Path<String>,
    headers: HeaderMap,
    peer: SocketAddr,
    body: Bytes,
    changing: Changing,
) -> Result<Json<Value>, ApiError> {
    authorize(&s, &headers, Some(peer))?;
    let m = s.core.model(&model, None)?;
    let who =
        |actor: &Option<String>| format!("{} via http from {peer}", actor.as_deref().unwrap_or("anonymous"));
    match changing {
        Changing::Policy(kind) => {
            let change: PolicyChange = serde_json::from_slice(&body)
                .map_err(|e| ApiError::BadRequest(format!("invalid gating change: {e}")))?;
            m.change_policy(&change, kind, &who(&change.actor))?;
        }
        Changing::Controller(kind) => {
            let change: ControllerChange = serde_json::from_slice(&body)
                .map_err(|e| ApiError::BadRequest(format!("invalid controller change: {e}")))?;
            m.change_controller(&change, kind == ChangeKind::Replace, &who(&change.actor))?;
        }
    }
    Ok(Json(state_json(&m)))
}
