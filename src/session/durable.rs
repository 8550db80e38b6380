//! A session and the journal: rebuilding one from its changes after a restart, and writing
//! one whole as changes (compaction). The changes themselves are made where the session
//! changes (`log` in `mod.rs`), so that nothing the table does can miss the journal.

use super::{HeldFrame, IdState, Limits, Now, Session};
use crate::agent::HistoryEntry;
use crate::store::Change;
use std::time::{Duration, Instant};

impl Session {
    /// Replays one change of the journal. Changes that do not fit the session (damage
    /// the checksums missed, or a journal from another version) are ignored: a state file
    /// never makes the server fail.
    pub(super) fn apply(&mut self, change: Change, limits: &Limits, now: Now) {
        match change {
            Change::Reset {
                next_seq,
                handed,
                idle_unix,
            } => {
                for f in self.held.drain(..) {
                    self.held_bytes.sub(f.text.len());
                }
                for h in self.history.drain(..) {
                    self.history_bytes.sub(h.text.len());
                }
                self.history_when.clear();
                self.ids.clear();
                self.queue.clear();
                self.next_seq = next_seq.max(1);
                self.handed_upto = handed;
                self.idle_since = idle_at(idle_unix, now);
            }
            Change::Frame { seq, text } => {
                // Frames only ever come in seq order; one that does not is damage.
                if self.held.back().is_none_or(|last| last.seq < seq) {
                    self.next_seq = self.next_seq.max(seq.saturating_add(1));
                    self.held_bytes.add(text.len());
                    self.held.push_back(HeldFrame { seq, text });
                }
            }
            Change::DropFrame => {
                if let Some(old) = self.held.pop_front() {
                    self.held_bytes.sub(old.text.len());
                }
            }
            Change::Line { who, text, unix } => {
                self.history_when.push_back(unix);
                self.history_bytes.add(text.len());
                self.history.push_back(HistoryEntry { who, text });
            }
            Change::ForgetLine => {
                if let Some(old) = self.history.pop_front() {
                    self.history_when.pop_front();
                    self.history_bytes.sub(old.text.len());
                }
            }
            Change::Handed { seq } => self.handed_upto = self.handed_upto.max(seq),
            Change::Accepted(msg) => self.enqueue(msg, limits),
            Change::Finished { seq } => {
                if let Some(msg) = self.queue.pop_front() {
                    self.answered(msg.id, seq);
                }
            }
            Change::Answered { id, seq } => {
                self.remember_id(id, IdState::Answered(seq), limits);
            }
            // A socket was attached when the server stopped: idle from the restart on.
            Change::Attached => self.idle_since = now.mono,
            Change::Idle { unix } => self.idle_since = idle_at(Some(unix), now),
            Change::Gone | Change::Clean => {}
        }
    }

    /// After the replay: numbering continues `gap` above the last seq in the journal
    /// (frames sent but not yet written when the server died may have used the seqs right
    /// after it), and the bounds of this configuration hold.
    pub(super) fn restored(&mut self, gap: u64, limits: &Limits) {
        self.next_seq = self.next_seq.saturating_add(gap);
        self.trim_held(
            limits,
            "held frames over this configuration's bound after the restart",
        );
        self.trim_history(limits);
    }

    /// The whole session as changes, starting with a `Reset`: what compaction writes.
    pub(super) fn snapshot(&self, now: Now, out: &mut Vec<Change>) {
        let idle_unix = self.conn.is_none().then(|| {
            let ago = now.mono.saturating_duration_since(self.idle_since);
            now.unix - ago.as_secs_f64()
        });
        out.push(Change::Reset {
            next_seq: self.next_seq,
            handed: self.handed_upto,
            idle_unix,
        });
        out.extend(self.held.iter().map(|f| Change::Frame {
            seq: f.seq,
            text: f.text.clone(),
        }));
        out.extend(self.history().map(|(h, unix)| Change::Line {
            who: h.who,
            text: h.text.clone(),
            unix,
        }));
        out.extend(self.ids.iter().filter_map(|(id, state)| match state {
            IdState::Answered(seq) => Some(Change::Answered {
                id: id.clone(),
                seq: *seq,
            }),
            IdState::Pending => None,
        }));
        let running = self.running.as_ref().map(|r| r.msg.clone());
        out.extend(
            running
                .into_iter()
                .chain(self.queue.iter().cloned())
                .map(Change::Accepted),
        );
    }

    /// Whether a turn is waiting to run (after a restart: the turns the journal owes).
    pub(super) fn has_queued(&self) -> bool {
        !self.queue.is_empty()
    }
}

/// The instant of Unix time `unix`, given `now`: never later than now (a clock that went
/// back makes a session look idle since the restart, not since the future).
fn idle_at(unix: Option<f64>, now: Now) -> Instant {
    let Some(unix) = unix else {
        return now.mono;
    };
    let ago = Duration::try_from_secs_f64(now.unix - unix).unwrap_or(Duration::ZERO);
    now.mono.checked_sub(ago).unwrap_or(now.mono)
}
