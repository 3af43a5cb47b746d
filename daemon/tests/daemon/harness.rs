//! What the tests share: the daemon in this process ([`Daemon`]), raw QUIC connections to it
//! ([`quic`]), and the `quipd` executable ([`process`]).

mod daemon;
pub mod process;
pub mod quic;

use std::time::Duration;

use quip_protocol::{encode_frame, ClientFrame, ErrorCode, UserName};

pub use daemon::Daemon;

/// How long a test waits for the daemon in this process to answer, connect or stop.
pub const WAIT: Duration = Duration::from_secs(20);

/// Logs of the code in this process (the daemon, the SDK) go to the test's output, filtered by
/// `RUST_LOG`. The subscriber is global to the binary: every start of a daemon (in this process
/// or a child) installs the same one, so what a test logs does not depend on which ran first.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// `value` framed with no frame limit, so that tests can build frames a client must not send.
pub fn frame(value: &ClientFrame) -> Vec<u8> {
    encode_frame(value, u32::MAX).unwrap()
}

/// `c` as a QUIC close code.
pub fn code(c: ErrorCode) -> u64 {
    u64::from(c.0)
}

pub fn name(s: &str) -> UserName {
    s.parse().unwrap()
}

/// A new conversation of `client`'s alone, holding `messages` messages of `text_len` bytes:
/// history pages of about a frame each, for tests of what large answers cost.
pub async fn large_conversation(
    client: &quip_client::Client,
    messages: usize,
    text_len: usize,
) -> quip_protocol::ConversationId {
    let conv = client.create_conversation("large", &[]).await.unwrap();
    let text = "x".repeat(text_len);
    for _ in 0..messages {
        client.send(conv, text.clone()).await.unwrap();
    }
    conv
}
