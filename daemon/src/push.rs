//! The offline push hook: when a message arrives for a member with no device connected, tell
//! an outside service (a mobile push gateway) so that it can wake the member's phone.
//!
//! The hook is an HTTP POST of a JSON body to a configured URL, or a command that reads the
//! same JSON on its standard input. It runs in its own task: conversation actors hand it
//! arrivals through a bounded queue and never wait ([`PushHandle::notify`] drops and counts when
//! the queue is full), so a hook that hangs or fails never delays a message.
//!
//! Per user, notifications are batched (one call carries everything that arrived within the
//! batch window), rate-limited (at most one call per `per_user_interval`), and retried with
//! exponential backoff when a call fails. The policy is [`PushQueue`], without IO: time is an
//! input. What a call may show is the preview policy: nothing, the sender, or the text.
//!
//! The body, for user `bob`:
//! `{"user":"bob","notifications":[{"conv":7,"seq":42,"at_ms":1700000000000,"sender":"alice",
//! "text":"hi"}],"dropped":0}` — `sender` only with the `sender` or `text` preview, `text` only
//! with `text` (cut to 256 bytes at a character boundary); `dropped` counts notifications of
//! this user left out because too many piled up.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quip_protocol::{ConversationId, Seq, UserName};
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::presence::PresenceHandle;

/// Notifications held per user while a batch waits (for its window, the rate limit or a
/// retry); older ones are dropped and counted in the next call's `dropped`.
const MAX_PENDING_PER_USER: usize = 100;
/// Hook calls running at once; more wait their turn (they never hold up a conversation).
const MAX_CALLS: usize = 16;
/// Longest text preview, in bytes.
const MAX_PREVIEW: usize = 256;

/// Where notifications go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hook {
    /// POST the JSON body to this `http://` or `https://` URL; any 2xx answer is success.
    Http { url: String },
    /// Run this program with these arguments, the JSON body on its standard input; exit
    /// status 0 is success.
    Command { program: PathBuf, args: Vec<String> },
}

/// What a notification may tell the outside service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preview {
    /// Only that something arrived, in which conversation, at which seq.
    None,
    /// ...and who sent it.
    #[default]
    Sender,
    /// ...and the beginning of its text.
    Text,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushConfig {
    pub hook: Hook,
    pub preview: Preview,
    /// A user's notifications arriving within this window go out in one call.
    pub batch_window: Duration,
    /// At most one call per user this often.
    pub per_user_interval: Duration,
    /// Calls of one batch, the first included, before it is given up.
    pub max_attempts: u32,
    /// The wait before the first retry; it doubles after each failure, up to `retry_max`.
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// A call that has not finished by then failed.
    pub timeout: Duration,
    /// Arrivals waiting for the hook's task; more are dropped and counted.
    pub queue: usize,
}

/// A durable message, as a conversation actor hands it over.
#[derive(Clone, Debug)]
pub struct Arrival {
    pub conv: ConversationId,
    pub seq: Seq,
    pub sender: UserName,
    pub at_ms: u64,
    pub text: String,
    /// The members other than the sender; the hook's task keeps those with no device online.
    pub to: Vec<UserName>,
}

/// One notification in a call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Notification {
    pub conv: u64,
    pub seq: u64,
    pub at_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sender: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

/// The JSON body of one call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Batch {
    pub user: String,
    pub notifications: Vec<Notification>,
    pub dropped: u64,
}

/// What the hook did, for metrics and tests.
#[derive(Debug, Default)]
pub struct PushStats {
    /// Arrivals taken into the queue.
    pub queued: AtomicU64,
    /// Arrivals dropped because the queue was full.
    pub dropped: AtomicU64,
    /// Notifications not made because the member had a device online.
    pub online: AtomicU64,
    /// Calls made (retries included).
    pub calls: AtomicU64,
    /// Calls that failed (an error answer, a timeout, a failed command).
    pub failures: AtomicU64,
    /// Batches given up after their last attempt.
    pub given_up: AtomicU64,
    /// Batches delivered.
    pub delivered: AtomicU64,
}

