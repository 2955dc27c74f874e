//! The live gating policy of one model: an immutable, versioned value swapped atomically
//! (`arc-swap`). Each batch takes one snapshot, so no request ever sees half a policy; a
//! request may ask for its own budget or thresholds, capped by the operator's floor.

use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use super::calibration::{BudgetError, CalibrationTable};
use crate::engine::{ChannelMode, GatePolicy};

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

impl From<BudgetError> for PolicyError {
    fn from(e: BudgetError) -> Self {
        PolicyError(format!("budget: {e}"))
    }
}

/// The live policy of a model, its calibration table and its limits.
pub struct PolicyStore {
    current: ArcSwap<GatePolicy>,
    calibration: Option<CalibrationTable>,
    gate_ids: Vec<String>,
    /// Requests may not ask for less compute than this budget (operator-set floor).
    min_request_budget: Option<f64>,
    /// Serialises changes so versions increase one at a time.
    writer: Mutex<()>,
}

impl PolicyStore {
    /// A store starting at `initial` (a budget in it is resolved through the table).
    pub fn new(
        initial: GatePolicy,
        calibration: Option<CalibrationTable>,
        gate_ids: Vec<String>,
        min_request_budget: Option<f64>,
    ) -> Result<Self, PolicyError> {
        let store = PolicyStore {
            current: ArcSwap::from_pointee(GatePolicy::dense()),
            calibration,
            gate_ids,
            min_request_budget,
            writer: Mutex::new(()),
        };
        let resolved = store.resolve_budget(initial)?;
        store.current.store(Arc::new(GatePolicy { version: resolved.version.max(1), ..resolved }));
        Ok(store)
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
            policy = GatePolicy { version: policy.version, overrides: policy.overrides, ..from_table };
        }
        policy.validate(&self.gate_ids).map_err(|e| PolicyError(e.to_string()))?;
        Ok(policy)
    }

    /// Installs `policy` as the next version; returns (old, new).
    pub fn replace(&self, policy: GatePolicy) -> Result<(Arc<GatePolicy>, Arc<GatePolicy>), PolicyError> {
        let _turn = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.current.load_full();
        let resolved = self.resolve_budget(policy)?;
        let new = Arc::new(GatePolicy { version: old.version + 1, ..resolved });
        self.current.store(new.clone());
        Ok((old, new))
    }

    /// The policy one request runs under: the live one, or the live one adjusted by the
    /// request's parameters (same version; the response says it was overridden).
    pub fn for_request(&self, req: &PolicyRequest) -> Result<Arc<GatePolicy>, PolicyError> {
        let live = self.snapshot();
        if req.is_empty() {
            return Ok(live);
        }
        let mut p = GatePolicy { overrides: live.overrides.clone(), ..(*live).clone() };
        if let Some(b) = req.budget {
            if let Some(floor) = self.min_request_budget
                && b < floor
            {
                return Err(PolicyError(format!(
                    "sluice_budget: {b} is below this server's minimum request budget {floor}"
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
            if let (Some(floor), Some(table)) = (self.min_request_budget, &self.calibration) {
                // Thresholds may not go below the floor's operating point.
                let floor_p = table.policy_for(floor)?;
                if p.channel_threshold > floor_p.channel_threshold
                    || p.block_threshold > floor_p.block_threshold
                    || p.exit_threshold < floor_p.exit_threshold
                {
                    return Err(PolicyError(format!(
                        "thresholds ask for less compute than this server's minimum request budget {floor} allows"
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

/// Whether a mode string names a channel mode.
pub fn parse_mode(s: &str) -> Option<ChannelMode> {
    match s {
        "slice" => Some(ChannelMode::Slice),
        "select" => Some(ChannelMode::Select),
        _ => None,
    }
}
