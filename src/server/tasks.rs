//! Turns of agents driven by the loop: the tasks' slab, their tokens and deadlines, and the
//! first-come-first-served queue of turns waiting for one of the agent's slots.

use super::Server;
use super::timers::TimerKey;
use crate::agent::{
    Job, MAX_SOURCES, PolledAgent, Step, Stream, Task, TaskCtx, TurnEvent, TurnKey,
};
use crate::timer::schedule;
use log::{debug, info};
use mio::Token;
use slab::Slab;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

/// Tokens of task sources start here: above every connection's slab slot (which is its
/// token), below the listener's and the waker's. A quarter of the token space, so 32-bit
/// boards keep 2^30 tokens for connections.
pub(super) const TASK_TOKEN_BASE: usize = 1 << (usize::BITS - 2);

/// One running task.
struct Running {
    key: TurnKey,
    task: Box<dyn Task>,
    /// The instant it is scheduled in the loop's timer heap for.
    timer_at: Option<Instant>,
}

/// The turns a polled agent is running, and those waiting for a slot.
pub(super) struct Tasks {
    agent: Arc<dyn PolledAgent>,
    running: Slab<Running>,
    /// Turn id to slab slot, to cancel a turn by its key.
    by_turn: HashMap<u64, usize>,
    waiting: VecDeque<Job>,
    /// Previews produced during the current call, handed to the session table after it.
    streamed: Vec<Stream>,
    /// Waiting turns are being started: a task that ends at once must not start the next
    /// one from inside (the queue could be long; the loop below takes them in turn).
    promoting: bool,
}

impl Tasks {
    pub(super) fn new(agent: Arc<dyn PolledAgent>) -> Tasks {
        Tasks {
            agent,
            running: Slab::new(),
            by_turn: HashMap::new(),
            waiting: VecDeque::new(),
            streamed: Vec::new(),
            promoting: false,
        }
    }

    fn has_room(&self) -> bool {
        self.agent
            .max_concurrent()
            .is_none_or(|max| self.running.len() < max)
    }
}

/// The slot and source index a task token names.
pub(super) fn task_of(token: Token) -> Option<(usize, usize)> {
    let n = token.0.checked_sub(TASK_TOKEN_BASE)?;
    Some((n / MAX_SOURCES, n % MAX_SOURCES))
}

impl Server {
    /// Runs `job` as a task, or queues it until the agent has a free slot.
    pub(super) fn submit_task(&mut self, job: Job) {
        let Some(tasks) = self.tasks.as_mut() else {
            return;
        };
        if tasks.has_room() {
            self.start_task(job);
        } else {
            debug!(
                "user={} turn waits: {} turns already run on {}",
                job.key.user,
                tasks.running.len(),
                tasks.agent.name()
            );
            self.sessions.turn_waiting(&job.key);
            tasks.waiting.push_back(job);
        }
    }

    fn start_task(&mut self, job: Job) {
        let now = self.now.mono;
        let Some(tasks) = self.tasks.as_mut() else {
            return;
        };
        let task = tasks.agent.start(job.turn, now);
        let key = job.key;
        let slot = tasks.running.insert(Running {
            key: key.clone(),
            task,
            timer_at: None,
        });
        tasks.by_turn.insert(key.turn_id, slot);
        self.task_step(slot, |task, ctx| task.start(ctx));
    }

    /// A task source's readiness event.
    /// `ready` is (readable, writable, hung up or failed).
    pub(super) fn task_event(&mut self, token: Token, ready: (bool, bool, bool)) {
        let Some((slot, source)) = task_of(token) else {
            return;
        };
        let (readable, writable, hung_up) = ready;
        // A slot freed and reused within one batch of events gets a spurious call, which
        // a task must take anyway (non-blocking reads say WouldBlock).
        self.task_step(slot, |task, ctx| {
            ctx.set_hung_up(hung_up);
            task.ready(source, readable, writable, ctx)
        });
    }

