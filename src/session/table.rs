//! The session table: every user's session, found by user id, and the rules that span them:
//! which socket may speak for a session, who gets which frame, when a turn starts, times out
//! or a session expires, which session gives way at the cap, and the server-wide memory
//! budgets. Pure: the time comes in as an argument, and what the event loop must do comes
//! out as [`Effect`]s (send this frame to that connection, close that one, start this
//! turn); the next instant the table wants to be woken at is [`Sessions::poll_at`].

use super::{Accepted, Limits, Now, Outgoing, Session};
use crate::agent::Stream;
use crate::agent::{Job, TurnEvent, TurnKey};
use crate::conn::ConnId;
use crate::protocol::{ClientMessage, ErrorName, Held, UserId};
use crate::store::Change;
use crate::timer::{Timers, schedule};
use log::{debug, info, warn};
use std::collections::HashMap;
use std::collections::hash_map::Entry as MapEntry;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// A socket's reference to the session it was attached to. The epoch tells that session
/// from a later one of the same user (the first expired and was made again): a closing
/// socket of the old one must not mark the new one's frames as handed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRef {
    /// Whose session.
    pub user: UserId,
    /// Unique per session made.
    pub epoch: u64,
}

/// What the event loop must do on the table's behalf, in order.
#[derive(Debug)]
pub enum Effect {
    /// Write this frame to that connection (if it is still open).
    Send(ConnId, Outgoing),
    /// Close that connection with 1000 `replaced`: a newer socket took over its session.
    Replace(ConnId),
    /// Run this turn; if it cannot be, tell [`Sessions::turn_event`] it failed.
    Start(Job),
    /// This turn ended early (turn timeout): stop whatever still works on it.
    Cancel(TurnKey),
    /// Answer that HTTP request (`POST /message`) with this frame.
    Answer(ConnId, Outgoing),
    /// Close that connection with 1008: it kept sending far past the message rate limit.
    Flooding(ConnId),
}

/// What [`Sessions::detach`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Detached {
    /// The connection was not the session's attached one (replaced, or never attached).
    NotAttached,
    /// Detached; nothing was running.
    Idle,
    /// Detached while a turn was running: its reply will be held.
    TurnRunning,
}

/// What `/metrics` shows of the table at a scrape.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Occupancy {
    /// Sessions with a socket attached.
    pub attached: usize,
    /// Sessions without one.
    pub detached: usize,
    /// Frames held by all sessions.
    pub held_frames: usize,
    /// Bytes of those frames.
    pub held_bytes: usize,
    /// Bytes of the history of all sessions.
    pub history_bytes: usize,
}

/// The bounds of the table, from the configuration.
#[derive(Clone, Copy, Debug)]
pub struct TableLimits {
    /// Per-session bounds.
    pub session: Limits,
    /// How long a session with no socket and no work is kept.
    pub ttl: Duration,
    /// Sessions at once.
    pub max_sessions: usize,
    /// Bytes of held frames of all sessions together.
    pub max_held_bytes_total: usize,
    /// Bytes of history of all sessions together.
    pub max_history_bytes_total: usize,
}

/// A session and its place in the table's timer heap.
#[derive(Debug)]
struct Entry {
    session: Session,
    /// The instant this session is scheduled in `timers` for.
    timer_at: Option<Instant>,
    epoch: u64,
}

/// Every session, by user id.
#[derive(Debug)]
pub struct Sessions {
    map: HashMap<UserId, Entry>,
    /// Turn timeouts and expiry, one live entry per session (stale ones are skipped).
    timers: Timers<UserId>,
    limits: TableLimits,
    /// Bytes of frames held by all sessions (each session keeps its share counted here).
    held_total: Arc<AtomicUsize>,
    /// Bytes of conversation history of all sessions, counted the same way.
    history_total: Arc<AtomicUsize>,
    next_epoch: u64,
    next_turn: u64,
    /// With a state dir: sessions keep their changes, collected here for the journal.
    journal: bool,
    records: Vec<(UserId, Change)>,
    /// `POST /message` requests waiting for the frame that answers their message id.
    waiters: Vec<Waiter>,
    /// Ids given to HTTP messages that came without one.
    next_http_id: u64,
}

/// An HTTP request waiting for the answer to a message.
#[derive(Debug)]
struct Waiter {
    user: UserId,
    id: String,
    conn: ConnId,
}

