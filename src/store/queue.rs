//! The loop's messages to the journal thread: a mutex-guarded queue and a condition
//! variable. std's channel would do, but it costs about 15 KB of armv7 binary per message
//! type, and this is all the journal needs.

use super::journal::Msg;
use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

#[derive(Default)]
struct State {
    msgs: VecDeque<Msg>,
    /// The journal thread has finished.
    stopped: bool,
}

/// A queue from the loop to the journal thread, and the thread's "stopped" answer.
#[derive(Default)]
pub(super) struct Queue {
    state: Mutex<State>,
    changed: Condvar,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain data behind: go on with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn push(&self, msg: Msg) {
        self.lock().msgs.push_back(msg);
        self.changed.notify_all();
    }

    /// The next message, waiting at most until `until` (forever with `None`); `None` when
    /// that time came first.
    pub(super) fn pop(&self, until: Option<Instant>) -> Option<Msg> {
        let mut state = self.lock();
        loop {
            if let Some(msg) = state.msgs.pop_front() {
                return Some(msg);
            }
            state = match until {
                None => self.changed.wait(state).unwrap_or_else(|e| e.into_inner()),
                Some(at) => {
                    let left = at.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    self.changed
                        .wait_timeout(state, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }

    /// The next message if one is waiting.
    pub(super) fn try_pop(&self) -> Option<Msg> {
        self.lock().msgs.pop_front()
    }

    /// Said by the journal thread as it ends.
    pub(super) fn stopped(&self) {
        self.lock().stopped = true;
        self.changed.notify_all();
    }

    /// Waits at most `timeout` for the journal thread to end; whether it did.
    pub(super) fn wait_stopped(&self, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        let mut state = self.lock();
        while !state.stopped {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }
}
