use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quip_protocol::{
    encode_datagram, encode_frame, limits, ClientDatagram, ClientFrame, ClientMessageId,
    ConversationId, ConversationSummary, DeliveryFrame, Epoch, ErrorBody, Event, FrameDecoder,
    PresenceInfo, Request, RequestId, Response, Seq, ServerFrame, StartAt, UserName,
};
use serde::de::DeserializeOwned;
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::ephemeral::{self, EphemeralEvent, EphemeralEvents, PresenceVersions};
use crate::subscription::{Delivered, Subscription};
use crate::{ClientConfig, ClientError};

/// Events buffered per subscription before the client stops reading its stream (and QUIC flow
/// control slows the server's delivery to this client alone).
const SUBSCRIPTION_BUFFER: usize = 1024;

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

type ReplySender = oneshot::Sender<Result<Response, ClientError>>;

/// Requests awaiting their reply, and whether the connection is still up.
#[derive(Default)]
struct Pending {
    replies: HashMap<RequestId, ReplySender>,
    next_id: u64,
    closed: Option<ClientError>,
}

type Routes = Arc<Mutex<HashMap<ConversationId, mpsc::Sender<Delivered>>>>;

/// A connection to a quip server.
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    conn: quinn::Connection,
    endpoint: quinn::Endpoint,
    user: UserName,
    epoch: Epoch,
    outgoing: mpsc::UnboundedSender<(Request, Option<ReplySender>)>,
    routes: Routes,
    ephemeral: broadcast::Sender<EphemeralEvent>,
    presence_versions: PresenceVersions,
    malformed_datagrams: Arc<AtomicU64>,
    /// When `Typing` was last sent, per conversation: repeats are sent every `TYPING_REFRESH_MS`.
    typing_sent: Mutex<HashMap<ConversationId, Instant>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("user", &self.user)
            .field("remote", &self.conn.remote_address())
            .finish()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.conn.close(0u32.into(), b"client closed");
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Client {
    /// Connects, verifies the server against the configured CA, and authenticates.
    pub async fn connect(config: ClientConfig) -> Result<Client, ClientError> {
        let connect_error = |reason: String| ClientError::Connect {
            server: config.server.clone(),
            reason,
        };
        let addr = tokio::net::lookup_host(&config.server)
            .await
            .map_err(|e| connect_error(e.to_string()))?
            .next()
            .ok_or_else(|| connect_error("the name has no address".into()))?;
        let bind: std::net::SocketAddr = if addr.is_ipv6() {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let mut endpoint =
            quinn::Endpoint::client(bind).map_err(|e| connect_error(e.to_string()))?;
        endpoint.set_default_client_config(config.quic_config()?);
        let connecting = endpoint
            .connect(addr, config.host())
            .map_err(|e| connect_error(e.to_string()))?;
        let handshake = async {
            let conn = connecting.await.map_err(|e| connection_error(&e))?;
            let (mut send, recv) = conn.open_bi().await.map_err(|e| connection_error(&e))?;
            let hello = ClientFrame::Hello {
                token: config.token.clone(),
                client: config.client_name.clone(),
            };
            write_frame(&mut send, &hello).await?;
            let mut reader = FrameReader::new(recv);
            let welcome = match reader.next::<ServerFrame>().await {
                Ok(Some(frame)) => frame,
                // A refused Hello closes the connection with the error code: report that.
                Ok(None) | Err(_) => {
                    let reason = conn.closed().await;
                    return Err(connection_error(&reason));
                }
            };
            Ok::<_, ClientError>((conn, send, reader, welcome))
        };
        let (conn, send, reader, welcome) = tokio::time::timeout(config.connect_timeout, handshake)
            .await
            .map_err(|_| connect_error("timed out".into()))?
            .map_err(|e| match e {
                ClientError::ConnectionLost(reason) => connect_error(reason),
                other => other,
            })?;
        let (user, epoch) = match welcome {
            ServerFrame::Welcome { user, epoch, .. } => (user, epoch),
            ServerFrame::Closing { error } => return Err(ClientError::Server(error)),
            other => {
                return Err(ClientError::Protocol(format!(
                    "expected Welcome, got {other:?}"
                )))
            }
        };

        let pending = Arc::new(Mutex::new(Pending::default()));
        let routes: Routes = Arc::default();
        let (outgoing, requests) = mpsc::unbounded_channel();
        tokio::spawn(write_requests(send, requests, pending.clone()));
        tokio::spawn(read_replies(reader, pending, conn.clone()));
        tokio::spawn(accept_deliveries(conn.clone(), routes.clone()));
        let (ephemeral, _) = broadcast::channel(ephemeral::EPHEMERAL_BUFFER);
        let presence_versions = PresenceVersions::default();
        let malformed_datagrams = Arc::new(AtomicU64::new(0));
        tokio::spawn(ephemeral::read_datagrams(
            conn.clone(),
            ephemeral.clone(),
            presence_versions.clone(),
            malformed_datagrams.clone(),
        ));
        Ok(Client {
            inner: Arc::new(Inner {
                conn,
                endpoint,
                user,
                epoch,
                outgoing,
                routes,
                ephemeral,
                presence_versions,
                malformed_datagrams,
                typing_sent: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The authenticated user.
    pub fn user(&self) -> &UserName {
        &self.inner.user
    }

    /// The server store's epoch: cursors are valid within one epoch.
    pub fn epoch(&self) -> Epoch {
        self.inner.epoch
    }

    /// Queues a request now and returns its answer's future.
    fn request(
        &self,
        request: Request,
    ) -> impl std::future::Future<Output = Result<Response, ClientError>> + Send + 'static {
        let (reply, answer) = oneshot::channel();
        let queued = self.inner.outgoing.send((request, Some(reply)));
        async move {
            if queued.is_err() {
                return Err(ClientError::ConnectionLost("client closed".into()));
            }
            answer
                .await
                .unwrap_or_else(|_| Err(ClientError::ConnectionLost("connection closed".into())))
        }
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

    /// Sends a message with a fresh random id. The message is queued for the server when this
    /// is called, not when the future is first polled, so calls keep their order.
    pub fn send(
        &self,
        conv: ConversationId,
        text: impl Into<String>,
    ) -> impl std::future::Future<Output = Result<Sent, ClientError>> + Send + 'static {
        self.send_with_id(conv, ClientMessageId(rand::random()), text)
    }

    /// Sends a message with the caller's id. Retrying with the same id and text after an error
    /// is safe: the server stores the message once and answers with the original seq.
    pub fn send_with_id(
        &self,
        conv: ConversationId,
        id: ClientMessageId,
        text: impl Into<String>,
    ) -> impl std::future::Future<Output = Result<Sent, ClientError>> + Send + 'static {
        // The server ends this user's typing indicator when the message is sequenced; the next
        // keystroke announces typing afresh.
        lock(&self.inner.typing_sent).remove(&conv);
        let answer = self.request(Request::Send {
            conv,
            id,
            text: text.into(),
        });
        async move {
            match answer.await? {
                Response::Sent {
                    conv,
                    seq,
                    at_ms,
                    duplicate,
                } => Ok(Sent {
                    conv,
                    seq,
                    id,
                    at_ms,
                    duplicate,
                }),
                other => Err(unexpected(other)),
            }
        }
    }

    /// Up to `limit` events before `before` (or the newest ones), ascending, and the head.
    pub async fn history(
        &self,
        conv: ConversationId,
        before: Option<Seq>,
        limit: u32,
    ) -> Result<(Vec<Event>, Seq), ClientError> {
        let request = Request::History {
            conv,
            before,
            limit: limit.clamp(1, limits::MAX_HISTORY_LIMIT),
        };
        match self.request(request).await? {
            Response::History { events, head, .. } => Ok((events, head)),
            other => Err(unexpected(other)),
        }
    }

    /// Follows a conversation from `start`: stored events first, then live ones.
    /// One subscription per conversation per client; a second replaces the first.
    pub async fn subscribe(
        &self,
        conv: ConversationId,
        start: StartAt,
    ) -> Result<Subscription, ClientError> {
        let (route, events) = mpsc::channel(SUBSCRIPTION_BUFFER);
        lock(&self.inner.routes).insert(conv, route);
        let answer = self.request(Request::Subscribe { conv, start }).await;
        let head = match answer {
            Ok(Response::Subscribed { head, .. }) => head,
            other => {
                lock(&self.inner.routes).remove(&conv);
                return Err(match other {
                    Ok(Response::CursorReset { epoch, head, .. }) => {
                        ClientError::CursorReset { epoch, head }
                    }
                    Ok(other) => unexpected(other),
                    Err(e) => e,
                });
            }
        };
        let outgoing = self.inner.outgoing.clone();
        let routes = self.inner.routes.clone();
        Ok(Subscription {
            conv,
            head,
            events,
            finished: false,
            on_drop: Some(Box::new(move || {
                lock(&routes).remove(&conv);
                let _ = outgoing.send((Request::Unsubscribe { conv }, None));
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
            let mut sent = lock(&self.inner.typing_sent);
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
        lock(&self.inner.typing_sent).remove(&conv);
        self.send_datagram(&ClientDatagram::StoppedTyping { conv })
    }

    fn send_datagram(&self, datagram: &ClientDatagram) -> Result<(), ClientError> {
        let payload = encode_datagram(datagram)
            .map_err(|e| ClientError::Protocol(format!("encoding a datagram: {e}")))?;
        match self.inner.conn.max_datagram_size() {
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
        self.inner
            .conn
            .send_datagram(payload.into())
            .map_err(|e| ClientError::ConnectionLost(e.to_string()))
    }

    /// Typing and presence events from now on. Each call makes an independent listener.
    pub fn ephemeral_events(&self) -> EphemeralEvents {
        EphemeralEvents {
            events: self.inner.ephemeral.subscribe(),
            conn: self.inner.conn.clone(),
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
                    ephemeral::newer(&self.inner.presence_versions, info);
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

    /// Datagrams from the server that could not be decoded and were dropped.
    pub fn malformed_datagrams(&self) -> u64 {
        self.inner.malformed_datagrams.load(Ordering::Relaxed)
    }

    /// Closes the connection and waits until the server has been told.
    pub async fn close(self) {
        self.inner.conn.close(0u32.into(), b"bye");
        self.inner.endpoint.wait_idle().await;
    }
}

fn unexpected(response: Response) -> ClientError {
    ClientError::Protocol(format!("unexpected reply {response:?}"))
}

fn connection_error(e: &quinn::ConnectionError) -> ClientError {
    match e {
        quinn::ConnectionError::ApplicationClosed(close) => {
            let code = u16::try_from(close.error_code.into_inner()).unwrap_or(u16::MAX);
            ClientError::Server(ErrorBody::new(
                quip_protocol::ErrorCode(code),
                String::from_utf8_lossy(&close.reason).into_owned(),
            ))
        }
        other => ClientError::ConnectionLost(other.to_string()),
    }
}

async fn write_frame(send: &mut quinn::SendStream, frame: &ClientFrame) -> Result<(), ClientError> {
    let bytes = encode_frame(frame, limits::MAX_FRAME_LEN)
        .map_err(|e| ClientError::Config(format!("request too large: {e}")))?;
    send.write_all(&bytes)
        .await
        .map_err(|e| ClientError::ConnectionLost(e.to_string()))
}

/// Assigns request ids and writes requests in the order they were queued, batching what is
/// queued together into one stream write.
async fn write_requests(
    mut send: quinn::SendStream,
    mut requests: mpsc::UnboundedReceiver<(Request, Option<ReplySender>)>,
    pending: Arc<Mutex<Pending>>,
) {
    let mut buf = Vec::new();
    while let Some(first) = requests.recv().await {
        let mut next = Some(first);
        while let Some((request, reply)) = next.take() {
            let frame = {
                let mut pending = lock(&pending);
                if let Some(error) = &pending.closed {
                    if let Some(reply) = reply {
                        let _ = reply.send(Err(error.clone()));
                    }
                    None
                } else {
                    pending.next_id += 1;
                    let id = RequestId(pending.next_id);
                    if let Some(reply) = reply {
                        pending.replies.insert(id, reply);
                    }
                    Some(ClientFrame::Request { id, request })
                }
            };
            if let Some(frame) = frame {
                match encode_frame(&frame, limits::MAX_FRAME_LEN) {
                    Ok(bytes) => buf.extend_from_slice(&bytes),
                    Err(e) => {
                        if let ClientFrame::Request { id, .. } = frame {
                            if let Some(reply) = lock(&pending).replies.remove(&id) {
                                let _ = reply.send(Err(ClientError::Config(format!(
                                    "request too large: {e}"
                                ))));
                            }
                        }
                    }
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

/// Matches replies to requests. When the connection ends, every waiting request fails.
async fn read_replies(
    mut reader: FrameReader,
    pending: Arc<Mutex<Pending>>,
    conn: quinn::Connection,
) {
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
                break ClientError::Protocol("Welcome sent twice".into());
            }
        };
        if let Some(reply) = lock(&pending).replies.remove(&id) {
            let _ = reply.send(result);
        }
    };
    let reason = closing.unwrap_or(match conn.close_reason() {
        Some(e) => connection_error(&e),
        None => reason,
    });
    let mut pending = lock(&pending);
    pending.closed = Some(reason.clone());
    for (_, reply) in pending.replies.drain() {
        let _ = reply.send(Err(reason.clone()));
    }
}

/// Accepts the server's delivery streams and routes each to its subscription.
async fn accept_deliveries(conn: quinn::Connection, routes: Routes) {
    while let Ok(stream) = conn.accept_uni().await {
        tokio::spawn(read_delivery(FrameReader::new(stream), routes.clone()));
    }
    // Connection gone: end every subscription.
    let reason = conn.close_reason().map_or_else(
        || ClientError::ConnectionLost("closed".into()),
        |e| connection_error(&e),
    );
    let routes: Vec<_> = lock(&routes).drain().map(|(_, route)| route).collect();
    for route in routes {
        let _ = route.send(Delivered::Lost(reason.clone())).await;
    }
}

async fn read_delivery(mut reader: FrameReader, routes: Routes) {
    let conv = match reader.next::<DeliveryFrame>().await {
        Ok(Some(DeliveryFrame::Start { conv, .. })) => conv,
        _ => return,
    };
    let Some(route) = lock(&routes).get(&conv).cloned() else {
        return;
    };
    loop {
        let delivered = match reader.next::<DeliveryFrame>().await {
            Ok(Some(DeliveryFrame::Event(event))) => Delivered::Event(event),
            Ok(Some(DeliveryFrame::End { error })) => Delivered::End(error),
            Ok(Some(DeliveryFrame::Start { .. })) => {
                Delivered::Lost(ClientError::Protocol("Start sent twice on a stream".into()))
            }
            Ok(None) => return,
            Err(e) => Delivered::Lost(e),
        };
        let last = !matches!(delivered, Delivered::Event(_));
        if route.send(delivered).await.is_err() || last {
            return;
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
