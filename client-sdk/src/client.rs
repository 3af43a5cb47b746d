//! The client: one logical session that survives connection loss.
//!
//! A supervisor task owns the connection's life: it connects, and when the connection ends it
//! reconnects with exponential backoff and full jitter, then resumes every followed conversation
//! from its cursor and re-sends every unacknowledged message, in the original order, with its
//! original id (the server answers a message it already stored with the original seq).
//!
//! State shared by the app-facing handle and the connection tasks lives in one `State` behind a
//! short lock that is never held across an await. Queueing on the connection happens under that
//! lock, so re-sends after a reconnect always precede new sends.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use std::collections::{BTreeSet, HashSet, VecDeque};

use quip_protocol::{
    encode_datagram, encode_frame, limits, ClientDatagram, ClientFrame, ClientMessageId,
    ConversationId, ConversationSummary, DeliveryFrame, Epoch, ErrorBody, ErrorCode, Event,
    FrameDecoder, InboxEntry, MessageState, Position, PresenceInfo, Receipt, Request, RequestId,
    Response, Seq, ServerFrame, StartAt, UserName,
};
use serde::de::DeserializeOwned;
use tokio::sync::{broadcast, mpsc, oneshot, watch, Notify};

use crate::ephemeral::{self, EphemeralEvent, EphemeralEvents, PresenceVersions};
use crate::outbox::{is_permanent, Action, Admit, Cursor, Outbox, OutboxEntry};
use crate::persist::SavedState;
use crate::retry::{Backoff, Stall};
use crate::subscription::{Delivered, Origin, Subscription, Taken};
use crate::{ClientConfig, ClientError};

/// Events buffered per subscription before the client stops reading its stream (and QUIC flow
/// control slows the server's delivery to this client alone).
const SUBSCRIPTION_BUFFER: usize = 1024;
/// Coalescing delay of state-file writes.
const PERSIST_DELAY: Duration = Duration::from_millis(20);
/// Coalescing delay of delivery receipts: one request per conversation per this, at most.
const REPORT_DELAY: Duration = Duration::from_millis(100);
/// Client message ids this client remembers having used, to tell its own events apart.
const OWN_IDS: usize = 8192;
/// First wait before sends refused with a 5xx answer are tried again, when the answer names
/// none (SPEC 9.1 item 5); it doubles per round, up to `ClientConfig::reconnect_max`.
const UNAVAILABLE_RETRY: Duration = Duration::from_millis(500);

/// How the client's link to the server is doing; see [`Client::status`].
#[derive(Debug, Clone)]
pub enum Status {
    /// Connected, and the server serves what the client sends.
    Connected,
    /// The connection is lost and the client is reconnecting: `error` says why the connection
    /// or the latest attempt failed.
    Reconnecting { error: ClientError },
    /// Connected, but the server answers `UNAVAILABLE` (it cannot store now): sends wait and
    /// are tried again with backoff, one probe per round.
    Unavailable { error: ErrorBody },
    /// The client stopped: closed by the app, or it gave up (`ClientConfig::give_up_after`).
    Closed { error: ClientError },
}

/// A page of history with the current state of each of its messages (see [`Client::page`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub events: Vec<Event>,
    /// One per message (plain or reply) among `events`, in the same order.
    pub states: Vec<MessageState>,
    pub head: Seq,
    /// The oldest seq the server still has (1 unless retention removed older events).
    pub oldest: Seq,
}

/// An acknowledged send: the message is durable at `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    pub conv: ConversationId,
    pub seq: Seq,
    pub id: ClientMessageId,
    pub at_ms: u64,
    /// The server had stored this id before; `seq` is the original one.
    pub duplicate: bool,
}

/// A send that an earlier run left unacknowledged in the state file: the client re-sends it
/// when it connects, before any new send (see [`Client::resumed_sends`]).
#[derive(Debug)]
pub struct Resumed {
    pub entry: OutboxEntry,
    outcome: oneshot::Receiver<Result<Sent, ClientError>>,
}

impl Resumed {
    /// Its seq once the server acknowledged it, or why it failed. An entry the protocol would
    /// refuse (a text over the limit) fails at once with [`ClientError::Invalid`] and is dropped
    /// from the state file instead of being sent.
    pub async fn outcome(self) -> Result<Sent, ClientError> {
        self.outcome
            .await
            .unwrap_or_else(|_| Err(ClientError::ConnectionLost("client closed".into())))
    }
}

/// A connection to a quip server that reconnects by itself. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Client {
    shared: Arc<Shared>,
}

struct Shared {
    config: ClientConfig,
    endpoint: quinn::Endpoint,
    user: UserName,
    state: Mutex<State>,
    /// Bumped on every change of `State::link`, for requests waiting for a connection.
    link_changed: watch::Sender<u64>,
    persist: Option<Arc<Notify>>,
    connections: AtomicU64,
    ephemeral: broadcast::Sender<EphemeralEvent>,
    presence_versions: PresenceVersions,
    malformed_datagrams: Arc<AtomicU64>,
    /// When `Typing` was last sent, per conversation: repeats are sent every `TYPING_REFRESH_MS`.
    typing_sent: Mutex<HashMap<ConversationId, Instant>>,
    /// Wakes the task that reports delivery receipts.
    report: Arc<Notify>,
    status: watch::Sender<Status>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("user", &self.user)
            .field("server", &self.config.server)
            .finish_non_exhaustive()
    }
}

/// What a client starts with from its state file.
#[derive(Default)]
struct Restored {
    outbox: Outbox,
    own_ids: RecentIds,
    send_waiters: HashMap<u64, oneshot::Sender<Result<Sent, ClientError>>>,
    resumed: Vec<Resumed>,
}

impl Restored {
    /// Takes the saved outbox, leaving in `saved` only the entries that will be re-sent.
    fn from_state_file(saved: &mut SavedState) -> Restored {
        let mut restored = Restored::default();
        for entry in std::mem::take(&mut saved.outbox) {
            let (waiter, outcome) = oneshot::channel();
            // An entry no server would take (written by an older client) is answered here, so
            // it can neither wedge the outbox nor stay in the file for ever.
            match entry.request().validate() {
                Ok(()) => {
                    restored.own_ids.insert((entry.conv, entry.id));
                    let key = restored.outbox.push(entry.clone());
                    restored.send_waiters.insert(key, waiter);
                    saved.outbox.push(entry.clone());
                }
                Err(body) => {
                    let _ = waiter.send(Err(ClientError::Invalid(body)));
                }
            }
            restored.resumed.push(Resumed { entry, outcome });
        }
        restored
    }
}

