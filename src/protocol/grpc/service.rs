//! `inference.GRPCInferenceService` on top of the serving core.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use prost::Message;

use tonic::{Request, Response, Status};
use tracing::instrument;

use super::convert;
use super::pb;
use super::pb::grpc_inference_service_server::GrpcInferenceService;
use crate::protocol::EXTENSIONS;
use crate::serving::{ApiError, ModelRuntime, Protocol, ServingCore, check_body_size};

/// The service implementation.
pub struct InferenceService {
    core: Arc<ServingCore>,
}

impl InferenceService {
    pub fn new(core: Arc<ServingCore>) -> Self {
        InferenceService { core }
    }

    fn model(&self, name: &str, version: &str) -> Result<Arc<ModelRuntime>, Status> {
        Ok(self.core.model(name, (!version.is_empty()).then_some(version))?)
    }

    /// One inference call after its message was decoded (its bytes reserved before, by
    /// [`super::admit_messages`]): checks the message against its model's limit, takes a
    /// place in the model's queue, converts, infers.
    async fn infer(
        &self,
        msg: pb::ModelInferRequest,
        timeout: Option<Duration>,
        started: Instant,
        model_slot: &mut Option<Arc<ModelRuntime>>,
    ) -> Result<pb::ModelInferResponse, ApiError> {
        let version = (!msg.model_version.is_empty()).then_some(msg.model_version.as_str());
        let model = self.core.model(&msg.model_name, version)?;
        *model_slot = Some(model.clone());
        check_body_size(&model, msg.encoded_len())?;
        let admission = self.core.admit_reserved(model.clone(), None, started)?;
        let mut req = convert::request(msg, &model.interface)?;
        req.timeout = timeout;
        let resp = self.core.infer(admission, req).await?;
        Ok(convert::response(resp))
    }
}

/// Marks a call whose outcome the service recorded itself (the layer counts the others:
/// messages that failed to decode or were too large).
#[derive(Clone, Default)]
pub struct Recorded(pub Arc<AtomicBool>);

/// The `grpc-timeout` header: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn tensor(
    name: String,
    dt: crate::serving::DataType,
    shape: Vec<i64>,
) -> pb::model_metadata_response::TensorMetadata {
    pb::model_metadata_response::TensorMetadata { name, datatype: dt.name().into(), shape }
}

fn duration(t: &crate::serving::stats::TimedCount) -> Option<pb::StatisticDuration> {
    let (count, ns) = t.get();
    Some(pb::StatisticDuration { count, ns })
}

