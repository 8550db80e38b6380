//! straycat: a small synchronous WebSocket chat server for low-resource devices, speaking
//! the Cheshire Cat 1.x chat protocol, whose sessions survive any disconnect.
//!
//! # Layout
//! - [`config`]: every option, its default and its `STRAYCAT_*` variable.
//! - [`protocol`]: the wire format: user ids, client messages, the JSON frames sent back.
//! - [`http`]: the request head: parsing, routing, HTTP answers.
//! - [`session`]: a user's conversation, held frames, turns and resume rules; pure logic.
//! - [`agent`]: the [`Agent`] trait that answers turns, and the built-in echo agent.
//! - [`workers`]: the thread pool that runs agents, and the waker that brings results back.
//! - [`conn`]: one connection's bytes: handshake, WebSocket, close.
//! - [`timer`]: the deadline heap the event loop sleeps on.
//! - [`server`]: the event loop that ties them together (accepting and the HTTP phase,
//!   messages and frames, deadlines, each in a file of its own).
//! - [`systemd`]: readiness and watchdog notifications, socket activation, the journal.
//! - [`logging`]: log set-up for a terminal or the journal.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod agent;
pub mod config;
pub mod conn;
pub mod http;
pub mod logging;
pub mod protocol;
pub mod server;
pub mod session;
pub mod systemd;
pub mod timer;
pub mod workers;

pub use agent::{Agent, AgentError, EchoAgent, Turn, TurnOutput};
pub use config::Config;
pub use server::{Server, ShutdownHandle};
