//! `sluice calibrate <model-dir>`: sweep thresholds on a dataset's validation split
//! (`--data`) and write the budget → thresholds table beside the weights. Each budget gets
//! the most accurate point within its FLOPs (with `--flops-confidence` standard errors to
//! spare, so that the budget holds on images the split did not hold), or, where points nearly
//! as accurate run faster (`--latency-margin`), the fastest of them as timed at batch 1 on
//! validation images.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::bench::timing::batch1_latencies;
use crate::control::calibration::{
    BudgetEntry, CALIBRATION_FILE, CalibrationTable, OperatingPoint, budget_table, default_budgets,
    dense_point, fastest_of, frontier, near_best, same_thresholds,
};
use crate::data::Split;
use crate::engine::{ChannelMode, GatePolicy, Model};
use crate::repository::ModelDir;
use crate::train::calibrate::{SweepGrid, sweep_refined};

/// Arguments of `sluice calibrate`.
#[derive(Debug, Args)]
pub struct CalibrateArgs {
    /// The model folder (config.toml, weights); the table is written into it.
    pub model: PathBuf,
    /// Quantile steps of the channel and block threshold grids.
    #[arg(long, env = "SLUICE_CALIBRATE_STEPS", default_value_t = 12)]
    pub steps: usize,
    /// After the quantile grid, sweep more threshold pairs wherever a budget's best point is
    /// more than this fraction of dense FLOPs below it (0: no refinement).
    #[arg(long, env = "SLUICE_CALIBRATE_MAX_GAP", default_value_t = 0.03)]
    pub max_gap: f64,
    /// How many refinement rounds `--max-gap` may take (each sweeps at most one pair per
    /// budget).
    #[arg(long, env = "SLUICE_CALIBRATE_REFINE_ROUNDS", default_value_t = 3)]
    pub refine_rounds: usize,
    /// A budget takes only points whose mean FLOP fraction plus this many standard errors
    /// (measured per point on the split) is within it, so the budget holds on new images
    /// too, not only on the validation split (2: ~98% one-sided; 0: the mean alone).
    #[arg(long, env = "SLUICE_CALIBRATE_FLOPS_CONFIDENCE", default_value_t = 2.0,
          value_parser = non_negative, allow_negative_numbers = true)]
    pub flops_confidence: f64,
    /// Validation accuracy (a fraction: 0.002 = 0.2 points) a budget may give up, against its
    /// most accurate point, for a point that runs faster at batch 1; 0 chooses on FLOPs alone.
    #[arg(long, env = "SLUICE_CALIBRATE_LATENCY_MARGIN", default_value_t = 0.002)]
    pub latency_margin: f64,
    /// Validation images every candidate point is timed on, one at a time (0: choose on FLOPs
    /// alone). Each budget's candidates, and the dense network, run on each image in turn.
    #[arg(long, env = "SLUICE_CALIBRATE_LATENCY_IMAGES", default_value_t = 300)]
    pub latency_images: usize,
    /// At most this many candidate points per budget are timed (the most accurate first).
    #[arg(long, env = "SLUICE_CALIBRATE_LATENCY_CANDIDATES", default_value_t = 24)]
    pub latency_candidates: usize,
    /// Use only the first N validation images (0: all).
    #[arg(long, env = "SLUICE_CALIBRATE_LIMIT", default_value_t = 0)]
    pub limit: usize,
    /// Write the table here instead of <model>/calibration.json.
    #[arg(long, env = "SLUICE_CALIBRATE_OUT")]
    pub out: Option<PathBuf>,
    #[arg(long, env = "SLUICE_THREADS", default_value_t = 2)]
    pub threads: usize,
    #[command(flatten)]
    pub data: super::DataArgs,
}

