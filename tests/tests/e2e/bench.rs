//! `quip bench`: every scenario once, at a tiny size, against a real `quipd` process. These
//! check that each run completes and that its figures are sane (every send acked, stored and
//! delivered once, the floors and the daemon's usage measured), never how fast anything is.

use quip_tests::{Binaries, DaemonProcess, Quip};
use serde_json::Value;

/// Runs `quip bench ARGS --data DIR --json` and returns its report.
async fn bench(daemon: &DaemonProcess, args: &[&str]) -> Value {
    let quip = Quip::new(daemon.addr().to_string(), daemon.ca_path(), None).await;
    let data = daemon.data_dir().to_str().expect("a UTF-8 temporary path");
    let mut all = vec!["bench"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--data", data, "--json", "--floor-ms", "100"]);
    report(&quip.run(&all).await, &all)
}

fn report(output: &quip_tests::CliOutput, args: &[&str]) -> Value {
    output.expect_success(&format!("quip {}", args.join(" ")));
    serde_json::from_str(output.stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "quip {args:?} printed no JSON report ({e}):\n{}",
            output.stdout
        )
    })
}

fn num(report: &Value, path: &str) -> f64 {
    report
        .pointer(path)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("the report has no number at {path}: {report}"))
}

/// What every report must show: the run completed with nothing lost, the figures are
/// consistent, and the floors and the daemon's usage were measured.
fn assert_sane(report: &Value, scenario: &str, operations: u64, daemon_pid: u32) {
    assert_eq!(report["scenario"], scenario, "{report}");
    let checks = &report["checks"];
    assert_eq!(checks["ok"], true, "checks failed: {report}");
    assert_eq!(checks["completed"], checks["expected"], "{report}");
    for zero in ["errors", "lost", "out_of_order"] {
        assert_eq!(checks[zero], 0, "{zero} in {report}");
    }
    assert_eq!(report["operations"], operations, "{report}");
    assert!(num(report, "/seconds") > 0.0, "{report}");
    let rate = num(report, "/throughput_per_sec");
    let expected_rate = operations as f64 / num(report, "/seconds");
    assert!(
        (rate - expected_rate).abs() <= expected_rate * 1e-6,
        "throughput is not operations over seconds: {report}"
    );
    let latency = |q: &str| num(report, &format!("/latency/{q}"));
    assert!(latency("count") >= 1.0, "{report}");
    assert!(latency("p50_us") <= latency("p99_us") && latency("p99_us") <= latency("max_us"));
    assert!(num(report, "/floors/fdatasync_per_sec") > 0.0, "{report}");
    assert!(
        num(report, "/floors/growing_fdatasync_per_sec") > 0.0,
        "{report}"
    );
    assert!(num(report, "/floors/udp_rtt/count") >= 100.0, "{report}");
    assert_eq!(report["daemon"]["pid"], daemon_pid, "{report}");
    assert!(num(report, "/daemon/rss_end_bytes") > 1e6, "{report}");
    assert!(num(report, "/daemon/cpu_seconds") >= 0.0, "{report}");
    assert_eq!(report["store"], "sled", "{report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bench_send_acks_and_stores_every_message() {
    let daemon = DaemonProcess::start().await;
    for shared in [false, true] {
        let mut args = vec!["send", "--messages", "40", "-p", "2", "-w", "4"];
        if shared {
            args.push("--shared");
        }
        let report = bench(&daemon, &args).await;
        assert_sane(&report, "send", 40, daemon.pid());
        assert_eq!(report["figures"]["stored but not acked"], 0, "{report}");
        assert_eq!(
            report["figures"]["conversations"],
            if shared { 1 } else { 2 },
            "{report}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bench_latency_delivers_every_scheduled_message() {
    let daemon = DaemonProcess::start().await;
    let args = [
        "latency",
        "--rate",
        "200",
        "--duration",
        "0.25",
        "--warmup",
        "0.05",
    ];
    let report = bench(&daemon, &args).await;
    // 10 warm-up messages, then 50 measured ones.
    assert_sane(&report, "latency", 50, daemon.pid());
    assert_eq!(report["checks"]["expected"], 60, "{report}");
    assert_eq!(report["latency"]["count"], 50, "{report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bench_fanout_delivers_every_message_to_every_member() {
    let daemon = DaemonProcess::start().await;
    let report = bench(
        &daemon,
        &["fanout", "-m", "3", "--messages", "20", "-w", "8"],
    )
    .await;
    assert_sane(&report, "fanout", 60, daemon.pid());
    assert_eq!(report["latency"]["count"], 60, "{report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bench_connections_holds_every_connection() {
    let daemon = DaemonProcess::start().await;
    let args = [
        "connections",
        "-c",
        "8",
        "--concurrency",
        "4",
        "--hold",
        "0.2",
    ];
    let report = bench(&daemon, &args).await;
    assert_sane(&report, "connections", 8, daemon.pid());
    assert_eq!(report["figures"]["connections held"], 8, "{report}");
    assert!(
        num(&report, "/figures/daemon RSS held, bytes") > 0.0,
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bench_replay_catches_up_on_every_missed_message() {
    let daemon = DaemonProcess::start().await;
    let report = bench(&daemon, &["replay", "--messages", "200"]).await;
    assert_sane(&report, "replay", 200, daemon.pid());
}

#[tokio::test(flavor = "multi_thread")]
async fn bench_typing_relays_datagrams_between_members() {
    let daemon = DaemonProcess::start().await;
    let args = [
        "typing",
        "--samples",
        "6",
        "--duration",
        "0.3",
        "--rate",
        "10",
    ];
    let report = bench(&daemon, &args).await;
    assert_sane(&report, "typing", 6, daemon.pid());
    assert!(
        num(&report, "/figures/rate phase: datagrams sent") > 0.0,
        "{report}"
    );
}

/// The other way to provision: a tokens file from `quipd user add --count`, with the daemon's
/// pid given by hand.
#[tokio::test(flavor = "multi_thread")]
async fn bench_runs_as_users_from_a_tokens_file() {
    let daemon = DaemonProcess::start().await;
    let tokens = daemon.data_dir().join("bench-tokens.txt");
    let made = tokio::process::Command::new(&Binaries::get().await.quipd)
        .args(["user", "add", "--count", "3", "--prefix", "load", "--data"])
        .arg(daemon.data_dir())
        .arg("--tokens-out")
        .arg(&tokens)
        .output()
        .await
        .expect("running quipd user add --count");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let quip = Quip::new(daemon.addr().to_string(), daemon.ca_path(), None).await;
    let (tokens, pid, disk) = (
        tokens.to_str().expect("UTF-8 path").to_owned(),
        daemon.pid().to_string(),
        daemon.data_dir().to_str().expect("UTF-8 path").to_owned(),
    );
    let args = [
        "bench",
        "send",
        "--messages",
        "10",
        "-p",
        "2",
        "--tokens",
        &tokens,
        "--daemon-pid",
        &pid,
        "--disk",
        &disk,
        "--json",
        "--floor-ms",
        "100",
    ];
    let mut report = report(&quip.run(&args).await, &args);
    // Without --data the tool cannot see which engine the store uses.
    assert_eq!(report["store"], Value::Null);
    report["store"] = "sled".into();
    assert_sane(&report, "send", 10, daemon.pid());
    // A run needing more users than the file holds says so instead of starting.
    let args = [
        "bench",
        "send",
        "--messages",
        "10",
        "-p",
        "4",
        "--tokens",
        &tokens,
        "--json",
    ];
    let output = quip.run(&args).await;
    assert!(!output.status.success(), "{}", output.stdout);
    assert!(output.stderr.contains("holds 3 users"), "{}", output.stderr);
}
