//! The metric types sluice records into and the Prometheus text exposition (format 0.0.4)
//! written straight from their atomics.
//!
//! Why not a client library: a scrape's cost is what `/metrics` latency is made of on a
//! busy machine (docs/benchmarks.md, "Hostile traffic"). The `prometheus` crate copies every
//! sample into protobuf structs with owned label strings before encoding (~0.2–0.4 ms for
//! sluice's ~600 lines), and `prometheus-client` re-encodes every label set on every line
//! (no faster, measured). Here each series renders its label text once, when it is created,
//! and a scrape only appends names, that text and numbers to one buffer (docs/decisions.md).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};

/// A monotonically increasing count.
#[derive(Clone, Debug, Default)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    pub fn inc(&self) {
        self.inc_by(1);
    }

    pub fn inc_by(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// An integer that goes up and down.
#[derive(Clone, Debug, Default)]
pub struct Gauge(Arc<AtomicI64>);

impl Gauge {
    pub fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }

    pub fn dec(&self) {
        self.0.fetch_sub(1, Relaxed);
    }

    pub fn set(&self, v: i64) {
        self.0.store(v, Relaxed);
    }

    pub fn get(&self) -> i64 {
        self.0.load(Relaxed)
    }
}

/// A float that is set.
#[derive(Clone, Debug, Default)]
pub struct FloatGauge(Arc<AtomicU64>);

impl FloatGauge {
    pub fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Relaxed);
    }

    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Relaxed))
    }
}

/// A float that only increases (seconds spent in a state).
#[derive(Clone, Debug, Default)]
pub struct FloatCounter(Arc<AtomicU64>);

impl FloatCounter {
    /// Adds `v` (ignored unless finite and positive).
    pub fn inc_by(&self, v: f64) {
        if v.is_finite() && v > 0.0 {
            let _ = self.0.fetch_update(Relaxed, Relaxed, |bits| Some((f64::from_bits(bits) + v).to_bits()));
        }
    }

    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Relaxed))
    }
}

/// Observations counted into fixed buckets (`le` upper bounds), with their sum.
#[derive(Clone, Debug)]
pub struct Histogram(Arc<HistogramCore>);

#[derive(Debug)]
struct HistogramCore {
    bounds: &'static [f64],
    /// Per bucket, not cumulative; the last one is `+Inf`.
    counts: Box<[AtomicU64]>,
    /// The f64 bits of the sum of observations.
    sum: AtomicU64,
}

impl Histogram {
    /// A histogram with these ascending upper bounds (`+Inf` is implied).
    pub fn new(bounds: &'static [f64]) -> Self {
        let counts = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        Histogram(Arc::new(HistogramCore { bounds, counts, sum: AtomicU64::new(0) }))
    }

    pub fn observe(&self, v: f64) {
        let h = &self.0;
        h.counts[h.bounds.partition_point(|b| *b < v)].fetch_add(1, Relaxed);
        let _ = h.sum.fetch_update(Relaxed, Relaxed, |bits| Some((f64::from_bits(bits) + v).to_bits()));
    }

    /// Observations so far.
    pub fn get_sample_count(&self) -> u64 {
        self.0.counts.iter().map(|c| c.load(Relaxed)).sum()
    }
}

/// A metric kind: what a family writes per series (implemented by the kinds above).
pub trait Sample: Clone {
    const TYPE: &'static str;
    /// Appends this series' lines: `name`, the label text (`a="x",b="y"`, maybe empty),
    /// and the family's pre-rendered `le` values (histograms only).
    fn render(&self, name: &str, labels: &str, le: &[String], out: &mut String);
}

fn line(out: &mut String, name: &str, suffix: &str, labels: &str, extra: &str, value: impl Value) {
    out.push_str(name);
    out.push_str(suffix);
    if !labels.is_empty() || !extra.is_empty() {
        out.push('{');
        out.push_str(labels);
        if !labels.is_empty() && !extra.is_empty() {
            out.push(',');
        }
        out.push_str(extra);
        out.push('}');
    }
    out.push(' ');
    value.push_to(out);
    out.push('\n');
}

/// A sample value in the text format.
trait Value {
    fn push_to(self, out: &mut String);
}

impl Value for u64 {
    fn push_to(self, out: &mut String) {
        out.push_str(itoa::Buffer::new().format(self));
    }
}

impl Value for i64 {
    fn push_to(self, out: &mut String) {
        out.push_str(itoa::Buffer::new().format(self));
    }
}

impl Value for f64 {
    fn push_to(self, out: &mut String) {
        if self.is_finite() {
            out.push_str(ryu::Buffer::new().format_finite(self));
        } else if self.is_nan() {
            out.push_str("NaN");
        } else {
            out.push_str(if self > 0.0 { "+Inf" } else { "-Inf" });
        }
    }
}

