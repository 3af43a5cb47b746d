//! The scenarios. Each sets up its users and conversations (not measured), then runs its load
//! between [`Run::begin`] and [`Run::end`], then checks what the daemon stored and
//! delivered against what it acknowledged.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Args;
use futures_util::stream::{self, StreamExt};
use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use quip_protocol::{
    decode_datagram, encode_datagram, ClientDatagram, ClientMessageId, ConversationId,
    DeliveryFrame, Event, EventBody, Position, Request, Response, Seq, ServerDatagram, ServerFrame,
    StartAt, UserName,
};
use serde_json::json;

use super::conn::{BenchConn, ConnError, FrameStream};
use super::host::new_histogram;
use super::provision::Account;
use super::report::Checks;
use super::Run;

/// What a scenario measured.
#[derive(Debug)]
pub struct Outcome {
    pub params: serde_json::Value,
    pub seconds: f64,
    pub unit: &'static str,
    pub operations: u64,
    pub latency: Histogram<u64>,
    pub latency_of: &'static str,
    pub figures: serde_json::Map<String, serde_json::Value>,
    pub checks: Checks,
}

#[derive(Args, Debug, Clone)]
pub struct SendArgs {
    /// Producers, each on its own connection as its own user.
    #[arg(long, short = 'p', default_value_t = 1)]
    pub producers: usize,
    /// Sends in flight per producer; 1 waits for each ack before the next send.
    #[arg(long, short = 'w', default_value_t = 1)]
    pub window: usize,
    /// All producers in one conversation (default: each in its own).
    #[arg(long)]
    pub shared: bool,
    /// Seconds to send for.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Send this many messages in all instead of sending for --duration.
    #[arg(long)]
    pub messages: Option<u64>,
    /// Message text size in bytes.
    #[arg(long, default_value_t = 100)]
    pub size: usize,
}

#[derive(Args, Debug, Clone)]
pub struct LatencyArgs {
    /// Messages per second, on a fixed schedule.
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// Seconds measured, after the warm-up.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds sent at the rate before measuring.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Message text size in bytes.
    #[arg(long, default_value_t = 100)]
    pub size: usize,
}

#[derive(Args, Debug, Clone)]
pub struct FanoutArgs {
    /// Members receiving, each on its own connection.
    #[arg(long, short = 'm', default_value_t = 100)]
    pub members: usize,
    /// Messages the one sender sends.
    #[arg(long, default_value_t = 5000)]
    pub messages: u64,
    /// The sender's sends in flight.
    #[arg(long, short = 'w', default_value_t = 64)]
    pub window: usize,
    /// Message text size in bytes.
    #[arg(long, default_value_t = 100)]
    pub size: usize,
}

#[derive(Args, Debug, Clone)]
pub struct ConnectionsArgs {
    /// Connections to open and hold.
    #[arg(long, short = 'c', default_value_t = 1000)]
    pub count: usize,
    /// Handshakes in progress at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Seconds to hold them idle before measuring the daemon's memory.
    #[arg(long, default_value_t = 3.0)]
    pub hold: f64,
    /// Connections per client UDP socket.
    #[arg(long, default_value_t = 1000)]
    pub per_socket: usize,
}

#[derive(Args, Debug, Clone)]
pub struct ReplayArgs {
    /// Messages the member misses while offline.
    #[arg(long, default_value_t = 100_000)]
    pub messages: u64,
    /// Message text size in bytes.
    #[arg(long, default_value_t = 100)]
    pub size: usize,
}

#[derive(Args, Debug, Clone)]
pub struct TypingArgs {
    /// Members of the conversation, each on its own connection.
    #[arg(long, short = 'm', default_value_t = 2)]
    pub members: usize,
    /// Relay latency samples: one typing change at a time from the first member to the second.
    #[arg(long, default_value_t = 100)]
    pub samples: u64,
    /// Milliseconds between latency samples (the daemon admits 20 datagrams a second per
    /// connection by default: `datagrams_in_per_sec`).
    #[arg(long, default_value_t = 60)]
    pub interval_ms: u64,
    /// Seconds of the rate phase, in which every member sends at --rate.
    #[arg(long, default_value_t = 3.0)]
    pub duration: f64,
    /// Datagrams per second each member sends in the rate phase.
    #[arg(long, default_value_t = 15)]
    pub rate: u64,
}

