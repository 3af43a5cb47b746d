//! The daemon's integration tests, in one binary: one link instead of one per file. Each test
//! starts its own daemon (in this process, or the `quipd` executable) with its own temporary
//! data directory and ports, so they run in parallel. What they share is in [`harness`].
//!
//! `cargo test -p quipd --test daemon identity::` runs one module's tests.

#![allow(clippy::unwrap_used)] // test harness code: a failed unwrap is a failed test

mod harness;

mod commands;
mod crash_resume;
mod hostile_peers;
mod identity;
mod malformed_frames;
mod operations;
mod presence;
