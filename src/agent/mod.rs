//! Agents: what answers a turn. The types every agent shares are here; how an agent runs is
//! in its file:
//! - `threaded.rs`: the blocking [`Agent`] trait an embedder implements, run on the worker
//!   pool (`pool.rs`), with [`TurnOutput`] to stream through and [`CancelToken`] to stop;
//! - `task.rs`: agents driven by the event loop itself ([`PolledAgent`], [`Task`]), for
//!   turns that mostly wait (a timer, an upstream socket, a child's pipes) and so hold no
//!   thread while they do;
//! - `echo.rs`: the built-in echo agent, in both forms.
//!
//! The session table never learns which kind answered: both end in the same turn events.

mod cat;
mod echo;
mod http1;
mod openai;
pub(crate) mod pool;
mod process;
mod sse;
mod task;
mod threaded;
mod transport;
pub mod upstream;

pub use cat::{Cat, CatConfig};
pub use echo::{EchoAgent, PolledEcho};
pub use openai::{OpenAi, OpenAiConfig};
pub use process::{Process, ProcessConfig};
pub use task::{MAX_SOURCES, PolledAgent, Step, Task, TaskCtx};
pub use threaded::{Agent, CancelToken, TurnOutput};
#[cfg(feature = "fuzzing")]
pub(crate) use {
    cat::{Relay, relay, shorten},
    http1::{Head as HttpHead, Progress, ResponseReader},
    process::{Output, Tail},
    sse::{Event as SseEvent, SseDecoder},
};

use crate::protocol::UserId;
use serde_json::{Map, Value};
use std::fmt;
use std::sync::Arc;

/// Who said a line of the conversation history.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Who {
    /// The user.
    Human,
    /// The agent.
    Ai,
}

/// One line of the conversation history handed to the agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryEntry {
    /// Who said it.
    pub who: Who,
    /// What was said (shared with the session, which hands the history to every turn).
    pub text: Arc<str>,
}

/// Everything an agent needs to answer one user message.
#[derive(Clone, Debug)]
pub struct Turn {
    /// The user the turn belongs to.
    pub user: UserId,
    /// The user's message.
    pub text: String,
    /// The other fields of the client's JSON object, untouched (`id` included).
    pub fields: Map<String, Value>,
    /// Earlier turns of this session, oldest first, bounded by `--history-turns`.
    pub history: Vec<HistoryEntry>,
}

/// Why a turn produced no reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentError {
    /// The agent failed; the text is sent to the user in an `AgentError` frame.
    Failed(String),
    /// The turn was cancelled (timeout or shutdown); nothing more is sent for it.
    Cancelled,
}

impl fmt::Display for AgentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgentError::Failed(why) => f.write_str(why),
            AgentError::Cancelled => f.write_str("turn cancelled"),
        }
    }
}

impl std::error::Error for AgentError {}

/// What an agent streams before its final reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stream {
    /// A `chat_token` preview.
    Token(String),
    /// A `notification`.
    Notification(String),
}

/// Names one turn of one session. The id is unique for the server's life, so a result for a
/// turn that timed out, or for a session that was dropped and made again, is recognised as
/// stale and dropped.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct TurnKey {
    /// The session the turn belongs to.
    pub user: UserId,
    /// Unique turn number.
    pub turn_id: u64,
}

/// What comes back from a worker for a turn.
#[derive(Debug)]
pub(crate) enum TurnEvent {
    /// A preview or notification.
    Stream(Stream),
    /// The end of the turn: the reply, or why there is none.
    Done(Result<String, AgentError>),
}

/// A turn handed to the pool.
#[derive(Debug)]
pub(crate) struct Job {
    /// Where the results go.
    pub key: TurnKey,
    /// What to answer.
    pub turn: Turn,
    /// Set by the loop on timeout or shutdown.
    pub cancel: CancelToken,
}

/// What answers the turns of a server: agents on the worker pool, or driven by the loop.
#[derive(Clone)]
pub enum Backend {
    /// A blocking agent, run on `--workers` threads.
    Threads(Arc<dyn Agent>),
    /// An agent whose turns are tasks of the event loop.
    Polled(Arc<dyn PolledAgent>),
}

impl Backend {
    /// The agent's name, for logs.
    pub fn name(&self) -> &str {
        match self {
            Backend::Threads(a) => a.name(),
            Backend::Polled(a) => a.name(),
        }
    }
}

impl From<Arc<dyn Agent>> for Backend {
    fn from(agent: Arc<dyn Agent>) -> Backend {
        Backend::Threads(agent)
    }
}

impl<A: Agent> From<Arc<A>> for Backend {
    fn from(agent: Arc<A>) -> Backend {
        Backend::Threads(agent)
    }
}
