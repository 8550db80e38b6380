//! The session table and the chat part of Cheshire Cat's HTTP API: a session's history
//! read and forgotten, and a turn over plain HTTP (`POST /message`) that runs in the
//! user's session like a socket message and answers its request with the final frame.

use super::{Effect, Sessions, Waiter};
use crate::agent::HistoryEntry;
use crate::conn::ConnId;
use crate::protocol::{ClientMessage, UserId};
use crate::session::{Accepted, Now};

impl Sessions {
    /// `user`'s conversation history, oldest first, with the Unix time of each line
    /// (empty without a session).
    pub fn history(&self, user: &UserId) -> Vec<(HistoryEntry, f64)> {
        self.map
            .get(user)
            .map(|e| e.session.history().map(|(h, t)| (h.clone(), t)).collect())
            .unwrap_or_default()
    }

    /// Forgets `user`'s conversation history; held frames and seqs stay.
    pub fn forget_history(&mut self, user: &UserId) {
        if let Some(entry) = self.map.get_mut(user) {
            entry.session.forget_history();
            self.collect(user);
        }
    }

    /// A message over HTTP from `conn`: run in `user`'s session (made if missing), and
    /// answered with [`Effect::Answer`] once its reply is ready (at once for a resend of an
    /// answered id, or a `Busy`). `false` when no session can be made (the cap).
    pub fn http_message(
        &mut self,
        conn: ConnId,
        user: &UserId,
        mut msg: ClientMessage,
        now: Now,
        out: &mut Vec<Effect>,
    ) -> bool {
        if !self.make_room_for(user) {
            return false;
        }
        let limits = self.limits.session;
        // The answer is found by its `reply_to`, so every message needs an id.
        let id = msg
            .id
            .get_or_insert_with(|| {
                self.next_http_id += 1;
                format!("http-{}", self.next_http_id)
            })
            .clone();
        let entry = self.entry_or_new(user, now);
        match entry.session.accept(msg, &limits, now) {
            Accepted::Queued => {
                self.waiters.push(Waiter {
                    user: user.clone(),
                    id,
                    conn,
                });
                self.start_next(user, now, out);
            }
            Accepted::StillRunning => self.waiters.push(Waiter {
                user: user.clone(),
                id,
                conn,
            }),
            Accepted::Resend(frame)
            | Accepted::Busy(frame)
            | Accepted::ReplyGone(frame)
            | Accepted::RateLimited { frame, .. } => out.push(Effect::Answer(conn, frame)),
        }
        self.collect(user);
        self.schedule_idle(user);
        true
    }

    /// The HTTP request of `conn` is gone (it hung up or timed out): its answer, when it
    /// comes, is only held.
    pub fn forget_waiter(&mut self, conn: ConnId) {
        self.waiters.retain(|w| w.conn != conn);
    }
}
