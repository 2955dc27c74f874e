//! The HTTP front door, booted for real on fixture models: KServe v2 routes, JSON and
//! binary tensors, outputs equal to the engine's, per-request gating, the bad-input suite,
//! admission control, dynamic batching and graceful shutdown.

mod common;

use std::path::Path;

use common::server::{Server, add_model, json_infer, request, write_calibration};
use serde_json::{Value, json};
use sluice::engine::{GatePolicy, Model};
use sluice::repository::ModelDir;

fn input(n: usize) -> Vec<f32> {
    (0..n * 784).map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0).collect()
}

/// The engine's logits for `values` (`[n, 1, 28, 28]`), computed in-process.
fn engine_logits(dir: &Path, values: &[f32], n: i64, policy: &GatePolicy) -> Vec<f32> {
    let _guard = tch::no_grad_guard();
    let model = Model::build(&ModelDir::open(dir).unwrap().source(Default::default())).unwrap();
    let x = tch::Tensor::from_slice(values).view([n, 1, 28, 28]);
    Vec::<f32>::try_from(model.forward(&x, policy).unwrap().0.view(-1)).unwrap()
}

fn close(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-4 * (1.0 + y.abs()))
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn repo() -> (tempfile::TempDir, std::path::PathBuf) {
    let repo = tempfile::tempdir().unwrap();
    let gated = add_model(repo.path(), "gated", &["--gates", "channel,block,exits", "--seed", "3"], "");
    write_calibration(&gated);
    add_model(repo.path(), "images", &["--image", "--seed", "4"], "");
    (repo, gated)
}

#[test]
fn metadata_health_and_config_follow_the_v2_protocol() {
    let (repo, _) = repo();
    let s = Server::start(repo.path(), &[]);
    let meta = request(s.http, "GET", "/v2", &[], b"").json();
    assert_eq!(meta["name"], "sluice");
    assert!(meta["extensions"].as_array().unwrap().contains(&json!("binary_tensor_data")));
    assert_eq!(request(s.http, "GET", "/v2/health/live", &[], b"").status, 200);
    assert_eq!(request(s.http, "GET", "/v2/health/ready", &[], b"").status, 200);
    let m = request(s.http, "GET", "/v2/models/gated", &[], b"").json();
    assert_eq!(m["inputs"][0], json!({"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}));
    assert_eq!(m["outputs"][0]["name"], "logits");
    assert_eq!(request(s.http, "GET", "/v2/models/gated/versions/1", &[], b"").status, 200);
    assert_eq!(request(s.http, "GET", "/v2/models/gated/ready", &[], b"").status, 200);
    let c = request(s.http, "GET", "/v2/models/gated/config", &[], b"").json();
    assert_eq!(
        (c["max_batch_size"].as_i64(), c["input"][0]["data_type"].as_str()),
        (Some(32), Some("TYPE_FP32"))
    );
    let missing = request(s.http, "GET", "/v2/models/nope", &[], b"");
    assert_eq!(missing.status, 404);
    assert!(missing.json()["error"].as_str().unwrap().contains("unknown model `nope`"));
    let version = request(s.http, "GET", "/v2/models/gated/versions/7", &[], b"");
    assert_eq!(version.status, 404);
    assert!(version.json()["error"].as_str().unwrap().contains("no version `7`"));
    assert_eq!(request(s.http, "GET", "/v2/nowhere", &[], b"").status, 404);
    let stats = request(s.http, "GET", "/v2/models/gated/stats", &[], b"").json();
    assert_eq!(stats["model_stats"][0]["name"], "gated");
}

#[test]
fn json_binary_and_raw_requests_return_the_engines_outputs() {
    let (repo, gated) = repo();
    let s = Server::start(repo.path(), &[]);
    let x = input(2);
    let expected = engine_logits(&gated, &x, 2, &GatePolicy::dense());

    // JSON, flat data, no Content-Type (as tritonclient sends).
    let r = request(s.http, "POST", "/v2/models/gated/infer", &[], &json_infer("input", &[2, 1, 28, 28], &x));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert!(close(&floats(&v["outputs"][0]["data"]), &expected));
    assert_eq!(v["outputs"][1]["name"], "sluice_flops");
    let p = &v["parameters"];
    assert!(p["sluice_flops_executed"].as_i64().unwrap() >= p["sluice_flops_dense"].as_i64().unwrap());
    assert_eq!(p["sluice_policy_version"], 1);

    // JSON, nested data.
    let nested: Vec<Vec<Vec<Vec<f32>>>> =
        x.chunks(784).map(|img| vec![img.chunks(28).map(|r| r.to_vec()).collect()]).collect();
    let body =
        json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 1, 28, 28], "data": nested}]});
    let v = request(s.http, "POST", "/v2/models/gated/infer", &[], body.to_string().as_bytes()).json();
    assert!(close(&floats(&v["outputs"][0]["data"]), &expected));

    // Binary input and binary outputs.
    let header = json!({
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 1, 28, 28], "parameters": {"binary_data_size": x.len() * 4}}],
        "outputs": [{"name": "logits", "parameters": {"binary_data": true}}, {"name": "sluice_exit"}]
    })
    .to_string();
    let mut body = header.clone().into_bytes();
    body.extend(x.iter().flat_map(|v| v.to_le_bytes()));
    let len = header.len().to_string();
    let r = request(
        s.http,
        "POST",
        "/v2/models/gated/infer",
        &[("Inference-Header-Content-Length", &len)],
        &body,
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    let (json, bin) = r.split_binary();
    assert_eq!(json["outputs"][0]["parameters"]["binary_data_size"], 80);
    let logits: Vec<f32> = bin.chunks(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    assert!(close(&logits, &expected));
    assert_eq!(json["outputs"][1]["data"], json!([0, 0]));

    // Raw body: a single input of batch 1, every output binary.
    let one: Vec<u8> = x[..784].iter().flat_map(|v| v.to_le_bytes()).collect();
    let r =
        request(s.http, "POST", "/v2/models/gated/infer", &[("Inference-Header-Content-Length", "0")], &one);
    assert_eq!(r.status, 200);
    let (json, bin) = r.split_binary();
    assert_eq!(json["outputs"].as_array().unwrap().len(), 3);
    let logits: Vec<f32> =
        bin[..40].chunks(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    assert!(close(&logits, &expected[..10]));

    // Classification: the top 2 labels.
    let body = json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": &x[..784]}],
                      "outputs": [{"name": "logits", "parameters": {"classification": 2}}]});
    let v = request(s.http, "POST", "/v2/models/gated/infer", &[], body.to_string().as_bytes()).json();
    let top = v["outputs"][0]["data"][0].as_str().unwrap().to_string();
    let best = (0..10).max_by(|&a, &b| expected[a].total_cmp(&expected[b])).unwrap();
    assert!(top.ends_with(&format!(":{best}:class{best}")), "{top}");
}

