//! Routes and handlers of the HTTP front door.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use tracing::instrument;

use super::codec::{HEADER_LENGTH, decode_request, encode_response};
use super::{HttpState, admin};
use crate::control::auth::AdminAccess;
use crate::protocol::ApiError;
use crate::serving::{ModelRuntime, Protocol, ServingCore};

/// The extensions this server really implements (server metadata lists exactly these).
pub const EXTENSIONS: [&str; 5] =
    ["binary_tensor_data", "classification", "model_configuration", "parameters", "statistics"];

/// Limits of the HTTP front door.
#[derive(Clone, Copy, Debug)]
pub struct HttpLimits {
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: usize,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(json!({ "error": self.public_message() }))).into_response()
    }
}

/// The control API alone (the loopback admin listener), without a fallback route so the
/// gRPC admin service can be merged onto the same port.
pub fn admin_router(core: Arc<ServingCore>, limits: HttpLimits) -> Router {
    Router::new()
        .route(
            "/v2/models/{model}/gating",
            get(admin::get_gating).put(admin::put_gating).patch(admin::patch_gating),
        )
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .with_state(HttpState { core, limits, admin: AdminAccess::Open })
}

/// Every route of the v2 protocol, and the control API guarded by `admin`.
pub fn router(core: Arc<ServingCore>, limits: HttpLimits, admin: AdminAccess) -> Router {
    let model_routes = Router::new()
        .route("/", get(model_metadata))
        .route("/ready", get(model_ready))
        .route("/config", get(model_config))
        .route("/stats", get(model_stats))
        .route("/infer", post(infer));
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2/models/stats", get(all_stats))
        .route(
            "/v2/models/{model}/gating",
            get(admin::get_gating).put(admin::put_gating).patch(admin::patch_gating),
        )
        .nest("/v2/models/{model}", model_routes.clone())
        .nest("/v2/models/{model}/versions/{version}", model_routes)
        .fallback(|| async {
            ApiError::NotFound("no such route (see the KServe v2 protocol: /v2/...)".into())
        })
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .with_state(HttpState { core, limits, admin })
}

/// `{model}` or `{model}/versions/{version}` path parameters.
#[derive(serde::Deserialize)]
struct ModelPath {
    model: String,
    version: Option<String>,
}

fn lookup<'a>(core: &'a ServingCore, p: &ModelPath) -> Result<&'a Arc<ModelRuntime>, ApiError> {
    core.model(&p.model, p.version.as_deref())
}

async fn server_metadata() -> Json<Value> {
    Json(json!({ "name": "sluice", "version": env!("CARGO_PKG_VERSION"), "extensions": EXTENSIONS }))
}

async fn live() -> StatusCode {
    StatusCode::OK
}

async fn ready(State(s): State<HttpState>) -> StatusCode {
    if s.core.is_ready() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }
}

async fn model_ready(State(s): State<HttpState>, Path(p): Path<ModelPath>) -> Result<StatusCode, ApiError> {
    lookup(&s.core, &p)?;
    Ok(if s.core.is_ready() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE })
}

async fn model_metadata(
    State(s): State<HttpState>,
    Path(p): Path<ModelPath>,
) -> Result<Json<Value>, ApiError> {
    let m = &lookup(&s.core, &p)?.interface;
    let mut input_shape = vec![-1i64];
    input_shape.extend(m.item_shape());
    let outputs: Vec<Value> = m
        .outputs()
        .into_iter()
        .map(|(name, dt, dims)| {
            let shape: Vec<i64> = std::iter::once(-1).chain(dims).collect();
            json!({ "name": name, "datatype": dt.name(), "shape": shape })
        })
        .collect();
    Ok(Json(json!({
        "name": m.name,
        "versions": [m.version],
        "platform": crate::serving::PLATFORM,
        "inputs": [{ "name": m.input_name, "datatype": m.input_datatype.name(), "shape": input_shape }],
        "outputs": outputs,
    })))
}

async fn model_config(State(s): State<HttpState>, Path(p): Path<ModelPath>) -> Result<Json<Value>, ApiError> {
    let c = lookup(&s.core, &p)?.triton_config();
    let tensor = |(name, dt, dims): &(String, crate::protocol::DataType, Vec<i64>)| json!({ "name": name, "data_type": dt.config_name(), "dims": dims });
    Ok(Json(json!({
        "name": c.name,
        "platform": c.platform,
        "backend": c.backend,
        "max_batch_size": c.max_batch_size,
        "input": c.inputs.iter().map(tensor).collect::<Vec<_>>(),
        "output": c.outputs.iter().map(tensor).collect::<Vec<_>>(),
        "dynamic_batching": { "max_queue_delay_microseconds": c.max_queue_delay_us },
        "instance_group": [{ "name": format!("{}_cpu", c.name), "kind": "KIND_CPU", "count": c.instances }],
    })))
}

async fn model_stats(State(s): State<HttpState>, Path(p): Path<ModelPath>) -> Result<Json<Value>, ApiError> {
    let m = lookup(&s.core, &p)?;
    Ok(Json(json!({ "model_stats": [stats_json(m)] })))
}

async fn all_stats(State(s): State<HttpState>) -> Json<Value> {
    Json(json!({ "model_stats": s.core.models().map(|m| stats_json(m)).collect::<Vec<_>>() }))
}

fn stats_json(m: &ModelRuntime) -> Value {
    let st = &m.stats;
    let d = |t: &crate::serving::stats::TimedCount| {
        let (count, ns) = t.get();
        json!({ "count": count, "ns": ns })
    };
    let zero = json!({ "count": 0, "ns": 0 });
    json!({
        "name": m.interface.name,
        "version": m.interface.version,
        "last_inference": st.last_inference_ms.load(Ordering::Relaxed),
        "inference_count": st.inference_count.load(Ordering::Relaxed),
        "execution_count": st.execution_count.load(Ordering::Relaxed),
        "inference_stats": {
            "success": d(&st.success),
            "fail": d(&st.fail),
            "queue": d(&st.queue),
            "compute_input": d(&st.compute_input),
            "compute_infer": d(&st.compute_infer),
            "compute_output": d(&st.compute_output),
            "cache_hit": zero,
            "cache_miss": zero,
        },
        "batch_stats": [],
    })
}

#[instrument(skip_all, fields(model = %p.model))]
async fn infer(
    State(s): State<HttpState>,
    Path(p): Path<ModelPath>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(format!(
                "request body exceeds the limit of {} bytes (--http-max-body-bytes)",
                s.limits.max_body_bytes
            ))
        } else {
            ApiError::BadRequest(format!("cannot read the request body: {e}"))
        }
    })?;
    let model = lookup(&s.core, &p)?;
    let header_length = match headers.get(HEADER_LENGTH) {
        None => None,
        Some(v) => Some(v.to_str().ok().and_then(|s| s.trim().parse::<usize>().ok()).ok_or_else(|| {
            ApiError::BadRequest(
                "header `Inference-Header-Content-Length` must be a non-negative integer".into(),
            )
        })?),
    };
    let (mut req, _raw) = decode_request(body, header_length, &model.interface)?;
    req.model = p.model.clone();
    req.version = p.version.clone();
    let resp = s.core.infer(req, Protocol::Http).await?;
    let (bytes, json_length) = encode_response(&resp);
    let mut response = bytes.into_response();
    let headers = response.headers_mut();
    match json_length {
        Some(n) => {
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
            headers.insert(HEADER_LENGTH, HeaderValue::from(n));
        }
        None => {
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
    }
    Ok(response)
}
