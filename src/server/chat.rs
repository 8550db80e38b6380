//! Messages in and frames out: reading WebSocket messages with a per-connection budget,
//! routing chat messages to sessions and turns to the worker pool, delivering session
//! frames, flushing, closing, and taking worker results back.

use super::*;

impl Server {
    pub(super) fn queue_read(&mut self, id: ConnId) {
        if let Some(conn) = self.conn(id)
            && !conn.queued_read
        {
            conn.queued_read = true;
            self.read_queue.push_back(id);
        }
    }

    pub(super) fn serve_read_queue(&mut self) {
        for _ in 0..self.read_queue.len() {
            let Some(id) = self.read_queue.pop_front() else {
                break;
            };
            let Some(conn) = self.conn(id) else { continue };
            conn.queued_read = false;
            self.read_messages(id);
        }
    }

    pub(super) fn read_messages(&mut self, id: ConnId) {
        for _ in 0..READ_BUDGET_MESSAGES {
            let now = Instant::now();
            let Some(conn) = self.conn(id) else { return };
            let closing = matches!(conn.phase, Phase::Closing(_));
            let result = conn.read_message();
            if let WsRead::Message(_) = result {
                conn.last_rx = now;
            }
            match result {
                WsRead::Idle => return,
                WsRead::Closed => return self.remove(id, "closed"),
                WsRead::Lost(why) => return self.remove(id, &why),
                WsRead::Fail(code, why) => {
                    let (user, peer) = (conn.user().to_string(), conn.peer);
                    warn!(
                        "user={user} peer={peer} closing with {}: {why}",
                        u16::from(code)
                    );
                    self.close_conn(id, code, why);
                    return;
                }
                WsRead::Message(msg) => {
                    if closing {
                        continue;
                    }
                    self.on_message(id, msg);
                }
            }
        }
        // Budget spent: come back to this connection after the others had their turn.
        self.queue_read(id);
    }

    pub(super) fn on_message(&mut self, id: ConnId, msg: Message) {
        let Some(conn) = self.conn(id) else { return };
        match (&conn.kind, msg) {
            (Some(Kind::Echo), m @ (Message::Text(_) | Message::Binary(_))) => {
                let result = conn.write(m);
                self.after_write(id, result);
            }
            (Some(Kind::Chat { user, .. }), Message::Text(text)) => {
                let user = user.clone();
                self.on_chat_text(id, user, text.as_str());
            }
            (Some(Kind::Chat { user, .. }), Message::Binary(_)) => {
                let user = user.clone();
                info!("user={user} peer={} sent a binary frame", conn.peer);
                self.push_error(
                    &user,
                    ErrorName::InvalidMessage,
                    "binary frames are not accepted; send JSON text".into(),
                    None,
                );
            }
            (_, Message::Close(frame)) => {
                let (user, peer) = (conn.user().to_string(), conn.peer);
                debug!("user={user} peer={peer} sent close {frame:?}");
                // Tungstenite queued the reply; the socket goes once it is flushed.
                self.phase_to_closing(id);
                self.detach(id);
            }
            _ => {}
        }
    }

    pub(super) fn on_chat_text(&mut self, id: ConnId, user: UserId, text: &str) {
        let now = self.now();
        let peer = self.conn(id).map(|c| c.peer);
        let msg = match parse_client_message(text) {
            Ok(m) => m,
            Err(bad) => {
                info!(
                    "user={user} peer={} invalid message: {}",
                    peer.map(|p| p.to_string()).unwrap_or_default(),
                    bad.0
                );
                self.push_error(&user, ErrorName::InvalidMessage, bad.0, None);
                return;
            }
        };
        let limits = self.limits;
        let Some(entry) = self.sessions.get_mut(&user) else {
            return;
        };
        // Only the attached socket speaks for the session; a replaced one is closing.
        if entry.session.conn() != Some(id) {
            return;
        }
        match entry.session.accept(msg, &limits, now) {
            Accepted::Queued => self.start_turn(&user),
            Accepted::StillRunning => {
                debug!("user={user} resent a message that is still being answered")
            }
            Accepted::Resend(frame) => self.write_to(id, frame),
            Accepted::Busy(frame) | Accepted::ReplyGone(frame) => self.deliver(&user, frame),
        }
    }

