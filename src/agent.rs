//! The `Agent` trait that answers a turn, the handle it streams through, and the built-in
//! echo agent.
//!
//! Agents run on worker threads, never on the event loop, so they may block (sleep, wait
//! for a child process, read an HTTP stream). They stream through [`TurnOutput`], which
//! also tells them when the turn was cancelled (timeout or shutdown) so they can stop early.

use crate::protocol::UserId;
use serde_json::{Map, Value};
use std::fmt;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

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

/// Answers turns. One value serves every user from every worker thread at once.
pub trait Agent: Send + Sync + 'static {
    /// A short name for logs.
    fn name(&self) -> &str;

    /// Answers `turn`, streaming previews and notifications through `out`, and returns the
    /// final reply text. Returning early with `Err(AgentError::Cancelled)` (what `out`'s
    /// methods return once the turn is cancelled) is the way to stop.
    fn answer(&self, turn: &Turn, out: &mut TurnOutput) -> Result<String, AgentError>;
}

/// A cancellation flag a sleeping worker can be woken from.
#[derive(Clone, Debug, Default)]
pub struct CancelToken(Arc<(Mutex<bool>, Condvar)>);

impl CancelToken {
    /// A token that is not cancelled.
    pub fn new() -> CancelToken {
        CancelToken::default()
    }

    /// Cancels the turn and wakes it if it is sleeping.
    pub fn cancel(&self) {
        let (flag, cond) = &*self.0;
        // A poisoned lock only means another thread panicked while holding it; the bool is
        // still meaningful, so recover it rather than spread the panic.
        *flag.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cond.notify_all();
    }

    /// Whether the turn was cancelled.
    pub fn is_cancelled(&self) -> bool {
        *self.0.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sleeps for `d`, returning early with `Err(Cancelled)` when the turn is cancelled.
    pub fn sleep(&self, d: Duration) -> Result<(), AgentError> {
        let (flag, cond) = &*self.0;
        let until = Instant::now() + d;
        let mut cancelled = flag.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if *cancelled {
                return Err(AgentError::Cancelled);
            }
            let now = Instant::now();
            if now >= until {
                return Ok(());
            }
            cancelled = cond
                .wait_timeout(cancelled, until - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// What an agent streams before its final reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stream {
    /// A `chat_token` preview.
    Token(String),
    /// A `notification`.
    Notification(String),
}

/// The handle an agent streams a turn through.
pub struct TurnOutput {
    cancel: CancelToken,
    sink: Box<dyn FnMut(Stream) + Send>,
}

impl TurnOutput {
    /// Wraps `sink`, which carries each streamed item to the event loop.
    pub fn new(cancel: CancelToken, sink: Box<dyn FnMut(Stream) + Send>) -> TurnOutput {
        TurnOutput { cancel, sink }
    }

    /// Sends a `chat_token` preview.
    pub fn token(&mut self, text: &str) -> Result<(), AgentError> {
        self.send(Stream::Token(text.to_string()))
    }

    /// Sends a `notification`.
    pub fn notify(&mut self, text: &str) -> Result<(), AgentError> {
        self.send(Stream::Notification(text.to_string()))
    }

    /// Whether the turn was cancelled (timeout or shutdown).
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Sleeps, waking early with `Err(Cancelled)` if the turn is cancelled.
    pub fn sleep(&self, d: Duration) -> Result<(), AgentError> {
        self.cancel.sleep(d)
    }

    /// The turn's cancellation token, for agents that wait on other threads.
    pub fn cancel_token(&self) -> &CancelToken {
        &self.cancel
    }

    fn send(&mut self, item: Stream) -> Result<(), AgentError> {
        if self.cancel.is_cancelled() {
            return Err(AgentError::Cancelled);
        }
        (self.sink)(item);
        Ok(())
    }
}

/// The built-in agent: streams each word of the message as a token, then echoes the text.
///
/// It stands in for a slow language model in tests and demos (`--echo-delay-ms`).
#[derive(Clone, Debug, Default)]
pub struct EchoAgent {
    /// Pause before each word.
    pub delay: Duration,
}

impl Agent for EchoAgent {
    fn name(&self) -> &str {
        "echo"
    }

    fn answer(&self, turn: &Turn, out: &mut TurnOutput) -> Result<String, AgentError> {
        for word in turn.text.split_whitespace() {
            if !self.delay.is_zero() {
                out.sleep(self.delay)?;
            }
            out.token(word)?;
        }
        Ok(turn.text.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn turn(text: &str) -> Turn {
        Turn {
            user: UserId::default_user(),
            text: text.into(),
            fields: Map::new(),
            history: vec![],
        }
    }

    #[test]
    fn echo_streams_words_then_replies() {
        let (tx, rx) = mpsc::channel();
        let mut out = TurnOutput::new(CancelToken::new(), Box::new(move |s| drop(tx.send(s))));
        let reply = EchoAgent::default()
            .answer(&turn("hello  big world"), &mut out)
            .unwrap();
        assert_eq!(reply, "hello  big world");
        drop(out);
        let got: Vec<Stream> = rx.iter().collect();
        assert_eq!(
            got,
            ["hello", "big", "world"].map(|w| Stream::Token(w.into()))
        );
    }

    #[test]
    fn cancel_wakes_a_sleeping_agent() {
        let cancel = CancelToken::new();
        let mut out = TurnOutput::new(cancel.clone(), Box::new(|_| {}));
        let agent = EchoAgent {
            delay: Duration::from_secs(3600),
        };
        let t = std::thread::spawn(move || agent.answer(&turn("a b"), &mut out));
        cancel.cancel();
        assert_eq!(t.join().unwrap(), Err(AgentError::Cancelled));
    }
}
