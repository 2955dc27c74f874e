//! Booting the real `sluice serve` binary on fixture model repositories, and a minimal
//! HTTP/1.1 client over std sockets (no extra dependencies, no fixed ports).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use sluice::control::calibration::{BudgetEntry, CalibrationTable, OperatingPoint};
use sluice::engine::ChannelMode;

/// Runs the `sluice` binary with `args` and checks it succeeded.
pub fn sluice(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice")).args(args).output().expect("sluice runs");
    assert!(out.status.success(), "sluice {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Creates `repo/<name>` with random weights (`sluice model init`) and extra config lines.
pub fn add_model(repo: &Path, name: &str, init_args: &[&str], extra_config: &str) -> PathBuf {
    let dir = repo.join(name);
    let mut args = vec!["model", "init", dir.to_str().unwrap(), "--name", name];
    args.extend_from_slice(init_args);
    sluice(&args);
    if !extra_config.is_empty() {
        let path = dir.join("config.toml");
        let config = std::fs::read_to_string(&path).unwrap();
        // Top-level keys must precede the first table.
        let (head, tables) = config.split_at(config.find("\n[").map_or(config.len(), |i| i + 1));
        std::fs::write(&path, format!("{head}{extra_config}\n{tables}")).unwrap();
    }
    dir
}

/// A plausible calibration table (budget → thresholds) for a gated fixture model.
pub fn write_calibration(dir: &Path) {
    let point = |c: f32, b: f32, f: f64| OperatingPoint {
        channel_threshold: c,
        block_threshold: b,
        exit_threshold: 1.0,
        validation_accuracy: 0.5,
        flop_fraction: f,
        flop_fraction_stderr: 0.0,
    };
    let budgets = vec![
        BudgetEntry { budget: 0.3, point: point(1.0, 1.0, 0.3), latency_ratio: None },
        BudgetEntry { budget: 0.5, point: point(0.9, 0.95, 0.5), latency_ratio: Some(0.62) },
        BudgetEntry { budget: 1.0, point: point(0.0, 0.0, 1.0), latency_ratio: None },
    ];
    let table = CalibrationTable {
        model: "fixture".into(),
        split: "validation".into(),
        images: 0,
        channel_mode: ChannelMode::Slice,
        flops_confidence: 0.0,
        frontier: budgets.iter().map(|b| b.point.clone()).collect(),
        budgets,
    };
    table.save(&dir.join("calibration.json")).unwrap();
}

/// A running server; killed (SIGTERM, then waited for) on drop.
pub struct Server {
    pub child: Child,
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub metrics: SocketAddr,
    /// The loopback admin listener (absent when an admin token is configured).
    pub admin: Option<SocketAddr>,
    pub stderr_path: PathBuf,
}

impl Server {
    /// Starts `sluice serve` on `repo` with ports chosen by the OS; returns once it printed
    /// its ready line (models loaded, listeners bound).
    pub fn start(repo: &Path, extra: &[&str]) -> Server {
        Server::start_with(repo, extra, Command::new(env!("CARGO_BIN_EXE_sluice")))
    }

    /// Like [`Server::start`], with a prepared command (environment variables, say).
    pub fn start_with(repo: &Path, extra: &[&str], mut command: Command) -> Server {
        let stderr_path = repo.join("server.log");
        let mut child = command
            .args(["serve", "--model-repository", repo.to_str().unwrap(), "--address", "127.0.0.1"])
            .args(["--http-port", "0", "--grpc-port", "0", "--metrics-port", "0", "--admin-port", "0"])
            .args(["--engine-threads", "1"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .expect("sluice serve starts");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let ready = loop {
            match lines.next() {
                Some(Ok(line)) if line.starts_with("sluice ready:") => break line,
                Some(Ok(_)) => continue,
                _ => {
                    let log = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                    panic!("sluice serve exited before it was ready:\n{log}");
                }
            }
        };
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let addr = |key: &str| -> SocketAddr {
            let part = ready.split_whitespace().find(|p| p.starts_with(key)).unwrap();
            part[key.len()..].parse().unwrap()
        };
        let admin =
            ready.split_whitespace().find_map(|p| p.strip_prefix("admin=")).and_then(|a| a.parse().ok());
        Server {
            child,
            http: addr("http="),
            grpc: addr("grpc="),
            metrics: addr("metrics="),
            admin,
            stderr_path,
        }
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let _ =
            Command::new("kill").args(["-TERM", &self.child.id().to_string()]).stderr(Stdio::null()).status();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// `GET /metrics` as text.
    pub fn scrape(&self) -> String {
        String::from_utf8(request(self.metrics, "GET", "/metrics", &[], b"").body).unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.terminate();
        }
        let _ = self.child.wait();
    }
}

/// A parsed HTTP response.
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// The JSON part of a binary-extension response and the binary part.
    pub fn split_binary(&self) -> (serde_json::Value, &[u8]) {
        let n: usize =
            self.header("inference-header-content-length").expect("binary response").parse().unwrap();
        (serde_json::from_slice(&self.body[..n]).unwrap(), &self.body[n..])
    }
}

/// One HTTP/1.1 request (connection closed after it).
pub fn request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    let mut s = TcpStream::connect(addr).expect("connect");
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head += &format!("{k}: {v}\r\n");
    }
    head += "\r\n";
    s.write_all(head.as_bytes()).unwrap();
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    parse_reply(&raw)
}

fn parse_reply(raw: &[u8]) -> Reply {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("response head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':').map(|(k, v)| (k.trim().to_string(), v.trim().to_string())))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked")) {
        body = dechunk(&body);
    }
    Reply { status, headers, body }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = data.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&data[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.extend_from_slice(&data[eol + 2..eol + 2 + size]);
        data = &data[eol + 2 + size + 2..];
    }
    out
}

/// A JSON inference body for an FP32 tensor.
pub fn json_infer(input: &str, shape: &[i64], data: &[f32]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "inputs": [{ "name": input, "datatype": "FP32", "shape": shape, "data": data }]
    }))
    .unwrap()
}
