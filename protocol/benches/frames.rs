//! Frame encode and decode: what every send and every delivery costs in CPU.
//!
//! `cargo bench -p quip-protocol --bench frames`

#![allow(clippy::unwrap_used)] // measuring code

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use quip_protocol::{
    decode_exact, encode_frame, limits, ClientFrame, ClientMessageId, ConversationId,
    DeliveryFrame, Event, EventBody, FrameDecoder, Request, RequestId, Seq, UserName,
    LENGTH_PREFIX_LEN,
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

criterion_group!(benches, frames);
criterion_main!(benches);
