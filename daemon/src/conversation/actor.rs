//! The actor that owns one conversation's sequencer, its in-flight writes and its live feed.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesOrdered, StreamExt};
use quip_protocol::{
    encode_datagram, limits, ErrorBody, Event, EventBody, Seq, ServerDatagram, UserName,
};
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::Instrument;

use super::sequencer::{apply_membership, Append, Appended, Sequencer, StoredId};
use super::typing::TypingBoard;
use super::{store_error, Command, Sent, Subscription, Typing, TypingRelay, View, LIVE_BUFFER};
use crate::delivery::LiveEvent;
use crate::presence::{EphemeralStats, Relay};
use crate::store::{ConversationRecord, Store, StoreError, WriteBatch};

/// Most commands folded into one store commit.
const MAX_COMMANDS_PER_COMMIT: usize = 256;

/// Milliseconds since the Unix epoch: informational timestamps only, never used for order.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Someone waiting for a seq to become durable.
enum Waiter {
    Send {
        duplicate: bool,
        reply: oneshot::Sender<Result<Sent, ErrorBody>>,
    },
    Member(oneshot::Sender<Result<Seq, ErrorBody>>),
}

impl Waiter {
    fn answer(self, event: &Event) {
        match self {
            Waiter::Send { duplicate, reply } => {
                let _ = reply.send(Ok(Sent {
                    seq: event.seq,
                    at_ms: event.at_ms,
                    duplicate,
                }));
            }
            Waiter::Member(reply) => {
                let _ = reply.send(Ok(event.seq));
            }
        }
    }

    fn fail(self, error: ErrorBody) {
        match self {
            Waiter::Send { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Waiter::Member(reply) => {
                let _ = reply.send(Err(error));
            }
        }
    }
}

type CommitFuture =
    Pin<Box<dyn Future<Output = (Result<(), StoreError>, Vec<Event>)> + Send + 'static>>;

struct ConversationActor {
    sequencer: Sequencer,
    store: Store,
    inbox: mpsc::Receiver<Command>,
    /// Commits handed to the store, oldest first. The store answers them in order.
    in_flight: FuturesOrdered<CommitFuture>,
    /// Replies waiting for their seq to become durable.
    waiting: BTreeMap<Seq, Vec<Waiter>>,
    /// The last seq known durable, and so the last one that may be shown to anyone.
    durable: Seq,
    /// The conversation's state as of `durable`: who may read. The sequencer's record runs
    /// ahead of it by the membership changes not yet durable, which must not grant reading.
    visible: ConversationRecord,
    /// Durable events for live delivery, each encoded once for all subscribers.
    live: broadcast::Sender<Arc<LiveEvent>>,
    /// Set when a commit failed: seqs past `durable` may be lost, so nothing more is assigned.
    failed: bool,
    /// Typing signals of members, to relay to the other members.
    typing_inbox: mpsc::Receiver<Typing>,
    typing: TypingBoard,
    relay: TypingRelay,
}

pub(super) fn spawn(
    sequencer: Sequencer,
    store: Store,
    (inbox, typing_inbox): (mpsc::Receiver<Command>, mpsc::Receiver<Typing>),
    relay: TypingRelay,
    first: Option<(Append, oneshot::Sender<Result<Seq, ErrorBody>>)>,
) {
    let conv = sequencer.conv();
    let (live, _) = broadcast::channel(LIVE_BUFFER);
    // A new conversation has nothing durable yet: its Created event is the first commit.
    let (durable, visible) = match &first {
        Some(_) => {
            let mut record = sequencer.record().clone();
            record.members.clear();
            (Seq::ZERO, record)
        }
        None => (sequencer.assigned(), sequencer.record().clone()),
    };
    let mut actor = ConversationActor {
        durable,
        visible,
        sequencer,
        store,
        inbox,
        in_flight: FuturesOrdered::new(),
        waiting: BTreeMap::new(),
        live,
        failed: false,
        typing_inbox,
        typing: TypingBoard::new(relay.interval, Duration::from_millis(limits::TYPING_TTL_MS)),
        relay,
    };
    if let Some((append, reply)) = first {
        let mut writes = WriteBatch::new();
        let mut events = Vec::new();
        actor.stage(append, Waiter::Member(reply), &mut writes, &mut events);
        actor.commit(writes, events);
    }
    let active = crate::metrics::GaugeGuard::new(crate::metrics::CONVERSATIONS_ACTIVE);
    tokio::spawn(
        async move {
            actor.run().await;
            drop(active);
        }
        .instrument(tracing::info_span!("conversation", conv = conv.0)),
    );
}

impl ConversationActor {
    async fn run(mut self) {
        loop {
            tokio::select! {
                // Durable commits first: answering them frees memory and unblocks senders.
                // Typing last: it is perishable and must never hold up a message.
                biased;
                Some((result, events)) = self.in_flight.next(), if !self.in_flight.is_empty() => {
                    self.on_commit(result, events);
                }
                command = self.inbox.recv() => {
                    let Some(command) = command else { break };
                    self.on_commands(command);
                }
                Some(typing) = self.typing_inbox.recv() => self.on_typing(typing),
            }
        }
        while let Some((result, events)) = self.in_flight.next().await {
            self.on_commit(result, events);
        }
    }

