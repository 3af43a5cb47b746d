//! One client connection: authentication, then requests on the control stream, one delivery
//! stream per subscribed conversation, and typing DATAGRAMs (rate-limited, then handed to the
//! conversation's actor, which checks membership and relays them).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use quip_protocol::{
    decode_datagram, encode_frame, limits, ClientDatagram, ConversationId, ConversationSummary,
    ErrorBody, ErrorCode, Event, EventBody, InboxEntry, MessageState, Reaction, Receipt, Request,
    RequestId, Response, Seq, ServerFrame, StartAt, UserName,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;

use crate::connected::{Admission, ConnectedLimits};
use crate::control::{ControlStream, Step};
use crate::conversation::{answer, store_error, ConversationHandle, ConversationLimits, View};
use crate::delivery::Delivery;
use crate::presence::{self, DeviceId, EphemeralLimits, EphemeralStats};
use crate::rate_limit::{Gate, SendGate, TokenBucket};
use crate::server::{Pending, Shared};
use crate::store::{ReceiptRecord, Store, StoreError};
use crate::wire::push_frame;

/// Requests of one connection awaiting their answer; past this the session stops reading.
const MAX_PENDING_REQUESTS: usize = 1024;
/// Frames queued for the control stream's writer.
const OUTGOING_QUEUE: usize = 256;
/// Bytes of large frames queued for the control stream's writer. Counting frames alone let a
/// client that stops reading hold 256 history pages of up to a frame each (a quarter of a GiB)
/// in the server; past this budget the session stops taking answers out of its requests.
const OUTGOING_BYTES: usize = 2 * 1024 * 1024;
/// Frames up to this size (acks, errors: nearly all) are bounded by the queue's length alone,
/// at most `OUTGOING_QUEUE` times this; larger ones also take their size from the budget.
const SMALL_FRAME: usize = 16 * 1024;
/// How long the last frames of a closing session may take to reach the client.
const FINISH_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest chunk read from the control stream at once.
const READ_CHUNK: usize = 64 * 1024;

type Reply = Pin<Box<dyn Future<Output = ServerFrame> + Send>>;

/// Serves one incoming connection until it closes or the server shuts down. `pending` holds
/// the connection's place among those not yet authenticated (what decides QUIC Retry).
pub fn serve(
    shared: Arc<Shared>,
    incoming: quinn::Incoming,
    pending: Pending,
    shutdown: watch::Receiver<bool>,
) -> impl Future<Output = ()> + Send {
    let remote = incoming.remote_address();
    let connection = crate::metrics::connection();
    // The handshake and the Hello are boxed: their futures (and the incoming packet) are large
    // and live only until the session starts, and unboxed they would stay part of the task
    // every idle connection keeps for its whole life.
    let starting = Box::pin(start(shared.clone(), incoming, pending, remote));
    async move {
        let _connection = connection;
        if let Some(started) = starting.await {
            run_session(shared, started, remote, shutdown).await;
        }
    }
}

/// A connection that completed its handshake and `Hello`.
struct Started {
    conn: quinn::Connection,
    user: UserName,
    admission: Admission,
    control: Control,
    /// The session's protocol revision.
    revision: u16,
}

/// The handshake, then `Hello` and `Welcome`; `None` if the connection did not get that far.
async fn start(
    shared: Arc<Shared>,
    incoming: quinn::Incoming,
    pending: Pending,
    remote: std::net::SocketAddr,
) -> Option<Started> {
    let connecting = match incoming.accept() {
        Ok(connecting) => connecting,
        Err(e) => {
            tracing::debug!(%remote, error = %e, "refused connection");
            return None;
        }
    };
    let conn = match tokio::time::timeout(shared.limits.handshake_timeout, connecting).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            tracing::debug!(%remote, error = %e, "handshake failed");
            return None;
        }
        Err(_) => {
            tracing::debug!(%remote, "handshake timed out");
            return None;
        }
    };
    let authenticated = authenticate(&shared, &conn).await;
    drop(pending);
    match authenticated {
        Ok((user, admission, control, revision)) => Some(Started {
            conn,
            user,
            admission,
            control,
            revision,
        }),
        Err(error) => {
            tracing::warn!(%remote, code = %error.code, "authentication failed: {}", error.message);
            close(&conn, &error);
            None
        }
    }
}

