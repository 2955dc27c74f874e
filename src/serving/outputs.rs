//! Building a response from the engine's answer: the requested outputs (logits or top-k
//! classes, per-input FLOPs, exits) and the compute parameters every answer carries.

use super::model::ModelRuntime;
use crate::scheduling::EngineAnswer;
use crate::serving::prepare::{OutputKind, OutputPlan};
use crate::serving::{InferOutput, InferRequest, InferResponse, OutputData, ParamValue, Parameters};

/// Response parameters (docs/gating.md).
pub const PARAM_FLOPS_EXECUTED: &str = "sluice_flops_executed";
pub const PARAM_FLOPS_DENSE: &str = "sluice_flops_dense";
pub const PARAM_POLICY_VERSION: &str = "sluice_policy_version";
pub const PARAM_POLICY_OVERRIDE: &str = "sluice_policy_override";

pub fn response(
    req: &InferRequest,
    model: &ModelRuntime,
    plans: &[OutputPlan],
    answer: &EngineAnswer,
    overridden: bool,
) -> InferResponse {
    let items = answer.reports.len() as i64;
    let classes = answer.classes as i64;
    let outputs = plans
        .iter()
        .map(|plan| {
            let (shape, data) = match &plan.kind {
                OutputKind::Logits { classification: None } => {
                    (vec![items, classes], OutputData::F32(answer.logits.clone()))
                }
                OutputKind::Logits { classification: Some(k) } => (
                    vec![items, *k as i64],
                    OutputData::Bytes(top_k(&answer.logits, answer.classes, *k, &model.interface.labels)),
                ),
                OutputKind::Flops => (
                    vec![items, 1],
                    OutputData::I64(answer.reports.iter().map(|r| r.executed_flops as i64).collect()),
                ),
                OutputKind::Exit => (
                    vec![items, 1],
                    OutputData::I32(answer.reports.iter().map(|r| r.exit.unwrap_or(0) as i32).collect()),
                ),
            };
            InferOutput { name: plan.name.clone(), shape, data, binary: plan.binary.unwrap_or(false) }
        })
        .collect();
    let mut parameters = Parameters::new();
    let executed: u64 = answer.reports.iter().map(|r| r.executed_flops).sum();
    let dense: u64 = answer.reports.iter().map(|r| r.dense_flops).sum();
    parameters.insert(PARAM_FLOPS_EXECUTED.into(), ParamValue::Int(executed as i64));
    parameters.insert(PARAM_FLOPS_DENSE.into(), ParamValue::Int(dense as i64));
    parameters.insert(PARAM_POLICY_VERSION.into(), ParamValue::Int(answer.policy_version as i64));
    if overridden {
        parameters.insert(PARAM_POLICY_OVERRIDE.into(), ParamValue::Bool(true));
    }
    InferResponse {
        model_name: model.interface.name.clone(),
        model_version: model.interface.version.clone(),
        id: req.id.clone(),
        parameters,
        outputs,
    }
}

/// Triton's classification format: per input, the `k` best classes as
/// `"<score>:<index>:<label>"`, best first.
fn top_k(logits: &[f32], classes: usize, k: usize, labels: &[String]) -> Vec<Vec<u8>> {
    logits
        .chunks(classes.max(1))
        .flat_map(|row| {
            let mut order: Vec<usize> = (0..row.len()).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            order
                .into_iter()
                .take(k)
                .map(|i| {
                    format!("{}:{}:{}", row[i], i, labels.get(i).map_or("", String::as_str)).into_bytes()
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_is_best_first_with_labels() {
        let labels = vec!["a".to_string(), "b".into(), "c".into()];
        let out = top_k(&[0.1, 0.7, 0.2, 5.0, 1.0, 2.0], 3, 2, &labels);
        let out: Vec<String> = out.into_iter().map(|b| String::from_utf8(b).unwrap()).collect();
        assert_eq!(out, vec!["0.7:1:b", "0.2:2:c", "5:0:a", "2:2:c"]);
    }
}
