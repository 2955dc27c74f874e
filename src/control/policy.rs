//! The live gating policy of one model: an immutable, versioned value swapped atomically
//! (`arc-swap`). Each batch takes one snapshot, so no request ever sees half a policy; a
//! request may ask for its own budget or thresholds, capped by the operator's floor.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use super::calibration::{BudgetError, CalibrationTable};
use crate::engine::{ChannelMode, GatePolicy, PolicySource};

/// Gating asked for by one request (resolved by the model's policy store).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicyRequest {
    pub budget: Option<f64>,
    pub channel_threshold: Option<f32>,
    pub block_threshold: Option<f32>,
    pub exit_threshold: Option<f32>,
    pub channel_mode: Option<ChannelMode>,
}

impl PolicyRequest {
    pub fn is_empty(&self) -> bool {
        *self == PolicyRequest::default()
    }
}

/// Why a policy or a change to it is refused (the message names the field).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct PolicyError(pub String);

/// Why a change to the live policy was not made (the live policy is unchanged either way).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ChangeError {
    /// The change is invalid (the caller's fault).
    #[error(transparent)]
    Invalid(#[from] PolicyError),
    /// The new policy could not be persisted (the server's fault).
    #[error("{0}")]
    NotPersisted(String),
    /// The operator's policy comes from the fleet's policy file, not the control API.
    #[error("{0}")]
    Managed(String),
}

impl From<BudgetError> for PolicyError {
    fn from(e: BudgetError) -> Self {
        PolicyError(format!("budget: {e}"))
    }
}

/// A change to the live policy (HTTP `PUT`/`PATCH` body, gRPC `PolicyChange`). A budget
/// and thresholds are mutually exclusive.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyChange {
    pub budget: Option<f64>,
    pub channel_threshold: Option<f32>,
    pub block_threshold: Option<f32>,
    pub exit_threshold: Option<f32>,
    pub channel_mode: Option<ChannelMode>,
    /// Replaces the per-gate overrides when present.
    pub overrides: Option<BTreeMap<String, f32>>,
    #[serde(default)]
    pub clear_overrides: bool,
    /// Who asks (recorded in the change log).
    pub actor: Option<String>,
}

/// Whether a change replaces the policy or patches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    /// Unset fields take their defaults (dense, exits off).
    Replace,
    /// Unset fields keep their current values.
    Patch,
}

impl PolicyChange {
    /// The policy this change makes from `current` (not yet validated).
    pub fn apply(&self, current: &GatePolicy, kind: ChangeKind) -> Result<GatePolicy, PolicyError> {
        let thresholds = self.channel_threshold.is_some()
            || self.block_threshold.is_some()
            || self.exit_threshold.is_some();
        if self.budget.is_some() && thresholds {
            return Err(PolicyError(
                "budget: cannot be combined with thresholds (a budget sets them)".into(),
            ));
        }
        let mut p = match kind {
            ChangeKind::Replace => GatePolicy::dense(),
            ChangeKind::Patch => current.clone(),
        };
        if let Some(b) = self.budget {
            p.budget = Some(b);
        } else if thresholds {
            p.budget = None;
        }
        if let Some(t) = self.channel_threshold {
            p.channel_threshold = t;
        }
        if let Some(t) = self.block_threshold {
            p.block_threshold = t;
        }
        if let Some(t) = self.exit_threshold {
            p.exit_threshold = t;
        }
        if let Some(m) = self.channel_mode {
            p.channel_mode = m;
        }
        if self.clear_overrides {
            p.overrides.clear();
        }
        if let Some(o) = &self.overrides {
            p.overrides = o.clone();
        }
        p.version = current.version;
        Ok(p)
    }
}

/// The operator's bounds on per-request gating parameters.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RequestBounds {
    /// The least `sluice_budget` a request may ask for (also bounds thresholds when the model
    /// is calibrated).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_budget: Option<f64>,
    /// The most `sluice_budget` a request may ask for (1.0: dense compute allowed).
    pub max_budget: f64,
    /// Whether requests may set raw gate thresholds (`sluice_*_threshold`).
    pub allow_thresholds: bool,
    /// Whether requests may choose the channel mode (`sluice_channel_mode`; `select` is slow).
    pub allow_channel_mode: bool,
}