/// Counts one event both in `PushStats` (for tests in this process) and in the metric `name`.
fn count(counter: &AtomicU64, name: &'static str) {
    counter.fetch_add(1, Ordering::Relaxed);
    metrics::counter!(name).increment(1);
}

/// Reads a counter.
pub fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// The cheap handle conversation actors hold.
#[derive(Clone, Debug)]
pub struct PushHandle {
    arrivals: mpsc::Sender<Arrival>,
    stats: Arc<PushStats>,
}

impl PushHandle {
    /// Starts the hook's task. Fails if the HTTP client cannot be made.
    pub fn start(config: PushConfig, presence: PresenceHandle) -> anyhow::Result<PushHandle> {
        let (arrivals, inbox) = mpsc::channel(config.queue.max(1));
        let stats = Arc::new(PushStats::default());
        let caller = Caller::new(&config)?;
        let actor = PushActor {
            queue: PushQueue::new(&config),
            config,
            presence,
            caller: Arc::new(caller),
            stats: stats.clone(),
            calls: JoinSet::new(),
        };
        tokio::spawn(actor.run(inbox).instrument(tracing::info_span!("push")));
        Ok(PushHandle { arrivals, stats })
    }

    /// Hands a message to the hook's task. Never waits: when the queue is full the arrival is
    /// dropped and counted.
    pub fn notify(&self, arrival: Arrival) {
        match self.arrivals.try_send(arrival) {
            Ok(()) => count(&self.stats.queued, crate::metrics::PUSH_QUEUED),
            Err(_) => count(&self.stats.dropped, crate::metrics::PUSH_DROPPED),
        }
    }

    pub fn stats(&self) -> &Arc<PushStats> {
        &self.stats
    }
}

/// Batching, rate limit and retries of every user, without IO.
///
/// Inputs: [`add`](PushQueue::add) a notification; [`handle_result`](PushQueue::handle_result)
/// of a call. Outputs: [`poll_due`](PushQueue::poll_due) the batches to send now, and
/// [`poll_timeout`](PushQueue::poll_timeout) when to ask again.
#[derive(Debug)]
pub struct PushQueue {
    batch_window: Duration,
    per_user_interval: Duration,
    max_attempts: u32,
    retry_initial: Duration,
    retry_max: Duration,
    users: HashMap<UserName, UserQueue>,
}

#[derive(Debug, Default)]
struct UserQueue {
    pending: Vec<Notification>,
    dropped: u64,
    /// When the oldest pending notification arrived.
    since: Option<Instant>,
    /// No call before this (the rate limit).
    next_allowed: Option<Instant>,
    in_flight: bool,
    /// A failed batch, its attempts so far, and when to try again.
    retry: Option<(Batch, u32, Instant)>,
}

impl UserQueue {
    fn due_at(&self, window: Duration) -> Option<Instant> {
        if self.in_flight {
            return None;
        }
        if let Some((_, _, at)) = &self.retry {
            return Some(*at);
        }
        let since = self.since?;
        let at = since + window;
        Some(self.next_allowed.map_or(at, |allowed| at.max(allowed)))
    }
}

impl PushQueue {
    pub fn new(config: &PushConfig) -> Self {
        PushQueue {
            batch_window: config.batch_window,
            per_user_interval: config.per_user_interval,
            max_attempts: config.max_attempts.max(1),
            retry_initial: config.retry_initial,
            retry_max: config.retry_max,
            users: HashMap::new(),
        }
    }

    pub fn add(&mut self, user: UserName, notification: Notification, now: Instant) {
        let queue = self.users.entry(user).or_default();
        if queue.pending.len() >= MAX_PENDING_PER_USER {
            queue.pending.remove(0);
            queue.dropped += 1;
        }
        queue.pending.push(notification);
        queue.since.get_or_insert(now);
    }

