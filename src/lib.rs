//! straycat: a small synchronous WebSocket chat server for low-resource devices, speaking
//! the Cheshire Cat 1.x chat protocol, whose sessions survive any disconnect.
//!
//! # Layout
//! - [`config`]: every option, its default and its `STRAYCAT_*` variable, each written once
//!   (`config/opts.rs`).
//! - `protocol`: the wire format: user ids, client messages, the JSON frames sent back.
//! - [`auth`]: signed per-user tokens (JWT HS256, `--jwt-secret`), pure.
//! - `limits`: the rate limits' token bucket and the per-address table, pure.
//! - `http`: the request head: parsing, routing, HTTP answers.
//! - `page`: the chat page served at `/` (`page/index.html`, embedded in the binary).
//! - `session`: a user's conversation (`session/mod.rs`) and the session table
//!   (`session/table.rs`: routing, expiry, the cap, budgets; effects out); pure logic.
//! - [`agent`]: what answers turns: the blocking [`Agent`] trait on the worker pool
//!   (`agent/threaded.rs`, `agent/pool.rs`); agents driven by the loop (`agent/task.rs`):
//!   echo (`echo.rs`), an OpenAI-compatible LLM (`openai.rs`, over `transport.rs`, with the
//!   pure `http1.rs` and `sse.rs` decoders), a program per turn (`process.rs`), a Cheshire
//!   Cat upstream (`cat.rs`); upstream URLs resolved at start-up (`upstream.rs`).
//! - `conn`: one connection: its phases (`conn/mod.rs`), the WebSocket with its
//!   unsent-bytes accounting (`conn/ws.rs`), the counting socket (`conn/counted.rs`), the
//!   stream under them, plain TCP or our TLS adapter over rustls (`conn/stream.rs`), the
//!   heartbeat (`conn/heartbeat.rs`, pure).
//! - `tls`: `--tls-cert`/`--tls-key`: the PEM files into a rustls config, and its reload on
//!   SIGHUP (read on the signal thread, handed to the loop).
//! - `store`: the state dir (`--state-dir`): the journal's records (`store/record.rs`,
//!   pure), its writer thread with group commit and compaction (`store/journal.rs`),
//!   start-up replay (`store/mod.rs`).
//! - `metrics`: `GET /metrics`, the Prometheus text exposition: the loop's counters and
//!   histograms, rendered by hand (`metrics.rs`, pure).
//! - `tally`: bytes one session or socket keeps, counted into a server-wide total for the
//!   budgets (held frames, history, unsent bytes).
//! - `timer`: the deadline heap the event loop and the session table sleep on.
//! - [`server`]: the event loop: the loop and shutdown (`server/mod.rs`), accepting and
//!   the HTTP phase (`accept.rs`), socket I/O (`io.rs`), the session table's effects
//!   (`effects.rs`), the polled agents' tasks (`tasks.rs`), deadlines (`timers.rs`).
//! - [`systemd`]: readiness and watchdog notifications, socket activation, the journal.
//! - [`logging`]: log set-up for a terminal or the journal.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod agent;
pub mod auth;
pub mod config;
mod conn;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod http;
mod limits;
pub mod logging;
mod metrics;
mod page;
mod protocol;
pub mod server;
mod session;
mod store;
pub mod systemd;
mod tally;
mod timer;
mod tls;

pub use agent::{Agent, AgentError, Backend, EchoAgent, PolledAgent, PolledEcho, Turn, TurnOutput};
pub use config::Config;
pub use protocol::UserId;
pub use server::{Server, ShutdownHandle};
pub use tls::TlsSetupError;