    /// The deadline of the task in `slot` came.
    pub(super) fn task_due(&mut self, slot: usize, at: Instant) {
        let due = self
            .tasks
            .as_mut()
            .and_then(|t| t.running.get_mut(slot))
            .is_some_and(|r| {
                let due = r.timer_at == Some(at);
                if due {
                    r.timer_at = None;
                }
                due
            });
        if due {
            self.task_step(slot, |task, ctx| task.timeout(ctx));
        }
    }

    /// Calls the task in `slot`, passes what it streamed to the session table, and either
    /// schedules its next deadline or finishes it (starting a waiting turn in its place).
    fn task_step(
        &mut self,
        slot: usize,
        call: impl FnOnce(&mut dyn Task, &mut TaskCtx<'_>) -> Step,
    ) {
        let now = self.now;
        let Some(tasks) = self.tasks.as_mut() else {
            return;
        };
        let Some(running) = tasks.running.get_mut(slot) else {
            return;
        };
        let base = TASK_TOKEN_BASE + slot * MAX_SOURCES;
        let mut ctx = TaskCtx::new(self.poll.registry(), base, now.mono, &mut tasks.streamed);
        let step = call(running.task.as_mut(), &mut ctx);
        let key = running.key.clone();
        let next = running.task.poll_at();
        // Taken out while `turn_event` has the whole server, then put back to keep its
        // allocation.
        let mut streamed = std::mem::take(&mut tasks.streamed);
        for item in streamed.drain(..) {
            self.turn_event(&key, TurnEvent::Stream(item));
        }
        if let Some(tasks) = self.tasks.as_mut() {
            tasks.streamed = streamed;
        }
        match step {
            Step::Pending => {
                if let Some(at) = next
                    && let Some(r) = self.tasks.as_mut().and_then(|t| t.running.get_mut(slot))
                {
                    schedule(&mut self.timers, &mut r.timer_at, at, TimerKey::Task(slot));
                }
            }
            Step::Done(outcome) => {
                self.end_task(slot);
                self.turn_event(&key, TurnEvent::Done(outcome));
            }
        }
        self.apply_effects();
    }

    /// Takes the task in `slot` out (it released its sources) and starts the next waiting
    /// turn in its place.
    fn end_task(&mut self, slot: usize) -> Option<Box<dyn Task>> {
        let tasks = self.tasks.as_mut()?;
        let running = tasks.running.try_remove(slot)?;
        tasks.by_turn.remove(&running.key.turn_id);
        self.promote_waiting();
        Some(running.task)
    }

    /// Starts waiting turns while the agent has free slots.
    fn promote_waiting(&mut self) {
        let Some(tasks) = self.tasks.as_mut() else {
            return;
        };
        if tasks.promoting {
            return;
        }
        tasks.promoting = true;
        while let Some(tasks) = self.tasks.as_mut()
            && tasks.has_room()
            && let Some(job) = tasks.waiting.pop_front()
        {
            // Its time starts now; a turn that did not wait keeps the deadline the session
            // table gave it when it started.
            self.sessions.turn_began(&job.key, self.now.mono);
            self.start_task(job);
        }
        if let Some(tasks) = self.tasks.as_mut() {
            tasks.promoting = false;
        }
    }

    /// Turn `key` ended early (timeout): abort its task, or drop it from the queue.
    pub(super) fn cancel_task(&mut self, key: &TurnKey) {
        let Some(tasks) = self.tasks.as_mut() else {
            return;
        };
        if let Some(i) = tasks.waiting.iter().position(|j| j.key == *key) {
            tasks.waiting.remove(i);
            return;
        }
        let Some(&slot) = tasks.by_turn.get(&key.turn_id) else {
            return;
        };
        info!("user={} turn aborted: its agent task is stopped", key.user);
        if let Some(mut task) = self.end_task(slot) {
            task.abort(self.poll.registry());
        }
    }

    /// Shutdown: abort every task and forget the waiting turns.
    pub(super) fn abort_all_tasks(&mut self) {
        let Some(tasks) = self.tasks.as_mut() else {
            return;
        };
        tasks.waiting.clear();
        tasks.by_turn.clear();
        for mut running in tasks.running.drain() {
            running.task.abort(self.poll.registry());
        }
    }
}
