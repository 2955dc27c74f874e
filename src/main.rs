use clap::Parser;
use sluice::cli::Cli;

fn main() -> std::process::ExitCode {
    // Before anything allocates activations: keep freed ones for the next forward
    // (src/engine/memory.rs). Off glibc this is a no-op, and nothing depends on it.
    sluice::engine::memory::retain_freed_memory();
    let cli = Cli::parse();
    let _logging = match sluice::observability::logging::init(cli.log_format, cli.otlp_endpoint.as_deref()) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match sluice::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