impl Sessions {
    /// An empty table.
    pub fn new(limits: TableLimits) -> Sessions {
        Sessions {
            map: HashMap::new(),
            timers: Timers::default(),
            limits,
            held_total: Arc::default(),
            history_total: Arc::default(),
            next_epoch: 1,
            next_turn: 1,
            journal: false,
            records: Vec::new(),
            waiters: Vec::new(),
            next_http_id: 0,
        }
    }

    /// From now on every change of every session is kept for [`Sessions::take_records`].
    pub fn journal_on(&mut self) {
        self.journal = true;
        for entry in self.map.values_mut() {
            entry.session.record_changes();
        }
    }

    /// The changes since the last call, in order, for the journal.
    pub fn take_records(&mut self) -> Vec<(UserId, Change)> {
        std::mem::take(&mut self.records)
    }

    /// Bytes of what the sessions hold: frames and history (what a snapshot mostly is).
    pub fn live_bytes(&self) -> usize {
        self.held_total.load(Ordering::Relaxed) + self.history_total.load(Ordering::Relaxed)
    }

    /// Moves `user`'s session's changes to the journal records.
    fn collect(&mut self, user: &UserId) {
        if let Some(entry) = self.map.get_mut(user) {
            collect_into(&mut self.records, user, &mut entry.session);
        }
    }

    /// Drops `user`'s session, and says so to the journal.
    fn remove(&mut self, user: &UserId) {
        if self.map.remove(user).is_some() && self.journal {
            self.records.push((user.clone(), Change::Gone));
        }
    }

    /// Sessions in the table.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Sessions attached and detached, and what they hold: a pass over every session,
    /// made only when `/metrics` is scraped (counting on every attach and frame would
    /// cost the hot path for a figure read every few seconds).
    pub fn occupancy(&self) -> Occupancy {
        let attached = self
            .map
            .values()
            .filter(|e| e.session.conn().is_some())
            .count();
        Occupancy {
            attached,
            detached: self.map.len() - attached,
            held_frames: self.map.values().map(|e| e.session.held_frames()).sum(),
            held_bytes: self.held_total.load(Ordering::Relaxed),
            history_bytes: self.history_total.load(Ordering::Relaxed),
        }
    }

    /// Ensures a session for `user` exists or can be made: at the cap, the longest-idle
    /// detached session goes. `false` when every session is busy (the upgrade gets 503).
    pub fn make_room_for(&mut self, user: &UserId) -> bool {
        if self.map.contains_key(user) || self.map.len() < self.limits.max_sessions {
            return true;
        }
        // Only at the cap, so the scan is rare; a heap would cost memory on every session.
        let oldest = self
            .map
            .iter()
            .filter_map(|(u, e)| e.session.idle_since().map(|t| (t, u.clone())))
            .min();
        let Some((_, victim)) = oldest else {
            return false;
        };
        let lost = self.map.get(&victim).map_or(0, |e| e.session.undelivered());
        warn!(
            "user={victim} session dropped to make room (session cap {}), {lost} undelivered frames",
            self.limits.max_sessions
        );
        self.remove(&victim);
        true
    }

    /// Attaches `conn` to `user`'s session (made if missing). The socket it replaces is
    /// closed, then the frames owed are sent: with `since`, every held frame after it;
    /// without, every held frame no socket has been handed yet.
    pub fn attach(
        &mut self,
        conn: ConnId,
        user: &UserId,
        since: Option<u64>,
        now: Now,
        out: &mut Vec<Effect>,
    ) -> SessionRef {
        let limits = self.limits.session;
        let entry = self.entry_or_new(user, now);
        let (replaced, frames) = entry.session.attach(conn, since, &limits, now);
        out.extend(replaced.map(Effect::Replace));
        out.extend(frames.into_iter().map(|f| Effect::Send(conn, f)));
        let epoch = entry.epoch;
        self.collect(user);
        SessionRef {
            user: user.clone(),
            epoch,
        }
    }

    /// `user`'s session, made if missing.
    fn entry_or_new(&mut self, user: &UserId, now: Now) -> &mut Entry {
        match self.map.entry(user.clone()) {
            MapEntry::Occupied(e) => e.into_mut(),
            MapEntry::Vacant(v) => {
                let mut session = Session::new(user.clone(), now.mono);
                if self.journal {
                    session.record_changes();
                }
                session.count_held_in(Arc::clone(&self.held_total));
                session.count_history_in(Arc::clone(&self.history_total));
                let epoch = self.next_epoch;
                self.next_epoch += 1;
                v.insert(Entry {
                    session,
                    timer_at: None,
                    epoch,
                })
            }
        }
    }

