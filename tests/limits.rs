//! Hostile and slow clients against the real server: sizes refused before the body is read,
//! tensor data bounded before it is stored, image bombs refused from their header, slow
//! headers and bodies cut off, deadlines that drop queued requests, operator bounds on
//! per-request gating, policy persistence failures, honest readiness, and every one of
//! these requests counted in the metrics.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::server::{Server, add_model, json_infer, request, write_calibration};
use serde_json::{Value, json};
use sluice::serving::limits::ServerLimits;
use sluice::serving::{ApiError, LoadOptions, ServingCore, scan_repository};

fn repo() -> tempfile::TempDir {
    let repo = tempfile::tempdir().unwrap();
    let gated = add_model(repo.path(), "gated", &["--gates", "channel,block,exits", "--seed", "3"], "");
    write_calibration(&gated);
    add_model(repo.path(), "images", &["--image", "--seed", "4"], "");
    repo
}

/// Sets `section.key = value` in a model folder's config.toml.
fn set_config(dir: &std::path::Path, section: &str, key: &str, value: toml::Value) {
    let path = dir.join("config.toml");
    let mut table: toml::Table = std::fs::read_to_string(&path).unwrap().parse().unwrap();
    let section = table.entry(section).or_insert_with(|| toml::Table::new().into());
    section.as_table_mut().unwrap().insert(key.into(), value);
    std::fs::write(&path, toml::to_string(&table).unwrap()).unwrap();
}

fn x() -> Vec<f32> {
    (0..784).map(|i| (i % 13) as f32 / 13.0).collect()
}

/// Sends `head` (and `body`), then reads until the server answers or closes; `None` when
/// the connection closed without an answer. Bounded by a 20 s socket timeout.
fn raw_exchange(addr: SocketAddr, head: &str, body: &[u8]) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                panic!("no answer within 20 s")
            }
            Err(_) => break,
        }
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..i]).to_string();
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if raw.len() >= i + 4 + length {
                let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
                return Some((status, String::from_utf8_lossy(&raw[i + 4..i + 4 + length]).to_string()));
            }
        }
    }
    None
}

fn post_head(addr: SocketAddr, model: &str, content_length: usize, extra: &str) -> String {
    format!(
        "POST /v2/models/{model}/infer HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {content_length}\r\n{extra}\r\n"
    )
}

/// The value of a metric line starting with `prefix` (0 when absent).
fn metric(scrape: &str, prefix: &str) -> f64 {
    scrape
        .lines()
        .find(|l| l.starts_with(prefix))
        .map_or(0.0, |l| l.rsplit(' ').next().unwrap().parse().unwrap())
}

/// A PNG header that claims `w`×`h` grayscale pixels, with a tiny (invalid) body.
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let mut ihdr = Vec::new();
    ihdr.extend(w.to_be_bytes());
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 0, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    // A few bytes of a zlib stream of zeros: never decoded, the header is refused first.
    for (kind, data) in
        [(&b"IHDR"[..], ihdr), (b"IDAT", vec![0x78, 0x9c, 0x63, 0x00, 0x00]), (b"IEND", vec![])]
    {
        png.extend((data.len() as u32).to_be_bytes());
        let chunk: Vec<u8> = kind.iter().copied().chain(data).collect();
        png.extend(&chunk);
        png.extend(crc32(&chunk).to_be_bytes());
    }
    png
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

