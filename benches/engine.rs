//! Dense engine latency (criterion): ResNet-50 at 1x3x224x224, ResNet-20 at 1x1x28x28 and
//! 32x1x28x28, channels-last (the default), NCHW and oneDNN-packed, in FP32 and (where the
//! CPU has it) bf16. Run: `cargo bench --bench engine`.
//! Threads: SLUICE_BENCH_THREADS (default 2, this machine's cores).

use criterion::{Criterion, criterion_group, criterion_main};
use sluice::engine::{ArchSpec, Format, GatePolicy, Layout, Model, ModelSource, Precision};
use tch::{Device, Kind, Tensor};

fn threads() -> i32 {
    std::env::var("SLUICE_BENCH_THREADS").ok().and_then(|t| t.parse().ok()).unwrap_or(2)
}

fn dense(c: &mut Criterion) {
    tch::set_num_threads(threads());
    let _guard = tch::no_grad_guard();
    let cases = [("resnet50", 3, 1000, 1, 224), ("resnet20", 1, 10, 1, 28), ("resnet20", 1, 10, 32, 28)];
    for (arch, channels, classes, batch, hw) in cases {
        let mut group = c.benchmark_group(format!("dense/{arch}/b{batch}x{hw}"));
        group.sample_size(if arch == "resnet50" { 20 } else { 50 });
        let precisions: &[Precision] = if Precision::Bf16.check().is_ok() {
            &[Precision::Fp32, Precision::Bf16]
        } else {
            &[Precision::Fp32]
        };
        for &precision in precisions {
            for layout in [Layout::ChannelsLast, Layout::Nchw, Layout::Onednn] {
                let spec = ArchSpec::named(arch, channels, classes).unwrap();
                let format = Format::new(layout, precision);
                let model = Model::build(&ModelSource { format, ..ModelSource::random(spec, 0) }).unwrap();
                let x = Tensor::randn([batch, channels, hw, hw], (Kind::Float, Device::Cpu));
                let dense = GatePolicy::dense();
                group.bench_function(format!("{layout:?}/{precision}"), |b| {
                    b.iter(|| model.forward(&x, &dense).unwrap())
                });
            }
        }
        group.finish();
    }
}

criterion_group!(benches, dense);
criterion_main!(benches);
