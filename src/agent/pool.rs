//! The worker pool that runs agent turns off the event loop, and the path their results
//! take back: a channel plus one `mio::Waker`, woken once per batch rather than per item.

use super::{Agent, AgentError, Job, TurnEvent, TurnKey, TurnOutput};
use log::{error, warn};
use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// Wakes the event loop when results are waiting, coalescing wakes so a fast stream of
/// tokens costs one `eventfd` write per loop iteration, not one per token.
#[derive(Clone)]
pub struct Notifier {
    waker: Arc<mio::Waker>,
    pending: Arc<AtomicBool>,
}

impl Notifier {
    /// Wraps the loop's one waker.
    pub fn new(waker: Arc<mio::Waker>) -> Notifier {
        Notifier {
            waker,
            pending: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Wakes the loop unless a wake is already pending.
    pub fn wake(&self) {
        if !self.pending.swap(true, Ordering::AcqRel)
            && let Err(e) = self.waker.wake()
        {
            error!("cannot wake the event loop: {e}");
        }
    }

    /// Called by the loop before it drains results, so a result sent during the drain wakes
    /// it again.
    pub fn clear(&self) {
        self.pending.store(false, Ordering::Release);
    }
}

/// A fixed set of threads running turns from one queue.
pub struct Pool {
    queue: Arc<JobQueue>,
    results: Receiver<(TurnKey, TurnEvent)>,
    threads: Vec<JoinHandle<()>>,
}

/// The turns waiting for a worker. A plain queue under a mutex, with a condition variable
/// signalled only when a worker is idle: a worker takes the next turn without any wake-up
/// while turns are waiting, so a burst of turns costs no thread switches beyond the
/// workers' own. (A `Mutex<Receiver>` would have idle workers queue on the mutex behind
/// the one blocked in `recv`, and hand it on with a futex wake per job.)
#[derive(Default)]
struct JobQueue {
    state: Mutex<QueueState>,
    ready: Condvar,
}

#[derive(Default)]
struct QueueState {
    jobs: VecDeque<Job>,
    /// Workers waiting on `ready`.
    idle: usize,
    /// No more jobs: workers exit once the queue is empty.
    closed: bool,
}

impl JobQueue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // A worker that panicked while holding the lock left the queue consistent (every
        // update is a single push, pop or counter step), so carry on with it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// No more jobs: drops the queued ones and lets every waiting worker exit.
    fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.jobs.clear();
        drop(state);
        self.ready.notify_all();
    }

    /// The next job, waiting for one; `None` once the queue is closed and empty.
    fn take(&self) -> Option<Job> {
        let mut state = self.lock();
        loop {
            if let Some(job) = state.jobs.pop_front() {
                return Some(job);
            }
            if state.closed {
                return None;
            }
            state.idle += 1;
            state = self.ready.wait(state).unwrap_or_else(|p| p.into_inner());
            state.idle -= 1;
        }
    }
}

/// Stack for worker threads: agents that parse HTTP or JSON need some, but 2 MiB each is
/// wasted address space on a 32-bit board.
const WORKER_STACK_BYTES: usize = 256 * 1024;

/// How often shutdown looks again for workers that have finished.
const REAP_POLL: std::time::Duration = std::time::Duration::from_millis(5);

impl Pool {
    /// Starts `workers` threads running `agent`.
    pub fn start(
        workers: usize,
        agent: Arc<dyn Agent>,
        notifier: Notifier,
    ) -> std::io::Result<Pool> {
        let queue = Arc::new(JobQueue::default());
        let (res_tx, res_rx) = channel();
        let mut threads = Vec::with_capacity(workers);
        for i in 0..workers.max(1) {
            let shared = Arc::clone(&queue);
            let res_tx = res_tx.clone();
            let agent = Arc::clone(&agent);
            let notifier = notifier.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("straycat-worker-{i}"))
                .stack_size(WORKER_STACK_BYTES)
                .spawn(move || worker(&shared, res_tx, agent, notifier));
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    // Let the threads already started exit rather than leak them.
                    queue.close();
                    return Err(e);
                }
            }
        }
        Ok(Pool {
            queue,
            results: res_rx,
            threads,
        })
    }

    /// Queues a turn; `false` once the pool is closed. The queue needs no bound of its own:
    /// a session runs one turn at a time, so it holds at most one job per session.
    ///
    /// Idle workers are woken by [`Pool::kick`], once per loop iteration, not here: a
    /// worker woken per job would preempt the loop for every message of a burst.
    pub fn submit(&self, job: Job) -> bool {
        let mut state = self.queue.lock();
        if state.closed {
            return false;
        }
        state.jobs.push_back(job);
        true
    }

    /// Wakes as many idle workers as there are queued jobs; the loop calls it before it
    /// sleeps.
    pub fn kick(&self) {
        let state = self.queue.lock();
        let (wake, idle) = (state.idle.min(state.jobs.len()), state.idle);
        drop(state);
        // Nothing to wake is the common case, and a notify costs a system call even then.
        if wake == 0 {
            return;
        }
        if wake == idle {
            self.queue.ready.notify_all();
        } else {
            for _ in 0..wake {
                self.queue.ready.notify_one();
            }
        }
    }

    /// The next waiting result, if any; the loop calls `Notifier::clear` first.
    pub fn try_result(&self) -> Option<(TurnKey, TurnEvent)> {
        self.results.try_recv().ok()
    }

    /// Stops taking jobs and drops the queued ones (shutdown cancels every turn anyway);
    /// threads exit once their current turn ends. Threads still busy after the shutdown
    /// grace period are left to the process exit.
    pub fn close(&mut self) {
        self.queue.close();
    }

    /// Joins the threads that finish before `deadline` (after [`Pool::close`], an idle
    /// worker exits at once and a cancelled turn soon); returns how many are still running.
    pub fn reap(&mut self, deadline: std::time::Instant) -> usize {
        loop {
            let (done, busy): (Vec<_>, Vec<_>) =
                self.threads.drain(..).partition(|t| t.is_finished());
            for t in done {
                let _ = t.join();
            }
            self.threads = busy;
            if self.threads.is_empty() || std::time::Instant::now() >= deadline {
                return self.threads.len();
            }
            std::thread::sleep(REAP_POLL);
        }
    }
}

impl Drop for Pool {
    /// A pool dropped without [`Pool::close`] (a server that failed, or one built and never
    /// run) must not leave its workers waiting for jobs forever.
    fn drop(&mut self) {
        self.close();
    }
}

fn worker(
    queue: &JobQueue,
    results: Sender<(TurnKey, TurnEvent)>,
    agent: Arc<dyn Agent>,
    notifier: Notifier,
) {
    while let Some(job) = queue.take() {
        let key = job.key.clone();
        let sink_tx = results.clone();
        let sink_key = key.clone();
        let sink_notifier = notifier.clone();
        let mut out = TurnOutput::new(
            job.cancel.clone(),
            Box::new(move |item| {
                if sink_tx
                    .send((sink_key.clone(), TurnEvent::Stream(item)))
                    .is_ok()
                {
                    sink_notifier.wake();
                }
            }),
        );
        // A panicking agent must cost its user one turn, not a worker thread.
        let outcome = catch_unwind(AssertUnwindSafe(|| agent.answer(&job.turn, &mut out)))
            .unwrap_or_else(|_| {
                warn!(
                    "user={} agent {} panicked during a turn",
                    key.user,
                    agent.name()
                );
                Err(AgentError::Failed("the agent failed".into()))
            });
        if results.send((key, TurnEvent::Done(outcome))).is_err() {
            return;
        }
        notifier.wake();
    }
}
