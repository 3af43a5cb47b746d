//! What a run reports: one [`Report`], printed as a table or as one JSON object.

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::host::{DaemonUsage, Floors};

/// A latency distribution, in microseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Latency {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl Latency {
    pub fn from_histogram(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            count: h.len(),
            mean_us: h.mean(),
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

/// Whether the run did what it set out to do: every operation answered, every message stored
/// once and delivered once, in order.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Checks {
    /// Operations the run expected to complete.
    pub expected: u64,
    /// ...and those that did.
    pub completed: u64,
    /// Requests the server answered with an error.
    pub errors: u64,
    /// Messages acknowledged but missing from the store or from a member's stream.
    pub lost: u64,
    /// Deliveries of a seq already delivered, or out of order.
    pub out_of_order: u64,
    pub ok: bool,
}

impl Checks {
    pub fn settle(&mut self) {
        self.ok = self.completed == self.expected
            && self.errors == 0
            && self.lost == 0
            && self.out_of_order == 0;
    }
}

/// One run of one scenario.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub scenario: String,
    /// The scenario's settings, as run.
    pub params: serde_json::Value,
    pub server: String,
    /// The daemon's store engine, when its data directory is local.
    pub store: Option<String>,
    /// Wall time of the measured phase.
    pub seconds: f64,
    /// What `throughput_per_sec` counts: acked messages, deliveries, handshakes, ...
    pub unit: String,
    pub operations: u64,
    pub throughput_per_sec: f64,
    /// The latency the scenario is about (see `latency_of`).
    pub latency: Latency,
    pub latency_of: String,
    /// Other figures of the scenario, by name.
    pub figures: serde_json::Map<String, serde_json::Value>,
    pub daemon: Option<DaemonUsage>,
    pub floors: Floors,
    pub checks: Checks,
}

fn us(v: u64) -> String {
    if v >= 10_000 {
        format!("{:.1} ms", v as f64 / 1000.0)
    } else {
        format!("{v} µs")
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// A scenario's parameters as `name=value` words (JSON is for `--json`).
fn shown_params(params: &serde_json::Value) -> String {
    match params {
        serde_json::Value::Object(fields) => fields
            .iter()
            .filter(|(_, value)| !value.is_null())
            .map(|(name, value)| match value {
                serde_json::Value::String(s) => format!("{name}={s}"),
                other => format!("{name}={other}"),
            })
            .collect::<Vec<_>>()
            .join(" "),
        other => other.to_string(),
    }
}

impl Report {
    /// The human summary.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let mut row = |k: &str, v: String| {
            let _ = writeln!(t, "  {k:<28} {v}");
        };
        row(
            "scenario",
            format!("{} {}", self.scenario, shown_params(&self.params)),
        );
        row(
            "server",
            match &self.store {
                Some(store) => format!("{} (store = {store})", self.server),
                None => self.server.clone(),
            },
        );
        row(
            "throughput",
            format!(
                "{:.0} {}/s ({} in {:.2} s)",
                self.throughput_per_sec, self.unit, self.operations, self.seconds
            ),
        );
        let l = &self.latency;
        row(
            &format!("latency ({})", self.latency_of),
            format!(
                "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (n = {})",
                us(l.p50_us),
                us(l.p90_us),
                us(l.p99_us),
                us(l.p999_us),
                us(l.max_us),
                l.count
            ),
        );
        for (name, value) in &self.figures {
            let shown = match value {
                serde_json::Value::Number(n) if n.is_f64() => {
                    format!("{:.2}", n.as_f64().unwrap_or_default())
                }
                serde_json::Value::Null => "none".into(),
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            row(name, shown);
        }
        match &self.daemon {
            Some(d) => {
                row(
                    "daemon CPU",
                    format!(
                        "{:.0}% of one core ({:.2} s); waited {:.0} ms/s for a CPU",
                        d.cpu_percent, d.cpu_seconds, d.run_queue_wait_ms_per_sec
                    ),
                );
                row(
                    "daemon RSS",
                    format!(
                        "{} at start, {} at end, {} peak",
                        mib(d.rss_start_bytes),
                        mib(d.rss_end_bytes),
                        mib(d.rss_peak_bytes)
                    ),
                );
            }
            None => row(
                "daemon CPU and RSS",
                "not on this host (pass --data or --daemon-pid)".into(),
            ),
        }
        let f = &self.floors;
        row(
            "floor: fdatasync",
            format!(
                "{:.0}/s of 128-byte appends in {} (p50 {}, p99 {}; {:.0}/s growing the file)",
                f.fdatasync_per_sec,
                f.disk_dir.display(),
                us(f.fdatasync_latency.p50_us),
                us(f.fdatasync_latency.p99_us),
                f.growing_fdatasync_per_sec,
            ),
        );
        row(
            "floor: loopback UDP RTT",
            format!("p50 {}  p99 {}", us(f.udp_rtt.p50_us), us(f.udp_rtt.p99_us)),
        );
        let c = &self.checks;
        row(
            "checks",
            format!(
                "{} ({} of {} completed, {} errors, {} lost, {} out of order)",
                if c.ok { "ok" } else { "FAILED" },
                c.completed,
                c.expected,
                c.errors,
                c.lost,
                c.out_of_order
            ),
        );
        t
    }
}