pub fn run(args: &CalibrateArgs) -> anyhow::Result<()> {
    tch::set_num_threads(args.threads.max(1) as i32);
    let _guard = tch::no_grad_guard();
    let dir = ModelDir::open(&args.model)?;
    let model = Model::build(&dir.source(Default::default()))?;
    let data = args.data.load_for(&dir)?;
    let validation = if args.limit > 0 { data.validation.take(args.limit) } else { data.validation };
    let grid = SweepGrid::from_scores(&model, &validation.images(0..validation.len().min(2000))?, args.steps);
    tracing::info!(
        channel = grid.channel.len(),
        block = grid.block.len(),
        exit = grid.exit.len(),
        images = validation.len(),
        "sweeping thresholds on the validation split"
    );
    let rounds = if args.max_gap > 0.0 { args.refine_rounds } else { 0 };
    let budgets = default_budgets();
    let z = args.flops_confidence;
    let points =
        sweep_refined(&model, &validation, &grid, 500, &budgets, z, args.max_gap, rounds, |done, total| {
            if done % 10 == 0 || done == total {
                tracing::info!(done, total, "threshold pairs measured");
            }
        })?;
    let dense = dense_point(&points).cloned().context("the sweep measured no dense point")?;
    let frontier = frontier(&points);
    let mut entries = budget_table(&frontier, &budgets, &dense, z);
    if args.latency_images > 0 && args.latency_margin > 0.0 {
        weigh_latency(&model, &validation, &points, &mut entries, args)?;
    }
    let table = CalibrationTable {
        model: dir.config.name.clone(),
        split: "validation".into(),
        images: validation.len(),
        channel_mode: ChannelMode::Slice,
        flops_confidence: z,
        budgets: entries,
        frontier,
    };
    let out = args.out.clone().unwrap_or_else(|| args.model.join(CALIBRATION_FILE));
    table.save(&out)?;
    println!(
        "| budget | channel t | block t | exit t | validation accuracy | FLOP fraction ± s.e. | latency / dense |"
    );
    println!("|---|---|---|---|---|---|---|");
    for e in &table.budgets {
        let p = &e.point;
        println!(
            "| {:.2} | {:.4} | {:.4} | {:.4} | {:.4} | {:.3} ± {:.3} | {} |",
            e.budget,
            p.channel_threshold,
            p.block_threshold,
            p.exit_threshold,
            p.validation_accuracy,
            p.flop_fraction,
            p.flop_fraction_stderr,
            e.latency_ratio.map_or("–".into(), |r| format!("{r:.2}"))
        );
    }
    tracing::info!(path = %out.display(), points = table.budgets.len(), "calibration table written");
    Ok(())
}

/// Where points nearly as accurate as a budget's choice (within `--latency-margin`) exist,
/// times them all at batch 1 on the first `--latency-images` validation images, with the
/// dense network as the reference, and gives each budget the fastest (within 3%, the most
/// accurate of those: [`fastest_of`]). Every entry gets its measured latency ratio.
fn weigh_latency(
    model: &Model,
    validation: &Split,
    points: &[OperatingPoint],
    entries: &mut [BudgetEntry],
    args: &CalibrateArgs,
) -> anyhow::Result<()> {
    let candidates: Vec<Vec<OperatingPoint>> = entries
        .iter()
        .map(|e| {
            if e.budget >= 1.0 {
                vec![e.point.clone()]
            } else {
                let max = args.latency_candidates.max(1);
                near_best(points, e.budget, args.flops_confidence, args.latency_margin, max)
            }
        })
        .collect();
    let mut distinct: Vec<OperatingPoint> = Vec::new();
    for p in candidates.iter().flatten() {
        if !distinct.iter().any(|q| same_thresholds(p, q)) {
            distinct.push(p.clone());
        }
    }
    let n = args.latency_images.min(validation.len());
    tracing::info!(points = distinct.len(), images = n, "timing candidate points at batch 1");
    let inputs = (0..n).map(|i| validation.images(i..i + 1)).collect::<Result<Vec<_>, _>>()?;
    let mut policies = vec![GatePolicy::dense()];
    policies.extend(distinct.iter().map(|p| GatePolicy {
        channel_mode: ChannelMode::Slice,
        ..GatePolicy::with_thresholds(p.channel_threshold, p.block_threshold, p.exit_threshold)
    }));
    let timed = batch1_latencies(model, &inputs, &policies);
    let ratio_of = |p: &OperatingPoint| {
        distinct.iter().position(|q| same_thresholds(p, q)).and_then(|i| timed.get(i + 1)).map(|t| t.1)
    };
    for (entry, cands) in entries.iter_mut().zip(&candidates) {
        if entry.budget >= 1.0 {
            entry.latency_ratio = timed.first().map(|_| 1.0);
            continue;
        }
        let with_time: Vec<(OperatingPoint, f64)> =
            cands.iter().filter_map(|p| Some((p.clone(), ratio_of(p)?))).collect();
        let Some((point, ratio)) = fastest_of(&with_time, FASTER_BY) else { continue };
        if !same_thresholds(&point, &entry.point) {
            tracing::info!(
                budget = entry.budget,
                accuracy = point.validation_accuracy,
                instead_of = entry.point.validation_accuracy,
                flop_fraction = point.flop_fraction,
                latency_ratio = ratio,
                instead_of_ratio = ratio_of(&entry.point),
                "a nearly as accurate point runs faster"
            );
        }
        entry.point = point;
        entry.latency_ratio = Some(ratio);
    }
    Ok(())
}

/// `--flops-confidence`: a finite number of standard errors, not below 0.
fn non_negative(s: &str) -> Result<f64, String> {
    super::non_negative_number(s, "a number of standard errors")
}

/// How much faster (a fraction of the fastest candidate's latency) a point must measure to
/// be taken over a more accurate one: timing noise on a shared machine is a few percent.
const FASTER_BY: f64 = 0.03;
