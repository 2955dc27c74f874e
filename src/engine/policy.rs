//! The gating policy: thresholds per gate kind, per-gate overrides and the channel mode. An
//! immutable, versioned value; the engine takes one snapshot per batch.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::EngineError;

/// How a channel gate's kept channels are computed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelMode {
    /// The kept count rounded up to an allowed width; the leading channels, on pre-sliced
    /// contiguous weights (fast).
    #[default]
    Slice,
    /// Exactly the kept set, gathered per input (FBS-faithful).
    Select,
}

impl std::str::FromStr for ChannelMode {
    type Err = String;

    /// `slice` or `select`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "slice" => Ok(ChannelMode::Slice),
            "select" => Ok(ChannelMode::Select),
            other => Err(format!("unknown channel mode `{other}` (slice or select)")),
        }
    }
}

/// Thresholds and mode of the gates. Threshold semantics (DESIGN.md):
/// channel: keep channels with saliency ≥ t; block: run the residual branch iff score ≥ t;
/// exit: leave at an exit iff its max softmax ≥ t. A threshold of 1 or more means the
/// minimum for channels and blocks (keep none / skip) and disables exits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatePolicy {
    /// Increases with every change; responses name the version they used.
    pub version: u64,
    pub channel_threshold: f32,
    pub block_threshold: f32,
    pub exit_threshold: f32,
    pub channel_mode: ChannelMode,
    /// Per-gate thresholds by gate id (`layer2.1.channel`, `layer2.1.block`, `exit1`).
    pub overrides: BTreeMap<String, f32>,
    /// The compute budget these thresholds came from, if any (fraction of dense FLOPs).
    pub budget: Option<f64>,
    /// Who made this version (a label for responses, logs and watchers; the engine ignores it).
    #[serde(skip_serializing_if = "PolicySource::is_config")]
    pub source: PolicySource,
}

/// Who made a policy version.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicySource {
    /// The model's `config.toml` at start.
    #[default]
    Config,
    /// The policy persisted by an earlier run (`policy.json`) at start.
    Persisted,
    /// An operator, through the control API.
    Operator,
    /// The adaptive budget controller (a lower budget than the operator's, under load).
    Controller,
    /// The fleet's policy file (`sluice serve --policy-file`).
    File,
}

impl PolicySource {
    pub fn is_config(&self) -> bool {
        *self == PolicySource::Config
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PolicySource::Config => "config",
            PolicySource::Persisted => "persisted",
            PolicySource::Operator => "operator",
            PolicySource::Controller => "controller",
            PolicySource::File => "file",
        }
    }
}

impl Default for GatePolicy {
    fn default() -> Self {
        GatePolicy::dense()
    }
}

impl GatePolicy {
    /// Every gate open and exits disabled: the dense network's outputs.
    pub fn dense() -> Self {
        GatePolicy {
            version: 0,
            channel_threshold: 0.0,
            block_threshold: 0.0,
            exit_threshold: 1.0,
            channel_mode: ChannelMode::Slice,
            overrides: BTreeMap::new(),
            budget: None,
            source: PolicySource::Config,
        }
    }

    /// The same thresholds for every gate kind (exits keep their own).
    pub fn with_thresholds(channel: f32, block: f32, exit: f32) -> Self {
        GatePolicy {
            channel_threshold: channel,
            block_threshold: block,
            exit_threshold: exit,
            ..Self::dense()
        }
    }

    /// The threshold for gate `id` of a kind whose default is `default`.
    pub fn threshold(&self, id: &str, default: f32) -> f32 {
        self.overrides.get(id).copied().unwrap_or(default)
    }

    /// Checks ranges and that every override names a gate in `gate_ids`.
    pub fn validate(&self, gate_ids: &[String]) -> Result<(), EngineError> {
        let check = |field: &str, v: f32| {
            if v.is_finite() && (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(EngineError::InvalidPolicy(format!("{field}: {v} is outside [0, 1]")))
            }
        };
        check("channel_threshold", self.channel_threshold)?;
        check("block_threshold", self.block_threshold)?;
        check("exit_threshold", self.exit_threshold)?;
        for (id, &t) in &self.overrides {
            if !gate_ids.iter().any(|g| g == id) {
                let known = if gate_ids.is_empty() {
                    "this model has no gates".to_string()
                } else {
                    gate_ids.join(", ")
                };
                return Err(EngineError::InvalidPolicy(format!(
                    "overrides: unknown gate `{id}` (known: {known})"
                )));
            }
            check(&format!("overrides.{id}"), t)?;
        }
        if let Some(b) = self.budget
            && !(b > 0.0 && b <= 1.0)
        {
            return Err(EngineError::InvalidPolicy(format!("budget: {b} is outside (0, 1]")));
        }
        Ok(())
    }
}

/// Whether a saliency/score passes a threshold (see [`GatePolicy`]).
#[inline]
pub fn passes(score: f32, threshold: f32) -> bool {
    threshold < 1.0 && score >= threshold
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_field() {
        let ids = vec!["layer1.0.channel".to_string(), "exit1".to_string()];
        let mut p = GatePolicy::dense();
        p.block_threshold = 1.5;
        assert!(p.validate(&ids).unwrap_err().to_string().contains("block_threshold: 1.5"));
        let mut p = GatePolicy::dense();
        p.overrides.insert("layer9.0.block".into(), 0.5);
        let err = p.validate(&ids).unwrap_err().to_string();
        assert!(err.contains("unknown gate `layer9.0.block`") && err.contains("exit1"), "{err}");
        let mut p = GatePolicy::dense();
        p.overrides.insert("exit1".into(), 0.9);
        assert!(p.validate(&ids).is_ok());
        assert_eq!(p.threshold("exit1", 1.0), 0.9);
    }

    #[test]
    fn threshold_zero_passes_everything_and_one_nothing() {
        assert!(passes(0.0, 0.0));
        assert!(!passes(1.0, 1.0));
        assert!(passes(0.7, 0.5) && !passes(0.3, 0.5));
    }
}