    pub(super) fn start_turn(&mut self, user: &UserId) {
        let now = self.now();
        let limits = self.limits;
        let turn_id = self.next_turn;
        let Some(entry) = self.sessions.get_mut(user) else {
            return;
        };
        let Some((turn, cancel)) = entry.session.start_next(turn_id, &limits, now) else {
            return;
        };
        self.next_turn += 1;
        let deadline = now.mono + limits.turn_timeout;
        schedule(
            &mut self.timers,
            &mut entry.timer_at,
            deadline,
            TimerKey::Session(user.clone()),
        );
        let job = Job {
            key: TurnKey {
                user: user.clone(),
                turn_id,
            },
            turn,
            cancel,
        };
        if !self.pool.submit(job) {
            error!("user={user} no worker thread is running; the turn fails");
            let limits = self.limits;
            let frame = self.sessions.get_mut(user).and_then(|e| {
                e.session.finish(
                    turn_id,
                    Err(crate::agent::AgentError::Failed(
                        "no worker available".into(),
                    )),
                    &limits,
                    now,
                )
            });
            if let Some(f) = frame {
                self.deliver(user, f);
            }
        }
    }

    pub(super) fn push_error(
        &mut self,
        user: &UserId,
        name: ErrorName,
        why: String,
        reply_to: Option<&str>,
    ) {
        let now = self.now();
        let limits = self.limits;
        if let Some(entry) = self.sessions.get_mut(user) {
            let frame = entry
                .session
                .push(Held::Error(name, why), reply_to, &limits, now);
            self.deliver(user, frame);
        }
    }

    /// Sends a session frame to the session's socket, if it has one.
    pub(super) fn deliver(&mut self, user: &UserId, frame: Outgoing) {
        if let Some(id) = self.sessions.get(user).and_then(|e| e.session.conn()) {
            self.write_to(id, frame);
        }
    }

    pub(super) fn write_to(&mut self, id: ConnId, frame: Outgoing) {
        let Some(conn) = self.conn(id) else { return };
        if !conn.is_open() {
            return;
        }
        let result = conn.write_text(frame.text, frame.seq);
        self.after_write(id, result);
    }

    pub(super) fn after_write(&mut self, id: ConnId, result: WsWrite) {
        match result {
            WsWrite::Ok | WsWrite::Pending => {
                if let Some(conn) = self.conn(id)
                    && conn.dirty
                {
                    self.flush_queue.push(id);
                }
            }
            WsWrite::Full => {
                if let Some(conn) = conn_mut(&mut self.conns, id) {
                    warn!(
                        "user={} peer={} slow consumer: more than {} bytes unread, closing with 1008; undelivered frames stay held",
                        conn.user(),
                        conn.peer,
                        self.config.max_buffered_bytes
                    );
                }
                self.close_conn(id, CloseCode::Policy, "slow consumer");
            }
            WsWrite::Closed => self.remove(id, "closed"),
            WsWrite::Lost(why) => self.remove(id, &why),
        }
    }

    pub(super) fn flush_all(&mut self) {
        let queue = std::mem::take(&mut self.flush_queue);
        for id in queue {
            if self.conn(id).is_some_and(|c| c.dirty) {
                self.flush(id);
            }
        }
    }

    pub(super) fn flush(&mut self, id: ConnId) {
        let Some(conn) = conn_mut(&mut self.conns, id) else {
            return;
        };
        let result = conn.flush();
        // Frames the kernel took are handed, whether or not this socket is still the
        // session's: a closing socket still delivers what it had queued.
        if let Some(seq) = conn.take_handed()
            && let Some(user) = conn.chat_user().cloned()
            && let Some(entry) = self.sessions.get_mut(&user)
            && entry.epoch == conn.session_epoch
        {
            entry.session.mark_handed(seq);
        }
        match result {
            WsWrite::Ok | WsWrite::Pending => {}
            WsWrite::Full => self.after_write(id, WsWrite::Full),
            WsWrite::Closed => self.remove(id, "closed"),
            WsWrite::Lost(why) => self.remove(id, &why),
        }
    }

    /// Starts the close handshake and detaches the socket from its session.
    pub(super) fn close_conn(&mut self, id: ConnId, code: CloseCode, reason: &str) {
        self.detach(id);
        let deadline = Instant::now() + CLOSE_TIMEOUT;
        let Some(conn) = self.conn(id) else { return };
        match conn.close(code, reason, deadline) {
            WsWrite::Ok | WsWrite::Pending | WsWrite::Full => {
                conn.timer_at = None;
                self.schedule_conn(id, deadline);
            }
            WsWrite::Closed => self.remove(id, "closed"),
            WsWrite::Lost(why) => self.remove(id, &why),
        }
    }

