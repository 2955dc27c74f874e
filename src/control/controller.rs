//! The adaptive budget controller: trades compute for latency under load instead of
//! rejecting requests. Every tick it predicts, for each calibrated budget level, the latency
//! percentile the objective names under the load just measured, and picks the highest budget
//! whose prediction meets the target — never above the operator's budget (the ceiling), never
//! below the objective's floor. Pure logic: the serving core feeds it measurements and turns
//! its decisions into policy versions (source "controller"); docs/controller.md has the
//! method and why it does not oscillate.
//!
//! The prediction, per level `i` with per-image compute `s_i` seconds, `c` engines, mean
//! batch size `b`, arrival rate `λ` and `q` images queued now:
//!
//! - utilisation `ρ = λ · s_i / c`; at `ρ ≥` [`MAX_UTILISATION`] the level cannot keep up;
//! - latency = backlog drain `q · s_i / c` + one batch `b · s_i` + queueing wait, whose mean
//!   is Pollaczek–Khinchine's for deterministic service (`ρ / (1 − ρ) · s_i / 2` for one
//!   engine; `c` engines are treated as one `c` times as fast, `s_i / c` — an approximation
//!   the correction below absorbs), and whose tail is taken as exponential
//!   (`× ln(1 / (1 − p))` for percentile `p`);
//! - times a correction factor learned from the measured percentile at the live level
//!   (clamped to [0.5, 4]), so a model that predicts too little — or far too much — is
//!   corrected within a few ticks.
//!
//! `λ` and `q` are moving averages over ticks: one tick's Poisson count is too noisy to act
//! on (±10% at 100 arrivals).
//!
//! `s_i` is learned per level from the batches the engines ran (moving average); a level not
//! run yet is scaled from the nearest one that was by its FLOP fraction plus a fixed overhead
//! share ([`FIXED_COST_SHARE`]), since small batches do not get cheaper in proportion.

use serde::{Deserialize, Serialize};

use super::calibration::CalibrationTable;

/// Utilisation above which a level counts as unable to keep up.
pub const MAX_UTILISATION: f64 = 0.95;
/// Share of a batch's compute that does not shrink with FLOPs, for levels not measured yet.
pub const FIXED_COST_SHARE: f64 = 0.3;
/// A higher budget is taken back only when its prediction is this fraction of the target or
/// less (the hysteresis band that keeps the controller from flapping at a steady load).
pub const RAISE_HEADROOM: f64 = 0.75;
/// Consecutive ticks a higher level must qualify for before it is taken (the default).
pub const DEFAULT_HOLD_TICKS: u32 = 5;
/// Weight of the newest sample in the moving averages.
const SMOOTHING: f64 = 0.3;
/// The tick of `[controller]` by default, and its allowed range (ms).
pub const DEFAULT_TICK_MS: u64 = 100;
pub const TICK_MS_RANGE: (u64, u64) = (10, 10_000);
/// The floor when the objective names none: at most this many points of calibrated accuracy.
pub const DEFAULT_MAX_ACCURACY_DROP: f64 = 1.0;
/// The largest latency target accepted (ms): a longer one is a mistake, not an objective.
pub const MAX_TARGET_MS: f64 = 600_000.0;

/// `[controller]` of a model's `config.toml`, and what the control API reads and changes:
/// the latency objective and whether the adaptive budget controller pursues it. Off by
/// default; `tick_ms` and `hold_ticks` are read at load only.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControllerConfig {
    pub enabled: bool,
    pub percentile: Percentile,
    /// The latency target in ms (required to enable the controller).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_ms: Option<f64>,
    /// The floor as the largest calibrated accuracy drop accepted, in percentage points of
    /// the dense accuracy (default [`DEFAULT_MAX_ACCURACY_DROP`] when no floor is named).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_accuracy_drop: Option<f64>,
    /// The floor as an explicit budget (instead of `max_accuracy_drop`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_budget: Option<f64>,
    pub tick_ms: u64,
    pub hold_ticks: u32,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            enabled: false,
            percentile: Percentile::P99,
            target_ms: None,
            max_accuracy_drop: None,
            min_budget: None,
            tick_ms: DEFAULT_TICK_MS,
            hold_ticks: DEFAULT_HOLD_TICKS,
        }
    }
}

impl ControllerConfig {
    pub fn is_default(&self) -> bool {
        *self == ControllerConfig::default()
    }

