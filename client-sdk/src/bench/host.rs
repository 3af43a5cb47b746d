//! What the run measures besides the daemon's answers: the daemon process's CPU time and
//! memory (from `/proc`, when it runs on this host), and the two physical floors every figure
//! is judged against, measured in the same run: how many small appends per second the data
//! disk makes durable with `fdatasync`, and the loopback UDP round trip.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::Serialize;

use super::report::Latency;

/// CPU time and resident memory of one process.
#[derive(Clone, Copy, Debug)]
pub struct ProcSample {
    pub at: Instant,
    /// User + system CPU time.
    pub cpu: Duration,
    /// Time the process's threads spent runnable but waiting for a CPU (from
    /// `/proc/PID/task/*/schedstat`): how much other work on the machine delayed it.
    pub run_queue_wait: Duration,
    pub rss_bytes: u64,
}

/// Clock ticks per second of `/proc/PID/stat` times: the `AT_CLKTCK` entry of our own
/// auxiliary vector (100 on every common Linux).
fn clock_ticks() -> u64 {
    const AT_CLKTCK: u64 = 17;
    let Ok(auxv) = std::fs::read("/proc/self/auxv") else {
        return 100;
    };
    auxv.chunks_exact(16)
        .map(|pair| {
            let word = |b: &[u8]| u64::from_ne_bytes(b.try_into().unwrap_or([0; 8]));
            (word(&pair[..8]), word(&pair[8..]))
        })
        .find(|(key, _)| *key == AT_CLKTCK)
        .map_or(100, |(_, value)| value.max(1))
}

/// Reads a process's CPU time and RSS; `None` if it is gone (or not on this host).
pub fn sample(pid: u32) -> Option<ProcSample> {
    let at = Instant::now();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields are counted after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let cpu = Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(ProcSample {
        at,
        cpu,
        run_queue_wait: run_queue_wait(pid),
        rss_bytes: rss_kib * 1024,
    })
}

/// The summed run-queue wait of a process's threads (threads that ended are not counted).
fn run_queue_wait(pid: u32) -> Duration {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Duration::ZERO;
    };
    let nanos: u64 = tasks
        .filter_map(|task| {
            let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
            stat.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .sum();
    Duration::from_nanos(nanos)
}

/// The daemon's use of the machine during a run.
#[derive(Clone, Debug, Serialize)]
pub struct DaemonUsage {
    pub pid: u32,
    pub cpu_seconds: f64,
    /// CPU time over wall time, in percent of one core (200 = two cores busy).
    pub cpu_percent: f64,
    /// Milliseconds per second that the process's threads waited, runnable, for a CPU taken
    /// by something else (other processes, or each other): latency no code change removes.
    pub run_queue_wait_ms_per_sec: f64,
    pub rss_start_bytes: u64,
    pub rss_end_bytes: u64,
    pub rss_peak_bytes: u64,
}

/// Samples the daemon now and then while a run goes on.
#[derive(Debug)]
pub struct DaemonMonitor {
    pid: u32,
    start: ProcSample,
    peak: Arc<AtomicU64>,
    running: Arc<AtomicBool>,
}

impl DaemonMonitor {
    pub fn start(pid: u32) -> Option<DaemonMonitor> {
        let start = sample(pid)?;
        let peak = Arc::new(AtomicU64::new(start.rss_bytes));
        let running = Arc::new(AtomicBool::new(true));
        let (p, r) = (peak.clone(), running.clone());
        tokio::spawn(async move {
            while r.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(250)).await;
                match sample(pid) {
                    Some(s) => {
                        p.fetch_max(s.rss_bytes, Ordering::Relaxed);
                    }
                    None => return,
                }
            }
        });
        Some(DaemonMonitor {
            pid,
            start,
            peak,
            running,
        })
    }

    pub fn finish(self) -> Option<DaemonUsage> {
        self.running.store(false, Ordering::Relaxed);
        let end = sample(self.pid)?;
        let cpu = end.cpu.saturating_sub(self.start.cpu).as_secs_f64();
        let wall = end.at.duration_since(self.start.at).as_secs_f64().max(1e-9);
        Some(DaemonUsage {
            pid: self.pid,
            cpu_seconds: cpu,
            cpu_percent: 100.0 * cpu / wall,
            run_queue_wait_ms_per_sec: 1000.0
                * end
                    .run_queue_wait
                    .saturating_sub(self.start.run_queue_wait)
                    .as_secs_f64()
                / wall,
            rss_start_bytes: self.start.rss_bytes,
            rss_end_bytes: end.rss_bytes,
            rss_peak_bytes: self.peak.load(Ordering::Relaxed).max(end.rss_bytes),
        })
    }
}