#[test]
fn oversized_and_lying_requests_are_refused_before_their_cost_is_paid() {
    let repo = repo();
    let s = Server::start(repo.path(), &[]);
    // 60 MB announced: refused from the header, the body is never sent.
    let (status, text) = raw_exchange(s.http, &post_head(s.http, "gated", 60_000_000, ""), b"").unwrap();
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("exceeds the limit of") && text.contains("gated"), "{text}");
    // The binary-extension header claims more JSON than the body holds.
    let (status, text) = raw_exchange(
        s.http,
        &post_head(s.http, "gated", 10, "Inference-Header-Content-Length: 5000\r\n"),
        b"0123456789",
    )
    .unwrap();
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("Inference-Header-Content-Length"), "{text}");
    // Tensor data before its shape, more values than the model could ever take (32 × 784).
    let zeros = vec!["0"; 32 * 784 + 1].join(",");
    let body = format!(
        r#"{{"inputs":[{{"data":[{zeros}],"name":"input","datatype":"FP32","shape":[1,1,28,28]}}]}}"#
    );
    let r = request(s.http, "POST", "/v2/models/gated/infer", &[], body.as_bytes());
    assert_eq!(r.status, 413, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.json()["error"].as_str().unwrap().contains("more than 25088 data elements"));
    // An image bomb: a header that claims 30 000 × 30 000 pixels.
    let r = request(
        s.http,
        "POST",
        "/v2/models/images/infer",
        &[("Inference-Header-Content-Length", "0")],
        &png_claiming(30_000, 30_000),
    );
    assert_eq!(r.status, 413, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.json()["error"].as_str().unwrap().contains("max_pixels"));
    // An unknown model, and a malformed body.
    assert_eq!(request(s.http, "POST", "/v2/models/nope/infer", &[], b"{}").status, 404);
    assert_eq!(request(s.http, "POST", "/v2/models/gated/infer", &[], b"{\"inputs\":").status, 400);
    // Still serving, and every refusal counted.
    assert_eq!(
        request(s.http, "POST", "/v2/models/gated/infer", &[], &json_infer("input", &[1, 1, 28, 28], &x()))
            .status,
        200
    );
    let scrape = s.scrape();
    let count = |model: &str, outcome: &str| {
        metric(
            &scrape,
            &format!("sluice_requests_total{{model=\"{model}\",outcome=\"{outcome}\",protocol=\"http\"}}"),
        )
    };
    assert_eq!(count("gated", "too_large"), 2.0, "{scrape}");
    assert_eq!(count("images", "too_large"), 1.0);
    assert_eq!(count("gated", "client_error"), 2.0);
    assert_eq!(count("_none", "client_error"), 1.0, "the unknown model");
    assert_eq!(count("gated", "success"), 1.0);
    assert_eq!(
        metric(
            &scrape,
            "sluice_request_duration_seconds_count{model=\"gated\",outcome=\"too_large\",protocol=\"http\"}"
        ),
        2.0,
        "failures are in the latency histogram too"
    );
}

#[test]
fn slow_headers_and_bodies_are_cut_off() {
    let repo = repo();
    let s = Server::start(repo.path(), &["--header-read-timeout", "1", "--body-read-timeout", "1"]);
    // Half a request head, never finished: the connection is closed without an answer.
    let started = Instant::now();
    assert!(raw_exchange(s.http, "POST /v2/models/gated/infer HTTP/1.1\r\nHost: x\r\n", b"").is_none());
    assert!(started.elapsed() < Duration::from_secs(15));
    // Complete headers, a body that stops short: 408 once the body timeout passes.
    let (status, text) =
        raw_exchange(s.http, &post_head(s.http, "gated", 1000, ""), b"{\"inputs\":").unwrap();
    assert_eq!(status, 408, "{text}");
    assert!(text.contains("--body-read-timeout"), "{text}");
    assert_eq!(
        metric(&s.scrape(), "sluice_requests_total{model=\"gated\",outcome=\"timeout\",protocol=\"http\"}"),
        1.0
    );
    assert_eq!(request(s.http, "GET", "/v2/health/ready", &[], b"").status, 200);
}

#[test]
fn a_request_past_its_deadline_is_answered_504_and_never_computed() {
    let repo = tempfile::tempdir().unwrap();
    // Batches wait 3 s for company; the model's default deadline is 200 ms.
    let slow = add_model(repo.path(), "slow", &["--seed", "1"], "");
    set_config(&slow, "limits", "default_timeout_ms", 200.into());
    set_config(&slow, "batching", "max_queue_delay_us", 3_000_000.into());
    let s = Server::start(repo.path(), &[]);
    let started = Instant::now();
    let r =
        request(s.http, "POST", "/v2/models/slow/infer", &[], &json_infer("input", &[1, 1, 28, 28], &x()));
    assert_eq!(r.status, 504, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.json()["error"].as_str().unwrap().contains("deadline"));
    assert!(started.elapsed() < Duration::from_secs(3), "answered at the deadline, not after the batch");
    // Triton's `timeout` parameter (µs) sets a shorter one.
    let mut body: Value = serde_json::from_slice(&json_infer("input", &[1, 1, 28, 28], &x())).unwrap();
    body["parameters"] = json!({"timeout": 50_000});
    let r = request(s.http, "POST", "/v2/models/slow/infer", &[], body.to_string().as_bytes());
    assert_eq!(r.status, 504);
    let scrape = s.scrape();
    assert_eq!(
        metric(&scrape, "sluice_requests_total{model=\"slow\",outcome=\"timeout\",protocol=\"http\"}"),
        2.0
    );
    assert_eq!(metric(&scrape, "sluice_inferences_total{model=\"slow\"}"), 0.0, "nothing was computed");
}

