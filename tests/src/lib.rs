//! quip-tests: the harness of quip's end-to-end tests.
//!
//! Everything here is real: the daemon listens on loopback QUIC and writes a sled store in a
//! temporary directory, clients verify the daemon's certificate against the CA it generated.
//!
//! - [`TestServer`]: the daemon in the test's own process (`quipd::Server`), on a fresh data
//!   directory; users are added through its admin socket.
//! - [`binaries`], [`DaemonProcess`], [`Quip`]: the real `quipd` and `quip` executables, built
//!   once per test process; a daemon that can be SIGKILLed and restarted on the same data.
//! - [`load_corpus`]: multilingual dialog text, from `QUIP_CORPUS` or the project's fixture.
//! - [`check`]: helpers that read events and history and compare them with clear messages.
//! - [`hook`]: a loopback HTTP server standing in for a push gateway.
//!
//! Every wait has a deadline ([`within`]), so a bug fails a test instead of hanging it; failures
//! are panics that say what was expected and what happened.

pub mod check;
mod corpus;
pub mod hook;
mod process;
pub mod relay;
mod server;

use std::fmt::Display;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

pub use corpus::{
    corpus_dir, corpus_or_fixture_languages, fixture_path, load_corpus, parse_conversations,
    Conversation, FIXTURE_LANGUAGE,
};
pub use process::{
    binaries, free_tcp_port, free_udp_port, scrape_metrics, Binaries, CliOutput, DaemonProcess,
    Quip,
};
pub use server::TestServer;

/// The deadline of one step that should take well under a second (a request, a connect).
pub const STEP: Duration = Duration::from_secs(30);
/// The deadline of a bulk step (thousands of messages, a process run).
pub const BULK: Duration = Duration::from_secs(120);

/// Awaits `future`, panicking with `what` if it takes longer than [`STEP`].
pub async fn within<F: Future>(what: impl Display, future: F) -> F::Output {
    within_for(STEP, what, future).await
}

/// Awaits `future`, panicking with `what` if it takes longer than `limit`.
pub async fn within_for<F: Future>(limit: Duration, what: impl Display, future: F) -> F::Output {
    match tokio::time::timeout(limit, future).await {
        Ok(output) => output,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

/// The workspace root (the parent of this crate's manifest directory).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .expect("the tests crate lives inside the workspace")
        .to_path_buf()
}

/// A user name that must be valid.
pub fn user(name: &str) -> quip_client::UserName {
    name.parse()
        .unwrap_or_else(|e| panic!("test user name {name:?} is invalid: {e}"))
}

/// A fresh temporary directory for one test's data.
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("quip-e2e-")
        .tempdir()
        .expect("creating a temporary directory for the test")
}