    /// The batches due now, each marked in flight until its result is handled.
    pub fn poll_due(&mut self, now: Instant) -> Vec<(Batch, u32)> {
        let mut due = Vec::new();
        for (user, queue) in &mut self.users {
            if queue.due_at(self.batch_window).is_none_or(|at| at > now) {
                continue;
            }
            let (batch, attempt) = match queue.retry.take() {
                Some((batch, attempt, _)) => (batch, attempt),
                None => {
                    queue.since = None;
                    let batch = Batch {
                        user: user.to_string(),
                        notifications: std::mem::take(&mut queue.pending),
                        dropped: std::mem::take(&mut queue.dropped),
                    };
                    (batch, 0)
                }
            };
            queue.in_flight = true;
            queue.next_allowed = Some(now + self.per_user_interval);
            due.push((batch, attempt));
        }
        due
    }

    /// When the next batch is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.users
            .values()
            .filter_map(|q| q.due_at(self.batch_window))
            .min()
    }

    /// A call of `batch` (attempt `attempt`, from 0) ended. A failure is retried after the
    /// backoff, or given up after the last attempt (returns `true` then).
    pub fn handle_result(&mut self, batch: Batch, attempt: u32, ok: bool, now: Instant) -> bool {
        let Ok(user) = batch.user.parse::<UserName>() else {
            return false;
        };
        let queue = self.users.entry(user.clone()).or_default();
        queue.in_flight = false;
        let mut given_up = false;
        if !ok {
            if attempt + 1 < self.max_attempts {
                let backoff = self
                    .retry_initial
                    .saturating_mul(1u32 << attempt.min(16))
                    .min(self.retry_max);
                queue.retry = Some((batch, attempt + 1, now + backoff));
            } else {
                given_up = true;
            }
        }
        if queue.pending.is_empty() && queue.retry.is_none() {
            // Keep the rate limit's memory only while it can still matter.
            if queue.next_allowed.is_none_or(|at| at <= now) {
                self.users.remove(&user);
            }
        }
        given_up
    }
}

struct PushActor {
    config: PushConfig,
    queue: PushQueue,
    presence: PresenceHandle,
    caller: Arc<Caller>,
    stats: Arc<PushStats>,
    calls: JoinSet<(Batch, u32, bool)>,
}

impl PushActor {
    async fn run(mut self, mut inbox: mpsc::Receiver<Arrival>) {
        loop {
            let timer = self.queue.poll_timeout();
            let sleep = async {
                match timer {
                    Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                // Results first (they free call slots), then due batches, then new arrivals.
                biased;
                Some(done) = self.calls.join_next(), if !self.calls.is_empty() => {
                    if let Ok((batch, attempt, ok)) = done {
                        if ok {
                            count(&self.stats.delivered, crate::metrics::PUSH_DELIVERED);
                        } else {
                            count(&self.stats.failures, crate::metrics::PUSH_CALL_FAILURES);
                        }
                        if self.queue.handle_result(batch, attempt, ok, Instant::now()) {
                            count(&self.stats.given_up, crate::metrics::PUSH_GIVEN_UP);
                            tracing::warn!("push hook failed on every attempt; notifications dropped");
                        }
                    }
                }
                () = sleep, if self.calls.len() < MAX_CALLS => {}
                arrival = inbox.recv() => match arrival {
                    Some(arrival) => self.on_arrival(arrival).await,
                    None => break,
                },
            }
            if self.calls.len() < MAX_CALLS {
                for (batch, attempt) in self.queue.poll_due(Instant::now()) {
                    let caller = self.caller.clone();
                    count(&self.stats.calls, crate::metrics::PUSH_CALLS);
                    self.calls.spawn(async move {
                        let ok = caller.call(&batch).await;
                        (batch, attempt, ok)
                    });
                }
            }
        }
    }

    async fn on_arrival(&mut self, arrival: Arrival) {
        let online = self.presence.connected(arrival.to.clone()).await;
        let now = Instant::now();
        for user in arrival.to {
            if online.contains(&user) {
                count(&self.stats.online, crate::metrics::PUSH_SKIPPED_ONLINE);
                continue;
            }
            let notification = Notification {
                conv: arrival.conv.0,
                seq: arrival.seq.0,
                at_ms: arrival.at_ms,
                sender: (self.config.preview != Preview::None).then(|| arrival.sender.to_string()),
                text: (self.config.preview == Preview::Text)
                    .then(|| preview(&arrival.text).to_owned()),
            };
            self.queue.add(user, notification, now);
        }
    }
}

/// At most `MAX_PREVIEW` bytes of `text`, cut at a character boundary.
fn preview(text: &str) -> &str {
    let mut end = text.len().min(MAX_PREVIEW);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Makes one call of the hook.
struct Caller {
    hook: Hook,
    timeout: Duration,
    http: Option<reqwest::Client>,
}

impl Caller {
    fn new(config: &PushConfig) -> anyhow::Result<Caller> {
        let http = match &config.hook {
            Hook::Http { .. } => Some(http_client(config.timeout)?),
            Hook::Command { .. } => None,
        };
        Ok(Caller {
            hook: config.hook.clone(),
            timeout: config.timeout,
            http,
        })
    }

    /// Whether the hook took the batch.
    async fn call(&self, batch: &Batch) -> bool {
        let body = match serde_json::to_vec(batch) {
            Ok(body) => body,
            Err(e) => {
                tracing::error!(error = %e, "encoding a push batch");
                return false;
            }
        };
        let outcome = tokio::time::timeout(self.timeout, self.deliver(body)).await;
        match outcome {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, user = %batch.user, "push hook failed");
                false
            }
            Err(_) => {
                tracing::warn!(user = %batch.user, timeout = ?self.timeout, "push hook timed out");
                false
            }
        }
    }

