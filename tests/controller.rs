//! The adaptive budget controller, booted for real: its settings validated field by field
//! over HTTP and gRPC, suspended while the operator sets thresholds, and a load step that
//! makes it lower the live budget (policy versions with source `controller`, never below the
//! floor or above the operator's budget) and give it back once the load is gone.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::server::{Server, add_model, json_infer, request, write_calibration};
use serde_json::{Value, json};
use sluice::protocol::grpc::admin_pb;
use sluice::protocol::grpc::admin_pb::gating_admin_client::GatingAdminClient;

fn repo() -> tempfile::TempDir {
    let repo = tempfile::tempdir().unwrap();
    let dir = add_model(repo.path(), "gated", &["--gates", "channel,block,exits", "--seed", "3"], "");
    write_calibration(&dir);
    add_model(repo.path(), "plain", &["--gates", "channel,block,exits", "--seed", "4"], "");
    repo
}

/// One control-API call on `path` (below `/v2/models/gated`).
fn call(addr: std::net::SocketAddr, method: &str, path: &str, body: Value) -> (u16, Value) {
    let body = if body.is_null() { Vec::new() } else { body.to_string().into_bytes() };
    let r = request(addr, method, &format!("/v2/models/gated{path}"), &[], &body);
    let v = if r.body.is_empty() { Value::Null } else { r.json() };
    (r.status, v)
}

fn state(addr: std::net::SocketAddr) -> Value {
    let (status, v) = call(addr, "GET", "/gating", Value::Null);
    assert_eq!(status, 200, "{v}");
    v
}

/// Polls the gating state until `done` holds (or fails after `limit`); returns it.
fn wait_for(addr: std::net::SocketAddr, limit: Duration, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let v = state(addr);
        if done(&v) {
            return v;
        }
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}; last state {v:#}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn infer(s: &Server) -> u16 {
    let x: Vec<f32> = (0..784).map(|i| (i % 17) as f32 / 8.0 - 1.0).collect();
    request(s.http, "POST", "/v2/models/gated/infer", &[], &json_infer("input", &[1, 1, 28, 28], &x)).status
}