#[test]
fn operators_bound_what_a_request_may_ask_of_the_gating() {
    let repo = tempfile::tempdir().unwrap();
    let gated = add_model(repo.path(), "gated", &["--gates", "channel,block,exits", "--seed", "3"], "");
    write_calibration(&gated);
    set_config(&gated, "requests", "min_budget", 0.5.into());
    set_config(&gated, "requests", "max_budget", 0.8.into());
    set_config(&gated, "requests", "allow_thresholds", false.into());
    set_config(&gated, "requests", "allow_channel_mode", false.into());
    let s = Server::start(repo.path(), &[]);
    let ask = |params: Value| {
        let mut body: Value = serde_json::from_slice(&json_infer("input", &[1, 1, 28, 28], &x())).unwrap();
        body["parameters"] = params;
        let r = request(s.http, "POST", "/v2/models/gated/infer", &[], body.to_string().as_bytes());
        let error =
            if r.status == 200 { String::new() } else { r.json()["error"].as_str().unwrap().to_string() };
        (r.status, error)
    };
    assert_eq!(ask(json!({"sluice_budget": 0.5})).0, 200);
    let (status, error) = ask(json!({"sluice_budget": 0.3}));
    assert!(status == 400 && error.contains("below this model's minimum request budget 0.5"), "{error}");
    let (status, error) = ask(json!({"sluice_budget": 1.0}));
    assert!(status == 400 && error.contains("above this model's maximum request budget 0.8"), "{error}");
    let (status, error) = ask(json!({"sluice_block_threshold": 0.2}));
    assert!(status == 400 && error.contains("allow_thresholds"), "{error}");
    let (status, error) = ask(json!({"sluice_channel_mode": "select"}));
    assert!(status == 400 && error.contains("allow_channel_mode"), "{error}");
}

#[test]
fn a_policy_that_cannot_be_persisted_is_a_500_and_the_live_policy_stays() {
    let repo = repo();
    // The temporary file the store writes first is a folder: the write fails, even as root.
    std::fs::create_dir(repo.path().join("gated/policy.json.tmp")).unwrap();
    let s = Server::start(repo.path(), &[]);
    let admin = s.admin.unwrap();
    let body = json!({"block_threshold": 0.6}).to_string();
    let r = request(
        admin,
        "PATCH",
        "/v2/models/gated/gating",
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    );
    assert_eq!(r.status, 500, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"], "internal error", "details are logged, not leaked");
    let state = request(admin, "GET", "/v2/models/gated/gating", &[], b"").json();
    assert_eq!(state["policy"]["version"], 1);
    assert_eq!(state["policy"]["block_threshold"], 0.0);
    assert!(s.log().contains("cannot persist the policy"), "{}", s.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_core_is_not_ready_until_its_models_load() {
    let repo = repo();
    let dirs = scan_repository(repo.path(), None).unwrap();
    let core = Arc::new(ServingCore::new(&dirs, ServerLimits::default()));
    assert!(!core.is_ready());
    assert!(
        matches!(core.model("gated", None), Err(ApiError::Unavailable(m)) if m.contains("still loading"))
    );
    assert!(matches!(core.admit("gated", None, Some(10)), Err(ApiError::Unavailable(_))));
    core.load_models(dirs, &LoadOptions::default()).await.unwrap();
    assert!(core.is_ready());
    assert!(matches!(core.model("nope", None), Err(ApiError::NotFound(_))));
    let admission = core.admit("gated", None, Some(10)).unwrap();
    assert_eq!(core.inflight(), 1);
    drop(admission);
    assert_eq!(core.inflight(), 0);
    core.begin_shutdown();
    assert!(!core.is_ready());
}

/// Reads one HTTP/1.1 response (head and a `Content-Length` body) from a kept-alive stream.
fn read_response(s: &mut TcpStream) -> (u16, Vec<(String, String)>, String) {
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "the connection closed before an answer");
        raw.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&raw).to_string();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':').map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string())))
        .collect();
    let length: usize =
        headers.iter().find(|(k, _)| k == "content-length").map_or(0, |(_, v)| v.parse().unwrap());
    let mut body = vec![0u8; length];
    s.read_exact(&mut body).unwrap();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

