//! Replay reads from the store, on both engines: what a reconnecting member's catch-up costs
//! the daemon before the network.
//!
//! `cargo bench -p quipd --bench store`

#![allow(clippy::unwrap_used)] // measuring code

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use quip_protocol::{ClientMessageId, ConversationId, EventBody, Seq, UserName};
use quipd::store::{BackendKind, Store, StoreConfig, StoredEvent, WriteBatch};

/// Events in the replayed conversation.
const EVENTS: u64 = 100_000;
/// A delivery task reads the store in pages of this many events.
const PAGE: usize = 256;
const CONV: ConversationId = ConversationId(77);

fn filled_store(
    dir: &std::path::Path,
    backend: BackendKind,
    runtime: &tokio::runtime::Runtime,
) -> Store {
    let store = Store::open(&StoreConfig {
        path: dir.to_owned(),
        cache_bytes: 64 * 1024 * 1024,
        backend,
    })
    .unwrap();
    let text: String = "the quick brown fox jumps over the lazy dog; "
        .chars()
        .cycle()
        .take(100)
        .collect();
    let sender = UserName("alice-1234".into());
    runtime.block_on(async {
        for chunk in (1..=EVENTS).collect::<Vec<_>>().chunks(5000) {
            let mut batch = WriteBatch::new();
            for &seq in chunk {
                let mut id = [0u8; 16];
                id[8..].copy_from_slice(&seq.to_be_bytes());
                let event = StoredEvent {
                    sender: sender.clone(),
                    at_ms: 1_700_000_000_000 + seq,
                    body: EventBody::Message {
                        id: ClientMessageId(id),
                        text: text.clone(),
                    },
                };
                batch.append_event(CONV, Seq(seq), &event);
                batch.remember_message_id(CONV, ClientMessageId(id), &sender, Seq(seq));
            }
            store.commit(batch).await.unwrap();
        }
    });
    store
}

fn replay(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    for backend in [BackendKind::Sled, BackendKind::Fjall] {
        let dir = tempfile::tempdir().unwrap();
        let store = filled_store(dir.path(), backend, &runtime);
        let mut group = c.benchmark_group(format!("replay/{backend}"));
        group.sample_size(20);
        group.throughput(Throughput::Elements(PAGE as u64));
        let mut at = 0u64;
        group.bench_function("one page of 256 events", |b| {
            b.iter(|| {
                let page = store.events_after(CONV, Seq(at), PAGE).unwrap();
                assert_eq!(page.len(), PAGE);
                at = (at + PAGE as u64) % (EVENTS - PAGE as u64);
            })
        });
        group.throughput(Throughput::Elements(EVENTS));
        // Page by page, as a delivery stream replays.
        group.bench_function("the whole conversation, 100000 events", |b| {
            b.iter(|| {
                let (mut n, mut after) = (0u64, Seq::ZERO);
                loop {
                    let page = store.events_after(CONV, after, PAGE).unwrap();
                    let Some(last) = page.last() else { break };
                    after = last.seq;
                    n += page.len() as u64;
                    std::hint::black_box(&page);
                }
                assert_eq!(n, EVENTS);
            })
        });
        group.finish();
    }
}

criterion_group!(benches, replay);
criterion_main!(benches);
