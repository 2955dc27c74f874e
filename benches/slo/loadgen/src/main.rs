//! `loadgen`: the load generator of `make bench-slo` (benches/slo/run.sh).
//!
//! Sends KServe OIP v2 HTTP/JSON inference requests (`POST {url}/v2/models/{model}/infer`, one
//! pre-serialised body shared by every request, pooled keep-alive connections) in one of two
//! modes:
//!
//! - **open loop** (`--phases RATE:SECONDS,...`): Poisson arrivals from a seeded RNG, phase
//!   after phase. Every request is sent at its scheduled time whatever is still outstanding,
//!   up to `--max-inflight` requests in flight; a request that would exceed that cap is not
//!   sent and is recorded as `dropped_by_client` (never silently lost). The schedule depends on
//!   the seed and the phases only, so every server under test gets the same one. Latency is
//!   measured from the moment the request is handed to the HTTP client (`--latency-from sent`,
//!   the default: on a machine shared with the server the generator's own scheduling delays
//!   are not the server's) or from its scheduled time (`--latency-from scheduled`, the
//!   coordinated-omission-free view); the CSV gives both: `lag_ms` is how late the generator
//!   sent each request.
//! - **closed loop** (`--concurrency N --seconds S [--warmup W]`): N clients, each sending its
//!   next request when the previous one is answered; for saturation throughput (large N) and
//!   the batch-1 latency (N = 1). Latency is measured from the actual send time.
//!
//! Outcomes: `ok` (HTTP 200), `rejected` (429), `error` (any other status, or a connection
//! error: status 0), `timeout` (no complete answer within `--timeout-ms`, default 2000), and
//! `dropped_by_client` (open loop, over the in-flight cap).
//!
//! Outputs: `--out FILE`, one CSV row per request (`t_s` = scheduled send time in seconds
//! since the start, `latency_ms`, `outcome`, `status`, `lag_ms`), in schedule order; with
//! `--admin URL`, a poller reads `GET {admin}/v2/models/{model}/gating` every `--poll-ms`
//! (default 100) and `--budget-out FILE` gets one CSV row per answer (`t_s`, `policy.budget`,
//! `policy.version`, `policy.source`, `controller.state`, `controller.measured_ms`; a field the
//! server does not send is left empty; `t_s` is when the answer arrived). A JSON summary
//! (counts, achieved rate, latency percentiles, per phase in open loop) goes to stdout.
//!
//! Deterministic RNG: SplitMix64 (fixed algorithm, so a seed gives the same schedule in every
//! build); inter-arrival times are exponential with the phase's rate, and a phase boundary
//! restarts the (memoryless) process at the boundary with the new rate.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Empty, Full};
use hyper::Request;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};