#[test]
fn refused_requests_keep_their_connection_usable_or_say_it_closes() {
    let repo = repo();
    let s = Server::start(repo.path(), &[]);
    let mut conn = TcpStream::connect(s.http).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let valid = json_infer("input", &[1, 1, 28, 28], &x());
    let send = |conn: &mut TcpStream, model: &str, body: &[u8]| {
        let head = format!(
            "POST /v2/models/{model}/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        conn.write_all(head.as_bytes()).unwrap();
        conn.write_all(body).unwrap();
    };
    // Refused before its (small) body was read: the body is drained, the connection lives on.
    send(&mut conn, "nope", &valid);
    assert_eq!(read_response(&mut conn).0, 404);
    send(&mut conn, "gated", &valid);
    assert_eq!(read_response(&mut conn).0, 200, "the same connection serves the next request");
    // Refused from a large declared length: not read, and the answer says the connection ends.
    let head = "POST /v2/models/gated/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\n\r\n";
    conn.write_all(head.as_bytes()).unwrap();
    let (status, headers, _) = read_response(&mut conn);
    assert_eq!(status, 413);
    assert!(headers.iter().any(|(k, v)| k == "connection" && v == "close"), "{headers:?}");
}

#[test]
fn a_slow_body_holds_no_queue_place() {
    let repo = tempfile::tempdir().unwrap();
    let tight = add_model(repo.path(), "tight", &["--seed", "1"], "");
    set_config(&tight, "batching", "queue_capacity", 1.into());
    let s = Server::start(repo.path(), &[]);
    // Two clients that sent their headers and a first byte of a body, and stopped.
    let slow: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut c = TcpStream::connect(s.http).unwrap();
            c.write_all(post_head(s.http, "tight", 5000, "").as_bytes()).unwrap();
            c.write_all(b"{").unwrap();
            c
        })
        .collect();
    // The queue has one place, and it is free for a client whose body is complete.
    let r =
        request(s.http, "POST", "/v2/models/tight/infer", &[], &json_infer("input", &[1, 1, 28, 28], &x()));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    drop(slow);
}

#[test]
fn connections_past_the_limit_are_closed_and_a_model_may_lower_its_body_limit() {
    let repo = repo();
    set_config(&repo.path().join("gated"), "limits", "max_body_bytes", 1000.into());
    let s = Server::start(repo.path(), &["--max-connections", "2"]);
    // Two idle connections hold the HTTP listener's two slots; a third is closed unanswered.
    let held: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(s.http).unwrap()).collect();
    // A request on a held connection proves both were accepted before the third arrives.
    let mut first = held[0].try_clone().unwrap();
    first.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    first.write_all(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut first).0, 200);
    let mut second = held[1].try_clone().unwrap();
    second.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    second.write_all(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut second).0, 200);
    assert!(raw_exchange(s.http, "GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n", b"").is_none());
    assert_eq!(metric(&s.scrape(), "sluice_connections_refused_total{listener=\"http\"}"), 1.0);
    // [limits] max_body_bytes = 1000 for `gated`: a 100 000-byte body is refused unread.
    let (status, text) = raw_exchange_on(&mut first, &post_head(s.http, "gated", 100_000, ""));
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("limit of 1000 bytes"), "{text}");
}

/// Sends `head` on an open connection and reads the answer.
fn raw_exchange_on(conn: &mut TcpStream, head: &str) -> (u16, String) {
    conn.write_all(head.as_bytes()).unwrap();
    let (status, _, body) = read_response(conn);
    (status, body)
}
