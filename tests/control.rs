//! The control plane, booted for real: live policy changes over HTTP and gRPC, validation
//! naming the field, versions in every response, persistence across restarts, watch
//! streams, admin security, and a change under steady load from 8 clients.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use common::server::{Server, add_model, json_infer, request, write_calibration};
use serde_json::{Value, json};
use sluice::protocol::grpc::admin_pb;
use sluice::protocol::grpc::admin_pb::gating_admin_client::GatingAdminClient;

fn repo() -> tempfile::TempDir {
    let repo = tempfile::tempdir().unwrap();
    let dir = add_model(repo.path(), "gated", &["--gates", "channel,block,exits", "--seed", "3"], "");
    write_calibration(&dir);
    repo
}

fn gating(addr: std::net::SocketAddr, method: &str, body: Value, token: Option<&str>) -> (u16, Value) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    let r = request(addr, method, "/v2/models/gated/gating", &headers, body.to_string().as_bytes());
    let v = if r.body.is_empty() { Value::Null } else { r.json() };
    (r.status, v)
}

fn infer_version(s: &Server) -> (u16, i64) {
    let x: Vec<f32> = (0..784).map(|i| (i % 17) as f32 / 8.0 - 1.0).collect();
    let r = request(s.http, "POST", "/v2/models/gated/infer", &[], &json_infer("input", &[1, 1, 28, 28], &x));
    let version =
        if r.status == 200 { r.json()["parameters"]["sluice_policy_version"].as_i64().unwrap() } else { -1 };
    (r.status, version)
}

#[test]
fn policies_change_live_with_validation_and_versions() {
    let repo = repo();
    let s = Server::start(repo.path(), &[]);
    let admin = s.admin.expect("no token: loopback admin listener");
    let (status, state) = gating(admin, "GET", Value::Null, None);
    assert_eq!(status, 200);
    assert_eq!(state["policy"]["version"], 1);
    assert_eq!(state["calibration"].as_array().unwrap().len(), 3);
    // The measured latency where calibration timed the point, absent where it did not.
    assert_eq!(state["calibration"][1]["latency_ratio"].as_f64(), Some(0.62));
    assert!(state["calibration"][0].get("latency_ratio").is_none(), "{state}");
    assert!(state["gates"].as_array().unwrap().contains(&json!("layer2.1.block")));
    assert_eq!(infer_version(&s), (200, 1));

    let (status, state) = gating(admin, "PATCH", json!({"budget": 0.5, "actor": "test"}), None);
    assert_eq!(status, 200, "{state}");
    assert_eq!(
        (state["policy"]["version"].as_i64(), state["policy"]["budget"].as_f64()),
        (Some(2), Some(0.5))
    );
    assert_eq!(state["policy"]["block_threshold"].as_f64(), Some(0.949999988079071));
    assert_eq!(infer_version(&s), (200, 2), "requests after the change use the new version");
    let metrics = s.scrape();
    assert!(metrics.contains("sluice_policy_version{model=\"gated\"} 2"));
    assert!(metrics.contains("sluice_policy_budget{model=\"gated\"} 0.5"));

    let (status, state) =
        gating(admin, "PUT", json!({"exit_threshold": 0.9, "overrides": {"layer1.1.block": 1.0}}), None);
    assert_eq!(status, 200);
    assert_eq!(state["policy"]["budget"], Value::Null, "PUT resets the budget");
    assert_eq!(state["policy"]["overrides"]["layer1.1.block"], 1.0);

    for (body, message) in [
        (json!({"overrides": {"layer9.9.block": 0.5}}), "unknown gate `layer9.9.block`"),
        (json!({"channel_threshold": 1.5}), "channel_threshold: 1.5 is outside [0, 1]"),
        (json!({"budget": 0.1}), "budget 0.1 is outside the calibrated range [0.3, 1]"),
        (json!({"budget": 0.5, "block_threshold": 0.2}), "cannot be combined"),
        (json!({"treshold": 0.5}), "unknown field `treshold`"),
        (json!({"channel_mode": "sideways"}), "unknown variant `sideways`"),
    ] {
        let (status, v) = gating(admin, "PATCH", body.clone(), None);
        assert_eq!(status, 400, "{body}: {v}");
        assert!(v["error"].as_str().unwrap().contains(message), "{body}: {v}");
    }
    assert_eq!(
        gating(admin, "GET", Value::Null, None).1["policy"]["version"],
        3,
        "refused changes change nothing"
    );

    // The public port does not serve the control API without a token.
    let (status, v) = gating(s.http, "PATCH", json!({"budget": 0.5}), None);
    assert_eq!(status, 403);
    assert!(v["error"].as_str().unwrap().contains("loopback admin listener"));
    assert!(s.scrape().contains("sluice_admin_rejections_total{reason=\"loopback_only\"} 1"));
}