#[test]
fn requests_may_ask_for_a_budget_or_thresholds() {
    let (repo, gated) = repo();
    let s = Server::start(repo.path(), &["--min-request-budget", "0.5"]);
    let x = input(1);
    let with = |params: Value| {
        let body = json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": x}], "parameters": params});
        request(s.http, "POST", "/v2/models/gated/infer", &[], body.to_string().as_bytes())
    };
    let r = with(json!({"sluice_budget": 0.5}));
    assert_eq!(r.status, 200);
    let v = r.json();
    assert!(
        v["parameters"]["sluice_flops_executed"].as_i64() < v["parameters"]["sluice_flops_dense"].as_i64()
    );
    assert_eq!(v["parameters"]["sluice_policy_override"], true);
    let table =
        sluice::control::calibration::CalibrationTable::load(&gated.join("calibration.json")).unwrap();
    let expected = engine_logits(&gated, &x, 1, &table.policy_for(0.5).unwrap());
    assert!(close(&floats(&v["outputs"][0]["data"]), &expected));
    let floor = with(json!({"sluice_budget": 0.3}));
    assert_eq!(floor.status, 400);
    assert!(floor.json()["error"].as_str().unwrap().contains("minimum request budget 0.5"));
    let bad = with(json!({"sluice_block_threshold": 2.0}));
    assert_eq!(bad.status, 400);
    assert!(bad.json()["error"].as_str().unwrap().contains("sluice_block_threshold"));
    let below = with(json!({"sluice_exit_threshold": 0.0}));
    assert_eq!(below.status, 400, "exits at threshold 0 ask for less than the floor");
    assert!(below.json()["error"].as_str().unwrap().contains("minimum request budget 0.5"));
    let above = with(json!({"sluice_channel_threshold": 0.0, "sluice_block_threshold": 0.0}));
    assert_eq!(above.status, 200, "dense thresholds are above any floor");

    let unbounded = Server::start(repo.path(), &[]);
    let body = json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": x}],
                      "parameters": {"sluice_exit_threshold": 0.0}});
    let r = request(unbounded.http, "POST", "/v2/models/gated/infer", &[], body.to_string().as_bytes());
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["outputs"][2]["data"], json!([1]), "exit threshold 0 leaves at the first exit");
}

