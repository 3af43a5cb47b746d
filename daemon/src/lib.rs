//! quipd: the quip messaging daemon.
//!
//! Layers, from the network inwards: [`server`] accepts QUIC connections; [`session`] serves
//! one connection (control stream, delivery streams via [`delivery`]); [`conversation`] runs
//! one sequencer actor per conversation; [`store`] makes everything durable. [`presence`] owns
//! who is online and sends the ephemeral DATAGRAMs (typing, presence), which are never stored.
//! [`push`] calls the offline push hook.
//! [`accounts`] and [`admin`] manage users, their devices and backups; [`connected`] knows
//! which devices are connected, so that a revocation closes their connections at once.
//! [`control`] is the control stream's rules without IO. [`config`] reads the configuration file
//! and [`metrics`] names what the Prometheus endpoint serves; [`repeats`] keeps an error that
//! repeats per request to one log line.

pub mod accounts;
pub mod admin;
pub mod config;
pub mod connected;
pub mod control;
pub mod conversation;
pub mod delivery;
pub mod metrics;
pub mod presence;
pub mod push;
pub mod rate_limit;
pub mod repeats;
pub mod server;
pub mod session;
pub mod store;
mod wire;

pub use server::{Server, ServerConfig};
