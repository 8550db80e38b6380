//! A user's session: who is attached, the conversation, the frames held for delivery and
//! replay, the running turn and the queued ones. Plain data and functions, no I/O: the
//! event loop calls in with the time and writes whatever comes out, so every rule of
//! PROTOCOL.md about who gets which frame is unit-tested here without a socket.

mod durable;
mod table;

pub use table::{Detached, Effect, SessionRef, Sessions, TableLimits};

use crate::agent::{AgentError, CancelToken, HistoryEntry, Turn, Who};
use crate::conn::ConnId;
use crate::limits::Bucket;
use crate::protocol::{ClientMessage, ErrorName, Held, UserId, encode_held, encode_token};
use crate::store::Change;
use crate::tally::Tally;
use log::warn;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};
use tungstenite::Utf8Bytes;

/// The session bounds from the configuration.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Turns of history kept (each is a user line and a reply line).
    pub history_turns: usize,
    /// Frames with a seq kept for delivery and replay.
    pub max_held_frames: usize,
    /// Bytes of those frames kept; the newest frame stays even if it alone is larger.
    pub max_held_bytes: usize,
    /// Turns that may wait behind the running one.
    pub max_queued_turns: usize,
    /// Longest a turn may run.
    pub turn_timeout: Duration,
    /// Messages a minute (token bucket; 0: no limit).
    pub max_messages_per_minute: u32,
}

/// The time, passed in so the logic never reads a clock.
#[derive(Clone, Copy, Debug)]
pub struct Now {
    /// For deadlines.
    pub mono: Instant,
    /// Unix seconds, for the `when` of a chat frame.
    pub unix: f64,
}

/// A frame for the attached socket.
#[derive(Clone, Debug)]
pub struct Outgoing {
    /// The frame's seq; `None` for `chat_token` previews, which are never held.
    pub seq: Option<u64>,
    /// The encoded JSON.
    pub text: Utf8Bytes,
}

/// A frame kept for delivery and replay.
#[derive(Clone, Debug)]
struct HeldFrame {
    seq: u64,
    text: Utf8Bytes,
}

/// What became of a client message id the session has seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IdState {
    /// Queued or running.
    Pending,
    /// Answered by the frame with this seq.
    Answered(u64),
}

/// The turn being answered.
#[derive(Debug)]
struct Running {
    turn_id: u64,
    /// The message it answers, kept whole so that a state snapshot can run it again.
    msg: ClientMessage,
    /// `None` while the turn waits for an upstream slot: its time starts when it runs.
    deadline: Option<Instant>,
    cancel: CancelToken,
}

/// What [`Session::accept`] did with a message.
#[derive(Debug)]
pub enum Accepted {
    /// Queued; call [`Session::start_next`] if nothing is running.
    Queued,
    /// A resend of a message that is still queued or running: nothing to do.
    StillRunning,
    /// A resend of an answered message: here is the reply again.
    Resend(Outgoing),
    /// Refused: this `Busy` error goes to the client.
    Busy(Outgoing),
    /// A resend of an answered message whose reply is no longer held: this error says so.
    ReplyGone(Outgoing),
    /// Past `--max-messages-per-minute`: not run, this `RateLimited` error says so.
    /// `flooding`: the client went on far past the limit without slowing down, so the
    /// socket should go (each refusal is a held frame, and with a state dir a record).
    RateLimited {
        /// The error frame.
        frame: Outgoing,
        /// Refused messages in a row are past [`flood_after`].
        flooding: bool,
    },
}

/// Refused messages in a row after which a client counts as flooding: a minute's allowance
/// (at least 10), so a client that backs off after a `RateLimited` never reaches it.
pub fn flood_after(per_minute: u32) -> u32 {
    per_minute.max(10)
}

/// One user's conversation, which outlives any socket.
#[derive(Debug)]
pub struct Session {
    user: UserId,
    conn: Option<ConnId>,
    history: VecDeque<HistoryEntry>,
    /// The Unix time of each line of `history` (the HTTP API shows it).
    history_when: VecDeque<f64>,
    /// Bytes of the lines in `history`.
    history_bytes: Tally,
    held: VecDeque<HeldFrame>,
    /// Bytes of the frames in `held`.
    held_bytes: Tally,
    next_seq: u64,
    /// Every frame with a seq up to this one reached the kernel of some socket.
    handed_upto: u64,
    running: Option<Running>,
    queue: VecDeque<ClientMessage>,
    ids: VecDeque<(String, IdState)>,
    idle_since: Instant,
    /// With a state dir: the changes not yet taken by the session table for the journal.
    changes: Option<Vec<Change>>,
    /// `--max-messages-per-minute`'s bucket, made at the first message (not kept across a
    /// restart: a restart refills it).
    rate: Option<Bucket>,
    /// Messages refused by the rate limit since the last one taken.
    refused_in_row: u32,
}