impl Default for RequestBounds {
    fn default() -> Self {
        RequestBounds { min_budget: None, max_budget: 1.0, allow_thresholds: true, allow_channel_mode: true }
    }
}

/// How many changes a watcher may fall behind before it loses the oldest.
pub const WATCH_BACKLOG: usize = 64;

/// The live policy of a model, its calibration table and its limits.
pub struct PolicyStore {
    current: ArcSwap<GatePolicy>,
    /// Every change is published here too (gRPC watch streams), at most
    /// [`WATCH_BACKLOG`] behind per reader.
    changes: broadcast::Sender<Arc<GatePolicy>>,
    /// Where changes are persisted (`policy.json` beside the model), if anywhere.
    persist: Option<PathBuf>,
    calibration: Option<CalibrationTable>,
    gate_ids: Vec<String>,
    /// What a request may ask for (operator-set).
    bounds: RequestBounds,
    /// The operator's side, changed only under this lock (which also serialises changes, so
    /// versions increase one at a time).
    writer: Mutex<Operator>,
}

/// What the operator set, and the controller's cap on it.
struct Operator {
    /// The operator's (or the config's) policy: what is persisted, and the ceiling of the
    /// adaptive budget controller.
    policy: Arc<GatePolicy>,
    /// The budget the controller holds the live policy to while it is below the operator's.
    cap: Option<f64>,
    /// The policy file the operator's policy follows (`--policy-file`) and what of it was
    /// applied last; control-API changes are refused while it is set.
    file: Option<FollowedVersion>,
}

/// The policy file a store follows and the contents it applied last.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FollowedVersion {
    pub path: String,
    /// The file's `version`.
    pub version: u64,
    /// SHA-256 of the file's bytes (hex): two replicas that applied the same file agree
    /// on it, whatever their live policy versions.
    pub sha256: String,
}

impl PolicyStore {
    /// A store starting at `initial` (a budget in it is resolved through the table; its
    /// `source` says where it came from).
    pub fn new(
        initial: GatePolicy,
        calibration: Option<CalibrationTable>,
        gate_ids: Vec<String>,
        bounds: RequestBounds,
    ) -> Result<Self, PolicyError> {
        let store = PolicyStore {
            current: ArcSwap::from_pointee(GatePolicy::dense()),
            changes: broadcast::Sender::new(WATCH_BACKLOG),
            persist: None,
            calibration,
            gate_ids,
            bounds,
            writer: Mutex::new(Operator { policy: Arc::new(GatePolicy::dense()), cap: None, file: None }),
        };
        let resolved = store.resolve_budget(initial)?;
        let first = Arc::new(GatePolicy { version: resolved.version.max(1), ..resolved });
        store.current.store(first.clone());
        store.writer.lock().unwrap_or_else(|e| e.into_inner()).policy = first;
        Ok(store)
    }

    /// Persists every later change to `path` (JSON), so a restart keeps it.
    pub fn persist_to(mut self, path: PathBuf) -> Self {
        self.persist = Some(path);
        self
    }

    /// Makes the operator's policy follow the policy file `path`, whose version `version`
    /// made the initial policy: from now on the file changes it ([`PolicyStore::apply_file`])
    /// and the control API may not.
    pub fn follow_file(self, followed: FollowedVersion) -> Self {
        self.writer.lock().unwrap_or_else(|e| e.into_inner()).file = Some(followed);
        self
    }