/// The floors of a run.
#[derive(Clone, Debug, Serialize)]
pub struct Floors {
    /// Where the fdatasync rate was measured.
    pub disk_dir: PathBuf,
    /// Appends of `FSYNC_APPEND` bytes into a preallocated log file, each followed by
    /// `fdatasync`, per second: the most durable acks per second a store with one flush per
    /// message could give.
    pub fdatasync_per_sec: f64,
    pub fdatasync_latency: Latency,
    /// The same appends at the end of a growing file, where every fdatasync also commits the
    /// file system's journal (and may wait for other processes' syncs to batch with).
    pub growing_fdatasync_per_sec: f64,
    /// Round trips of a 64-byte UDP datagram on loopback.
    pub udp_rtt: Latency,
}

/// Bytes appended before each fdatasync: about one stored message.
const FSYNC_APPEND: usize = 128;

/// Measures both floors (blocking; a few hundred milliseconds each).
pub fn measure_floors(disk_dir: &Path, time: Duration) -> anyhow::Result<Floors> {
    let (fdatasync_per_sec, fdatasync_latency) =
        fdatasync_rate(disk_dir, time, Appends::Preallocated)?;
    let (growing_fdatasync_per_sec, _) = fdatasync_rate(disk_dir, time / 2, Appends::Growing)?;
    let udp_rtt = udp_round_trip(time)?;
    Ok(Floors {
        disk_dir: disk_dir.to_owned(),
        fdatasync_per_sec,
        fdatasync_latency,
        growing_fdatasync_per_sec,
        udp_rtt,
    })
}

/// Where the appends of a floor measurement go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Appends {
    /// Into a log file whose blocks were written and synced before: each fdatasync flushes
    /// the data alone, as a store appending to its preallocated log segments does.
    Preallocated,
    /// At the end of a file that grows: each fdatasync also commits the new size through the
    /// file system's journal.
    Growing,
}

/// Size of the preallocated log file.
const LOG_FILE_BYTES: usize = 16 * 1024 * 1024;

fn fdatasync_rate(dir: &Path, time: Duration, appends: Appends) -> anyhow::Result<(f64, Latency)> {
    use std::os::unix::fs::FileExt;
    let tag: u64 = rand::random();
    let path = dir.join(format!(".quip-bench-fdatasync-{tag:016x}"));
    let file = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("creating {} to measure fdatasync", path.display()))?;
    let removed = RemoveOnDrop(path);
    if appends == Appends::Preallocated {
        let zeros = vec![0u8; 1024 * 1024];
        for _ in 0..LOG_FILE_BYTES / zeros.len() {
            (&file).write_all(&zeros)?;
        }
        file.sync_all()?;
    }
    let record = [0x5au8; FSYNC_APPEND];
    let mut histogram = new_histogram();
    let started = Instant::now();
    let mut count = 0u64;
    let mut offset = 0u64;
    while started.elapsed() < time || count < 10 {
        if offset as usize + FSYNC_APPEND > LOG_FILE_BYTES {
            offset = 0;
        }
        let one = Instant::now();
        file.write_all_at(&record, offset)?;
        file.sync_data()
            .with_context(|| format!("fdatasync of {}", removed.0.display()))?;
        let _ = histogram.record(one.elapsed().as_micros().max(1) as u64);
        offset += FSYNC_APPEND as u64;
        count += 1;
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    Ok((rate, Latency::from_histogram(&histogram)))
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn udp_round_trip(time: Duration) -> anyhow::Result<Latency> {
    let echo = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let ping = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let echo_addr = echo.local_addr()?;
    echo.set_read_timeout(Some(Duration::from_millis(200)))?;
    ping.set_read_timeout(Some(Duration::from_millis(200)))?;
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = stop.clone();
    let echoer = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while !stopping.load(Ordering::Relaxed) {
            if let Ok((n, from)) = echo.recv_from(&mut buf) {
                let _ = echo.send_to(&buf[..n], from);
            }
        }
    });
    let mut histogram = new_histogram();
    let payload = [0xa5u8; 64];
    let mut buf = [0u8; 64];
    let started = Instant::now();
    let mut rounds = 0u32;
    while (started.elapsed() < time || rounds < 100) && rounds < 200_000 {
        let one = Instant::now();
        ping.send_to(&payload, echo_addr)?;
        if ping.recv_from(&mut buf).is_ok() {
            let _ = histogram.record(one.elapsed().as_micros().max(1) as u64);
        }
        rounds += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let _ = echoer.join();
    Ok(Latency::from_histogram(&histogram))
}

/// A histogram of microseconds, from 1 µs to an hour, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}