impl Shared {
    fn new(
        config: ClientConfig,
        endpoint: quinn::Endpoint,
        user: UserName,
        epoch: Epoch,
        restored: Restored,
        persist: bool,
    ) -> Shared {
        let reconnect_max = config.reconnect_max;
        Shared {
            user,
            config,
            endpoint,
            state: Mutex::new(State {
                link: Link::Down(ClientError::ConnectionLost("connecting".into())),
                epoch,
                outbox: restored.outbox,
                send_waiters: restored.send_waiters,
                follows: HashMap::new(),
                own_ids: restored.own_ids,
                unreported: HashMap::new(),
                left: HashMap::new(),
                resumed: restored.resumed,
                held: BTreeSet::new(),
                held_follows: BTreeSet::new(),
                unavailable: Unavailable {
                    stall: Stall::default(),
                    backoff: Backoff::new(UNAVAILABLE_RETRY, reconnect_max),
                    round_scheduled: false,
                    last: None,
                },
            }),
            link_changed: watch::channel(0).0,
            persist: persist.then(|| Arc::new(Notify::new())),
            connections: AtomicU64::new(0),
            ephemeral: broadcast::channel(ephemeral::EPHEMERAL_BUFFER).0,
            presence_versions: PresenceVersions::default(),
            malformed_datagrams: Arc::new(AtomicU64::new(0)),
            typing_sent: Mutex::new(HashMap::new()),
            report: Arc::new(Notify::new()),
            status: watch::channel(Status::Reconnecting {
                error: ClientError::ConnectionLost("connecting".into()),
            })
            .0,
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Link::Up(session) = &lock(&self.state).link {
            session.conn.close(0u32.into(), b"client closed");
        }
    }
}

struct State {
    link: Link,
    epoch: Epoch,
    outbox: Outbox,
    send_waiters: HashMap<u64, oneshot::Sender<Result<Sent, ClientError>>>,
    follows: HashMap<ConversationId, Follow>,
    /// Client message ids this client used, newest last.
    own_ids: RecentIds,
    /// Per conversation, the furthest seq handed to the app and not yet reported delivered.
    unreported: HashMap<ConversationId, Seq>,
    /// Cursors of subscriptions the app dropped: still the last seq it was given, for the
    /// state file.
    left: HashMap<ConversationId, Position>,
    /// The state file's unacknowledged sends, until the app asks for them.
    resumed: Vec<Resumed>,
    /// Outbox entries a 5xx answer refused, waiting for the next retry round; the oldest is
    /// the round's probe. New sends queue behind them, so that a conversation keeps its order.
    held: BTreeSet<u64>,
    /// Subscriptions a 5xx answer refused, subscribed again in the next round.
    held_follows: BTreeSet<ConversationId>,
    unavailable: Unavailable,
}

/// A server that answers with 5xx errors: how long that has lasted and when to try again.
struct Unavailable {
    stall: Stall,
    backoff: Backoff,
    round_scheduled: bool,
    last: Option<ErrorBody>,
}

/// A bounded set of recently used client message ids.
#[derive(Default)]
struct RecentIds {
    set: HashSet<(ConversationId, ClientMessageId)>,
    order: VecDeque<(ConversationId, ClientMessageId)>,
}

impl RecentIds {
    fn insert(&mut self, id: (ConversationId, ClientMessageId)) {
        if self.set.insert(id) {
            self.order.push_back(id);
            if self.order.len() > OWN_IDS {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }

    fn contains(&self, id: &(ConversationId, ClientMessageId)) -> bool {
        self.set.contains(id)
    }
}

enum Link {
    Up(Arc<Session>),
    /// Reconnecting; the last error.
    Down(ClientError),
    /// Given up for good (e.g. the token was revoked) or closed by the app.
    Closed(ClientError),
}

/// One QUIC connection.
struct Session {
    conn: quinn::Connection,
    outgoing: Arc<Requests>,
}

/// A followed conversation.
struct Follow {
    /// The last seq received from the server (handed to the subscription's queue): where a
    /// resumed delivery starts.
    cursor: Cursor,
    /// The last seq the app took from the queue: what the state file keeps.
    taken: Taken,
    epoch: Epoch,
    start: StartAt,
    route: mpsc::Sender<Delivered>,
    /// The delivery stream currently feeding it, once its `Start` arrived.
    /// Identified by connection too: a new connection numbers its streams from the start again,
    /// and a stream of the old one may still hand over frames it had buffered.
    stream: Option<(usize, quinn::StreamId)>,
    /// The caller of `subscribe`, until the server first answers.
    ready: Option<oneshot::Sender<Result<Seq, ClientError>>>,
    /// The latest `Subscribe` sent for it (connection, request id): the only one whose
    /// delivery stream it takes (a revision-2 stream names its request in `Opened`).
    request: Option<(usize, RequestId)>,
}

struct Outgoing {
    id: RequestId,
    request: Request,
    reply: ReplyTo,
}

/// A connection's request queue. A request gets its id when it is queued, so that whoever
/// queues a `Subscribe` (under the state lock) can note which delivery stream will answer it.
struct Requests {
    queue: mpsc::UnboundedSender<Outgoing>,
    next_id: AtomicU64,
}

impl Session {
    /// Queues a `Subscribe`; the (connection, request id) its delivery stream will name.
    fn subscribe(&self, conv: ConversationId, start: StartAt) -> (usize, RequestId) {
        let id = self
            .outgoing
            .send(Request::Subscribe { conv, start }, ReplyTo::Subscribe(conv));
        (self.conn.stable_id(), id)
    }
}

impl Requests {
    fn new(queue: mpsc::UnboundedSender<Outgoing>) -> Self {
        Requests {
            queue,
            next_id: AtomicU64::new(0),
        }
    }

    /// Queues a request for the writer; the id it will carry.
    fn send(&self, request: Request, reply: ReplyTo) -> RequestId {
        let id = RequestId(self.next_id.fetch_add(1, Ordering::Relaxed) + 1);
        let _ = self.queue.send(Outgoing { id, request, reply });
        id
    }
}

/// Who gets a reply.
enum ReplyTo {
    Caller(oneshot::Sender<Result<Response, ClientError>>),
    /// An outbox entry, by its place in the send order.
    Send(u64),
    Subscribe(ConversationId),
    Nobody,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Client {
    /// Connects, verifies the server against the configured CA, and authenticates. The first
    /// connection must succeed; after that the client reconnects by itself.
    pub async fn connect(config: ClientConfig) -> Result<Client, ClientError> {
        let mut saved = match &config.state_file {
            Some(path) => Some(SavedState::open(path)?),
            None => None,
        };
        let mut restored = Restored::default();
        if let (Some(saved), Some(path)) = (&mut saved, &config.state_file) {
            restored = Restored::from_state_file(saved);
            // Written now, so that a file that cannot be written is an error at the start
            // rather than a warning nobody sees while sends pile up in it.
            saved
                .save(path)
                .map_err(|e| ClientError::Config(format!("state file {}: {e}", path.display())))?;
        }
        let endpoint = new_endpoint(&config).await?;
        let established = establish(&config, &endpoint).await?;
        let persist = saved.is_some();
        let shared = Arc::new(Shared::new(
            config,
            endpoint,
            established.user.clone(),
            established.epoch,
            restored,
            persist,
        ));
        if let Some(notify) = &shared.persist {
            tokio::spawn(persist_loop(Arc::downgrade(&shared), notify.clone(), saved));
        }
        if shared.config.report_delivered {
            tokio::spawn(report_loop(Arc::downgrade(&shared), shared.report.clone()));
        }
        let conn = start_session(&shared, established);
        tokio::spawn(supervise(Arc::downgrade(&shared), conn));
        Ok(Client { shared })
    }

    /// The authenticated user.
    pub fn user(&self) -> &UserName {
        &self.shared.user
    }

    /// The server store's epoch: cursors are valid within one epoch.
    pub fn epoch(&self) -> Epoch {
        lock(&self.shared.state).epoch
    }

    /// How many times the client has connected (1 until the first reconnect).
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// The cursor saved in the state file for `conv`, if any.
    pub fn saved_position(&self, conv: ConversationId) -> Option<Position> {
        let path = self.shared.config.state_file.as_ref()?;
        SavedState::load(path).ok()?.cursors.get(&conv).copied()
    }

    /// The sends an earlier run left in the state file, which this client re-sends first, each
    /// with its outcome. Handed out once: a second call returns nothing.
    pub fn resumed_sends(&self) -> Vec<Resumed> {
        std::mem::take(&mut lock(&self.shared.state).resumed)
    }

    /// Messages sent but not yet acknowledged, oldest first (for optimistic display).
    pub fn pending_sends(&self) -> Vec<OutboxEntry> {
        lock(&self.shared.state)
            .outbox
            .pending()
            .map(|(_, e)| e.clone())
            .collect()
    }

    /// Moves the connection to a new local UDP socket (as when the device changes network).
    /// QUIC migrates the connection: no new handshake, no stream is lost.
    pub fn rebind(&self) -> std::io::Result<std::net::SocketAddr> {
        let local = self.shared.endpoint.local_addr()?;
        let any: std::net::SocketAddr = if local.is_ipv6() {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let socket = std::net::UdpSocket::bind(any)?;
        self.shared.endpoint.rebind(socket)?;
        self.shared.endpoint.local_addr()
    }

    /// The QUIC connection's id, stable for its life: unchanged by migration, new after a
    /// reconnect.
    pub fn connection_id(&self) -> Option<usize> {
        match &lock(&self.shared.state).link {
            Link::Up(session) => Some(session.conn.stable_id()),
            _ => None,
        }
    }

    /// Queues a request on the current connection, waiting for one if the client is
    /// reconnecting. A request in flight when the connection drops fails with `ConnectionLost`.
    async fn request(&self, request: Request) -> Result<Response, ClientError> {
        request.validate().map_err(ClientError::Invalid)?;
        let (reply, answer) = oneshot::channel();
        let mut changes = self.shared.link_changed.subscribe();
        let deadline = tokio::time::Instant::now() + self.shared.config.connect_timeout;
        let mut outgoing = Some((request, ReplyTo::Caller(reply)));
        loop {
            {
                let state = lock(&self.shared.state);
                match &state.link {
                    Link::Up(session) => {
                        let (request, reply) = outgoing.take().expect("sent once");
                        session.outgoing.send(request, reply);
                        break;
                    }
                    Link::Closed(e) => return Err(e.clone()),
                    Link::Down(_) => {}
                }
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                let state = lock(&self.shared.state);
                if let Link::Down(e) | Link::Closed(e) = &state.link {
                    return Err(e.clone());
                }
            }
        }
        answer
            .await
            .unwrap_or_else(|_| Err(ClientError::ConnectionLost("connection closed".into())))
    }

    /// Creates a conversation with the caller and `members`; returns its id.
    pub async fn create_conversation(
        &self,
        title: &str,
        members: &[UserName],
    ) -> Result<ConversationId, ClientError> {
        let request = Request::CreateConversation {
            title: title.to_owned(),
            members: members.to_vec(),
        };
        match self.request(request).await? {
            Response::Created { conv, .. } => Ok(conv),
            other => Err(unexpected(other)),
        }
    }

    /// Sends a message with a fresh random id. See [`Client::send_with_id`].
    pub fn send(
        &self,
        conv: ConversationId,
        text: impl Into<String>,
    ) -> impl std::future::Future<Output = Result<Sent, ClientError>> + Send + 'static {
        self.send_with_id(conv, ClientMessageId(rand::random()), text)
    }

    /// Sends a message. It is queued when this is called, not when the future is first polled,
    /// so calls keep their order. It stays in the outbox until acknowledged and is re-sent with
    /// the same id after a reconnect; the future resolves with its seq once it is durable, or
    /// with the server's reason when the server refuses it for good.
    pub fn send_with_id(
        &self,
        conv: ConversationId,
        id: ClientMessageId,
        text: impl Into<String>,
    ) -> impl std::future::Future<Output = Result<Sent, ClientError>> + Send + 'static {
        // The server ends this user's typing indicator when the message is sequenced; the next
        // keystroke announces typing afresh.
        lock(&self.shared.typing_sent).remove(&conv);
        self.submit(OutboxEntry::message(conv, id, text))
    }

    /// Sends a message that replies to the message at `reply_to`. Like [`Client::send`]: kept
    /// in the outbox, in order with other sends, until acknowledged.
    pub fn reply(
        &self,
        conv: ConversationId,
        reply_to: Seq,
        text: impl Into<String>,
    ) -> impl std::future::Future<Output = Result<Sent, ClientError>> + Send + 'static {
        lock(&self.shared.typing_sent).remove(&conv);
        self.submit(OutboxEntry {
            conv,
            id: ClientMessageId(rand::random()),
            text: text.into(),
            action: Action::Reply { reply_to },
        })
    }

    /// Replaces the text of the user's own message at `target`.
    pub fn edit(
        &self,
        conv: ConversationId,
        target: Seq,
        text: impl Into<String>,
    ) -> impl std::future::Future<Output = Result<Sent, ClientError>> + Send + 'static {
        self.submit(OutboxEntry {
            conv,
            id: ClientMessageId(rand::random()),
            text: text.into(),
            action: Action::Edit { target },
        })
    }

