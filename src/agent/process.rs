//! The process agent: one child process per turn (stub, being written).

use super::{AgentError, PolledAgent, Step, Task, TaskCtx, Turn};
use mio::Registry;
use std::time::Instant;

/// What `Process::new` needs.
pub struct ProcessConfig {
    /// `--process-cmd`, run by `/bin/sh -c`.
    pub cmd: String,
    /// `--max-message-bytes`: the longest reply relayed.
    pub max_output_bytes: usize,
}

/// Runs `--process-cmd` per turn.
pub struct Process {
    _config: ProcessConfig,
}

impl Process {
    /// Checks the configuration.
    pub fn new(config: ProcessConfig) -> Result<Process, String> {
        Ok(Process { _config: config })
    }
}

impl PolledAgent for Process {
    fn name(&self) -> &str {
        "process"
    }

    fn start(&self, _turn: Turn, _now: Instant) -> Box<dyn Task> {
        Box::new(NotYet)
    }
}

struct NotYet;

impl Task for NotYet {
    fn start(&mut self, _: &mut TaskCtx<'_>) -> Step {
        Step::Done(Err(AgentError::Failed(
            "the process agent is not built yet".into(),
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
