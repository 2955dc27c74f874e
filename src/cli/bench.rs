//! `sluice bench engine`: the realized-speedup table of gating (markdown, or JSON lines);
//! `sluice bench forward`: one model folder's forward pass; `sluice bench widths`: what each
//! channel-gate width costs in time.

use clap::{Args, Subcommand};

use crate::bench::engine::{self, BenchPlan, GateKind};

/// `sluice bench ...`
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Time gated vs dense engines at measured FLOP fractions (random gate weights).
    Engine(EngineArgs),
    /// Time a model folder's forward pass alone (engine only, no server) on one input.
    Forward(ForwardArgs),
    /// Time one residual block per stage at every width a channel gate may choose: where a
    /// narrower width saves FLOPs but not time on this CPU.
    Widths(WidthsArgs),
}

/// Arguments of `sluice bench widths`.
#[derive(Debug, Args)]
pub struct WidthsArgs {
    /// Architecture: resnet20/32/56 (CIFAR-style), resnet18/34/50 (torchvision).
    #[arg(long, env = "SLUICE_BENCH_ARCH", default_value = "resnet20")]
    pub arch: String,
    /// Input size CxHxW (each at most 1024).
    #[arg(long, env = "SLUICE_BENCH_DIMS", default_value = "3x32x32")]
    pub dims: super::Shape,
    /// Inputs per call (at most 256).
    #[arg(long, env = "SLUICE_BENCH_BATCH", default_value_t = 1)]
    pub batch: i64,
    /// Interleaved rounds; each times every width (medians are reported).
    #[arg(long, env = "SLUICE_BENCH_ROUNDS", default_value_t = 15)]
    pub rounds: usize,
    /// Calls per timing.
    #[arg(long, env = "SLUICE_BENCH_CALLS", default_value_t = 200)]
    pub calls: usize,
    /// One JSON object per row instead of a markdown table.
    #[arg(long, env = "SLUICE_BENCH_JSON")]
    pub json: bool,
    #[arg(long, env = "SLUICE_THREADS", default_value_t = 2)]
    pub threads: usize,
}

fn widths(args: &WidthsArgs) -> anyhow::Result<()> {
    use crate::bench::widths::{WidthsPlan, cpu_caption, markdown_header, markdown_row, run};
    tch::set_num_threads(args.threads.max(1) as i32);
    let dims = match args.dims.0.as_slice() {
        &[c, h, w] => [c, h, w],
        _ => anyhow::bail!("--dims must be CxHxW"),
    };
    let plan = WidthsPlan {
        arch: args.arch.clone(),
        dims,
        batch: args.batch,
        rounds: args.rounds,
        calls: args.calls,
    };
    if !args.json {
        println!("{} at batch {}, {} threads; {}\n", args.arch, args.batch, args.threads, cpu_caption());
        println!("{}", markdown_header());
    }
    run(&plan, |row| {
        if args.json {
            println!("{}", serde_json::to_string(row).unwrap_or_default());
        } else {
            println!("{}", markdown_row(row));
        }
    })?;
    Ok(())
}

/// Arguments of `sluice bench forward`.
#[derive(Debug, Args)]
pub struct ForwardArgs {
    /// The model folder.
    pub model: std::path::PathBuf,
    /// A JSON tensor `{"shape": [N, C, H, W], "data": [...]}`; default: zeros of batch 1.
    #[arg(long, env = "SLUICE_BENCH_INPUT")]
    pub input: Option<std::path::PathBuf>,
    #[arg(long, env = "SLUICE_BENCH_ITERATIONS", default_value_t = 500)]
    pub iterations: usize,
    /// Untimed forwards first (the first calls after loading are slow).
    #[arg(long, env = "SLUICE_BENCH_WARMUP", default_value_t = 20)]
    pub warmup: usize,
    /// Run at this calibrated budget instead of the model's configured policy.
    #[arg(long, env = "SLUICE_BENCH_BUDGET")]
    pub budget: Option<f64>,
    #[arg(long, env = "SLUICE_THREADS", default_value_t = 2)]
    pub threads: usize,
    #[command(flatten)]
    pub format: super::FormatArgs,
    /// Also time forwards that follow this many microseconds of idling, as a lightly loaded
    /// server's do: every other iteration idles first and is reported as `after_gap_*`.
    #[arg(long, default_value_t = 0)]
    pub gap_us: u64,
    /// Idle by busy-waiting instead of sleeping (a sleeping thread's vCPU may halt).
    #[arg(long, requires = "gap_us")]
    pub gap_spin: bool,
}