    /// Deletes the message at `target` for everyone (the user's own, or any if the user created
    /// the conversation).
    pub fn delete(
        &self,
        conv: ConversationId,
        target: Seq,
    ) -> impl std::future::Future<Output = Result<Sent, ClientError>> + Send + 'static {
        self.submit(OutboxEntry {
            conv,
            id: ClientMessageId(rand::random()),
            text: String::new(),
            action: Action::Delete { target },
        })
    }

    /// Adds the user's reaction `emoji` to the message at `target`.
    pub fn react(
        &self,
        conv: ConversationId,
        target: Seq,
        emoji: impl Into<String>,
    ) -> impl std::future::Future<Output = Result<Sent, ClientError>> + Send + 'static {
        self.submit(OutboxEntry {
            conv,
            id: ClientMessageId(rand::random()),
            text: String::new(),
            action: Action::React {
                target,
                emoji: emoji.into(),
            },
        })
    }

    /// Takes back the user's reaction `emoji` to the message at `target`.
    pub fn unreact(
        &self,
        conv: ConversationId,
        target: Seq,
        emoji: impl Into<String>,
    ) -> impl std::future::Future<Output = Result<Sent, ClientError>> + Send + 'static {
        self.submit(OutboxEntry {
            conv,
            id: ClientMessageId(rand::random()),
            text: String::new(),
            action: Action::Unreact {
                target,
                emoji: emoji.into(),
            },
        })
    }

    /// Queues an action now, in call order with every other one, keeps it in the outbox (and
    /// the state file) until acknowledged, and re-sends it with the same id after a reconnect.
    /// An action the protocol does not allow (a text over `MAX_TEXT_LEN`, an empty one, a
    /// reaction that is not one emoji) fails at once with [`ClientError::Invalid`] and never
    /// enters the outbox.
    pub fn submit(
        &self,
        entry: OutboxEntry,
    ) -> impl std::future::Future<Output = Result<Sent, ClientError>> + Send + 'static {
        let (waiter, answer) = oneshot::channel();
        let request = entry.request();
        match request.validate() {
            Err(body) => {
                let _ = waiter.send(Err(ClientError::Invalid(body)));
            }
            Ok(()) => {
                let mut state = lock(&self.shared.state);
                if let Link::Closed(e) = &state.link {
                    let _ = waiter.send(Err(e.clone()));
                } else {
                    state.own_ids.insert((entry.conv, entry.id));
                    let key = state.outbox.push(entry);
                    state.send_waiters.insert(key, waiter);
                    if !state.held.is_empty() {
                        // Behind the sends waiting for a retry round, in order.
                        state.held.insert(key);
                    } else if let Link::Up(session) = &state.link {
                        let _ = session.outgoing.send(request, ReplyTo::Send(key));
                    }
                    drop(state);
                    self.shared.persist_soon();
                }
            }
        }
        async move {
            answer
                .await
                .unwrap_or_else(|_| Err(ClientError::ConnectionLost("client closed".into())))
        }
    }

    /// Up to `limit` events before `before` (or the newest ones), ascending, and the head.
    /// `limit` is 1 to `MAX_HISTORY_LIMIT`; another fails with `INVALID_REQUEST`, as the server
    /// would answer.
    pub async fn history(
        &self,
        conv: ConversationId,
        before: Option<Seq>,
        limit: u32,
    ) -> Result<(Vec<Event>, Seq), ClientError> {
        let request = Request::History {
            conv,
            before,
            limit,
        };
        match self.request(request).await? {
            Response::History { events, head, .. } => Ok((events, head)),
            Response::Pruned { oldest, head, .. } => Err(ClientError::Pruned { oldest, head }),
            other => Err(unexpected(other)),
        }
    }

    /// Follows a conversation from `start`: stored events first, then live ones, each seq once
    /// and in order, across reconnects. One subscription per conversation at a time.
    pub async fn subscribe(
        &self,
        conv: ConversationId,
        start: StartAt,
    ) -> Result<Subscription, ClientError> {
        let (route, events) = mpsc::channel(SUBSCRIPTION_BUFFER);
        let (ready, subscribed) = oneshot::channel();
        let taken;
        {
            let mut state = lock(&self.shared.state);
            if let Link::Closed(e) = &state.link {
                return Err(e.clone());
            }
            if state.follows.contains_key(&conv) {
                return Err(ClientError::Config(format!(
                    "already subscribed to conversation {conv}"
                )));
            }
            let (cursor, epoch) = match start {
                StartAt::Beginning => (
                    Cursor {
                        at: Some(Seq::ZERO),
                    },
                    state.epoch,
                ),
                StartAt::After(position) => (
                    Cursor {
                        at: Some(position.seq),
                    },
                    position.epoch,
                ),
                StartAt::Latest => (Cursor::default(), state.epoch),
            };
            taken = Arc::new(Mutex::new(cursor.at));
            state.follows.insert(
                conv,
                Follow {
                    cursor,
                    taken: taken.clone(),
                    epoch,
                    start,
                    route,
                    stream: None,
                    ready: Some(ready),
                    request: None,
                },
            );
            // Sent now if connected; otherwise the next connection subscribes every follow.
            if let Link::Up(session) = &state.link {
                let asked = session.subscribe(conv, start);
                if let Some(follow) = state.follows.get_mut(&conv) {
                    follow.request = Some(asked);
                }
            }
        }
        let answer = tokio::time::timeout(self.shared.config.connect_timeout, subscribed).await;
        let head = match answer {
            Ok(Ok(Ok(head))) => head,
            other => {
                lock(&self.shared.state).follows.remove(&conv);
                return Err(match other {
                    Ok(Ok(Err(e))) => e,
                    _ => ClientError::ConnectionLost("no answer to the subscription".into()),
                });
            }
        };
        let shared = Arc::downgrade(&self.shared);
        Ok(Subscription {
            conv,
            head,
            events,
            finished: false,
            receipts: Default::default(),
            taken,
            persist: self.shared.persist.clone(),
            on_drop: Some(Box::new(move || {
                let Some(shared) = shared.upgrade() else {
                    return;
                };
                let mut state = lock(&shared.state);
                if let Some(follow) = state.follows.remove(&conv) {
                    if let Some(seq) = *lock(&follow.taken) {
                        let epoch = follow.epoch;
                        state.left.insert(conv, Position { epoch, seq });
                    }
                }
                if let Link::Up(session) = &state.link {
                    let _ = session
                        .outgoing
                        .send(Request::Unsubscribe { conv }, ReplyTo::Nobody);
                }
            })),
        })
    }

    /// Adds a member (creator only); returns the seq of the membership event.
    pub async fn add_member(
        &self,
        conv: ConversationId,
        user: UserName,
    ) -> Result<Seq, ClientError> {
        match self.request(Request::AddMember { conv, user }).await? {
            Response::MembershipChanged { seq, .. } => Ok(seq),
            other => Err(unexpected(other)),
        }
    }

    /// Removes a member (the creator removes anyone, a member removes itself).
    pub async fn remove_member(
        &self,
        conv: ConversationId,
        user: UserName,
    ) -> Result<Seq, ClientError> {
        match self.request(Request::RemoveMember { conv, user }).await? {
            Response::MembershipChanged { seq, .. } => Ok(seq),
            other => Err(unexpected(other)),
        }
    }

    /// Moves the user's "read up to" cursor (and "delivered up to") in `conv` forward to `seq`;
    /// the user's other devices and the other members see it on their subscriptions. Returns the
    /// cursors after the change (a cursor never moves back).
    pub async fn mark_read(&self, conv: ConversationId, seq: Seq) -> Result<Receipt, ClientError> {
        match self.request(Request::MarkRead { conv, seq }).await? {
            Response::Receipt { receipt, .. } => Ok(receipt),
            other => Err(unexpected(other)),
        }
    }

    /// Moves the user's "delivered up to" cursor forward. The client does this by itself for
    /// what its subscriptions receive (unless `ClientConfig::report_delivered` is off).
    pub async fn mark_delivered(
        &self,
        conv: ConversationId,
        seq: Seq,
    ) -> Result<Receipt, ClientError> {
        match self.request(Request::MarkDelivered { conv, seq }).await? {
            Response::Receipt { receipt, .. } => Ok(receipt),
            other => Err(unexpected(other)),
        }
    }

    /// Every conversation of the user with its head, the user's cursors and unread count.
    pub async fn inbox(&self) -> Result<Vec<InboxEntry>, ClientError> {
        match self.request(Request::Inbox).await? {
            Response::Inbox { conversations } => Ok(conversations),
            other => Err(unexpected(other)),
        }
    }

    /// Like [`Client::history`], with the current state of every message of the page (latest
    /// text, tombstone, reactions) and the oldest seq still stored.
    pub async fn page(
        &self,
        conv: ConversationId,
        before: Option<Seq>,
        limit: u32,
    ) -> Result<Page, ClientError> {
        let request = Request::Page {
            conv,
            before,
            limit,
        };
        match self.request(request).await? {
            Response::Page {
                events,
                states,
                head,
                oldest,
                ..
            } => Ok(Page {
                events,
                states,
                head,
                oldest,
            }),
            other => Err(unexpected(other)),
        }
    }

    /// The caller's conversations.
    pub async fn conversations(&self) -> Result<Vec<ConversationSummary>, ClientError> {
        match self.request(Request::ListConversations).await? {
            Response::Conversations { conversations } => Ok(conversations),
            other => Err(unexpected(other)),
        }
    }

    /// Announces that the user is typing in `conv`. Call it on every keystroke: a DATAGRAM goes
    /// out at once the first time and then at most every `TYPING_REFRESH_MS` while calls keep
    /// coming, which is what keeps the indicator alive at the receivers. Returns whether a
    /// datagram was sent. Typing is best-effort: it may be lost, and the server drops it if the
    /// user is not a member.
    pub fn typing(&self, conv: ConversationId) -> Result<bool, ClientError> {
        let now = Instant::now();
        let refresh = Duration::from_millis(limits::TYPING_REFRESH_MS);
        {
            let mut sent = lock(&self.shared.typing_sent);
            if let Some(last) = sent.get(&conv) {
                if now.saturating_duration_since(*last) < refresh {
                    return Ok(false);
                }
            }
            sent.insert(conv, now);
        }
        self.send_datagram(&ClientDatagram::Typing { conv })?;
        Ok(true)
    }

    /// Announces that the user stopped typing in `conv` (cleared the input, left the view).
    /// Best-effort: if it is lost, receivers expire the indicator by its TTL.
    pub fn stop_typing(&self, conv: ConversationId) -> Result<(), ClientError> {
        lock(&self.shared.typing_sent).remove(&conv);
        self.send_datagram(&ClientDatagram::StoppedTyping { conv })
    }

    fn send_datagram(&self, datagram: &ClientDatagram) -> Result<(), ClientError> {
        let payload = encode_datagram(datagram)
            .map_err(|e| ClientError::Protocol(format!("encoding a datagram: {e}")))?;
        let conn = match &lock(&self.shared.state).link {
            Link::Up(session) => session.conn.clone(),
            Link::Down(e) | Link::Closed(e) => return Err(e.clone()),
        };
        match conn.max_datagram_size() {
            Some(max) if payload.len() <= max => {}
            Some(max) => {
                return Err(ClientError::Protocol(format!(
                    "datagram of {} bytes exceeds the connection's limit of {max}",
                    payload.len()
                )))
            }
            None => {
                return Err(ClientError::Protocol(
                    "the server does not accept datagrams".into(),
                ))
            }
        }
        conn.send_datagram(payload.into())
            .map_err(|e| ClientError::ConnectionLost(e.to_string()))
    }

    /// Typing and presence events from now on, across reconnects. Each call makes an
    /// independent listener.
    pub fn ephemeral_events(&self) -> EphemeralEvents {
        EphemeralEvents {
            events: self.shared.ephemeral.subscribe(),
        }
    }

    /// The presence of everyone who shares a conversation with the user, now, as one reliable
    /// answer on the control stream. Ask right after connecting (datagrams may have been lost
    /// before anyone listened), and every `PRESENCE_REFRESH_MS` while presence is shown.
    /// Entries are in name order; one whose `version` is lower than that of a presence event
    /// already applied is older than it.
    pub async fn presence(&self) -> Result<Vec<PresenceInfo>, ClientError> {
        match self.request(Request::Presence).await? {
            Response::Presence { users } => {
                for info in &users {
                    ephemeral::newer(&self.shared.presence_versions, info);
                }
                Ok(users)
            }
            other => Err(unexpected(other)),
        }
    }

    /// Marks this connection away (the app went to the background) or back. The user shows as
    /// away while all of its connected devices are away.
    pub async fn set_away(&self, away: bool) -> Result<(), ClientError> {
        match self.request(Request::SetAway { away }).await? {
            Response::AwaySet { .. } => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// How the link to the server is doing, now and on every change: connected, reconnecting,
    /// answered `UNAVAILABLE`, or closed.
    pub fn status(&self) -> watch::Receiver<Status> {
        self.shared.status.subscribe()
    }

    /// Datagrams from the server that could not be decoded and were dropped.
    pub fn malformed_datagrams(&self) -> u64 {
        self.shared.malformed_datagrams.load(Ordering::Relaxed)
    }

    /// Stops reconnecting, writes the state file, closes the connection and waits until the
    /// server has been told.
    pub async fn close(self) {
        let session = {
            let mut state = lock(&self.shared.state);
            let link = std::mem::replace(
                &mut state.link,
                Link::Closed(ClientError::ConnectionLost("client closed".into())),
            );
            match link {
                Link::Up(session) => Some(session),
                _ => None,
            }
        };
        self.shared.link_changed.send_modify(|n| *n += 1);
        self.shared.status.send_replace(Status::Closed {
            error: ClientError::ConnectionLost("client closed".into()),
        });
        if let Some(session) = session {
            session.conn.close(0u32.into(), b"bye");
        }
        if let Some(path) = &self.shared.config.state_file {
            // Cursors of conversations no longer followed (a dropped subscription) are kept as
            // the file has them, as the background writer does.
            let mut state = SavedState::load(path).unwrap_or_default();
            let now = self.shared.snapshot();
            state.cursors.extend(now.cursors);
            state.outbox = now.outbox;
            if let Err(e) = state.save(path) {
                tracing::warn!(error = %e, "could not write the state file");
            }
        }
        self.shared.endpoint.wait_idle().await;
    }
}

impl Shared {
    fn persist_soon(&self) {
        if let Some(notify) = &self.persist {
            notify.notify_one();
        }
    }

    fn snapshot(&self) -> SavedState {
        let state = lock(&self.state);
        let mut cursors = state.left.clone();
        cursors.extend(state.follows.iter().filter_map(|(conv, follow)| {
            let seq = (*lock(&follow.taken))?;
            Some((
                *conv,
                Position {
                    epoch: follow.epoch,
                    seq,
                },
            ))
        }));
        SavedState {
            cursors: cursors.into_iter().collect(),
            outbox: state.outbox.pending().map(|(_, e)| e.clone()).collect(),
        }
    }

    /// Settles an outbox entry with the server's answer.
    fn on_send_reply(self: &Arc<Self>, key: u64, result: Result<Response, ClientError>) {
        let mut state = lock(&self.state);
        let outcome = match result {
            Ok(Response::Sent {
                conv,
                seq,
                at_ms,
                duplicate,
            }) => {
                state.held.remove(&key);
                let Some(entry) = state.outbox.remove(key) else {
                    return;
                };
                self.recovered(&mut state);
                Ok(Sent {
                    conv,
                    seq,
                    id: entry.id,
                    at_ms,
                    duplicate,
                })
            }
            Ok(other) => {
                state.held.remove(&key);
                state.outbox.remove(key);
                self.recovered(&mut state);
                Err(unexpected(other))
            }
            Err(e) if is_permanent(&e) => {
                state.held.remove(&key);
                state.outbox.remove(key);
                // An answer about the request: the server serves.
                if matches!(e, ClientError::Server(_)) {
                    self.recovered(&mut state);
                }
                Err(e)
            }
            Err(ClientError::Server(body)) if body.code != ErrorCode::RATE_LIMITED => {
                // The server cannot serve now (5xx): held for the next retry round, with every
                // other send it refuses meanwhile.
                state.held.insert(key);
                let round = self.hold(&mut state, &body);
                drop(state);
                if let Some(delay) = round {
                    schedule_round(Arc::downgrade(self), delay);
                }
                return;
            }
            Err(e) => {
                // Rate-limited: try again on this connection after the wait the server named
                // (a reconnect re-sends it anyway).
                let delay = match &e {
                    ClientError::Server(body) => body.retry_after_ms.unwrap_or(500),
                    _ => 500,
                };
                if let (Some(entry), Link::Up(session)) = (state.outbox.get(key), &state.link) {
                    let outgoing = session.outgoing.clone();
                    let request = entry.request();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(u64::from(delay))).await;
                        let _ = outgoing.send(request, ReplyTo::Send(key));
                    });
                }
                return;
            }
        };
        if let Some(waiter) = state.send_waiters.remove(&key) {
            let _ = waiter.send(outcome);
        }
        // Whatever is still held (the probe was answered otherwise) needs a round.
        let round = if state.held.is_empty() || state.unavailable.round_scheduled {
            None
        } else {
            state.unavailable.round_scheduled = true;
            Some(UNAVAILABLE_RETRY)
        };
        drop(state);
        if let Some(delay) = round {
            schedule_round(Arc::downgrade(self), delay);
        }
        self.persist_soon();
    }

    /// Notes a 5xx answer: the stall clock starts (if it was not running) and the status says
    /// so. Returns the wait before the next retry round, unless one is already scheduled.
    fn hold(&self, state: &mut State, error: &ErrorBody) -> Option<Duration> {
        let now = Instant::now();
        let unavailable = &mut state.unavailable;
        unavailable.stall.begin(now);
        unavailable.last = Some(error.clone());
        if matches!(state.link, Link::Up(_)) {
            self.status.send_if_modified(|status| {
                let changed = !matches!(status, Status::Unavailable { .. });
                if changed {
                    tracing::info!(error = %error, "the server is unavailable; retrying with backoff");
                    *status = Status::Unavailable {
                        error: error.clone(),
                    };
                }
                changed
            });
        }
        if unavailable.round_scheduled {
            return None;
        }
        unavailable.round_scheduled = true;
        let asked = error
            .retry_after_ms
            .map(|ms| Duration::from_millis(u64::from(ms)));
        let mut delay = unavailable
            .backoff
            .next_delay(asked, rand::random_range(0.5..=1.0));
        if let Some(left) = unavailable.stall.left(now, self.config.give_up_after) {
            delay = delay.min(left);
        }
        Some(delay)
    }

    /// The server served a request again: everything held goes out now, in order.
    fn recovered(&self, state: &mut State) {
        if !state.unavailable.stall.end() {
            return;
        }
        state.unavailable.backoff.reset();
        state.unavailable.last = None;
        let Link::Up(session) = &state.link else {
            return;
        };
        let session = session.clone();
        self.status.send_replace(Status::Connected);
        tracing::info!("the server serves again");
        for key in std::mem::take(&mut state.held) {
            if let Some(entry) = state.outbox.get(key) {
                session.outgoing.send(entry.request(), ReplyTo::Send(key));
            }
        }
        for conv in std::mem::take(&mut state.held_follows) {
            if let Some(follow) = state.follows.get_mut(&conv) {
                resume_follow(conv, follow, &session);
            }
        }
    }

    /// A retry round: after too long without progress the client gives up; otherwise the
    /// oldest held send goes out as a probe (the others follow once the server takes one) and
    /// held subscriptions are made again.
    fn retry_round(self: &Arc<Self>) {
        let mut state = lock(&self.state);
        state.unavailable.round_scheduled = false;
        if state.held.is_empty() && state.held_follows.is_empty() {
            return;
        }
        let left = state
            .unavailable
            .stall
            .left(Instant::now(), self.config.give_up_after);
        if left == Some(Duration::ZERO) {
            let last = state.unavailable.last.clone().map_or_else(
                || ClientError::ConnectionLost("no progress".into()),
                ClientError::Server,
            );
            drop(state);
            self.give_up(ClientError::GaveUp {
                waited: self.config.give_up_after.unwrap_or_default(),
                last: Box::new(last),
            });
            return;
        }
        // While reconnecting, the next connection re-sends and resubscribes everything.
        let Link::Up(session) = &state.link else {
            return;
        };
        let session = session.clone();
        if let Some(&probe) = state.held.first() {
            if let Some(entry) = state.outbox.get(probe) {
                session.outgoing.send(entry.request(), ReplyTo::Send(probe));
            }
        }
        for conv in std::mem::take(&mut state.held_follows) {
            if let Some(follow) = state.follows.get_mut(&conv) {
                resume_follow(conv, follow, &session);
            }
        }
    }

    /// A subscription request was answered.
    fn on_subscribe_reply(
        self: &Arc<Self>,
        conv: ConversationId,
        result: Result<Response, ClientError>,
    ) {
        let mut state = lock(&self.state);
        let epoch = state.epoch;
        let Some(follow) = state.follows.get_mut(&conv) else {
            return;
        };
        let ended = match result {
            Ok(Response::Subscribed { head, .. }) => {
                follow.epoch = epoch;
                if follow.cursor.at.is_none() {
                    follow.cursor.at = Some(head);
                    lock(&follow.taken).get_or_insert(head);
                }
                if let Some(ready) = follow.ready.take() {
                    let _ = ready.send(Ok(head));
                }
                self.recovered(&mut state);
                return;
            }
            Ok(Response::CursorReset { epoch, head, .. }) => {
                ClientError::CursorReset { epoch, head }
            }
            Ok(Response::Pruned { oldest, head, .. }) => ClientError::Pruned { oldest, head },
            Ok(other) => unexpected(other),
            Err(e) if is_permanent(&e) => e,
            // The first answer goes to the caller of `subscribe`, who decides.
            Err(e) if follow.ready.is_some() => e,
            Err(ClientError::Server(body)) if body.code != ErrorCode::RATE_LIMITED => {
                // A resumed subscription the server cannot serve now: again in the next round.
                state.held_follows.insert(conv);
                let round = self.hold(&mut state, &body);
                drop(state);
                if let Some(delay) = round {
                    schedule_round(Arc::downgrade(self), delay);
                }
                return;
            }
            // The connection is going: the next one subscribes again.
            Err(_) => return,
        };
        if let Some(mut follow) = state.follows.remove(&conv) {
            match follow.ready.take() {
                Some(ready) => {
                    let _ = ready.send(Err(ended));
                }
                None => {
                    let _ = follow.route.try_send(Delivered::Lost(ended));
                }
            }
        }
    }
}

