//! Conversations: one actor per active conversation owns its sequencer, and the registry finds
//! or starts that actor.
//!
//! This is the narrow interface the connection layer sees ([`Conversations`] and
//! [`ConversationHandle`]); placing sequencers on other machines later changes what is behind
//! it, not the callers.

mod actor;
mod memberships;
pub mod receipts;
pub mod retention;
pub mod sequencer;
pub mod typing;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quip_protocol::{
    ClientMessageId, ConversationId, ErrorBody, ErrorCode, EventBody, Seq, UserName,
};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::delivery::LiveEvent;
use crate::presence::{EphemeralStats, PresenceHandle};
use crate::push::PushHandle;
use crate::repeats::Repeats;
use crate::store::{ConversationRecord, ReceiptRecord, Store, StoreError};
pub use actor::{now_ms, ReceiptsView};
pub use memberships::Memberships;
use receipts::ReceiptBoard;
pub use retention::Retention;
use sequencer::Sequencer;

/// Commands waiting for a conversation's actor. Senders wait when it is full: backpressure
/// reaches the connection that sends too fast, never the sequencer.
const MAILBOX: usize = 1024;
/// Durable events kept for live delivery. A subscriber further behind than this catches up from
/// the store instead (the sequencer never waits for it).
pub const LIVE_BUFFER: usize = 1024;
/// Typing signals waiting for a conversation's actor, in their own queue so that they never
/// hold up a send. When full, new ones are dropped.
const EPHEMERAL_MAILBOX: usize = 256;

/// A successful send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    pub seq: Seq,
    pub at_ms: u64,
    pub duplicate: bool,
}

/// The start of a live subscription: events after `head` arrive on `live`; those from
/// `oldest` up to `head` are in the store. `receipts` shows every member's durable receipt
/// cursors, and changes to them.
#[derive(Debug)]
pub struct Subscription {
    pub live: broadcast::Receiver<Arc<LiveEvent>>,
    pub head: Seq,
    pub oldest: Seq,
    pub receipts: watch::Receiver<ReceiptsView>,
}

/// A member's view of a conversation: its state, its last durable seq, the oldest one still
/// stored, and the member's own receipt cursors.
#[derive(Debug, Clone)]
pub struct View {
    pub record: ConversationRecord,
    pub head: Seq,
    pub oldest: Seq,
    pub receipt: ReceiptRecord,
}

#[derive(Debug)]
enum Command {
    /// A user's action: a message, a reply, an edit, a delete, a reaction.
    Act {
        sender: UserName,
        body: EventBody,
        reply: oneshot::Sender<Result<Sent, ErrorBody>>,
    },
    Receipt {
        user: UserName,
        delivered: Seq,
        read: Seq,
        reply: oneshot::Sender<Result<ReceiptRecord, ErrorBody>>,
    },
    AddMember {
        by: UserName,
        user: UserName,
        reply: oneshot::Sender<Result<Seq, ErrorBody>>,
    },
    RemoveMember {
        by: UserName,
        user: UserName,
        reply: oneshot::Sender<Result<Seq, ErrorBody>>,
    },
    Subscribe {
        user: UserName,
        reply: oneshot::Sender<Result<Subscription, ErrorBody>>,
    },
    View {
        user: UserName,
        reply: oneshot::Sender<Result<View, ErrorBody>>,
    },
    /// The user's account is being removed: it leaves, even as the creator.
    RemoveAccount {
        user: UserName,
        reply: oneshot::Sender<Result<Option<Seq>, ErrorBody>>,
    },
}

/// Count limits of conversations (`limits.max_members`, `limits.max_conversations_per_user`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConversationLimits {
    pub max_members: usize,
    pub max_conversations_per_user: usize,
}

impl Default for ConversationLimits {
    fn default() -> Self {
        ConversationLimits {
            max_members: 1024,
            max_conversations_per_user: 1000,
        }
    }
}

/// A typing signal from a member's connection. Membership is checked by the actor.
#[derive(Debug)]
struct Typing {
    user: UserName,
    typing: bool,
}

/// Where conversation actors send the typing signals they relay.
#[derive(Clone, Debug)]
pub struct TypingRelay {
    pub presence: PresenceHandle,
    /// A user's repeated `Typing` is relayed at most this often (see `typing::TypingBoard`).
    pub interval: Duration,
}

/// What every conversation actor works with besides the store.
#[derive(Clone, Debug)]
pub struct Services {
    pub relay: TypingRelay,
    /// The offline push hook, if one is configured.
    pub push: Option<PushHandle>,
    pub retention: crate::config::RetentionConfig,
}

/// The handle to one conversation's actor.
#[derive(Clone, Debug)]
pub struct ConversationHandle {
    conv: ConversationId,
    commands: mpsc::Sender<Command>,
    typing: mpsc::Sender<Typing>,
    stats: Arc<EphemeralStats>,
}

