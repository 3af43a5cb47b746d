//! Reading events and comparing them, with failure messages that say where and what.

use std::time::Duration;

use quip_client::{Client, ClientError, ConversationId, Event, EventBody, Seq, Subscription};
use tokio::time::Instant;

use crate::within;

/// A message as the tests compare it: where it is, who wrote it, its exact text.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Msg {
    pub seq: u64,
    pub sender: String,
    pub text: String,
}

impl Msg {
    pub fn new(seq: u64, sender: &str, text: &str) -> Msg {
        Msg {
            seq,
            sender: sender.to_owned(),
            text: text.to_owned(),
        }
    }
}

/// The message an event carries, if it is one.
pub fn message(event: &Event) -> Option<Msg> {
    match &event.body {
        EventBody::Message { text, .. } => Some(Msg::new(event.seq.0, event.sender.as_str(), text)),
        _ => None,
    }
}

/// The messages among `events`, in order.
pub fn messages(events: &[Event]) -> Vec<Msg> {
    events.iter().filter_map(message).collect()
}

/// The text of a message event.
pub fn text(event: &Event) -> Option<&str> {
    match &event.body {
        EventBody::Message { text, .. } => Some(text),
        _ => None,
    }
}

/// A one-line description of an event, its text cut to 80 characters.
pub fn describe(event: &Event) -> String {
    let body = match &event.body {
        EventBody::Message { text, .. } => format!("message {:?}", cut(text)),
        other => format!("{other:?}"),
    };
    format!("#{} by {}: {body}", event.seq, event.sender)
}

fn cut(text: &str) -> String {
    let mut cut: String = text.chars().take(80).collect();
    if cut.len() < text.len() {
        cut.push('…');
    }
    cut
}

/// Panics at the first difference between two message lists.
pub fn assert_same_messages(what: &str, expected: &[Msg], actual: &[Msg]) {
    for (i, (want, got)) in expected.iter().zip(actual).enumerate() {
        assert!(
            want == got,
            "{what}: message {i} differs\n  expected seq {} by {}: {:?}\n  got      seq {} by {}: {:?}",
            want.seq,
            want.sender,
            cut(&want.text),
            got.seq,
            got.sender,
            cut(&got.text),
        );
    }
    assert_eq!(
        expected.len(),
        actual.len(),
        "{what}: {} messages expected, {} found (the first {} agree)",
        expected.len(),
        actual.len(),
        expected.len().min(actual.len())
    );
}

/// Panics unless `seqs` are `first, first+1, ...` with no gap and no repeat.
pub fn assert_consecutive(what: &str, seqs: impl IntoIterator<Item = u64>, first: u64) {
    for (i, seq) in seqs.into_iter().enumerate() {
        let want = first + i as u64;
        assert_eq!(
            seq, want,
            "{what}: position {i} holds seq {seq}, expected {want} (a gap, a duplicate or a reorder)"
        );
    }
}

/// The next event of a subscription; panics on an error, on the end or after [`crate::STEP`].
pub async fn next_event(subscription: &mut Subscription, what: &str) -> Event {
    match within(
        format_args!("{what}: waiting for an event"),
        subscription.next(),
    )
    .await
    {
        Some(Ok(event)) => event,
        Some(Err(e)) => panic!("{what}: the subscription failed: {e}"),
        None => panic!("{what}: the subscription ended"),
    }
}

/// The next `n` events of a subscription, all within `limit`.
pub async fn collect_events(
    subscription: &mut Subscription,
    n: usize,
    limit: Duration,
    what: &str,
) -> Vec<Event> {
    let deadline = Instant::now() + limit;
    let mut events = Vec::with_capacity(n);
    while events.len() < n {
        match tokio::time::timeout_at(deadline, subscription.next()).await {
            Ok(Some(Ok(event))) => events.push(event),
            Ok(Some(Err(e))) => panic!(
                "{what}: the subscription failed after {} of {n} events: {e}",
                events.len()
            ),
            Ok(None) => panic!(
                "{what}: the subscription ended after {} of {n} events",
                events.len()
            ),
            Err(_) => panic!(
                "{what}: only {} of {n} events within {limit:?}; the last: {}",
                events.len(),
                events.last().map_or("none".into(), describe)
            ),
        }
    }
    events
}

/// The outcome of the next subscription item, whatever it is (for tests of its end).
pub async fn next_item(
    subscription: &mut Subscription,
    what: &str,
) -> Option<Result<Event, ClientError>> {
    within(
        format_args!("{what}: waiting for the subscription"),
        subscription.next(),
    )
    .await
}

/// The whole history of a conversation, read newest page first with `before`, 1000 events per
/// page. Checks that the pages join up and that the seqs are 1..=head.
pub async fn full_history(client: &Client, conv: ConversationId) -> Vec<Event> {
    let (mut all, head) = within(
        format_args!("history of {conv}"),
        client.history(conv, None, 1000),
    )
    .await
    .unwrap_or_else(|e| panic!("history of conversation {conv}: {e}"));
    assert_eq!(
        all.last().map(|e| e.seq),
        Some(head),
        "history of {conv}: the newest page does not end at the head it reports"
    );
    while let Some(first) = all.first().map(|e| e.seq) {
        if first == Seq(1) {
            break;
        }
        let (page, _) = within(
            format_args!("history of {conv} before {first}"),
            client.history(conv, Some(first), 1000),
        )
        .await
        .unwrap_or_else(|e| panic!("history of conversation {conv} before {first}: {e}"));
        assert_eq!(
            page.last().map(|e| e.seq.next()),
            Some(first),
            "history of {conv}: the page before {first} does not end right before it"
        );
        all.splice(0..0, page);
    }
    assert_consecutive(
        &format!("history of conversation {conv}"),
        all.iter().map(|e| e.seq.0),
        1,
    );
    all
}

/// Panics at the first difference between two event lists (seq, sender, time, body).
pub fn assert_same_events(what: &str, expected: &[Event], actual: &[Event]) {
    for (i, (want, got)) in expected.iter().zip(actual).enumerate() {
        assert!(
            want == got,
            "{what}: event {i} differs\n  expected {want:?}\n  got      {got:?}"
        );
    }
    assert_eq!(
        expected.len(),
        actual.len(),
        "{what}: {} events expected, {} found (the first {} agree)",
        expected.len(),
        actual.len(),
        expected.len().min(actual.len())
    );
}