/// What a successful handshake yields.
struct Established {
    conn: quinn::Connection,
    send: quinn::SendStream,
    reader: FrameReader,
    user: UserName,
    epoch: Epoch,
}

async fn new_endpoint(config: &ClientConfig) -> Result<quinn::Endpoint, ClientError> {
    let addr = resolve(config).await?;
    let bind: std::net::SocketAddr = if addr.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let mut endpoint = quinn::Endpoint::client(bind).map_err(|e| ClientError::Connect {
        server: config.server.clone(),
        reason: e.to_string(),
    })?;
    endpoint.set_default_client_config(config.quic_config()?);
    Ok(endpoint)
}

async fn resolve(config: &ClientConfig) -> Result<std::net::SocketAddr, ClientError> {
    let connect_error = |reason: String| ClientError::Connect {
        server: config.server.clone(),
        reason,
    };
    tokio::net::lookup_host(&config.server)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidInput => {
                connect_error(format!("{e}: expected HOST:PORT, such as 127.0.0.1:4433"))
            }
            _ => connect_error(e.to_string()),
        })?
        .next()
        .ok_or_else(|| connect_error("the name has no address".into()))
}

/// Connects and authenticates once.
async fn establish(
    config: &ClientConfig,
    endpoint: &quinn::Endpoint,
) -> Result<Established, ClientError> {
    let connect_error = |reason: String| ClientError::Connect {
        server: config.server.clone(),
        reason,
    };
    // No server takes a longer token (and a Hello has at most MAX_HELLO_LEN bytes): say so
    // here rather than in a refusal about frame sizes.
    if config.token.len() > limits::MAX_TOKEN_LEN {
        return Err(ClientError::Config(format!(
            "the token is {} bytes long; a quip token has at most {}",
            config.token.len(),
            limits::MAX_TOKEN_LEN
        )));
    }
    let addr = resolve(config).await?;
    let connecting = endpoint
        .connect(addr, config.host())
        .map_err(|e| connect_error(e.to_string()))?;
    let handshake = async {
        let conn = connecting.await.map_err(|e| connection_error(&e))?;
        let (mut send, recv) = conn.open_bi().await.map_err(|e| connection_error(&e))?;
        let hello = ClientFrame::Hello {
            token: config.token.clone(),
            client: config.client_name.clone(),
            revision: quip_protocol::REVISION,
        };
        let bytes = encode_frame(&hello, limits::MAX_HELLO_LEN)
            .map_err(|e| ClientError::Config(format!("Hello too long: {e}")))?;
        send.write_all(&bytes)
            .await
            .map_err(|e| ClientError::ConnectionLost(e.to_string()))?;
        let mut reader = FrameReader::new(recv);
        let welcome = match reader.next::<ServerFrame>().await {
            Ok(Some(frame)) => frame,
            // A refused Hello closes the connection with the error code: report that.
            Ok(None) | Err(_) => return Err(connection_error(&conn.closed().await)),
        };
        match welcome {
            ServerFrame::Welcome { user, epoch, .. } => Ok(Established {
                conn,
                send,
                reader,
                user,
                epoch,
            }),
            ServerFrame::Closing { error } => Err(ClientError::Server(error)),
            other => Err(ClientError::Protocol(format!(
                "expected Welcome, got {other:?}"
            ))),
        }
    };
    tokio::time::timeout(config.connect_timeout, handshake)
        .await
        .map_err(|_| connect_error("timed out".into()))?
        .map_err(|e| match e {
            ClientError::ConnectionLost(reason) => connect_error(reason),
            other => other,
        })
}

