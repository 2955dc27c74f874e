//! The adaptive budget controller at work (docs/controller.md): per model, a tick task feeds
//! the [`Controller`] what the scheduler and the front doors measured (images offered and
//! queued, each batch's budget and engine time, each answered request's latency) and turns
//! its decisions into policy versions with source `controller` through the [`PolicyStore`].
//! The operator's policy stays the ceiling and what is persisted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Serialize;

use crate::control::PolicyStore;
use crate::control::calibration::CalibrationTable;
use crate::control::controller::{
    self, Controller, ControllerChange, ControllerConfig, ControllerError, Level, Load, Objective,
};
use crate::engine::GatePolicy;
use crate::observability::metrics::ControllerMetrics;
use crate::scheduling::LoadSample;

/// Latencies kept per tick; a request beyond it in one tick is not sampled (at 100 ms ticks
/// that is beyond 80 000 requests a second). Violations are counted for every request.
pub const MAX_LATENCY_SAMPLES: usize = 8192;
/// The fewest answered requests in a tick whose percentile counts as a measurement.
pub const MIN_LATENCY_SAMPLES: usize = 20;

/// Where the controller stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ControllerState {
    /// Switched off (the operator's policy is live).
    #[default]
    Off,
    /// Switched on, but the operator's policy sets thresholds, not a budget: nothing to lower.
    Suspended,
    /// Choosing the budget every tick.
    Active,
}

/// The controller's settings and state, as the control API shows them.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ControllerView {
    #[serde(flatten)]
    pub config: ControllerConfig,
    pub state: ControllerState,
    /// Why it is suspended, if it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The budget it chose last tick, and its bounds (while active).
    pub budget: Option<f64>,
    pub ceiling: Option<f64>,
    pub floor: Option<f64>,
    pub at_floor: bool,
    /// Even the floor is predicted to miss the target (admission control sheds load).
    pub cannot_meet: bool,
    /// Predicted latency percentile at the chosen budget (ms; absent: nothing measured yet or
    /// it cannot keep up).
    pub predicted_ms: Option<f64>,
    /// The objective's percentile of the requests answered last tick (ms).
    pub measured_ms: Option<f64>,
    /// Images offered per second, last tick.
    pub arrival_rate: f64,
    pub seconds_at_floor: f64,
    /// Policy versions it has made.
    pub changes: u64,
}

/// One model's controller, its measurements and settings.
pub struct Adaptive {
    inner: Mutex<Inner>,
    /// Latencies (s) of requests answered since the last tick.
    latencies: Mutex<Vec<f64>>,
    /// The target in seconds as `f64` bits (0: no target), read per request without a lock.
    target_bits: AtomicU64,
    levels: Vec<Level>,
    engines: usize,
    metrics: ControllerMetrics,
}

struct Inner {
    config: ControllerConfig,
    /// Built on the first active tick; dropped when switched off, suspended or re-aimed.
    controller: Option<Controller>,
    /// The operator budget the controller's ceiling was last set from.
    ceiling: f64,
    view: ControllerView,
}

