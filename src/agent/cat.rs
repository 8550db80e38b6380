//! The cat agent: a Cheshire Cat 1.x upstream (stub, being written).

use super::{AgentError, PolledAgent, Step, Task, TaskCtx, Turn};
use mio::Registry;
use std::time::Instant;

/// What `Cat::new` needs.
pub struct CatConfig {
    /// `--cat-url`, `ws://HOST:PORT`.
    pub url: String,
    /// `--cat-token`.
    pub token: Option<String>,
    /// `--max-message-bytes`: the largest frame taken from the Cat.
    pub max_frame_bytes: usize,
    /// `--max-sessions`: upstream sockets kept at most.
    pub max_connections: usize,
}

/// Relays turns to a Cheshire Cat.
pub struct Cat {
    _config: CatConfig,
}

impl Cat {
    /// Checks the configuration.
    pub fn new(config: CatConfig) -> Result<Cat, String> {
        Ok(Cat { _config: config })
    }
}

impl PolledAgent for Cat {
    fn name(&self) -> &str {
        "cat"
    }

    fn start(&self, _turn: Turn, _now: Instant) -> Box<dyn Task> {
        Box::new(NotYet)
    }
}

struct NotYet;

impl Task for NotYet {
    fn start(&mut self, _: &mut TaskCtx<'_>) -> Step {
        Step::Done(Err(AgentError::Failed(
            "the cat agent is not built yet".into(),
        )))
    }
    fn ready(&mut self, _: usize, _: bool, _: bool, _: &mut TaskCtx<'_>) -> Step {
        Step::Pending
    }
    fn timeout(&mut self, _: &mut TaskCtx<'_>) -> Step {
        Step::Pending
    }
    fn poll_at(&self) -> Option<Instant> {
        None
    }
    fn abort(&mut self, _: &Registry) {}
}
