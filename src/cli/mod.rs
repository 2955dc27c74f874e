//! The `sluice` command line (clap derive; every option also reads an environment variable).

mod bench;
mod calibrate;
mod ctl;
pub mod eval;
mod model_import;
mod model_info;
mod model_tools;
mod plot;
mod serve;
mod train;

use clap::{Parser, Subcommand};

pub use model_info::InfoArgs;
pub use train::TrainArgs;

/// sluice: serve dynamically pruned CNNs and prove the compute they skip.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, about, propagate_version = true)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, env = "SLUICE_LOG_FORMAT", value_enum, default_value = "text", global = true)]
    pub log_format: LogFormat,
    /// Export tracing spans over OTLP/gRPC to this collector (builds with `--features otlp`).
    #[arg(long, env = "SLUICE_OTLP_ENDPOINT", global = true)]
    pub otlp_endpoint: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

pub use crate::observability::logging::LogFormat;

/// sluice's subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Inspect models.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Control a running server (its gating policies).
    #[command(subcommand)]
    Ctl(ctl::CtlCommand),
    /// Serve a model repository over HTTP and gRPC (KServe v2 / Triton compatible).
    Serve(serve::ServeArgs),
    /// Sweep gate thresholds on the validation split; write the budget table.
    Calibrate(calibrate::CalibrateArgs),
    /// Test accuracy, FLOPs and batch-1 latency at every calibrated budget; write a report.
    Eval(eval::EvalArgs),
    /// Benchmarks that print tables.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Train a gated model (from scratch, or retrofitted onto a dense one with --init) on a
    /// dataset (--data), resumably, and export it as a model folder.
    Train(TrainArgs),
}

/// `sluice model ...`
#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Print an architecture's or a model folder's layers, parameters and dense FLOPs.
    Info(InfoArgs),
    /// Create a model folder with random weights (fixtures, benchmarks, a starting point).
    Init(model_tools::InitArgs),
    /// Make a model folder from a dense checkpoint trained elsewhere (safetensors, torchvision
    /// names), checked against the unfused network before it is written.
    Import(model_import::ImportArgs),
    /// Run a model folder on a JSON tensor locally and print logits and compute reports.
    Predict(model_tools::PredictArgs),
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Model(ModelCommand::Info(args)) => model_info::run(&args),
        Command::Model(ModelCommand::Init(args)) => model_tools::init(&args),
        Command::Model(ModelCommand::Import(args)) => model_import::run(&args),
        Command::Model(ModelCommand::Predict(args)) => model_tools::predict(&args),
        Command::Train(args) => train::run(&args),
        Command::Bench(command) => bench::run(&command),
        Command::Calibrate(args) => calibrate::run(&args),
        Command::Serve(args) => serve::run(&args),
        Command::Ctl(command) => ctl::run(&command),
        Command::Eval(args) => eval::run(&args),
    }
}

/// A tensor shape given on the command line as `1x3x224x224`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shape(pub Vec<i64>);

impl std::str::FromStr for Shape {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let dims: Result<Vec<i64>, _> =
            text.split(['x', 'X', ',']).map(|d| d.trim().parse::<i64>()).collect();
        match dims {
            Ok(d) if !d.is_empty() && d.iter().all(|&v| v > 0) => Ok(Shape(d)),
            _ => Err(format!("`{text}` is not a shape like 1x3x224x224 (positive integers joined by x)")),
        }
    }
}

/// How an offline command builds a model's network: `--layout` and `--precision`
/// (default: channels-last and the model's configured precision).
#[derive(Clone, Debug, clap::Args)]
pub struct FormatArgs {
    /// Memory layout: channels-last, nchw or onednn.
    #[arg(long, env = "SLUICE_LAYOUT", default_value = "onednn")]
    pub layout: crate::engine::Layout,
    /// Number format, overriding the model's `precision`: fp32 or bf16.
    #[arg(long, env = "SLUICE_PRECISION")]
    pub precision: Option<crate::engine::Precision>,
}

impl FormatArgs {
    /// The model's source in this format; bf16 on a CPU without it is an error saying so.
    pub fn source(&self, dir: &crate::repository::ModelDir) -> anyhow::Result<crate::engine::ModelSource> {
        let mut source = dir.source(self.layout);
        if let Some(p) = self.precision {
            source.format.precision = p;
        }
        source.format.check().map_err(anyhow::Error::msg)?;
        Ok(source)
    }
}

/// Which dataset an offline command reads: `--data` (docs/datasets.md).
#[derive(Clone, Debug, clap::Args)]
pub struct DataArgs {
    /// fashion-mnist[:DIR] (default; DIR defaults to $SLUICE_DATA_DIR or Debian's folder),
    /// idx:DIR, cifar10:DIR, cifar100:DIR or imagefolder:DIR.
    #[arg(long, env = "SLUICE_DATA", default_value = "fashion-mnist")]
    pub data: crate::data::DataSpec,
    /// The most MiB of decoded pixels a dataset is held in memory for (all splits); a larger
    /// image folder streams its files from disk, batch by batch (IDX and CIFAR are refused).
    #[arg(long, env = "SLUICE_DATA_MEMORY_MIB", default_value_t = crate::data::DEFAULT_MEMORY_LIMIT >> 20)]
    pub data_memory_mib: u64,
}

/// A finite number not below 0 for a flag's value parser; the error names `what` it should be.
fn non_negative_number(s: &str, what: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("expected {what} >= 0, got `{s}`")),
    }
}

/// The normalisation a model folder records (`[input.image] mean, std`), if any.
pub fn recorded_normalization(dir: &crate::repository::ModelDir) -> Option<crate::data::Normalization> {
    let image = dir.config.input.image.as_ref()?;
    Some(crate::data::Normalization { mean: image.mean.clone(), std: image.std.clone() })
}

impl DataArgs {
    /// The dataset asked for (Fashion-MNIST from `$SLUICE_DATA_DIR` when set).
    pub fn spec(&self) -> crate::data::DataSpec {
        match (&self.data, std::env::var_os("SLUICE_DATA_DIR")) {
            (d, Some(dir)) if *d == crate::data::DataSpec::default() => {
                crate::data::DataSpec::FashionMnist(dir.into())
            }
            (d, _) => d.clone(),
        }
    }

    /// `--data-memory-mib` in bytes.
    pub fn memory_limit(&self) -> u64 {
        self.data_memory_mib.saturating_mul(1 << 20)
    }

    /// The dataset at `dir`'s input size, checked against its input and classes, normalised
    /// as the model records (`[input.image]`), else with the dataset's own statistics.
    pub fn load_for(&self, dir: &crate::repository::ModelDir) -> anyhow::Result<crate::data::Dataset> {
        let dims = dir.config.input.dims;
        let spec = self.spec();
        let data = spec.load(Some(dims), self.memory_limit(), recorded_normalization(dir).as_ref())?;
        data.check_fits(dims, dir.config.output.labels.len())
            .map_err(|e| anyhow::anyhow!("{}: {e}", spec))?;
        Ok(data)
    }
}
