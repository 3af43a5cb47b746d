//! `quip bench`: a load tool to point at a quip deployment.
//!
//! Each scenario provisions the users it needs (through the daemon's admin socket, or from a
//! tokens file made with `quipd user add --count`), runs real clients over real QUIC, shows a
//! progress bar, and ends with one [`Report`]: throughput, a latency distribution from an HDR
//! histogram, the daemon's CPU and memory when it runs on this host, the physical floors of
//! the machine measured in the same run (fdatasync rate of the data disk, loopback UDP round
//! trip), and checks that nothing was lost. Throughput scenarios are closed-loop (a fixed
//! number of requests in flight); `latency` is open-loop: sends leave on a fixed schedule and
//! latency counts from the moment a send was due, so a stall is charged to every message it
//! delays (no coordinated omission).
//!
//! Scenario code is in [`scenarios`]; [`conn`] is the lean connection the load runs on.

mod conn;
mod host;
mod provision;
mod report;
mod scenarios;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

pub use report::{Checks, Latency, Report};

use conn::Target;
use host::DaemonMonitor;
use provision::Accounts;

/// `quip bench SCENARIO [options]`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub scenario: Scenario,
    /// Data directory of a daemon on this host: users are made through its admin socket, its
    /// CPU and memory are read from /proc, the fdatasync floor is measured there, and its CA
    /// (DATA/certs/ca.pem) is trusted unless --ca names another.
    #[arg(long, global = true)]
    pub data: Option<PathBuf>,
    /// Users to run as, instead of making them: the `name token` lines of
    /// `quipd user add --count N --prefix P --tokens-out FILE`.
    #[arg(long, global = true, conflicts_with = "data")]
    pub tokens: Option<PathBuf>,
    /// Directory on the daemon's data disk for the fdatasync floor [default: --data, else .]
    #[arg(long, global = true)]
    pub disk: Option<PathBuf>,
    /// The daemon's pid, for CPU and memory figures when --data is not given.
    #[arg(long, global = true)]
    pub daemon_pid: Option<u32>,
    /// How long each floor is measured, in milliseconds.
    #[arg(long, global = true, default_value_t = 1000)]
    pub floor_ms: u64,
    /// Print one JSON object with every figure instead of the table.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand, Debug, Clone)]
pub enum Scenario {
    /// P producers sending as fast as their window allows; acked (durable) sends per second.
    Send(scenarios::SendArgs),
    /// Sends at a fixed rate; time from when each send was due to its receipt at another member.
    Latency(scenarios::LatencyArgs),
    /// One sender, M members each on its own connection; deliveries per second.
    Fanout(scenarios::FanoutArgs),
    /// Holds C idle authenticated connections; handshakes per second, daemon RSS per connection.
    Connections(scenarios::ConnectionsArgs),
    /// A member offline for N messages reconnects; catch-up messages per second.
    Replay(scenarios::ReplayArgs),
    /// Typing DATAGRAMs through the daemon: relay latency and relay rate.
    Typing(scenarios::TypingArgs),
}

impl Scenario {
    fn name(&self) -> &'static str {
        match self {
            Scenario::Send(_) => "send",
            Scenario::Latency(_) => "latency",
            Scenario::Fanout(_) => "fanout",
            Scenario::Connections(_) => "connections",
            Scenario::Replay(_) => "replay",
            Scenario::Typing(_) => "typing",
        }
    }
}

/// The CA path the CLI uses when nothing else is said.
const DEFAULT_CA: &str = "./quip-data/certs/ca.pem";

/// What every scenario runs with.
#[derive(Debug)]
pub struct Run {
    target: Target,
    accounts: Accounts,
    monitor: Option<DaemonMonitor>,
    pid: Option<u32>,
    usage: Option<host::DaemonUsage>,
    /// This process: the load tool shares the machine with the daemon it measures.
    tool: Option<DaemonMonitor>,
    tool_usage: Option<host::DaemonUsage>,
    json: bool,
}

impl Run {
    /// Starts the daemon's CPU and memory accounting from now: call when the measured phase
    /// begins, after the set-up.
    fn begin(&mut self) {
        if let Some(pid) = self.pid {
            self.monitor = DaemonMonitor::start(pid);
        }
        self.tool = DaemonMonitor::start(std::process::id());
    }

    /// Ends the accounting begun by [`Run::begin`].
    fn end(&mut self) {
        if let Some(monitor) = self.monitor.take() {
            self.usage = monitor.finish();
        }
        if let Some(monitor) = self.tool.take() {
            self.tool_usage = monitor.finish();
        }
    }

    /// The daemon's RSS now, if it runs here.
    fn daemon_rss(&self) -> Option<u64> {
        self.pid.and_then(host::sample).map(|s| s.rss_bytes)
    }

