//! `sluice eval <model-dir>`: test-set accuracy, mean executed FLOPs and batch-1 latency at
//! every calibrated budget (and dense), as JSON lines or a table, plus a report folder with a
//! CSV, a markdown table and an SVG plot.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use serde::Serialize;

use crate::bench::timing::batch1_latencies;
use crate::control::calibration::CalibrationTable;
use crate::engine::{BatchTotals, GatePolicy, Model};
use crate::repository::ModelDir;

/// Arguments of `sluice eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The model folder (config.toml, weights, calibration.json).
    pub model: PathBuf,
    /// One JSON object per budget instead of a table.
    #[arg(long, env = "SLUICE_EVAL_JSON")]
    pub json: bool,
    /// Evaluate only the first N images (0: all).
    #[arg(long, env = "SLUICE_EVAL_LIMIT", default_value_t = 0)]
    pub limit: usize,
    /// Which split: the test set (reports) or the held-out validation split (model selection).
    #[arg(long, env = "SLUICE_EVAL_SPLIT", value_enum, default_value = "test")]
    pub split: EvalSplit,
    /// Test images timed one at a time for the batch-1 latency (0: skip latency).
    #[arg(long, env = "SLUICE_EVAL_LATENCY_IMAGES", default_value_t = 300)]
    pub latency_images: usize,
    /// Write report.csv, report.md and report.svg here.
    #[arg(long, env = "SLUICE_EVAL_REPORT")]
    pub report: Option<PathBuf>,
    #[arg(long, env = "SLUICE_THREADS", default_value_t = 2)]
    pub threads: usize,
    #[command(flatten)]
    pub format: super::FormatArgs,
    #[command(flatten)]
    pub data: super::DataArgs,
}

/// The images `sluice eval` measures.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum EvalSplit {
    Test,
    Validation,
}

impl EvalSplit {
    fn describe(self) -> &'static str {
        match self {
            EvalSplit::Test => "test set",
            EvalSplit::Validation => "validation split",
        }
    }
}

/// One evaluated operating point.
#[derive(Clone, Debug, Serialize)]
pub struct EvalRow {
    /// The calibrated budget, or `null` for the dense row (every gate open, exits off).
    pub budget: Option<f64>,
    pub accuracy: f64,
    pub flop_fraction: f64,
    /// Median batch-1 latency; `null` when not measured (`--latency-images 0`).
    pub latency_ms: Option<f64>,
    /// Median over images of latency / dense latency of the same image (same run).
    pub latency_ratio: Option<f64>,
    pub channel_threshold: f32,
    pub block_threshold: f32,
    pub exit_threshold: f32,
    pub images: usize,
    /// The number format the network ran in (`fp32`, `bf16`).
    pub precision: String,
}

pub fn run(args: &EvalArgs) -> anyhow::Result<()> {
    tch::set_num_threads(args.threads.max(1) as i32);
    let _guard = tch::no_grad_guard();
    let dir = ModelDir::open(&args.model)?;
    let source = args.format.source(&dir)?;
    let model = Model::build(&source)?;
    let table = match dir.calibration_path() {
        Some(path) => Some(CalibrationTable::load(&path).with_context(|| path.display().to_string())?),
        None => {
            tracing::warn!(
                "no calibration table (run `sluice calibrate`): evaluating the dense network only"
            );
            None
        }
    };
    let data = args.data.load_for(&dir)?;
    let test_is_validation = data.test_is_validation;
    let mut test = match args.split {
        EvalSplit::Test => data.test,
        EvalSplit::Validation => data.validation,
    };
    if args.limit > 0 {
        test = test.take(args.limit);
    }
    let mut policies: Vec<(Option<f64>, GatePolicy)> = vec![(None, GatePolicy::dense())];
    if let Some(t) = &table {
        for e in &t.budgets {
            policies.push((Some(e.budget), t.policy_for(e.budget)?));
        }
    }
    let latencies = split_latencies(&model, &test, &policies, args.latency_images)?;
    let mut rows = Vec::new();
    for (k, (budget, policy)) in policies.iter().enumerate() {
        let (accuracy, flop_fraction) = accuracy_and_flops(&model, &test, policy)?;
        let (latency_ms, latency_ratio) = latencies.get(k).copied().unzip();
        let row = EvalRow {
            budget: *budget,
            accuracy,
            flop_fraction,
            latency_ms,
            latency_ratio,
            channel_threshold: policy.channel_threshold,
            block_threshold: policy.block_threshold,
            exit_threshold: policy.exit_threshold,
            images: test.len(),
            precision: source.format.precision.to_string(),
        };
        if args.json {
            println!("{}", serde_json::to_string(&row)?);
        }
        rows.push(row);
    }
    let which = match (args.split, test_is_validation) {
        (EvalSplit::Test, true) => "validation split (it has no test split)",
        (split, _) => split.describe(),
    };
    let title = format!(
        "Model `{}` on the {} {which} ({}, {} layout)",
        dir.config.name,
        args.data.spec(),
        source.format.precision,
        source.format.layout
    );
    if !args.json {
        println!("{}", markdown(&title, &rows));
    }
    if let Some(out) = &args.report {
        write_report(out, &dir.config.name, &title, &rows)?;
    }
    Ok(())
}