/// A message text of `size` bytes.
fn text_of(size: usize) -> String {
    const WORDS: &str = "the quick brown fox jumps over the lazy dog; ";
    WORDS.chars().cycle().take(size.max(1)).collect()
}

/// Message ids made of a per-run tag and an index, so a receiver knows which send it got.
fn message_id(tag: u64, index: u64) -> ClientMessageId {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&tag.to_be_bytes());
    id[8..].copy_from_slice(&index.to_be_bytes());
    ClientMessageId(id)
}

fn message_index(tag: u64, id: &ClientMessageId) -> Option<u64> {
    let (head, tail) = id.0.split_at(8);
    (head == tag.to_be_bytes()).then(|| u64::from_be_bytes(tail.try_into().unwrap_or_default()))
}

fn micros(d: Duration) -> u64 {
    d.as_micros().max(1) as u64
}

fn user(account: &Account) -> anyhow::Result<UserName> {
    account
        .name
        .parse()
        .map_err(|e: String| anyhow::anyhow!("user {:?}: {e}", account.name))
}

/// Connects as every account, `parallel` at a time, spread over `endpoints`.
async fn connect_all(
    ctx: &Run,
    accounts: &[Account],
    endpoints: &[quinn::Endpoint],
    parallel: usize,
) -> anyhow::Result<Vec<BenchConn>> {
    let target = &ctx.target;
    let conns: Vec<Result<BenchConn, ConnError>> = stream::iter(accounts.iter().enumerate())
        .map(|(i, account)| {
            let endpoint = &endpoints[i % endpoints.len()];
            async move { BenchConn::connect(endpoint, target, &account.token).await }
        })
        .buffered(parallel.max(1))
        .collect()
        .await;
    conns
        .into_iter()
        .collect::<Result<_, _>>()
        .context("connecting")
}

async fn create(conn: &mut BenchConn, members: &[UserName]) -> anyhow::Result<ConversationId> {
    match conn
        .call(Request::CreateConversation {
            title: "quip bench".into(),
            members: members.to_vec(),
        })
        .await?
    {
        Response::Created { conv, .. } => Ok(conv),
        other => bail!("unexpected answer to CreateConversation: {other:?}"),
    }
}

/// The conversation's last seq, as the daemon's store has it.
async fn head(conn: &mut BenchConn, conv: ConversationId) -> anyhow::Result<Seq> {
    match conn
        .call(Request::History {
            conv,
            before: None,
            limit: 1,
        })
        .await?
    {
        Response::History { head, .. } => Ok(head),
        other => bail!("unexpected answer to History: {other:?}"),
    }
}

/// Subscribes and returns the delivery stream, after its `Start`.
async fn subscribe(
    conn: &mut BenchConn,
    conv: ConversationId,
    start: StartAt,
) -> anyhow::Result<FrameStream> {
    match conn.call(Request::Subscribe { conv, start }).await? {
        Response::Subscribed { .. } => {}
        other => bail!("unexpected answer to Subscribe: {other:?}"),
    }
    Ok(conn.accept_delivery().await?)
}

/// When each message was sent (or due), for receivers to measure against.
#[derive(Debug)]
struct SendClock {
    t0: Instant,
    /// Nanoseconds after `t0`, per message index; 0 = not yet.
    sent: Vec<AtomicU64>,
}