/// An authenticated session, until it ends.
async fn run_session(
    shared: Arc<Shared>,
    started: Started,
    remote: std::net::SocketAddr,
    shutdown: watch::Receiver<bool>,
) {
    let Started {
        conn,
        user,
        admission,
        control,
        revision,
    } = started;
    let _session = crate::metrics::GaugeGuard::new(crate::metrics::SESSIONS);
    let span = tracing::info_span!("session", user = %user, %remote);
    let _entered = span.enter();
    tracing::info!("connected");
    drop(_entered);
    let presence = shared.presence.clone();
    let device = presence.connect(user.clone(), conn.clone()).await;
    let ephemeral = &shared.limits.ephemeral;
    let datagrams = TokenBucket::new(
        ephemeral.datagrams_in_per_sec,
        ephemeral.datagrams_in_burst,
        Instant::now(),
    );
    let session = Session {
        shared,
        conn: conn.clone(),
        user,
        revision,
        device,
        datagrams,
        admission,
        gate: SendGate::default(),
        subscriptions: HashMap::new(),
        deliveries: JoinSet::new(),
        handles: HashMap::new(),
    };
    let outcome =
        tracing::Instrument::instrument(session.run(control, shutdown), span.clone()).await;
    presence.disconnect(device).await;
    let _entered = span.enter();
    match outcome {
        Ok(()) => tracing::info!("disconnected"),
        Err(error) => {
            tracing::warn!(code = %error.code, "closing: {}", error.message);
            close(&conn, &error);
        }
    }
}

/// Closes the connection with an error's code as the QUIC application error code.
fn close(conn: &quinn::Connection, error: &ErrorBody) {
    crate::metrics::connection_error(error.code);
    let reason = truncate(&error.message, 256);
    conn.close(
        quinn::VarInt::from(u32::from(error.code.0)),
        reason.as_bytes(),
    );
}

