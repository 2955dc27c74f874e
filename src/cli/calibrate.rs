//! `sluice calibrate <model-dir>`: sweep thresholds on a dataset's validation split
//! (`--data`) and write the budget → thresholds table beside the weights.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::control::calibration::{
    CALIBRATION_FILE, CalibrationTable, budget_table, default_budgets, dense_point, frontier,
};
use crate::engine::{ChannelMode, Model};
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
    let points =
        sweep_refined(&model, &validation, &grid, 500, &budgets, args.max_gap, rounds, |done, total| {
            if done % 10 == 0 || done == total {
                tracing::info!(done, total, "threshold pairs measured");
            }
        })?;
    let dense = dense_point(&points).cloned().context("the sweep measured no dense point")?;
    let frontier = frontier(&points);
    let table = CalibrationTable {
        model: dir.config.name.clone(),
        split: "validation".into(),
        images: validation.len(),
        channel_mode: ChannelMode::Slice,
        budgets: budget_table(&frontier, &budgets, &dense),
        frontier,
    };
    let out = args.out.clone().unwrap_or_else(|| args.model.join(CALIBRATION_FILE));
    table.save(&out)?;
    println!("| budget | channel t | block t | exit t | validation accuracy | FLOP fraction |");
    println!("|---|---|---|---|---|---|");
    for e in &table.budgets {
        let p = &e.point;
        println!(
            "| {:.2} | {:.4} | {:.4} | {:.4} | {:.4} | {:.3} |",
            e.budget,
            p.channel_threshold,
            p.block_threshold,
            p.exit_threshold,
            p.validation_accuracy,
            p.flop_fraction
        );
    }
    tracing::info!(path = %out.display(), points = table.budgets.len(), "calibration table written");
    Ok(())
}