    /// The objective (`None`: no target set), checked field by field.
    pub fn objective(&self) -> Result<Option<Objective>, ControllerError> {
        let (lo, hi) = TICK_MS_RANGE;
        if !(lo..=hi).contains(&self.tick_ms) {
            return Err(ControllerError::Setting(format!(
                "controller.tick_ms must be within [{lo}, {hi}], got {}",
                self.tick_ms
            )));
        }
        if !(1..=1000).contains(&self.hold_ticks) {
            return Err(ControllerError::Setting(format!(
                "controller.hold_ticks must be within [1, 1000], got {}",
                self.hold_ticks
            )));
        }
        let floor = match (self.max_accuracy_drop, self.min_budget) {
            (Some(_), Some(_)) => {
                return Err(ControllerError::Floor(
                    "set controller.max_accuracy_drop or controller.min_budget, not both".into(),
                ));
            }
            (Some(points), None) => Floor::MaxAccuracyDrop(points),
            (None, Some(budget)) => Floor::MinBudget(budget),
            (None, None) => Floor::MaxAccuracyDrop(DEFAULT_MAX_ACCURACY_DROP),
        };
        check_floor(floor)?;
        match self.target_ms {
            None if self.enabled => Err(ControllerError::Setting(
                "controller.target_ms: required to enable the controller (the latency objective in ms)"
                    .into(),
            )),
            None => Ok(None),
            Some(t) if !(t.is_finite() && t > 0.0 && t <= MAX_TARGET_MS) => Err(ControllerError::Target(t)),
            Some(target_ms) => Ok(Some(Objective { percentile: self.percentile, target_ms, floor })),
        }
    }
}

/// A change to [`ControllerConfig`] through the control API (HTTP `PUT`/`PATCH` body, gRPC,
/// `sluice ctl controller`). Naming one floor clears the other.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerChange {
    pub enabled: Option<bool>,
    pub percentile: Option<Percentile>,
    pub target_ms: Option<f64>,
    pub max_accuracy_drop: Option<f64>,
    pub min_budget: Option<f64>,
    /// Who asks (recorded in the log).
    pub actor: Option<String>,
}

impl ControllerChange {
    /// The settings this change makes from `current`: `replace` starts from the defaults
    /// (keeping the load-time `tick_ms` and `hold_ticks`), else unset fields keep their values.
    pub fn apply(&self, current: &ControllerConfig, replace: bool) -> ControllerConfig {
        let mut c = if replace {
            ControllerConfig {
                tick_ms: current.tick_ms,
                hold_ticks: current.hold_ticks,
                ..Default::default()
            }
        } else {
            current.clone()
        };
        if let Some(enabled) = self.enabled {
            c.enabled = enabled;
        }
        if let Some(p) = self.percentile {
            c.percentile = p;
        }
        if let Some(t) = self.target_ms {
            c.target_ms = Some(t);
        }
        if self.max_accuracy_drop.is_some() || self.min_budget.is_some() {
            c.max_accuracy_drop = self.max_accuracy_drop;
            c.min_budget = self.min_budget;
        }
        c
    }
}

/// The calibration table's rows as the controller's levels.
pub fn levels(table: &CalibrationTable) -> Vec<Level> {
    table
        .budgets
        .iter()
        .map(|e| Level {
            budget: e.budget,
            accuracy: e.point.validation_accuracy,
            flop_fraction: e.point.flop_fraction,
        })
        .collect()
}

/// Which latency percentile the objective bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Percentile {
    P95,
    P99,
}

impl std::str::FromStr for Percentile {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "p95" => Ok(Percentile::P95),
            "p99" => Ok(Percentile::P99),
            other => Err(format!("percentile: `{other}` is not p95 or p99")),
        }
    }
}

impl Percentile {
    pub fn as_str(self) -> &'static str {
        match self {
            Percentile::P95 => "p95",
            Percentile::P99 => "p99",
        }
    }

    /// The quantile, 0.95 or 0.99.
    pub fn quantile(self) -> f64 {
        match self {
            Percentile::P95 => 0.95,
            Percentile::P99 => 0.99,
        }
    }

    /// `ln(1 / (1 − p))`: how many mean waits the percentile of an exponential tail lies at.
    fn tail(self) -> f64 {
        (1.0 / (1.0 - self.quantile())).ln()
    }
}

/// The lowest budget the controller may choose, as an operator states it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Floor {
    /// The largest drop in calibrated accuracy accepted, in percentage points of the dense
    /// (budget 1.0) accuracy.
    MaxAccuracyDrop(f64),
    /// An explicit minimum budget.
    MinBudget(f64),
}

/// The latency objective of one model.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Objective {
    pub percentile: Percentile,
    /// The target, in milliseconds.
    pub target_ms: f64,
    pub floor: Floor,
}

/// One calibrated operating level (a row of the calibration table).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Level {
    pub budget: f64,
    /// Validation accuracy (0–1).
    pub accuracy: f64,
    /// Mean executed FLOPs / dense.
    pub flop_fraction: f64,
}

