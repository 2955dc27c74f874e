//! `sluice ctl gating get|set` and `sluice ctl controller get|set|on|off`: a client of a
//! running server's control API (HTTP), or of every replica of a fleet (`--url a,b,c` or
//! `--dns service:port`), reporting each one's answer.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

use crate::control::PolicyChange;
use crate::control::controller::{ControllerChange, Percentile};
use crate::engine::ChannelMode;

/// `sluice ctl ...`
#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Read or change a model's live gating policy.
    #[command(subcommand)]
    Gating(GatingCommand),
    /// Read or change a model's latency objective and adaptive budget controller.
    #[command(subcommand)]
    Controller(ControllerCommand),
}

/// `sluice ctl controller ...`
#[derive(Debug, Subcommand)]
pub enum ControllerCommand {
    /// Print the gating state with the controller's settings and state.
    Get(Target),
    /// Change the objective (patch by default; --replace resets unset fields).
    Set(ControllerSetArgs),
    /// Switch the controller on (the objective must have a target).
    On(Target),
    /// Switch the controller off: the operator's budget is live again at once.
    Off(Target),
}

/// Arguments of `sluice ctl controller set`.
#[derive(Debug, Args)]
pub struct ControllerSetArgs {
    #[command(flatten)]
    pub target: Target,
    /// The latency target in milliseconds.
    #[arg(long, env = "SLUICE_CTL_TARGET_MS")]
    pub target_ms: Option<f64>,
    /// Which percentile the target bounds: p95 or p99.
    #[arg(long, env = "SLUICE_CTL_PERCENTILE")]
    pub percentile: Option<Percentile>,
    /// The floor: the largest drop in calibrated accuracy accepted (percentage points).
    #[arg(long, env = "SLUICE_CTL_MAX_ACCURACY_DROP", conflicts_with = "min_budget")]
    pub max_accuracy_drop: Option<f64>,
    /// The floor as an explicit minimum budget.
    #[arg(long, env = "SLUICE_CTL_MIN_BUDGET")]
    pub min_budget: Option<f64>,
    /// Switch the controller on (or off with --enable=false).
    #[arg(long, env = "SLUICE_CTL_ENABLE")]
    pub enable: Option<bool>,
    /// Replace the settings (unset fields take their defaults) instead of patching them.
    #[arg(long, env = "SLUICE_CTL_REPLACE")]
    pub replace: bool,
    /// Who is changing it (recorded in the server's log).
    #[arg(long, env = "SLUICE_CTL_ACTOR")]
    pub actor: Option<String>,
}

/// `sluice ctl gating ...`
#[derive(Debug, Subcommand)]
pub enum GatingCommand {
    /// Print the live policy, the calibration table and the gate ids.
    Get(Target),
    /// Change the live policy (patch by default; --replace resets unset fields).
    Set(SetArgs),
}