    /// A progress bar on stderr (drawn only on a terminal).
    fn progress(&self, total: u64, what: &str) -> ProgressBar {
        if self.json {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(total);
        let template = format!(
            "{{spinner}} {what} [{{elapsed_precise}}] {{wide_bar}} {{pos}}/{{len}} ({{per_sec}}, {{eta}} left)"
        );
        if let Ok(style) = ProgressStyle::with_template(&template) {
            bar.set_style(style);
        }
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    }

    /// `count` endpoints (UDP sockets) for the run's connections.
    fn endpoints(&self, count: usize) -> anyhow::Result<Vec<quinn::Endpoint>> {
        (0..count.max(1))
            .map(|_| self.target.endpoint().map_err(anyhow::Error::from))
            .collect()
    }
}

/// Runs a scenario against `server`, trusting `ca`, and prints its report. Fails after
/// printing when the run's checks failed.
pub async fn run(args: BenchArgs, server: &str, ca: &Path) -> anyhow::Result<Report> {
    let ca = match &args.data {
        Some(data) if ca == Path::new(DEFAULT_CA) => data.join("certs").join("ca.pem"),
        _ => ca.to_owned(),
    };
    let target = resolve_target(server, &ca).await?;
    let accounts = match (&args.data, &args.tokens) {
        (_, Some(tokens)) => Accounts::file(tokens)?,
        (Some(data), None) => Accounts::admin(data),
        (None, None) => bail!(
            "quip bench needs users: pass --data DIR (a daemon on this host) or --tokens FILE \
             (from `quipd user add --count N --prefix P --tokens-out FILE`)"
        ),
    };
    let pid = match (&args.data, args.daemon_pid) {
        (_, Some(pid)) => Some(pid),
        (Some(data), None) => provision::daemon_pid(data).await,
        (None, None) => None,
    };
    let disk = args
        .disk
        .clone()
        .or_else(|| args.data.clone())
        .unwrap_or_else(|| PathBuf::from("."));
    let floor_time = Duration::from_millis(args.floor_ms);
    let floors = tokio::task::spawn_blocking(move || host::measure_floors(&disk, floor_time))
        .await
        .context("measuring the floors")??;
    let store = args.data.as_deref().and_then(provision::store_engine);
    let mut ctx = Run {
        target,
        accounts,
        monitor: None,
        pid,
        usage: None,
        tool: None,
        tool_usage: None,
        json: args.json,
    };
    let scenario = args.scenario.clone();
    let outcome = match &scenario {
        Scenario::Send(a) => scenarios::send(&mut ctx, a).await?,
        Scenario::Latency(a) => scenarios::latency(&mut ctx, a).await?,
        Scenario::Fanout(a) => scenarios::fanout(&mut ctx, a).await?,
        Scenario::Connections(a) => scenarios::connections(&mut ctx, a).await?,
        Scenario::Replay(a) => scenarios::replay(&mut ctx, a).await?,
        Scenario::Typing(a) => scenarios::typing(&mut ctx, a).await?,
    };
    ctx.end();
    let mut figures = outcome.figures;
    if outcome.unit == "acked sends" {
        figures.insert(
            "throughput / fdatasync floor".into(),
            (outcome.operations as f64 / outcome.seconds.max(1e-9) / floors.fdatasync_per_sec)
                .into(),
        );
    }
    if let Some(bytes) = args
        .data
        .as_deref()
        .and_then(|d| dir_bytes(&d.join("store")).ok())
    {
        figures.insert("store bytes on disk".into(), bytes.into());
    }
    if let Some(tool) = &ctx.tool_usage {
        figures.insert("load tool CPU %".into(), tool.cpu_percent.into());
    }
    let mut checks = outcome.checks;
    checks.settle();
    let report = Report {
        scenario: scenario.name().into(),
        params: outcome.params,
        server: server.to_owned(),
        store,
        seconds: outcome.seconds,
        unit: outcome.unit.into(),
        operations: outcome.operations,
        throughput_per_sec: outcome.operations as f64 / outcome.seconds.max(1e-9),
        latency: Latency::from_histogram(&outcome.latency),
        latency_of: outcome.latency_of.into(),
        figures,
        daemon: ctx.usage.take(),
        floors,
        checks,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.table());
    }
    if !report.checks.ok {
        bail!("the run's checks failed: {:?}", report.checks);
    }
    Ok(report)
}

/// Bytes the files under `dir` take (their lengths, summed).
fn dir_bytes(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            dir_bytes(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

async fn resolve_target(server: &str, ca_file: &Path) -> anyhow::Result<Target> {
    let ca = CertificateDer::pem_file_iter(ca_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading the CA file {}", ca_file.display()))?;
    if ca.is_empty() {
        bail!("the CA file {} holds no certificate", ca_file.display());
    }
    let addr: SocketAddr = tokio::net::lookup_host(server)
        .await
        .with_context(|| format!("resolving {server}"))?
        .next()
        .with_context(|| format!("{server} has no address"))?;
    let host = match server.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        _ => server,
    };
    Ok(Target {
        addr,
        server_name: host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
        ca,
    })
}
