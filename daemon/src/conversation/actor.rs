//! The actor that owns one conversation's sequencer, its in-flight writes, its live feed, its
//! receipt cursors and its retention.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesOrdered, StreamExt};
use quip_protocol::{
    encode_datagram, limits, ClientMessageId, ErrorBody, Event, EventBody, Receipt, Seq,
    ServerDatagram, UserName,
};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tracing::Instrument;

use super::receipts::ReceiptBoard;
use super::retention::{self, Retention};
use super::sequencer::{
    apply_membership, Append, Appended, Sequencer, StoredId, TargetInfo, TargetLookup,
};
use super::typing::TypingBoard;
use super::{
    store_error, Command, Memberships, Sent, Services, Subscription, Typing, View, LIVE_BUFFER,
};
use crate::delivery::LiveEvent;
use crate::presence::{EphemeralStats, Relay};
use crate::push::Arrival;
use crate::store::{ConversationRecord, ReceiptRecord, Store, StoreError, WriteBatch};

/// Most commands folded into one store commit.
const MAX_COMMANDS_PER_COMMIT: usize = 256;
/// How often retention by age looks for events that grew too old.
const AGE_CHECK_INTERVAL: Duration = Duration::from_secs(60);

/// Milliseconds since the Unix epoch: informational timestamps only, never used for order.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Receipts as the delivery streams show them: every member's cursors, in name order.
pub type ReceiptsView = Arc<Vec<Receipt>>;

/// Someone waiting for a seq to become durable.
enum Waiter {
    Send {
        duplicate: bool,
        reply: oneshot::Sender<Result<Sent, ErrorBody>>,
    },
    Member(oneshot::Sender<Result<Seq, ErrorBody>>),
    Account(oneshot::Sender<Result<Option<Seq>, ErrorBody>>),
}

impl Waiter {
    fn answer(self, event: &Event) {
        self.answer_at(event.seq, event.at_ms);
    }

    fn answer_at(self, seq: Seq, at_ms: u64) {
        match self {
            Waiter::Send { duplicate, reply } => {
                let _ = reply.send(Ok(Sent {
                    seq,
                    at_ms,
                    duplicate,
                }));
            }
            Waiter::Member(reply) => {
                let _ = reply.send(Ok(seq));
            }
            Waiter::Account(reply) => {
                let _ = reply.send(Ok(Some(seq)));
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
            Waiter::Account(reply) => {
                let _ = reply.send(Err(error));
            }
        }
    }
}

/// What one store commit carries besides its writes, handled once it is durable.
#[derive(Default)]
struct Staged {
    events: Vec<Event>,
    /// Receipt requests, answered once durable.
    receipts: Vec<(
        oneshot::Sender<Result<ReceiptRecord, ErrorBody>>,
        ReceiptRecord,
    )>,
    /// Whether a receipt changed: the board is shown anew once durable.
    receipts_changed: bool,
    /// The oldest seq kept once this commit (a retention step) is durable.
    prune_to: Option<Seq>,
}

impl Staged {
    fn is_empty(&self) -> bool {
        self.events.is_empty() && self.receipts.is_empty() && self.prune_to.is_none()
    }
}

type CommitFuture = Pin<Box<dyn Future<Output = (Result<(), StoreError>, Staged)> + Send>>;

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
    /// The oldest seq still stored (retention removes older ones); 1 while nothing was pruned.
    floor: Seq,
    /// The conversation's state as of `durable`: who may read. The sequencer's record runs
    /// ahead of it by the membership changes not yet durable, which must not grant reading.
    visible: ConversationRecord,
    /// Durable events for live delivery, each encoded once for all subscribers.
    live: broadcast::Sender<Arc<LiveEvent>>,
    /// Receipt cursors as assigned (ahead of what is durable, like the sequencer).
    receipts: ReceiptBoard,
    /// Receipt cursors as durable, for the delivery streams.
    shown_receipts: watch::Sender<ReceiptsView>,
    /// Set when a commit failed: seqs past `durable` may be lost, so nothing more is assigned.
    failed: bool,
    /// A retention step is being made durable.
    pruning: bool,
    /// Typing signals of members, to relay to the other members.
    typing_inbox: mpsc::Receiver<Typing>,
    typing: TypingBoard,
    retention: Retention,
    services: Services,
    /// Every user's count of conversations, shared by all actors.
    memberships: Arc<Memberships>,
}

pub(super) struct Start {
    pub sequencer: Sequencer,
    pub store: Store,
    pub inbox: mpsc::Receiver<Command>,
    pub typing_inbox: mpsc::Receiver<Typing>,
    pub services: Services,
    pub memberships: Arc<Memberships>,
    /// A new conversation's first event and its creator's reply.
    pub first: Option<(Append, oneshot::Sender<Result<Seq, ErrorBody>>)>,
    pub receipts: ReceiptBoard,
    pub floor: Seq,
}

