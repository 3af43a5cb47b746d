//! The frame decoder: arbitrary bytes, split into arbitrary chunks, decoded as any frame type
//! of the protocol (and as datagrams). It must never panic or allocate for a length it has not
//! received; every frame it does decode must encode back to a frame that decodes the same.

#![no_main]

use libfuzzer_sys::fuzz_target;
use quip_protocol::{
    decode_datagram, encode_frame, ClientDatagram, ClientFrame, DeliveryFrame, FrameDecoder,
    ServerDatagram, ServerFrame,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

fuzz_target!(|data: &[u8]| {
    let Some((&control, bytes)) = data.split_first() else {
        return;
    };
    // Low bits: the frame type; high bits: the chunk size and the frame limit.
    let chunk = 1 + usize::from(control >> 3);
    let max_len = if control & 0x04 == 0 { 64 } else { 1 << 20 };
    match control & 0x03 {
        0 => frames::<ClientFrame>(bytes, chunk, max_len),
        1 => frames::<ServerFrame>(bytes, chunk, max_len),
        2 => frames::<DeliveryFrame>(bytes, chunk, max_len),
        _ => {
            let _ = decode_datagram::<ClientDatagram>(bytes);
            let _ = decode_datagram::<ServerDatagram>(bytes);
        }
    }
});

fn frames<T>(bytes: &[u8], chunk: usize, max_len: u32)
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let mut decoder = FrameDecoder::new(max_len);
    for piece in bytes.chunks(chunk) {
        decoder.push(piece);
        loop {
            match decoder.next_frame::<T>() {
                Ok(Some(frame)) => round_trip(&frame, max_len),
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(decoder.pending_len() <= max_len as usize + 4 + chunk);
    }
    let _ = decoder.finish();
}

fn round_trip<T>(frame: &T, max_len: u32)
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let encoded = encode_frame(frame, max_len).expect("a decoded frame fits its own limit");
    let mut again = FrameDecoder::new(max_len);
    again.push(&encoded);
    let decoded: T = again
        .next_frame()
        .expect("re-encoded frame decodes")
        .expect("complete");
    assert_eq!(&decoded, frame);
}
