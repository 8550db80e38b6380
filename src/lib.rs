//! straycat: a small synchronous WebSocket chat server for low-resource devices, speaking
//! the Cheshire Cat 1.x chat protocol, whose sessions survive any disconnect.
//!
//! # Layout
//! - [`config`]: every option, its default and its `STRAYCAT_*` variable, each written once
//!   (`config/opts.rs`).
//! - `protocol`: the wire format: user ids, client messages, the JSON frames sent back.
//! - `http`: the request head: parsing, routing, HTTP answers.
//! - `session`: a user's conversation (`session/mod.rs`) and the session table
//!   (`session/table.rs`: routing, expiry, the cap, budgets; effects out); pure logic.
//! - [`agent`]: the [`Agent`] trait that answers turns, and the built-in echo agent.
//! - `workers`: the thread pool that runs agents, and the waker that brings results back.
//! - `conn`: one connection: its phases (`conn/mod.rs`), the WebSocket with its
//!   unsent-bytes accounting (`conn/ws.rs`), the counting socket (`conn/counted.rs`), the
//!   heartbeat (`conn/heartbeat.rs`, pure).
//! - `timer`: the deadline heap the event loop and the session table sleep on.
//! - [`server`]: the event loop: the loop and shutdown (`server/mod.rs`), accepting and
//!   the HTTP phase (`accept.rs`), socket I/O (`io.rs`), the session table's effects
//!   (`effects.rs`), deadlines (`timers.rs`).
//! - [`systemd`]: readiness and watchdog notifications, socket activation, the journal.
//! - [`logging`]: log set-up for a terminal or the journal.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod agent;
pub mod config;
mod conn;
mod http;
pub mod logging;
mod protocol;
pub mod server;
mod session;
pub mod systemd;
mod timer;
mod workers;

pub use agent::{Agent, AgentError, EchoAgent, Turn, TurnOutput};
pub use config::Config;
pub use protocol::UserId;
pub use server::{Server, ShutdownHandle};
