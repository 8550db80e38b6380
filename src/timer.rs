//! Deadlines: a min-heap of (instant, owner). The loop sleeps until the nearest one.
//!
//! Entries are never removed: an owner remembers the instant it is scheduled for, and an
//! entry that no longer matches is skipped when it comes up. That keeps every operation
//! O(log n) with no per-event scan of all connections.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

/// A min-heap of deadlines for owners of type `K`.
#[derive(Debug)]
pub struct Timers<K: Ord> {
    heap: BinaryHeap<Reverse<(Instant, K)>>,
}

impl<K: Ord> Default for Timers<K> {
    fn default() -> Self {
        Timers {
            heap: BinaryHeap::new(),
        }
    }
}

impl<K: Ord> Timers<K> {
    /// Adds a deadline for `key`.
    pub fn push(&mut self, at: Instant, key: K) {
        self.heap.push(Reverse((at, key)));
    }

    /// Takes the earliest deadline that is due at `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<(Instant, K)> {
        if self.heap.peek().is_some_and(|Reverse((at, _))| *at <= now) {
            self.heap.pop().map(|Reverse(e)| e)
        } else {
            None
        }
    }

    /// The earliest deadline (perhaps a stale one, which only costs an early wake-up).
    pub fn next_at(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((at, _))| *at)
    }

    /// The earliest entry, due or not.
    pub fn peek(&self) -> Option<(Instant, &K)> {
        self.heap.peek().map(|Reverse((at, key))| (*at, key))
    }

    /// Drops the earliest entry (a stale one the owner no longer wants).
    pub fn pop(&mut self) {
        self.heap.pop();
    }

    /// Entries in the heap, stale ones included.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// Whether there are no entries.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

/// Schedules `key` at `at` unless it is already scheduled no later; `slot` is the owner's
/// record of its pending deadline.
pub fn schedule<K: Ord>(timers: &mut Timers<K>, slot: &mut Option<Instant>, at: Instant, key: K) {
    if slot.is_none_or(|t| at < t) {
        *slot = Some(at);
        timers.push(at, key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn earliest_first_and_only_when_due() {
        let t0 = Instant::now();
        let mut t = Timers::default();
        t.push(t0 + Duration::from_secs(5), "b");
        t.push(t0 + Duration::from_secs(1), "a");
        assert_eq!(t.next_at(), Some(t0 + Duration::from_secs(1)));
        assert!(t.pop_due(t0).is_none());
        assert_eq!(
            t.pop_due(t0 + Duration::from_secs(5)).map(|e| e.1),
            Some("a")
        );
        assert_eq!(
            t.pop_due(t0 + Duration::from_secs(5)).map(|e| e.1),
            Some("b")
        );
        assert!(t.is_empty());
    }

    #[test]
    fn schedule_keeps_one_entry_unless_earlier() {
        let t0 = Instant::now();
        let mut t = Timers::default();
        let mut slot = None;
        schedule(&mut t, &mut slot, t0 + Duration::from_secs(5), 1);
        schedule(&mut t, &mut slot, t0 + Duration::from_secs(9), 1);
        assert_eq!(t.len(), 1);
        schedule(&mut t, &mut slot, t0 + Duration::from_secs(2), 1);
        assert_eq!(t.len(), 2);
        assert_eq!(slot, Some(t0 + Duration::from_secs(2)));
    }
}
