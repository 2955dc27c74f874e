//! Logs and traces: text or JSON on stderr, filtered by `SLUICE_LOG` (default `info`), and,
//! with the `otlp` feature and `--otlp-endpoint`, spans exported over OTLP/gRPC.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// How logs are written.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Keeps the OTLP exporter alive; flushes it when dropped.
pub struct LoggingGuard {
    #[cfg(feature = "otlp")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for LoggingGuard {
    fn drop(&mut self) {
        #[cfg(feature = "otlp")]
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

/// Installs the global subscriber. `otlp_endpoint` is honoured only when built with the
/// `otlp` feature (it is an error to ask for it otherwise).
pub fn init(format: LogFormat, otlp_endpoint: Option<&str>) -> anyhow::Result<LoggingGuard> {
    let filter = EnvFilter::try_from_env("SLUICE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: redirected logs stay plain text for grep and collectors.
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    let registry = tracing_subscriber::registry().with(filter).with(fmt);
    #[cfg(feature = "otlp")]
    {
        if let Some(endpoint) = otlp_endpoint {
            use opentelemetry::trace::TracerProvider as _;
            use opentelemetry_otlp::WithExportConfig;
            let exporter =
                opentelemetry_otlp::SpanExporter::builder().with_tonic().with_endpoint(endpoint).build()?;
            let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(opentelemetry_sdk::Resource::builder().with_service_name("sluice").build())
                .build();
            let tracer = provider.tracer("sluice");
            registry.with(tracing_opentelemetry::layer().with_tracer(tracer)).try_init()?;
            return Ok(LoggingGuard { provider: Some(provider) });
        }
        registry.try_init()?;
        Ok(LoggingGuard { provider: None })
    }
    #[cfg(not(feature = "otlp"))]
    {
        if otlp_endpoint.is_some() {
            anyhow::bail!("--otlp-endpoint needs a build with `--features otlp`");
        }
        registry.try_init()?;
        Ok(LoggingGuard {})
    }
}
