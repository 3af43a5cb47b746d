//! The sequencer's batch append: assigning seqs to a batch of sends and encoding their store
//! writes (CPU only), and the same batch made durable by the store writer on each engine
//! (one group commit, with its real fdatasync).
//!
//! `cargo bench -p quipd --bench sequencer`

#![allow(clippy::unwrap_used)] // measuring code

use std::collections::BTreeSet;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use quip_protocol::{ClientMessageId, ConversationId, Event, Seq, UserName};
use quipd::conversation::sequencer::{Appended, Sequencer, StoredId};
use quipd::store::{BackendKind, ConversationRecord, Store, StoreConfig, WriteBatch};

/// Sends in one batch: what a busy conversation actor folds into one commit.
const BATCH: u64 = 64;

fn sequencer() -> (Sequencer, UserName) {
    let alice = UserName("alice-1234".into());
    let record = ConversationRecord {
        title: "bench".into(),
        creator: alice.clone(),
        members: BTreeSet::from([alice.clone(), UserName("bob".into())]),
        created_at_ms: 0,
    };
    (Sequencer::load(ConversationId(77), record, Seq(1)), alice)
}

/// Sequences one batch of sends; returns the writes and the events, as the actor does.
fn append_batch(
    s: &mut Sequencer,
    alice: &UserName,
    text: &str,
    next: &mut u64,
) -> (WriteBatch, Vec<Event>) {
    let mut writes = WriteBatch::new();
    let mut events = Vec::with_capacity(BATCH as usize);
    for _ in 0..BATCH {
        *next += 1;
        let mut id = [0u8; 16];
        id[8..].copy_from_slice(&next.to_be_bytes());
        match s.send(
            alice,
            ClientMessageId(id),
            text.to_owned(),
            StoredId::Unknown,
            1_700_000_000_000,
        ) {
            Ok(Appended::New(append)) => {
                writes.extend(append.writes);
                events.push(append.event);
            }
            other => panic!("expected a new append, got {other:?}"),
        }
    }
    (writes, events)
}

fn batch_append(c: &mut Criterion) {
    let text: String = "the quick brown fox jumps over the lazy dog; "
        .chars()
        .cycle()
        .take(100)
        .collect();
    let mut group = c.benchmark_group("sequencer");
    group.throughput(Throughput::Elements(BATCH));
    let (mut s, alice) = sequencer();
    let mut next = 0;
    group.bench_function("sequence a batch of 64 sends", |b| {
        b.iter(|| {
            let (writes, events) = append_batch(&mut s, &alice, &text, &mut next);
            for event in &events {
                s.durable(event);
            }
            std::hint::black_box(writes);
        })
    });
    group.finish();

    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    for backend in [BackendKind::Sled, BackendKind::Fjall] {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&StoreConfig {
            path: dir.path().to_owned(),
            cache_bytes: 64 * 1024 * 1024,
            backend,
        })
        .unwrap();
        let mut group = c.benchmark_group(format!("group commit/{backend}"));
        group.sample_size(20);
        group.throughput(Throughput::Elements(BATCH));
        let (mut s, alice) = sequencer();
        let mut next = 0;
        group.bench_function("sequence and make durable 64 sends", |b| {
            b.iter(|| {
                let (writes, events) = append_batch(&mut s, &alice, &text, &mut next);
                runtime.block_on(store.commit(writes)).unwrap();
                for event in &events {
                    s.durable(event);
                }
            })
        });
        group.finish();
    }
}

criterion_group!(benches, batch_append);
criterion_main!(benches);
