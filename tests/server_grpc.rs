//! The gRPC front door, booted for real: inference.GRPCInferenceService with raw and typed
//! contents, raw outputs always, status codes that name the problem, malformed protobuf,
//! message limits, and grpc.health.v1.

mod common;

use common::server::{Server, add_model, write_calibration};
use sluice::protocol::grpc::pb;
use sluice::protocol::grpc::pb::grpc_inference_service_client::GrpcInferenceServiceClient;
use tonic::Code;
use tonic::transport::Channel;

fn repo() -> tempfile::TempDir {
    let repo = tempfile::tempdir().unwrap();
    let gated = add_model(repo.path(), "gated", &["--gates", "channel,block,exits", "--seed", "3"], "");
    write_calibration(&gated);
    repo
}

async fn client(s: &Server) -> GrpcInferenceServiceClient<Channel> {
    GrpcInferenceServiceClient::connect(format!("http://{}", s.grpc)).await.unwrap()
}

fn input(n: usize) -> Vec<f32> {
    (0..n * 784).map(|i| ((i * 13) % 97) as f32 / 48.0 - 1.0).collect()
}

fn infer_request(shape: Vec<i64>, raw: Option<Vec<u8>>, typed: Option<Vec<f32>>) -> pb::ModelInferRequest {
    pb::ModelInferRequest {
        model_name: "gated".into(),
        id: "req-1".into(),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape,
            contents: typed.map(|v| pb::InferTensorContents { fp32_contents: v, ..Default::default() }),
            ..Default::default()
        }],
        raw_input_contents: raw.into_iter().collect(),
        ..Default::default()
    }
}