/// A reply that will come once the actor has answered (for a send: once it is durable).
pub type Pending<T> = oneshot::Receiver<Result<T, ErrorBody>>;

fn gone() -> ErrorBody {
    ErrorBody::new(ErrorCode::UNAVAILABLE, "conversation is shutting down")
}

/// Turns a pending reply into its result.
pub async fn answer<T>(pending: Pending<T>) -> Result<T, ErrorBody> {
    pending.await.unwrap_or_else(|_| Err(gone()))
}

impl ConversationHandle {
    pub fn conv(&self) -> ConversationId {
        self.conv
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, ErrorBody>>) -> Command,
    ) -> Pending<T> {
        let (reply, rx) = oneshot::channel();
        // If the actor is gone the reply sender is dropped with the command, and `answer`
        // reports it.
        let _ = self.commands.send(make(reply)).await;
        rx
    }

    /// Queues a send. Sends queued by one caller are sequenced in the order queued; the returned
    /// reply resolves once the message is durable.
    pub async fn send(&self, sender: UserName, id: ClientMessageId, text: String) -> Pending<Sent> {
        self.act(sender, EventBody::Message { id, text }).await
    }

    /// Queues a user's action (`body` is a message, a reply, an edit, a delete or a reaction),
    /// in order with sends; the reply resolves once it is durable.
    pub async fn act(&self, sender: UserName, body: EventBody) -> Pending<Sent> {
        self.ask(|reply| Command::Act {
            sender,
            body,
            reply,
        })
        .await
    }

    /// Moves `user`'s receipt cursors forward; resolves once durable.
    pub async fn receipt(
        &self,
        user: UserName,
        delivered: Seq,
        read: Seq,
    ) -> Pending<ReceiptRecord> {
        self.ask(|reply| Command::Receipt {
            user,
            delivered,
            read,
            reply,
        })
        .await
    }

    pub async fn add_member(&self, by: UserName, user: UserName) -> Pending<Seq> {
        self.ask(|reply| Command::AddMember { by, user, reply })
            .await
    }

    pub async fn remove_member(&self, by: UserName, user: UserName) -> Pending<Seq> {
        self.ask(|reply| Command::RemoveMember { by, user, reply })
            .await
    }

    pub async fn subscribe(&self, user: UserName) -> Result<Subscription, ErrorBody> {
        answer(self.ask(|reply| Command::Subscribe { user, reply }).await).await
    }

    pub async fn view(&self, user: UserName) -> Result<View, ErrorBody> {
        answer(self.ask(|reply| Command::View { user, reply }).await).await
    }

    /// Takes a user whose account is being removed out of the conversation; resolves once
    /// its `MemberRemoved` is durable (with its seq), or at once if it was not a member.
    pub async fn remove_account(&self, user: UserName) -> Result<Option<Seq>, ErrorBody> {
        answer(
            self.ask(|reply| Command::RemoveAccount { user, reply })
                .await,
        )
        .await
    }

    /// Hands a typing signal of `user` to the actor, which relays it to the other members if
    /// `user` is one. Never waits: when the actor is busy the signal is dropped and counted.
    pub fn typing(&self, user: UserName, typing: bool) {
        if self.typing.try_send(Typing { user, typing }).is_err() {
            EphemeralStats::count(&self.stats.busy);
        }
    }
}

/// Finds and starts conversation actors.
#[derive(Debug)]
pub struct Conversations {
    store: Store,
    services: Services,
    limits: ConversationLimits,
    memberships: Arc<Memberships>,
    // A short std lock: held for a map lookup (and, on a conversation's first use, two sled
    // reads), never across an await.
    actors: Mutex<HashMap<ConversationId, ConversationHandle>>,
}

impl Conversations {
    pub fn new(
        store: Store,
        services: Services,
        limits: ConversationLimits,
    ) -> Result<Self, StoreError> {
        Ok(Conversations {
            memberships: Arc::new(Memberships::new(
                store.clone(),
                limits.max_conversations_per_user,
            )),
            store,
            services,
            limits,
            actors: Mutex::new(HashMap::new()),
        })
    }

    /// The conversation's actor, started if needed; `None` if the conversation does not exist.
    pub fn get(&self, conv: ConversationId) -> Result<Option<ConversationHandle>, StoreError> {
        let mut actors = self.actors.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(handle) = actors.get(&conv) {
            if !handle.commands.is_closed() {
                return Ok(Some(handle.clone()));
            }
        }
        let Some(record) = self.store.conversation(conv)? else {
            return Ok(None);
        };
        let head = self.store.head(conv)?;
        let receipts = ReceiptBoard::load(self.store.receipts(conv)?);
        let floor = self.store.oldest(conv)?;
        let sequencer =
            Sequencer::load(conv, record, head).with_max_members(self.limits.max_members);
        let handle = self.start(sequencer, None, receipts, floor);
        actors.insert(conv, handle.clone());
        Ok(Some(handle))
    }