    /// Handles `first` and whatever else is queued, as one store commit.
    fn on_commands(&mut self, first: Command) {
        let mut writes = WriteBatch::new();
        let mut events = Vec::new();
        self.on_command(first, &mut writes, &mut events);
        for _ in 1..MAX_COMMANDS_PER_COMMIT {
            match self.inbox.try_recv() {
                Ok(command) => self.on_command(command, &mut writes, &mut events),
                Err(_) => break,
            }
        }
        if !events.is_empty() {
            self.commit(writes, events);
        }
    }

    fn on_command(&mut self, command: Command, writes: &mut WriteBatch, events: &mut Vec<Event>) {
        match command {
            Command::Send {
                sender,
                id,
                text,
                reply,
            } => {
                if self.failed {
                    let _ = reply.send(Err(self.unavailable_to(&sender)));
                    return;
                }
                let stored = match self.stored_id(&sender, id) {
                    Ok(stored) => stored,
                    Err(e) => {
                        let _ = reply.send(Err(store_error(e)));
                        return;
                    }
                };
                match self.sequencer.send(&sender, id, text, stored, now_ms()) {
                    Ok(Appended::New(append)) => {
                        // A message ends its sender's typing indicator for the others.
                        self.stop_typing(&sender);
                        let waiter = Waiter::Send {
                            duplicate: false,
                            reply,
                        };
                        self.stage(append, waiter, writes, events);
                    }
                    Ok(Appended::Duplicate(seq)) => self.answer_duplicate(seq, reply),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Command::AddMember { by, user, reply } => {
                if self.failed {
                    let _ = reply.send(Err(self.unavailable_to(&by)));
                    return;
                }
                let exists = match self.store.user(&user) {
                    Ok(record) => record.is_some(),
                    Err(e) => {
                        let _ = reply.send(Err(store_error(e)));
                        return;
                    }
                };
                match self.sequencer.add_member(&by, user, exists, now_ms()) {
                    Ok(append) => self.stage(append, Waiter::Member(reply), writes, events),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Command::RemoveMember { by, user, reply } => {
                if self.failed {
                    let _ = reply.send(Err(self.unavailable_to(&by)));
                    return;
                }
                match self.sequencer.remove_member(&by, user.clone(), now_ms()) {
                    Ok(append) => {
                        self.stop_typing(&user);
                        self.stage(append, Waiter::Member(reply), writes, events);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Command::Subscribe { user, reply } => {
                let answer = if self.visible.members.contains(&user) {
                    Ok(Subscription {
                        live: self.live.subscribe(),
                        head: self.durable,
                    })
                } else {
                    Err(ErrorBody::not_found())
                };
                let _ = reply.send(answer);
            }
            Command::View { user, reply } => {
                let answer = if self.visible.members.contains(&user) {
                    Ok(View {
                        record: self.visible.clone(),
                        head: self.durable,
                    })
                } else {
                    Err(ErrorBody::not_found())
                };
                let _ = reply.send(answer);
            }
        }
    }

    /// The answer after a failed commit: a member learns the server cannot write now; anyone
    /// else gets the same answer as always, so a failure reveals nothing about membership.
    fn unavailable_to(&self, user: &UserName) -> ErrorBody {
        if self.sequencer.is_member(user) {
            unavailable()
        } else {
            ErrorBody::not_found()
        }
    }

    /// What the store knows of an id that is not in flight.
    fn stored_id(
        &self,
        sender: &UserName,
        id: quip_protocol::ClientMessageId,
    ) -> Result<StoredId, StoreError> {
        if self.sequencer.in_flight(sender, id).is_some() {
            return Ok(StoredId::Unknown);
        }
        let conv = self.sequencer.conv();
        let Some(seq) = self.store.message_seq(conv, id, sender)? else {
            return Ok(StoredId::Unknown);
        };
        match self.store.event(conv, seq)? {
            Some(Event {
                body: EventBody::Message { text, .. },
                ..
            }) => Ok(StoredId::Stored { seq, text }),
            _ => Err(StoreError::Corrupt(format!(
                "message id points at seq {seq}, which holds no message"
            ))),
        }
    }

    /// A retry of a send already assigned: answered with the original seq once that is durable.
    fn answer_duplicate(&mut self, seq: Seq, reply: oneshot::Sender<Result<Sent, ErrorBody>>) {
        let waiter = Waiter::Send {
            duplicate: true,
            reply,
        };
        if seq > self.durable {
            self.waiting.entry(seq).or_default().push(waiter);
            return;
        }
        match self.store.event(self.sequencer.conv(), seq) {
            Ok(Some(event)) => waiter.answer(&event),
            Ok(None) => waiter.fail(store_error(StoreError::Corrupt(format!(
                "durable seq {seq} is missing"
            )))),
            Err(e) => waiter.fail(store_error(e)),
        }
    }

    fn stage(
        &mut self,
        append: Append,
        waiter: Waiter,
        writes: &mut WriteBatch,
        events: &mut Vec<Event>,
    ) {
        writes.extend(append.writes);
        self.waiting
            .entry(append.event.seq)
            .or_default()
            .push(waiter);
        events.push(append.event);
    }

    fn commit(&mut self, writes: WriteBatch, events: Vec<Event>) {
        let durable = self.store.commit(writes);
        self.in_flight
            .push_back(Box::pin(async move { (durable.await, events) }));
    }

    fn on_commit(&mut self, result: Result<(), StoreError>, events: Vec<Event>) {
        if let Err(e) = result {
            // The store refuses all writes from now on; fail everything not yet durable.
            self.failed = true;
            let error = store_error(e);
            for waiter in std::mem::take(&mut self.waiting).into_values().flatten() {
                waiter.fail(error.clone());
            }
            return;
        }
        for event in events {
            if matches!(event.body, EventBody::Message { .. }) {
                metrics::counter!(crate::metrics::MESSAGES_APPENDED).increment(1);
            }
            self.sequencer.durable(&event);
            self.durable = event.seq;
            apply_membership(&mut self.visible, &event.body);
            let waiters = self.waiting.remove(&event.seq).unwrap_or_default();
            for waiter in waiters {
                waiter.answer(&event);
            }
            // No receiver is fine: nobody is subscribed right now.
            let _ = self.live.send(Arc::new(LiveEvent::new(event)));
        }
    }
}

impl ConversationActor {
    /// A typing signal: relayed to the other members if the sender is a member now (removal
    /// takes effect here at once), dropped and counted otherwise.
    fn on_typing(&mut self, Typing { user, typing }: Typing) {
        if !self.sequencer.is_member(&user) {
            EphemeralStats::count(&self.relay.presence.stats().not_member);
            return;
        }
        let now = Instant::now();
        if typing {
            if self.typing.handle_typing(&user, now) {
                self.relay_typing(user, true);
            }
        } else if self.typing.handle_stopped(&user, now) {
            self.relay_typing(user, false);
        }
        // Users who stopped by TTL stay on the board until their next signal; sweep them out
        // now and then so the board holds about the live indicators only.
        if self.typing.len() > 64 {
            self.typing.expire(now);
        }
    }

    fn stop_typing(&mut self, user: &UserName) {
        if self.typing.handle_stopped(user, Instant::now()) {
            self.relay_typing(user.clone(), false);
        }
    }

    fn relay_typing(&self, user: UserName, typing: bool) {
        let conv = self.sequencer.conv();
        let to: Vec<UserName> = self
            .sequencer
            .record()
            .members
            .iter()
            .filter(|member| **member != user)
            .cloned()
            .collect();
        if to.is_empty() {
            return;
        }
        let datagram = if typing {
            ServerDatagram::Typing { conv, user }
        } else {
            ServerDatagram::StoppedTyping { conv, user }
        };
        match encode_datagram(&datagram) {
            Ok(datagram) => self.relay.presence.relay(Relay {
                to,
                datagram: datagram.into(),
            }),
            Err(e) => tracing::error!(error = %e, "encoding a typing datagram"),
        }
    }
}

fn unavailable() -> ErrorBody {
    store_error(StoreError::Poisoned)
}