/// Starts the tasks of a fresh connection, then resumes: every followed conversation from its
/// cursor, then every unacknowledged send in order. Returns the connection to watch.
fn start_session(shared: &Arc<Shared>, established: Established) -> quinn::Connection {
    let Established {
        conn,
        send,
        reader,
        epoch,
        ..
    } = established;
    shared.connections.fetch_add(1, Ordering::Relaxed);
    let pending = Arc::new(Mutex::new(Pending::default()));
    let (queue, requests) = mpsc::unbounded_channel();
    let session = Arc::new(Session {
        conn: conn.clone(),
        outgoing: Arc::new(Requests::new(queue)),
    });
    tokio::spawn(write_requests(
        send,
        requests,
        pending.clone(),
        Arc::downgrade(shared),
    ));
    tokio::spawn(read_replies(reader, pending, Arc::downgrade(shared)));
    tokio::spawn(accept_deliveries(conn.clone(), Arc::downgrade(shared)));
    // Presence versions count within one daemon run; a new connection may reach a new run.
    lock(&shared.presence_versions).clear();
    tokio::spawn(ephemeral::read_datagrams(
        conn.clone(),
        shared.ephemeral.clone(),
        shared.presence_versions.clone(),
        shared.malformed_datagrams.clone(),
    ));
    {
        let mut state = lock(&shared.state);
        state.epoch = epoch;
        for (conv, follow) in state.follows.iter_mut() {
            resume_follow(*conv, follow, &session);
        }
        // Everything goes out again now, held or not, in order.
        state.held.clear();
        state.held_follows.clear();
        for (key, entry) in state.outbox.pending() {
            session.outgoing.send(entry.request(), ReplyTo::Send(key));
        }
        let status = match &state.unavailable.last {
            Some(error) if state.unavailable.stall.is_stalled() => Status::Unavailable {
                error: error.clone(),
            },
            _ => Status::Connected,
        };
        state.link = Link::Up(session);
        shared.status.send_replace(status);
    }
    shared.link_changed.send_modify(|n| *n += 1);
    conn
}