/// (status, body) of an inference request with optional extra headers.
fn post(s: &Server, model: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
    let r = request(s.http, "POST", &format!("/v2/models/{model}/infer"), headers, body);
    (r.status, String::from_utf8_lossy(&r.body).into_owned())
}

#[test]
fn bad_inputs_get_clear_errors_and_the_server_keeps_serving() {
    let (repo, _) = repo();
    let s = Server::start(repo.path(), &["--http-max-body-bytes", "100000"]);
    let x = input(1);
    /// (what, body, extra headers, expected status, expected message part)
    type Case<'a> = (&'a str, Vec<u8>, Vec<(&'a str, String)>, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            "wrong shape",
            json_infer("input", &[1, 1, 28, 27], &x[..756]),
            vec![],
            400,
            "shape [1, 1, 28, 27] given",
        ),
        (
            "wrong dtype",
            br#"{"inputs":[{"name":"input","datatype":"INT32","shape":[1,1,28,28],"data":[1]}]}"#.to_vec(),
            vec![],
            400,
            "datatype INT32 given",
        ),
        (
            "wrong element count",
            json_infer("input", &[1, 1, 28, 28], &x[..700]),
            vec![],
            400,
            "700 values given",
        ),
        ("unknown input", json_infer("pixels", &[1, 1, 28, 28], &x), vec![], 400, "unknown input `pixels`"),
        ("malformed JSON", b"{\"inputs\": [".to_vec(), vec![], 400, "malformed JSON"),
        ("not an object", b"[1, 2]".to_vec(), vec![], 400, "JSON object"),
        (
            "too large a batch",
            json_infer("input", &[33, 1, 28, 28], &[]),
            vec![],
            400,
            "exceeds the model's max_batch_size 32",
        ),
        (
            "bad header",
            b"{}".to_vec(),
            vec![("Inference-Header-Content-Length", "ten".to_string())],
            400,
            "must be a non-negative integer",
        ),
        ("oversized body", vec![b' '; 200_000], vec![], 413, "exceeds the limit of 100000 bytes"),
        ("unknown model", json_infer("input", &[1, 1, 28, 28], &x), vec![], 404, "unknown model"),
    ];
    for (what, body, headers, status, message) in cases {
        let model = if what == "unknown model" { "nope" } else { "gated" };
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (got, text) = post(&s, model, &headers, &body);
        assert_eq!(got, status, "{what}: {text}");
        let error: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{what}: not JSON: {text}"));
        assert!(error["error"].as_str().unwrap().contains(message), "{what}: {text}");
    }
    // Binary data shorter than announced, and a byte count that does not fit the shape.
    let header = r#"{"inputs":[{"name":"input","datatype":"FP32","shape":[1,1,28,28],"parameters":{"binary_data_size":3136}}]}"#;
    let mut body = header.as_bytes().to_vec();
    body.extend([0u8; 100]);
    let (status, text) =
        post(&s, "gated", &[("Inference-Header-Content-Length", &header.len().to_string())], &body);
    assert_eq!(status, 400);
    assert!(text.contains("only 100 bytes of binary data remain"), "{text}");
    let (status, text) = post(&s, "gated", &[("Inference-Header-Content-Length", "0")], &[0u8; 3000]);
    assert_eq!(status, 400);
    assert!(text.contains("3000 bytes of data"), "{text}");
    let mut with_output: Value = serde_json::from_slice(&json_infer("input", &[1, 1, 28, 28], &x)).unwrap();
    with_output["outputs"] = json!([{"name": "probs"}]);
    let (status, text) = post(&s, "gated", &[], with_output.to_string().as_bytes());
    assert_eq!(status, 400);
    assert!(text.contains("unknown output `probs`"), "{text}");
    // Not an image, for an image input.
    let (status, text) =
        post(&s, "images", &[("Inference-Header-Content-Length", "0")], b"definitely not a png");
    assert_eq!(status, 400);
    assert!(text.contains("not a PNG or JPEG"), "{text}");
    // An image the PNG decoder panics on (fuzz/regressions/): a 400, and no panic report in
    // the server's log for each such request.
    let bomb = include_bytes!("../fuzz/regressions/png-palette-length.png");
    for _ in 0..3 {
        let (status, text) = post(&s, "images", &[("Inference-Header-Content-Length", "0")], bomb);
        assert_eq!(status, 400, "{text}");
        assert!(text.contains("the decoder failed on it"), "{text}");
    }
    assert!(!s.log().contains("panicked"), "{}", s.log());

    // Still healthy and still correct.
    assert_eq!(request(s.http, "GET", "/v2/health/ready", &[], b"").status, 200);
    let (status, _) = post(&s, "gated", &[], &json_infer("input", &[1, 1, 28, 28], &x));
    assert_eq!(status, 200);
    assert!(
        s.scrape()
            .contains("sluice_requests_total{model=\"gated\",outcome=\"client_error\",protocol=\"http\"}")
    );
}

