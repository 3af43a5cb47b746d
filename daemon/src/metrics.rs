//! What the daemon counts, and the Prometheus endpoint that serves it.
//!
//! The code records through the `metrics` facade where each event happens; with no endpoint
//! configured no recorder is installed and recording costs next to nothing. [`install`] puts
//! `metrics-exporter-prometheus` behind the facade, serving `GET /metrics` on its own TCP
//! address.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use quip_protocol::ErrorCode;

pub const CONNECTIONS: &str = "quipd_connections";
pub const CONNECTIONS_ACCEPTED: &str = "quipd_connections_accepted_total";
pub const CONNECTIONS_REFUSED: &str = "quipd_connections_refused_total";
pub const CONNECTIONS_RETRIED: &str = "quipd_connections_retried_total";
pub const SESSIONS: &str = "quipd_sessions";
pub const DELIVERIES: &str = "quipd_deliveries";
pub const CONVERSATIONS_ACTIVE: &str = "quipd_conversations_active";
pub const MESSAGES_APPENDED: &str = "quipd_messages_appended_total";
pub const STORE_FLUSHES: &str = "quipd_store_flushes_total";
pub const STORE_FLUSH_COMMITS: &str = "quipd_store_flush_commits";
pub const STORE_FLUSH_SECONDS: &str = "quipd_store_flush_seconds";
pub const SEND_ACK_SECONDS: &str = "quipd_send_ack_seconds";
pub const DELIVERY_LAGGED: &str = "quipd_delivery_lagged_total";
pub const DELIVERY_LAGGED_EVENTS: &str = "quipd_delivery_lagged_events_total";
pub const REPLAYS: &str = "quipd_replays_total";
pub const REPLAYED_EVENTS: &str = "quipd_replayed_events_total";
pub const DATAGRAMS_RELAYED: &str = "quipd_datagrams_relayed_total";
pub const DATAGRAMS_DROPPED: &str = "quipd_datagrams_dropped_total";
pub const ERRORS: &str = "quipd_errors_total";
pub const STORE_FAILURES: &str = "quipd_store_failures_total";
pub const PUSH_QUEUED: &str = "quipd_push_messages_queued_total";
pub const PUSH_DROPPED: &str = "quipd_push_messages_dropped_total";
pub const PUSH_SKIPPED_ONLINE: &str = "quipd_push_skipped_online_total";
pub const PUSH_CALLS: &str = "quipd_push_calls_total";
pub const PUSH_CALL_FAILURES: &str = "quipd_push_call_failures_total";
pub const PUSH_DELIVERED: &str = "quipd_push_batches_delivered_total";
pub const PUSH_GIVEN_UP: &str = "quipd_push_batches_given_up_total";

const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const COMMITS_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];

/// Serves the metrics on `addr` from now on. Fails if the address cannot be bound, or if a
/// recorder is already installed in this process.
pub fn install(addr: SocketAddr) -> anyhow::Result<()> {
    let (recorder, exporter) = PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(STORE_FLUSH_COMMITS.into()), COMMITS_BUCKETS)?
        .build()
        .with_context(|| format!("starting the metrics endpoint on {addr}"))?;
    metrics::set_global_recorder(recorder).context("installing the metrics recorder")?;
    tokio::spawn(async move {
        if let Err(e) = exporter.await {
            tracing::error!(error = ?e, "the metrics endpoint stopped");
        }
    });
    describe();
    tracing::info!(%addr, "metrics endpoint listening");
    Ok(())
}