fn statistics(m: &ModelRuntime) -> pb::ModelStatistics {
    let st = &m.stats;
    let zero = Some(pb::StatisticDuration { count: 0, ns: 0 });
    pb::ModelStatistics {
        name: m.interface.name.clone(),
        version: m.interface.version.clone(),
        last_inference: st.last_inference_ms.load(Ordering::Relaxed),
        inference_count: st.inference_count.load(Ordering::Relaxed),
        execution_count: st.execution_count.load(Ordering::Relaxed),
        inference_stats: Some(pb::InferStatistics {
            success: duration(&st.success),
            fail: duration(&st.fail),
            queue: duration(&st.queue),
            compute_input: duration(&st.compute_input),
            compute_infer: duration(&st.compute_infer),
            compute_output: duration(&st.compute_output),
            cache_hit: zero,
            cache_miss: zero,
        }),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for InferenceService {
    async fn server_live(
        &self,
        _: Request<pb::ServerLiveRequest>,
    ) -> Result<Response<pb::ServerLiveResponse>, Status> {
        Ok(Response::new(pb::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<pb::ServerReadyRequest>,
    ) -> Result<Response<pb::ServerReadyResponse>, Status> {
        Ok(Response::new(pb::ServerReadyResponse { ready: self.core.is_ready() }))
    }

    async fn model_ready(
        &self,
        r: Request<pb::ModelReadyRequest>,
    ) -> Result<Response<pb::ModelReadyResponse>, Status> {
        let r = r.into_inner();
        let m = self.model(&r.name, &r.version)?;
        Ok(Response::new(pb::ModelReadyResponse { ready: self.core.model_ready(&m) }))
    }

    async fn server_metadata(
        &self,
        _: Request<pb::ServerMetadataRequest>,
    ) -> Result<Response<pb::ServerMetadataResponse>, Status> {
        Ok(Response::new(pb::ServerMetadataResponse {
            name: "sluice".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: EXTENSIONS.iter().map(|e| e.to_string()).collect(),
        }))
    }

    async fn model_metadata(
        &self,
        r: Request<pb::ModelMetadataRequest>,
    ) -> Result<Response<pb::ModelMetadataResponse>, Status> {
        let r = r.into_inner();
        let m = self.model(&r.name, &r.version)?;
        let m = &m.interface;
        let batched = |dims: Vec<i64>| std::iter::once(-1).chain(dims).collect::<Vec<i64>>();
        Ok(Response::new(pb::ModelMetadataResponse {
            name: m.name.clone(),
            versions: vec![m.version.clone()],
            platform: crate::serving::PLATFORM.into(),
            inputs: vec![tensor(m.input_name.clone(), m.input_datatype, batched(m.item_shape()))],
            outputs: m.outputs().into_iter().map(|(n, dt, dims)| tensor(n, dt, batched(dims))).collect(),
        }))
    }

    #[instrument(skip_all, fields(model = %r.get_ref().model_name))]
    async fn model_infer(
        &self,
        r: Request<pb::ModelInferRequest>,
    ) -> Result<Response<pb::ModelInferResponse>, Status> {
        let mut record = self.core.begin_request(Protocol::Grpc);
        if let Some(recorded) = r.extensions().get::<Recorded>() {
            recorded.0.store(true, Ordering::Release);
        }
        let timeout = r.metadata().get("grpc-timeout").and_then(|v| v.to_str().ok()).and_then(grpc_timeout);
        let started = record.started;
        let result = self.infer(r.into_inner(), timeout, started, &mut record.model).await;
        record.finish(&result);
        Ok(Response::new(result?))
    }

    async fn model_config(
        &self,
        r: Request<pb::ModelConfigRequest>,
    ) -> Result<Response<pb::ModelConfigResponse>, Status> {
        let r = r.into_inner();
        let c = self.model(&r.name, &r.version)?.triton_config();
        let input = |(name, dt, dims): (String, crate::serving::DataType, Vec<i64>)| pb::ModelInput {
            name,
            data_type: convert::config_datatype(dt) as i32,
            dims,
            ..Default::default()
        };
        let output = |(name, dt, dims): (String, crate::serving::DataType, Vec<i64>)| pb::ModelOutput {
            name,
            data_type: convert::config_datatype(dt) as i32,
            dims,
            ..Default::default()
        };
        let config = pb::ModelConfig {
            name: c.name.clone(),
            platform: c.platform.into(),
            backend: c.backend.into(),
            max_batch_size: c.max_batch_size as i32,
            input: c.inputs.into_iter().map(input).collect(),
            output: c.outputs.into_iter().map(output).collect(),
            instance_group: vec![pb::ModelInstanceGroup {
                name: format!("{}_cpu", c.name),
                kind: pb::model_instance_group::Kind::Cpu as i32,
                count: c.instances as i32,
                ..Default::default()
            }],
            scheduling_choice: Some(pb::model_config::SchedulingChoice::DynamicBatching(
                pb::ModelDynamicBatching {
                    max_queue_delay_microseconds: c.max_queue_delay_us,
                    ..Default::default()
                },
            )),
            ..Default::default()
        };
        Ok(Response::new(pb::ModelConfigResponse { config: Some(config) }))
    }

    async fn model_statistics(
        &self,
        r: Request<pb::ModelStatisticsRequest>,
    ) -> Result<Response<pb::ModelStatisticsResponse>, Status> {
        let r = r.into_inner();
        let model_stats = if r.name.is_empty() {
            self.core.models().iter().map(|m| statistics(m)).collect()
        } else {
            let m = self.model(&r.name, &r.version)?;
            vec![statistics(&m)]
        };
        Ok(Response::new(pb::ModelStatisticsResponse { model_stats }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_every_unit_and_refuse_the_rest() {
        assert_eq!(grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(grpc_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(grpc_timeout("5u"), Some(Duration::from_micros(5)));
        assert_eq!(grpc_timeout("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "m", "100", "123456789m", "1x", "-1S", "1.5S"] {
            assert_eq!(grpc_timeout(bad), None, "{bad}");
        }
    }
}