fn logits(resp: &pb::ModelInferResponse) -> Vec<f32> {
    resp.raw_output_contents[0].chunks(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn raw_and_typed_inputs_give_the_same_raw_outputs() {
    let repo = repo();
    let s = Server::start(repo.path(), &[]);
    let mut c = client(&s).await;
    assert!(c.server_live(pb::ServerLiveRequest {}).await.unwrap().into_inner().live);
    assert!(c.server_ready(pb::ServerReadyRequest {}).await.unwrap().into_inner().ready);
    let meta = c
        .model_metadata(pb::ModelMetadataRequest { name: "gated".into(), version: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.inputs[0].shape, vec![-1, 1, 28, 28]);
    let config = c
        .model_config(pb::ModelConfigRequest { name: "gated".into(), version: String::new() })
        .await
        .unwrap()
        .into_inner();
    let config = config.config.unwrap();
    assert_eq!((config.max_batch_size, config.input[0].data_type), (32, pb::DataType::TypeFp32 as i32));

    let x = input(2);
    let raw: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    let a = c.model_infer(infer_request(vec![2, 1, 28, 28], Some(raw), None)).await.unwrap().into_inner();
    let b = c.model_infer(infer_request(vec![2, 1, 28, 28], None, Some(x))).await.unwrap().into_inner();
    assert_eq!(a.id, "req-1");
    assert_eq!(a.outputs.len(), 3);
    assert!(a.outputs.iter().all(|o| o.contents.is_none()), "outputs travel raw");
    assert_eq!(a.raw_output_contents.len(), 3);
    assert_eq!(logits(&a), logits(&b));
    assert_eq!(logits(&a).len(), 20);
    let version = &a.parameters["sluice_policy_version"];
    assert_eq!(version.parameter_choice, Some(pb::infer_parameter::ParameterChoice::Int64Param(1)));
    let stats = c
        .model_statistics(pb::ModelStatisticsRequest { name: "gated".into(), version: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.model_stats[0].inference_count, 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_map_to_status_codes_that_name_the_problem() {
    let repo = repo();
    let s = Server::start(repo.path(), &["--grpc-max-message-bytes", "20000"]);
    let mut c = client(&s).await;
    let err = c.model_infer(infer_request(vec![1, 1, 28, 27], None, Some(vec![0.0; 756]))).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("shape [1, 1, 28, 27] given"), "{}", err.message());
    let err = c.model_infer(infer_request(vec![1, 1, 28, 28], Some(vec![0u8; 17]), None)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("17 bytes of data"), "{}", err.message());
    let mut unknown = infer_request(vec![1, 1, 28, 28], None, Some(vec![0.0; 784]));
    unknown.model_name = "nope".into();
    let err = c.model_infer(unknown).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err =
        c.model_infer(infer_request(vec![8, 1, 28, 28], Some(vec![0u8; 8 * 3136]), None)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "over --grpc-max-message-bytes: {}", err.message());
    assert!(err.message().contains("exceeds the limit of 20000 bytes"), "{}", err.message());
    let err =
        c.model_ready(pb::ModelReadyRequest { name: "gated".into(), version: "9".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // Malformed protobuf: garbage bytes on the ModelInfer method.
    let channel = Channel::from_shared(format!("http://{}", s.grpc)).unwrap().connect().await.unwrap();
    let mut raw = tonic::client::Grpc::new(channel);
    raw.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/inference.GRPCInferenceService/ModelInfer");
    let err = raw
        .unary::<Vec<u8>, Vec<u8>, RawCodec>(
            tonic::Request::new(vec![0x0a, 0xff, 0xff, 0xff, 0x01, 0x02]),
            path,
            RawCodec,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(err.message().contains("malformed protobuf"), "{}", err.message());

    // Still serving.
    let ok = c.model_infer(infer_request(vec![1, 1, 28, 28], None, Some(vec![0.5; 784]))).await;
    assert!(ok.is_ok());
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        Channel::from_shared(format!("http://{}", s.grpc)).unwrap().connect().await.unwrap(),
    );
    let status = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap();
    assert_eq!(
        status.into_inner().status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

/// Sends and receives raw bytes (to test malformed messages).
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf;
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn deadlines_budgets_and_packed_ints_are_enforced_over_grpc() {
    let repo = tempfile::tempdir().unwrap();
    // Batches wait 3 s for company; the model's deadline is 100 ms. (A client's own gRPC
    // deadline reaches the same code as `grpc-timeout`, but the client's timer fires first.)
    let slow = add_model(repo.path(), "gated", &["--seed", "3"], "");
    let path = slow.join("config.toml");
    let mut config: toml::Table = std::fs::read_to_string(&path).unwrap().parse().unwrap();
    for (section, key, value) in
        [("batching", "max_queue_delay_us", 3_000_000), ("limits", "default_timeout_ms", 100)]
    {
        let table = config.entry(section).or_insert_with(|| toml::Table::new().into());
        table.as_table_mut().unwrap().insert(key.into(), value.into());
    }
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
    let s = Server::start(repo.path(), &["--max-inflight-body-bytes", "20000"]);
    let mut c = client(&s).await;
    let started = std::time::Instant::now();
    let err = c.model_infer(infer_request(vec![1, 1, 28, 28], None, Some(input(1)))).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{}", err.message());
    assert!(err.message().contains("deadline"), "{}", err.message());
    assert!(started.elapsed() < std::time::Duration::from_secs(3), "answered at the deadline");
    // Packed integers for an FP32 input: refused by name, never widened.
    let mut ints = infer_request(vec![1, 1, 28, 28], None, None);
    ints.inputs[0].contents =
        Some(pb::InferTensorContents { int_contents: vec![7; 784], ..Default::default() });
    let err = c.model_infer(ints).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("int_contents given for a FP32 tensor"), "{}", err.message());
    // A message larger than the server's whole in-flight byte budget.
    let big = infer_request(vec![8, 1, 28, 28], None, Some(input(8)));
    let err = c.model_infer(big).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    assert!(err.message().contains("--max-inflight-body-bytes"), "{}", err.message());
    let scrape =
        String::from_utf8(common::server::request(s.metrics, "GET", "/metrics", &[], b"").body).unwrap();
    for (outcome, n) in [("timeout", 1), ("client_error", 1)] {
        let line =
            format!("sluice_requests_total{{model=\"gated\",outcome=\"{outcome}\",protocol=\"grpc\"}} {n}");
        assert!(scrape.contains(&line), "{line} in\n{scrape}");
    }
    assert!(
        scrape.contains("sluice_requests_total{model=\"_none\",outcome=\"rejected\",protocol=\"grpc\"} 1"),
        "{scrape}"
    );
}
