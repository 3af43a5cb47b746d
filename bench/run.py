#!/usr/bin/env python3
"""Runs the quip bench scenarios of BENCHMARKS.md and prints their medians as a Markdown table.

Every run gets a fresh daemon on a fresh data directory (so no run inherits another's store),
started with bench/quipd-bench.toml, which lifts the per-connection datagram limits and the
connection cap and logs warnings only. Runs of different variants are interleaved (A B A B ...),
so that a machine whose load changes meanwhile shifts every variant alike.

    cargo build --release
    bench/run.py                        # the whole table, 3 runs each, sled and fjall
    bench/run.py --runs 5 --only send-w64-p4
    bench/run.py --variant base=/path/to/old/quipd --variant new=target/release/quipd \
        --only fanout-100                # A/B two daemon builds

Each raw report is kept as JSON lines in --out (default: a new temporary directory).
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> quip bench arguments. The sizes are those of the targets.
SCENARIOS = {
    "send-w1-p1": ["send", "-p", "1", "-w", "1", "--duration", "10"],
    "send-w1-p16": ["send", "-p", "16", "-w", "1", "--duration", "10"],
    "send-w1-p256": ["send", "-p", "256", "-w", "1", "--duration", "10"],
    "send-w64-p4": ["send", "-p", "4", "-w", "64", "--duration", "10"],
    "latency-1k": ["latency", "--rate", "1000", "--duration", "10"],
    "latency-10k": ["latency", "--rate", "10000", "--duration", "10"],
    "fanout-100": ["fanout", "-m", "100", "--messages", "20000", "-w", "256"],
    "connections-10k": ["connections", "-c", "10000", "--hold", "5"],
    "replay-100k": ["replay", "--messages", "100000"],
    "typing": ["typing", "-m", "2", "--samples", "2000", "--interval-ms", "1",
               "--duration", "5", "--rate", "5000"],
}


# Not in the table; for comparing builds (--only NAME).
EXTRA = {
    "connections-5k": ["connections", "-c", "5000", "--hold", "3"],
}
ALL = {**SCENARIOS, **EXTRA}


# The targets: (scenario, store or None for each, what, figure, comparison, goal).
TARGETS = [
    ("send-w1-p1", None, "acks/s over the fdatasync floor", "floor_ratio", ">=", 0.5),
    ("send-w1-p16", "sled", "acks/s over the fdatasync floor", "floor_ratio", ">=", 3.5),
    ("send-w1-p16", "fjall", "acks/s over the fdatasync floor", "floor_ratio", ">=", 7.0),
    ("send-w64-p4", "sled", "durable acks/s", "throughput", ">=", 50_000),
    ("send-w64-p4", "fjall", "durable acks/s", "throughput", ">=", 100_000),
    ("latency-1k", None, "p50 µs", "p50", "<=", 1000),
    ("latency-1k", None, "p99 µs", "p99", "<=", 5000),
    ("latency-10k", None, "p50 µs", "p50", "<=", 1000),
    ("latency-10k", None, "p99 µs", "p99", "<=", 5000),
    ("fanout-100", None, "deliveries/s", "throughput", ">=", 500_000),
    ("connections-10k", None, "daemon RSS per connection, bytes", "rss_per_conn", "<=", 16384),
    ("connections-10k", None, "new authenticated connections/s", "throughput", ">=", 2000),
    ("replay-100k", None, "catch-up messages/s", "throughput", ">=", 300_000),
]


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_once(quipd, quip, store, args, workdir, log):
    data = tempfile.mkdtemp(prefix="quip-bench-data-", dir=workdir)
    port = free_port()
    config = os.path.join(ROOT, "bench", "quipd-bench.toml")
    daemon = subprocess.Popen(
        [quipd, "serve", "--config", config, "--data", data,
         "--listen", f"127.0.0.1:{port}", "--store", store],
        stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while not os.path.exists(os.path.join(data, "admin.sock")):
            if daemon.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"quipd did not start (see {log.name})")
            time.sleep(0.05)
        out = subprocess.run(
            [quip, "--server", f"127.0.0.1:{port}", "bench", *args, "--data", data, "--json"],
            capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"quip bench {' '.join(args)} failed: {out.stderr.strip()}")
        return json.loads(out.stdout)
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=20)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        shutil.rmtree(data, ignore_errors=True)
        # Let the file system finish with the removed store before the next run measures
        # its fdatasync floor.
        os.sync()
        time.sleep(1)


def figure(report, key):
    if key == "throughput":
        return report["throughput_per_sec"]
    if key in ("p50", "p99", "p999", "max"):
        return report["latency"][f"{key}_us"]
    if key == "floor_ratio":
        return report["throughput_per_sec"] / report["floors"]["fdatasync_per_sec"]
    if key == "fdatasync":
        return report["floors"]["fdatasync_per_sec"]
    if key == "udp_rtt_p50":
        return report["floors"]["udp_rtt"]["p50_us"]
    if key == "cpu":
        return (report.get("daemon") or {}).get("cpu_percent")
    if key == "load":
        return report["run"]["loadavg_1min_before"]
    if key == "runq_wait":
        return (report.get("daemon") or {}).get("run_queue_wait_ms_per_sec")
    if key == "cpu_us_per_op":
        daemon = report.get("daemon")
        return daemon and 1e6 * daemon["cpu_seconds"] / max(report["operations"], 1)
    if key == "tool_cpu":
        return report["figures"].get("load tool CPU %")
    if key == "rss_per_conn":
        return report["figures"].get("daemon RSS per connection, bytes")
    if key == "store_bytes_per_msg":
        stored = report["figures"].get("store bytes on disk")
        return stored / report["operations"] if stored and report["unit"] == "acked sends" else None
    if key == "relayed":
        return report["figures"].get("rate phase: relayed per second")
    raise KeyError(key)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", action="append", help="scenario name (repeatable)")
    parser.add_argument("--stores", default="sled,fjall")
    parser.add_argument("--variant", action="append",
                        help="NAME=QUIPD: a daemon build to compare (repeatable)")
    parser.add_argument("--quip", default=os.path.join(ROOT, "target", "release", "quip"))
    parser.add_argument("--out", help="directory for the raw JSON reports and daemon logs")
    opts = parser.parse_args()

    variants = []
    for v in opts.variant or [f"quipd={os.path.join(ROOT, 'target', 'release', 'quipd')}"]:
        name, _, path = v.partition("=")
        variants.append((name, os.path.abspath(path)))
    names = opts.only or list(SCENARIOS)
    stores = opts.stores.split(",")
    out = opts.out or tempfile.mkdtemp(prefix="quip-bench-")
    os.makedirs(out, exist_ok=True)
    raw = open(os.path.join(out, "reports.jsonl"), "a")
    log = open(os.path.join(out, "quipd.log"), "a")
    print(f"raw reports: {raw.name}", file=sys.stderr)
    with open("/proc/loadavg") as f:
        print(f"load average at start: {f.read().split()[:3]}", file=sys.stderr)

    results = {}
    for name in names:
        for run in range(opts.runs):
            for store in stores:
                for variant, quipd in variants:
                    with open("/proc/loadavg") as f:
                        load = float(f.read().split()[0])
                    report = run_once(quipd, opts.quip, store, ALL[name], out, log)
                    report["run"] = {"scenario": name, "variant": variant, "n": run,
                                     "loadavg_1min_before": load}
                    raw.write(json.dumps(report) + "\n")
                    raw.flush()
                    results.setdefault((name, store, variant), []).append(report)
                    print(f"{name} {store} {variant} run {run + 1}: "
                          f"{report['throughput_per_sec']:.0f} {report['unit']}/s, "
                          f"p50 {report['latency']['p50_us']} µs, "
                          f"p99 {report['latency']['p99_us']} µs", file=sys.stderr)
    with open("/proc/loadavg") as f:
        print(f"load average at end: {f.read().split()[:3]}", file=sys.stderr)

    keys = ["throughput", "p50", "p99", "max", "cpu", "cpu_us_per_op", "runq_wait", "tool_cpu",
            "fdatasync",
            "udp_rtt_p50", "rss_per_conn", "store_bytes_per_msg", "relayed", "load"]
    print("| scenario | store | build | runs | " + " | ".join(keys) + " |")
    print("|" + "---|" * (len(keys) + 4))
    for (name, store, variant), reports in results.items():
        cells = []
        for key in keys:
            m = median([figure(r, key) for r in reports])
            cells.append("" if m is None else f"{m:.2f}" if m < 10 else f"{m:.0f}")
        print(f"| {name} | {store} | {variant} | {len(reports)} | " + " | ".join(cells) + " |")

    print()
    print("| target | store | build | figure | median | goal | met | by |")
    print("|---|---|---|---|---|---|---|---|")
    for name, only, what, key, op, goal in TARGETS:
        for (scenario, store, variant), reports in results.items():
            if scenario != name or (only and store != only):
                continue
            m = median([figure(r, key) for r in reports])
            if m is None:
                continue
            met = m >= goal if op == ">=" else m <= goal
            by = m / goal if op == ">=" else goal / m
            shown = f"{m:.2f}" if m < 10 else f"{m:.0f}"
            print(f"| {name} | {store} | {variant} | {what} | {shown} | {op} {goal:g} | "
                  f"{'met' if met else 'not met'} | {by:.2f}x |")


if __name__ == "__main__":
    main()