#[test]
fn controller_settings_are_checked_field_by_field_and_switch_live() {
    let repo = repo();
    let s = Server::start(repo.path(), &[]);
    let admin = s.admin.unwrap();
    let v = state(admin);
    assert_eq!(
        (v["controller"]["enabled"].as_bool(), v["controller"]["state"].as_str()),
        (Some(false), Some("off"))
    );
    assert_eq!(v["policy"]["source"], "config");
    for (body, names) in [
        (json!({"enabled": true}), "target_ms"),
        (json!({"target_ms": -1.0}), "target_ms"),
        (json!({"target_ms": 5.0, "max_accuracy_drop": 1.0, "min_budget": 0.3}), "not both"),
        (json!({"target_ms": 5.0, "min_budget": 1.5}), "min_budget"),
        (json!({"percentile": "p90"}), "p90"),
        (json!({"tick_ms": 5}), "tick_ms"),
    ] {
        let (status, err) = call(admin, "PATCH", "/gating/controller", body.clone());
        assert_eq!(status, 400, "{body} was accepted: {err}");
        let message = err["error"].as_str().unwrap();
        assert!(message.contains(names), "{body}: `{message}` does not name {names}");
    }
    assert_eq!(state(admin)["controller"]["enabled"], false, "refused changes leave the settings alone");
    // A model without a calibration table has no budgets to choose among.
    let r = request(
        admin,
        "PATCH",
        "/v2/models/plain/gating/controller",
        &[],
        br#"{"enabled":true,"target_ms":5}"#,
    );
    assert_eq!(r.status, 400);
    assert!(r.json()["error"].as_str().unwrap().contains("no calibration table"), "{}", r.json());

    // Thresholds set by the operator leave the controller nothing to lower: suspended, says why.
    assert_eq!(call(admin, "PUT", "/gating", json!({"block_threshold": 0.5})).0, 200);
    let (status, v) = call(
        admin,
        "PUT",
        "/gating/controller",
        json!({"enabled": true, "target_ms": 50.0, "percentile": "p95"}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (v["controller"]["target_ms"].as_f64(), v["controller"]["percentile"].as_str()),
        (Some(50.0), Some("p95"))
    );
    let v =
        wait_for(admin, Duration::from_secs(10), "suspended", |v| v["controller"]["state"] == "suspended");
    assert!(v["controller"]["reason"].as_str().unwrap().contains("budget"), "{v}");
    // With a budget it becomes active; switched off over gRPC it is off again.
    assert_eq!(call(admin, "PUT", "/gating", json!({"budget": 1.0})).0, 200);
    wait_for(admin, Duration::from_secs(10), "active", |v| v["controller"]["state"] == "active");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = GatingAdminClient::connect(format!("http://{admin}")).await.unwrap();
        let change = |c: admin_pb::ControllerChange| admin_pb::ChangeControllerRequest {
            model: "gated".into(),
            change: Some(c),
            actor: "grpc-test".into(),
        };
        let bad = c
            .patch_controller(change(admin_pb::ControllerChange {
                percentile: Some("p50".into()),
                ..Default::default()
            }))
            .await
            .unwrap_err();
        assert_eq!(bad.code(), tonic::Code::InvalidArgument);
        assert!(bad.message().contains("p50"), "{}", bad.message());
        let off = c
            .patch_controller(change(admin_pb::ControllerChange {
                enabled: Some(false),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner()
            .controller
            .unwrap();
        assert_eq!((off.enabled, off.state.as_str(), off.target_ms), (false, "off", Some(50.0)));
    });
    assert!(s.scrape().contains("\nsluice_controller_enabled{model=\"gated\"} 0\n"));
}

#[test]
fn under_a_load_step_the_controller_lowers_the_budget_and_gives_it_back() {
    let repo = repo();
    let s = Server::start(repo.path(), &[]);
    let admin = s.admin.unwrap();
    assert_eq!(call(admin, "PUT", "/gating", json!({"budget": 1.0})).0, 200);
    // The target: three times a lone request's latency here (measured, median of 41).
    let mut lone: Vec<f64> = (0..41)
        .map(|_| {
            let t = Instant::now();
            assert_eq!(infer(&s), 200);
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    lone.sort_by(f64::total_cmp);
    let target_ms = 3.0 * lone[20];
    let (status, v) = call(
        admin,
        "PUT",
        "/gating/controller",
        json!({"enabled": true, "percentile": "p99", "target_ms": target_ms, "min_budget": 0.3}),
    );
    assert_eq!(status, 200, "{v}");
    let v = wait_for(admin, Duration::from_secs(10), "active", |v| v["controller"]["state"] == "active");
    assert_eq!(
        (v["controller"]["ceiling"].as_f64(), v["controller"]["floor"].as_f64()),
        (Some(1.0), Some(0.3))
    );
    let before = v["policy"]["version"].as_i64().unwrap();

    // The step: 24 clients back to back until the controller has lowered the budget.
    let stop = AtomicBool::new(false);
    let (lowered, statuses) = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..24)
            .map(|_| {
                scope.spawn(|| {
                    let mut statuses = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        statuses.push(infer(&s));
                    }
                    statuses
                })
            })
            .collect();
        let lowered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wait_for(admin, Duration::from_secs(60), "the budget lowered under load", |v| {
                let budget = v["policy"]["budget"].as_f64().unwrap();
                assert!(
                    (0.3 - 1e-9..=1.0).contains(&budget),
                    "budget {budget} outside [floor, ceiling]: {v}"
                );
                assert_eq!(
                    v["operator_policy"]["budget"].as_f64(),
                    Some(1.0),
                    "the operator's policy is untouched"
                );
                budget < 1.0
            })
        }));
        stop.store(true, Ordering::Relaxed);
        let statuses: Vec<u16> = clients.into_iter().flat_map(|c| c.join().unwrap()).collect();
        (lowered.unwrap_or_else(|p| std::panic::resume_unwind(p)), statuses)
    });
    assert_eq!(lowered["policy"]["source"], "controller", "{lowered}");
    assert!(lowered["policy"]["version"].as_i64().unwrap() > before);
    assert!(statuses.len() >= 24 && statuses.iter().all(|&s| s == 200), "every request answered: {:?}", {
        let mut failed: Vec<_> = statuses.iter().filter(|&&s| s != 200).collect();
        failed.dedup();
        failed
    });

    // Load gone: the operator's budget comes back.
    let back = wait_for(admin, Duration::from_secs(30), "the budget given back", |v| {
        v["policy"]["budget"].as_f64() == Some(1.0)
    });
    assert_eq!(back["policy"]["source"], "controller", "given back by the controller: {back}");
    assert!(back["controller"]["changes"].as_u64().unwrap() >= 2, "{back}");
    let metrics = s.scrape();
    let changes = metrics
        .lines()
        .find_map(|l| l.strip_prefix("sluice_controller_changes_total{model=\"gated\"} "))
        .and_then(|v| v.parse::<u64>().ok());
    assert!(changes.is_some_and(|c| c >= 2), "{changes:?}");
    // Compared as numbers, to 1e-12: serde_json's default number parser (the server reads
    // the target from JSON) may land one ulp away from the correctly rounded value.
    let target = metrics
        .lines()
        .find_map(|l| l.strip_prefix("sluice_controller_target_seconds{model=\"gated\"} "))
        .and_then(|v| v.parse::<f64>().ok());
    assert!(
        target.is_some_and(|t| (t - target_ms / 1e3).abs() <= 1e-12 * t.abs()),
        "the objective's target, {target:?} s, is not {target_ms} ms"
    );
    // Switched off, nothing is capped: the operator's policy is the live one.
    let (status, v) = call(admin, "PATCH", "/gating/controller", json!({"enabled": false}));
    assert_eq!((status, v["controller"]["state"].as_str()), (200, Some("off")));
    assert_eq!(v["policy"]["budget"].as_f64(), Some(1.0));
}