/// Subscribes a followed conversation again on `session`: after its cursor, or from where it
/// first asked if it holds none yet.
fn resume_follow(conv: ConversationId, follow: &mut Follow, session: &Session) {
    follow.stream = None;
    let start = match follow.cursor.at {
        Some(seq) => StartAt::After(Position {
            epoch: follow.epoch,
            seq,
        }),
        None => follow.start,
    };
    follow.request = Some(session.subscribe(conv, start));
}

/// Runs a retry round after `delay`.
fn schedule_round(shared: Weak<Shared>, delay: Duration) {
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        if let Some(shared) = shared.upgrade() {
            shared.retry_round();
        }
    });
}

/// Keeps the client connected until it is closed or dropped.
async fn supervise(shared: Weak<Shared>, mut conn: quinn::Connection) {
    loop {
        let reason = connection_error(&conn.closed().await);
        let Some(strong) = shared.upgrade() else {
            return;
        };
        // A 2xx close (the credential was revoked, SPEC 8.12) will not get better by
        // reconnecting.
        if gives_up(&reason) {
            strong.give_up(reason);
            return;
        }
        let config = strong.config.clone();
        let endpoint = strong.endpoint.clone();
        {
            let mut state = lock(&strong.state);
            if matches!(state.link, Link::Closed(_)) {
                return;
            }
            state.link = Link::Down(reason.clone());
        }
        strong.link_changed.send_modify(|n| *n += 1);
        strong.status.send_replace(Status::Reconnecting {
            error: reason.clone(),
        });
        drop(strong);
        tracing::info!(reason = %reason, "connection lost; reconnecting");

        let mut delay = config.reconnect_initial;
        let mut stall = Stall::default();
        stall.begin(Instant::now());
        let mut last = reason;
        let established = loop {
            let mut wait = delay.mul_f64(rand::random::<f64>());
            let left = stall.left(Instant::now(), config.give_up_after);
            if let Some(left) = left {
                if left.is_zero() {
                    if let Some(strong) = shared.upgrade() {
                        strong.give_up(ClientError::GaveUp {
                            waited: config.give_up_after.unwrap_or_default(),
                            last: Box::new(last),
                        });
                    }
                    return;
                }
                wait = wait.min(left);
            }
            tokio::time::sleep(wait).await;
            if shared
                .upgrade()
                .is_none_or(|s| matches!(lock(&s.state).link, Link::Closed(_)))
            {
                return;
            }
            // An attempt never runs past the point of giving up.
            let attempt = match stall.left(Instant::now(), config.give_up_after) {
                Some(left) => tokio::time::timeout(left, establish(&config, &endpoint))
                    .await
                    .unwrap_or_else(|_| {
                        Err(ClientError::Connect {
                            server: config.server.clone(),
                            reason: "timed out".into(),
                        })
                    }),
                None => establish(&config, &endpoint).await,
            };
            match attempt {
                Ok(established) => break established,
                Err(e) if gives_up(&e) => {
                    if let Some(strong) = shared.upgrade() {
                        strong.give_up(e);
                    }
                    return;
                }
                Err(e) => {
                    tracing::debug!(error = %e, ?delay, "reconnect failed");
                    if let Some(strong) = shared.upgrade() {
                        let mut state = lock(&strong.state);
                        if let Link::Down(error) = &mut state.link {
                            *error = e.clone();
                        }
                        drop(state);
                        strong
                            .status
                            .send_replace(Status::Reconnecting { error: e.clone() });
                    }
                    last = e;
                    delay = (delay * 2).min(config.reconnect_max);
                }
            }
        };
        let Some(strong) = shared.upgrade() else {
            return;
        };
        conn = start_session(&strong, established);
    }
}