#[test]
fn changes_persist_across_restarts_unless_disabled() {
    let repo = repo();
    {
        let s = Server::start(repo.path(), &[]);
        let (status, _) = gating(s.admin.unwrap(), "PATCH", json!({"block_threshold": 0.25}), None);
        assert_eq!(status, 200);
    }
    let s = Server::start(repo.path(), &[]);
    let (_, state) = gating(s.admin.unwrap(), "GET", Value::Null, None);
    assert_eq!(
        (state["policy"]["version"].as_i64(), state["policy"]["block_threshold"].as_f64()),
        (Some(2), Some(0.25))
    );
    drop(s);

    let s = Server::start(repo.path(), &["--no-persist-policy"]);
    let (_, state) = gating(s.admin.unwrap(), "PATCH", json!({"block_threshold": 0.75}), None);
    assert_eq!(state["policy"]["version"], 1 + 1, "starts from config.toml's policy, then one change");
    drop(s);
    let saved: Value =
        serde_json::from_str(&std::fs::read_to_string(repo.path().join("gated/policy.json")).unwrap())
            .unwrap();
    assert_eq!(saved["block_threshold"], 0.25, "--no-persist-policy left policy.json alone");
}

#[test]
fn a_token_guards_the_control_api_on_the_public_ports() {
    let repo = repo();
    let token_file = repo.path().join("token");
    std::fs::write(&token_file, "open-sesame\n").unwrap();
    let s = Server::start(repo.path(), &["--admin-token-file", token_file.to_str().unwrap()]);
    assert!(s.admin.is_none(), "with a token there is no loopback admin listener");
    assert_eq!(gating(s.http, "GET", Value::Null, None).0, 401);
    assert_eq!(gating(s.http, "GET", Value::Null, Some("guess")).0, 403);
    let (status, state) = gating(s.http, "PATCH", json!({"budget": 0.3}), Some("open-sesame"));
    assert_eq!(status, 200);
    assert_eq!(state["policy"]["version"], 2);
    let metrics = s.scrape();
    assert!(metrics.contains("sluice_admin_rejections_total{reason=\"missing_token\"} 1"));
    assert!(metrics.contains("sluice_admin_rejections_total{reason=\"bad_token\"} 1"));
    assert!(!s.log().contains("open-sesame"), "the token is never logged");

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = GatingAdminClient::connect(format!("http://{}", s.grpc)).await.unwrap();
        let get = || tonic::Request::new(admin_pb::GetGatingRequest { model: "gated".into() });
        assert_eq!(c.get_gating(get()).await.unwrap_err().code(), tonic::Code::Unauthenticated);
        let mut req = get();
        req.metadata_mut().insert("authorization", "Bearer nope".parse().unwrap());
        assert_eq!(c.get_gating(req).await.unwrap_err().code(), tonic::Code::PermissionDenied);
        let mut req = get();
        req.metadata_mut().insert("authorization", "Bearer open-sesame".parse().unwrap());
        let state = c.get_gating(req).await.unwrap().into_inner();
        assert_eq!(state.policy.unwrap().budget, Some(0.3));
        let latency: Vec<Option<f64>> = state.calibration.iter().map(|p| p.latency_ratio).collect();
        assert_eq!(latency, vec![None, Some(0.62), None], "the table's measured latency, over gRPC too");
    });
}

#[test]
fn grpc_admin_sets_patches_and_streams_changes() {
    let repo = repo();
    let s = Server::start(repo.path(), &[]);
    let admin = s.admin.unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = GatingAdminClient::connect(format!("http://{admin}")).await.unwrap();
        let mut watch =
            c.watch_gating(admin_pb::GetGatingRequest { model: "gated".into() }).await.unwrap().into_inner();
        let first = watch.message().await.unwrap().unwrap();
        assert_eq!(first.policy.unwrap().version, 1);
        let change = |c: admin_pb::PolicyChange| admin_pb::ChangeGatingRequest {
            model: "gated".into(),
            change: Some(c),
            actor: "grpc-test".into(),
        };
        let set = c
            .set_gating(change(admin_pb::PolicyChange { block_threshold: Some(0.5), ..Default::default() }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(set.policy.as_ref().unwrap().version, 2);
        let patched = c
            .patch_gating(change(admin_pb::PolicyChange {
                channel_mode: Some("select".into()),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner()
            .policy
            .unwrap();
        assert_eq!(
            (patched.version, patched.block_threshold, patched.channel_mode.as_str()),
            (3, 0.5, "select")
        );
        // Every change reaches the stream, in order, however fast they came.
        let next = watch.message().await.unwrap().unwrap().policy.unwrap();
        assert_eq!((next.version, next.block_threshold, next.channel_mode.as_str()), (2, 0.5, "slice"));
        let next = watch.message().await.unwrap().unwrap().policy.unwrap();
        assert_eq!((next.version, next.channel_mode.as_str()), (3, "select"));
        let bad = c
            .patch_gating(change(admin_pb::PolicyChange { exit_threshold: Some(-1.0), ..Default::default() }))
            .await
            .unwrap_err();
        assert_eq!(bad.code(), tonic::Code::InvalidArgument);
        assert!(bad.message().contains("exit_threshold: -1"), "{}", bad.message());
    });
    // The CLI is a client of the same API.
    let ctl = |budget: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args([
                "ctl",
                "gating",
                "set",
                "--model",
                "gated",
                "--url",
                &format!("http://{admin}"),
                "--budget",
                budget,
            ])
            .output()
            .unwrap()
    };
    let out = ctl("0.3");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let state: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (state["policy"]["version"].as_i64(), state["policy"]["budget"].as_f64()),
        (Some(4), Some(0.3))
    );
    let out = ctl("7");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("budget"));
}

