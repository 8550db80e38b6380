//! Bytes a session keeps, counted into a server-wide total as well.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Bytes a session keeps of one kind (held frames, history), counted also in a total
/// shared with the other sessions: the server's budget. What a session counts leaves the
/// total again as it goes, and when the session is dropped.
#[derive(Debug, Default)]
pub(super) struct Tally {
    bytes: usize,
    total: Arc<AtomicUsize>,
}

impl Tally {
    pub(super) fn get(&self) -> usize {
        self.bytes
    }

    pub(super) fn add(&mut self, n: usize) {
        self.bytes += n;
        self.total.fetch_add(n, Ordering::Relaxed);
    }

    pub(super) fn sub(&mut self, n: usize) {
        self.bytes -= n;
        self.total.fetch_sub(n, Ordering::Relaxed);
    }

    /// Moves this tally's count from the total it was in to `total`.
    pub(super) fn count_in(&mut self, total: Arc<AtomicUsize>) {
        self.total.fetch_sub(self.bytes, Ordering::Relaxed);
        total.fetch_add(self.bytes, Ordering::Relaxed);
        self.total = total;
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        self.total.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}
