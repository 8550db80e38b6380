//! Bytes one owner keeps (a session's held frames or history, a socket's unsent frames),
//! counted into a server-wide total as well: what the budgets are checked against.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Bytes an owner keeps of one kind, counted also in a total shared with the other owners:
/// the server's budget. What an owner counts leaves the total again as it goes, and when
/// the owner is dropped, so no path can leave bytes behind in the total.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    bytes: usize,
    total: Arc<AtomicUsize>,
}

impl Tally {
    /// Counts nothing yet, into `total`.
    pub(crate) fn new(total: Arc<AtomicUsize>) -> Tally {
        Tally { bytes: 0, total }
    }

    pub(crate) fn get(&self) -> usize {
        self.bytes
    }

    pub(crate) fn add(&mut self, n: usize) {
        self.bytes += n;
        self.total.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn sub(&mut self, n: usize) {
        self.bytes -= n;
        self.total.fetch_sub(n, Ordering::Relaxed);
    }

    /// Counts `n` bytes from now on (more or fewer than before).
    pub(crate) fn set(&mut self, n: usize) {
        match n.checked_sub(self.bytes) {
            Some(more) => self.add(more),
            None => self.sub(self.bytes - n),
        }
    }

    /// Moves this tally's count from the total it was in to `total`.
    pub(crate) fn count_in(&mut self, total: Arc<AtomicUsize>) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn load(total: &AtomicUsize) -> usize {
        total.load(Ordering::Relaxed)
    }

    #[test]
    fn set_moves_the_total_both_ways_and_drop_takes_the_rest_out() {
        let (open, closing) = (Arc::default(), Arc::default());
        let mut a = Tally::new(Arc::clone(&open));
        let mut b = Tally::new(Arc::clone(&open));
        a.set(300);
        b.set(200);
        assert_eq!(load(&open), 500);
        a.set(120);
        assert_eq!((a.get(), load(&open)), (120, 320));
        b.count_in(Arc::clone(&closing));
        assert_eq!((load(&open), load(&closing)), (120, 200));
        b.set(50);
        assert_eq!(load(&closing), 50);
        drop(b);
        drop(a);
        assert_eq!((load(&open), load(&closing)), (0, 0));
    }
}