/// At most `max` bytes of `text`, cut at a character boundary.
fn truncate(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The leaf certificate the client presented in the TLS handshake, if any (DER).
fn peer_certificate(conn: &quinn::Connection) -> Option<Vec<u8>> {
    let identity = conn.peer_identity()?;
    let chain = identity
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    chain.first().map(|leaf| leaf.to_vec())
}

/// Accepts the control stream, checks `Hello`, identifies the device (by its token, or by its
/// client certificate when the token is empty), admits it and answers `Welcome`.
async fn authenticate(
    shared: &Shared,
    conn: &quinn::Connection,
) -> Result<(UserName, Admission, Control, u16), ErrorBody> {
    let first = async {
        let (send, recv) = conn.accept_bi().await.map_err(|e| {
            ErrorBody::new(
                ErrorCode::PROTOCOL_VIOLATION,
                format!("no control stream: {e}"),
            )
        })?;
        let mut reader = ControlReader::new(
            recv,
            shared.limits.max_frame_len,
            shared.limits.max_message_len,
        );
        let step = reader
            .next()
            .await
            .map_err(|e| ErrorBody::new(ErrorCode::PROTOCOL_VIOLATION, format!("stream: {e}")))?;
        Ok::<_, ErrorBody>((send, reader, step))
    };
    let (send, reader, step) = tokio::time::timeout(shared.limits.auth_timeout, first)
        .await
        .map_err(|_| {
            ErrorBody::new(ErrorCode::AUTH_TIMEOUT, "no Hello within the time allowed")
        })??;
    let (token, client, revision) = match step {
        Step::Hello {
            token,
            client,
            revision,
        } => (token, client, revision),
        Step::Close(error) => return Err(error),
        _ => {
            return Err(ErrorBody::new(
                ErrorCode::PROTOCOL_VIOLATION,
                "the first frame must be Hello",
            ))
        }
    };
    // What this server sends a session is filtered by its revision: newer events become
    // `Unsupported` (`delivery::for_revision`), newer frames and answers are not sent at all.
    let revision = revision.min(quip_protocol::REVISION);
    let found = if token.is_empty() {
        match peer_certificate(conn) {
            Some(der) => shared.accounts.authenticate_certificate(&der),
            None => Ok(None),
        }
    } else {
        shared.accounts.authenticate(&token)
    };
    let (user, credential) = found.map_err(store_error)?.ok_or_else(|| {
        let why = if token.is_empty() {
            "no token, and no registered client certificate"
        } else {
            "invalid token"
        };
        ErrorBody::new(ErrorCode::UNAUTHENTICATED, why)
    })?;
    let closing = conn.clone();
    let admission = shared.connected.admit(
        credential,
        &user,
        Box::new(move |error| close(&closing, error)),
        Instant::now(),
    )?;
    let control = Control::start(send, reader, shared.limits.max_frame_len);
    let welcome = ServerFrame::Welcome {
        user: user.clone(),
        epoch: shared.store.epoch(),
        server: concat!("quipd/", env!("CARGO_PKG_VERSION")).into(),
        revision,
    };
    control.send(welcome).await;
    tracing::debug!(%user, client = %truncate(&client, limits::MAX_CLIENT_NAME_LEN), revision, "hello");
    Ok((user, admission, control, revision))
}

/// The control stream's receive side: QUIC reads pushed into the sans-IO [`ControlStream`].
struct ControlReader {
    stream: quinn::RecvStream,
    core: ControlStream,
    done: bool,
}

impl ControlReader {
    fn new(stream: quinn::RecvStream, max_frame_len: u32, max_message_len: usize) -> Self {
        ControlReader {
            stream,
            core: ControlStream::new(max_frame_len, max_message_len),
            done: false,
        }
    }

    /// The next step of the stream. Cancel-safe: bytes read are kept in the core, so a
    /// `select!` may drop this future. After `End` or `Close` it never resolves again.
    async fn next(&mut self) -> Result<Step, quinn::ReadError> {
        loop {
            if let Some(step) = self.core.poll_step() {
                self.done = matches!(step, Step::End | Step::Close(_));
                return Ok(step);
            }
            if self.done {
                return std::future::pending().await;
            }
            match self.stream.read_chunk(READ_CHUNK, true).await? {
                Some(chunk) => self.core.push(&chunk.bytes),
                None => self.core.finish(),
            }
        }
    }
}

/// A frame on its way to the control stream; a large one holds its share of the byte budget
/// until the writer has encoded it.
type Outgoing = (ServerFrame, Option<tokio::sync::OwnedSemaphorePermit>);

/// The control stream: a reader, and a writer task that batches queued frames into few writes.
struct Control {
    reader: ControlReader,
    outgoing: mpsc::Sender<Outgoing>,
    /// [`OUTGOING_BYTES`] of permits, one per queued byte of a large frame.
    budget: Arc<tokio::sync::Semaphore>,
    writer: tokio::task::JoinHandle<()>,
}

impl Control {
    fn start(mut send: quinn::SendStream, reader: ControlReader, max_frame_len: u32) -> Self {
        let (outgoing, mut queue) = mpsc::channel::<Outgoing>(OUTGOING_QUEUE);
        let writer = tokio::spawn(async move {
            let mut buf = Vec::new();
            // A frame's budget is released once it is encoded into `buf`: from there quinn's
            // send window bounds what waits for the client.
            while let Some((frame, _budget)) = queue.recv().await {
                push_server_frame(&mut buf, frame, max_frame_len);
                while buf.len() < 64 * 1024 {
                    match queue.try_recv() {
                        Ok((frame, _budget)) => push_server_frame(&mut buf, frame, max_frame_len),
                        Err(_) => break,
                    }
                }
                if send.write_all(&buf).await.is_err() {
                    return;
                }
                buf.clear();
            }
            // Finished: wait (bounded) until the client has every byte, so that closing the
            // connection afterwards cannot discard the last replies or the Closing frame.
            if send.finish().is_ok() {
                let _ = tokio::time::timeout(FINISH_TIMEOUT, send.stopped()).await;
            }
        });
        Control {
            reader,
            outgoing,
            budget: Arc::new(tokio::sync::Semaphore::new(OUTGOING_BYTES)),
            writer,
        }
    }

    /// Writes what is queued, ends the stream and waits until the client has received it.
    async fn finish(self) {
        drop(self.outgoing);
        let _ = self.writer.await;
    }

    async fn send(&self, frame: ServerFrame) {
        if let ServerFrame::Error { error, .. } = &frame {
            crate::metrics::request_error(error.code);
        }
        let size = postcard::experimental::serialized_size(&frame).unwrap_or(OUTGOING_BYTES);
        let budget = if size <= SMALL_FRAME {
            None
        } else {
            // A frame larger than the whole budget waits until nothing else is queued.
            let share = size.min(OUTGOING_BYTES) as u32;
            match self.budget.clone().acquire_many_owned(share).await {
                Ok(permit) => Some(permit),
                Err(_) => return,
            }
        };
        // Fails only when the writer stopped because the stream is gone; the session ends too.
        let _ = self.outgoing.send((frame, budget)).await;
    }
}

struct Session {
    shared: Arc<Shared>,
    conn: quinn::Connection,
    user: UserName,
    /// The protocol revision of the session, agreed in Hello and Welcome.
    revision: u16,
    /// This connection, as the presence actor knows it.
    device: DeviceId,
    /// The incoming datagram rate limit.
    datagrams: TokenBucket,
    /// This connection's place among the device's connections, and the device's send bucket.
    admission: Admission,
    /// Sends refused by the rate limit, held in order.
    gate: SendGate,
    /// Per subscribed conversation, the signal that stops its delivery task.
    subscriptions: HashMap<ConversationId, oneshot::Sender<()>>,
    deliveries: JoinSet<()>,
    /// Conversation actors this session has used.
    handles: HashMap<ConversationId, ConversationHandle>,
}

impl Session {
    async fn run(
        mut self,
        mut control: Control,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), ErrorBody> {
        let mut replies: FuturesUnordered<Reply> = FuturesUnordered::new();
        let mut datagrams_open = true;
        // False once the client finished its side of the control stream: no more requests, but
        // the answers it is owed are still written.
        let mut reading = true;
        let result = loop {
            if !reading && replies.is_empty() {
                break Ok(());
            }
            tokio::select! {
                // Priorities: shutdown, then answers (they free memory), then new requests, then
                // datagrams: typing is perishable and must never hold up a message.
                biased;
                _ = stopped(&mut shutdown) => {
                    // Requests already handed to a sequencer get their answer (ack or error)
                    // before the goodbye; nothing more is read. The server bounds the wait.
                    while let Some(reply) = replies.next().await {
                        control.send(reply).await;
                    }
                    break Err(ErrorBody::new(ErrorCode::GOING_AWAY, "server shutting down"));
                }
                Some(reply) = replies.next(), if !replies.is_empty() => control.send(reply).await,
                _ = self.deliveries.join_next(), if !self.deliveries.is_empty() => {}
                step = control.reader.next(), if reading && replies.len() < MAX_PENDING_REQUESTS => {
                    match step {
                        Ok(Step::Request { id, request }) => {
                            if request.revision() > self.revision {
                                break Err(ErrorBody::new(
                                    ErrorCode::PROTOCOL_VIOLATION,
                                    format!(
                                        "a request of revision {} in a revision {} session",
                                        request.revision(),
                                        self.revision
                                    ),
                                ));
                            }
                            match self.dispatch(id, request).await {
                                Ok(reply) => replies.push(reply),
                                Err(error) => break Err(error),
                            }
                        }
                        Ok(Step::Refused { id, error }) => {
                            replies.push(ready(ServerFrame::Error { id, error }));
                        }
                        Ok(Step::End) => reading = false,
                        Ok(Step::Close(error)) => break Err(error),
                        Ok(Step::Hello { .. }) => break Err(ErrorBody::new(
                            ErrorCode::PROTOCOL_VIOLATION,
                            "Hello sent twice",
                        )),
                        // The client reset its stream, or the connection is gone.
                        Err(_) => break Ok(()),
                    }
                }
                datagram = self.conn.read_datagram(), if datagrams_open => match datagram {
                    Ok(datagram) => self.on_datagram(&datagram),
                    // The connection is closing; the control stream reports why.
                    Err(_) => datagrams_open = false,
                },
            }
        };
        if let Err(error) = &result {
            control
                .send(ServerFrame::Closing {
                    error: error.clone(),
                })
                .await;
        }
        // Answers still owed are dropped with the connection; the client retries them.
        self.deliveries.shutdown().await;
        control.finish().await;
        result
    }

    /// Starts a validated request. Everything that must happen in request order (queueing a
    /// send at its conversation) happens before this returns; the returned future only awaits
    /// the answer. An error here closes the connection.
    async fn dispatch(&mut self, id: RequestId, request: Request) -> Result<Reply, ErrorBody> {
        if let Some(refused) = self.rate_limit(&request)? {
            return Ok(ready(ServerFrame::Error { id, error: refused }));
        }
        Ok(self.start(id, request).await)
    }

    /// Applies the device's send rate (`limits.sends_per_sec`) to requests that append an
    /// event: `Some(RATE_LIMITED)` refuses the request; a send is refused in order (see
    /// [`SendGate`]).
    fn rate_limit(&mut self, request: &Request) -> Result<Option<ErrorBody>, ErrorBody> {
        let now = Instant::now();
        let mut bucket = self
            .admission
            .sends
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let wait = match request {
            // Every user action that carries a client id keeps its place in the sender's order.
            Request::Send { conv, id, .. }
            | Request::SendReply { conv, id, .. }
            | Request::Edit { conv, id, .. }
            | Request::Delete { conv, id, .. }
            | Request::React { conv, id, .. }
            | Request::Unreact { conv, id, .. } => {
                match self.gate.admit(*conv, *id, &mut bucket, now) {
                    Gate::Pass => return Ok(None),
                    Gate::Refuse(wait) => wait,
                    Gate::Overflow => return Err(ErrorBody::new(
                        ErrorCode::RATE_LIMITED,
                        "too many sends refused by the rate limit; reconnect and send them again",
                    )),
                }
            }
            Request::CreateConversation { .. }
            | Request::AddMember { .. }
            | Request::RemoveMember { .. } => {
                if bucket.try_take(now) {
                    return Ok(None);
                }
                bucket.wait()
            }
            _ => return Ok(None),
        };
        let retry_after_ms = u32::try_from(wait.as_millis().max(1)).unwrap_or(u32::MAX);
        Ok(Some(ErrorBody {
            code: ErrorCode::RATE_LIMITED,
            message: "this device sends faster than the server allows".into(),
            retry_after_ms: Some(retry_after_ms),
        }))
    }

    async fn start(&mut self, id: RequestId, request: Request) -> Reply {
        let user = self.user.clone();
        match request {
            Request::CreateConversation { title, members } => {
                let shared = self.shared.clone();
                reply(id, async move {
                    let (conv, seq) = shared.conversations.create(user, title, members).await?;
                    Ok(Response::Created { conv, seq })
                })
            }
            Request::Send {
                conv,
                id: msg_id,
                text,
            } => {
                let handle = match self.handle(conv) {
                    Ok(handle) => handle,
                    Err(error) => return ready(ServerFrame::Error { id, error }),
                };
                let started = std::time::Instant::now();
                let pending = handle.send(user, msg_id, text).await;
                reply(id, async move {
                    let sent = answer(pending).await?;
                    crate::metrics::send_acked(started.elapsed());
                    Ok(Response::Sent {
                        conv,
                        seq: sent.seq,
                        at_ms: sent.at_ms,
                        duplicate: sent.duplicate,
                    })
                })
            }
            Request::AddMember { conv, user: added } => {
                let handle = match self.handle(conv) {
                    Ok(handle) => handle,
                    Err(error) => return ready(ServerFrame::Error { id, error }),
                };
                let pending = handle.add_member(user, added).await;
                reply(id, async move {
                    let seq = answer(pending).await?;
                    Ok(Response::MembershipChanged { conv, seq })
                })
            }
            Request::RemoveMember {
                conv,
                user: removed,
            } => {
                let handle = match self.handle(conv) {
                    Ok(handle) => handle,
                    Err(error) => return ready(ServerFrame::Error { id, error }),
                };
                let pending = handle.remove_member(user, removed).await;
                reply(id, async move {
                    let seq = answer(pending).await?;
                    Ok(Response::MembershipChanged { conv, seq })
                })
            }
            Request::History {
                conv,
                before,
                limit,
            } => {
                let handle = self.handle(conv);
                let store = self.shared.store.clone();
                let max_frame_len = self.shared.limits.max_frame_len;
                let revision = self.revision;
                reply(id, async move {
                    let view = handle?.view(user).await?;
                    // Only durable events are shown: cap the page at the durable head.
                    let before = before.unwrap_or(Seq(u64::MAX)).min(view.head.next());
                    if view.oldest > Seq(1) && before <= view.oldest {
                        return pruned(conv, &view, revision);
                    }
                    let events = store
                        .events_before(conv, before, limit as usize)
                        .map_err(store_error)?;
                    let events = newest_that_fit(events, max_frame_len)?
                        .into_iter()
                        .map(|e| e.for_revision(revision))
                        .collect();
                    Ok(Response::History {
                        conv,
                        events,
                        head: view.head,
                    })
                })
            }
            Request::Page {
                conv,
                before,
                limit,
            } => {
                let handle = self.handle(conv);
                let store = self.shared.store.clone();
                let max_frame_len = self.shared.limits.max_frame_len;
                reply(id, async move {
                    let view = handle?.view(user).await?;
                    let before = before.unwrap_or(Seq(u64::MAX)).min(view.head.next());
                    let events = if before <= view.oldest {
                        Vec::new()
                    } else {
                        store
                            .events_before(conv, before, limit as usize)
                            .map_err(store_error)?
                    };
                    let states = message_states(&store, conv, &events).map_err(store_error)?;
                    let (events, states) = page_that_fits(events, states, max_frame_len)?;
                    Ok(Response::Page {
                        conv,
                        events,
                        states,
                        head: view.head,
                        oldest: view.oldest,
                    })
                })
            }
            Request::Edit {
                conv,
                id: msg_id,
                target,
                text,
            } => {
                let body = EventBody::Edited {
                    id: msg_id,
                    target,
                    text,
                };
                self.act(id, conv, body).await
            }
            Request::Delete {
                conv,
                id: msg_id,
                target,
            } => {
                let body = EventBody::Deleted { id: msg_id, target };
                self.act(id, conv, body).await
            }
            Request::React {
                conv,
                id: msg_id,
                target,
                emoji,
            } => {
                let body = EventBody::ReactionAdded {
                    id: msg_id,
                    target,
                    emoji,
                };
                self.act(id, conv, body).await
            }
            Request::Unreact {
                conv,
                id: msg_id,
                target,
                emoji,
            } => {
                let body = EventBody::ReactionRemoved {
                    id: msg_id,
                    target,
                    emoji,
                };
                self.act(id, conv, body).await
            }
            Request::SendReply {
                conv,
                id: msg_id,
                text,
                reply_to,
            } => {
                let body = EventBody::Reply {
                    id: msg_id,
                    text,
                    reply_to,
                };
                self.act(id, conv, body).await
            }
            Request::MarkRead { conv, seq } => self.receipt(id, conv, Seq::ZERO, seq).await,
            Request::MarkDelivered { conv, seq } => self.receipt(id, conv, seq, Seq::ZERO).await,
            Request::Inbox => {
                let shared = self.shared.clone();
                reply(id, async move {
                    let mut conversations = Vec::new();
                    for (view, conv) in views(&shared, &user).await? {
                        conversations.push(InboxEntry {
                            delivered: view.receipt.delivered,
                            read: view.receipt.read,
                            unread: view.head.0.saturating_sub(view.receipt.read.0),
                            summary: summary(conv, view),
                        });
                    }
                    Ok(Response::Inbox { conversations })
                })
            }
            // Boxed: rare, and its future would otherwise widen every session's task.
            Request::Subscribe { conv, start } => Box::pin(self.subscribe(id, conv, start)).await,
            Request::Unsubscribe { conv } => {
                if let Some(stop) = self.subscriptions.remove(&conv) {
                    let _ = stop.send(());
                }
                ready(ServerFrame::Reply {
                    id,
                    response: Response::Unsubscribed { conv },
                })
            }
            Request::ListConversations => {
                let shared = self.shared.clone();
                reply(id, async move {
                    let conversations = views(&shared, &user)
                        .await?
                        .into_iter()
                        .map(|(view, conv)| summary(conv, view))
                        .collect();
                    Ok(Response::Conversations { conversations })
                })
            }
            Request::Presence => {
                let shared = self.shared.clone();
                reply(id, async move {
                    let contacts = presence::contacts(&shared.store, &user).map_err(store_error)?;
                    let users = shared.presence.snapshot(contacts).await;
                    Ok(Response::Presence { users })
                })
            }
            Request::SetAway { away } => {
                let presence = self.shared.presence.clone();
                let device = self.device;
                reply(id, async move {
                    presence.set_away(device, away).await;
                    Ok(Response::AwaySet { away })
                })
            }
        }
    }

    /// One datagram: dropped and counted if over the rate limit, malformed, or not a member's;
    /// never an error that closes the connection (see `quip_protocol::ClientDatagram`).
    fn on_datagram(&mut self, payload: &[u8]) {
        let stats = self.shared.presence.stats().clone();
        EphemeralStats::count(&stats.received);
        if !self.datagrams.try_take(Instant::now()) {
            return EphemeralStats::count(&stats.rate_limited_in);
        }
        let (conv, typing) = match decode_datagram::<ClientDatagram>(payload) {
            Ok(ClientDatagram::Typing { conv }) => (conv, true),
            Ok(ClientDatagram::StoppedTyping { conv }) => (conv, false),
            Err(e) => {
                tracing::debug!(error = %e, "dropping a malformed datagram");
                return EphemeralStats::count(&stats.malformed);
            }
        };
        match self.handle(conv) {
            Ok(handle) => handle.typing(self.user.clone(), typing),
            Err(_) => EphemeralStats::count(&stats.not_member),
        }
    }

    /// A user's action (a reply, an edit, a delete, a reaction): queued at its conversation in
    /// request order, like a send, and answered with `Sent` once durable.
    async fn act(&mut self, id: RequestId, conv: ConversationId, body: EventBody) -> Reply {
        let handle = match self.handle(conv) {
            Ok(handle) => handle,
            Err(error) => return ready(ServerFrame::Error { id, error }),
        };
        let started = std::time::Instant::now();
        let pending = handle.act(self.user.clone(), body).await;
        reply(id, async move {
            let sent = answer(pending).await?;
            crate::metrics::send_acked(started.elapsed());
            Ok(Response::Sent {
                conv,
                seq: sent.seq,
                at_ms: sent.at_ms,
                duplicate: sent.duplicate,
            })
        })
    }

    /// Moves the caller's receipt cursors forward.
    async fn receipt(
        &mut self,
        id: RequestId,
        conv: ConversationId,
        delivered: Seq,
        read: Seq,
    ) -> Reply {
        let handle = match self.handle(conv) {
            Ok(handle) => handle,
            Err(error) => return ready(ServerFrame::Error { id, error }),
        };
        let user = self.user.clone();
        let pending = handle.receipt(user.clone(), delivered, read).await;
        reply(id, async move {
            let ReceiptRecord { delivered, read } = answer(pending).await?;
            Ok(Response::Receipt {
                conv,
                receipt: Receipt {
                    user,
                    delivered,
                    read,
                },
            })
        })
    }

    async fn subscribe(&mut self, id: RequestId, conv: ConversationId, start: StartAt) -> Reply {
        let subscribed = async {
            let subscription = self.handle(conv)?.subscribe(self.user.clone()).await?;
            let epoch = self.shared.store.epoch();
            let head = subscription.head;
            let after = match start {
                StartAt::Beginning => Seq::ZERO,
                StartAt::Latest => head,
                StartAt::After(position) if position.epoch == epoch && position.seq <= head => {
                    position.seq
                }
                StartAt::After(_) => return Ok(Response::CursorReset { conv, epoch, head }),
            };
            let oldest = subscription.oldest;
            if after.next() < oldest {
                return pruned_subscription(conv, oldest, head, self.revision);
            }
            if let Some(previous) = self.subscriptions.remove(&conv) {
                let _ = previous.send(());
            }
            let (stop, stopped) = oneshot::channel();
            self.subscriptions.insert(conv, stop);
            let delivery = Delivery {
                conv,
                user: self.user.clone(),
                epoch,
                store: self.shared.store.clone(),
                subscription,
                after,
                max_frame_len: self.shared.limits.max_frame_len,
                revision: self.revision,
                request: id,
            };
            self.deliveries
                .spawn(delivery.run(self.conn.clone(), stopped));
            Ok(Response::Subscribed { conv, head })
        };
        let frame = match subscribed.await {
            Ok(response) => ServerFrame::Reply { id, response },
            Err(error) => ServerFrame::Error { id, error },
        };
        ready(frame)
    }

    fn handle(&mut self, conv: ConversationId) -> Result<ConversationHandle, ErrorBody> {
        if let Some(handle) = self.handles.get(&conv) {
            return Ok(handle.clone());
        }
        let handle = self
            .shared
            .conversations
            .get(conv)
            .map_err(store_error)?
            .ok_or_else(ErrorBody::not_found)?;
        self.handles.insert(conv, handle.clone());
        Ok(handle)
    }
}

/// Encodes a control-stream frame into `buf`. An answer too large for one frame (a listing of
/// very many conversations) becomes an error answer, so the request is never left unanswered.
fn push_server_frame(buf: &mut Vec<u8>, frame: ServerFrame, max_frame_len: u32) {
    match encode_frame(&frame, max_frame_len) {
        Ok(bytes) => buf.extend_from_slice(&bytes),
        Err(e) => {
            let ServerFrame::Reply { id, .. } = frame else {
                tracing::error!(error = %e, "dropping a control frame that cannot be encoded");
                return;
            };
            tracing::warn!(error = %e, "answer too large for one frame");
            let error = ErrorBody::new(
                ErrorCode::LIMIT_EXCEEDED,
                format!("the answer does not fit in one frame ({e})"),
            );
            push_frame(buf, &ServerFrame::Error { id, error }, max_frame_len);
        }
    }
}

/// The newest events of a history page that fit in one frame: a page of large messages comes
/// back shorter than asked, and the client pages on from its first seq.
fn newest_that_fit(mut events: Vec<Event>, max_frame_len: u32) -> Result<Vec<Event>, ErrorBody> {
    // What the reply needs besides the events: frame variant, request id, conv, head, count.
    const REPLY_OVERHEAD: usize = 64;
    let budget = (max_frame_len as usize).saturating_sub(REPLY_OVERHEAD);
    let mut used = 0;
    let mut keep = 0;
    for event in events.iter().rev() {
        used += postcard::experimental::serialized_size(event).unwrap_or(usize::MAX / 2);
        if used > budget {
            break;
        }
        keep += 1;
    }
    if keep == 0 && !events.is_empty() {
        return Err(newest_does_not_fit());
    }
    events.drain(..events.len() - keep);
    Ok(events)
}

/// A page that would be empty though there are events is never answered as empty: an empty
/// page tells the client it reached the first one.
fn newest_does_not_fit() -> ErrorBody {
    ErrorBody::new(
        ErrorCode::LIMIT_EXCEEDED,
        "the newest event of the page does not fit in one frame (limits.max_frame_len)",
    )
}

/// The views of every conversation of `user`, in ascending id order. A removal may race the
/// listing: what is no longer the user's is left out.
async fn views(shared: &Shared, user: &UserName) -> Result<Vec<(View, ConversationId)>, ErrorBody> {
    let convs = shared.store.user_conversations(user).map_err(store_error)?;
    let mut views = Vec::with_capacity(convs.len());
    for conv in convs {
        let Ok(Some(handle)) = shared.conversations.get(conv) else {
            continue;
        };
        if let Ok(view) = handle.view(user.clone()).await {
            views.push((view, conv));
        }
    }
    Ok(views)
}

fn summary(conv: ConversationId, view: View) -> ConversationSummary {
    ConversationSummary {
        conv,
        title: view.record.title,
        creator: view.record.creator,
        members: view.record.members.into_iter().collect(),
        head: view.head,
    }
}

/// The answer to a `History` below what retention kept: `Pruned` names the oldest seq; a
/// revision-1 session, which lacks that answer, gets the error `PRUNED` saying it in words.
fn pruned(conv: ConversationId, view: &View, revision: u16) -> Result<Response, ErrorBody> {
    pruned_subscription(conv, view.oldest, view.head, revision)
}

fn pruned_subscription(
    conv: ConversationId,
    oldest: Seq,
    head: Seq,
    revision: u16,
) -> Result<Response, ErrorBody> {
    if revision >= 2 {
        return Ok(Response::Pruned { conv, oldest, head });
    }
    Err(ErrorBody::new(
        ErrorCode::PRUNED,
        format!(
            "retention removed the events before seq {oldest}; the oldest available is {oldest}"
        ),
    ))
}

/// The current state of every message among `events` (ascending, of `conv`).
fn message_states(
    store: &Store,
    conv: ConversationId,
    events: &[Event],
) -> Result<Vec<MessageState>, StoreError> {
    let messages: Vec<Seq> = events
        .iter()
        .filter(|e| e.body.is_message())
        .map(|e| e.seq)
        .collect();
    let (Some(first), Some(last)) = (messages.first(), messages.last()) else {
        return Ok(Vec::new());
    };
    let mut records = store.message_records(conv, *first, *last)?;
    let mut states = Vec::with_capacity(messages.len());
    for seq in messages {
        let record = records.remove(&seq).unwrap_or_default();
        let edited = record.edits.last().copied();
        let text = match (edited, record.deleted) {
            (Some(edit), None) => store
                .event(conv, edit)?
                .and_then(|e| e.body.text().map(str::to_owned)),
            _ => None,
        };
        states.push(MessageState {
            seq,
            text,
            edited,
            deleted: record.deleted,
            reactions: record
                .reactions
                .into_iter()
                .map(|(emoji, users)| Reaction {
                    emoji,
                    users: users.into_iter().collect(),
                })
                .collect(),
        });
    }
    Ok(states)
}

/// The newest events of a page, with their message states, that fit in one frame.
fn page_that_fits(
    mut events: Vec<Event>,
    mut states: Vec<MessageState>,
    max_frame_len: u32,
) -> Result<(Vec<Event>, Vec<MessageState>), ErrorBody> {
    // What the reply needs besides events and states: variant, ids, head, oldest, counts.
    const REPLY_OVERHEAD: usize = 96;
    let budget = (max_frame_len as usize).saturating_sub(REPLY_OVERHEAD);
    let mut used = 0;
    let mut keep = 0;
    let mut state_at = states.len();
    for event in events.iter().rev() {
        let mut cost = postcard::experimental::serialized_size(event).unwrap_or(usize::MAX / 4);
        if state_at > 0 && states[state_at - 1].seq == event.seq {
            state_at -= 1;
            cost += postcard::experimental::serialized_size(&states[state_at])
                .unwrap_or(usize::MAX / 4);
        }
        used += cost;
        if used > budget {
            break;
        }
        keep += 1;
    }
    if keep == 0 && !events.is_empty() {
        return Err(newest_does_not_fit());
    }
    events.drain(..events.len() - keep);
    let first = events.first().map(|e| e.seq);
    states.retain(|s| first.is_some_and(|first| s.seq >= first));
    Ok((events, states))
}

/// Resolves once the server starts shutting down.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

fn ready(frame: ServerFrame) -> Reply {
    Box::pin(std::future::ready(frame))
}

fn reply(
    id: RequestId,
    answer: impl Future<Output = Result<Response, ErrorBody>> + Send + 'static,
) -> Reply {
    Box::pin(async move {
        match answer.await {
            Ok(response) => ServerFrame::Reply { id, response },
            Err(error) => ServerFrame::Error { id, error },
        }
    })
}

/// The server's limits (the `[limits]` section of the configuration).
#[derive(Clone, Debug)]
pub struct Limits {
    pub handshake_timeout: Duration,
    /// Time allowed between the handshake and a valid `Hello`.
    pub auth_timeout: Duration,
    pub max_frame_len: u32,
    /// Largest message text, at most the protocol's `MAX_TEXT_LEN`.
    pub max_message_len: usize,
    /// Members per conversation, conversations per user.
    pub conversations: ConversationLimits,
    /// Connections per user, sends per second per device.
    pub connected: ConnectedLimits,
    /// Connections handshaking or waiting for `Hello` at which new connections must validate
    /// their address first (QUIC Retry); 0: always.
    pub retry_threshold: usize,
    /// Typing and presence: grace period, datagram rate limits.
    pub ephemeral: EphemeralLimits,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake_timeout: Duration::from_secs(10),
            auth_timeout: Duration::from_secs(10),
            max_frame_len: quip_protocol::limits::MAX_FRAME_LEN,
            max_message_len: quip_protocol::limits::MAX_TEXT_LEN,
            conversations: ConversationLimits::default(),
            connected: ConnectedLimits::default(),
            retry_threshold: 64,
            ephemeral: EphemeralLimits::default(),
        }
    }
}
