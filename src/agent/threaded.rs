//! Blocking agents: the [`Agent`] trait an embedder implements, run on the worker pool, with
//! the handle it streams through and the token that tells it to stop.
//!
//! Such agents run on worker threads, never on the event loop, so they may block (sleep,
//! wait for a child process, read an HTTP stream). They stream through [`TurnOutput`],
//! which also tells them when the turn was cancelled (timeout or shutdown) so they can stop
//! early.

use super::{AgentError, Stream, Turn};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

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
