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
    decode_datagram, encode_frame, limits, ClientDatagram, ClientFrame, ConversationId,
    ConversationSummary, ErrorBody, ErrorCode, Event, Request, RequestId, Response, Seq,
    ServerFrame, StartAt, UserName,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;

use crate::conversation::{answer, store_error, ConversationHandle};
use crate::delivery::Delivery;
use crate::presence::{self, DeviceId, EphemeralLimits, EphemeralStats};
use crate::rate_limit::TokenBucket;
use crate::server::Shared;
use crate::wire::{push_frame, FrameReader, ReadError};

/// Requests of one connection awaiting their answer; past this the session stops reading.
const MAX_PENDING_REQUESTS: usize = 1024;
/// Frames queued for the control stream's writer.
const OUTGOING_QUEUE: usize = 256;
/// How long the last frames of a closing session may take to reach the client.
const FINISH_TIMEOUT: Duration = Duration::from_secs(2);

type Reply = Pin<Box<dyn Future<Output = ServerFrame> + Send>>;

/// Serves one incoming connection until it closes or the server shuts down.
pub fn serve(
    shared: Arc<Shared>,
    incoming: quinn::Incoming,
    shutdown: watch::Receiver<bool>,
) -> impl Future<Output = ()> + Send {
    let remote = incoming.remote_address();
    let connection = crate::metrics::connection();
    // The handshake and the Hello are boxed: their futures (and the incoming packet) are large
    // and live only until the session starts, and unboxed they would stay part of the task
    // every idle connection keeps for its whole life.
    let starting = Box::pin(start(shared.clone(), incoming, remote));
    async move {
        let _connection = connection;
        if let Some((conn, user, control, revision)) = starting.await {
            run_session(shared, conn, user, control, revision, remote, shutdown).await;
        }
    }
}

