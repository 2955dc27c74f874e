//! The C allocator keeps freed activations for the next forward (src/engine/memory.rs).
//!
//! No test harness: the allocator's settings are process-wide and one-way, and the
//! process's page-fault count must be this check's alone. So the binary runs itself once
//! more with glibc's defaults (`SLUICE_ALLOCATOR_CHILD`), then changes them as `sluice`'s
//! `main` does and measures again. Both measure on a thread of their own, as the server's
//! engine threads run forwards.

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod check {
    use std::process::Command;

    use sluice::engine::ArchSpec;
    use sluice::engine::folded::{FoldedResNet, Layout};
    use sluice::engine::memory::retain_freed_memory;
    use sluice::engine::model::load_params;
    use sluice::engine::{Format, ModelSource};
    use tch::{Device, Kind, Tensor};

    const CHILD: &str = "SLUICE_ALLOCATOR_CHILD";
    /// ResNet-20 at 112 × 112: a first-stage activation of a batch of 16 is 12.8 MB (above
    /// glibc's default thresholds, below the largest mmap threshold it accepts, 32 MiB), of
    /// a batch of 48 38.5 MB (above both).
    const BATCHES: [i64; 2] = [16, 48];

    /// The pages of one first-stage activation (16 channels) of a batch of `batch`.
    fn activation_pages(batch: i64) -> i64 {
        batch * 16 * 112 * 112 * 4 / 4096
    }

    /// Minor page faults of the whole process so far.
    fn minor_faults() -> i64 {
        // SAFETY: getrusage writes into the struct it is given and nothing else.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) }, 0);
        usage.ru_minflt
    }

    /// Median page faults per forward at each of [`BATCHES`] (five forwards each, after two
    /// to warm up), on a new thread.
    fn faults_per_forward() -> Vec<i64> {
        std::thread::spawn(|| {
            let _guard = tch::no_grad_guard();
            let spec = ArchSpec::named("resnet20", 1, 10).unwrap();
            let (_vs, params) = load_params(&ModelSource::random(spec, 0)).unwrap();
            let net = FoldedResNet::fold(&params.backbone, Format::from(Layout::ChannelsLast));
            BATCHES
                .iter()
                .map(|&batch| {
                    let x = Tensor::randn([batch, 1, 112, 112], (Kind::Float, Device::Cpu));
                    for _ in 0..2 {
                        let _ = net.forward(&x);
                    }
                    let mut each: Vec<i64> = (0..5)
                        .map(|_| {
                            let before = minor_faults();
                            let _ = net.forward(&x);
                            minor_faults() - before
                        })
                        .collect();
                    each.sort_unstable();
                    each[2]
                })
                .collect()
        })
        .join()
        .expect("the measuring thread panicked")
    }

    pub fn main() {
        if std::env::var_os(CHILD).is_some() {
            let counts: Vec<String> = faults_per_forward().iter().map(i64::to_string).collect();
            println!("{}", counts.join(" "));
            return;
        }
        let me = std::env::current_exe().expect("the test binary's path");
        let out = Command::new(me).env(CHILD, "1").output().expect("running the test binary again");
        assert!(out.status.success(), "the defaults run failed: {}", String::from_utf8_lossy(&out.stderr));
        let by_default: Vec<i64> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(|n| n.parse().expect("the defaults run prints counts"))
            .collect();
        assert_eq!(by_default.len(), BATCHES.len(), "the defaults run prints one count per batch");

        assert!(retain_freed_memory(), "glibc refused the settings");
        let retained = faults_per_forward();
        for ((batch, default), kept) in BATCHES.iter().zip(&by_default).zip(&retained) {
            let pages = activation_pages(*batch);
            println!(
                "batch {batch}: page faults per forward: {default} with glibc's defaults, {kept} \
                 retained (one activation: {pages} pages)"
            );
            assert!(
                *default >= pages,
                "batch {batch}: glibc's defaults fault fewer pages per forward than one activation \
                 has: this check no longer shows what it guards against"
            );
            assert!(kept * 20 < pages, "batch {batch}: freed activations are faulted in again");
        }
        println!("test {} ... ok", super::NAME);
    }
}

/// The check's name, as a test runner lists it.
const NAME: &str = "freed_activations_are_reused_without_page_faults";

fn main() {
    // Answer a runner's listing the way libtest does (cargo-nextest lists every test binary
    // with `--list --format terse`, ignored ones with `--ignored` too), then run on any other
    // arguments.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        if cfg!(all(target_os = "linux", target_env = "gnu")) && !args.iter().any(|a| a == "--ignored") {
            println!("{NAME}: test");
        }
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    check::main();
}
