//! End-to-end tests of quip: the real daemon and real clients over real QUIC on loopback, with a
//! real sled store on disk. No mocks. The harness is the `quip_tests` crate (`tests/src`).
//!
//! Text comes from the corpus named by `QUIP_CORPUS` (one folder per language), or from
//! `tests/fixtures/multilingual.yml` when it is unset.
//!
//! Each test has its own temporary data directory and its own ports, so they run in parallel.

mod access;
mod auth;
mod authorization;
mod bench;
mod chat;
mod cli;
mod cli_robustness;
mod corpus;
mod cursor;
mod devices;
mod durability;
mod faults;
mod flood;
mod idempotency;
mod limits;
mod membership;
mod ordering;
mod resume;
mod slow_reader;
mod torture;