/// The handshake, then `Hello` and `Welcome`: the connection, its user and control stream,
/// and the session's revision; `None` if the connection did not get that far.
async fn start(
    shared: Arc<Shared>,
    incoming: quinn::Incoming,
    remote: std::net::SocketAddr,
) -> Option<(quinn::Connection, UserName, Control, u16)> {
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
    match authenticate(&shared, &conn).await {
        Ok((user, control, revision)) => Some((conn, user, control, revision)),
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
    conn: quinn::Connection,
    user: UserName,
    control: Control,
    revision: u16,
    remote: std::net::SocketAddr,
    shutdown: watch::Receiver<bool>,
) {
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

/// Accepts the control stream, checks `Hello` and answers `Welcome`.
async fn authenticate(
    shared: &Shared,
    conn: &quinn::Connection,
) -> Result<(UserName, Control, u16), ErrorBody> {
    let first = async {
        let (send, recv) = conn.accept_bi().await.map_err(|e| {
            ErrorBody::new(
                ErrorCode::PROTOCOL_VIOLATION,
                format!("no control stream: {e}"),
            )
        })?;
        let mut reader = FrameReader::new(recv, shared.limits.max_frame_len);
        let hello = reader.next::<ClientFrame>().await.map_err(read_error)?;
        Ok::<_, ErrorBody>((send, reader, hello))
    };
    let (send, reader, hello) = tokio::time::timeout(shared.limits.auth_timeout, first)
        .await
        .map_err(|_| {
            ErrorBody::new(ErrorCode::AUTH_TIMEOUT, "no Hello within the time allowed")
        })??;
    let (token, client, revision) = match hello {
        Some(ClientFrame::Hello {
            token,
            client,
            revision,
        }) => (token, client, revision),
        _ => {
            return Err(ErrorBody::new(
                ErrorCode::PROTOCOL_VIOLATION,
                "the first frame must be Hello",
            ))
        }
    };
    if revision == 0 {
        return Err(ErrorBody::new(
            ErrorCode::PROTOCOL_VIOLATION,
            "revision 0 does not exist; the first revision is 1",
        ));
    }
    // What the session is sent is filtered by this revision (events: `delivery::for_revision`).
    let revision = revision.min(quip_protocol::REVISION);
    let user = shared
        .accounts
        .authenticate(&token)
        .map_err(store_error)?
        .ok_or_else(|| ErrorBody::new(ErrorCode::UNAUTHENTICATED, "invalid token"))?;
    let control = Control::start(send, reader, shared.limits.max_frame_len);
    let welcome = ServerFrame::Welcome {
        user: user.clone(),
        epoch: shared.store.epoch(),
        server: concat!("quipd/", env!("CARGO_PKG_VERSION")).into(),
        revision,
    };
    control.send(welcome).await;
    tracing::debug!(%user, client = %truncate(&client, limits::MAX_CLIENT_NAME_LEN), revision, "hello");
    Ok((user, control, revision))
}

fn read_error(e: ReadError) -> ErrorBody {
    match e {
        ReadError::Frame(e) => ErrorBody::new(e.code(), e.to_string()),
        ReadError::Stream(e) => ErrorBody::new(ErrorCode::PROTOCOL_VIOLATION, e.to_string()),
    }
}

/// The control stream: a reader, and a writer task that batches queued frames into few writes.
struct Control {
    reader: FrameReader,
    outgoing: mpsc::Sender<ServerFrame>,
    writer: tokio::task::JoinHandle<()>,
}

impl Control {
    fn start(mut send: quinn::SendStream, reader: FrameReader, max_frame_len: u32) -> Self {
        let (outgoing, mut queue) = mpsc::channel::<ServerFrame>(OUTGOING_QUEUE);
        let writer = tokio::spawn(async move {
            let mut buf = Vec::new();
            while let Some(frame) = queue.recv().await {
                push_server_frame(&mut buf, frame, max_frame_len);
                while buf.len() < 64 * 1024 {
                    match queue.try_recv() {
                        Ok(frame) => push_server_frame(&mut buf, frame, max_frame_len),
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
        // Fails only when the writer stopped because the stream is gone; the session ends too.
        let _ = self.outgoing.send(frame).await;
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
                frame = control.reader.next::<ClientFrame>(), if reading && replies.len() < MAX_PENDING_REQUESTS => {
                    match frame {
                        Ok(Some(ClientFrame::Request { id, request })) => {
                            let reply = self.dispatch(id, request).await;
                            replies.push(reply);
                        }
                        Ok(Some(ClientFrame::Hello { .. })) => break Err(ErrorBody::new(
                            ErrorCode::PROTOCOL_VIOLATION,
                            "Hello sent twice",
                        )),
                        Ok(None) => reading = false,
                        Err(ReadError::Stream(_)) => break Ok(()),
                        Err(e) => break Err(read_error(e)),
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

    /// Starts a request. Everything that must happen in request order (queueing a send at its
    /// conversation) happens before this returns; the returned future only awaits the answer.
    async fn dispatch(&mut self, id: RequestId, request: Request) -> Reply {
        if let Err(error) = request.validate() {
            return ready(ServerFrame::Error { id, error });
        }
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
                reply(id, async move {
                    let view = handle?.view(user).await?;
                    // Only durable events are shown: cap the page at the durable head.
                    let before = before.unwrap_or(Seq(u64::MAX)).min(view.head.next());
                    let events = store
                        .events_before(conv, before, limit as usize)
                        .map_err(store_error)?;
                    let events = newest_that_fit(events, max_frame_len);
                    Ok(Response::History {
                        conv,
                        events,
                        head: view.head,
                    })
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
                    let convs = shared
                        .store
                        .user_conversations(&user)
                        .map_err(store_error)?;
                    let mut conversations = Vec::with_capacity(convs.len());
                    for conv in convs {
                        let Ok(Some(handle)) = shared.conversations.get(conv) else {
                            continue;
                        };
                        // A removal may race the listing: skip what is no longer ours.
                        if let Ok(view) = handle.view(user.clone()).await {
                            conversations.push(ConversationSummary {
                                conv,
                                title: view.record.title,
                                creator: view.record.creator,
                                members: view.record.members.into_iter().collect(),
                                head: view.head,
                            });
                        }
                    }
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
fn newest_that_fit(mut events: Vec<Event>, max_frame_len: u32) -> Vec<Event> {
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
    events.drain(..events.len() - keep);
    events
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

/// Connection-level timeouts and sizes.
#[derive(Clone, Debug)]
pub struct Limits {
    pub handshake_timeout: Duration,
    /// Time allowed between the handshake and a valid `Hello`.
    pub auth_timeout: Duration,
    pub max_frame_len: u32,
    /// Typing and presence: grace period, datagram rate limits.
    pub ephemeral: EphemeralLimits,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake_timeout: Duration::from_secs(10),
            auth_timeout: Duration::from_secs(10),
            max_frame_len: quip_protocol::limits::MAX_FRAME_LEN,
            ephemeral: EphemeralLimits::default(),
        }
    }
}