impl SendClock {
    fn new(t0: Instant, messages: u64) -> Self {
        SendClock {
            t0,
            sent: (0..messages).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn mark(&self, index: u64, at: Instant) {
        if let Some(slot) = self.sent.get(index as usize) {
            slot.store(
                at.saturating_duration_since(self.t0).as_nanos().max(1) as u64,
                Ordering::Relaxed,
            );
        }
    }

    fn since(&self, index: u64, now: Instant) -> Option<Duration> {
        let ns = self.sent.get(index as usize)?.load(Ordering::Relaxed);
        (ns != 0).then(|| now.saturating_duration_since(self.t0 + Duration::from_nanos(ns)))
    }
}

/// How much a producer may still send.
#[derive(Clone, Debug)]
struct Budget {
    deadline: Option<Instant>,
    remaining: Option<Arc<AtomicU64>>,
}

impl Budget {
    fn take(&self) -> bool {
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return false;
        }
        match &self.remaining {
            Some(left) => left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok(),
            None => true,
        }
    }
}

/// What one closed-loop producer did.
#[derive(Debug)]
struct Produced {
    queued: u64,
    acked: u64,
    errors: u64,
    last_error: Option<String>,
    latency: Histogram<u64>,
}

/// Sends into `conv` with up to `window` sends unacknowledged until the budget is spent, then
/// waits for every ack.
async fn produce(
    conn: &mut BenchConn,
    conv: ConversationId,
    window: usize,
    budget: Budget,
    text: &str,
    clock: Option<&SendClock>,
    progress: &ProgressBar,
) -> Result<Produced, ConnError> {
    let tag: u64 = rand::random();
    let mut sent_at = HashMap::with_capacity(window * 2);
    let mut out = Produced {
        queued: 0,
        acked: 0,
        errors: 0,
        last_error: None,
        latency: new_histogram(),
    };
    let BenchConn {
        writer, replies, ..
    } = conn;
    let mut in_flight = 0usize;
    loop {
        while in_flight < window.max(1) && budget.take() {
            let index = out.queued;
            let id = writer.queue(Request::Send {
                conv,
                id: message_id(tag, index),
                text: text.to_owned(),
            })?;
            let now = Instant::now();
            sent_at.insert(id, now);
            if let Some(clock) = clock {
                clock.mark(index, now);
            }
            out.queued += 1;
            in_flight += 1;
        }
        if in_flight == 0 {
            return Ok(out);
        }
        writer.flush().await?;
        let mut frame = replies.next::<ServerFrame>().await?;
        let mut answered = 0;
        loop {
            match frame {
                Some(ServerFrame::Reply {
                    id,
                    response: Response::Sent { .. },
                }) => {
                    if let Some(at) = sent_at.remove(&id) {
                        let _ = out.latency.record(micros(at.elapsed()));
                    }
                    out.acked += 1;
                }
                Some(ServerFrame::Error { id, error }) => {
                    sent_at.remove(&id);
                    out.errors += 1;
                    out.last_error = Some(format!("{} ({})", error.message, error.code));
                }
                Some(ServerFrame::Closing { error }) => return Err(ConnError::Server(error)),
                Some(other) => {
                    return Err(ConnError::Protocol(format!("unexpected frame {other:?}")))
                }
                None => return Err(ConnError::Protocol("the server ended the session".into())),
            }
            in_flight -= 1;
            answered += 1;
            frame = match replies.buffered::<ServerFrame>()? {
                Some(next) => Some(next),
                None => break,
            };
        }
        progress.inc(answered);
    }
}

/// Reads `count` events from a delivery stream, checking that seqs follow `after` with no gap,
/// and hands each to `seen` with its arrival time.
async fn consume(
    frames: &mut FrameStream,
    after: Seq,
    count: u64,
    mut seen: impl FnMut(&Event, Instant),
) -> Result<(u64, u64), ConnError> {
    let (mut received, mut out_of_order) = (0u64, 0u64);
    let mut at = after;
    while received < count {
        let frame = frames.next::<DeliveryFrame>().await?;
        let now = Instant::now();
        match frame {
            Some(DeliveryFrame::Event(event)) => {
                if event.seq != at.next() {
                    out_of_order += 1;
                }
                at = event.seq;
                received += 1;
                seen(&event, now);
            }
            Some(DeliveryFrame::End { error }) => return Err(ConnError::Server(error)),
            // Receipt cursors ride along; the load tool does not count them.
            Some(DeliveryFrame::Receipt(_)) => {}
            Some(DeliveryFrame::Start { .. } | DeliveryFrame::Opened { .. }) => {
                return Err(ConnError::Protocol("a second first frame".into()))
            }
            None => break,
        }
    }
    Ok((received, out_of_order))
}

fn figures(pairs: &[(&str, serde_json::Value)]) -> serde_json::Map<String, serde_json::Value> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

pub async fn send(ctx: &mut Run, args: &SendArgs) -> anyhow::Result<Outcome> {
    let producers = args.producers.max(1);
    let accounts = ctx.accounts.take(producers).await?;
    let endpoints = ctx.endpoints(producers)?;
    let mut conns = connect_all(ctx, &accounts, &endpoints, 16).await?;
    let mut convs = Vec::with_capacity(producers);
    if args.shared {
        let others = accounts[1..]
            .iter()
            .map(user)
            .collect::<Result<Vec<_>, _>>()?;
        let conv = create(&mut conns[0], &others).await?;
        convs.resize(producers, conv);
    } else {
        for conn in &mut conns {
            convs.push(create(conn, &[]).await?);
        }
    }
    let budget = Budget {
        deadline: match args.messages {
            Some(_) => None,
            None => Some(Instant::now() + Duration::from_secs_f64(args.duration)),
        },
        remaining: args.messages.map(|n| Arc::new(AtomicU64::new(n))),
    };
    let progress = ctx.progress(args.messages.unwrap_or(0), "acked sends");
    let text = text_of(args.size);
    ctx.begin();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (mut conn, conv) in conns.into_iter().zip(convs.iter().copied()) {
        let (budget, text, progress, window) =
            (budget.clone(), text.clone(), progress.clone(), args.window);
        tasks.push(tokio::spawn(async move {
            let produced = produce(&mut conn, conv, window, budget, &text, None, &progress).await;
            (conn, produced)
        }));
    }
    let mut latency = new_histogram();
    let mut checks = Checks::default();
    let mut last_error = None;
    // Per conversation: a member's connection to read it with, and the messages acked there.
    let mut per_conv: HashMap<ConversationId, (usize, u64)> = HashMap::new();
    let mut conns = Vec::new();
    for (task, conv) in tasks.into_iter().zip(convs.iter().copied()) {
        let (conn, produced) = task.await.context("a producer panicked")?;
        let produced = produced.context("a producer failed")?;
        latency.add(&produced.latency)?;
        checks.expected += produced.queued;
        checks.completed += produced.acked;
        checks.errors += produced.errors;
        last_error = last_error.or(produced.last_error);
        per_conv.entry(conv).or_insert((conns.len(), 0)).1 += produced.acked;
        conns.push(conn);
    }
    let seconds = started.elapsed().as_secs_f64();
    ctx.end();
    progress.finish_and_clear();
    // Every acked message must be in the store: the head is Created (1) plus the acks.
    let mut stored_beyond_acks = 0;
    for (conv, (reader, acked)) in &per_conv {
        let stored = head(&mut conns[*reader], *conv).await?.0.saturating_sub(1);
        checks.lost += acked.saturating_sub(stored);
        stored_beyond_acks += stored.saturating_sub(*acked);
    }
    conns.iter().for_each(BenchConn::close);
    Ok(Outcome {
        params: json!({
            "producers": producers, "window": args.window, "shared": args.shared,
            "duration": args.duration, "messages": args.messages, "size": args.size,
        }),
        seconds,
        unit: "acked sends",
        operations: checks.completed,
        latency,
        latency_of: "send to durable ack",
        figures: figures(&[
            ("conversations", per_conv.len().into()),
            ("stored but not acked", stored_beyond_acks.into()),
            (
                "last error",
                last_error.map_or(serde_json::Value::Null, Into::into),
            ),
        ]),
        checks,
    })
}

pub async fn latency(ctx: &mut Run, args: &LatencyArgs) -> anyhow::Result<Outcome> {
    let rate = args.rate.max(1);
    let accounts = ctx.accounts.take(2).await?;
    let endpoints = ctx.endpoints(2)?;
    let mut conns = connect_all(ctx, &accounts, &endpoints, 2).await?;
    let mut receiver = conns.pop().context("two connections")?;
    let mut sender = conns.pop().context("two connections")?;
    let conv = create(&mut sender, &[user(&accounts[1])?]).await?;
    let mut stream = subscribe(&mut receiver, conv, StartAt::Latest).await?;
    let after = head(&mut sender, conv).await?;
    let warm = (args.warmup * rate as f64) as u64;
    let total = warm + ((args.duration * rate as f64) as u64).max(1);
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    // Each send is due at t0 + i * interval, whether or not earlier ones were answered.
    let t0 = Instant::now() + Duration::from_millis(50);
    let due = move |i: u64| t0 + interval.mul_f64(i as f64);
    let tag: u64 = rand::random();
    let progress = ctx.progress(total, "delivered");

    // The pacer is an OS thread: its sleeps are precise to tens of microseconds, where the
    // async timer's are to a millisecond.
    let (due_tx, mut due_rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let stop_pacer = Arc::new(AtomicBool::new(false));
    let stopping = stop_pacer.clone();
    let pacer = std::thread::spawn(move || {
        for i in 0..total {
            if stopping.load(Ordering::Relaxed) {
                return;
            }
            let wait = due(i).saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
            if due_tx.send(i).is_err() {
                return;
            }
        }
    });

    ctx.begin();
    let text = text_of(args.size);
    let sending = tokio::spawn(async move {
        let BenchConn {
            writer, replies, ..
        } = &mut sender;
        let mut acks = new_histogram();
        let (mut acked, mut errors, mut queued) = (0u64, 0u64, 0u64);
        let mut index_of = HashMap::new();
        let mut pacing = true;
        while acked + errors < total {
            tokio::select! {
                next = due_rx.recv(), if pacing => {
                    let Some(mut i) = next else { pacing = false; continue };
                    loop {
                        let id = writer.queue(Request::Send {
                            conv,
                            id: message_id(tag, i),
                            text: text.clone(),
                        })?;
                        index_of.insert(id, i);
                        queued += 1;
                        match due_rx.try_recv() {
                            Ok(next) => i = next,
                            Err(_) => break,
                        }
                    }
                    writer.flush().await?;
                }
                frame = replies.next::<ServerFrame>() => match frame? {
                    Some(ServerFrame::Reply { id, .. }) => {
                        if let Some(i) = index_of.remove(&id) {
                            if i >= warm {
                                let _ = acks.record(micros(Instant::now().saturating_duration_since(due(i))));
                            }
                        }
                        acked += 1;
                    }
                    Some(ServerFrame::Error { id, .. }) => {
                        index_of.remove(&id);
                        errors += 1;
                    }
                    other => return Err(ConnError::Protocol(format!("unexpected {other:?}"))),
                },
            }
        }
        Ok::<_, ConnError>((sender, acks, acked, errors, queued))
    });
    let mut latency = new_histogram();
    let mut last = t0;
    let (received, out_of_order) = consume(&mut stream, after, total, |event, now| {
        if let EventBody::Message { id, .. } = &event.body {
            if let Some(i) = message_index(tag, id) {
                if i >= warm {
                    let _ = latency.record(micros(now.saturating_duration_since(due(i))));
                }
            }
        }
        last = now;
        progress.inc(1);
    })
    .await?;
    let (mut sender, acks, acked, errors, queued) =
        sending.await.context("the sender panicked")??;
    stop_pacer.store(true, Ordering::Relaxed);
    let _ = pacer.join();
    ctx.end();
    progress.finish_and_clear();
    let measured_from = due(warm);
    let seconds = last.saturating_duration_since(measured_from).as_secs_f64();
    let stored = head(&mut sender, conv).await?.0 - after.0;
    sender.close();
    receiver.close();
    let ack = super::Latency::from_histogram(&acks);
    Ok(Outcome {
        params: json!({
            "rate": rate, "duration": args.duration, "warmup": args.warmup, "size": args.size,
        }),
        seconds,
        unit: "messages delivered",
        operations: received.saturating_sub(warm),
        latency,
        latency_of: "due time to receipt at another member",
        figures: figures(&[
            ("ack p50 µs (from due time)", ack.p50_us.into()),
            ("ack p99 µs (from due time)", ack.p99_us.into()),
            ("ack max µs (from due time)", ack.max_us.into()),
        ]),
        checks: Checks {
            expected: total,
            completed: received.min(acked),
            errors,
            lost: queued.saturating_sub(received) + acked.saturating_sub(stored),
            out_of_order,
            ok: false,
        },
    })
}

pub async fn fanout(ctx: &mut Run, args: &FanoutArgs) -> anyhow::Result<Outcome> {
    let members = args.members.max(1);
    let accounts = ctx.accounts.take(members + 1).await?;
    // Several sockets, so that the tool's own packet processing spreads over the cores.
    let endpoints = ctx.endpoints(members.div_ceil(10) + 1)?;
    let mut conns = connect_all(ctx, &accounts, &endpoints, 16).await?;
    let mut sender = conns.remove(0);
    let names = accounts[1..]
        .iter()
        .map(user)
        .collect::<Result<Vec<_>, _>>()?;
    let conv = create(&mut sender, &names).await?;
    let after = head(&mut sender, conv).await?;
    let mut streams = Vec::with_capacity(members);
    for conn in &mut conns {
        streams.push(subscribe(conn, conv, StartAt::Latest).await?);
    }
    let messages = args.messages.max(1);
    let progress = ctx.progress(messages * members as u64, "deliveries");
    let clock = Arc::new(SendClock::new(Instant::now(), messages));
    ctx.begin();
    let started = Instant::now();
    let mut receivers = Vec::new();
    for mut stream in streams {
        let (clock, progress) = (clock.clone(), progress.clone());
        receivers.push(tokio::spawn(async move {
            let mut latency = new_histogram();
            let mut last = Instant::now();
            let mut batch = 0;
            let result = consume(&mut stream, after, messages, |event, now| {
                if let EventBody::Message { id, .. } = &event.body {
                    let index = u64::from_be_bytes(id.0[8..].try_into().unwrap_or_default());
                    if let Some(d) = clock.since(index, now) {
                        let _ = latency.record(micros(d));
                    }
                }
                last = now;
                batch += 1;
                if batch == 256 {
                    progress.inc(batch);
                    batch = 0;
                }
            })
            .await;
            progress.inc(batch);
            result.map(|counts| (counts, latency, last))
        }));
    }
    let budget = Budget {
        deadline: None,
        remaining: Some(Arc::new(AtomicU64::new(messages))),
    };
    let produced = produce(
        &mut sender,
        conv,
        args.window,
        budget,
        &text_of(args.size),
        Some(&clock),
        &ProgressBar::hidden(),
    )
    .await?;
    let mut latency = new_histogram();
    let mut checks = Checks {
        expected: messages * members as u64,
        errors: produced.errors,
        ..Checks::default()
    };
    let mut last = started;
    for receiver in receivers {
        let ((received, out_of_order), member_latency, member_last) =
            receiver.await.context("a member panicked")??;
        checks.completed += received;
        checks.out_of_order += out_of_order;
        checks.lost += produced.acked.saturating_sub(received);
        latency.add(&member_latency)?;
        last = last.max(member_last);
    }
    let seconds = last.duration_since(started).as_secs_f64();
    ctx.end();
    progress.finish_and_clear();
    let stored = head(&mut sender, conv).await?.0 - after.0;
    checks.lost += produced.acked.saturating_sub(stored);
    sender.close();
    conns.iter().for_each(BenchConn::close);
    let send_rate = produced.acked as f64 / seconds.max(1e-9);
    Ok(Outcome {
        params: json!({
            "members": members, "messages": messages, "window": args.window, "size": args.size,
        }),
        seconds,
        unit: "deliveries",
        operations: checks.completed,
        latency,
        latency_of: "send to receipt, per member",
        figures: figures(&[
            ("messages acked per second", send_rate.into()),
            ("ack p50 µs", produced.latency.value_at_quantile(0.5).into()),
        ]),
        checks,
    })
}

pub async fn connections(ctx: &mut Run, args: &ConnectionsArgs) -> anyhow::Result<Outcome> {
    let count = args.count.max(1);
    let accounts = ctx.accounts.take(count).await?;
    let endpoints = ctx.endpoints(count.div_ceil(args.per_socket.max(1)))?;
    let progress = ctx.progress(count as u64, "connections");
    let baseline = ctx.daemon_rss();
    ctx.begin();
    let started = Instant::now();
    let target = &ctx.target;
    let results: Vec<(Result<BenchConn, ConnError>, Duration)> =
        stream::iter(accounts.iter().enumerate())
            .map(|(i, account)| {
                let endpoint = &endpoints[i % endpoints.len()];
                let progress = &progress;
                async move {
                    let one = Instant::now();
                    let conn = BenchConn::connect(endpoint, target, &account.token).await;
                    progress.inc(1);
                    (conn, one.elapsed())
                }
            })
            .buffer_unordered(args.concurrency.max(1))
            .collect()
            .await;
    let open_seconds = started.elapsed().as_secs_f64();
    progress.finish_and_clear();
    let mut latency = new_histogram();
    let mut conns = Vec::with_capacity(count);
    let mut checks = Checks {
        expected: count as u64,
        ..Checks::default()
    };
    let mut first_error = None;
    for (conn, took) in results {
        match conn {
            Ok(conn) => {
                let _ = latency.record(micros(took));
                conns.push(conn);
            }
            Err(e) => {
                checks.errors += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    tokio::time::sleep(Duration::from_secs_f64(args.hold)).await;
    let held = ctx.daemon_rss();
    ctx.end();
    // Still open after the hold: nothing closed them while idle.
    let alive = conns
        .iter()
        .filter(|c| c.conn.close_reason().is_none())
        .count() as u64;
    checks.completed = alive;
    checks.lost = conns.len() as u64 - alive;
    conns.iter().for_each(BenchConn::close);
    for endpoint in &endpoints {
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    }
    let per_connection = match (baseline, held) {
        (Some(before), Some(after)) if !conns.is_empty() => {
            json!(after.saturating_sub(before) as f64 / conns.len() as f64)
        }
        _ => serde_json::Value::Null,
    };
    Ok(Outcome {
        params: json!({
            "count": count, "concurrency": args.concurrency, "hold": args.hold,
            "per_socket": args.per_socket,
        }),
        seconds: open_seconds,
        unit: "authenticated connections opened",
        operations: conns.len() as u64,
        latency,
        latency_of: "connect, TLS handshake, Hello to Welcome",
        figures: figures(&[
            ("connections held", alive.into()),
            ("daemon RSS per connection, bytes", per_connection),
            (
                "daemon RSS before, bytes",
                baseline.map_or(serde_json::Value::Null, Into::into),
            ),
            (
                "daemon RSS held, bytes",
                held.map_or(serde_json::Value::Null, Into::into),
            ),
            (
                "first error",
                first_error.map_or(serde_json::Value::Null, Into::into),
            ),
        ]),
        checks,
    })
}

pub async fn replay(ctx: &mut Run, args: &ReplayArgs) -> anyhow::Result<Outcome> {
    let messages = args.messages.max(1);
    let accounts = ctx.accounts.take(2).await?;
    let endpoints = ctx.endpoints(2)?;
    let mut sender = connect_all(ctx, &accounts[..1], &endpoints, 1)
        .await?
        .pop()
        .context("one connection")?;
    let conv = create(&mut sender, &[user(&accounts[1])?]).await?;
    let after = head(&mut sender, conv).await?;
    // The member is offline while the backlog is written.
    let filling = ctx.progress(messages, "writing the backlog");
    let fill_started = Instant::now();
    let budget = Budget {
        deadline: None,
        remaining: Some(Arc::new(AtomicU64::new(messages))),
    };
    let produced = produce(
        &mut sender,
        conv,
        64,
        budget,
        &text_of(args.size),
        None,
        &filling,
    )
    .await?;
    let fill_seconds = fill_started.elapsed().as_secs_f64();
    filling.finish_and_clear();
    let progress = ctx.progress(produced.acked, "replayed");
    ctx.begin();
    let started = Instant::now();
    let mut reader = connect_all(ctx, &accounts[1..], &endpoints[1..], 1)
        .await?
        .pop()
        .context("one connection")?;
    let connected = started.elapsed();
    let subscribing = Instant::now();
    let start = StartAt::After(Position {
        epoch: reader.epoch,
        seq: after,
    });
    let mut stream = subscribe(&mut reader, conv, start).await?;
    let mut first = None;
    let mut batch = 0;
    let (received, out_of_order) = consume(&mut stream, after, produced.acked, |_, now| {
        first.get_or_insert(now);
        batch += 1;
        if batch == 4096 {
            progress.inc(batch);
            batch = 0;
        }
    })
    .await?;
    let seconds = subscribing.elapsed().as_secs_f64();
    ctx.end();
    progress.finish_and_clear();
    let mut latency = new_histogram();
    if let Some(first) = first {
        let _ = latency.record(micros(first.duration_since(subscribing)));
    }
    sender.close();
    reader.close();
    Ok(Outcome {
        params: json!({ "messages": messages, "size": args.size }),
        seconds,
        unit: "messages replayed",
        operations: received,
        latency,
        latency_of: "subscribe to first replayed event",
        figures: figures(&[
            (
                "reconnect (handshake + Hello) ms",
                (connected.as_secs_f64() * 1000.0).into(),
            ),
            (
                "backlog written per second",
                (produced.acked as f64 / fill_seconds.max(1e-9)).into(),
            ),
        ]),
        checks: Checks {
            expected: messages,
            completed: received,
            errors: produced.errors,
            lost: produced.acked.saturating_sub(received),
            out_of_order,
            ok: false,
        },
    })
}

/// The typing change a member's datagram announces.
fn typing_datagram(conv: ConversationId, typing: bool) -> Vec<u8> {
    let datagram = if typing {
        ClientDatagram::Typing { conv }
    } else {
        ClientDatagram::StoppedTyping { conv }
    };
    encode_datagram(&datagram).unwrap_or_default()
}

pub async fn typing(ctx: &mut Run, args: &TypingArgs) -> anyhow::Result<Outcome> {
    let members = args.members.max(2);
    let accounts = ctx.accounts.take(members).await?;
    let endpoints = ctx.endpoints(members)?;
    let mut conns = connect_all(ctx, &accounts, &endpoints, 16).await?;
    let names = accounts[1..]
        .iter()
        .map(user)
        .collect::<Result<Vec<_>, _>>()?;
    let conv = create(&mut conns[0], &names).await?;
    let first = user(&accounts[0])?;
    ctx.begin();

    // Latency: one change at a time from the first member, timed at the second.
    let progress = ctx.progress(args.samples, "typing samples");
    let mut latency = new_histogram();
    let mut lost = 0;
    let (a, b) = (conns[0].conn.clone(), conns[1].conn.clone());
    // Other members' datagrams are read and dropped, as a client would.
    let draining = Arc::new(AtomicBool::new(true));
    for conn in conns.iter().skip(2) {
        let (conn, draining) = (conn.conn.clone(), draining.clone());
        tokio::spawn(async move {
            while draining.load(Ordering::Relaxed) && conn.read_datagram().await.is_ok() {}
        });
    }
    let sampling = Instant::now();
    for i in 0..args.samples {
        let typing = i % 2 == 0;
        let sent = Instant::now();
        a.send_datagram(typing_datagram(conv, typing).into())
            .context("sending a datagram")?;
        let arrived = tokio::time::timeout(Duration::from_millis(250), async {
            loop {
                let datagram = b.read_datagram().await?;
                match decode_datagram::<ServerDatagram>(&datagram) {
                    Ok(ServerDatagram::Typing { conv: c, user })
                        if typing && c == conv && user == first =>
                    {
                        return Ok(())
                    }
                    Ok(ServerDatagram::StoppedTyping { conv: c, user })
                        if !typing && c == conv && user == first =>
                    {
                        return Ok(())
                    }
                    _ => {}
                }
            }
        })
        .await;
        match arrived {
            Ok(Ok(())) => {
                let _ = latency.record(micros(sent.elapsed()));
            }
            Ok(Err::<(), quinn::ConnectionError>(e)) => bail!("the connection failed: {e}"),
            Err(_) => lost += 1,
        }
        progress.inc(1);
        tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
    }
    let sample_seconds = sampling.elapsed().as_secs_f64();
    progress.finish_and_clear();
    draining.store(false, Ordering::Relaxed);

    // Rate: every member sends at --rate and counts what the daemon relays to it.
    let received = Arc::new(AtomicU64::new(0));
    let sending = Arc::new(AtomicBool::new(true));
    let duration = Duration::from_secs_f64(args.duration);
    let mut tasks = Vec::new();
    for member in &conns {
        let conn = member.conn.clone();
        let (received, sending) = (received.clone(), sending.clone());
        tokio::spawn(async move {
            let until = Instant::now() + duration + Duration::from_millis(300);
            while let Ok(Ok(datagram)) =
                tokio::time::timeout_at(until.into(), conn.read_datagram()).await
            {
                if decode_datagram::<ServerDatagram>(&datagram).is_ok() {
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        let conn = member.conn.clone();
        let rate = args.rate.max(1);
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let started = Instant::now();
            let mut sent = 0u64;
            while sending.load(Ordering::Relaxed) && started.elapsed() < duration {
                tick.tick().await;
                let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
                while sent < due {
                    let _ = conn.send_datagram(typing_datagram(conv, sent % 2 == 0).into());
                    sent += 1;
                }
            }
            sent
        }));
    }
    let mut offered = 0;
    for task in tasks {
        offered += task.await.unwrap_or(0);
    }
    sending.store(false, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(400)).await;
    ctx.end();
    let relayed = received.load(Ordering::Relaxed);
    let ideal = offered * (members as u64 - 1);
    conns.iter().for_each(BenchConn::close);
    Ok(Outcome {
        params: json!({
            "members": members, "samples": args.samples, "interval_ms": args.interval_ms,
            "duration": args.duration, "rate": args.rate,
        }),
        seconds: sample_seconds,
        unit: "latency samples",
        operations: args.samples - lost,
        latency,
        latency_of: "typing datagram, member to member through the daemon",
        figures: figures(&[
            ("rate phase: datagrams sent", offered.into()),
            (
                "rate phase: relayed per second",
                (relayed as f64 / args.duration.max(1e-9)).into(),
            ),
            (
                "rate phase: share relayed",
                (relayed as f64 / ideal.max(1) as f64).into(),
            ),
        ]),
        checks: Checks {
            expected: args.samples,
            completed: args.samples - lost,
            lost,
            ..Checks::default()
        },
    })
}