impl Sample for Counter {
    const TYPE: &'static str = "counter";
    fn render(&self, name: &str, labels: &str, _: &[String], out: &mut String) {
        line(out, name, "", labels, "", self.get());
    }
}

impl Sample for Gauge {
    const TYPE: &'static str = "gauge";
    fn render(&self, name: &str, labels: &str, _: &[String], out: &mut String) {
        line(out, name, "", labels, "", self.get());
    }
}

impl Sample for FloatGauge {
    const TYPE: &'static str = "gauge";
    fn render(&self, name: &str, labels: &str, _: &[String], out: &mut String) {
        line(out, name, "", labels, "", self.get());
    }
}

impl Sample for FloatCounter {
    const TYPE: &'static str = "counter";
    fn render(&self, name: &str, labels: &str, _: &[String], out: &mut String) {
        line(out, name, "", labels, "", self.get());
    }
}

impl Sample for Histogram {
    const TYPE: &'static str = "histogram";
    fn render(&self, name: &str, labels: &str, le: &[String], out: &mut String) {
        // `+Inf` and `_count` are the same total, so a scrape is consistent even while
        // observations land.
        let mut total = 0;
        for (count, le) in self.0.counts.iter().zip(le) {
            total += count.load(Relaxed);
            line(out, name, "_bucket", labels, le, total);
        }
        line(out, name, "_sum", labels, "", f64::from_bits(self.0.sum.load(Relaxed)));
        line(out, name, "_count", labels, "", total);
    }
}

/// Anything a [`Registry`] renders.
pub trait Collect: Send + Sync {
    fn collect(&self, out: &mut String);
}

/// The series of one metric, by label values (label names fixed per family). Series render
/// in the order of their label values; each keeps its label text from creation.
pub struct Family<M, const N: usize> {
    inner: Arc<FamilyInner<M, N>>,
}

impl<M, const N: usize> Clone for Family<M, N> {
    fn clone(&self) -> Self {
        Family { inner: self.inner.clone() }
    }
}

