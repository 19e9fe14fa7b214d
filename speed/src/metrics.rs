//! Prometheus metrics with constant names and no per-entity labels, rendered as text.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Shards per metric. Threads that count at once (the server's workers) each write their own
/// cache line instead of passing one line back and forth on every request; reads add the
/// shards up.
const SHARDS: usize = 8;

/// One shard's count, alone on its cache lines.
#[derive(Default)]
#[repr(align(128))]
struct Slot(AtomicU64);

/// The shard of the calling thread: threads take shards in turn as they first count.
fn shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    SHARD.with(|s| *s)
}

/// A monotonically increasing count.
#[derive(Default)]
pub struct Counter([Slot; SHARDS]);

impl Counter {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0[shard()].0.fetch_add(n, Ordering::Relaxed);
    }
    /// The current count.
    pub fn get(&self) -> u64 {
        self.0.iter().map(|s| s.0.load(Ordering::Relaxed)).sum()
    }
}

/// A distribution over fixed buckets (upper bounds in seconds).
pub struct Histogram {
    bounds: &'static [f64],
    shards: Vec<HistogramShard>,
}

/// One shard of a histogram: its bucket counts, sum and total.
#[repr(align(128))]
struct HistogramShard {
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    total: AtomicU64,
}

/// Buckets for latencies from a tenth of a millisecond to ten seconds.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0,
    2.0, 5.0, 10.0,
];

impl Histogram {
    /// A histogram over `bounds`.
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            shards: (0..SHARDS)
                .map(|_| HistogramShard {
                    counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
                    sum_micros: AtomicU64::new(0),
                    total: AtomicU64::new(0),
                })
                .collect(),
        }
    }

    /// Records one observation in seconds.
    pub fn observe(&self, seconds: f64) {
        let seconds = seconds.max(0.0);
        let shard = &self.shards[shard()];
        if let Some(i) = self.bounds.iter().position(|b| seconds <= *b) {
            shard.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        shard
            .sum_micros
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
        shard.total.fetch_add(1, Ordering::Relaxed);
    }

    /// Bucket `i`'s count over all shards.
    fn count(&self, i: usize) -> u64 {
        self.shards
            .iter()
            .map(|s| s.counts[i].load(Ordering::Relaxed))
            .sum()
    }

    /// Observations over all shards.
    fn total(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.total.load(Ordering::Relaxed))
            .sum()
    }

    /// The smallest bucket bound below which at least fraction `q` of observations fall.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        let mut seen = 0;
        for (i, b) in self.bounds.iter().enumerate() {
            seen += self.count(i);
            if seen as f64 >= q * total as f64 {
                return Some(*b);
            }
        }
        Some(f64::INFINITY)
    }

    /// Appends the Prometheus text exposition of the histogram.
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        // The total is read first: a count that lands while rendering can only make the
        // buckets exceed it, and the +Inf bucket is written as at least the last bucket.
        let total = self.total();
        let mut cumulative = 0;
        for (i, b) in self.bounds.iter().enumerate() {
            cumulative += self.count(i);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let total = total.max(cumulative);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {total}");
        let sum: u64 = self
            .shards
            .iter()
            .map(|s| s.sum_micros.load(Ordering::Relaxed))
            .sum();
        let _ = writeln!(out, "{name}_sum {}", sum as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {total}");
    }
}

/// The speed layer's metrics.
pub struct SpeedMetrics {
    /// Messages taken from Kafka (valid or not), counted as they are received.
    pub received: Counter,
    /// Events that now count.
    pub events: Counter,
    /// Duplicates dropped.
    pub duplicates: Counter,
    /// Late events dropped.
    pub late: Counter,
    /// Messages deleted from the broker (retention) before the layer consumed them.
    pub lost: Counter,
    /// Invalid records by reason.
    pub invalid: Mutex<BTreeMap<String, u64>>,
    /// Batches flushed.
    pub flushes: Counter,
    /// Compare-and-set conflicts.
    pub conflicts: Counter,
    /// Absent states rebuilt from histories.
    pub rebuilt: Counter,
    /// Of those, states whose history did not reach back the streaming horizon.
    pub rebuilt_partially: Counter,
    /// Flush latency.
    pub flush_seconds: Histogram,
    /// From a message's producer timestamp to its effect being visible in the store.
    pub freshness_seconds: Histogram,
    /// Consumer lag per partition.
    pub lag: Mutex<BTreeMap<i32, i64>>,
    /// Watermark per partition (epoch ms).
    pub watermark: Mutex<BTreeMap<i32, i64>>,
}

impl Default for SpeedMetrics {
    fn default() -> Self {
        SpeedMetrics {
            received: Counter::default(),
            events: Counter::default(),
            duplicates: Counter::default(),
            late: Counter::default(),
            lost: Counter::default(),
            invalid: Mutex::default(),
            flushes: Counter::default(),
            conflicts: Counter::default(),
            rebuilt: Counter::default(),
            rebuilt_partially: Counter::default(),
            flush_seconds: Histogram::new(LATENCY_BUCKETS),
            freshness_seconds: Histogram::new(LATENCY_BUCKETS),
            lag: Mutex::default(),
            watermark: Mutex::default(),
        }
    }
}