/// What the server measured since the last tick.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Load {
    /// Images arriving per second.
    pub arrival_rate: f64,
    /// Images waiting now.
    pub queued: usize,
    /// The objective's percentile of the end-to-end latency of requests completed since the
    /// last tick, in ms, if enough completed to say.
    pub measured_ms: Option<f64>,
}

/// One decision.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Decision {
    /// The budget to run at.
    pub budget: f64,
    /// Predicted percentile latency at that budget, ms (infinite: it cannot keep up).
    pub predicted_ms: f64,
    /// Whether the budget is the floor and the floor is below the ceiling (running at the
    /// operator's own budget is not "at the floor", even where the two coincide).
    pub at_floor: bool,
    /// Whether even the floor is predicted to miss the target (admission control sheds).
    pub cannot_meet: bool,
    /// Whether the budget differs from the previous tick's.
    pub changed: bool,
}

/// The controller of one model.
#[derive(Clone, Debug)]
pub struct Controller {
    levels: Vec<Level>,
    objective: Objective,
    /// The objective's floor level (the floor in force is never above the ceiling).
    objective_floor: usize,
    /// Indices into `levels` of the lowest and highest level allowed.
    floor: usize,
    ceiling: usize,
    current: usize,
    engines: usize,
    /// Per level: moving average of compute seconds per image, once measured.
    per_image: Vec<Option<f64>>,
    /// Moving average of images per batch (decaying to 1 over ticks without batches: a
    /// request arriving at an idle server runs alone).
    batch: f64,
    /// Whether a batch was observed since the last tick.
    batch_seen: bool,
    /// Measured / predicted at the live level, moving average, clamped to [0.5, 4].
    correction: f64,
    /// Moving averages of the arrival rate and the queue depth.
    rate: f64,
    queued: f64,
    /// Consecutive ticks a higher level has qualified for.
    calm: u32,
    /// Whether the last tick changed the level (its measurement still reflects the old one).
    just_changed: bool,
    /// Ticks a higher level must qualify before it is taken.
    hold: u32,
}

/// Why a controller cannot be built.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ControllerError {
    #[error("the model has no calibration table: the controller chooses among calibrated budgets")]
    NotCalibrated,
    #[error("controller.target_ms must be a positive number of milliseconds up to 600000, got {0}")]
    Target(f64),
    #[error("{0}")]
    Floor(String),
    #[error("{0}")]
    Setting(String),
    #[error("the calibration table's budgets must ascend, with finite accuracy and FLOP fractions")]
    Levels,
}

impl Controller {
    /// A controller over `levels` (ascending budgets; the last is the dense network, 1.0),
    /// starting at the operator's `ceiling` budget, for `engines` engine threads that take
    /// `hold` calm ticks before giving budget back.
    pub fn new(
        levels: Vec<Level>,
        objective: Objective,
        ceiling: f64,
        engines: usize,
        hold: u32,
    ) -> Result<Self, ControllerError> {
        if levels.is_empty() {
            return Err(ControllerError::NotCalibrated);
        }
        if !(objective.target_ms.is_finite() && objective.target_ms > 0.0) {
            return Err(ControllerError::Target(objective.target_ms));
        }
        if levels.windows(2).any(|w| w[0].budget >= w[1].budget)
            || levels.iter().any(|l| !(l.flop_fraction.is_finite() && l.accuracy.is_finite()))
        {
            return Err(ControllerError::Levels);
        }
        let ceiling = index_at_or_below(&levels, ceiling);
        let objective_floor = floor_index(&levels, objective.floor)?;
        Ok(Controller {
            objective_floor,
            floor: objective_floor.min(ceiling),
            per_image: vec![None; levels.len()],
            levels,
            objective,
            ceiling,
            current: ceiling,
            engines: engines.max(1),
            batch: 1.0,
            batch_seen: false,
            correction: 1.0,
            rate: 0.0,
            queued: 0.0,
            calm: 0,
            just_changed: false,
            hold,
        })
    }

    /// The operator changed the budget: the new ceiling (and the live level if above it).
    /// A budget below the lowest calibrated level is the lowest level. The floor is the
    /// objective's again wherever the ceiling allows it.
    pub fn set_ceiling(&mut self, budget: f64) {
        self.ceiling = index_at_or_below(&self.levels, budget);
        self.floor = self.objective_floor.min(self.ceiling);
        self.current = self.current.clamp(self.floor, self.ceiling);
    }

    /// The budget the floor maps to.
    pub fn floor_budget(&self) -> f64 {
        self.levels[self.floor].budget
    }