#[test]
fn a_change_under_load_fails_nothing_and_applies_to_every_later_request() {
    let repo = repo();
    let s = Server::start(repo.path(), &[]);
    let admin = s.admin.unwrap();
    let stop = AtomicBool::new(false);
    // (sent at, status, version) per request of each of 8 clients.
    let (acked, results) = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..8)
            .map(|_| {
                scope.spawn(|| {
                    let mut seen = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let sent = Instant::now();
                        let (status, version) = infer_version(&s);
                        seen.push((sent, status, version));
                    }
                    seen
                })
            })
            .collect();
        // Let traffic flow before and after the change: wait for responses, not time.
        while s
            .scrape()
            .lines()
            .find(|l| l.starts_with("sluice_inferences_total"))
            .map_or(0.0, |l| l.rsplit(' ').next().unwrap().parse().unwrap())
            < 40.0
        {
            std::thread::yield_now();
        }
        let (status, state) = gating(admin, "PATCH", json!({"block_threshold": 0.6}), None);
        let acked = Instant::now();
        assert_eq!((status, state["policy"]["version"].as_i64()), (200, Some(2)));
        let target = 80.0;
        while s
            .scrape()
            .lines()
            .find(|l| l.starts_with("sluice_inferences_total"))
            .map_or(0.0, |l| l.rsplit(' ').next().unwrap().parse().unwrap())
            < target
        {
            std::thread::yield_now();
        }
        stop.store(true, Ordering::Relaxed);
        let results: Vec<(Instant, u16, i64)> = clients.into_iter().flat_map(|c| c.join().unwrap()).collect();
        (acked, results)
    });
    let failed: Vec<_> = results.iter().filter(|r| r.1 != 200).map(|r| r.1).collect();
    assert!(failed.is_empty(), "every request succeeded; these did not: {failed:?}");
    assert!(results.iter().all(|r| r.2 == 1 || r.2 == 2), "only whole versions");
    let after: Vec<_> = results.iter().filter(|r| r.0 > acked).collect();
    assert!(!after.is_empty());
    assert!(after.iter().all(|r| r.2 == 2), "every request sent after the acknowledgement ran on version 2");
    assert!(results.iter().any(|r| r.2 == 1), "traffic ran before the change too");
}

