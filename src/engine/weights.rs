//! Loading and saving weights as safetensors, strictly: every variable inference needs must be
//! in the file with the same shape, and the file may hold nothing else. Problems name the
//! tensor. Batch-norm `num_batches_tracked` counters are optional (a training counter that
//! inference never reads, and that common exports leave out).

use std::collections::BTreeSet;
use std::path::Path;

use tch::nn::VarStore;
use tch::{Kind, Tensor};

use super::EngineError;

/// Loads `path` into every variable of `vs`; fails, naming tensors, on any missing,
/// unexpected or mis-shaped entry. Floating-point tensors of another precision are converted.
/// A missing batch-norm `num_batches_tracked` counter keeps its initial value.
pub fn load_strict(vs: &mut VarStore, path: &Path) -> Result<(), EngineError> {
    let file = path.display().to_string();
    let loaded = Tensor::read_safetensors(path).map_err(|e| EngineError::Weights {
        file: file.clone(),
        problem: format!("cannot read safetensors: {e}"),
    })?;
    let mut problems = Vec::new();
    let vars = vs.variables();
    let mut seen = BTreeSet::new();
    for (name, src) in &loaded {
        seen.insert(name.as_str());
        let Some(dst) = vars.get(name) else {
            problems.push(format!("unexpected tensor `{name}` (shape {:?})", src.size()));
            continue;
        };
        if src.size() != dst.size() {
            problems.push(format!(
                "tensor `{name}` has shape {:?} in the file, the model expects {:?}",
                src.size(),
                dst.size()
            ));
            continue;
        }
        if is_float(dst.kind()) != is_float(src.kind()) {
            problems.push(format!(
                "tensor `{name}` has dtype {:?} in the file, the model expects {:?}",
                src.kind(),
                dst.kind()
            ));
        }
    }
    for (name, dst) in &vars {
        if !seen.contains(name.as_str()) && !is_training_counter(name) {
            problems.push(format!("missing tensor `{name}` (shape {:?})", dst.size()));
        }
    }
    if !problems.is_empty() {
        problems.sort();
        let total = problems.len();
        problems.truncate(8);
        let more = if total > 8 { format!("; and {} more", total - 8) } else { String::new() };
        return Err(EngineError::Weights { file, problem: format!("{}{more}", problems.join("; ")) });
    }
    tch::no_grad(|| {
        for (name, src) in &loaded {
            if let Some(dst) = vars.get(name) {
                let mut dst = dst.shallow_clone();
                dst.f_copy_(&src.to_kind(dst.kind())).map_err(|e| EngineError::Weights {
                    file: file.clone(),
                    problem: format!("`{name}`: {e}"),
                })?;
            }
        }
        Ok(())
    })
}

/// Saves every variable of `vs` to `path` as safetensors.
pub fn save(vs: &VarStore, path: &Path) -> Result<(), EngineError> {
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let named: Vec<(String, Tensor)> = named.into_iter().map(|(n, t)| (n, t.detach().contiguous())).collect();
    Tensor::write_safetensors(&named, path).map_err(|e| EngineError::Weights {
        file: path.display().to_string(),
        problem: format!("cannot write: {e}"),
    })
}

/// Batch-norm's step counter: saved by PyTorch, read only by training with momentum `None`.
fn is_training_counter(name: &str) -> bool {
    name == "num_batches_tracked" || name.ends_with(".num_batches_tracked")
}

fn is_float(kind: Kind) -> bool {
    matches!(kind, Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16)
}