    /// The policy file followed and what of it was applied last, if any.
    pub fn file(&self) -> Option<FollowedVersion> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner()).file.clone()
    }

    /// The operator's policy a policy-file entry makes: `entry` replaces the policy as a
    /// `PUT` does, or, when the file does not name the model, `config` (its `config.toml`
    /// policy). Checked and resolved, not applied.
    pub fn prepare_file(
        &self,
        entry: Option<&PolicyChange>,
        config: &GatePolicy,
    ) -> Result<GatePolicy, PolicyError> {
        let policy = match entry {
            Some(change) => change.apply(&GatePolicy::dense(), ChangeKind::Replace)?,
            None => config.clone(),
        };
        self.resolve_budget(GatePolicy { source: PolicySource::File, ..policy })
    }

    /// Whether version `file_version` of the file may be applied (it must be above the one
    /// applied), and the live policy `prepared` makes under the controller's cap: what
    /// [`PolicyStore::apply_file`] will make live, checked before anything changes.
    pub fn check_file(&self, prepared: &GatePolicy, file_version: u64) -> Result<(), PolicyError> {
        let operator = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let Some(applied) = &operator.file else {
            return Err(PolicyError("this model does not follow a policy file".into()));
        };
        if file_version <= applied.version {
            return Err(PolicyError(format!(
                "version: {file_version} is not above the version applied, {}: raise it with every change",
                applied.version
            )));
        }
        self.capped(&Arc::new(prepared.clone()), operator.cap).map(|_| ())
    }

    /// Applies a policy made by [`PolicyStore::prepare_file`] from the file's version
    /// `file.version`: the new version is that file version (or one more than the live one,
    /// should that already be as high: the controller's versions are local to a replica),
    /// so replicas that applied the same file and hold no controller cap answer with the
    /// same version. Refused as [`PolicyStore::check_file`] refuses.
    pub fn apply_file(
        &self,
        prepared: GatePolicy,
        file: FollowedVersion,
        who: &str,
    ) -> Result<Arc<GatePolicy>, PolicyError> {
        self.check_file(&prepared, file.version)?;
        let mut operator = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.current.load_full();
        let version = file.version.max(old.version + 1);
        let mine = Arc::new(GatePolicy { version, source: PolicySource::File, ..prepared });
        let live = self.capped(&mine, operator.cap)?;
        operator.policy = mine;
        operator.file = Some(file);
        self.publish(&old, live.clone(), who);
        Ok(live)
    }

    /// The live policy and a receiver of every later version, in order. A reader more than
    /// [`WATCH_BACKLOG`] changes behind loses the oldest (`Lagged`); versions show the gap.
    /// The receiver may also repeat versions up to the snapshot's; skip those.
    pub fn subscribe(&self) -> (Arc<GatePolicy>, broadcast::Receiver<Arc<GatePolicy>>) {
        let rx = self.changes.subscribe();
        (self.snapshot(), rx)
    }

    /// Applies an operator's `change` to the operator's policy: one atomic, versioned swap
    /// that batches pick up from the next one. Logs old → new and who, persists the
    /// operator's policy, notifies watchers. While the controller caps the budget below the
    /// new one, the live policy runs at the cap (source `controller`).
    pub fn change(
        &self,
        change: &PolicyChange,
        kind: ChangeKind,
        who: &str,
    ) -> Result<Arc<GatePolicy>, ChangeError> {
        let mut operator = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(file) = &operator.file {
            return Err(ChangeError::Managed(format!(
                "this server's policies follow the policy file {} (--policy-file): change the file, \
                 which every replica follows",
                file.path
            )));
        }
        let old = self.current.load_full();
        let proposed = change.apply(&operator.policy, kind)?;
        let resolved = self.resolve_budget(proposed)?;
        let mine =
            Arc::new(GatePolicy { version: old.version + 1, source: PolicySource::Operator, ..resolved });
        let live = self.capped(&mine, operator.cap)?;
        if let Some(path) = &self.persist {
            // Persist first: a policy that cannot be kept is not applied.
            let text = serde_json::to_string_pretty(&*mine)
                .map_err(|e| ChangeError::NotPersisted(format!("cannot serialise the policy: {e}")))?;
            let tmp = path.with_extension("json.tmp");
            std::fs::write(&tmp, text + "\n").and_then(|_| std::fs::rename(&tmp, path)).map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                ChangeError::NotPersisted(format!("cannot persist the policy to {}: {e}", path.display()))
            })?;
        }
        operator.policy = mine;
        self.publish(&old, live.clone(), who);
        Ok(live)
    }

    /// The adaptive controller's side: holds the live budget to `cap` while that is below the
    /// operator's budget (`None`, or a cap at or above it: the operator's policy). A new
    /// version (source `controller`) only when the live settings change; not persisted. A
    /// policy without a budget (thresholds) is never capped.
    pub fn cap_budget(&self, cap: Option<f64>, why: &str) -> Result<Option<Arc<GatePolicy>>, PolicyError> {
        let mut operator = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let derived = self.capped(&operator.policy, cap)?;
        operator.cap = cap;
        let old = self.current.load_full();
        if same_settings(&old, &derived) {
            return Ok(None);
        }
        let new = Arc::new(GatePolicy {
            version: old.version + 1,
            source: PolicySource::Controller,
            ..(*derived).clone()
        });
        self.publish(&old, new.clone(), why);
        Ok(Some(new))
    }

    /// The operator's policy (the controller's ceiling), whatever the controller does.
    pub fn operator_policy(&self) -> Arc<GatePolicy> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner()).policy.clone()
    }

    /// `policy` at the budget `cap` where that is below its own (same version; source
    /// `controller`), else `policy`.
    fn capped(&self, policy: &Arc<GatePolicy>, cap: Option<f64>) -> Result<Arc<GatePolicy>, PolicyError> {
        match (policy.budget, cap) {
            (Some(budget), Some(cap)) if cap < budget - 1e-9 => {
                let lower =
                    GatePolicy { budget: Some(cap), source: PolicySource::Controller, ..(**policy).clone() };
                Ok(Arc::new(self.resolve_budget(lower)?))
            }
            _ => Ok(policy.clone()),
        }
    }

    /// Makes `new` live, tells watchers and logs old → new.
    fn publish(&self, old: &GatePolicy, new: Arc<GatePolicy>, who: &str) {
        self.current.store(new.clone());
        // No receivers is not an error: nobody is watching.
        let _ = self.changes.send(new.clone());
        tracing::info!(
            who,
            source = new.source.as_str(),
            old_version = old.version,
            new_version = new.version,
            old = %serde_json::to_string(old).unwrap_or_default(),
            new = %serde_json::to_string(&*new).unwrap_or_default(),
            "gating policy changed"
        );
    }

    /// The live policy (one atomic load).
    pub fn snapshot(&self) -> Arc<GatePolicy> {
        self.current.load_full()
    }

    pub fn calibration(&self) -> Option<&CalibrationTable> {
        self.calibration.as_ref()
    }

    pub fn gate_ids(&self) -> &[String] {
        &self.gate_ids
    }

    /// Checks `policy` and, if it names a budget, fills its thresholds from the table.
    pub fn resolve_budget(&self, mut policy: GatePolicy) -> Result<GatePolicy, PolicyError> {
        if let Some(budget) = policy.budget {
            let table = self.calibration.as_ref().ok_or_else(|| {
                PolicyError("budget: this model has no calibration table; set thresholds instead".into())
            })?;
            let from_table = table.policy_for(budget)?;
            policy = GatePolicy {
                version: policy.version,
                overrides: policy.overrides,
                source: policy.source,
                ..from_table
            };
        }
        policy.validate(&self.gate_ids).map_err(|e| PolicyError(e.to_string()))?;
        Ok(policy)
    }

    /// What requests may ask for.
    pub fn bounds(&self) -> &RequestBounds {
        &self.bounds
    }

    /// The policy one request runs under: the live one, or the live one adjusted by the
    /// request's parameters within the operator's [`RequestBounds`] (same version; the
    /// response says it was overridden).
    pub fn for_request(&self, req: &PolicyRequest) -> Result<Arc<GatePolicy>, PolicyError> {
        let live = self.snapshot();
        if req.is_empty() {
            return Ok(live);
        }
        let bounds = &self.bounds;
        let thresholds =
            req.channel_threshold.is_some() || req.block_threshold.is_some() || req.exit_threshold.is_some();
        if thresholds && !bounds.allow_thresholds {
            return Err(PolicyError(
                "sluice_*_threshold: this model does not let requests set gate thresholds \
                 (requests.allow_thresholds = false); ask for a sluice_budget"
                    .into(),
            ));
        }
        if req.channel_mode.is_some() && !bounds.allow_channel_mode {
            return Err(PolicyError(
                "sluice_channel_mode: this model does not let requests choose the channel mode \
                 (requests.allow_channel_mode = false)"
                    .into(),
            ));
        }
        let mut p = GatePolicy { overrides: live.overrides.clone(), ..(*live).clone() };
        if let Some(b) = req.budget {
            if let Some(floor) = bounds.min_budget
                && b < floor
            {
                return Err(PolicyError(format!(
                    "sluice_budget: {b} is below this model's minimum request budget {floor}"
                )));
            }
            if b > bounds.max_budget {
                return Err(PolicyError(format!(
                    "sluice_budget: {b} is above this model's maximum request budget {}",
                    bounds.max_budget
                )));
            }
            p = GatePolicy { budget: Some(b), version: live.version, ..p };
            p = self.resolve_budget(p)?;
        } else {
            p.budget = None;
            if let Some(t) = req.channel_threshold {
                p.channel_threshold = t;
            }
            if let Some(t) = req.block_threshold {
                p.block_threshold = t;
            }
            if let Some(t) = req.exit_threshold {
                p.exit_threshold = t;
            }
            if let (Some(floor), Some(table)) = (bounds.min_budget, &self.calibration) {
                // Thresholds may not go below the floor's operating point.
                let floor_p = table.policy_for(floor)?;
                if p.channel_threshold > floor_p.channel_threshold
                    || p.block_threshold > floor_p.block_threshold
                    || p.exit_threshold < floor_p.exit_threshold
                {
                    return Err(PolicyError(format!(
                        "thresholds ask for less compute than this model's minimum request budget {floor} allows"
                    )));
                }
            }
        }
        if let Some(mode) = req.channel_mode {
            p.channel_mode = mode;
        }
        p.validate(&self.gate_ids).map_err(|e| PolicyError(e.to_string()))?;
        Ok(Arc::new(p))
    }
}

