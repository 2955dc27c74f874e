//! Routes and handlers of the HTTP front door.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::{BodyExt, Limited};
use serde_json::{Value, json};
use tracing::instrument;

use super::codec::{HEADER_LENGTH, decode_request, encode_response};
use super::{HttpState, admin};
use crate::control::auth::AdminAccess;
use crate::protocol::EXTENSIONS;
use crate::protocol::conn::ConnectionLimits;
use crate::serving::ApiError;
use crate::serving::{Admission, DataType, ModelRuntime, Protocol, ServingCore};

/// Limits of the HTTP front door (docs/security.md).
#[derive(Clone, Copy, Debug)]
pub struct HttpLimits {
    /// A cap on every model's body limit (413 beyond); `None`: each model's own limit.
    pub max_body_bytes: Option<usize>,
    /// Time a client has to send a request's whole body (408 beyond).
    pub body_read_timeout: Duration,
    pub connections: ConnectionLimits,
}

/// Largest body of a control-API call.
pub const ADMIN_MAX_BODY_BYTES: usize = 64 << 10;

/// Largest unread body of a refused request that is read and dropped to keep its
/// connection open (larger ones close the connection).
const DRAIN_MAX_BYTES: usize = 64 << 10;

/// Largest response encoded on the async runtime (more goes to the decode pool).
const INLINE_ENCODE_VALUES: usize = 16 << 10;

/// The HTTP status of an error.
pub fn status_of(e: &ApiError) -> StatusCode {
    match e {
        ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
        ApiError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
        ApiError::PermissionDenied(_) => StatusCode::FORBIDDEN,
        ApiError::Conflict(_) => StatusCode::CONFLICT,
        ApiError::NotFound(_) => StatusCode::NOT_FOUND,
        ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
        ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        ApiError::Busy(_) => StatusCode::TOO_MANY_REQUESTS,
        ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        ApiError::DeadlineExceeded(_) => StatusCode::GATEWAY_TIMEOUT,
    }
}