/// Idles for `gap`: sleeping, or busy-waiting when `spin`.
fn idle(gap: std::time::Duration, spin: bool) {
    if !spin {
        return std::thread::sleep(gap);
    }
    let start = std::time::Instant::now();
    while start.elapsed() < gap {
        std::hint::spin_loop();
    }
}

fn forward(args: &ForwardArgs) -> anyhow::Result<()> {
    use crate::bench::timing::median;
    tch::set_num_threads(args.threads.max(1) as i32);
    let _guard = tch::no_grad_guard();
    let dir = crate::repository::ModelDir::open(&args.model)?;
    let model = crate::engine::Model::build(&args.format.source(&dir)?)?;
    let x = match &args.input {
        Some(path) => {
            #[derive(serde::Deserialize)]
            struct TensorFile {
                shape: Vec<i64>,
                data: Vec<f32>,
            }
            let f: TensorFile = serde_json::from_str(&std::fs::read_to_string(path)?)?;
            tch::Tensor::from_slice(&f.data).view(f.shape.as_slice())
        }
        None => {
            let [c, h, w] = dir.config.input.dims;
            tch::Tensor::zeros([1, c, h, w], tch::kind::FLOAT_CPU)
        }
    };
    let mut policy = dir.config.policy.clone();
    if let Some(b) = args.budget.or(policy.budget) {
        let path = dir.calibration_path().ok_or_else(|| anyhow::anyhow!("no calibration table"))?;
        policy = crate::control::calibration::CalibrationTable::load(&path)?.policy_for(b)?;
    }
    for _ in 0..args.warmup {
        let _ = model.forward(&x, &policy)?;
    }
    let gap = std::time::Duration::from_micros(args.gap_us);
    let mut times = Vec::with_capacity(args.iterations);
    let mut after_gap = Vec::new();
    let mut flops = 0;
    for i in 0..args.iterations {
        let gapped = !gap.is_zero() && i % 2 == 1;
        if gapped {
            idle(gap, args.gap_spin);
        }
        let start = std::time::Instant::now();
        let (_, reports) = model.forward(&x, &policy)?;
        let ms = start.elapsed().as_secs_f64() * 1e3;
        if gapped {
            after_gap.push(ms)
        } else {
            times.push(ms)
        }
        flops = reports.iter().map(|r| r.executed_flops).sum::<u64>();
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let mut report = serde_json::json!({
        "model": dir.config.name,
        "median_ms": median(&times),
        "p90_ms": sorted.get((sorted.len() * 9) / 10).copied().unwrap_or(0.0),
        "iterations": args.iterations,
        "executed_flops": flops,
        "threads": args.threads,
    });
    if !gap.is_zero() {
        report["gap_us"] = args.gap_us.into();
        report["gap"] = if args.gap_spin { "spin" } else { "sleep" }.into();
        report["after_gap_median_ms"] = median(&after_gap).into();
    }
    println!("{report}");
    Ok(())
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
    /// `gates.width_levels` of the gated models (default: a model's default, 8). 4 keeps
    /// ResNet-50's first-stage widths multiples of 16 (docs/gating.md, "Choosing widths").
    #[arg(long, env = "SLUICE_BENCH_WIDTH_LEVELS", value_parser = clap::value_parser!(i64).range(1..=64))]
    pub width_levels: Option<i64>,
    /// Layout and precision of both engines (precision default: fp32).
    #[command(flatten)]
    pub format: super::FormatArgs,
}

pub fn run(command: &BenchCommand) -> anyhow::Result<()> {
    let args = match command {
        BenchCommand::Engine(args) => args,
        BenchCommand::Forward(args) => return forward(args),
        BenchCommand::Widths(args) => return widths(args),
    };
    tch::set_num_threads(args.threads.max(1) as i32);
    let mut plan = BenchPlan::standard(args.rounds);
    plan.targets = args.targets.clone();
    plan.width_levels = args.width_levels;
    plan.format = crate::engine::Format::new(args.format.layout, args.format.precision.unwrap_or_default());
    plan.format.check().map_err(anyhow::Error::msg)?;
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