/// Which server and model.
#[derive(Debug, Args)]
pub struct Target {
    /// The model.
    #[arg(long, env = "SLUICE_CTL_MODEL")]
    pub model: String,
    /// The control API: the loopback admin listener, or the HTTP port when a token is set.
    /// Several (comma-separated or repeated) address a fleet: the call goes to each.
    #[arg(long, env = "SLUICE_CTL_URL", default_value = "http://127.0.0.1:8003", value_delimiter = ',')]
    pub url: Vec<String>,
    /// Every replica a name resolves to, as `name:port` (a Kubernetes headless Service, e.g.
    /// `sluice-headless.default.svc:8000`), over plain HTTP; replaces --url. Where the name
    /// has IPv4 and IPv6 addresses (dual-stack), only the IPv4 ones: one per replica.
    #[arg(long, env = "SLUICE_CTL_DNS")]
    pub dns: Option<String>,
    /// Bearer token (when the server has one).
    #[arg(long, env = "SLUICE_ADMIN_TOKEN", hide_env_values = true, conflicts_with = "token_file")]
    pub token: Option<String>,
    /// A file holding the bearer token.
    #[arg(long, env = "SLUICE_ADMIN_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

/// Arguments of `sluice ctl gating set`.
#[derive(Debug, Args)]
pub struct SetArgs {
    #[command(flatten)]
    pub target: Target,
    /// Compute budget (fraction of dense FLOPs), resolved through the calibration table.
    #[arg(long, env = "SLUICE_CTL_BUDGET")]
    pub budget: Option<f64>,
    #[arg(long, env = "SLUICE_CTL_CHANNEL_THRESHOLD")]
    pub channel_threshold: Option<f32>,
    #[arg(long, env = "SLUICE_CTL_BLOCK_THRESHOLD")]
    pub block_threshold: Option<f32>,
    #[arg(long, env = "SLUICE_CTL_EXIT_THRESHOLD")]
    pub exit_threshold: Option<f32>,
    /// Channel mode: slice or select.
    #[arg(long, env = "SLUICE_CTL_MODE")]
    pub mode: Option<ChannelMode>,
    /// Per-gate threshold, `gate=value` (repeatable); replaces the current overrides.
    #[arg(long = "override", env = "SLUICE_CTL_OVERRIDES", value_delimiter = ',')]
    pub overrides: Vec<String>,
    #[arg(long, env = "SLUICE_CTL_CLEAR_OVERRIDES")]
    pub clear_overrides: bool,
    /// Replace the policy (unset fields take their defaults) instead of patching it.
    #[arg(long, env = "SLUICE_CTL_REPLACE")]
    pub replace: bool,
    /// Who is changing it (recorded in the server's change log).
    #[arg(long, env = "SLUICE_CTL_ACTOR")]
    pub actor: Option<String>,
}

pub fn run(command: &CtlCommand) -> anyhow::Result<()> {
    match command {
        CtlCommand::Gating(g) => gating(g),
        CtlCommand::Controller(c) => controller(c),
    }
}

fn controller(command: &ControllerCommand) -> anyhow::Result<()> {
    let actor = || std::env::var("USER").ok();
    let switch =
        |enabled: bool| ControllerChange { enabled: Some(enabled), actor: actor(), ..Default::default() };
    let (target, method, change) = match command {
        ControllerCommand::Get(t) => return send(t, "/gating", "GET", None),
        ControllerCommand::On(t) => (t, "PATCH", switch(true)),
        ControllerCommand::Off(t) => (t, "PATCH", switch(false)),
        ControllerCommand::Set(s) => {
            let change = ControllerChange {
                enabled: s.enable,
                percentile: s.percentile,
                target_ms: s.target_ms,
                max_accuracy_drop: s.max_accuracy_drop,
                min_budget: s.min_budget,
                actor: s.actor.clone().or_else(actor),
            };
            (&s.target, if s.replace { "PUT" } else { "PATCH" }, change)
        }
    };
    send(target, "/gating/controller", method, Some(serde_json::to_string(&change)?))
}

fn gating(g: &GatingCommand) -> anyhow::Result<()> {
    let (target, method, body) = match g {
        GatingCommand::Get(t) => (t, "GET", None),
        GatingCommand::Set(s) => {
            let overrides = if s.overrides.is_empty() {
                None
            } else {
                let mut map = BTreeMap::new();
                for o in &s.overrides {
                    let (gate, value) = o
                        .split_once('=')
                        .with_context(|| format!("--override `{o}`: expected gate=value"))?;
                    let value: f32 = value
                        .parse()
                        .with_context(|| format!("--override `{o}`: `{value}` is not a number"))?;
                    map.insert(gate.to_string(), value);
                }
                Some(map)
            };
            let change = PolicyChange {
                budget: s.budget,
                channel_threshold: s.channel_threshold,
                block_threshold: s.block_threshold,
                exit_threshold: s.exit_threshold,
                channel_mode: s.mode,
                overrides,
                clear_overrides: s.clear_overrides,
                actor: s.actor.clone().or_else(|| std::env::var("USER").ok()),
            };
            (&s.target, if s.replace { "PUT" } else { "PATCH" }, Some(serde_json::to_string(&change)?))
        }
    };
    send(target, "/gating", method, body)
}

/// Where a call goes: `--url`'s list, or every address `--dns` resolves to (sorted).
fn endpoints(target: &Target) -> anyhow::Result<Vec<String>> {
    let Some(name) = &target.dns else {
        return Ok(target.url.iter().map(|u| u.trim_end_matches('/').to_string()).collect());
    };
    use std::net::ToSocketAddrs;
    let addrs = name
        .to_socket_addrs()
        .with_context(|| format!("--dns {name}: cannot resolve it (expected name:port)"))?;
    let urls = replica_urls(addrs.collect());
    if urls.is_empty() {
        bail!("--dns {name}: resolves to no address");
    }
    Ok(urls)
}

/// One URL per replica from a name's addresses: sorted, without repeats, and only the IPv4
/// ones where there are both (a dual-stack replica has one of each).
fn replica_urls(mut addrs: Vec<std::net::SocketAddr>) -> Vec<String> {
    if addrs.iter().any(|a| a.is_ipv4()) {
        addrs.retain(|a| a.is_ipv4());
    }
    addrs.sort();
    addrs.dedup();
    addrs.into_iter().map(|a| format!("http://{a}")).collect()
}

/// Sends one control-API call to every endpoint and prints the answer: the whole state
/// for one endpoint, one line per replica (policy version, source, budget, policy file
/// version) for several; fails when any replica does.
fn send(target: &Target, path: &str, method: &str, body: Option<String>) -> anyhow::Result<()> {
    let urls = endpoints(target)?;
    let client = Client::new(target)?;
    if let [url] = urls.as_slice() {
        let value = client.call(url, path, method, body.as_deref())?;
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let mut failed = 0;
    let mut versions = std::collections::BTreeSet::new();
    let mut files = std::collections::BTreeSet::new();
    for url in &urls {
        match client.call(url, path, method, body.as_deref()) {
            Ok(v) => {
                let p = &v["policy"];
                versions.insert(p["version"].as_u64().unwrap_or(0));
                let budget = p["budget"].as_f64().map_or("-".to_string(), |b| b.to_string());
                let f = &v["policy_file"];
                let file = match (f["version"].as_u64(), f["sha256"].as_str()) {
                    (Some(version), Some(sha)) => {
                        files.insert((version, sha.to_string()));
                        format!("{version} sha256={}", &sha[..sha.len().min(12)])
                    }
                    _ => "-".to_string(),
                };
                println!(
                    "{url}  version={} source={} budget={budget} policy_file_version={file}",
                    p["version"],
                    p["source"].as_str().unwrap_or("?")
                );
            }
            Err(e) => {
                failed += 1;
                println!("{url}  error: {e:#}");
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} replicas failed", urls.len());
    }
    // With a policy file, the file (its version and bytes) is what the fleet agrees on; the
    // live versions may also differ where a replica's latency controller made its own.
    let live = if versions.len() == 1 {
        format!("all at policy version {}", versions.first().unwrap_or(&0))
    } else {
        format!("at policy versions {versions:?}")
    };
    match files.len() {
        0 => println!("{} replicas, {live}", urls.len()),
        1 => println!(
            "{} replicas, {live}; all applied policy file version {}",
            urls.len(),
            files.first().map_or(0, |f| f.0)
        ),
        _ => bail!(
            "{} replicas, {live}; they applied different policy files: {:?}",
            urls.len(),
            files
                .iter()
                .map(|(v, sha)| format!("version {v} sha256 {}", &sha[..sha.len().min(12)]))
                .collect::<Vec<_>>()
        ),
    }
    Ok(())
}

/// What every call of one `sluice ctl` shares: the HTTP agent, the token (read once) and the
/// model.
struct Client<'a> {
    agent: ureq::Agent,
    auth: Option<String>,
    model: &'a str,
}

impl<'a> Client<'a> {
    fn new(target: &'a Target) -> anyhow::Result<Self> {
        let token = match (&target.token, &target.token_file) {
            (Some(t), _) => Some(t.trim().to_string()),
            (None, Some(f)) => {
                Some(std::fs::read_to_string(f).with_context(|| f.display().to_string())?.trim().to_string())
            }
            (None, None) => None,
        };
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(10)))
            .build()
            .into();
        Ok(Client { agent, auth: token.map(|t| format!("Bearer {t}")), model: &target.model })
    }