struct FamilyInner<M, const N: usize> {
    name: &'static str,
    help: &'static str,
    labels: [&'static str; N],
    new: Box<dyn Fn() -> M + Send + Sync>,
    /// `le="…"` texts of a histogram's buckets, `+Inf` last; empty for other kinds.
    le: Vec<String>,
    /// By label text (`a="x",b="y"`), which is also what a scrape writes.
    series: RwLock<BTreeMap<String, M>>,
}

impl<M: Sample + Default + 'static, const N: usize> Family<M, N> {
    /// A counter or gauge family. Counter names end in `_total`.
    pub fn new(name: &'static str, help: &'static str, labels: [&'static str; N]) -> Self {
        Self::with(name, help, labels, Box::new(M::default), Vec::new())
    }
}

impl<const N: usize> Family<Histogram, N> {
    /// A histogram family with these ascending bucket bounds.
    pub fn histogram(
        name: &'static str,
        help: &'static str,
        labels: [&'static str; N],
        bounds: &'static [f64],
    ) -> Self {
        let mut le: Vec<String> =
            bounds.iter().map(|b| format!("le=\"{}\"", ryu::Buffer::new().format(*b))).collect();
        le.push("le=\"+Inf\"".to_string());
        Self::with(name, help, labels, Box::new(move || Histogram::new(bounds)), le)
    }
}

impl<M: Sample, const N: usize> Family<M, N> {
    fn with(
        name: &'static str,
        help: &'static str,
        labels: [&'static str; N],
        new: Box<dyn Fn() -> M + Send + Sync>,
        le: Vec<String>,
    ) -> Self {
        let inner = FamilyInner { name, help, labels, new, le, series: RwLock::new(BTreeMap::new()) };
        Family { inner: Arc::new(inner) }
    }

    /// The handle of the series with these label values, created (and from then on
    /// exported) the first time it is asked for.
    pub fn get(&self, values: [&str; N]) -> M {
        let mut key = String::new();
        for (i, (name, value)) in self.inner.labels.iter().zip(values).enumerate() {
            if i > 0 {
                key.push(',');
            }
            key.push_str(name);
            key.push_str("=\"");
            escape_label_value(value, &mut key);
            key.push('"');
        }
        let series = &self.inner.series;
        if let Some(m) = series.read().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return m.clone();
        }
        let mut all = series.write().unwrap_or_else(|e| e.into_inner());
        all.entry(key).or_insert_with(|| (self.inner.new)()).clone()
    }
}

impl<M: Sample + Send + Sync, const N: usize> Collect for Family<M, N> {
    fn collect(&self, out: &mut String) {
        let f = &*self.inner;
        let _ = write!(out, "# HELP {} {}\n# TYPE {} {}\n", f.name, f.help, f.name, M::TYPE);
        for (labels, m) in f.series.read().unwrap_or_else(|e| e.into_inner()).iter() {
            m.render(f.name, labels, &f.le, out);
        }
    }
}

/// Escapes `\`, `"` and newlines, as the text format wants label values.
fn escape_label_value(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Families and collectors, rendered in the order they were added.
#[derive(Default)]
pub struct Registry {
    parts: Vec<Box<dyn Collect>>,
}

impl Registry {
    pub fn add(&mut self, part: impl Collect + 'static) {
        self.parts.push(Box::new(part));
    }

    /// Appends the whole exposition to `out`.
    pub fn render_into(&self, out: &mut String) {
        for p in &self.parts {
            p.collect(out);
        }
    }
}

/// The process's CPU time, memory, file descriptors, threads and start time under the names
/// every Prometheus client exports (`process_*`), read from `/proc/self` at each scrape.
/// Where `/proc` cannot be read (not Linux), they are left out.
pub struct ProcessCollector;

impl Collect for ProcessCollector {
    fn collect(&self, out: &mut String) {
        let Ok(me) = procfs::process::Process::myself() else { return };
        let Ok(stat) = me.stat() else { return };
        let ticks = procfs::ticks_per_second() as f64;
        let mut one = |name: &str, kind: &str, help: &str, v: f64| {
            let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
            line(out, name, "", "", "", v);
        };
        let cpu = (stat.utime + stat.stime) as f64 / ticks;
        one("process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.", cpu);
        let rss = stat.rss * procfs::page_size();
        one("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", rss as f64);
        one("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.", stat.vsize as f64);
        one("process_threads", "gauge", "Number of OS threads in the process.", stat.num_threads as f64);
        if let Ok(boot) = procfs::boot_time_secs() {
            let start = boot as f64 + stat.starttime as f64 / ticks;
            one(
                "process_start_time_seconds",
                "gauge",
                "Start time of the process since unix epoch in seconds.",
                start,
            );
        }
        if let Ok(fds) = me.fd_count() {
            one("process_open_fds", "gauge", "Number of open file descriptors.", fds as f64);
        }
        // The soft limit by syscall: cheaper than parsing /proc/self/limits.
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit writes one rlimit into the struct it is given.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0
            && limit.rlim_cur != libc::RLIM_INFINITY
        {
            one(
                "process_max_fds",
                "gauge",
                "Maximum number of open file descriptors.",
                limit.rlim_cur as f64,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_render_sorted_escaped_series_in_the_text_format() {
        let mut r = Registry::default();
        let requests = Family::<Counter, 2>::new("t_requests_total", "Requests.", ["model", "outcome"]);
        let latency = Family::<Histogram, 1>::histogram("t_seconds", "Latency.", ["model"], &[0.5, 1.0]);
        let depth = Family::<Gauge, 0>::new("t_depth", "Depth.", []);
        r.add(requests.clone());
        r.add(latency.clone());
        r.add(depth.clone());
        requests.get(["b", "ok"]).inc_by(3);
        requests.get(["a\"\\\nx", "ok"]).inc();
        assert_eq!(requests.get(["b", "ok"]).get(), 3, "the same series, not a new one");
        let h = latency.get(["m"]);
        for v in [0.25, 0.5, 0.75, 9.0] {
            h.observe(v);
        }
        depth.get([]).set(-2);
        let mut text = String::new();
        r.render_into(&mut text);
        assert_eq!(
            text,
            "# HELP t_requests_total Requests.\n# TYPE t_requests_total counter\n\
             t_requests_total{model=\"a\\\"\\\\\\nx\",outcome=\"ok\"} 1\n\
             t_requests_total{model=\"b\",outcome=\"ok\"} 3\n\
             # HELP t_seconds Latency.\n# TYPE t_seconds histogram\n\
             t_seconds_bucket{model=\"m\",le=\"0.5\"} 2\n\
             t_seconds_bucket{model=\"m\",le=\"1.0\"} 3\n\
             t_seconds_bucket{model=\"m\",le=\"+Inf\"} 4\n\
             t_seconds_sum{model=\"m\"} 10.5\n\
             t_seconds_count{model=\"m\"} 4\n\
             # HELP t_depth Depth.\n# TYPE t_depth gauge\n\
             t_depth -2\n"
        );
        assert_eq!(h.get_sample_count(), 4);
    }

    #[test]
    fn non_finite_values_are_written_as_the_format_spells_them() {
        let mut out = String::new();
        for v in [f64::INFINITY, f64::NEG_INFINITY, f64::NAN, 0.25] {
            v.push_to(&mut out);
            out.push(' ');
        }
        assert_eq!(out, "+Inf -Inf NaN 0.25 ");
    }

    #[test]
    fn the_process_collector_writes_its_metrics() {
        let mut out = String::new();
        ProcessCollector.collect(&mut out);
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_max_fds",
        ] {
            assert!(out.contains(&format!("\n{name} ")), "{name} missing:\n{out}");
        }
    }
}