impl SpeedMetrics {
    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        counter(
            &mut out,
            "duet_speed_received_total",
            "Messages received from Kafka, before they are processed.",
            self.received.get(),
        );
        counter(
            &mut out,
            "duet_speed_events_total",
            "Events applied to state.",
            self.events.get(),
        );
        counter(
            &mut out,
            "duet_speed_duplicates_total",
            "Events dropped as duplicates.",
            self.duplicates.get(),
        );
        counter(
            &mut out,
            "duet_speed_late_total",
            "Events dropped for arriving after the allowed lateness.",
            self.late.get(),
        );
        counter(
            &mut out,
            "duet_speed_lost_messages_total",
            "Messages deleted from the broker (retention) before the speed layer consumed them.",
            self.lost.get(),
        );
        counter(
            &mut out,
            "duet_speed_flushes_total",
            "Batches written and committed.",
            self.flushes.get(),
        );
        counter(
            &mut out,
            "duet_speed_cas_conflicts_total",
            "State writes retried after another writer.",
            self.conflicts.get(),
        );
        counter(
            &mut out,
            "duet_speed_states_rebuilt_total",
            "Absent entity states rebuilt from their histories, because their keys may have expired while still needed (the partition's watermark trailed the clock by over half a minute).",
            self.rebuilt.get(),
        );
        counter(
            &mut out,
            "duet_speed_states_rebuilt_partially_total",
            "Of the rebuilt states, those whose history did not reach back the streaming horizon before the state's boundary (a `history` shorter than the horizon): they may miss events.",
            self.rebuilt_partially.get(),
        );
        let _ = writeln!(
            out,
            "# HELP duet_speed_invalid_total Invalid records by reason.\n# TYPE duet_speed_invalid_total counter"
        );
        for (reason, n) in self.invalid.lock().expect("not poisoned").iter() {
            let _ = writeln!(out, "duet_speed_invalid_total{{reason=\"{reason}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP duet_speed_lag Messages behind the end of each partition.\n# TYPE duet_speed_lag gauge"
        );
        for (p, lag) in self.lag.lock().expect("not poisoned").iter() {
            let _ = writeln!(out, "duet_speed_lag{{partition=\"{p}\"}} {lag}");
        }
        let _ = writeln!(
            out,
            "# HELP duet_speed_watermark_ms Event-time watermark per partition.\n# TYPE duet_speed_watermark_ms gauge"
        );
        for (p, wm) in self.watermark.lock().expect("not poisoned").iter() {
            let _ = writeln!(out, "duet_speed_watermark_ms{{partition=\"{p}\"}} {wm}");
        }
        self.flush_seconds.render(
            &mut out,
            "duet_speed_flush_seconds",
            "Time to write a batch's state and commit its offsets.",
        );
        self.freshness_seconds.render(
            &mut out,
            "duet_speed_freshness_seconds",
            "From a message's producer timestamp to its effect being visible.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_names_every_counter_with_its_value() {
        let m = SpeedMetrics::default();
        m.received.add(7);
        m.events.add(5);
        m.duplicates.add(1);
        m.late.add(1);
        m.lost.add(3);
        let text = m.render();
        for line in [
            "# TYPE duet_speed_received_total counter",
            "duet_speed_received_total 7",
            "duet_speed_events_total 5",
            "duet_speed_duplicates_total 1",
            "duet_speed_late_total 1",
            "duet_speed_lost_messages_total 3",
            "duet_speed_flushes_total 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "no line `{line}` in:\n{text}"
            );
        }
    }

    #[test]
    fn shards_add_up_across_threads() {
        let counter = Counter::default();
        let hist = Histogram::new(LATENCY_BUCKETS);
        std::thread::scope(|s| {
            for t in 0..(SHARDS + 3) {
                let (counter, hist) = (&counter, &hist);
                s.spawn(move || {
                    for _ in 0..1000 {
                        counter.add(2);
                    }
                    // Thread t observes 100 values: the even threads fast, the odd ones slow.
                    for _ in 0..100 {
                        hist.observe(if t % 2 == 0 { 0.0002 } else { 0.003 });
                    }
                });
            }
        });
        let threads = (SHARDS + 3) as u64;
        assert_eq!(counter.get(), 2000 * threads);
        assert_eq!(hist.total(), 100 * threads);
        assert_eq!(hist.quantile(0.4), Some(0.00025));
        assert_eq!(hist.quantile(0.99), Some(0.005));
        let mut out = String::new();
        hist.render(&mut out, "x", "help");
        assert!(out.contains(&format!("x_count {}", 100 * threads)), "{out}");
        assert!(
            out.contains(&format!("x_bucket{{le=\"0.00025\"}} {}", 100 * 6)),
            "{out}"
        );
        assert!(
            out.contains(&format!("x_bucket{{le=\"+Inf\"}} {}", 100 * threads)),
            "{out}"
        );
    }
}