impl Session {
    /// A new, empty session.
    pub fn new(user: UserId, now: Instant) -> Session {
        Session {
            user,
            conn: None,
            history: VecDeque::new(),
            history_when: VecDeque::new(),
            history_bytes: Tally::default(),
            held: VecDeque::new(),
            held_bytes: Tally::default(),
            next_seq: 1,
            handed_upto: 0,
            running: None,
            queue: VecDeque::new(),
            ids: VecDeque::new(),
            idle_since: now,
            changes: None,
            rate: None,
            refused_in_row: 0,
        }
    }

    /// From now on, every change is kept for [`Session::take_changes`].
    pub fn record_changes(&mut self) {
        self.changes.get_or_insert_with(Vec::new);
    }

    /// The changes since the last call, in order, for the journal.
    pub fn take_changes(&mut self) -> Vec<Change> {
        self.changes
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    fn log(&mut self, change: Change) {
        if let Some(changes) = &mut self.changes {
            changes.push(change);
        }
    }

    /// The attached connection.
    pub fn conn(&self) -> Option<ConnId> {
        self.conn
    }

    /// Attaches `conn` and returns the connection it replaces, if any, and the frames to
    /// send it first: with `since`, every held frame after it; without, every held frame no
    /// socket has been handed yet. A `ResumeGap` error comes first when some of those
    /// frames are no longer held.
    pub fn attach(
        &mut self,
        conn: ConnId,
        since: Option<u64>,
        limits: &Limits,
        now: Now,
    ) -> (Option<ConnId>, Vec<Outgoing>) {
        let replaced = self.conn.replace(conn).filter(|old| *old != conn);
        if replaced.is_none() {
            self.log(Change::Attached);
        }
        let last = self.next_seq - 1;
        let from = since.unwrap_or(self.handed_upto);
        let mut replay: Vec<Outgoing> = self
            .held
            .iter()
            .filter(|f| f.seq > from)
            .map(|f| Outgoing {
                seq: Some(f.seq),
                text: f.text.clone(),
            })
            .collect();
        let oldest = self.held.front().map_or(self.next_seq, |f| f.seq);
        let gap = if from > last {
            // The client saw seqs this session never issued: the server restarted or the
            // session expired. Carry on numbering above what the client has.
            self.next_seq = from + 1;
            Some(format!(
                "frames after seq {from} are not held: the session was restarted or expired"
            ))
        } else if from + 1 < oldest {
            Some(format!(
                "frames {} to {} are no longer held",
                from + 1,
                oldest - 1
            ))
        } else {
            None
        };
        if let Some(why) = gap {
            warn!("user={} resume gap: {why}", self.user);
            let frame = self.push(Held::Error(ErrorName::ResumeGap, why), None, limits, now);
            replay.insert(0, frame);
        }
        (replaced, replay)
    }

    /// Detaches `conn` if it is the attached one (a replaced connection is not).
    pub fn detach(&mut self, conn: ConnId, now: Now) -> bool {
        if self.conn == Some(conn) {
            self.conn = None;
            self.idle_since = now.mono;
            self.log(Change::Idle { unix: now.unix });
            true
        } else {
            false
        }
    }

    /// Records that every frame up to `seq` reached the kernel of the attached socket.
    pub fn mark_handed(&mut self, seq: u64) {
        if seq > self.handed_upto {
            self.handed_upto = seq;
            self.log(Change::Handed { seq });
        }
    }

    /// Holds a new frame, evicting the oldest past the bound, and returns it for sending.
    pub fn push(
        &mut self,
        frame: Held,
        reply_to: Option<&str>,
        limits: &Limits,
        now: Now,
    ) -> Outgoing {
        let seq = self.next_seq;
        self.next_seq += 1;
        let text = Utf8Bytes::from(encode_held(&frame, &self.user, seq, reply_to, now.unix));
        self.held_bytes.add(text.len());
        self.held.push_back(HeldFrame {
            seq,
            text: text.clone(),
        });
        self.log(Change::Frame {
            seq,
            text: text.clone(),
        });
        self.trim_held(limits, "held frames full");
        Outgoing {
            seq: Some(seq),
            text,
        }
    }

    /// Takes a client message: queues it, or says why not.
    pub fn accept(&mut self, msg: ClientMessage, limits: &Limits, now: Now) -> Accepted {
        if let Some(id) = &msg.id
            && let Some((_, state)) = self.ids.iter().find(|(seen, _)| seen == id)
        {
            return match *state {
                IdState::Pending => Accepted::StillRunning,
                IdState::Answered(seq) => match self.held.iter().find(|f| f.seq == seq) {
                    Some(f) => Accepted::Resend(Outgoing {
                        seq: Some(f.seq),
                        text: f.text.clone(),
                    }),
                    None => {
                        let why =
                            format!("the reply to message {id} (seq {seq}) is no longer held");
                        let id = id.clone();
                        Accepted::ReplyGone(self.push(
                            Held::Error(ErrorName::ResumeGap, why),
                            Some(&id),
                            limits,
                            now,
                        ))
                    }
                },
            };
        }
        if let Err(wait) = self.take_rate(limits, now) {
            let per_minute = limits.max_messages_per_minute;
            let why = format!(
                "more than {per_minute} messages a minute; this one was not run, send it again in {} s",
                wait.as_secs().max(1)
            );
            let id = msg.id.clone();
            return Accepted::RateLimited {
                flooding: self.is_flooding(limits),
                frame: self.push(
                    Held::Error(ErrorName::RateLimited, why),
                    id.as_deref(),
                    limits,
                    now,
                ),
            };
        }
        if self.running.is_some() && self.queue.len() >= limits.max_queued_turns {
            let why = format!(
                "{} turns are already waiting; try again when they are answered",
                self.queue.len()
            );
            let id = msg.id.clone();
            return Accepted::Busy(self.push(
                Held::Error(ErrorName::Busy, why),
                id.as_deref(),
                limits,
                now,
            ));
        }
        if self.changes.is_some() {
            self.log(Change::Accepted(msg.clone()));
        }
        self.enqueue(msg, limits);
        Accepted::Queued
    }

    /// Takes one message's worth from the `--max-messages-per-minute` bucket; else how long
    /// until there is one. Every frame a client sends that is answered with a held frame
    /// counts, unreadable ones too: an error frame costs as much as a reply to hold and
    /// to journal.
    pub fn take_rate(&mut self, limits: &Limits, now: Now) -> Result<(), Duration> {
        let per_minute = limits.max_messages_per_minute;
        if per_minute == 0 {
            return Ok(());
        }
        let bucket = self
            .rate
            .get_or_insert_with(|| Bucket::full(per_minute, now.mono));
        match bucket.take(per_minute, now.mono) {
            Ok(()) => {
                self.refused_in_row = 0;
                Ok(())
            }
            Err(wait) => {
                self.refused_in_row = self.refused_in_row.saturating_add(1);
                Err(wait)
            }
        }
    }

    /// The client went on far past the rate limit without slowing down: its socket should go.
    pub fn is_flooding(&self, limits: &Limits) -> bool {
        self.refused_in_row > flood_after(limits.max_messages_per_minute)
    }

    /// Queues an accepted message and remembers its id as pending.
    fn enqueue(&mut self, msg: ClientMessage, limits: &Limits) {
        if let Some(id) = &msg.id {
            self.remember_id(id.clone(), IdState::Pending, limits);
        }
        self.queue.push_back(msg);
    }

    fn remember_id(&mut self, id: String, state: IdState, limits: &Limits) {
        self.ids.push_back((id, state));
        // Ids of answered messages are only useful while their replies are held.
        let cap = limits.max_held_frames + limits.max_queued_turns + 1;
        while self.ids.len() > cap {
            match self.ids.iter().position(|(_, s)| *s != IdState::Pending) {
                Some(i) => drop(self.ids.remove(i)),
                None => break,
            }
        }
    }

    /// Starts the next queued turn if none is running; returns what the agent needs.
    pub fn start_next(
        &mut self,
        turn_id: u64,
        limits: &Limits,
        now: Now,
    ) -> Option<(Turn, CancelToken)> {
        if self.running.is_some() {
            return None;
        }
        let msg = self.queue.pop_front()?;
        let cancel = CancelToken::new();
        let turn = Turn {
            user: self.user.clone(),
            text: msg.text.clone(),
            fields: msg.fields.clone(),
            history: self.history.iter().cloned().collect(),
        };
        self.running = Some(Running {
            turn_id,
            msg,
            deadline: Some(now.mono + limits.turn_timeout),
            cancel: cancel.clone(),
        });
        Some((turn, cancel))
    }

    /// The client's id of the message the running turn answers.
    pub fn running_msg_id(&self) -> Option<&str> {
        self.running.as_ref().and_then(|r| r.msg.id.as_deref())
    }

    /// The running turn's id and deadline.
    pub fn running(&self) -> Option<(u64, Option<Instant>)> {
        self.running.as_ref().map(|r| (r.turn_id, r.deadline))
    }

    /// Sets the running turn's deadline (`None`: it waits and has none yet); `false` if
    /// `turn_id` is not the running turn.
    pub fn set_deadline(&mut self, turn_id: u64, deadline: Option<Instant>) -> bool {
        match self.running.as_mut().filter(|r| r.turn_id == turn_id) {
            Some(r) => {
                r.deadline = deadline;
                true
            }
            None => false,
        }
    }

    /// A preview token of the running turn; `None` if the turn is not running any more.
    pub fn token(&self, turn_id: u64, text: &str) -> Option<Outgoing> {
        let running = self.running.as_ref().filter(|r| r.turn_id == turn_id)?;
        let _ = running;
        Some(Outgoing {
            seq: None,
            text: Utf8Bytes::from(encode_token(text)),
        })
    }

    /// A notification of the running turn, held like any frame with a seq.
    pub fn notification(
        &mut self,
        turn_id: u64,
        text: String,
        limits: &Limits,
        now: Now,
    ) -> Option<Outgoing> {
        let reply_to = self
            .running
            .as_ref()
            .filter(|r| r.turn_id == turn_id)?
            .msg
            .id
            .clone();
        Some(self.push(Held::Notification(text), reply_to.as_deref(), limits, now))
    }

    /// Ends the running turn with the agent's outcome; `None` if it already ended (timeout).
    pub fn finish(
        &mut self,
        turn_id: u64,
        outcome: Result<String, AgentError>,
        limits: &Limits,
        now: Now,
    ) -> Option<Outgoing> {
        if self.running.as_ref().is_none_or(|r| r.turn_id != turn_id) {
            return None;
        }
        let running = self.running.take()?;
        let frame = match outcome {
            Ok(text) => {
                let human = Arc::from(running.msg.text.as_str());
                self.remember(Who::Human, human, now.unix, limits);
                self.remember(Who::Ai, Arc::from(text.as_str()), now.unix, limits);
                Held::Chat {
                    text,
                    input: running.msg.text,
                }
            }
            Err(AgentError::Failed(why)) => Held::Error(ErrorName::AgentError, why),
            Err(AgentError::Cancelled) => {
                Held::Error(ErrorName::AgentError, "the turn was cancelled".into())
            }
        };
        Some(self.close_turn(running.msg.id, frame, limits, now))
    }

    /// Ends the running turn with `Timeout` if its deadline has passed.
    pub fn check_timeout(&mut self, limits: &Limits, now: Now) -> Option<Outgoing> {
        if self
            .running
            .as_ref()
            .is_none_or(|r| r.deadline.is_none_or(|d| d > now.mono))
        {
            return None;
        }
        let running = self.running.take()?;
        running.cancel.cancel();
        let why = format!("no answer within {} s", limits.turn_timeout.as_secs());
        Some(self.close_turn(
            running.msg.id,
            Held::Error(ErrorName::Timeout, why),
            limits,
            now,
        ))
    }

    /// Cancels the running turn and forgets the queued ones (shutdown).
    pub fn cancel_all(&mut self) {
        if let Some(r) = self.running.take() {
            r.cancel.cancel();
        }
        self.queue.clear();
    }

    /// A session with no socket and no work, and since when.
    pub fn idle_since(&self) -> Option<Instant> {
        (self.conn.is_none() && self.running.is_none() && self.queue.is_empty())
            .then_some(self.idle_since)
    }

    /// Counts this session's held bytes into `total` too: the server's budget across all
    /// sessions. The count leaves `total` again as frames go and when the session is dropped.
    pub fn count_held_in(&mut self, total: Arc<AtomicUsize>) {
        self.held_bytes.count_in(total);
    }

    /// Bytes of the frames this session holds.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes.get()
    }