/// Errors after which reconnecting cannot help.
fn gives_up(e: &ClientError) -> bool {
    match e {
        ClientError::Server(body) => (200..300).contains(&body.code.0),
        ClientError::Config(_) => true,
        _ => false,
    }
}

impl Shared {
    /// Fails everything waiting: the client will not reconnect. Unacknowledged sends stay in
    /// the outbox (and the state file).
    fn give_up(&self, reason: ClientError) {
        tracing::warn!(reason = %reason, "giving up");
        let mut state = lock(&self.state);
        if let Link::Up(session) = &state.link {
            session.conn.close(0u32.into(), b"gave up");
        }
        state.link = Link::Closed(reason.clone());
        for (_, waiter) in state.send_waiters.drain() {
            let _ = waiter.send(Err(reason.clone()));
        }
        for (_, mut follow) in state.follows.drain() {
            match follow.ready.take() {
                Some(ready) => {
                    let _ = ready.send(Err(reason.clone()));
                }
                None => {
                    let _ = follow.route.try_send(Delivered::Lost(reason.clone()));
                }
            }
        }
        drop(state);
        self.link_changed.send_modify(|n| *n += 1);
        self.status.send_replace(Status::Closed { error: reason });
    }
}

fn unexpected(response: Response) -> ClientError {
    ClientError::Protocol(format!("unexpected reply {response:?}"))
}

fn connection_error(e: &quinn::ConnectionError) -> ClientError {
    match e {
        quinn::ConnectionError::ApplicationClosed(close) => {
            let code = u16::try_from(close.error_code.into_inner()).unwrap_or(u16::MAX);
            ClientError::Server(quip_protocol::ErrorBody::new(
                ErrorCode(code),
                String::from_utf8_lossy(&close.reason).into_owned(),
            ))
        }
        other => ClientError::ConnectionLost(other.to_string()),
    }
}

/// Replies expected on one connection.
#[derive(Default)]
struct Pending {
    replies: HashMap<RequestId, ReplyTo>,
}

/// Writes requests in the order they were queued, batching what is queued together into one
/// stream write.
async fn write_requests(
    mut send: quinn::SendStream,
    mut requests: mpsc::UnboundedReceiver<Outgoing>,
    pending: Arc<Mutex<Pending>>,
    shared: Weak<Shared>,
) {
    let mut buf = Vec::new();
    while let Some(first) = requests.recv().await {
        let mut next = Some(first);
        while let Some(Outgoing { id, request, reply }) = next.take() {
            lock(&pending).replies.insert(id, reply);
            match encode_frame(&ClientFrame::Request { id, request }, limits::MAX_FRAME_LEN) {
                Ok(bytes) => buf.extend_from_slice(&bytes),
                Err(e) => {
                    let reply = lock(&pending).replies.remove(&id);
                    let error = ClientError::Invalid(ErrorBody::new(
                        ErrorCode::FRAME_TOO_LARGE,
                        format!("the request does not fit in one frame: {e}"),
                    ));
                    answer_unsent(reply, error, &shared);
                }
            }
            if buf.len() < 64 * 1024 {
                next = requests.try_recv().ok();
            }
        }
        if !buf.is_empty() && send.write_all(&buf).await.is_err() {
            return;
        }
        buf.clear();
    }
    let _ = send.finish();
}

/// Answers a request that could not be sent, whatever waits for its reply: a caller, an outbox
/// entry (which then leaves the outbox) or a subscription.
fn answer_unsent(reply: Option<ReplyTo>, error: ClientError, shared: &Weak<Shared>) {
    match reply {
        Some(ReplyTo::Caller(reply)) => {
            let _ = reply.send(Err(error));
        }
        Some(ReplyTo::Send(key)) => {
            if let Some(shared) = shared.upgrade() {
                shared.on_send_reply(key, Err(error));
            }
        }
        Some(ReplyTo::Subscribe(conv)) => {
            if let Some(shared) = shared.upgrade() {
                shared.on_subscribe_reply(conv, Err(error));
            }
        }
        Some(ReplyTo::Nobody) | None => {
            tracing::debug!(error = %error, "dropped a request that cannot be sent");
        }
    }
}

/// Matches replies to requests. When the connection ends, callers waiting for a reply fail;
/// sends and subscriptions are resumed by the next connection.
async fn read_replies(mut reader: FrameReader, pending: Arc<Mutex<Pending>>, shared: Weak<Shared>) {
    let mut closing = None;
    let reason = loop {
        let frame = match reader.next::<ServerFrame>().await {
            Ok(Some(frame)) => frame,
            Ok(None) => break ClientError::ConnectionLost("server closed the session".into()),
            Err(e) => break e,
        };
        let (id, result) = match frame {
            ServerFrame::Reply { id, response } => (id, Ok(response)),
            ServerFrame::Error { id, error } => (id, Err(ClientError::Server(error))),
            ServerFrame::Closing { error } => {
                closing = Some(ClientError::Server(error));
                continue;
            }
            ServerFrame::Welcome { .. } => {
                break ClientError::Protocol("Welcome sent twice".into())
            }
        };
        let reply = lock(&pending).replies.remove(&id);
        match reply {
            Some(ReplyTo::Caller(reply)) => {
                let _ = reply.send(result);
            }
            Some(ReplyTo::Send(key)) => {
                if let Some(shared) = shared.upgrade() {
                    shared.on_send_reply(key, result);
                }
            }
            Some(ReplyTo::Subscribe(conv)) => {
                if let Some(shared) = shared.upgrade() {
                    shared.on_subscribe_reply(conv, result);
                }
            }
            Some(ReplyTo::Nobody) | None => {}
        }
    };
    let reason = closing.unwrap_or(reason);
    let replies: Vec<ReplyTo> = lock(&pending).replies.drain().map(|(_, r)| r).collect();
    for reply in replies {
        if let ReplyTo::Caller(reply) = reply {
            let _ = reply.send(Err(ClientError::ConnectionLost(reason.to_string())));
        }
    }
}

/// Accepts the server's delivery streams and feeds each to its conversation's subscription.
async fn accept_deliveries(conn: quinn::Connection, shared: Weak<Shared>) {
    while let Ok(stream) = conn.accept_uni().await {
        let id = (conn.stable_id(), stream.id());
        tokio::spawn(read_delivery(FrameReader::new(stream), id, shared.clone()));
    }
}

async fn read_delivery(
    mut reader: FrameReader,
    stream: (usize, quinn::StreamId),
    shared: Weak<Shared>,
) {
    // A revision-2 stream names the request it answers; a revision-1 stream only its
    // conversation, so it goes to the follow that has no stream yet.
    let (conv, answers) = match reader.next::<DeliveryFrame>().await {
        Ok(Some(DeliveryFrame::Opened { conv, request, .. })) => (conv, Some((stream.0, request))),
        Ok(Some(DeliveryFrame::Start { conv, .. })) => (conv, None),
        _ => return,
    };
    {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let mut state = lock(&shared.state);
        match state.follows.get_mut(&conv) {
            Some(follow)
                if follow.stream.is_none()
                    && answers.is_none_or(|answers| follow.request == Some(answers)) =>
            {
                follow.stream = Some(stream)
            }
            // Not followed (any more), or the stream of an earlier subscription: ignore it.
            _ => return,
        }
    }
    loop {
        let frame = reader.next::<DeliveryFrame>().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        // A place in the subscription's queue first, then the decision (which moves the cursor)
        // and the enqueue together under the lock: two streams of one conversation (a lost
        // connection's and its replacement's) then never hand the app events out of order.
        let route = {
            let state = lock(&shared.state);
            match state
                .follows
                .get(&conv)
                .filter(|f| f.stream == Some(stream))
            {
                Some(follow) => follow.route.clone(),
                None => return,
            }
        };
        let Ok(place) = route.reserve_owned().await else {
            return;
        };
        let last = {
            let mut guard = lock(&shared.state);
            let state = &mut *guard;
            let Some(follow) = state
                .follows
                .get_mut(&conv)
                .filter(|f| f.stream == Some(stream))
            else {
                return;
            };
            let (delivered, last) = match frame {
                Ok(Some(DeliveryFrame::Event(event))) => match follow.cursor.admit(event.seq) {
                    Admit::Deliver => {
                        let origin = if event.sender != shared.user {
                            Origin::Someone
                        } else if event
                            .body
                            .client_id()
                            .is_some_and(|id| state.own_ids.contains(&(conv, id)))
                        {
                            Origin::ThisDevice
                        } else {
                            Origin::OtherDevice
                        };
                        if shared.config.report_delivered && event.sender != shared.user {
                            state.unreported.insert(conv, event.seq);
                            shared.report.notify_one();
                        }
                        (Delivered::Event(event, origin), false)
                    }
                    Admit::Duplicate => continue,
                    Admit::Gap { expected } => (
                        Delivered::Lost(ClientError::Protocol(format!(
                            "delivery skipped from seq {expected} to {}",
                            event.seq
                        ))),
                        true,
                    ),
                },
                Ok(Some(DeliveryFrame::End { error })) => (Delivered::End(error), true),
                Ok(Some(DeliveryFrame::Receipt(receipt))) => (Delivered::Receipt(receipt), false),
                Ok(Some(DeliveryFrame::Start { .. } | DeliveryFrame::Opened { .. })) => (
                    Delivered::Lost(ClientError::Protocol("Start sent twice".into())),
                    true,
                ),
                // The server finished the stream without saying why (its delivery task stopped):
                // follow the conversation again from the cursor, on this connection if it is up.
                Ok(None) => {
                    follow.stream = None;
                    if let (Link::Up(session), Some(_)) = (&state.link, follow.cursor.at) {
                        resume_follow(conv, follow, session);
                    }
                    return;
                }
                // The connection broke: the next connection resumes this conversation.
                Err(_) => return,
            };
            place.send(delivered);
            if last {
                state.follows.remove(&conv);
            }
            last
        };
        shared.persist_soon();
        if last {
            return;
        }
    }
}