impl IntoResponse for ApiError {
    /// The error as a response: its status and `{"error": "..."}`.
    fn into_response(self) -> Response {
        (status_of(&self), Json(json!({ "error": self.public_message() }))).into_response()
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
        .route(
            "/v2/models/{model}/gating/controller",
            get(admin::get_gating).put(admin::put_controller).patch(admin::patch_controller),
        )
        .layer(DefaultBodyLimit::max(ADMIN_MAX_BODY_BYTES))
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
        .route(
            "/v2/models/{model}/gating/controller",
            get(admin::get_gating).put(admin::put_controller).patch(admin::patch_controller),
        )
        .nest("/v2/models/{model}", model_routes.clone())
        .nest("/v2/models/{model}/versions/{version}", model_routes)
        .fallback(|| async {
            ApiError::NotFound("no such route (see the KServe v2 protocol: /v2/...)".into())
        })
        .layer(DefaultBodyLimit::max(ADMIN_MAX_BODY_BYTES))
        .with_state(HttpState { core, limits, admin })
}

/// `{model}` or `{model}/versions/{version}` path parameters.
#[derive(serde::Deserialize)]
struct ModelPath {
    model: String,
    version: Option<String>,
}

fn lookup(core: &ServingCore, p: &ModelPath) -> Result<Arc<ModelRuntime>, ApiError> {
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
    let m = lookup(&s.core, &p)?;
    Ok(if s.core.model_ready(&m) { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE })
}

async fn model_metadata(
    State(s): State<HttpState>,
    Path(p): Path<ModelPath>,
) -> Result<Json<Value>, ApiError> {
    let m = lookup(&s.core, &p)?;
    let m = &m.interface;
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
    let tensor = |(name, dt, dims): &(String, crate::serving::DataType, Vec<i64>)| json!({ "name": name, "data_type": dt.config_name(), "dims": dims });
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
    Ok(Json(json!({ "model_stats": [stats_json(&m)] })))
}

async fn all_stats(State(s): State<HttpState>) -> Json<Value> {
    Json(json!({ "model_stats": s.core.models().iter().map(|m| stats_json(m)).collect::<Vec<_>>() }))
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

/// `POST …/infer`: admitted before its body is read, the body read under the model's size
/// limit and the body timeout, decoded (large bodies on the decode pool), inferred, encoded.
/// Every request is counted, whatever happens to it.
#[instrument(skip_all, fields(model = %p.model))]
async fn infer(State(s): State<HttpState>, Path(p): Path<ModelPath>, request: Request) -> Response {
    let mut record = s.core.begin_request(Protocol::Http);
    let (parts, body) = request.into_parts();
    let mut body = Some(body);
    let result = infer_request(&s, &p, &parts.headers, &mut body, &mut record.model).await;
    record.finish(&result);
    match result {
        Ok(response) => response,
        Err(e) => {
            // A body cut off part-way (over the limit, too slow) leaves the connection
            // unusable: say so.
            let cut_off = matches!(e, ApiError::PayloadTooLarge(_) | ApiError::RequestTimeout(_));
            let mut response = e.into_response();
            match body {
                Some(unread) => {
                    let declared =
                        length_header(&parts.headers, header::CONTENT_LENGTH.as_str(), "").ok().flatten();
                    settle_unread_body(unread, declared, s.limits.body_read_timeout, &mut response).await;
                }
                None if cut_off => {
                    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                None => {}
            }
            response
        }
    }
}

/// A refused request whose body was not read: a small one is read and dropped so the
/// connection stays usable; a large or unknown one is not read, and the connection closes
/// after the answer (`Connection: close`), so the client learns it at once rather than from
/// a reset on its next request.
async fn settle_unread_body(body: Body, declared: Option<usize>, timeout: Duration, response: &mut Response) {
    let drained = match declared {
        Some(n) if n <= DRAIN_MAX_BYTES => {
            let read = Limited::new(body, DRAIN_MAX_BYTES).collect();
            matches!(tokio::time::timeout(timeout, read).await, Ok(Ok(_)))
        }
        _ => false,
    };
    if !drained {
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
}

/// A header holding a non-negative integer, if present.
fn length_header(headers: &HeaderMap, name: &str, shown: &str) -> Result<Option<usize>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => {
            v.to_str().ok().and_then(|s| s.trim().parse::<usize>().ok()).map(Some).ok_or_else(|| {
                ApiError::BadRequest(format!("header `{shown}` must be a non-negative integer"))
            })
        }
    }
}

async fn infer_request(
    s: &HttpState,
    p: &ModelPath,
    headers: &HeaderMap,
    body: &mut Option<Body>,
    model_slot: &mut Option<Arc<ModelRuntime>>,
) -> Result<Response, ApiError> {
    let model = s.core.model(&p.model, p.version.as_deref())?;
    *model_slot = Some(model.clone());
    let content_length = length_header(headers, header::CONTENT_LENGTH.as_str(), "Content-Length")?;
    let header_length = length_header(headers, HEADER_LENGTH, "Inference-Header-Content-Length")?;
    if let (Some(json), Some(body)) = (header_length, content_length)
        && json > body
    {
        return Err(ApiError::BadRequest(format!(
            "header `Inference-Header-Content-Length` is {json}, but the body has only {body} bytes"
        )));
    }
    let limit = s
        .limits
        .max_body_bytes
        .map_or(model.interface.limits.max_body_bytes, |cap| cap.min(model.interface.limits.max_body_bytes));
    if let Some(n) = content_length
        && n > limit
    {
        return Err(too_large(&model, n, limit));
    }
    // A raw body for an image model is one encoded image: its size limit applies unread.
    if let (Some(0), Some(n), DataType::Bytes, Some(image)) =
        (header_length, content_length, model.interface.input_datatype, &model.interface.image)
        && n > image.max_bytes
    {
        return Err(ApiError::PayloadTooLarge(format!(
            "{n} bytes of encoded image; model `{}` accepts at most {} (input.image.max_bytes)",
            model.interface.name, image.max_bytes
        )));
    }
    let mut admission = s.core.admit(&p.model, p.version.as_deref(), content_length)?;
    let unread = body.take().ok_or_else(|| ApiError::Internal("the request body was taken twice".into()))?;
    let body = read_body(unread, limit, s.limits.body_read_timeout, &mut admission)
        .await
        .map_err(|e| e.unwrap_or_else(|| too_large(&model, limit + 1, limit)))?;
    let mut req = if s.core.decode_offloaded(body.len()) {
        let m = model.clone();
        s.core.decode(move || decode_request(body, header_length, &m.interface)).await??
    } else {
        decode_request(body, header_length, &model.interface)?
    };
    req.model = p.model.clone();
    req.version = p.version.clone();
    let resp = s.core.infer(admission, req).await?;
    let values: usize = resp.outputs.iter().map(|o| o.shape.iter().product::<i64>().max(0) as usize).sum();
    let (bytes, json_length) = if values > INLINE_ENCODE_VALUES {
        s.core.decode(move || encode_response(&resp)).await?
    } else {
        encode_response(&resp)
    };
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

fn too_large(model: &ModelRuntime, bytes: usize, limit: usize) -> ApiError {
    ApiError::PayloadTooLarge(format!(
        "the request body ({bytes} bytes or more) exceeds the limit of {limit} bytes for model `{}` \
         (max_batch_size × the item's size, limits.max_body_bytes, --http-max-body-bytes)",
        model.interface.name
    ))
}

/// Reads a body of at most `limit` bytes within `timeout`, reserving each chunk's bytes in
/// the server's budget before keeping it (the buffer never holds bytes not reserved; the
/// chunks are joined once at the end). `Err(None)`: over the limit.
async fn read_body(
    mut body: Body,
    limit: usize,
    timeout: Duration,
    admission: &mut Admission,
) -> Result<Bytes, Option<ApiError>> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut total = 0usize;
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => {
                return Err(Some(ApiError::RequestTimeout(format!(
                    "the request body did not arrive within {} s (--body-read-timeout)",
                    timeout.as_secs_f64()
                ))));
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(Some(ApiError::BadRequest(format!("cannot read the request body: {e}"))));
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else { continue };
        total += data.len();
        if total > limit {
            return Err(None);
        }
        admission.reserve_bytes(data.len()).map_err(Some)?;
        chunks.push(data);
    }
    Ok(match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop().unwrap_or_default(),
        _ => {
            let mut joined = bytes::BytesMut::with_capacity(total);
            chunks.iter().for_each(|c| joined.extend_from_slice(c));
            joined.freeze()
        }
    })
}