/// Command line (see the module documentation).
#[derive(Parser, Debug)]
#[command(name = "loadgen", about = "Open-loop (Poisson) / closed-loop OIP v2 HTTP load generator")]
struct Args {
    /// Base URL of the server's HTTP (inference) endpoint.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    url: String,
    /// Model to infer with.
    #[arg(long, default_value = "fashion-resnet20")]
    model: String,
    /// File with the JSON body of every request (e.g. deploy/examples/request.json); read once.
    /// Default: one [1,1,28,28] FP32 tensor of zeros named `input`.
    #[arg(long)]
    body: Option<PathBuf>,
    /// Open loop: Poisson phases as RATE:SECONDS (requests/s : s), comma-separated, e.g.
    /// `600:60,2400:60,600:60`.
    #[arg(long, conflicts_with_all = ["concurrency", "warmup"], required_unless_present = "concurrency")]
    phases: Option<String>,
    /// Closed loop: this many clients, each with one request outstanding.
    #[arg(long, requires = "seconds")]
    concurrency: Option<usize>,
    /// Closed loop: seconds measured (after the warm-up).
    #[arg(long)]
    seconds: Option<f64>,
    /// Closed loop: seconds of load before the measurement (not recorded).
    #[arg(long)]
    warmup: Option<f64>,
    /// Seed of the arrival schedule (open loop).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Client timeout per request, in milliseconds (counted as `timeout`).
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
    /// Open loop: at most this many requests in flight; a request over it is recorded as
    /// `dropped_by_client` and not sent. Keep it below the server's --max-connections and
    /// the open-file limit (`ulimit -n`): each in-flight request holds one connection.
    #[arg(long, default_value_t = 4096)]
    max_inflight: usize,
    /// Per-request CSV output (t_s,latency_ms,outcome,status,lag_ms).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Base URL of the admin API (e.g. http://127.0.0.1:8003): poll the model's gating state.
    #[arg(long)]
    admin: Option<String>,
    /// CSV of the polled gating state
    /// (t_s,budget,version,source,controller_state,controller_measured_ms).
    #[arg(long, requires = "admin")]
    budget_out: Option<PathBuf>,
    /// Polling period of the gating state, in milliseconds.
    #[arg(long, default_value_t = 100)]
    poll_ms: u64,
    /// Open loop: measure latency from the actual send (`sent`) or from the scheduled send time
    /// (`scheduled`, which adds the generator's lag).
    #[arg(long, value_enum, default_value_t = LatencyFrom::Sent)]
    latency_from: LatencyFrom,
    /// The body uses the binary tensor data extension: its first N bytes are the JSON
    /// header (sent as `Inference-Header-Content-Length: N`), the tensor bytes follow.
    #[arg(long)]
    binary_header_length: Option<usize>,
    /// Runtime worker threads (1: a single-threaded runtime, the cheapest on a small machine).
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LatencyFrom {
    Sent,
    Scheduled,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Ok,
    Rejected,
    Timeout,
    Error,
    DroppedByClient,
}

impl Outcome {
    fn name(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Rejected => "rejected",
            Outcome::Timeout => "timeout",
            Outcome::Error => "error",
            Outcome::DroppedByClient => "dropped_by_client",
        }
    }
}

/// One request's fate.
#[derive(Clone, Copy, Debug)]
struct Record {
    /// Index in the schedule (open loop) or in completion order (closed loop).
    id: usize,
    /// Scheduled (open loop) or actual (closed loop) send time, s since the start.
    t: f64,
    /// From `t` to the complete answer (or the timeout); NaN when not sent.
    latency_ms: f64,
    /// How late the request was actually sent, ms (NaN when not sent).
    lag_ms: f64,
    outcome: Outcome,
    /// HTTP status, 0 when there was none.
    status: u16,
}

/// One answer of the gating poller.
struct Poll {
    t: f64,
    budget: Option<f64>,
    version: Option<u64>,
    source: Option<String>,
    /// `controller.state` and `controller.measured_ms`, when the server reports a controller.
    controller_state: Option<String>,
    controller_measured_ms: Option<f64>,
}

/// SplitMix64: a fixed, tiny generator, so a seed means the same schedule in every build.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn next_open01(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }
}

/// A phase of the open-loop schedule.
#[derive(Clone, Copy, Debug)]
struct Phase {
    rate: f64,
    seconds: f64,
}

fn parse_phases(text: &str) -> Result<Vec<Phase>> {
    let mut phases = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((rate, seconds)) = part.split_once(':') else {
            bail!("phase {part:?}: expected RATE:SECONDS");
        };
        let rate: f64 = rate.trim().parse().with_context(|| format!("phase {part:?}: rate"))?;
        let seconds: f64 = seconds.trim().parse().with_context(|| format!("phase {part:?}: seconds"))?;
        if !(rate >= 0.0 && rate.is_finite() && seconds > 0.0 && seconds.is_finite()) {
            bail!("phase {part:?}: the rate must be >= 0 and the seconds > 0");
        }
        phases.push(Phase { rate, seconds });
    }
    if phases.is_empty() {
        bail!("--phases: no phase given");
    }
    Ok(phases)
}