/// Describes every metric and registers the counters at 0, so that a scrape shows them all
/// before the first event (rates need the 0).
fn describe() {
    describe_gauge!(CONNECTIONS, "QUIC connections open, authenticated or not.");
    describe_counter!(CONNECTIONS_ACCEPTED, "QUIC connections accepted.");
    describe_counter!(
        CONNECTIONS_REFUSED,
        "Connections refused at limits.max_connections."
    );
    describe_counter!(
        CONNECTIONS_RETRIED,
        "Connections asked to validate their address first (QUIC Retry)."
    );
    describe_gauge!(SESSIONS, "Authenticated sessions.");
    describe_gauge!(
        DELIVERIES,
        "Subscriptions being delivered, those waiting for the client to allow a stream included."
    );
    describe_gauge!(CONVERSATIONS_ACTIVE, "Conversation sequencers running.");
    describe_counter!(
        MESSAGES_APPENDED,
        "Messages made durable (a retried send is counted once)."
    );
    describe_counter!(
        STORE_FLUSHES,
        "Group commits: one flush and fdatasync each."
    );
    describe_histogram!(
        STORE_FLUSH_COMMITS,
        Unit::Count,
        "Commits made durable by one group commit."
    );
    describe_histogram!(
        STORE_FLUSH_SECONDS,
        Unit::Seconds,
        "Time to apply, flush and fdatasync one group commit."
    );
    describe_histogram!(
        SEND_ACK_SECONDS,
        Unit::Seconds,
        "From a send being read to its acknowledgement (durable)."
    );
    describe_counter!(
        DELIVERY_LAGGED,
        "Times a delivery fell behind the live feed and caught up from the store."
    );
    describe_counter!(
        DELIVERY_LAGGED_EVENTS,
        "Live events missed by lagging deliveries."
    );
    describe_counter!(REPLAYS, "Replays from the store into a delivery stream.");
    describe_counter!(REPLAYED_EVENTS, "Events delivered from the store.");
    describe_counter!(DATAGRAMS_RELAYED, "Ephemeral datagrams relayed to members.");
    describe_counter!(DATAGRAMS_DROPPED, "Ephemeral datagrams dropped.");
    describe_counter!(
        ERRORS,
        "Errors sent to clients, by code; scope is request (an error reply) or connection (a close)."
    );
    describe_counter!(
        STORE_FAILURES,
        "Requests answered UNAVAILABLE because the store failed (logged once a minute)."
    );
    describe_counter!(PUSH_QUEUED, "Messages handed to the offline push hook.");
    describe_counter!(PUSH_DROPPED, "Messages the push hook's full queue dropped.");
    describe_counter!(
        PUSH_SKIPPED_ONLINE,
        "Members not notified because a device of theirs was online."
    );
    describe_counter!(PUSH_CALLS, "Calls of the push hook, retries included.");
    describe_counter!(
        PUSH_CALL_FAILURES,
        "Push hook calls that failed (an error answer, a timeout, a failed command)."
    );
    describe_counter!(PUSH_DELIVERED, "Push batches the hook accepted.");
    describe_counter!(
        PUSH_GIVEN_UP,
        "Push batches dropped after their last attempt failed."
    );
    gauge!(CONNECTIONS).set(0.0);
    gauge!(SESSIONS).set(0.0);
    gauge!(DELIVERIES).set(0.0);
    gauge!(CONVERSATIONS_ACTIVE).set(0.0);
    for name in [
        CONNECTIONS_ACCEPTED,
        CONNECTIONS_REFUSED,
        CONNECTIONS_RETRIED,
        MESSAGES_APPENDED,
        STORE_FLUSHES,
        DELIVERY_LAGGED,
        DELIVERY_LAGGED_EVENTS,
        REPLAYS,
        REPLAYED_EVENTS,
        DATAGRAMS_RELAYED,
        DATAGRAMS_DROPPED,
        STORE_FAILURES,
        PUSH_QUEUED,
        PUSH_DROPPED,
        PUSH_SKIPPED_ONLINE,
        PUSH_CALLS,
        PUSH_CALL_FAILURES,
        PUSH_DELIVERED,
        PUSH_GIVEN_UP,
    ] {
        counter!(name).absolute(0);
    }
    for code in ErrorCode::ALL {
        for scope in ["request", "connection"] {
            error_counter(*code, scope).absolute(0);
        }
    }
}

fn error_counter(code: ErrorCode, scope: &'static str) -> metrics::Counter {
    let name = code
        .name()
        .map_or_else(|| code.0.to_string(), str::to_owned);
    counter!(ERRORS, "code" => name, "scope" => scope)
}

/// An error reply to one request.
pub fn request_error(code: ErrorCode) {
    error_counter(code, "request").increment(1);
}

/// A connection closed with an error code.
pub fn connection_error(code: ErrorCode) {
    error_counter(code, "connection").increment(1);
}

/// A request failed by the store.
pub fn store_failure() {
    counter!(STORE_FAILURES).increment(1);
}

pub fn refused() {
    counter!(CONNECTIONS_REFUSED).increment(1);
}

pub fn retried() {
    counter!(CONNECTIONS_RETRIED).increment(1);
}

pub fn send_acked(elapsed: Duration) {
    metrics::histogram!(SEND_ACK_SECONDS).record(elapsed.as_secs_f64());
}

/// Holds a gauge one higher while it lives.
#[derive(Debug)]
pub struct GaugeGuard(metrics::Gauge);

impl GaugeGuard {
    pub fn new(name: &'static str) -> Self {
        let gauge = gauge!(name);
        gauge.increment(1.0);
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// Counts an accepted connection; the returned guard keeps it in the open gauge.
pub fn connection() -> GaugeGuard {
    counter!(CONNECTIONS_ACCEPTED).increment(1);
    GaugeGuard::new(CONNECTIONS)
}