/// Runs `sluice serve` on `repo` with `args`, which must make it refuse to start; its stderr.
/// A server that starts anyway is killed after 60 s and the test fails.
fn refused_start(repo: &std::path::Path, args: &[&str]) -> String {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--model-repository", repo.to_str().unwrap(), "--address", "127.0.0.1"])
        .args(["--http-port", "0", "--grpc-port", "0", "--metrics-port", "0", "--admin-port", "0"])
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("sluice serve {args:?} did not refuse to start within 60 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    stderr
}

#[test]
fn a_policy_file_rules_from_the_start_and_the_api_defers_to_it() {
    let repo = repo();
    let model = repo.path().join("gated");
    let file = repo.path().join("policy.toml");
    // A file that does not fit the model stops the start, naming the file and the field.
    std::fs::write(&file, "version = 3\n[models.renamed]\nbudget = 1.5\n").unwrap();
    let file_arg = file.to_str().unwrap();
    let stderr = refused_start(&model, &["--model-name", "renamed", "--policy-file", file_arg]);
    assert!(
        stderr.contains("policy.toml") && stderr.contains("models.renamed") && stderr.contains("budget"),
        "{stderr}"
    );
    // The poll interval is bounded (50 ms to 60 s).
    std::fs::write(&file, "version = 3\n[models.renamed]\nbudget = 0.6\n").unwrap();
    for poll in ["10", "60001"] {
        let stderr = refused_start(&model, &["--policy-file", file_arg, "--policy-file-poll-ms", poll]);
        assert!(stderr.contains("--policy-file-poll-ms must be within 50..=60000"), "{stderr}");
    }
    // One model's folder served alone under the name KServe gives it, at the file's policy.
    let s = Server::start(&model, &["--model-name", "renamed", "--policy-file", file_arg]);
    let r = request(s.http, "GET", "/v2/models/renamed/ready", &[], b"");
    assert_eq!(r.status, 200);
    assert_eq!(request(s.http, "GET", "/v2/models/gated/ready", &[], b"").status, 404);
    let admin = s.admin.unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = GatingAdminClient::connect(format!("http://{admin}")).await.unwrap();
        let state =
            c.get_gating(admin_pb::GetGatingRequest { model: "renamed".into() }).await.unwrap().into_inner();
        let p = state.policy.unwrap();
        assert_eq!((p.version, p.budget, p.source.as_str()), (3, Some(0.6), "file"));
        let f = state.policy_file.unwrap();
        assert_eq!((f.path.as_str(), f.version), (file.to_str().unwrap(), 3));
        let refused = c
            .patch_gating(admin_pb::ChangeGatingRequest {
                model: "renamed".into(),
                change: Some(admin_pb::PolicyChange { budget: Some(0.3), ..Default::default() }),
                actor: "test".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
        assert!(refused.message().contains("--policy-file"), "{}", refused.message());
    });
    assert!(s.scrape().contains("\nsluice_policy_file_version 3\n"));
}

/// Scrapes one unlabelled sample.
fn sample(s: &Server, name: &str) -> Option<f64> {
    s.scrape().lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Waits (polling, 10 s at most) until `done` holds.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn a_policy_file_change_applies_to_every_model_or_to_none() {
    let repo = repo();
    let second = add_model(repo.path(), "second", &["--gates", "channel,block,exits", "--seed", "4"], "");
    write_calibration(&second);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.toml");
    // Written as Kubernetes and careful tools do: a new file renamed over the old one.
    let write = |text: &str| {
        let tmp = dir.path().join("policy.toml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
    };
    write("version = 1\n[models.gated]\nbudget = 1.0\n");
    let s =
        Server::start(repo.path(), &["--policy-file", file.to_str().unwrap(), "--policy-file-poll-ms", "50"]);
    let admin = s.admin.unwrap();
    let state = |model: &str| {
        let r = request(admin, "GET", &format!("/v2/models/{model}/gating"), &[], b"");
        assert_eq!(r.status, 200);
        r.json()
    };
    let live = |model: &str| {
        let p = state(model)["policy"].clone();
        (p["version"].as_u64().unwrap(), p["budget"].as_f64(), p["source"].as_str().unwrap().to_string())
    };
    // The file names `gated`; `second` runs its config's policy, under the file's version.
    assert_eq!(live("gated"), (1, Some(1.0), "file".into()));
    assert_eq!(live("second"), (1, None, "file".into()));
    let errors = || sample(&s, "sluice_policy_file_errors_total").unwrap_or(-1.0);
    assert_eq!(errors(), 0.0);
    // One invalid entry: nothing changes, in either model.
    write("version = 2\n[models.gated]\nbudget = 0.6\n[models.second]\nbudget = 1.7\n");
    wait_until("the refusal", || errors() == 1.0);
    assert_eq!((live("gated"), live("second")), ((1, Some(1.0), "file".into()), (1, None, "file".into())));
    // Only models this server does not serve: a typo, refused.
    write("version = 3\n[models.gatde]\nbudget = 0.6\n");
    wait_until("the second refusal", || errors() == 2.0);
    assert_eq!(live("gated").0, 1);
    // A valid change reaches both, with the file's version and digest.
    let text = "version = 4\n[models.gated]\nbudget = 0.6\n[models.second]\nbudget = 0.3\n";
    write(text);
    wait_until("version 4", || live("second").0 == 4);
    assert_eq!(
        (live("gated"), live("second")),
        ((4, Some(0.6), "file".into()), (4, Some(0.3), "file".into()))
    );
    let f = state("gated")["policy_file"].clone();
    assert_eq!(f["version"], 4);
    assert_eq!(f["sha256"].as_str().unwrap(), sluice::control::policy_file::digest(text.as_bytes()));
    assert_eq!(sample(&s, "sluice_policy_file_version"), Some(4.0));
    // A file that cannot be read leaves the policies alone, and is counted once.
    std::fs::remove_file(&file).unwrap();
    wait_until("the missing file", || errors() == 3.0);
    assert_eq!(live("gated").0, 4);
}