    pub fn ceiling_budget(&self) -> f64 {
        self.levels[self.ceiling].budget
    }

    pub fn budget(&self) -> f64 {
        self.levels[self.current].budget
    }

    pub fn objective(&self) -> &Objective {
        &self.objective
    }

    /// Calibrated accuracy at `budget`'s level.
    pub fn accuracy_at(&self, budget: f64) -> f64 {
        self.levels[index_at_or_below(&self.levels, budget)].accuracy
    }

    /// A batch of `images` ran at `budget` in `seconds` of compute.
    pub fn observe_batch(&mut self, budget: f64, images: usize, seconds: f64) {
        if images == 0 || !(seconds.is_finite() && seconds >= 0.0) {
            return;
        }
        let i = index_at_or_below(&self.levels, budget);
        let sample = seconds / images as f64;
        self.per_image[i] = Some(self.per_image[i].map_or(sample, |s| s + SMOOTHING * (sample - s)));
        self.batch += SMOOTHING * (images as f64 - self.batch);
        self.batch_seen = true;
    }

    /// Seconds of compute per image at level `i`: measured, else scaled from the nearest
    /// measured level, else unknown.
    fn per_image_at(&self, i: usize) -> Option<f64> {
        if let Some(s) = self.per_image[i] {
            return Some(s);
        }
        let nearest =
            (0..self.levels.len()).filter(|&j| self.per_image[j].is_some()).min_by_key(|&j| j.abs_diff(i))?;
        let cost = |j: usize| FIXED_COST_SHARE + (1.0 - FIXED_COST_SHARE) * self.levels[j].flop_fraction;
        Some(self.per_image[nearest]? * cost(i) / cost(nearest))
    }

    /// Predicted percentile latency (ms) at level `i` under the smoothed load, before
    /// correction; infinite where the level cannot keep up, `None` with nothing measured yet.
    fn raw_prediction(&self, i: usize) -> Option<f64> {
        let s = self.per_image_at(i)?;
        let c = self.engines as f64;
        let rho = self.rate * s / c;
        if rho >= MAX_UTILISATION {
            return Some(f64::INFINITY);
        }
        let batch = self.batch.max(1.0) * s;
        let backlog = self.queued * s / c;
        let wait = rho / (1.0 - rho) * (s / c) / 2.0 * self.objective.percentile.tail();
        Some((backlog + batch + wait) * 1e3)
    }

    /// Corrected prediction at level `i` (ms).
    pub fn predicted_ms(&self, i: usize) -> Option<f64> {
        self.raw_prediction(i).map(|p| p * self.correction)
    }

    /// One tick: folds `load` into the moving averages, learns from `load.measured_ms`, then
    /// decides.
    pub fn tick(&mut self, load: &Load) -> Decision {
        let previous = self.current;
        self.rate += SMOOTHING * (load.arrival_rate.max(0.0) - self.rate);
        self.queued += SMOOTHING * (load.queued as f64 - self.queued);
        if !std::mem::take(&mut self.batch_seen) {
            self.batch += SMOOTHING * (1.0 - self.batch);
        }
        if let (Some(measured), Some(predicted)) = (load.measured_ms, self.raw_prediction(self.current))
            && !self.just_changed
            && measured.is_finite()
            && measured >= 0.0
            && predicted.is_finite()
            && predicted > 0.0
        {
            let ratio = (measured / predicted).clamp(0.5, 4.0);
            self.correction += SMOOTHING * (ratio - self.correction);
        } else if load.measured_ms.is_none() && load.arrival_rate <= 0.0 && load.queued == 0 {
            // Idle: nothing to learn from, and what was learnt under the last load (a
            // correction of up to 4×) no longer describes a request arriving alone, which the
            // uncorrected model predicts from measured compute. Without this, a correction
            // learnt in an overload kept the operator's budget from coming back once the
            // traffic stopped (docs/decisions.md, stop 31).
            self.correction += SMOOTHING * (1.0 - self.correction);
        }
        self.current = self.current.clamp(self.floor, self.ceiling);
        let target = self.objective.target_ms;
        let meets = |c: &Self, i: usize, limit: f64| c.predicted_ms(i).is_some_and(|p| p <= limit);
        // Nothing measured yet: stay where the operator put it.
        if self.per_image.iter().all(Option::is_none) {
            return self.decision(previous, false);
        }
        let best = (self.floor..=self.ceiling).rev().find(|&i| meets(self, i, target));
        match best {
            None => {
                self.current = self.floor;
                self.calm = 0;
                self.decision(previous, true)
            }
            // Lower at once; and a live level predicted to miss is left for one that meets
            // the target even if that one is higher (costs are learned per level).
            Some(b) if b < self.current || !meets(self, self.current, target) => {
                self.current = b;
                self.calm = 0;
                self.decision(previous, false)
            }
            Some(_) => {
                let raise = (self.current + 1..=self.ceiling)
                    .rev()
                    .find(|&i| meets(self, i, target * RAISE_HEADROOM));
                match raise {
                    Some(r) => {
                        self.calm += 1;
                        if self.calm >= self.hold {
                            self.current = r;
                            self.calm = 0;
                        }
                    }
                    None => self.calm = 0,
                }
                self.decision(previous, false)
            }
        }
    }