    /// Takes `conn` out of its session, which lives on, and starts its expiry clock if it
    /// has nothing left to do.
    pub fn detach(&mut self, conn: ConnId, at: &SessionRef, now: Now) -> Detached {
        let Some(entry) = self.entry_of(at) else {
            return Detached::NotAttached;
        };
        if !entry.session.detach(conn, now) {
            return Detached::NotAttached;
        }
        let running = entry.session.running().is_some();
        self.collect(&at.user);
        self.schedule_idle(&at.user);
        if running {
            Detached::TurnRunning
        } else {
            Detached::Idle
        }
    }

    /// Records that every frame up to `seq` reached the kernel of a socket of the session
    /// `at` names: its attached one, or one still closing after it was replaced.
    pub fn handed(&mut self, at: &SessionRef, seq: u64) {
        if let Some(entry) = self.entry_of(at) {
            entry.session.mark_handed(seq);
            self.collect(&at.user);
        }
    }

    /// A chat message from `conn`. Only the attached socket speaks for its session: a
    /// replaced one is closing and its messages are ignored.
    pub fn message(
        &mut self,
        conn: ConnId,
        at: &SessionRef,
        msg: ClientMessage,
        now: Now,
        out: &mut Vec<Effect>,
    ) {
        let limits = self.limits.session;
        let Some(entry) = self.attached(conn, at) else {
            return;
        };
        match entry.session.accept(msg, &limits, now) {
            Accepted::Queued => self.start_next(&at.user, now, out),
            Accepted::StillRunning => {
                debug!(
                    "user={} resent a message that is still being answered",
                    at.user
                )
            }
            Accepted::Resend(frame) => out.push(Effect::Send(conn, frame)),
            Accepted::Busy(frame) | Accepted::ReplyGone(frame) => {
                out.push(Effect::Send(conn, frame))
            }
            Accepted::RateLimited { frame, flooding } => {
                out.push(Effect::Send(conn, frame));
                if flooding {
                    out.push(Effect::Flooding(conn));
                }
            }
        }
        self.collect(&at.user);
    }

    /// Holds an error frame (a message that could not be read) for the session `conn` is
    /// attached to, and sends it there.
    pub fn error(
        &mut self,
        conn: ConnId,
        at: &SessionRef,
        name: ErrorName,
        why: String,
        now: Now,
        out: &mut Vec<Effect>,
    ) {
        let limits = self.limits.session;
        if let Some(entry) = self.attached(conn, at) {
            // Unreadable frames count against the message rate too; the error still tells
            // the client what was wrong, and a flood of them closes the socket.
            let limited = entry.session.take_rate(&limits, now).is_err();
            let frame = entry
                .session
                .push(Held::Error(name, why), None, &limits, now);
            out.push(Effect::Send(conn, frame));
            if limited && entry.session.is_flooding(&limits) {
                out.push(Effect::Flooding(conn));
            }
            self.collect(&at.user);
        }
    }

    /// Something the agent produced for turn `key`: a preview, a notification or the end.
    /// The end starts the session's next queued turn. Events of a turn that already ended
    /// (timed out) or of a session that is gone are dropped.
    pub fn turn_event(&mut self, key: &TurnKey, event: TurnEvent, now: Now, out: &mut Vec<Effect>) {
        let limits = self.limits.session;
        let Some(entry) = self.map.get_mut(&key.user) else {
            return;
        };
        let conn = entry.session.conn();
        match event {
            TurnEvent::Stream(Stream::Token(t)) => {
                if let (Some(frame), Some(conn)) = (entry.session.token(key.turn_id, &t), conn) {
                    out.push(Effect::Send(conn, frame));
                }
            }
            TurnEvent::Stream(Stream::Notification(n)) => {
                let frame = entry.session.notification(key.turn_id, n, &limits, now);
                if let (Some(frame), Some(conn)) = (frame, conn) {
                    out.push(Effect::Send(conn, frame));
                }
                self.collect(&key.user);
            }
            TurnEvent::Done(outcome) => {
                if let Err(e) = &outcome {
                    warn!("user={} turn failed: {e}", key.user);
                }
                let answers = waited_for(&self.waiters, &key.user, &entry.session);
                let Some(frame) = entry.session.finish(key.turn_id, outcome, &limits, now) else {
                    return;
                };
                wake(&mut self.waiters, &key.user, answers, &frame, out);
                match conn {
                    Some(conn) => out.push(Effect::Send(conn, frame)),
                    None => info!(
                        "user={} reply ready while away; held for the next connection",
                        key.user
                    ),
                }
                self.collect(&key.user);
                self.start_next(&key.user, now, out);
                self.schedule_idle(&key.user);
            }
        }
    }

