//! `sluice bench engine`: the realized-speedup table of gating (markdown, or JSON lines).

use clap::{Args, Subcommand};

use crate::bench::engine::{self, BenchPlan, GateKind};

/// `sluice bench ...`
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Time gated vs dense engines at measured FLOP fractions (random gate weights).
    Engine(EngineArgs),
}

/// Arguments of `sluice bench engine`.
#[derive(Debug, Args)]
pub struct EngineArgs {
    /// One JSON object per row instead of a markdown table.
    #[arg(long, env = "SLUICE_BENCH_JSON")]
    pub json: bool,
    /// Interleaved rounds per row (halved for the large inputs).
    #[arg(long, env = "SLUICE_BENCH_ROUNDS", default_value_t = 20)]
    pub rounds: usize,
    /// libtorch intra-op threads.
    #[arg(long, env = "SLUICE_THREADS", default_value_t = 2)]
    pub threads: usize,
    /// Only these models (default: resnet50 and resnet20).
    #[arg(long, env = "SLUICE_BENCH_MODELS", value_delimiter = ',')]
    pub models: Vec<String>,
    /// Only these gate kinds.
    #[arg(long, env = "SLUICE_BENCH_GATES", value_delimiter = ',', value_enum)]
    pub gates: Vec<GateKind>,
    /// Only these batch sizes.
    #[arg(long, env = "SLUICE_BENCH_BATCHES", value_delimiter = ',')]
    pub batches: Vec<i64>,
    /// Target FLOP fractions.
    #[arg(long, env = "SLUICE_BENCH_TARGETS", value_delimiter = ',', default_value = "0.75,0.5,0.3")]
    pub targets: Vec<f64>,
}

pub fn run(command: &BenchCommand) -> anyhow::Result<()> {
    let BenchCommand::Engine(args) = command;
    tch::set_num_threads(args.threads.max(1) as i32);
    let mut plan = BenchPlan::standard(args.rounds);
    plan.targets = args.targets.clone();
    if !args.models.is_empty() {
        plan.cases.retain(|(m, _, _)| args.models.contains(m));
    }
    if !args.batches.is_empty() {
        plan.cases.retain(|(_, _, b)| args.batches.contains(b));
    }
    if !args.gates.is_empty() {
        plan.gates = args.gates.clone();
    }
    if !args.json {
        println!("{}", engine::markdown_header());
    }
    engine::run(&plan, |row| {
        if args.json {
            println!("{}", serde_json::to_string(row).unwrap_or_default());
        } else {
            println!("{}", engine::markdown_row(row));
        }
    })?;
    Ok(())
}