    fn decision(&mut self, previous: usize, cannot_meet: bool) -> Decision {
        self.just_changed = self.current != previous;
        Decision {
            budget: self.budget(),
            predicted_ms: self.predicted_ms(self.current).unwrap_or(f64::NAN),
            at_floor: self.current == self.floor && self.floor < self.ceiling,
            cannot_meet,
            changed: self.current != previous,
        }
    }
}

/// The index of the highest level whose budget is at most `budget` (the lowest if none is).
fn index_at_or_below(levels: &[Level], budget: f64) -> usize {
    levels.iter().rposition(|l| l.budget <= budget + 1e-9).unwrap_or(0)
}

/// The floor's level: the lowest budget within the accepted accuracy drop of the dense
/// (last) level, or the level of an explicit minimum budget.
fn floor_index(levels: &[Level], floor: Floor) -> Result<usize, ControllerError> {
    match floor {
        Floor::MaxAccuracyDrop(points) if points.is_finite() && points >= 0.0 => {
            let dense = levels[levels.len() - 1].accuracy;
            Ok(levels
                .iter()
                .position(|l| (dense - l.accuracy) * 100.0 <= points + 1e-9)
                .unwrap_or(levels.len() - 1))
        }
        Floor::MinBudget(b) if b.is_finite() && (0.0..=1.0).contains(&b) => {
            // The lowest level at or above the minimum.
            Ok(levels.iter().position(|l| l.budget >= b - 1e-9).unwrap_or(levels.len() - 1))
        }
        _ => check_floor(floor).map(|()| 0),
    }
}

