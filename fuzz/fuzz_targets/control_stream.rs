//! The daemon's handling of a frame sequence on one control stream: arbitrary bytes, in
//! arbitrary chunks and with or without a FIN, go through the daemon's own sans-IO control
//! stream (Hello first and once, validation, the configured message size), and every request
//! that comes out acts on real sequencers (membership rules, idempotent sends, gap-free seqs)
//! behind the daemon's send rate gate, with time as an input. Nothing may panic, and every seq
//! assigned must follow the one before.

#![no_main]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use quip_protocol::{ConversationId, EventBody, Request, Seq, UserName};
use quipd::control::{ControlStream, Step};
use quipd::conversation::sequencer::{Appended, Sequencer, StoredId, TargetInfo, TargetLookup};
use quipd::rate_limit::{Gate, SendGate, TokenBucket};

fuzz_target!(|data: &[u8]| {
    let Some((&control, bytes)) = data.split_first() else {
        return;
    };
    let chunk = 1 + usize::from(control >> 2);
    let fin = control & 0x01 == 1;
    let mut stream = ControlStream::new(1 << 20, if control & 0x02 == 0 { 64 } else { 65_536 });
    let mut session = Session::new();
    let mut closed = false;
    for piece in bytes.chunks(chunk) {
        stream.push(piece);
        closed |= session.drain(&mut stream);
        if closed {
            return;
        }
    }
    if fin {
        stream.finish();
        session.drain(&mut stream);
    }
});

struct Session {
    user: Option<UserName>,
    conversations: HashMap<ConversationId, Sequencer>,
    /// What the store would answer about a message: its author and current state.
    messages: HashMap<(ConversationId, Seq), TargetInfo>,
    next_conv: u64,
    gate: SendGate,
    bucket: TokenBucket,
    start: Instant,
    steps: u32,
}

impl Session {
    fn new() -> Self {
        let start = Instant::now();
        Session {
            user: None,
            conversations: HashMap::new(),
            messages: HashMap::new(),
            next_conv: 1,
            gate: SendGate::default(),
            bucket: TokenBucket::new(100, 10, start),
            start,
            steps: 0,
        }
    }

    /// Handles every step the bytes so far make; true once the stream is closed.
    fn drain(&mut self, stream: &mut ControlStream) -> bool {
        while let Some(step) = stream.poll_step() {
            self.steps += 1;
            match step {
                Step::Hello { token, .. } => {
                    // Any token "authenticates" as a fixed user: the rules after Hello are
                    // what is fuzzed here, not the store.
                    let _ = token;
                    self.user = Some("alice".parse().expect("valid"));
                }
                Step::Request { request, .. } => self.request(request),
                Step::Refused { error, .. } => assert!(error.code.0 >= 300),
                Step::End | Step::Close(_) => return true,
            }
        }
        false
    }

    fn request(&mut self, request: Request) {
        let user = self.user.clone().expect("requests come only after Hello");
        let now = self.start + Duration::from_millis(u64::from(self.steps) * 7);
        match request {
            Request::CreateConversation { title, members } => {
                let conv = ConversationId(self.next_conv);
                self.next_conv += 1;
                let (sequencer, first) = Sequencer::create(conv, user, title, members, 0);
                assert_eq!(first.event.seq, Seq(1));
                self.conversations
                    .insert(conv, sequencer.with_max_members(8));
            }
            Request::Send { conv, id, text } => {
                if self.gate.admit(conv, id, &mut self.bucket, now) != Gate::Pass {
                    return;
                }
                self.act(conv, &user, EventBody::Message { id, text });
            }
            Request::SendReply {
                conv,
                id,
                text,
                reply_to,
            } => self.gated_act(conv, &user, now, EventBody::Reply { id, text, reply_to }),
            Request::Edit {
                conv,
                id,
                target,
                text,
            } => self.gated_act(conv, &user, now, EventBody::Edited { id, target, text }),
            Request::Delete { conv, id, target } => {
                self.gated_act(conv, &user, now, EventBody::Deleted { id, target })
            }
            Request::React {
                conv,
                id,
                target,
                emoji,
            } => self.gated_act(
                conv,
                &user,
                now,
                EventBody::ReactionAdded { id, target, emoji },
            ),
            Request::Unreact {
                conv,
                id,
                target,
                emoji,
            } => self.gated_act(
                conv,
                &user,
                now,
                EventBody::ReactionRemoved { id, target, emoji },
            ),
            Request::AddMember { conv, user: added } => {
                let Some(sequencer) = self.conversations.get_mut(&conv) else {
                    return;
                };
                let before = sequencer.assigned();
                match sequencer.add_member(&user, added, true, |_| Ok(()), 0) {
                    Ok(append) => assert_eq!(append.event.seq, before.next()),
                    Err(_) => assert_eq!(sequencer.assigned(), before),
                }
            }
            Request::RemoveMember {
                conv,
                user: removed,
            } => {
                let Some(sequencer) = self.conversations.get_mut(&conv) else {
                    return;
                };
                let before = sequencer.assigned();
                match sequencer.remove_member(&user, removed, 0) {
                    Ok(append) => assert_eq!(append.event.seq, before.next()),
                    Err(_) => assert_eq!(sequencer.assigned(), before),
                }
            }
            Request::History { .. }
            | Request::Subscribe { .. }
            | Request::Unsubscribe { .. }
            | Request::ListConversations
            | Request::Presence
            | Request::SetAway { .. }
            | Request::MarkRead { .. }
            | Request::MarkDelivered { .. }
            | Request::Inbox
            | Request::Page { .. } => {}
        }
    }

    fn gated_act(&mut self, conv: ConversationId, user: &UserName, now: Instant, body: EventBody) {
        let id = body.client_id().expect("a user action carries a client id");
        if self.gate.admit(conv, id, &mut self.bucket, now) == Gate::Pass {
            self.act(conv, user, body);
        }
    }

    /// A message or an action on one, through the sequencer's rules, made durable at once.
    fn act(&mut self, conv: ConversationId, user: &UserName, body: EventBody) {
        let Some(sequencer) = self.conversations.get_mut(&conv) else {
            return;
        };
        let target = body.target().map(|at| {
            match sequencer
                .pending_target(at)
                .or_else(|| self.messages.get(&(conv, at)))
            {
                Some(info) => TargetLookup::Message(info.clone()),
                None => TargetLookup::Missing,
            }
        });
        let before = sequencer.assigned();
        match sequencer.act(user, body, StoredId::Unknown, target, 0) {
            Ok(Appended::New(append)) => {
                let seq = append.event.seq;
                assert_eq!(seq, before.next());
                if let Some(info) = sequencer.pending_target(seq) {
                    self.messages.insert((conv, seq), info.clone());
                }
                if let Some(at) = append.event.body.target() {
                    if let Some(info) = sequencer.pending_target(at) {
                        self.messages.insert((conv, at), info.clone());
                    }
                }
                sequencer.durable(&append.event);
            }
            Ok(Appended::Duplicate(seq)) => assert!(seq <= before),
            Err(_) => assert_eq!(sequencer.assigned(), before),
        }
    }
}
