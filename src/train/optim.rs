//! SGD with Nesterov momentum and decoupled-from-BN weight decay, written out so its
//! momentum buffers can be checkpointed and a resumed run continues bit-exactly.

use tch::Tensor;

/// One trainable tensor and its momentum buffer.
struct Slot {
    name: String,
    param: Tensor,
    momentum: Tensor,
    decay: bool,
    /// This tensor's learning rate as a multiple of the step's.
    lr_scale: f64,
}

/// Nesterov SGD.
pub struct Sgd {
    slots: Vec<Slot>,
    pub momentum: f64,
    pub weight_decay: f64,
}

impl Sgd {
    /// Tracks `params` (name, tensor); weight decay applies to conv and linear weights only.
    pub fn new(params: Vec<(String, Tensor)>, momentum: f64, weight_decay: f64) -> Self {
        let slots = params
            .into_iter()
            .map(|(name, param)| {
                let decay = param.dim() > 1;
                let momentum = param.zeros_like().detach();
                Slot { name, param, momentum, decay, lr_scale: 1.0 }
            })
            .collect();
        Sgd { slots, momentum, weight_decay }
    }

    /// Every tensor whose name `selects` learns at `scale` times the step's rate (a
    /// retrofit's new gate and exit parameters; the pretrained backbone keeps the base rate).
    pub fn scale_lr(mut self, selects: impl Fn(&str) -> bool, scale: f64) -> Self {
        for s in self.slots.iter_mut().filter(|s| selects(&s.name)) {
            s.lr_scale = scale;
        }
        self
    }

    pub fn zero_grad(&mut self) {
        for s in &mut self.slots {
            let mut g = s.param.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    /// One update with learning rate `lr`.
    pub fn step(&mut self, lr: f64) {
        tch::no_grad(|| {
            for s in &mut self.slots {
                let grad = s.param.grad();
                if !grad.defined() {
                    continue;
                }
                let mut g = grad.shallow_clone();
                if s.decay && self.weight_decay > 0.0 {
                    g = &g + &s.param * self.weight_decay;
                }
                let _ = s.momentum.g_mul_scalar_(self.momentum).g_add_(&g);
                let update = &g + &s.momentum * self.momentum;
                let _ = s.param.g_sub_(&(update * (lr * s.lr_scale)));
            }
        });
    }

    /// Momentum buffers by parameter name (for checkpoints).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.slots
            .iter()
            .map(|s| (format!("optim.momentum.{}", s.name), s.momentum.shallow_clone()))
            .collect()
    }

    /// Restores momentum buffers saved by [`Sgd::state`]; fails naming a missing one.
    pub fn load_state(&mut self, saved: &std::collections::HashMap<String, Tensor>) -> Result<(), String> {
        for s in &mut self.slots {
            let key = format!("optim.momentum.{}", s.name);
            let src = saved.get(&key).ok_or_else(|| format!("checkpoint lacks `{key}`"))?;
            tch::no_grad(|| s.momentum.copy_(src));
        }
        Ok(())
    }
}

/// Cosine learning rate with linear warm-up, per step.
pub fn cosine_lr(base: f64, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let progress = (step - warmup) as f64 / (total - warmup).max(1) as f64;
    0.5 * base * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selected_tensors_step_at_their_scaled_rate() {
        let param = |v: f32| Tensor::from_slice(&[v]).set_requires_grad(true);
        let (backbone, gate) = (param(1.0), param(1.0));
        let mut sgd = Sgd::new(
            vec![
                ("conv.weight".into(), backbone.shallow_clone()),
                ("gates.fc.bias".into(), gate.shallow_clone()),
            ],
            0.0,
            0.0,
        )
        .scale_lr(|name| name.starts_with("gates."), 10.0);
        // d/dp of (2·backbone + 2·gate) is 2 for both.
        (&backbone * 2.0 + &gate * 2.0).sum(tch::Kind::Float).backward();
        sgd.step(0.01);
        assert!((backbone.double_value(&[0]) - 0.98).abs() < 1e-6, "{backbone}");
        assert!((gate.double_value(&[0]) - 0.8).abs() < 1e-6, "{gate}");
    }
}