/// Test accuracy and mean executed FLOP fraction under `policy`.
pub fn accuracy_and_flops(
    model: &Model,
    test: &crate::data::Split,
    policy: &GatePolicy,
) -> Result<(f64, f64), crate::data::DataError> {
    let (mut correct, mut totals) = (0i64, BatchTotals::default());
    for start in (0..test.len()).step_by(500) {
        let range = start..(start + 500).min(test.len());
        let (logits, reports) = model.net.forward(&test.images(range.clone())?, policy);
        correct += logits
            .argmax(1, false)
            .eq_tensor(&test.label_tensor(range))
            .sum(tch::Kind::Int64)
            .int64_value(&[]);
        let t = BatchTotals::of(&reports);
        totals.dense_flops += t.dense_flops;
        totals.executed_flops += t.executed_flops;
    }
    Ok((correct as f64 / test.len().max(1) as f64, totals.flop_fraction()))
}

/// [`batch1_latencies`] of `policies` on the first `images` images of `test`.
fn split_latencies(
    model: &Model,
    test: &crate::data::Split,
    policies: &[(Option<f64>, GatePolicy)],
    images: usize,
) -> Result<Vec<(f64, f64)>, crate::data::DataError> {
    let inputs = (0..images.min(test.len())).map(|i| test.images(i..i + 1)).collect::<Result<Vec<_>, _>>()?;
    let policies: Vec<GatePolicy> = policies.iter().map(|(_, p)| p.clone()).collect();
    Ok(batch1_latencies(model, &inputs, &policies))
}

fn label(budget: Option<f64>) -> String {
    budget.map_or("dense".into(), |b| format!("{b:.2}"))
}

/// A measured value with `digits` decimals, or `blank` when it was not measured.
fn measured(v: Option<f64>, digits: usize, blank: &str) -> String {
    v.map_or(blank.into(), |v| format!("{v:.digits$}"))
}

fn markdown(title: &str, rows: &[EvalRow]) -> String {
    let mut s = format!(
        "{title} ({} images).\n\n\
         | budget | accuracy | FLOP fraction | batch-1 latency ms | latency / dense | channel t | block t | exit t |\n\
         |---|---|---|---|---|---|---|---|\n",
        rows.first().map_or(0, |r| r.images)
    );
    for r in rows {
        s += &format!(
            "| {} | {:.2}% | {:.3} | {} | {} | {:.4} | {:.4} | {:.4} |\n",
            label(r.budget),
            100.0 * r.accuracy,
            r.flop_fraction,
            measured(r.latency_ms, 3, "–"),
            measured(r.latency_ratio, 2, "–"),
            r.channel_threshold,
            r.block_threshold,
            r.exit_threshold
        );
    }
    s
}

fn write_report(dir: &Path, model: &str, title: &str, rows: &[EvalRow]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut csv = String::from(
        "budget,accuracy,flop_fraction,latency_ms,latency_ratio,channel_threshold,block_threshold,exit_threshold,images\n",
    );
    for r in rows {
        csv += &format!(
            "{},{:.6},{:.6},{},{},{},{},{},{}\n",
            label(r.budget),
            r.accuracy,
            r.flop_fraction,
            measured(r.latency_ms, 6, ""),
            measured(r.latency_ratio, 6, ""),
            r.channel_threshold,
            r.block_threshold,
            r.exit_threshold,
            r.images
        );
    }
    std::fs::write(dir.join("report.csv"), csv)?;
    std::fs::write(dir.join("report.md"), markdown(title, rows))?;
    super::plot::accuracy_vs_flops(&dir.join("report.svg"), model, rows)?;
    Ok(())
}