    /// Creates a conversation of `creator` and `invited`; resolves once its `Created` event is
    /// durable.
    pub async fn create(
        &self,
        creator: UserName,
        title: String,
        invited: Vec<UserName>,
    ) -> Result<(ConversationId, Seq), ErrorBody> {
        for user in &invited {
            let exists = self.store.user(user).map_err(store_error)?.is_some();
            if !exists {
                return Err(ErrorBody::new(
                    ErrorCode::UNKNOWN_USER,
                    format!("no user named {user}"),
                ));
            }
        }
        let mut members: Vec<&UserName> = invited.iter().chain([&creator]).collect();
        members.sort();
        members.dedup();
        if members.len() > self.limits.max_members {
            return Err(ErrorBody::new(
                ErrorCode::MEMBER_LIMIT,
                format!(
                    "{} members, the most this server allows is {}",
                    members.len(),
                    self.limits.max_members
                ),
            ));
        }
        self.memberships.try_join(&members)?;
        let joined: Vec<UserName> = members.into_iter().cloned().collect();
        let (reply, rx) = oneshot::channel();
        let conv = {
            let mut actors = self.actors.lock().unwrap_or_else(|e| e.into_inner());
            let conv = loop {
                let conv = random_conversation_id();
                let taken = actors.contains_key(&conv)
                    || self
                        .store
                        .conversation(conv)
                        .map_err(store_error)?
                        .is_some();
                if !taken {
                    break conv;
                }
            };
            let (sequencer, first) = Sequencer::create(conv, creator, title, invited, now_ms());
            let sequencer = sequencer.with_max_members(self.limits.max_members);
            let started = self.start(
                sequencer,
                Some((first, reply)),
                ReceiptBoard::default(),
                Seq(1),
            );
            actors.insert(conv, started);
            conv
        };
        match answer(rx).await {
            Ok(seq) => Ok((conv, seq)),
            Err(e) => {
                // Not created: the id must not answer as a live conversation.
                self.actors
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&conv);
                joined.iter().for_each(|user| self.memberships.leave(user));
                Err(e)
            }
        }
    }

    /// Takes `user` out of every conversation it is a member of (its account is being removed).
    pub async fn remove_account(&self, user: &UserName) -> Result<usize, ErrorBody> {
        let convs = self.store.user_conversations(user).map_err(store_error)?;
        let mut left = 0;
        for conv in convs {
            let Some(handle) = self.get(conv).map_err(store_error)? else {
                continue;
            };
            if handle.remove_account(user.clone()).await?.is_some() {
                left += 1;
            }
        }
        Ok(left)
    }

    fn start(
        &self,
        sequencer: Sequencer,
        first: Option<(sequencer::Append, oneshot::Sender<Result<Seq, ErrorBody>>)>,
        receipts: ReceiptBoard,
        floor: Seq,
    ) -> ConversationHandle {
        let conv = sequencer.conv();
        let (commands, inbox) = mpsc::channel(MAILBOX);
        let (typing, typing_inbox) = mpsc::channel(EPHEMERAL_MAILBOX);
        actor::spawn(actor::Start {
            sequencer,
            store: self.store.clone(),
            inbox,
            typing_inbox,
            services: self.services.clone(),
            memberships: self.memberships.clone(),
            first,
            receipts,
            floor,
        });
        ConversationHandle {
            conv,
            commands,
            typing,
            stats: self.services.relay.presence.stats().clone(),
        }
    }
}

/// A new conversation id: random, so ids say nothing about how many conversations exist and
/// cannot be enumerated; below 2^53 so that they survive JSON numbers in any language.
fn random_conversation_id() -> ConversationId {
    ConversationId(rand::random_range(1..(1u64 << 53)))
}

/// How a store failure is told to a client: retry later, with the same message id.
///
/// Logged once, then once a minute with the count of the ones in between: a failed store fails
/// every request after it (the writer has logged the cause), and clients retry. Every one is
/// counted in `quipd_store_failures_total`.
pub fn store_error(e: StoreError) -> ErrorBody {
    // One filter for the process: a store failure is the process's, not one conversation's.
    static REPEATS: std::sync::LazyLock<Mutex<Repeats>> =
        std::sync::LazyLock::new(|| Mutex::new(Repeats::new(Duration::from_secs(60))));
    crate::metrics::store_failure();
    let message = e.to_string();
    let admitted = REPEATS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .admit(&message, std::time::Instant::now());
    match admitted {
        Some(0) => tracing::error!(error = %message, "store failure; answering UNAVAILABLE"),
        Some(repeats) => tracing::error!(
            error = %message,
            repeats,
            "store failure, again; answering UNAVAILABLE"
        ),
        None => {}
    }
    ErrorBody {
        code: ErrorCode::UNAVAILABLE,
        message: "the server cannot store messages right now; retry later".into(),
        retry_after_ms: Some(1000),
    }
}