/// Whether two policies run the same (everything but version and source equal).
fn same_settings(a: &GatePolicy, b: &GatePolicy) -> bool {
    GatePolicy { version: 0, source: PolicySource::Config, ..a.clone() }
        == GatePolicy { version: 0, source: PolicySource::Config, ..b.clone() }
}

/// Parses a channel mode name.
pub fn parse_mode(s: &str) -> Result<ChannelMode, PolicyError> {
    match s {
        "slice" => Ok(ChannelMode::Slice),
        "select" => Ok(ChannelMode::Select),
        other => Err(PolicyError(format!("channel_mode: `{other}` is not slice or select"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> PolicyStore {
        PolicyStore::new(GatePolicy::dense(), None, vec!["layer1.1.block".into()], RequestBounds::default())
            .unwrap()
    }

    fn calibrated(initial: GatePolicy) -> PolicyStore {
        use crate::control::calibration::{BudgetEntry, CalibrationTable, OperatingPoint};
        let entry = |budget: f64, t: f32| BudgetEntry {
            budget,
            point: OperatingPoint {
                channel_threshold: t,
                block_threshold: t,
                exit_threshold: 1.0,
                validation_accuracy: 0.9,
                flop_fraction: budget,
                flop_fraction_stderr: 0.0,
            },
            latency_ratio: None,
        };
        let table = CalibrationTable {
            model: "m".into(),
            split: "validation".into(),
            images: 0,
            channel_mode: ChannelMode::Slice,
            flops_confidence: 0.0,
            budgets: vec![entry(0.3, 0.9), entry(0.5, 0.5), entry(1.0, 0.0)],
            frontier: Vec::new(),
        };
        PolicyStore::new(initial, Some(table), Vec::new(), RequestBounds::default()).unwrap()
    }

    #[test]
    fn a_policy_file_rules_the_operators_policy_with_its_own_versions() {
        let initial =
            GatePolicy { budget: Some(1.0), version: 4, source: PolicySource::File, ..GatePolicy::dense() };
        let followed = |version: u64| FollowedVersion {
            path: "/etc/sluice/policy.toml".into(),
            version,
            sha256: format!("digest of {version}"),
        };
        let s = calibrated(initial).follow_file(followed(4));
        assert_eq!((s.snapshot().version, s.file()), (4, Some(followed(4))));
        // The control API may not change it, and says where the policy comes from.
        let budget = |b: f64| PolicyChange { budget: Some(b), ..Default::default() };
        match s.change(&budget(0.5), ChangeKind::Patch, "op") {
            Err(ChangeError::Managed(m)) => assert!(m.contains("/etc/sluice/policy.toml"), "{m}"),
            other => panic!("{other:?}"),
        }
        // A file entry replaces the policy; the file's version becomes the policy's.
        let p = s.prepare_file(Some(&budget(0.5)), &GatePolicy::dense()).unwrap();
        let live = s.apply_file(p, followed(9), "file").unwrap();
        assert_eq!(s.file(), Some(followed(9)));
        assert_eq!((live.version, live.budget, live.source), (9, Some(0.5), PolicySource::File));
        assert_eq!(live.channel_threshold, 0.5, "resolved through the table");
        // A model the file does not name runs its config's policy.
        let p = s.prepare_file(None, &GatePolicy::with_thresholds(0.2, 0.2, 1.0)).unwrap();
        assert_eq!((p.budget, p.channel_threshold), (None, 0.2));
        // Versions must rise; invalid entries are refused before anything changes.
        let again = s.prepare_file(Some(&budget(0.3)), &GatePolicy::dense()).unwrap();
        assert!(
            s.apply_file(again.clone(), followed(9), "file")
                .unwrap_err()
                .0
                .contains("not above the version applied, 9")
        );
        assert!(s.prepare_file(Some(&budget(1.5)), &GatePolicy::dense()).unwrap_err().0.contains("budget"));
        assert_eq!(s.snapshot().version, 9);
        // The controller still caps it; the next file version lands above the controller's.
        s.cap_budget(Some(0.3), "load").unwrap().unwrap();
        assert_eq!(s.snapshot().version, 10);
        let live = s.apply_file(again, followed(10), "file").unwrap();
        assert_eq!((live.version, live.budget), (11, Some(0.3)), "one more than the live version");
        // A store that follows no file refuses file policies.
        assert!(store().apply_file(GatePolicy::dense(), followed(2), "file").is_err());
    }

    #[test]
    fn the_controller_caps_the_operators_budget_and_never_changes_it() {
        let s = calibrated(GatePolicy { budget: Some(1.0), ..GatePolicy::dense() });
        let (_, mut rx) = s.subscribe();
        let capped = s.cap_budget(Some(0.5), "test").unwrap().unwrap();
        assert_eq!((capped.version, capped.budget, capped.source), (2, Some(0.5), PolicySource::Controller));
        assert_eq!(capped.channel_threshold, 0.5, "resolved through the table");
        assert_eq!(s.operator_policy().budget, Some(1.0));
        assert!(s.cap_budget(Some(0.5), "again").unwrap().is_none(), "no version without a change");
        // The operator raises the budget under the cap: theirs is kept, the cap stays live.
        let budget = |b: f64| PolicyChange { budget: Some(b), ..Default::default() };
        let live = s.change(&budget(0.8), ChangeKind::Patch, "op").unwrap();
        assert_eq!((live.version, live.budget, live.source), (3, Some(0.5), PolicySource::Controller));
        assert_eq!(
            (s.operator_policy().budget, s.operator_policy().source),
            (Some(0.8), PolicySource::Operator)
        );
        // ... lowers it below the cap: the operator's budget is live.
        let live = s.change(&budget(0.3), ChangeKind::Patch, "op").unwrap();
        assert_eq!((live.budget, live.source), (Some(0.3), PolicySource::Operator));
        assert!(s.cap_budget(None, "release").unwrap().is_none(), "nothing capped, nothing changes");
        // Released above it: the operator's budget comes back as a controller version.
        s.change(&budget(1.0), ChangeKind::Patch, "op").unwrap();
        s.cap_budget(Some(0.5), "load").unwrap().unwrap();
        let back = s.cap_budget(None, "calm").unwrap().unwrap();
        assert_eq!(
            (back.budget, back.channel_threshold, back.source),
            (Some(1.0), 0.0, PolicySource::Controller)
        );
        // Thresholds are never capped.
        let thresholds = PolicyChange { block_threshold: Some(0.4), ..Default::default() };
        s.change(&thresholds, ChangeKind::Patch, "op").unwrap();
        assert!(s.cap_budget(Some(0.3), "load").unwrap().is_none());
        assert_eq!(s.snapshot().budget, None);
        let seen: Vec<u64> = std::iter::from_fn(|| rx.try_recv().ok()).map(|p| p.version).collect();
        assert_eq!(seen, (2..=s.snapshot().version).collect::<Vec<_>>(), "watchers see every version");
    }

    #[test]
    fn watchers_see_every_change_in_order_and_a_slow_one_loses_only_the_oldest() {
        let s = store();
        let (_, mut rx) = s.subscribe();
        let patch = |t: f32| PolicyChange { block_threshold: Some(t), ..Default::default() };
        for i in 0..3 {
            s.change(&patch(0.1 * (i + 1) as f32), ChangeKind::Patch, "t").unwrap();
        }
        let seen: Vec<u64> = std::iter::from_fn(|| rx.try_recv().ok()).map(|p| p.version).collect();
        assert_eq!(seen, [2, 3, 4], "rapid changes are not coalesced");
        let (_, mut slow) = s.subscribe();
        for _ in 0..WATCH_BACKLOG + 5 {
            s.change(&patch(0.5), ChangeKind::Patch, "t").unwrap();
        }
        assert!(matches!(slow.try_recv(), Err(broadcast::error::TryRecvError::Lagged(5))));
        let kept: Vec<u64> = std::iter::from_fn(|| slow.try_recv().ok()).map(|p| p.version).collect();
        assert_eq!(kept.len(), WATCH_BACKLOG);
        assert_eq!(kept.last().copied(), Some(s.snapshot().version));
    }

    #[test]
    fn changes_are_versioned_swaps_that_validate_fields() {
        let s = store();
        let (now, mut rx) = s.subscribe();
        assert_eq!((now.version, s.snapshot().version), (1, 1));
        let change = PolicyChange { block_threshold: Some(0.4), ..Default::default() };
        let v2 = s.change(&change, ChangeKind::Patch, "test").unwrap();
        assert_eq!((v2.version, v2.block_threshold), (2, 0.4));
        assert_eq!(rx.try_recv().unwrap().version, 2);
        let v3 = s
            .change(
                &PolicyChange { exit_threshold: Some(0.9), ..Default::default() },
                ChangeKind::Replace,
                "t",
            )
            .unwrap();
        assert_eq!((v3.block_threshold, v3.exit_threshold), (0.0, 0.9), "replace resets unset fields");
        let unknown = PolicyChange {
            overrides: Some([("layer9.0.block".to_string(), 0.5)].into()),
            ..Default::default()
        };
        assert!(
            s.change(&unknown, ChangeKind::Patch, "t")
                .unwrap_err()
                .to_string()
                .contains("unknown gate `layer9.0.block`")
        );
        let range = PolicyChange { channel_threshold: Some(1.5), ..Default::default() };
        assert!(
            s.change(&range, ChangeKind::Patch, "t")
                .unwrap_err()
                .to_string()
                .contains("channel_threshold: 1.5")
        );
        let budget = PolicyChange { budget: Some(0.5), ..Default::default() };
        assert!(
            s.change(&budget, ChangeKind::Patch, "t")
                .unwrap_err()
                .to_string()
                .contains("no calibration table")
        );
        assert_eq!(s.snapshot().version, 3, "refused changes leave the policy alone");
    }
}