#[test]
fn images_are_decoded_server_side() {
    let (repo, _) = repo();
    let s = Server::start(repo.path(), &[]);
    let img = image::GrayImage::from_fn(56, 56, |x, y| image::Luma([((x * 4 + y) % 256) as u8]));
    let mut png = std::io::Cursor::new(Vec::new());
    img.write_to(&mut png, image::ImageFormat::Png).unwrap();
    let png = png.into_inner();
    let (status, text) = post(&s, "images", &[("Inference-Header-Content-Length", "0")], &png);
    assert_eq!(status, 200, "{text}");
    // The same image through the binary extension as a BYTES element.
    let header = format!(
        r#"{{"inputs":[{{"name":"image","datatype":"BYTES","shape":[1,1],"parameters":{{"binary_data_size":{}}}}}]}}"#,
        png.len() + 4
    );
    let mut body = header.clone().into_bytes();
    body.extend((png.len() as u32).to_le_bytes());
    body.extend(&png);
    let r = request(
        s.http,
        "POST",
        "/v2/models/images/infer",
        &[("Inference-Header-Content-Length", &header.len().to_string())],
        &body,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["outputs"][0]["shape"], json!([1, 10]));
}

#[test]
fn a_full_queue_answers_429_at_once_and_nothing_fails() {
    let repo = tempfile::tempdir().unwrap();
    add_model(repo.path(), "tight", &["--seed", "1"], "");
    let path = repo.path().join("tight/config.toml");
    let config =
        std::fs::read_to_string(&path).unwrap().replace("queue_capacity = 256", "queue_capacity = 1");
    std::fs::write(&path, config).unwrap();
    let s = Server::start(repo.path(), &[]);
    let body = json_infer("input", &[32, 1, 28, 28], &input(32));
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..12).map(|_| scope.spawn(|| post(&s, "tight", &[], &body).0)).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(statuses.iter().all(|&c| c == 200 || c == 429), "{statuses:?}");
    assert!(statuses.contains(&429), "12 concurrent requests on a queue of 1: {statuses:?}");
    assert!(statuses.contains(&200));
    assert!(s.scrape().contains("outcome=\"rejected\""));
    assert_eq!(post(&s, "tight", &[], &json_infer("input", &[1, 1, 28, 28], &input(1))).0, 200);
}

/// Sets `[batching] max_queue_delay_us` in a model's config.
fn set_queue_delay(path: &std::path::Path, us: i64) {
    let mut config: toml::Table = std::fs::read_to_string(path).unwrap().parse().unwrap();
    let batching = config.entry("batching").or_insert_with(|| toml::Table::new().into());
    batching.as_table_mut().unwrap().insert("max_queue_delay_us".into(), us.into());
    std::fs::write(path, toml::to_string(&config).unwrap()).unwrap();
}

#[test]
fn concurrent_requests_are_batched_together() {
    let repo = tempfile::tempdir().unwrap();
    add_model(repo.path(), "batched", &["--seed", "1"], "");
    set_queue_delay(&repo.path().join("batched/config.toml"), 300000);
    let s = Server::start(repo.path(), &[]);
    let body = json_infer("input", &[1, 1, 28, 28], &input(1));
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..6).map(|_| scope.spawn(|| post(&s, "batched", &[], &body).0)).collect();
        assert!(handles.into_iter().all(|h| h.join().unwrap() == 200));
    });
    let metrics = s.scrape();
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .unwrap()
            .parse()
            .unwrap()
    };
    let batches = value("sluice_batch_size_count{model=\"batched\"}");
    let rows = value("sluice_batch_size_sum{model=\"batched\"}");
    assert_eq!(rows, 6.0);
    assert!(batches < 6.0, "6 requests within the 300 ms window ran in {batches} batches");
    // FLOPs carry the model's number format.
    assert!(value("sluice_flops_dense_total{model=\"batched\",precision=\"fp32\"}") > 0.0);
}