/// Whether `event` is something its sender did in the conversation and stays a member after:
/// an action (13.1), creating it, adding a member, or removing another one. A member who
/// leaves has no cursors to move.
fn authored_by_a_member(event: &Event) -> bool {
    match &event.body {
        EventBody::Created { .. } | EventBody::MemberAdded { .. } => true,
        EventBody::MemberRemoved { user } => *user != event.sender,
        body => body.client_id().is_some(),
    }
}

pub(super) fn spawn(start: Start) {
    let Start {
        sequencer,
        store,
        inbox,
        typing_inbox,
        services,
        memberships,
        first,
        receipts,
        floor,
    } = start;
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
    let shown = Arc::new(receipts.receipts(&visible.members));
    let mut actor = ConversationActor {
        durable,
        floor: floor.max(Seq(1)),
        visible,
        sequencer,
        store,
        inbox,
        in_flight: FuturesOrdered::new(),
        waiting: BTreeMap::new(),
        live,
        receipts,
        shown_receipts: watch::Sender::new(shown),
        failed: false,
        pruning: false,
        typing_inbox,
        typing: TypingBoard::new(
            services.relay.interval,
            Duration::from_millis(limits::TYPING_TTL_MS),
        ),
        retention: services.retention.of(conv),
        services,
        memberships,
    };
    if let Some((append, reply)) = first {
        let mut writes = WriteBatch::new();
        let mut staged = Staged::default();
        actor.stage(append, Waiter::Member(reply), &mut writes, &mut staged);
        actor.commit(writes, staged);
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
        let mut age_check = tokio::time::interval(AGE_CHECK_INTERVAL);
        age_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                // Durable commits first: answering them frees memory and unblocks senders.
                // Retention next (rare); typing last: it is perishable and must never hold up
                // a message.
                biased;
                Some((result, staged)) = self.in_flight.next(), if !self.in_flight.is_empty() => {
                    self.on_commit(result, staged);
                }
                command = self.inbox.recv() => {
                    let Some(command) = command else { break };
                    self.on_commands(command);
                }
                _ = age_check.tick(), if self.retention.keep_for.is_some() => {
                    self.prune_by_age();
                }
                Some(typing) = self.typing_inbox.recv() => self.on_typing(typing),
            }
        }
        while let Some((result, staged)) = self.in_flight.next().await {
            self.on_commit(result, staged);
        }
    }

    /// Handles `first` and whatever else is queued, as one store commit.
    fn on_commands(&mut self, first: Command) {
        let mut writes = WriteBatch::new();
        let mut staged = Staged::default();
        self.on_command(first, &mut writes, &mut staged);
        for _ in 1..MAX_COMMANDS_PER_COMMIT {
            match self.inbox.try_recv() {
                Ok(command) => self.on_command(command, &mut writes, &mut staged),
                Err(_) => break,
            }
        }
        if !staged.is_empty() {
            self.commit(writes, staged);
        }
    }

    fn on_command(&mut self, command: Command, writes: &mut WriteBatch, staged: &mut Staged) {
        match command {
            Command::Act {
                sender,
                body,
                reply,
            } => {
                if self.failed {
                    let _ = reply.send(Err(self.unavailable_to(&sender)));
                    return;
                }
                match self.act(&sender, body) {
                    Ok(Appended::New(append)) => {
                        // A message ends its sender's typing indicator for the others.
                        if append.event.body.is_message() {
                            self.stop_typing(&sender);
                        }
                        let waiter = Waiter::Send {
                            duplicate: false,
                            reply,
                        };
                        self.stage(append, waiter, writes, staged);
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
                let memberships = &self.memberships;
                let may_join = |user: &UserName| memberships.try_join(&[user]);
                match self
                    .sequencer
                    .add_member(&by, user, exists, may_join, now_ms())
                {
                    Ok(append) => self.stage(append, Waiter::Member(reply), writes, staged),
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
                        self.memberships.leave(&user);
                        self.stop_typing(&user);
                        self.stage(append, Waiter::Member(reply), writes, staged);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Command::Receipt {
                user,
                delivered,
                read,
                reply,
            } => {
                // Receipts are about what a member could see: durable membership and seqs.
                if !self.visible.members.contains(&user) {
                    let _ = reply.send(Err(ErrorBody::not_found()));
                    return;
                }
                if self.failed {
                    let _ = reply.send(Err(self.unavailable_to(&user)));
                    return;
                }
                match self.receipts.advance(&user, delivered, read, self.durable) {
                    Ok((record, changed)) => {
                        if changed {
                            writes.put_receipt(self.sequencer.conv(), &user, &record);
                            staged.receipts_changed = true;
                        }
                        staged.receipts.push((reply, record));
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
                        oldest: self.floor,
                        receipts: self.shown_receipts.subscribe(),
                    })
                } else {
                    Err(ErrorBody::not_found())
                };
                let _ = reply.send(answer);
            }
            Command::RemoveAccount { user, reply } => {
                if self.failed {
                    let _ = reply.send(Err(unavailable()));
                    return;
                }
                match self.sequencer.remove_account(&user, now_ms()) {
                    Some(append) => {
                        self.memberships.leave(&user);
                        self.stop_typing(&user);
                        self.stage(append, Waiter::Account(reply), writes, staged);
                    }
                    None => {
                        let _ = reply.send(Ok(None));
                    }
                }
            }
            Command::View { user, reply } => {
                let answer = if self.visible.members.contains(&user) {
                    Ok(View {
                        record: self.visible.clone(),
                        head: self.durable,
                        oldest: self.floor,
                        receipt: self
                            .shown_receipts
                            .borrow()
                            .iter()
                            .find(|r| r.user == user)
                            .map(|r| ReceiptRecord {
                                delivered: r.delivered,
                                read: r.read,
                            })
                            .unwrap_or_default(),
                    })
                } else {
                    Err(ErrorBody::not_found())
                };
                let _ = reply.send(answer);
            }
        }
    }

    /// A user's action: looks up what the rules need, then lets the sequencer decide.
    fn act(&mut self, sender: &UserName, body: EventBody) -> Result<Appended, ErrorBody> {
        let id = body.client_id().unwrap_or(ClientMessageId([0; 16]));
        let stored = self.stored_id(sender, id).map_err(store_error)?;
        let target = match body.target() {
            Some(seq) => Some(self.target(seq).map_err(store_error)?),
            None => None,
        };
        self.sequencer.act(sender, body, stored, target, now_ms())
    }

    /// What is at `seq`, for an edit, delete, reaction or reply pointing at it.
    fn target(&self, seq: Seq) -> Result<TargetLookup, StoreError> {
        if seq == Seq::ZERO || seq > self.sequencer.assigned() || seq < self.floor {
            return Ok(TargetLookup::Missing);
        }
        if let Some(info) = self.sequencer.pending_target(seq) {
            return Ok(TargetLookup::Message(info.clone()));
        }
        let conv = self.sequencer.conv();
        let Some(event) = self.store.event_without_text(conv, seq)? else {
            return Ok(TargetLookup::Missing);
        };
        if !event.body.is_message() {
            return Ok(TargetLookup::NotAMessage);
        }
        let record = self.store.message_record(conv, seq)?.unwrap_or_default();
        Ok(TargetLookup::Message(TargetInfo {
            author: event.sender,
            record,
        }))
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
    fn stored_id(&self, sender: &UserName, id: ClientMessageId) -> Result<StoredId, StoreError> {
        if self.sequencer.in_flight(sender, id).is_some() {
            return Ok(StoredId::Unknown);
        }
        let conv = self.sequencer.conv();
        let Some(seq) = self.store.message_seq(conv, id, sender)? else {
            return Ok(StoredId::Unknown);
        };
        match self.store.event(conv, seq)? {
            Some(event) if event.body.client_id() == Some(id) => Ok(StoredId::Stored {
                seq,
                body: Some(event.body),
            }),
            // Retention removed it; the id outlives it, so a late retry is still recognised.
            None if seq < self.floor => Ok(StoredId::Stored { seq, body: None }),
            _ => Err(StoreError::Corrupt(format!(
                "message id points at seq {seq}, which holds no action with that id"
            ))),
        }
    }

    /// A retry of an action already assigned: answered with the original seq once that is
    /// durable.
    fn answer_duplicate(&mut self, seq: Seq, reply: oneshot::Sender<Result<Sent, ErrorBody>>) {
        let waiter = Waiter::Send {
            duplicate: true,
            reply,
        };
        if seq > self.durable {
            self.waiting.entry(seq).or_default().push(waiter);
            return;
        }
        if seq < self.floor {
            // Pruned: its server time went with it.
            waiter.answer_at(seq, 0);
            return;
        }
        match self.store.event_without_text(self.sequencer.conv(), seq) {
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
        staged: &mut Staged,
    ) {
        writes.extend(append.writes);
        let event = append.event;
        // Writing in a conversation reads it: the author's own event moves its cursors.
        if authored_by_a_member(&event) {
            let (record, changed) = self
                .receipts
                .advance_own(&event.sender, event.seq, event.seq);
            if changed {
                writes.put_receipt(self.sequencer.conv(), &event.sender, &record);
                staged.receipts_changed = true;
            }
        }
        self.waiting.entry(event.seq).or_default().push(waiter);
        staged.events.push(event);
    }

    fn commit(&mut self, writes: WriteBatch, staged: Staged) {
        let durable = self.store.commit(writes);
        self.in_flight
            .push_back(Box::pin(async move { (durable.await, staged) }));
    }

    fn on_commit(&mut self, result: Result<(), StoreError>, staged: Staged) {
        if let Err(e) = result {
            // The store refuses all writes from now on; fail everything not yet durable.
            self.failed = true;
            let error = store_error(e);
            for waiter in std::mem::take(&mut self.waiting).into_values().flatten() {
                waiter.fail(error.clone());
            }
            for (reply, _) in staged.receipts {
                let _ = reply.send(Err(error.clone()));
            }
            return;
        }
        let membership_before = self.visible.members.clone();
        for event in staged.events {
            if event.body.is_message() {
                metrics::counter!(crate::metrics::MESSAGES_APPENDED).increment(1);
                self.notify_offline(&event);
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
        if staged.receipts_changed || membership_before != self.visible.members {
            self.show_receipts();
        }
        for (reply, record) in staged.receipts {
            let _ = reply.send(Ok(record));
        }
        if let Some(floor) = staged.prune_to {
            self.floor = floor;
            self.pruning = false;
        }
        self.prune_by_count();
    }

    /// Shows the durable receipts of the current members on every delivery stream.
    fn show_receipts(&mut self) {
        let shown = Arc::new(self.receipts.receipts(&self.visible.members));
        self.shown_receipts.send_replace(shown);
    }

    /// Hands a durable message to the push hook for the members other than its author; the
    /// hook's task finds out which of them have no device online. Never waits.
    fn notify_offline(&self, event: &Event) {
        let Some(push) = &self.services.push else {
            return;
        };
        let to: Vec<UserName> = self
            .visible
            .members
            .iter()
            .filter(|m| **m != event.sender)
            .cloned()
            .collect();
        if to.is_empty() {
            return;
        }
        push.notify(Arrival {
            conv: self.sequencer.conv(),
            seq: event.seq,
            sender: event.sender.clone(),
            at_ms: event.at_ms,
            text: event.body.text().unwrap_or_default().to_owned(),
            to,
        });
    }

    fn prune_by_count(&mut self) {
        if let Some(keep) = self.retention.keep_events {
            let wanted = retention::floor_by_count(keep, self.floor, self.durable);
            self.prune_to(wanted);
        }
    }

    fn prune_by_age(&mut self) {
        let Some(keep_for) = self.retention.keep_for else {
            return;
        };
        if self.pruning || self.failed {
            return;
        }
        let cutoff = now_ms().saturating_sub(keep_for.as_millis() as u64);
        let conv = self.sequencer.conv();
        let oldest = match self.store.event_times_after(
            conv,
            Seq(self.floor.0.saturating_sub(1)),
            retention::PRUNE_BATCH as usize,
        ) {
            Ok(oldest) => oldest,
            Err(e) => {
                tracing::error!(error = %e, "reading the oldest events for retention");
                return;
            }
        };
        if let Some(wanted) = retention::floor_by_age(&oldest, cutoff, self.durable) {
            self.prune_to(wanted);
        }
    }

    /// Removes the events below `wanted` (a bounded step of them), as one commit.
    fn prune_to(&mut self, wanted: Seq) {
        if self.pruning || self.failed {
            return;
        }
        let Some(to) = retention::next_step(self.floor, wanted) else {
            return;
        };
        let conv = self.sequencer.conv();
        let mut writes = WriteBatch::new();
        for seq in self.floor.0..to.0 {
            writes.prune_event(conv, Seq(seq));
        }
        tracing::debug!(
            from = self.floor.0,
            to = to.0,
            "retention removes old events"
        );
        self.pruning = true;
        self.commit(
            writes,
            Staged {
                prune_to: Some(to),
                ..Staged::default()
            },
        );
    }
}

impl ConversationActor {
    /// A typing signal: relayed to the other members if the sender is a member now (removal
    /// takes effect here at once), dropped and counted otherwise.
    fn on_typing(&mut self, Typing { user, typing }: Typing) {
        if !self.sequencer.is_member(&user) {
            EphemeralStats::count(&self.services.relay.presence.stats().not_member);
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
            Ok(datagram) => self.services.relay.presence.relay(Relay {
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
