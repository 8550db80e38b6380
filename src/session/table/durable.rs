//! The session table and the state dir: rebuilt from the journal at start-up, and written
//! whole, a few sessions at a time, when the journal is compacted.

use super::{Effect, Sessions};
use crate::protocol::UserId;
use crate::session::Now;
use crate::store::Change;
use log::{info, warn};

impl Sessions {
    /// Replays one change of the journal (start-up, before the loop runs; nothing is
    /// journaled again).
    pub fn restore(&mut self, user: UserId, change: Change, now: Now) {
        if change == Change::Gone {
            self.map.remove(&user);
            return;
        }
        let limits = self.limits.session;
        // Journaling is off until `restored`: the replay itself records nothing.
        self.entry_or_new(&user, now)
            .session
            .apply(change, &limits, now);
    }

    /// After the replay: seqs continue `gap` above the journal's, every bound of this
    /// configuration holds (the cap drops the longest-idle sessions first, the budgets
    /// shed as they do at run time), the expiry clocks run from when each session became
    /// idle, and the turns the journal owes start again. Then journaling begins.
    pub fn restored(&mut self, gap: u64, now: Now, out: &mut Vec<Effect>) {
        let limits = self.limits.session;
        for entry in self.map.values_mut() {
            entry.session.restored(gap, &limits);
        }
        let over = self.map.len().saturating_sub(self.limits.max_sessions);
        if over > 0 {
            let mut by_idle: Vec<_> = self
                .map
                .iter()
                .map(|(u, e)| (e.session.idle_since(), u.clone()))
                .collect();
            // Idle sessions first, the longest idle first; sessions with work last.
            by_idle.sort_unstable_by_key(|(idle, _)| (idle.is_none(), *idle));
            for (_, user) in by_idle.into_iter().take(over) {
                self.map.remove(&user);
            }
            warn!(
                "state: {over} restored sessions dropped to fit --max-sessions {}",
                self.limits.max_sessions
            );
        }
        self.enforce_budgets();
        let users: Vec<UserId> = self.map.keys().cloned().collect();
        let mut owed = 0;
        for user in &users {
            if self.map.get(user).is_some_and(|e| e.session.has_queued()) {
                owed += 1;
                self.start_next(user, now, out);
            }
            self.schedule_idle(user);
        }
        if !self.map.is_empty() {
            info!(
                "state: restored {} sessions; {owed} turns that were not answered run again",
                self.map.len()
            );
        }
        self.journal_on();
    }

    /// Every user with a session: what a snapshot goes through.
    pub fn users(&self) -> Vec<UserId> {
        self.map.keys().cloned().collect()
    }

    /// `user`'s whole session as changes (none if it is gone).
    pub fn snapshot(&self, user: &UserId, now: Now, out: &mut Vec<(UserId, Change)>) {
        if let Some(entry) = self.map.get(user) {
            let mut changes = Vec::new();
            entry.session.snapshot(now, &mut changes);
            out.extend(changes.into_iter().map(|c| (user.clone(), c)));
        }
    }
}