    /// Frames this session holds.
    pub fn held_frames(&self) -> usize {
        self.held.len()
    }

    /// Drops the oldest held frame to make room for other sessions, but never the newest
    /// one (a reply just finished must reach its user); `false` when nothing could go.
    pub fn shed_oldest(&mut self) -> bool {
        if self.held.len() < 2 {
            return false;
        }
        self.drop_oldest("server-wide held bytes full");
        true
    }

    fn drop_oldest(&mut self, why: &str) {
        let Some(old) = self.held.pop_front() else {
            return;
        };
        self.held_bytes.sub(old.text.len());
        self.log(Change::DropFrame);
        if old.seq > self.handed_upto {
            warn!(
                "user={} {why}: dropping undelivered frame seq={}",
                self.user, old.seq
            );
        }
    }

    /// Held frames no socket was handed.
    pub fn undelivered(&self) -> usize {
        self.held
            .iter()
            .filter(|f| f.seq > self.handed_upto)
            .count()
    }

    fn close_turn(
        &mut self,
        msg_id: Option<String>,
        frame: Held,
        limits: &Limits,
        now: Now,
    ) -> Outgoing {
        let out = self.push(frame, msg_id.as_deref(), limits, now);
        let seq = out.seq.unwrap_or_default();
        self.answered(msg_id, seq);
        self.log(Change::Finished { seq });
        self.idle_since = now.mono;
        if self.conn.is_none() {
            self.log(Change::Idle { unix: now.unix });
        }
        out
    }