#[test]
fn sigterm_drains_in_flight_requests_then_exits() {
    let repo = tempfile::tempdir().unwrap();
    add_model(repo.path(), "slow", &["--seed", "1"], "");
    set_queue_delay(&repo.path().join("slow/config.toml"), 1500000);
    let mut s = Server::start(repo.path(), &[]);
    let (http, metrics) = (s.http, s.metrics);
    let client = std::thread::spawn(move || {
        request(http, "POST", "/v2/models/slow/infer", &[], &json_infer("input", &[1, 1, 28, 28], &input(1)))
            .status
    });
    // Wait until the server holds the request (it waits 1.5 s for a batch to fill).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !String::from_utf8(request(metrics, "GET", "/metrics", &[], b"").body)
        .unwrap()
        .contains("sluice_inflight_requests{model=\"slow\"} 1")
    {
        assert!(std::time::Instant::now() < deadline, "the request never showed as in flight");
        std::thread::yield_now();
    }
    s.terminate();
    assert_eq!(client.join().unwrap(), 200, "the in-flight request finishes");
    let status = s.child.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");
    assert!(s.log().contains("all requests finished"));
}

#[test]
fn each_request_is_traced_from_protocol_through_queue_to_engine() {
    let (repo, _) = repo();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"));
    child.env("SLUICE_LOG", "sluice=debug");
    let s = Server::start_with(repo.path(), &["--log-format", "json"], child);
    let (status, _) = post(&s, "gated", &[], &json_infer("input", &[2, 1, 28, 28], &input(2)));
    assert_eq!(status, 200);
    let log = s.log();
    let event: Value = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["fields"]["message"] == "batch computed")
        .unwrap_or_else(|| panic!("no engine event in the log:\n{log}"));
    let spans: Vec<&str> =
        event["spans"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    let at = |name: &str| {
        spans.iter().position(|s| *s == name).unwrap_or_else(|| panic!("no {name} span in {spans:?}"))
    };
    assert!(at("infer") < at("batch") && at("batch") < at("engine"), "{spans:?}");
    let batch = &event["spans"][at("batch")];
    assert_eq!(
        (batch["model"].as_str(), batch["batch_size"].as_u64(), batch["policy_version"].as_u64()),
        (Some("gated"), Some(2), Some(1))
    );
    assert!(event["fields"]["executed_flops"].as_u64().unwrap() > 0);
}

/// `precision` in config.toml, `--precision` over it, `--layout onednn`, and the FLOP
/// counters' precision label.
#[test]
fn precision_comes_from_the_config_or_the_flag_and_labels_the_flops() {
    let repo = tempfile::tempdir().unwrap();
    let dir = add_model(repo.path(), "half", &["--seed", "1"], "");
    let path = dir.join("config.toml");
    let config = std::fs::read_to_string(&path).unwrap();
    assert!(config.contains("precision = \"fp32\""), "{config}");
    std::fs::write(&path, config.replace("precision = \"fp32\"", "precision = \"bf16\"")).unwrap();
    let body = json_infer("input", &[2, 1, 28, 28], &input(2));
    // The flag overrides the config on any CPU.
    let s = Server::start(repo.path(), &["--precision", "fp32", "--layout", "onednn"]);
    assert_eq!(post(&s, "half", &[], &body).0, 200);
    assert!(s.scrape().contains("sluice_flops_dense_total{model=\"half\",precision=\"fp32\"}"));
    drop(s);
    if sluice::engine::Precision::Bf16.check().is_ok() {
        let s = Server::start(repo.path(), &[]);
        assert_eq!(post(&s, "half", &[], &body).0, 200);
        assert!(s.scrape().contains("sluice_flops_dense_total{model=\"half\",precision=\"bf16\"}"));
    } else {
        // Without bf16 instructions the model refuses to load, saying why.
        let x = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(x.path(), json!({"shape": [1, 1, 28, 28], "data": input(1)}).to_string()).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["model", "predict", dir.to_str().unwrap(), "--input", x.path().to_str().unwrap()])
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("AVX512-BF16"));
    }
}
