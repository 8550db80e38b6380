//! Chat messages into the session table, and what it answers back out: frames to sockets,
//! replaced sockets closed, turns handed to the worker pool, and the pool's results.

use super::Server;
use super::io::CLOSE_TIMEOUT;
use crate::agent::AgentError;
use crate::agent::{Stream, TurnEvent, TurnKey};
use crate::conn::{ConnId, Kind};
use crate::metrics::Outcome;
use crate::protocol::{ErrorName, parse_client_message};
use crate::session::Effect;
use log::{debug, error, info, warn};
use tungstenite::Message;
use tungstenite::protocol::frame::coding::CloseCode;

impl Server {
    /// A message from an open WebSocket.
    pub(super) fn on_message(&mut self, id: ConnId, msg: Message) {
        let now = self.now;
        let Some(conn) = self.conn(id) else { return };
        let peer = conn.peer();
        let Some(kind) = conn.kind().cloned() else {
            return;
        };
        match (kind, msg) {
            (Kind::Echo, m @ (Message::Text(_) | Message::Binary(_))) => {
                let result = conn.write(m);
                self.settle(id, result);
            }
            (Kind::Chat(at), Message::Text(text)) => match parse_client_message(text.as_str()) {
                Ok(msg) => self.sessions.message(id, &at, msg, now, &mut self.effects),
                Err(bad) => {
                    info!("user={} peer={peer} invalid message: {}", at.user, bad.0);
                    let (name, why) = (ErrorName::InvalidMessage, bad.0);
                    self.sessions
                        .error(id, &at, name, why, now, &mut self.effects);
                }
            },
            (Kind::Chat(at), Message::Binary(_)) => {
                info!("user={} peer={peer} sent a binary frame", at.user);
                let why = "binary frames are not accepted; send JSON text".to_string();
                let name = ErrorName::InvalidMessage;
                self.sessions
                    .error(id, &at, name, why, now, &mut self.effects);
            }
            (_, Message::Close(frame)) => {
                debug!("user={} peer={peer} sent close {frame:?}", conn.user());
                // Tungstenite queued the reply; the socket goes once it is flushed.
                self.begin_closing(id);
                self.detach(id);
            }
            _ => {}
        }
        self.apply_effects();
    }

    /// Takes the worker pool's results to the session table.
    pub(super) fn drain_results(&mut self) {
        while let Some((key, event)) = self.pool.as_ref().and_then(|p| p.try_result()) {
            self.turn_event(&key, event);
        }
        self.apply_effects();
    }

    /// Hands what an agent produced for turn `key` to the session table, timing the turn
    /// on the way (first token, end). Every agent's events pass here.
    pub(super) fn turn_event(&mut self, key: &TurnKey, event: TurnEvent) {
        let now = self.now;
        match &event {
            TurnEvent::Stream(Stream::Token(_)) => self.metrics.token(key.turn_id, now.mono),
            TurnEvent::Stream(Stream::Notification(_)) => {}
            TurnEvent::Done(outcome) => {
                // As the session table words it: a cancelled turn ends with AgentError.
                let outcome = match outcome {
                    Ok(_) => Outcome::Chat,
                    Err(_) => Outcome::AgentError,
                };
                self.metrics
                    .turn_ended(key.turn_id, outcome, now.mono, now.unix);
            }
        }
        self.sessions.turn_event(key, event, now, &mut self.effects);
    }

    /// Does what the session table asked for, in order.
    pub(super) fn apply_effects(&mut self) {
        let mut batch = std::mem::take(&mut self.effects);
        while !batch.is_empty() {
            for effect in batch.drain(..) {
                match effect {
                    Effect::Send(id, frame) => self.write_to(id, frame),
                    Effect::Replace(id) => self.replace(id),
                    Effect::Cancel(key) => {
                        // The table cancels a turn only when it timed out.
                        let now = self.now;
                        self.metrics
                            .turn_ended(key.turn_id, Outcome::Timeout, now.mono, now.unix);
                        self.cancel_task(&key);
                    }
                    Effect::Answer(id, frame) => self.answer_frame(id, frame),
                    Effect::Flooding(id) => {
                        let per_minute = self.config.max_messages_per_minute;
                        if let Some(conn) = self.conn(id) {
                            warn!(
                                "user={} peer={} kept sending past --max-messages-per-minute ({}); closing with 1008",
                                conn.user(),
                                conn.peer(),
                                per_minute
                            );
                        }
                        self.close_conn(id, CloseCode::Policy, "message rate limit");
                    }
                    Effect::Start(job) if self.tasks.is_some() => {
                        self.metrics.turn_started(job.key.turn_id, self.now.mono);
                        self.submit_task(job);
                    }
                    Effect::Start(job) => {
                        self.metrics.turn_started(job.key.turn_id, self.now.mono);
                        let key = job.key.clone();
                        if self.pool.as_ref().is_some_and(|p| p.submit(job)) {
                            continue;
                        }
                        error!(
                            "user={} no worker thread is running; the turn fails",
                            key.user
                        );
                        let failed = AgentError::Failed("no worker available".into());
                        self.turn_event(&key, TurnEvent::Done(Err(failed)));
                    }
                }
            }
            // A failed start answered with more effects: they go next.
            std::mem::swap(&mut batch, &mut self.effects);
        }
        self.effects = batch;
    }

    /// A newer socket took over `id`'s session: close it with 1000 `replaced`. What it had
    /// queued still goes out during its close handshake.
    fn replace(&mut self, id: ConnId) {
        let deadline = self.now.mono + CLOSE_TIMEOUT;
        // Only an attached socket is replaced, and that one is open; a closing one keeps
        // its deadline.
        let Some(conn) = self.conn(id).filter(|c| c.is_open()) else {
            return;
        };
        info!(
            "user={} peer={} replaced by a new connection; closing it with 1000",
            conn.user(),
            conn.peer()
        );
        let _ = conn.close(CloseCode::Normal, "replaced", deadline);
        self.metrics.replaced();
        self.metrics.closed(CloseCode::Normal.into());
        if let Some(slot) = self.slot(id) {
            slot.timer_at = None;
        }
        self.schedule_conn(id, deadline);
        self.flush_queue.push(id);
    }
}
