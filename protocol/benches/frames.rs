//! Frame encode and decode: what every send and every delivery costs in CPU.
//!
//! `cargo bench -p quip-protocol --bench frames`

#![allow(clippy::unwrap_used)] // measuring code

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use quip_protocol::{
    decode_exact, encode_frame, encode_frame_into, limits, ClientFrame, ClientMessageId,
    ConversationId, DeliveryFrame, Event, EventBody, EventFrame, FrameDecoder, Request, RequestId,
    Seq, UserName, LENGTH_PREFIX_LEN,
};

fn text() -> String {
    "the quick brown fox jumps over the lazy dog; "
        .chars()
        .cycle()
        .take(100)
        .collect()
}

fn event(seq: u64) -> Event {
    Event {
        seq: Seq(seq),
        sender: UserName("alice-1234".into()),
        at_ms: 1_700_000_000_000 + seq,
        body: EventBody::Message {
            id: ClientMessageId([7; 16]),
            text: text(),
        },
    }
}

fn send(id: u64) -> ClientFrame {
    ClientFrame::Request {
        id: RequestId(id),
        request: Request::Send {
            conv: ConversationId(0x1f_ffff_ffff_ffff),
            id: ClientMessageId([9; 16]),
            text: text(),
        },
    }
}

fn frames(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame");
    group.throughput(Throughput::Elements(1));
    let delivery = DeliveryFrame::Event(event(123_456));
    group.bench_function("encode delivery event", |b| {
        b.iter(|| encode_frame(&delivery, limits::MAX_FRAME_LEN).unwrap())
    });
    let encoded = encode_frame(&delivery, limits::MAX_FRAME_LEN).unwrap();
    group.bench_function("decode delivery event", |b| {
        b.iter(|| decode_exact::<DeliveryFrame>(&encoded[LENGTH_PREFIX_LEN..]).unwrap())
    });
    let request = send(42);
    group.bench_function("encode send request", |b| {
        b.iter(|| encode_frame(&request, limits::MAX_FRAME_LEN).unwrap())
    });
    let encoded = encode_frame(&request, limits::MAX_FRAME_LEN).unwrap();
    group.bench_function("decode send request", |b| {
        b.iter(|| decode_exact::<ClientFrame>(&encoded[LENGTH_PREFIX_LEN..]).unwrap())
    });
    group.finish();

    // A stream of 1000 delivery frames arriving in QUIC-sized chunks.
    let mut stream = Vec::new();
    for seq in 0..1000 {
        stream.extend_from_slice(
            &encode_frame(&DeliveryFrame::Event(event(seq)), limits::MAX_FRAME_LEN).unwrap(),
        );
    }
    let mut group = c.benchmark_group("decoder");
    group.throughput(Throughput::Elements(1000));
    group.bench_function("1000 delivery frames in 1200-byte chunks", |b| {
        b.iter_batched(
            || FrameDecoder::new(limits::MAX_FRAME_LEN),
            |mut decoder| {
                let mut n = 0;
                for chunk in stream.chunks(1200) {
                    decoder.push(chunk);
                    while let Some(frame) = decoder.next_frame::<DeliveryFrame>().unwrap() {
                        std::hint::black_box(frame);
                        n += 1;
                    }
                }
                assert_eq!(n, 1000);
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// One message to 100 members' delivery buffers: encoded for each member from a copy of the
/// event (what the daemon did before), or encoded once and the bytes copied.
fn fanout(c: &mut Criterion) {
    const MEMBERS: usize = 100;
    let event = event(99);
    let mut buffers: Vec<Vec<u8>> = (0..MEMBERS).map(|_| Vec::with_capacity(1 << 20)).collect();
    let mut group = c.benchmark_group("fan-out of one event to 100 members");
    group.throughput(Throughput::Elements(MEMBERS as u64));
    group.bench_function("copy and encode per member", |b| {
        b.iter(|| {
            for out in &mut buffers {
                out.clear();
                let frame = DeliveryFrame::Event(event.clone());
                out.extend_from_slice(&encode_frame(&frame, limits::MAX_FRAME_LEN).unwrap());
            }
        })
    });
    group.bench_function("encode once, share the bytes", |b| {
        b.iter(|| {
            let mut shared = Vec::new();
            encode_frame_into(&EventFrame(&event), &mut shared, limits::MAX_FRAME_LEN).unwrap();
            for out in &mut buffers {
                out.clear();
                out.extend_from_slice(&shared);
            }
        })
    });
    group.finish();
}

criterion_group!(benches, frames, fanout);
criterion_main!(benches);
