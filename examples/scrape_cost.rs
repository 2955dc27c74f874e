//! What one `/metrics` scrape costs to render, in-process: the shipped repository's two
//! models' series (9 gated blocks each), rendered back to back ("hot") and after 20 ms
//! asleep each time, as a scrape every 20 ms finds the CPU ("after 20 ms asleep").
//!
//!     cargo run --release --example scrape_cost
//!
//! Figures: docs/benchmarks.md, "Hostile traffic (issue 11)".

use std::time::{Duration, Instant};

use sluice::observability::{BlockGates, Metrics};

fn main() {
    let m = Metrics::new();
    let blocks: Vec<BlockGates> = (1..=3)
        .flat_map(|layer| {
            (0..3).map(move |b| BlockGates {
                prefix: format!("layer{layer}.{b}"),
                block_gate: true,
                channel_gate: true,
                inner_width: 16 << (layer - 1),
            })
        })
        .collect();
    let models: Vec<_> = ["fashion-resnet20", "fashion-resnet20-image"]
        .into_iter()
        .map(|name| {
            let model = m.model(name, &blocks, "fp32");
            for i in 0..100 {
                model.http.finished("success", 0.001 * f64::from(i));
                model.grpc.finished("success", 0.002);
            }
            model
        })
        .collect();
    for protocol in ["http", "grpc"] {
        let _ = m.requests(sluice::observability::NO_MODEL, protocol);
        let _ = m.listener(protocol);
    }
    let time = |pause: Duration, n: usize| {
        let mut took: Vec<Duration> = (0..n)
            .map(|_| {
                std::thread::sleep(pause);
                let t = Instant::now();
                std::hint::black_box(m.render());
                t.elapsed()
            })
            .collect();
        took.sort();
        took
    };
    let bytes = m.render().len();
    for (name, took) in
        [("hot", time(Duration::ZERO, 2000)), ("after 20 ms asleep", time(Duration::from_millis(20), 300))]
    {
        let q = |p: f64| took[((took.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e6;
        println!(
            "{name}: {} renders of {bytes} bytes, p50 {:.0} µs, p90 {:.0}, p99 {:.0}, max {:.0}",
            took.len(),
            q(0.5),
            q(0.9),
            q(0.99),
            q(1.0)
        );
    }
    drop(models);
}
