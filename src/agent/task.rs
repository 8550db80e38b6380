//! Agents driven by the event loop. A turn of such an agent is a [`Task`]: a small state
//! machine that registers its sources (an upstream socket, a child's pipes) with the loop's
//! `mio::Registry`, is told when one of them is ready or when the instant it asked for has
//! come, and answers each time with a [`Step`]. No thread waits for it, so thousands of
//! turns can wait on slow upstreams at once. This is sozu's session contract
//! (`ready`/`timeout`) on mio's terms.

use super::{AgentError, Stream, Turn};
use mio::event::Source;
use mio::{Interest, Registry, Token};
use std::io;
use std::time::Instant;

/// Sources one task may register (a process agent's stdin, stdout and stderr; one socket).
pub const MAX_SOURCES: usize = 4;

/// An agent whose turns run as tasks of the event loop. One value serves every turn; it
/// lives on the loop thread.
pub trait PolledAgent: Send + Sync + 'static {
    /// A short name for logs.
    fn name(&self) -> &str;

    /// Begins `turn` at `now`. Nothing may block here (no DNS lookup, no blocking connect);
    /// the task starts its work in [`Task::start`].
    fn start(&self, turn: Turn, now: Instant) -> Box<dyn Task>;

    /// Turns this agent runs at once; more wait in one first-come-first-served queue (an
    /// upstream that serves a few generations at a time). `None`: no limit.
    fn max_concurrent(&self) -> Option<usize> {
        None
    }
}

/// What a task says after each call.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Not finished: call again when a source is ready or at [`Task::poll_at`].
    Pending,
    /// Finished: the reply, or why there is none. The task has released its sources.
    Done(Result<String, AgentError>),
}

/// One turn of a [`PolledAgent`].
pub trait Task {
    /// Called once, first: register sources, start connecting or spawning.
    fn start(&mut self, ctx: &mut TaskCtx<'_>) -> Step;

    /// Source `source` (the index it was registered with) is readable and/or writable.
    fn ready(
        &mut self,
        source: usize,
        readable: bool,
        writable: bool,
        ctx: &mut TaskCtx<'_>,
    ) -> Step;

    /// The instant [`Task::poll_at`] named has come (it may be called a little early).
    fn timeout(&mut self, ctx: &mut TaskCtx<'_>) -> Step;

    /// When the task next wants [`Task::timeout`], if ever.
    fn poll_at(&self) -> Option<Instant>;

    /// The turn ends before the task did (turn timeout, shutdown): release everything now,
    /// deregister the sources, close the upstream, kill the child. Called at most once,
    /// and never after `Done`.
    fn abort(&mut self, registry: &Registry);
}

/// A task that fails at once with `why`: for a turn an agent cannot take (say, audio for
/// an agent that only reads text and images).
pub fn refused(why: String) -> Box<dyn Task> {
    Box::new(Refused(Some(why)))
}

struct Refused(Option<String>);

impl Task for Refused {
    fn start(&mut self, _: &mut TaskCtx<'_>) -> Step {
        Step::Done(Err(AgentError::Failed(self.0.take().unwrap_or_default())))
    }

    fn ready(&mut self, _: usize, _: bool, _: bool, ctx: &mut TaskCtx<'_>) -> Step {
        self.start(ctx)
    }

    fn timeout(&mut self, ctx: &mut TaskCtx<'_>) -> Step {
        self.start(ctx)
    }

    fn poll_at(&self) -> Option<Instant> {
        None
    }

    fn abort(&mut self, _: &Registry) {}
}

/// What a task may use while it is being called: its sources' registration, the time,
/// and the stream of previews it sends.
pub struct TaskCtx<'a> {
    registry: &'a Registry,
    /// The token of this task's source 0; source `i` is `base + i`.
    base: usize,
    now: Instant,
    out: &'a mut Vec<Stream>,
    hung_up: bool,
}

impl<'a> TaskCtx<'a> {
    /// A context for the task whose tokens start at `base`.
    pub(crate) fn new(
        registry: &'a Registry,
        base: usize,
        now: Instant,
        out: &'a mut Vec<Stream>,
    ) -> TaskCtx<'a> {
        TaskCtx {
            registry,
            base,
            now,
            out,
            hung_up: false,
        }
    }

    /// Marks the readiness event this call is for as a hang-up (or error).
    pub(crate) fn set_hung_up(&mut self, hung_up: bool) {
        self.hung_up = hung_up;
    }

    /// Whether the readiness event this call is for came with the peer's hang-up or an
    /// error: then the end of a stream may sit behind bytes already announced.
    pub fn hung_up(&self) -> bool {
        self.hung_up
    }

    /// The loop's time for this iteration.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// The registry, to deregister sources on the way out.
    pub fn registry(&self) -> &Registry {
        self.registry
    }

    /// Registers `source` as the task's source number `index` (below [`MAX_SOURCES`]).
    pub fn register(
        &self,
        source: &mut impl Source,
        index: usize,
        interest: Interest,
    ) -> io::Result<()> {
        self.registry.register(source, self.token(index)?, interest)
    }

    /// Changes what `source` (registered as `index`) is watched for.
    pub fn reregister(
        &self,
        source: &mut impl Source,
        index: usize,
        interest: Interest,
    ) -> io::Result<()> {
        self.registry
            .reregister(source, self.token(index)?, interest)
    }

    fn token(&self, index: usize) -> io::Result<Token> {
        if index >= MAX_SOURCES {
            return Err(io::Error::other("a task has at most 4 sources"));
        }
        Ok(Token(self.base + index))
    }

    /// Sends a `chat_token` preview.
    pub fn token_text(&mut self, text: String) {
        self.out.push(Stream::Token(text));
    }

    /// Sends a `notification`.
    pub fn notify(&mut self, text: String) {
        self.out.push(Stream::Notification(text));
    }
}
