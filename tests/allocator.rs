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
    /// ResNet-20 at 16 × 112 × 112: its first stage's activations are 12.8 MB each, above
    /// glibc's default thresholds and below the retained ones.
    const ACTIVATION_PAGES: i64 = 16 * 16 * 112 * 112 * 4 / 4096;

    /// Minor page faults of the whole process so far.
    fn minor_faults() -> i64 {
        // SAFETY: getrusage writes into the struct it is given and nothing else.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) }, 0);
        usage.ru_minflt
    }

    /// Median page faults per forward over five forwards, after two to warm up, on a new
    /// thread.
    fn faults_per_forward() -> i64 {
        std::thread::spawn(|| {
            let _guard = tch::no_grad_guard();
            let spec = ArchSpec::named("resnet20", 1, 10).unwrap();
            let (_vs, params) = load_params(&ModelSource::random(spec, 0)).unwrap();
            let net = FoldedResNet::fold(&params.backbone, Format::from(Layout::ChannelsLast));
            let x = Tensor::randn([16, 1, 112, 112], (Kind::Float, Device::Cpu));
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
        .join()
        .expect("the measuring thread panicked")
    }

    pub fn main() {
        if std::env::var_os(CHILD).is_some() {
            println!("{}", faults_per_forward());
            return;
        }
        let me = std::env::current_exe().expect("the test binary's path");
        let out = Command::new(me).env(CHILD, "1").output().expect("running the test binary again");
        assert!(out.status.success(), "the defaults run failed: {}", String::from_utf8_lossy(&out.stderr));
        let by_default: i64 =
            String::from_utf8_lossy(&out.stdout).trim().parse().expect("the defaults run prints a count");

        assert!(retain_freed_memory(), "glibc refused the thresholds");
        let retained = faults_per_forward();
        println!(
            "page faults per forward: {by_default} with glibc's defaults, {retained} retained \
             (one activation: {ACTIVATION_PAGES} pages)"
        );
        assert!(
            by_default >= ACTIVATION_PAGES,
            "glibc's defaults fault fewer pages per forward than one activation has: this check \
             no longer shows what it guards against"
        );
        assert!(retained * 20 < ACTIVATION_PAGES, "freed activations are faulted in again");
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