    /// Turn `key` waits for a slot of its agent (`--openai-max-concurrent`): its time does
    /// not run yet.
    pub fn turn_waiting(&mut self, key: &TurnKey) {
        if let Some(entry) = self.map.get_mut(&key.user) {
            entry.session.set_deadline(key.turn_id, None);
        }
    }

    /// Turn `key` began to run at `now`: `--turn-timeout-secs` counts from here.
    pub fn turn_began(&mut self, key: &TurnKey, now: Instant) {
        let deadline = now + self.limits.session.turn_timeout;
        if let Some(entry) = self.map.get_mut(&key.user)
            && entry.session.set_deadline(key.turn_id, Some(deadline))
        {
            // The heap keeps one entry per session: this one replaces the earlier.
            entry.timer_at = None;
            schedule(
                &mut self.timers,
                &mut entry.timer_at,
                deadline,
                key.user.clone(),
            );
        }
    }

    /// The earliest instant [`Sessions::expire`] has something to do, if any. Entries that
    /// went stale (rescheduled, or their session gone) are dropped on the way, so the loop
    /// does not wake up for them.
    pub fn poll_at(&mut self) -> Option<Instant> {
        while let Some((at, user)) = self.timers.peek() {
            if self.map.get(user).is_some_and(|e| e.timer_at == Some(at)) {
                return Some(at);
            }
            self.timers.pop();
        }
        None
    }

    /// Ends the turns that ran past `--turn-timeout-secs` (and starts the next queued
    /// ones), and drops the sessions idle for `--session-ttl-secs`.
    pub fn expire(&mut self, now: Now, out: &mut Vec<Effect>) {
        while let Some((at, user)) = self.timers.pop_due(now.mono) {
            let Some(entry) = self.map.get_mut(&user) else {
                continue;
            };
            if entry.timer_at != Some(at) {
                continue;
            }
            entry.timer_at = None;
            self.session_due(&user, now, out);
            self.collect(&user);
        }
    }

    /// Past `--max-held-bytes-total`, the sessions holding the most bytes give up their
    /// oldest frames (never a session's newest) until the total fits; past
    /// `--max-history-bytes-total`, the sessions with the longest history forget their
    /// oldest turns. Sessions are scanned only while over a budget.
    pub fn enforce_budgets(&mut self) {
        let budget = self.limits.max_held_bytes_total;
        let shed = shed_until_within(
            &mut self.map,
            &mut self.records,
            &self.held_total,
            budget,
            |s| (s.held_frames() > 1).then(|| s.held_bytes()),
            Session::shed_oldest,
        );
        if shed > 0 {
            warn!(
                "held frames over the server-wide budget of {budget} bytes: dropped the {shed} oldest of the largest sessions"
            );
        }
        let budget = self.limits.max_history_bytes_total;
        let shed = shed_until_within(
            &mut self.map,
            &mut self.records,
            &self.history_total,
            budget,
            |s| (s.history_bytes() > 0).then(|| s.history_bytes()),
            Session::shed_oldest_turn,
        );
        if shed > 0 {
            info!(
                "history over the server-wide budget of {budget} bytes: the longest sessions forgot {shed} turns"
            );
        }
    }

    /// Cancels every running turn and forgets the queued ones (shutdown).
    pub fn cancel_all(&mut self) {
        for entry in self.map.values_mut() {
            entry.session.cancel_all();
        }
    }

    /// The session `at` names, if it is still that one.
    fn entry_of(&mut self, at: &SessionRef) -> Option<&mut Entry> {
        self.map.get_mut(&at.user).filter(|e| e.epoch == at.epoch)
    }

    /// The session `at` names, if `conn` is its attached socket.
    fn attached(&mut self, conn: ConnId, at: &SessionRef) -> Option<&mut Entry> {
        self.entry_of(at).filter(|e| e.session.conn() == Some(conn))
    }

    /// Starts `user`'s next queued turn if none is running.
    fn start_next(&mut self, user: &UserId, now: Now, out: &mut Vec<Effect>) {
        let limits = self.limits.session;
        let turn_id = self.next_turn;
        let Some(entry) = self.map.get_mut(user) else {
            return;
        };
        let Some((turn, cancel)) = entry.session.start_next(turn_id, &limits, now) else {
            return;
        };
        self.next_turn += 1;
        schedule(
            &mut self.timers,
            &mut entry.timer_at,
            now.mono + limits.turn_timeout,
            user.clone(),
        );
        out.push(Effect::Start(Job {
            key: TurnKey {
                user: user.clone(),
                turn_id,
            },
            turn,
            cancel,
        }));
    }