    pub(super) fn phase_to_closing(&mut self, id: ConnId) {
        let deadline = Instant::now() + CLOSE_TIMEOUT;
        if let Some(conn) = self.conn(id)
            && let Phase::Open(_) = conn.phase
        {
            if let Phase::Open(ws) = std::mem::replace(&mut conn.phase, Phase::Gone) {
                conn.phase = Phase::Closing(ws);
            }
            conn.deadline = deadline;
            conn.timer_at = None;
            conn.dirty = true;
            self.flush_queue.push(id);
            self.schedule_conn(id, deadline);
        }
    }

    /// Takes the socket out of its session (the session lives on).
    pub(super) fn detach(&mut self, id: ConnId) {
        let now = Instant::now();
        let Some(conn) = self.conn(id) else { return };
        let Some(user) = conn.chat_user().cloned() else {
            return;
        };
        let peer = conn.peer;
        let ttl = self.config.session_ttl;
        let Some(entry) = self.sessions.get_mut(&user) else {
            return;
        };
        if !entry.session.detach(id, now) {
            return;
        }
        if entry.session.running().is_some() {
            warn!(
                "user={user} peer={peer} left while a turn was running; its reply will be held for the next connection"
            );
        } else {
            info!("user={user} peer={peer} disconnected");
        }
        if let Some(idle) = entry.session.idle_since() {
            schedule(
                &mut self.timers,
                &mut entry.timer_at,
                idle + ttl,
                TimerKey::Session(user),
            );
        }
    }

    pub(super) fn remove(&mut self, id: ConnId, why: &str) {
        self.detach(id);
        let Some(conn) = conn_mut(&mut self.conns, id) else {
            return;
        };
        let (user, peer) = (conn.user().to_string(), conn.peer);
        if let Some(stream) = conn.stream_mut() {
            let _ = self.poll.registry().deregister(stream);
        }
        debug!("user={user} peer={peer} connection ended: {why}");
        let conn = self.conns.remove(id.slot);
        if conn.refusing {
            self.refusing = self.refusing.saturating_sub(1);
        }
        if self.accept_paused {
            self.accept_paused = false;
            self.accept();
        }
    }

    pub(super) fn drain_results(&mut self) {
        while let Some((key, event)) = self.pool.try_result() {
            let now = self.now();
            let limits = self.limits;
            let Some(entry) = self.sessions.get_mut(&key.user) else {
                continue;
            };
            match event {
                TurnEvent::Stream(Stream::Token(t)) => {
                    if let Some(frame) = entry.session.token(key.turn_id, &t) {
                        self.deliver(&key.user, frame);
                    }
                }
                TurnEvent::Stream(Stream::Notification(n)) => {
                    if let Some(frame) = entry.session.notification(key.turn_id, n, &limits, now) {
                        self.deliver(&key.user, frame);
                    }
                }
                TurnEvent::Done(outcome) => {
                    if let Err(e) = &outcome {
                        warn!("user={} turn failed: {e}", key.user);
                    }
                    let Some(frame) = entry.session.finish(key.turn_id, outcome, &limits, now)
                    else {
                        continue;
                    };
                    if entry.session.conn().is_none() {
                        info!(
                            "user={} reply ready while away; held for the next connection",
                            key.user
                        );
                    }
                    self.deliver(&key.user, frame);
                    self.start_turn(&key.user);
                    self.schedule_session_idle(&key.user);
                }
            }
        }
    }

    pub(super) fn schedule_session_idle(&mut self, user: &UserId) {
        let ttl = self.config.session_ttl;
        if let Some(entry) = self.sessions.get_mut(user)
            && let Some(idle) = entry.session.idle_since()
        {
            schedule(
                &mut self.timers,
                &mut entry.timer_at,
                idle + ttl,
                TimerKey::Session(user.clone()),
            );
        }
    }

    /// Ensures a session for `user` exists or can be made: at the cap, the longest-idle
    /// detached session goes. `false` when every session is busy.
    pub(super) fn make_room_for(&mut self, user: &UserId) -> bool {
        if self.sessions.contains_key(user) || self.sessions.len() < self.config.max_sessions {
            return true;
        }
        // Only at the cap, so the scan is rare; a heap would cost memory on every session.
        let oldest = self
            .sessions
            .iter()
            .filter_map(|(u, e)| e.session.idle_since().map(|t| (t, u.clone())))
            .min();
        match oldest {
            Some((_, victim)) => {
                let lost = self
                    .sessions
                    .get(&victim)
                    .map_or(0, |e| e.session.undelivered());
                warn!(
                    "user={victim} session dropped to make room (session cap {}), {lost} undelivered frames",
                    self.config.max_sessions
                );
                self.sessions.remove(&victim);
                true
            }
            None => false,
        }
    }
}