    /// The message with `msg_id`, if it had one, was answered by the frame with `seq`.
    fn answered(&mut self, msg_id: Option<String>, seq: u64) {
        if let Some(id) = msg_id
            && let Some(entry) = self.ids.iter_mut().find(|(seen, _)| *seen == id)
        {
            entry.1 = IdState::Answered(seq);
        }
    }

    fn remember(&mut self, who: Who, text: Arc<str>, unix: f64, limits: &Limits) {
        self.history_bytes.add(text.len());
        self.log(Change::Line {
            who,
            text: Arc::clone(&text),
            unix,
        });
        self.history.push_back(HistoryEntry { who, text });
        self.history_when.push_back(unix);
        self.trim_history(limits);
    }

    /// Forgets the oldest lines past `--history-turns`.
    fn trim_history(&mut self, limits: &Limits) {
        while self.history.len() > limits.history_turns * 2 {
            self.forget_oldest_line();
        }
    }

    /// Drops the oldest held frames past the session's bounds; the newest always stays.
    fn trim_held(&mut self, limits: &Limits, why: &str) {
        while self.held.len() > limits.max_held_frames.max(1)
            || (self.held_bytes.get() > limits.max_held_bytes && self.held.len() > 1)
        {
            self.drop_oldest(why);
        }
    }