    /// Starts the expiry clock of `user`'s session if it has no socket and no work.
    fn schedule_idle(&mut self, user: &UserId) {
        let ttl = self.limits.ttl;
        if let Some(entry) = self.map.get_mut(user)
            && let Some(idle) = entry.session.idle_since()
        {
            schedule(
                &mut self.timers,
                &mut entry.timer_at,
                idle + ttl,
                user.clone(),
            );
        }
    }

    /// `user`'s deadline came: a turn timeout, the expiry, or neither any more.
    fn session_due(&mut self, user: &UserId, now: Now, out: &mut Vec<Effect>) {
        let limits = self.limits.session;
        let ttl = self.limits.ttl;
        let Some(entry) = self.map.get_mut(user) else {
            return;
        };
        let turn_id = entry.session.running().map(|(id, _)| id);
        let answers = waited_for(&self.waiters, user, &entry.session);
        if let Some(frame) = entry.session.check_timeout(&limits, now) {
            if let Some(turn_id) = turn_id {
                out.push(Effect::Cancel(TurnKey {
                    user: user.clone(),
                    turn_id,
                }));
            }
            warn!(
                "user={user} turn timed out after {} s",
                limits.turn_timeout.as_secs()
            );
            wake(&mut self.waiters, user, answers, &frame, out);
            if let Some(conn) = entry.session.conn() {
                out.push(Effect::Send(conn, frame));
            }
            self.start_next(user, now, out);
        }
        let Some(entry) = self.map.get_mut(user) else {
            return;
        };
        if let Some(idle) = entry.session.idle_since()
            && now.mono >= idle + ttl
        {
            let lost = entry.session.undelivered();
            if lost > 0 {
                warn!(
                    "user={user} session expired after {} s idle with {lost} undelivered frames",
                    ttl.as_secs()
                );
            } else {
                info!("user={user} session expired after {} s idle", ttl.as_secs());
            }
            self.remove(user);
            return;
        }
        let next = match (entry.session.running(), entry.session.idle_since()) {
            (Some((_, deadline)), _) => deadline,
            (None, Some(idle)) => Some(idle + ttl),
            (None, None) => None,
        };
        if let Some(next) = next {
            schedule(&mut self.timers, &mut entry.timer_at, next, user.clone());
        }
    }
}

/// The id of the message `session`'s running turn answers, if an HTTP request of `user`
/// waits (only then is it worth a copy).
fn waited_for(waiters: &[Waiter], user: &UserId, session: &Session) -> Option<String> {
    waiters
        .iter()
        .any(|w| w.user == *user)
        .then(|| session.running_msg_id().map(String::from))
        .flatten()
}

/// Answers the waiting HTTP requests for the message `id` of `user` with `frame`.
fn wake(
    waiters: &mut Vec<Waiter>,
    user: &UserId,
    id: Option<String>,
    frame: &Outgoing,
    out: &mut Vec<Effect>,
) {
    let Some(id) = id else { return };
    waiters.retain(|w| {
        let answered = w.user == *user && w.id == id;
        if answered {
            out.push(Effect::Answer(w.conn, frame.clone()));
        }
        !answered
    });
}

/// While `total` is over `budget`, asks the session with the largest `size` (`None`: has
/// nothing to give) to `shed`; returns how many times one did.
fn shed_until_within(
    sessions: &mut HashMap<UserId, Entry>,
    records: &mut Vec<(UserId, Change)>,
    total: &AtomicUsize,
    budget: usize,
    size: impl Fn(&Session) -> Option<usize>,
    shed: impl Fn(&mut Session) -> bool,
) -> usize {
    let mut count = 0;
    while total.load(Ordering::Relaxed) > budget {
        let largest = sessions
            .iter_mut()
            .filter_map(|(u, e)| size(&e.session).map(|n| (n, u, e)))
            .max_by_key(|(n, _, _)| *n);
        let Some((_, user, entry)) = largest else {
            break;
        };
        if !shed(&mut entry.session) {
            break;
        }
        collect_into(records, user, &mut entry.session);
        count += 1;
    }
    count
}

/// Moves `session`'s changes to `records`.
fn collect_into(records: &mut Vec<(UserId, Change)>, user: &UserId, session: &mut Session) {
    records.extend(
        session
            .take_changes()
            .into_iter()
            .map(|c| (user.clone(), c)),
    );
}

mod api;
mod durable;
#[cfg(test)]
mod tests;