/// Checks a floor's number.
fn check_floor(floor: Floor) -> Result<(), ControllerError> {
    match floor {
        Floor::MaxAccuracyDrop(p) if !(p.is_finite() && p >= 0.0) => Err(ControllerError::Floor(format!(
            "controller.max_accuracy_drop must be ≥ 0 percentage points, got {p}"
        ))),
        Floor::MinBudget(b) if !(b.is_finite() && (0.0..=1.0).contains(&b)) => {
            Err(ControllerError::Floor(format!("controller.min_budget must be within [0, 1], got {b}")))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    #[test]
    fn the_config_section_parses_with_defaults_and_names_bad_fields() {
        let c: ControllerConfig = toml::from_str("enabled = true\ntarget_ms = 4.0\n").unwrap();
        let expected =
            Objective { percentile: Percentile::P99, target_ms: 4.0, floor: Floor::MaxAccuracyDrop(1.0) };
        assert_eq!(c.objective().unwrap(), Some(expected));
        assert_eq!((c.tick_ms, c.hold_ticks), (DEFAULT_TICK_MS, DEFAULT_HOLD_TICKS));
        assert!(toml::from_str::<ControllerConfig>("target = 4").unwrap_err().to_string().contains("target"));
        let off: ControllerConfig = toml::from_str("min_budget = 0.4").unwrap();
        assert_eq!(off.objective().unwrap(), None, "no target: no objective, and off");
        for (text, names) in [
            ("enabled = true", "target_ms"),
            ("target_ms = 0.0", "target_ms"),
            ("target_ms = 4.0\ntick_ms = 1", "tick_ms"),
            ("target_ms = 4.0\nhold_ticks = 0", "hold_ticks"),
            ("target_ms = 4.0\nmin_budget = 0.4\nmax_accuracy_drop = 1.0", "not both"),
            ("target_ms = 4.0\nmax_accuracy_drop = -1.0", "max_accuracy_drop"),
        ] {
            let c: ControllerConfig = toml::from_str(text).unwrap();
            let e = c.objective().unwrap_err().to_string();
            assert!(e.contains(names), "{text}: {e}");
        }
        // PATCH: naming one floor replaces the other; PUT resets unset fields but keeps the
        // load-time tick and hold.
        let current = ControllerConfig {
            enabled: true,
            target_ms: Some(4.0),
            max_accuracy_drop: Some(1.0),
            tick_ms: 50,
            ..Default::default()
        };
        let patched = ControllerChange { min_budget: Some(0.4), ..Default::default() }.apply(&current, false);
        assert_eq!((patched.enabled, patched.max_accuracy_drop, patched.min_budget), (true, None, Some(0.4)));
        let replaced = ControllerChange { target_ms: Some(9.0), ..Default::default() }.apply(&current, true);
        assert_eq!((replaced.enabled, replaced.target_ms, replaced.tick_ms), (false, Some(9.0), 50));
    }

    /// Budgets 0.3 … 1.0; accuracy from 90% to 93%; FLOPs = budget.
    fn levels() -> Vec<Level> {
        (3..=10)
            .map(|k| {
                let budget = f64::from(k) / 10.0;
                Level { budget, accuracy: 0.90 + 0.03 * (budget - 0.3) / 0.7, flop_fraction: budget }
            })
            .collect()
    }

    fn objective(target_ms: f64) -> Objective {
        Objective { percentile: Percentile::P99, target_ms, floor: Floor::MinBudget(0.3) }
    }

    /// The true compute per image at `budget`: 1 ms dense, 30% of it fixed.
    fn true_cost(budget: f64) -> f64 {
        1e-3 * (0.3 + 0.7 * budget)
    }

    /// A deterministic queue in front of one engine: Poisson arrivals at the phase's rate
    /// from a seeded generator, batches of up to 8 images costing `true_cost` each, a controller tick every
    /// 100 ms. Returns, per tick, (time s, budget, p99 of requests completed in the tick).
    fn simulate(controller: &mut Controller, phases: &[(f64, f64)]) -> Vec<(f64, f64, f64)> {
        simulate_engines(controller, phases, 1)
    }

    /// [`simulate`] with `engines` engines, each taking the next batch when it is free.
    fn simulate_engines(
        controller: &mut Controller,
        phases: &[(f64, f64)],
        engines: usize,
    ) -> Vec<(f64, f64, f64)> {
        let dt = 1e-4;
        let (mut t, mut next_arrival) = (0.0, 0.0);
        let mut busy_until = vec![0.0; engines];
        let mut queue: VecDeque<f64> = VecDeque::new();
        let mut running: Vec<Vec<f64>> = vec![Vec::new(); engines];
        let (mut arrived, mut done): (usize, Vec<f64>) = (0, Vec::new());
        let mut next_tick = 0.1;
        let mut trace = Vec::new();
        let end: f64 = phases.iter().map(|p| p.0).sum();
        let mut rng = StdRng::seed_from_u64(11);
        while t < end {
            let mut phase_end = 0.0;
            let rate = phases.iter().find(|p| {
                phase_end += p.0;
                t < phase_end
            });
            let rate = rate.map_or(0.0, |p| p.1);
            while next_arrival <= t {
                queue.push_back(next_arrival);
                arrived += 1;
                next_arrival += -(1.0 - rng.r#gen::<f64>()).ln() / rate.max(1e-9);
            }
            for e in 0..engines {
                if t >= busy_until[e] {
                    done.extend(running[e].drain(..).map(|a| (t - a) * 1e3));
                    if !queue.is_empty() {
                        let n = queue.len().min(8);
                        running[e].extend(queue.drain(..n));
                        let seconds = n as f64 * true_cost(controller.budget());
                        controller.observe_batch(controller.budget(), n, seconds);
                        busy_until[e] = t + seconds;
                    }
                }
            }
            if t >= next_tick {
                let measured = (done.len() >= 20).then(|| percentile(&mut done, 0.99));
                let load =
                    Load { arrival_rate: arrived as f64 / 0.1, queued: queue.len(), measured_ms: measured };
                let decision = controller.tick(&load);
                assert!(
                    decision.budget >= controller.floor_budget()
                        && decision.budget <= controller.ceiling_budget()
                );
                trace.push((t, decision.budget, measured.unwrap_or(0.0)));
                arrived = 0;
                done.clear();
                next_tick += 0.1;
            }
            t += dt;
        }
        trace
    }

    fn percentile(v: &mut [f64], q: f64) -> f64 {
        v.sort_by(f64::total_cmp);
        v[((v.len() - 1) as f64 * q).round() as usize]
    }

    fn controller(target_ms: f64) -> Controller {
        Controller::new(levels(), objective(target_ms), 1.0, 1, 5).unwrap()
    }

    #[test]
    fn overload_lowers_the_budget_until_the_target_holds() {
        // 1300 images/s: 1.3× what the dense network can serve (1000/s), two thirds of
        // what the floor (0.3: 0.51 ms per image, about 1960/s) can.
        let mut c = controller(20.0);
        let trace = simulate(&mut c, &[(6.0, 1300.0)]);
        let settled = &trace[30..];
        assert!(settled.iter().all(|&(_, b, _)| (0.3..1.0).contains(&b)), "{trace:?}");
        let worst = settled.iter().map(|&(_, _, p99)| p99).fold(0.0, f64::max);
        assert!(worst <= 20.0, "p99 {worst} ms over the 20 ms target once settled: {trace:?}");
        // It gives away no more than it must: not the floor, where a higher level serves.
        assert!(settled.iter().all(|&(_, b, _)| b > 0.3), "{trace:?}");
    }

    #[test]
    fn four_engines_keep_the_budget_at_half_load_and_lower_it_at_overload() {
        // Four engines serve 4000 images/s dense.
        let mut c = Controller::new(levels(), objective(20.0), 1.0, 4, 5).unwrap();
        let trace = simulate_engines(&mut c, &[(3.0, 2000.0), (5.0, 5200.0)], 4);
        let half: Vec<_> = trace.iter().filter(|&&(t, _, _)| (1.0..3.0).contains(&t)).collect();
        assert!(half.iter().all(|&&(_, b, _)| b >= 1.0), "half load gives nothing away: {trace:?}");
        let over: Vec<_> = trace.iter().filter(|&&(t, _, _)| t >= 5.0).collect();
        assert!(over.iter().all(|&&(_, b, _)| b < 1.0), "1.3× load lowers it: {trace:?}");
        let worst = over.iter().map(|&&(_, _, p99)| p99).fold(0.0, f64::max);
        assert!(worst <= 20.0, "p99 {worst} ms: {trace:?}");
    }

    #[test]
    fn recovery_gives_the_operator_budget_back_within_five_seconds() {
        let mut c = controller(20.0);
        let trace = simulate(&mut c, &[(4.0, 1300.0), (6.0, 400.0)]);
        assert!(trace.iter().any(|&(t, b, _)| t < 4.0 && b < 1.0), "overload lowered it");
        let back = trace.iter().find(|&&(t, b, _)| t >= 4.0 && b >= 1.0).expect("budget restored");
        assert!(back.0 - 4.0 <= 5.0, "restored {:.1} s after the drop", back.0 - 4.0);
        // And it stays there.
        assert!(trace.iter().filter(|&&(t, _, _)| t >= back.0).all(|&(_, b, _)| b >= 1.0));
    }

    /// An overload that taught the controller a large correction, then no traffic at all: the
    /// operator's budget comes back, although no request arrives to measure that it may.
    #[test]
    fn an_idle_server_gets_the_operator_budget_back_after_an_overload() {
        let mut c = Controller::new(levels(), objective(15.0), 1.0, 1, 5).unwrap();
        // A lone dense request: 5 ms of compute (the target is three times that).
        c.observe_batch(1.0, 1, 5e-3);
        // The overload: batches of 8 at whatever level is live, 0.5 ms per image, and a
        // measured p99 four times what the model predicts.
        for _ in 0..30 {
            c.observe_batch(c.budget(), 8, 8.0 * 0.5e-3);
            let predicted = c.predicted_ms(index_at_or_below(&c.levels, c.budget())).unwrap();
            c.tick(&Load {
                arrival_rate: 2000.0,
                queued: 40,
                measured_ms: Some(4.0 * predicted / c.correction),
            });
        }
        assert!(c.budget() < 1.0, "the overload lowered it: {}", c.budget());
        assert!(c.correction > 3.0, "and taught a large correction: {}", c.correction);
        // Nothing arrives any more.
        let idle = Load { arrival_rate: 0.0, queued: 0, measured_ms: None };
        let back = (1..=50).find(|_| c.tick(&idle).budget >= 1.0);
        assert!(back.is_some(), "still at {} after 5 idle seconds (correction {})", c.budget(), c.correction);
    }

    #[test]
    fn a_steady_load_does_not_make_it_oscillate() {
        for rate in [900.0, 1100.0, 1500.0] {
            let mut c = controller(20.0);
            let trace = simulate(&mut c, &[(10.0, rate)]);
            // Poisson noise may move it a level now and then, but not back and forth: at most
            // two changes in the last 6 s (60 ticks), and none undone within a second.
            let late = &trace[40..];
            let changes: Vec<usize> = (1..late.len()).filter(|&i| late[i].1 != late[i - 1].1).collect();
            assert!(changes.len() <= 2, "{rate}/s: {} changes in the last 6 s: {trace:?}", changes.len());
            for pair in changes.windows(2) {
                let undone = late[pair[1]].1 == late[pair[0] - 1].1;
                assert!(
                    !undone || pair[1] - pair[0] >= 10,
                    "{rate}/s: a change undone within 1 s: {trace:?}"
                );
            }
        }
    }

    #[test]
    fn it_stays_between_floor_and_ceiling_and_says_when_the_floor_cannot_meet_the_target() {
        let mut c = Controller::new(levels(), objective(20.0), 0.8, 1, 5).unwrap();
        // Light load: the operator's 0.8, never the dense 1.0 above it.
        let trace = simulate(&mut c, &[(2.0, 200.0)]);
        assert!(trace.iter().all(|&(_, b, _)| (b - 0.8).abs() < 1e-9), "{trace:?}");
        // A backlog of 500 and 5000/s arriving: at the floor, and it says it cannot meet.
        c.observe_batch(0.3, 8, 8.0 * true_cost(0.3));
        let d = c.tick(&Load { arrival_rate: 5000.0, queued: 500, measured_ms: None });
        assert!(d.at_floor && d.cannot_meet && (d.budget - 0.3).abs() < 1e-9, "{d:?}");
        // The operator lowers the budget below the live level: the ceiling wins at once.
        c.set_ceiling(0.5);
        let d = c.tick(&Load { arrival_rate: 10.0, queued: 0, measured_ms: None });
        assert!(d.budget <= 0.5 + 1e-9, "{d:?}");
        // A floor lowered with the ceiling comes back with it.
        let drop = Objective { floor: Floor::MaxAccuracyDrop(1.0), ..objective(20.0) };
        let mut c = Controller::new(levels(), drop, 1.0, 1, 5).unwrap();
        c.set_ceiling(0.5);
        assert!((c.floor_budget() - 0.5).abs() < 1e-9);
        c.set_ceiling(1.0);
        assert!((c.floor_budget() - 0.8).abs() < 1e-9, "{}", c.floor_budget());
        // A measurement that is not a number teaches nothing.
        c.observe_batch(1.0, 1, 1e-3);
        for _ in 0..10 {
            let d = c.tick(&Load { arrival_rate: 100.0, queued: 0, measured_ms: Some(f64::NAN) });
            assert!(d.predicted_ms.is_finite() && !d.cannot_meet, "{d:?}");
        }
        assert!(c.budget() >= 1.0, "light load raised it back to the ceiling: {}", c.budget());
    }

    #[test]
    fn floors_map_through_the_calibration_table() {
        let drop = |points| Objective { floor: Floor::MaxAccuracyDrop(points), ..objective(10.0) };
        // Dense 93%; within 1 point: accuracy ≥ 92%, first reached at budget 0.8 (92.14%).
        let c = Controller::new(levels(), drop(1.0), 1.0, 1, 5).unwrap();
        assert!((c.floor_budget() - 0.8).abs() < 1e-9, "{}", c.floor_budget());
        let c = Controller::new(levels(), drop(5.0), 1.0, 1, 5).unwrap();
        assert!((c.floor_budget() - 0.3).abs() < 1e-9);
        let min = |b| Objective { floor: Floor::MinBudget(b), ..objective(10.0) };
        assert!((Controller::new(levels(), min(0.55), 1.0, 1, 5).unwrap().floor_budget() - 0.6).abs() < 1e-9);
        assert!(
            Controller::new(levels(), min(1.5), 1.0, 1, 5).unwrap_err().to_string().contains("min_budget")
        );
        assert!(Controller::new(levels(), drop(-1.0), 1.0, 1, 5).is_err());
        assert_eq!(
            Controller::new(levels(), objective(0.0), 1.0, 1, 5).unwrap_err(),
            ControllerError::Target(0.0)
        );
        assert_eq!(
            Controller::new(vec![], objective(5.0), 1.0, 1, 5).unwrap_err(),
            ControllerError::NotCalibrated
        );
        let mut unordered = levels();
        unordered.swap(0, 1);
        assert_eq!(
            Controller::new(unordered, objective(5.0), 1.0, 1, 5).unwrap_err(),
            ControllerError::Levels
        );
    }

    #[test]
    fn unmeasured_levels_are_scaled_from_a_measured_one() {
        let mut c = controller(20.0);
        assert_eq!(c.predicted_ms(7), None, "nothing measured yet");
        c.observe_batch(1.0, 1, 1e-3);
        // Budget 0.3 (index 0), idle: (0.3 + 0.7 × 0.3) / 1.0 of the dense millisecond.
        let p = c.predicted_ms(0).unwrap();
        assert!((p - 0.51).abs() < 1e-9, "{p}");
        for _ in 0..20 {
            c.tick(&Load { arrival_rate: 2000.0, ..Load::default() });
        }
        assert_eq!(c.predicted_ms(7), Some(f64::INFINITY), "2000/s is twice what dense serves");
    }
}