/// The scheduled send times (s since the start) of a Poisson process whose rate steps from
/// phase to phase.
fn poisson_schedule(phases: &[Phase], seed: u64) -> Vec<f64> {
    let mut rng = SplitMix64(seed);
    let mut times = Vec::new();
    let mut start = 0.0;
    for p in phases {
        let end = start + p.seconds;
        if p.rate > 0.0 {
            let mut t = start;
            loop {
                t += -rng.next_open01().ln() / p.rate;
                if t >= end {
                    break;
                }
                times.push(t);
            }
        }
        start = end;
    }
    times
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn http_client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    // Idle pooled connections are dropped before the server's own keep-alive timeout (10 s by
    // default), so a request never lands on a connection the server is closing.
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(usize::MAX)
        .build(connector)
}

/// Everything a request needs, shared by all of them.
struct Target {
    client: HttpClient,
    uri: hyper::Uri,
    body: Bytes,
    /// `Inference-Header-Content-Length` of a binary body.
    header_length: Option<HeaderValue>,
    timeout: Duration,
}

impl Target {
    /// Sends one request and reads the whole answer (so the connection goes back to the pool).
    async fn infer(&self) -> (Outcome, u16) {
        let mut request = Request::post(self.uri.clone())
            .body(Full::new(self.body.clone()))
            .expect("a POST with a valid URI is a valid request");
        let headers = request.headers_mut();
        match &self.header_length {
            Some(n) => {
                headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
                headers.insert("inference-header-content-length", n.clone());
            }
            None => {
                headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            }
        }
        let exchange = async {
            let response = self.client.request(request).await.map_err(|_| ())?;
            let status = response.status().as_u16();
            response.into_body().collect().await.map_err(|_| ())?;
            Ok::<u16, ()>(status)
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Err(_) => (Outcome::Timeout, 0),
            Ok(Err(())) => (Outcome::Error, 0),
            Ok(Ok(200)) => (Outcome::Ok, 200),
            Ok(Ok(429)) => (Outcome::Rejected, 429),
            Ok(Ok(status)) => (Outcome::Error, status),
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Open loop: every request at its scheduled time, at most `cap` in flight.
async fn open_loop(
    target: Arc<Target>,
    schedule: &[f64],
    cap: usize,
    start: Instant,
    from: LatencyFrom,
) -> (Vec<Record>, usize) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Record>();
    let inflight = Arc::new(AtomicUsize::new(0));
    let mut peak = 0usize;
    let mut without_yield = 0u32;
    for (id, &t) in schedule.iter().enumerate() {
        let at = start + Duration::from_secs_f64(t);
        if at > Instant::now() {
            tokio::time::sleep_until(at).await;
            without_yield = 0;
        } else {
            // Behind schedule: send at once, but let the answers in now and then.
            without_yield += 1;
            if without_yield >= 32 {
                tokio::task::yield_now().await;
                without_yield = 0;
            }
        }
        let now = inflight.load(Ordering::Relaxed);
        if now >= cap {
            let outcome = Outcome::DroppedByClient;
            let _ = tx.send(Record { id, t, latency_ms: f64::NAN, lag_ms: f64::NAN, outcome, status: 0 });
            continue;
        }
        inflight.fetch_add(1, Ordering::Relaxed);
        peak = peak.max(now + 1);
        let (target, tx, inflight) = (target.clone(), tx.clone(), inflight.clone());
        tokio::spawn(async move {
            let sent = Instant::now();
            let lag_ms = ms(sent.saturating_duration_since(at));
            let (outcome, status) = target.infer().await;
            let origin = if from == LatencyFrom::Sent { sent } else { at };
            let latency_ms = ms(Instant::now().saturating_duration_since(origin));
            inflight.fetch_sub(1, Ordering::Relaxed);
            let _ = tx.send(Record { id, t, latency_ms, lag_ms, outcome, status });
        });
    }
    drop(tx);
    let mut records = Vec::with_capacity(schedule.len());
    while let Some(r) = rx.recv().await {
        records.push(r);
    }
    records.sort_by_key(|r| r.id);
    (records, peak)
}

/// Closed loop: `clients` clients for `warmup + seconds`; only the measured part is recorded,
/// with times relative to the measurement's start.
async fn closed_loop(target: Arc<Target>, clients: usize, warmup: f64, seconds: f64) -> Vec<Record> {
    let start = Instant::now();
    let measure = start + Duration::from_secs_f64(warmup);
    let end = measure + Duration::from_secs_f64(seconds);
    let (tx, mut rx) = mpsc::unbounded_channel::<Record>();
    for _ in 0..clients {
        let (target, tx) = (target.clone(), tx.clone());
        tokio::spawn(async move {
            loop {
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let (outcome, status) = target.infer().await;
                let latency_ms = ms(sent.elapsed());
                if sent >= measure {
                    let t = (sent - measure).as_secs_f64();
                    let _ = tx.send(Record { id: 0, t, latency_ms, lag_ms: 0.0, outcome, status });
                }
            }
        });
    }
    drop(tx);
    let mut records = Vec::new();
    while let Some(r) = rx.recv().await {
        records.push(r);
    }
    records.sort_by(|a, b| a.t.total_cmp(&b.t));
    for (i, r) in records.iter_mut().enumerate() {
        r.id = i;
    }
    records
}

/// Polls the gating state until `stop`; times are relative to `start`.
async fn poll_gating(
    uri: hyper::Uri,
    period: Duration,
    start: Instant,
    stop: Arc<AtomicBool>,
) -> (Vec<Poll>, usize) {
    let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(5))
        .build(HttpConnector::new());
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let (mut polls, mut failures) = (Vec::new(), 0usize);
    while !stop.load(Ordering::Relaxed) {
        ticks.tick().await;
        let request = Request::get(uri.clone()).body(Empty::new()).expect("a GET with a valid URI is valid");
        let exchange = async {
            let response = client.request(request).await.map_err(|_| ())?;
            if response.status() != 200 {
                return Err(());
            }
            let body = response.into_body().collect().await.map_err(|_| ())?.to_bytes();
            serde_json::from_slice::<Value>(&body).map_err(|_| ())
        };
        match tokio::time::timeout(Duration::from_secs(1), exchange).await {
            Ok(Ok(state)) => {
                let (policy, controller) = (&state["policy"], &state["controller"]);
                polls.push(Poll {
                    t: start.elapsed().as_secs_f64(),
                    budget: policy["budget"].as_f64(),
                    version: policy["version"].as_u64(),
                    source: policy["source"].as_str().map(str::to_owned),
                    controller_state: controller["state"].as_str().map(str::to_owned),
                    controller_measured_ms: controller["measured_ms"].as_f64(),
                });
            }
            _ => failures += 1,
        }
    }
    (polls, failures)
}

/// Nearest-rank percentile of sorted values (NaN when empty).
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// JSON number, or null for NaN (JSON has no NaN).
fn num(x: f64) -> Value {
    if x.is_finite() { json!((x * 1000.0).round() / 1000.0) } else { Value::Null }
}

/// Counts and latency percentiles of some records over `seconds`.
fn summarize(records: &[&Record], seconds: f64) -> Value {
    let count = |o: Outcome| records.iter().filter(|r| r.outcome == o).count();
    let mut ok: Vec<f64> =
        records.iter().filter(|r| r.outcome == Outcome::Ok).map(|r| r.latency_ms).collect();
    ok.sort_by(f64::total_cmp);
    let mut lag: Vec<f64> = records.iter().map(|r| r.lag_ms).filter(|x| x.is_finite()).collect();
    lag.sort_by(f64::total_cmp);
    let mean = if ok.is_empty() { f64::NAN } else { ok.iter().sum::<f64>() / ok.len() as f64 };
    json!({
        "seconds": seconds,
        "requests": records.len(),
        "ok": ok.len(),
        "rejected": count(Outcome::Rejected),
        "timeout": count(Outcome::Timeout),
        "error": count(Outcome::Error),
        "dropped_by_client": count(Outcome::DroppedByClient),
        "offered_per_s": num(records.len() as f64 / seconds),
        "ok_per_s": num(ok.len() as f64 / seconds),
        "latency_ms": {
            "p50": num(percentile(&ok, 50.0)),
            "p95": num(percentile(&ok, 95.0)),
            "p99": num(percentile(&ok, 99.0)),
            "mean": num(mean),
            "max": num(ok.last().copied().unwrap_or(f64::NAN)),
        },
        "send_lag_ms": {"p50": num(percentile(&lag, 50.0)), "p99": num(percentile(&lag, 99.0)),
                        "max": num(lag.last().copied().unwrap_or(f64::NAN))},
    })
}

fn create(path: &Path) -> Result<BufWriter<File>> {
    Ok(BufWriter::new(File::create(path).with_context(|| format!("creating {}", path.display()))?))
}

fn write_records(path: &Path, records: &[Record]) -> Result<()> {
    let mut w = create(path)?;
    writeln!(w, "t_s,latency_ms,outcome,status,lag_ms")?;
    for r in records {
        let opt = |x: f64| if x.is_finite() { format!("{x:.3}") } else { String::new() };
        let (latency, lag) = (opt(r.latency_ms), opt(r.lag_ms));
        writeln!(w, "{:.6},{latency},{},{},{lag}", r.t, r.outcome.name(), r.status)?;
    }
    w.flush()?;
    Ok(())
}

/// A text field for CSV: empty when absent, quoted when it needs to be.
fn csv_text(text: Option<&str>) -> String {
    let text = text.unwrap_or("");
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

fn write_polls(path: &Path, polls: &[Poll]) -> Result<()> {
    let mut w = create(path)?;
    writeln!(w, "t_s,budget,version,source,controller_state,controller_measured_ms")?;
    for p in polls {
        let budget = p.budget.map(|b| b.to_string()).unwrap_or_default();
        let version = p.version.map(|v| v.to_string()).unwrap_or_default();
        let (source, state) = (csv_text(p.source.as_deref()), csv_text(p.controller_state.as_deref()));
        let measured = p.controller_measured_ms.map(|m| format!("{m:.3}")).unwrap_or_default();
        writeln!(w, "{:.3},{budget},{version},{source},{state},{measured}", p.t)?;
    }
    w.flush()?;
    Ok(())
}

fn parse_uri(text: &str) -> Result<hyper::Uri> {
    let uri: hyper::Uri = text.parse().with_context(|| format!("URL {text:?}"))?;
    if uri.scheme_str() != Some("http") {
        bail!("URL {text:?}: only http:// is supported");
    }
    Ok(uri)
}

fn default_body() -> Bytes {
    let zeros = vec![0.0f32; 28 * 28];
    let body =
        json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": zeros}]});
    Bytes::from(serde_json::to_vec(&body).expect("a JSON value serialises"))
}

async fn run(args: Args) -> Result<()> {
    let base = args.url.trim_end_matches('/');
    let uri = parse_uri(&format!("{base}/v2/models/{}/infer", args.model))?;
    let body = match &args.body {
        Some(path) => {
            let bytes = std::fs::read(path).with_context(|| format!("--body {}", path.display()))?;
            let header = &bytes[..args.binary_header_length.unwrap_or(bytes.len()).min(bytes.len())];
            serde_json::from_slice::<Value>(header)
                .with_context(|| format!("--body {}: no JSON header", path.display()))?;
            Bytes::from(bytes)
        }
        None => default_body(),
    };
    let timeout = Duration::from_millis(args.timeout_ms);
    let header_length = args.binary_header_length.map(HeaderValue::from);
    let target = Arc::new(Target { client: http_client(), uri, body, header_length, timeout });

    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let poller = match &args.admin {
        Some(admin) => {
            let admin = admin.trim_end_matches('/');
            let uri = parse_uri(&format!("{admin}/v2/models/{}/gating", args.model))?;
            let period = Duration::from_millis(args.poll_ms.max(1));
            Some(tokio::spawn(poll_gating(uri, period, start, stop.clone())))
        }
        None => None,
    };

    let mut summary = if let Some(text) = &args.phases {
        let phases = parse_phases(text)?;
        if args.max_inflight == 0 {
            bail!("--max-inflight must be at least 1");
        }
        let schedule = poisson_schedule(&phases, args.seed);
        let (records, peak) = open_loop(target, &schedule, args.max_inflight, start, args.latency_from).await;
        let total: f64 = phases.iter().map(|p| p.seconds).sum();
        let mut s = summarize(&records.iter().collect::<Vec<_>>(), total);
        let mut phase_start = 0.0;
        let mut per_phase = Vec::new();
        for p in &phases {
            let end = phase_start + p.seconds;
            let part: Vec<&Record> = records.iter().filter(|r| r.t >= phase_start && r.t < end).collect();
            let mut one = summarize(&part, p.seconds);
            one["rate"] = json!(p.rate);
            one["start_s"] = json!(phase_start);
            per_phase.push(one);
            phase_start = end;
        }
        s["mode"] = json!("open");
        s["seed"] = json!(args.seed);
        s["max_inflight"] = json!(args.max_inflight);
        s["peak_inflight"] = json!(peak);
        s["latency_from"] = json!(if args.latency_from == LatencyFrom::Sent { "sent" } else { "scheduled" });
        s["phases"] = Value::Array(per_phase);
        if let Some(out) = &args.out {
            write_records(out, &records)?;
        }
        s
    } else {
        let (Some(clients), Some(seconds)) = (args.concurrency, args.seconds) else {
            bail!("give --phases, or --concurrency with --seconds");
        };
        if clients == 0 || seconds.is_nan() || seconds <= 0.0 {
            bail!("--concurrency must be at least 1 and --seconds positive");
        }
        let warmup = args.warmup.unwrap_or(0.0).max(0.0);
        let records = closed_loop(target, clients, warmup, seconds).await;
        let mut s = summarize(&records.iter().collect::<Vec<_>>(), seconds);
        s["mode"] = json!("closed");
        s["concurrency"] = json!(clients);
        s["warmup_s"] = json!(warmup);
        if let Some(out) = &args.out {
            write_records(out, &records)?;
        }
        s
    };

    if let Some(poller) = poller {
        stop.store(true, Ordering::Relaxed);
        let (polls, failures) = poller.await.context("the gating poller")?;
        summary["polls"] = json!(polls.len());
        summary["poll_failures"] = json!(failures);
        if let Some(path) = &args.budget_out {
            write_polls(path, &polls)?;
        }
    }
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

fn main() {
    let args = Args::parse();
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(args.threads).enable_all().build()
    };
    let result = runtime.map_err(anyhow::Error::from).and_then(|rt| rt.block_on(run(args)));
    if let Err(e) = result {
        eprintln!("loadgen: {e:#}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_is_seeded_and_poisson() {
        let phases = parse_phases("1000:10,0:1,200:5").unwrap();
        let a = poisson_schedule(&phases, 7);
        assert_eq!(a, poisson_schedule(&phases, 7));
        assert_ne!(a, poisson_schedule(&phases, 8));
        assert!(a.windows(2).all(|w| w[0] <= w[1]));
        let first = a.iter().filter(|&&t| t < 10.0).count() as f64;
        let idle = a.iter().filter(|&&t| (10.0..11.0).contains(&t)).count();
        let last = a.iter().filter(|&&t| t >= 11.0).count() as f64;
        assert!((first - 10_000.0).abs() < 400.0, "{first}");
        assert_eq!(idle, 0);
        assert!((last - 1000.0).abs() < 130.0, "{last}");
        assert!(a.iter().all(|&t| t < 16.0));
    }

    #[test]
    fn phases_parse_and_reject_nonsense() {
        let p = parse_phases("600:60, 2400:60").unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!((p[1].rate, p[1].seconds), (2400.0, 60.0));
        for bad in ["", "600", "x:1", "1:0", "-1:5", "1:inf"] {
            assert!(parse_phases(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn csv_text_quotes_only_when_needed() {
        assert_eq!(csv_text(None), "");
        assert_eq!(csv_text(Some("controller")), "controller");
        assert_eq!(csv_text(Some("a,\"b\"")), "\"a,\"\"b\"\"\"");
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
        assert!(percentile(&[], 50.0).is_nan());
    }
}