/// Reports what subscriptions received as delivered, coalescing bursts into one request per
/// conversation. Best-effort: a report lost with a connection is made good by the next one.
async fn report_loop(shared: Weak<Shared>, notify: Arc<Notify>) {
    loop {
        notify.notified().await;
        tokio::time::sleep(REPORT_DELAY).await;
        let Some(strong) = shared.upgrade() else {
            return;
        };
        let mut state = lock(&strong.state);
        let Link::Up(session) = &state.link else {
            continue;
        };
        let outgoing = session.outgoing.clone();
        for (conv, seq) in state.unreported.drain() {
            let _ = outgoing.send(Request::MarkDelivered { conv, seq }, ReplyTo::Nobody);
        }
    }
}

/// Writes the state file shortly after changes, coalescing bursts.
async fn persist_loop(shared: Weak<Shared>, notify: Arc<Notify>, saved: Option<SavedState>) {
    // Cursors of conversations not followed in this run are kept as they were.
    let mut known = saved.unwrap_or_default();
    loop {
        notify.notified().await;
        tokio::time::sleep(PERSIST_DELAY).await;
        let Some(strong) = shared.upgrade() else {
            return;
        };
        let Some(path) = strong.config.state_file.clone() else {
            return;
        };
        let now = strong.snapshot();
        drop(strong);
        known.cursors.extend(now.cursors);
        known.outbox = now.outbox;
        let state = known.clone();
        let written = tokio::task::spawn_blocking(move || state.save(&path)).await;
        if let Ok(Err(e)) = written {
            tracing::warn!(error = %e, "could not write the state file");
        }
    }
}

/// Reads frames of one stream.
struct FrameReader {
    stream: quinn::RecvStream,
    decoder: FrameDecoder,
}

impl FrameReader {
    fn new(stream: quinn::RecvStream) -> Self {
        FrameReader {
            stream,
            decoder: FrameDecoder::new(limits::MAX_FRAME_LEN),
        }
    }

    async fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, ClientError> {
        loop {
            if let Some(frame) = self
                .decoder
                .next_frame()
                .map_err(|e| ClientError::Protocol(e.to_string()))?
            {
                return Ok(Some(frame));
            }
            match self.stream.read_chunk(64 * 1024, true).await {
                Ok(Some(chunk)) => self.decoder.push(&chunk.bytes),
                Ok(None) => {
                    self.decoder
                        .finish()
                        .map_err(|e| ClientError::Protocol(e.to_string()))?;
                    return Ok(None);
                }
                Err(quinn::ReadError::ConnectionLost(e)) => return Err(connection_error(&e)),
                Err(e) => return Err(ClientError::ConnectionLost(e.to_string())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A client's shared state with no connection.
    fn offline(restored: Restored) -> Arc<Shared> {
        let config = ClientConfig::new("127.0.0.1:9", vec![], "quip_x");
        let endpoint = quinn::Endpoint::client((std::net::Ipv4Addr::LOCALHOST, 0).into()).unwrap();
        let user = "alice".parse().unwrap();
        Arc::new(Shared::new(
            config,
            endpoint,
            user,
            Epoch([1; 16]),
            restored,
            false,
        ))
    }

    fn too_large() -> ClientError {
        ClientError::Invalid(ErrorBody::new(ErrorCode::FRAME_TOO_LARGE, "too large"))
    }

    #[tokio::test]
    async fn a_request_that_cannot_be_sent_is_answered_whatever_waits_for_it() {
        let shared = offline(Restored::default());
        let weak = Arc::downgrade(&shared);
        let conv = ConversationId(7);

        let (waiter, sent) = oneshot::channel();
        let key = {
            let mut state = lock(&shared.state);
            let entry = OutboxEntry::message(conv, ClientMessageId([1; 16]), "hi");
            let key = state.outbox.push(entry);
            state.send_waiters.insert(key, waiter);
            key
        };
        answer_unsent(Some(ReplyTo::Send(key)), too_large(), &weak);
        let outcome = sent.await.unwrap();
        assert_eq!(
            outcome.unwrap_err().code(),
            Some(ErrorCode::FRAME_TOO_LARGE)
        );
        assert_eq!(
            lock(&shared.state).outbox.pending().count(),
            0,
            "it left the outbox"
        );

        let (route, _events) = mpsc::channel(1);
        let (ready, subscribed) = oneshot::channel();
        lock(&shared.state).follows.insert(
            conv,
            Follow {
                cursor: Cursor::default(),
                taken: Taken::default(),
                epoch: Epoch([1; 16]),
                start: StartAt::Latest,
                route,
                stream: None,
                ready: Some(ready),
                request: None,
            },
        );
        answer_unsent(Some(ReplyTo::Subscribe(conv)), too_large(), &weak);
        let answer = subscribed.await.unwrap();
        assert_eq!(answer.unwrap_err().code(), Some(ErrorCode::FRAME_TOO_LARGE));
        assert!(lock(&shared.state).follows.is_empty(), "the follow is gone");

        let (reply, answered) = oneshot::channel();
        answer_unsent(Some(ReplyTo::Caller(reply)), too_large(), &weak);
        assert!(answered.await.unwrap().is_err());
    }

    #[tokio::test]
    async fn a_saved_send_no_server_would_take_is_answered_and_leaves_the_state_file() {
        let conv = ConversationId(7);
        let mut saved = SavedState::default();
        let big = "q".repeat(limits::MAX_TEXT_LEN + 1);
        saved
            .outbox
            .push(OutboxEntry::message(conv, ClientMessageId([1; 16]), big));
        saved
            .outbox
            .push(OutboxEntry::message(conv, ClientMessageId([2; 16]), "fine"));
        let restored = Restored::from_state_file(&mut saved);
        assert_eq!(saved.outbox.len(), 1, "only the valid entry is kept");
        assert_eq!(saved.outbox[0].text, "fine");
        let shared = offline(restored);
        let client = Client { shared };
        assert_eq!(client.pending_sends().len(), 1);
        let mut resumed = client.resumed_sends().into_iter();
        let refused = resumed.next().unwrap();
        assert_eq!(refused.entry.id, ClientMessageId([1; 16]));
        let outcome = refused.outcome().await;
        assert_eq!(
            outcome.unwrap_err().code(),
            Some(ErrorCode::MESSAGE_TOO_LARGE)
        );
        assert_eq!(resumed.next().unwrap().entry.text, "fine");
        assert!(client.resumed_sends().is_empty(), "handed out once");
    }

    #[tokio::test]
    async fn a_send_over_the_limit_fails_at_once_and_never_enters_the_outbox() {
        let client = Client {
            shared: offline(Restored::default()),
        };
        let conv = ConversationId(7);
        let outcome = client
            .send(conv, "q".repeat(limits::MAX_TEXT_LEN + 1))
            .await;
        assert_eq!(
            outcome.unwrap_err().code(),
            Some(ErrorCode::MESSAGE_TOO_LARGE)
        );
        let outcome = client.react(conv, Seq(1), "not one emoji").await;
        assert_eq!(
            outcome.unwrap_err().code(),
            Some(ErrorCode::INVALID_REQUEST)
        );
        assert!(client.pending_sends().is_empty());
        let page = client.page(conv, None, 0).await;
        assert_eq!(page.unwrap_err().code(), Some(ErrorCode::INVALID_REQUEST));
    }
}