    /// One control-API call to `{url}/v2/models/{model}{path}`; the answer's JSON.
    fn call(
        &self,
        url: &str,
        path: &str,
        method: &str,
        body: Option<&str>,
    ) -> anyhow::Result<serde_json::Value> {
        let (agent, auth) = (&self.agent, &self.auth);
        let url = format!("{url}/v2/models/{}{path}", self.model);
        let mut response = match (method, body) {
            ("GET", _) => {
                let mut req = agent.get(&url);
                if let Some(a) = &auth {
                    req = req.header("Authorization", a);
                }
                req.call()
            }
            (m, Some(body)) => {
                let mut req = if m == "PUT" { agent.put(&url) } else { agent.patch(&url) };
                req = req.header("Content-Type", "application/json");
                if let Some(a) = &auth {
                    req = req.header("Authorization", a);
                }
                req.send(body)
            }
            _ => bail!("nothing to send"),
        }
        .with_context(|| format!("cannot reach {url}"))?;
        let status = response.status();
        let text = response.body_mut().read_to_string().unwrap_or_default();
        if !status.is_success() {
            let message = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v["error"].as_str().map(String::from))
                .unwrap_or(text);
            bail!("{status}: {message}");
        }
        Ok(serde_json::from_str(&text)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_url_per_replica_preferring_ipv4_on_dual_stack() {
        let addr = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
        let dual =
            vec![addr("[::1]:8000"), addr("10.0.0.6:8000"), addr("10.0.0.5:8000"), addr("10.0.0.5:8000")];
        assert_eq!(replica_urls(dual), ["http://10.0.0.5:8000", "http://10.0.0.6:8000"]);
        let v6 = vec![addr("[fd00::2]:8000"), addr("[fd00::1]:8000")];
        assert_eq!(replica_urls(v6), ["http://[fd00::1]:8000", "http://[fd00::2]:8000"]);
        assert!(replica_urls(Vec::new()).is_empty());
    }
}