impl Adaptive {
    /// The controller of a model with `engines` engine threads, checked against its
    /// calibration table (without one it cannot be switched on).
    pub fn new(
        config: ControllerConfig,
        calibration: Option<&CalibrationTable>,
        engines: usize,
        metrics: ControllerMetrics,
    ) -> Result<Self, ControllerError> {
        let levels = calibration.map(controller::levels).unwrap_or_default();
        let adaptive = Adaptive {
            inner: Mutex::new(Inner {
                config: ControllerConfig::default(),
                controller: None,
                ceiling: f64::NAN,
                view: ControllerView::default(),
            }),
            latencies: Mutex::new(Vec::new()),
            target_bits: AtomicU64::new(0),
            levels,
            engines: engines.max(1),
            metrics,
        };
        let objective = adaptive.check(&config)?;
        let mut inner = adaptive.lock();
        adaptive.publish_settings(&mut inner, config, objective);
        drop(inner);
        Ok(adaptive)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Checks settings: a valid objective, and a calibration table to switch on.
    fn check(&self, config: &ControllerConfig) -> Result<Option<Objective>, ControllerError> {
        let objective = config.objective()?;
        if config.enabled && self.levels.is_empty() {
            return Err(ControllerError::NotCalibrated);
        }
        if let Some(o) = &objective
            && !self.levels.is_empty()
        {
            // Builds one to check the objective against the table (floor in range).
            Controller::new(self.levels.clone(), *o, 1.0, self.engines, config.hold_ticks)?;
        }
        Ok(objective)
    }

    fn publish_settings(&self, inner: &mut Inner, config: ControllerConfig, objective: Option<Objective>) {
        let target = objective.map_or(0.0, |o| o.target_ms / 1e3);
        self.target_bits.store(target.to_bits(), Ordering::Relaxed);
        self.metrics.target.set(target);
        self.metrics.enabled.set(i64::from(config.enabled));
        inner.controller = None;
        inner.ceiling = f64::NAN;
        inner.view = ControllerView { config: config.clone(), ..Default::default() };
        inner.config = config;
        if !inner.config.enabled {
            self.metrics.floor.set(-1.0);
            self.metrics.at_floor.set(0);
            self.metrics.cannot_meet.set(0);
            self.metrics.predicted.set(f64::NAN);
        }
    }

    /// Applies a change from the control API (`replace`: PUT, else PATCH). Switching off
    /// gives the operator's budget back at once; a new objective starts a fresh controller
    /// on the next tick.
    pub fn change(
        &self,
        change: &ControllerChange,
        replace: bool,
        policy: &PolicyStore,
        who: &str,
    ) -> Result<(ControllerView, Option<Arc<GatePolicy>>), ControllerError> {
        let mut inner = self.lock();
        let config = change.apply(&inner.config, replace);
        let objective = self.check(&config)?;
        tracing::info!(
            who,
            old = %serde_json::to_string(&inner.config).unwrap_or_default(),
            new = %serde_json::to_string(&config).unwrap_or_default(),
            "latency controller settings changed"
        );
        let seconds_at_floor = inner.view.seconds_at_floor;
        let changes = inner.view.changes;
        self.publish_settings(&mut inner, config, objective);
        inner.view.seconds_at_floor = seconds_at_floor;
        inner.view.changes = changes;
        let released = if inner.config.enabled { None } else { self.release(&mut inner, policy, who) };
        Ok((inner.view.clone(), released))
    }

    /// The settings and state.
    pub fn view(&self) -> ControllerView {
        self.lock().view.clone()
    }

    /// Why requests are being shed, when the controller is at its floor and still predicts
    /// a miss (appended to 429 / `RESOURCE_EXHAUSTED` messages).
    pub fn shedding_reason(&self) -> Option<String> {
        let inner = self.lock();
        let v = &inner.view;
        (v.state == ControllerState::Active && v.cannot_meet).then(|| {
            format!(
                "the latency controller already runs at its floor budget {} and predicts {} {} over the \
                 {} ms target",
                v.floor.unwrap_or(f64::NAN),
                v.config.percentile.as_str(),
                v.predicted_ms.map_or("unbounded latency".into(), |p| format!("{p:.1} ms")),
                v.config.target_ms.unwrap_or(f64::NAN)
            )
        })
    }

    /// Notes one answered request's latency (and a violation of the target, if one is set).
    pub fn record(&self, latency: Duration) {
        let seconds = latency.as_secs_f64();
        let target = f64::from_bits(self.target_bits.load(Ordering::Relaxed));
        if target > 0.0 && seconds > target {
            self.metrics.slo_violations.inc();
        }
        let mut window = self.latencies.lock().unwrap_or_else(PoisonError::into_inner);
        if window.len() < MAX_LATENCY_SAMPLES {
            window.push(seconds);
        }
    }

    /// Gives the operator's budget back (no cap); the new live policy if it changed.
    fn release(&self, inner: &mut Inner, policy: &PolicyStore, why: &str) -> Option<Arc<GatePolicy>> {
        inner.controller = None;
        match policy.cap_budget(None, why) {
            Ok(new) => {
                if new.is_some() {
                    self.metrics.changes.inc();
                    inner.view.changes += 1;
                }
                new
            }
            Err(e) => {
                tracing::warn!(error = %e, "the controller could not give the operator's budget back");
                None
            }
        }
    }

    /// One tick, `elapsed` after the last: reads the measurements, decides, and makes a new
    /// policy version when the budget changes. Returns that version, if any.
    pub fn tick(&self, policy: &PolicyStore, load: LoadSample, elapsed: Duration) -> Option<Arc<GatePolicy>> {
        let latencies = std::mem::take(&mut *self.latencies.lock().unwrap_or_else(PoisonError::into_inner));
        let seconds = elapsed.as_secs_f64().max(1e-3);
        let mut inner = self.lock();
        let objective = inner.config.objective().ok().flatten();
        let objective = match objective {
            Some(o) if inner.config.enabled => o,
            _ => {
                inner.view.state = ControllerState::Off;
                return if inner.controller.is_some() {
                    self.release(&mut inner, policy, "controller off")
                } else {
                    None
                };
            }
        };
        let operator = policy.operator_policy();
        let Some(ceiling) = operator.budget else {
            inner.view.state = ControllerState::Suspended;
            inner.view.reason = Some(
                "the operator's policy sets thresholds, not a budget: set a budget (1.0 for dense compute) \
                 for the controller to lower"
                    .into(),
            );
            inner.view.budget = None;
            self.metrics.at_floor.set(0);
            self.metrics.cannot_meet.set(0);
            return if inner.controller.is_some() {
                self.release(&mut inner, policy, "controller suspended")
            } else {
                None
            };
        };
        let hold = inner.config.hold_ticks;
        if inner.controller.is_none() {
            match Controller::new(self.levels.clone(), objective, ceiling, self.engines, hold) {
                Ok(c) => {
                    inner.controller = Some(c);
                    inner.ceiling = ceiling;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the latency controller cannot start");
                    return None;
                }
            }
        }
        let Inner { controller: Some(c), view, ceiling: last_ceiling, .. } = &mut *inner else {
            return None;
        };
        if *last_ceiling != ceiling {
            c.set_ceiling(ceiling);
            *last_ceiling = ceiling;
        }
        for b in &load.batches {
            if let Some(budget) = b.budget {
                c.observe_batch(budget, b.images, b.compute.as_secs_f64());
            }
        }
        let measured_ms = percentile(latencies, objective.percentile.quantile()).map(|s| s * 1e3);
        let arrival_rate = load.arrived as f64 / seconds;
        let decision = c.tick(&Load { arrival_rate, queued: load.queued, measured_ms });
        let at_ceiling = decision.budget >= c.ceiling_budget() - 1e-9;
        let cap = (!at_ceiling).then_some(decision.budget);
        let floor = c.floor_budget();
        *view = ControllerView {
            config: view.config.clone(),
            state: ControllerState::Active,
            reason: None,
            budget: Some(if at_ceiling { ceiling } else { decision.budget }),
            ceiling: Some(ceiling),
            floor: Some(floor),
            at_floor: decision.at_floor,
            cannot_meet: decision.cannot_meet,
            predicted_ms: decision.predicted_ms.is_finite().then_some(decision.predicted_ms),
            measured_ms,
            arrival_rate,
            seconds_at_floor: view.seconds_at_floor + if decision.at_floor { seconds } else { 0.0 },
            changes: view.changes,
        };
        self.metrics.floor.set(floor);
        self.metrics.at_floor.set(i64::from(decision.at_floor));
        if decision.at_floor {
            self.metrics.floor_seconds.inc_by(seconds);
        }
        self.metrics.cannot_meet.set(i64::from(decision.cannot_meet));
        self.metrics.predicted.set(decision.predicted_ms / 1e3);
        self.metrics.measured.set(measured_ms.map_or(f64::NAN, |m| m / 1e3));
        let why = format!(
            "controller: predicted {} {:.2} ms against the {} ms target at {} images/s, {} queued",
            objective.percentile.as_str(),
            decision.predicted_ms,
            objective.target_ms,
            arrival_rate.round(),
            load.queued
        );
        match policy.cap_budget(cap, &why) {
            Ok(Some(new)) => {
                self.metrics.changes.inc();
                view.changes += 1;
                Some(new)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, budget = decision.budget, "the controller's budget was refused");
                None
            }
        }
    }
}

/// The `q` quantile (nearest rank) of `samples`, if there are enough to say.
fn percentile(mut samples: Vec<f64>, q: f64) -> Option<f64> {
    if samples.len() < MIN_LATENCY_SAMPLES {
        return None;
    }
    samples.sort_unstable_by(f64::total_cmp);
    let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
    Some(samples[rank - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_nearest_rank_and_needs_enough_samples() {
        assert_eq!(percentile(vec![1.0; MIN_LATENCY_SAMPLES - 1], 0.99), None);
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(samples.clone(), 0.99), Some(99.0));
        assert_eq!(percentile(samples.clone(), 0.95), Some(95.0));
        assert_eq!(percentile(samples.into_iter().rev().collect(), 0.5), Some(50.0));
    }
}