    async fn deliver(&self, body: Vec<u8>) -> anyhow::Result<()> {
        match (&self.hook, &self.http) {
            (Hook::Http { url }, Some(http)) => {
                let response = http
                    .post(url)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body)
                    .send()
                    .await?;
                let status = response.status();
                anyhow::ensure!(status.is_success(), "the hook answered {status}");
                Ok(())
            }
            (Hook::Command { program, args }, _) => {
                let mut child = tokio::process::Command::new(program)
                    .args(args)
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .kill_on_drop(true)
                    .spawn()?;
                if let Some(mut stdin) = child.stdin.take() {
                    // The exit status decides: a hook that needs no input may exit before it
                    // reads the batch, which closes the pipe under this write.
                    match stdin.write_all(&body).await {
                        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                            return Err(e.into())
                        }
                        _ => {}
                    }
                }
                let status = child.wait().await?;
                anyhow::ensure!(status.success(), "the hook command exited with {status}");
                Ok(())
            }
            (Hook::Http { .. }, None) => anyhow::bail!("no HTTP client"),
        }
    }
}

/// An HTTP client that verifies servers against the operating system's roots, with the same
/// TLS stack (rustls with ring) as the rest of the daemon.
fn http_client(timeout: Duration) -> anyhow::Result<reqwest::Client> {
    use rustls_platform_verifier::BuilderVerifierExt;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_platform_verifier()?
        .with_no_client_auth();
    Ok(reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(timeout)
        .build()?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn config() -> PushConfig {
        PushConfig {
            hook: Hook::Http {
                url: "http://127.0.0.1:1/".into(),
            },
            preview: Preview::Sender,
            batch_window: Duration::from_millis(100),
            per_user_interval: Duration::from_secs(1),
            max_attempts: 3,
            retry_initial: Duration::from_millis(200),
            retry_max: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            queue: 16,
        }
    }

    fn note(seq: u64) -> Notification {
        Notification {
            conv: 1,
            seq,
            at_ms: 0,
            sender: None,
            text: None,
        }
    }

    fn bob() -> UserName {
        "bob".parse().unwrap()
    }

    /// A command's exit status is its answer, whether or not it read the batch: one that
    /// exits 0 without reading took it, one that reads it and fails did not.
    #[tokio::test]
    async fn a_command_hook_is_judged_by_its_exit_status() {
        let caller = |script: &str| Caller {
            hook: Hook::Command {
                program: "sh".into(),
                args: vec!["-c".into(), script.into()],
            },
            timeout: Duration::from_secs(10),
            http: None,
        };
        // More than a pipe holds, so the write outlives a hook that does not read.
        let body = vec![b' '; 1 << 20];
        assert!(caller("exit 0").deliver(body.clone()).await.is_ok());
        assert!(caller("cat >/dev/null").deliver(body.clone()).await.is_ok());
        assert!(caller("exit 3").deliver(body.clone()).await.is_err());
        assert!(caller("cat >/dev/null; exit 1")
            .deliver(body)
            .await
            .is_err());
    }

    #[test]
    fn a_window_batches_and_the_rate_limit_spaces_calls() {
        let start = Instant::now();
        let mut queue = PushQueue::new(&config());
        queue.add(bob(), note(1), start);
        queue.add(bob(), note(2), start + Duration::from_millis(50));
        assert!(queue.poll_due(start + Duration::from_millis(99)).is_empty());
        assert_eq!(
            queue.poll_timeout(),
            Some(start + Duration::from_millis(100))
        );
        let due = queue.poll_due(start + Duration::from_millis(100));
        assert_eq!(due.len(), 1);
        let (batch, attempt) = due.into_iter().next().unwrap();
        assert_eq!(batch.notifications, vec![note(1), note(2)]);
        assert_eq!(attempt, 0);
        let sent = start + Duration::from_millis(100);
        assert!(!queue.handle_result(batch, 0, true, sent));
        // The next call waits for the rate limit, not only the window.
        queue.add(bob(), note(3), sent + Duration::from_millis(10));
        assert!(queue.poll_due(sent + Duration::from_millis(500)).is_empty());
        assert_eq!(queue.poll_timeout(), Some(sent + Duration::from_secs(1)));
        assert_eq!(queue.poll_due(sent + Duration::from_secs(1)).len(), 1);
    }

    #[test]
    fn failures_are_retried_with_backoff_then_given_up() {
        let start = Instant::now();
        let mut queue = PushQueue::new(&config());
        queue.add(bob(), note(1), start);
        let at = start + Duration::from_millis(100);
        let (batch, attempt) = queue.poll_due(at).pop().unwrap();
        assert!(!queue.handle_result(batch, attempt, false, at));
        assert_eq!(queue.poll_timeout(), Some(at + Duration::from_millis(200)));
        let at = at + Duration::from_millis(200);
        let (batch, attempt) = queue.poll_due(at).pop().unwrap();
        assert_eq!(attempt, 1);
        assert!(!queue.handle_result(batch, attempt, false, at));
        assert_eq!(queue.poll_timeout(), Some(at + Duration::from_millis(400)));
        let at = at + Duration::from_millis(400);
        let (batch, attempt) = queue.poll_due(at).pop().unwrap();
        assert_eq!(attempt, 2);
        assert!(queue.handle_result(batch, attempt, false, at), "given up");
        assert_eq!(queue.poll_timeout(), None);
    }

    #[test]
    fn a_pile_up_drops_the_oldest_and_says_so() {
        let start = Instant::now();
        let mut queue = PushQueue::new(&config());
        for seq in 0..(MAX_PENDING_PER_USER as u64 + 5) {
            queue.add(bob(), note(seq), start);
        }
        let (batch, _) = queue
            .poll_due(start + Duration::from_secs(1))
            .pop()
            .unwrap();
        assert_eq!(batch.notifications.len(), MAX_PENDING_PER_USER);
        assert_eq!(batch.dropped, 5);
        assert_eq!(batch.notifications[0].seq, 5);
    }

    #[test]
    fn previews_are_cut_at_a_character_boundary() {
        let text = "é".repeat(200);
        let cut = preview(&text);
        assert!(cut.len() <= MAX_PREVIEW && cut.len() >= MAX_PREVIEW - 1);
        assert!(text.starts_with(cut));
    }
}