    fn forget_oldest_line(&mut self) {
        if let Some(old) = self.history.pop_front() {
            self.history_when.pop_front();
            self.history_bytes.sub(old.text.len());
            self.log(Change::ForgetLine);
        }
    }

    /// Counts this session's history bytes into `total` too: the server's budget across all
    /// sessions. The count leaves `total` again as lines go and when the session is dropped.
    pub fn count_history_in(&mut self, total: Arc<AtomicUsize>) {
        self.history_bytes.count_in(total);
    }

    /// The conversation history, oldest first, with the Unix time of each line.
    pub fn history(&self) -> impl Iterator<Item = (&HistoryEntry, f64)> {
        self.history.iter().zip(self.history_when.iter().copied())
    }

    /// Forgets the conversation history (a new conversation). Held frames and the seq
    /// counter stay: a resume and a resent id still work.
    pub fn forget_history(&mut self) {
        while !self.history.is_empty() {
            self.forget_oldest_line();
        }
    }

    /// Bytes of the conversation history this session keeps.
    pub fn history_bytes(&self) -> usize {
        self.history_bytes.get()
    }

    /// Forgets the oldest turn of the history (the user's line and the reply) to make room
    /// for other sessions; `false` when there is none.
    pub fn shed_oldest_turn(&mut self) -> bool {
        if self.history.is_empty() {
            return false;
        }
        self.forget_oldest_line();
        // Keep the history starting with a user line, as the agent expects.
        if self.history.front().is_some_and(|h| h.who == Who::Ai) {
            self.forget_oldest_line();
        }
        true
    }
}

#[cfg(test)]
mod tests;
