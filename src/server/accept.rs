//! Accepting connections and their HTTP phase: reading the request head, answering,
//! and turning an upgrade into a WebSocket attached to its session.

use super::*;

impl Server {
    pub(super) fn accept(&mut self) {
        if self.accept_paused || self.stopping.is_some() {
            return;
        }
        loop {
            match self.listener.accept() {
                Ok((stream, peer)) => self.admit(stream, peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_resource_exhaustion(&e) => {
                    warn!(
                        "cannot accept: {e}; pausing accepts for {} ms",
                        ACCEPT_BACKOFF.as_millis()
                    );
                    self.accept_paused = true;
                    self.timers
                        .push(Instant::now() + ACCEPT_BACKOFF, TimerKey::Accept);
                    return;
                }
                // A connection reset before we took it, and the like: only that one is lost.
                Err(e) => debug!("accept failed: {e}"),
            }
        }
    }

    pub(super) fn admit(&mut self, mut stream: TcpStream, peer: SocketAddr) {
        let now = Instant::now();
        let _ = stream.set_nodelay(true);
        let live = self.conns.len() - self.refusing;
        let over_cap = live >= self.config.max_connections;
        if over_cap && self.refusing >= REFUSAL_SLACK {
            warn!(
                "user=- peer={peer} refused: connection cap {} reached",
                self.config.max_connections
            );
            let _ = stream.write(&http::refusal(503, "too many connections"));
            return;
        }
        let id = ConnId {
            slot: self.conns.vacant_key(),
            generation: self.next_generation,
        };
        self.next_generation += 1;
        let mut conn = if over_cap {
            warn!(
                "user=- peer={peer} refused with 503: connection cap {} reached",
                self.config.max_connections
            );
            self.refusing += 1;
            Conn::refused(
                id,
                peer,
                stream,
                now,
                now + LINGER_TIMEOUT,
                http::refusal(503, "too many connections"),
            )
        } else {
            debug!("user=- peer={peer} connected");
            Conn::new(id, peer, stream, now, now + self.config.handshake_timeout)
        };
        let registered = match conn.stream_mut() {
            Some(s) => self.poll.registry().register(
                s,
                Token(id.slot),
                Interest::READABLE | Interest::WRITABLE,
            ),
            None => Ok(()),
        };
        if let Err(e) = registered {
            error!("user=- peer={peer} cannot register socket: {e}");
            if over_cap {
                self.refusing -= 1;
            }
            return;
        }
        let deadline = conn.deadline;
        self.conns.insert(conn);
        self.schedule_conn(id, deadline);
        if over_cap {
            self.on_writable(id);
        }
    }

    pub(super) fn on_readable(&mut self, id: ConnId) {
        let Some(conn) = self.conn(id) else { return };
        match conn.phase {
            Phase::Handshake { .. } => self.read_head(id),
            Phase::Linger { .. } => {
                if conn.drain_linger() {
                    self.remove(id, "answered");
                }
            }
            Phase::Open(_) | Phase::Closing(_) => self.read_messages(id),
            Phase::Respond { .. } | Phase::Gone => {}
        }
    }

    pub(super) fn on_writable(&mut self, id: ConnId) {
        let Some(conn) = self.conn(id) else { return };
        match conn.phase {
            Phase::Respond { .. } => {
                let linger = Instant::now() + LINGER_TIMEOUT;
                match conn.write_answer(linger) {
                    Ok(Some((kind, rest))) => self.open(id, kind, rest),
                    Ok(None) => {
                        if matches!(conn.phase, Phase::Linger { .. }) {
                            self.schedule_conn(id, linger);
                            self.on_readable(id);
                        }
                    }
                    Err(why) => self.remove(id, &why),
                }
            }
            Phase::Open(_) | Phase::Closing(_) => self.flush(id),
            _ => {}
        }
    }

    pub(super) fn read_head(&mut self, id: ConnId) {
        let Some(conn) = self.conn(id) else { return };
        let peer = conn.peer;
        match conn.read_head() {
            HeadRead::Partial => {}
            HeadRead::Gone => self.remove(id, "closed during the handshake"),
            HeadRead::Invalid(why) => {
                info!("user=- peer={peer} bad request: {why}");
                self.answer(id, http::refusal(400, why), None);
            }
            HeadRead::Complete(req, rest) => {
                let route = http::route(&req, self.config.api_key.as_deref(), self.config.raw_echo);
                match route {
                    Route::Health => {
                        debug!("user=- peer={peer} GET /health");
                        let body = self.health_json();
                        self.answer(id, http::response(200, "application/json", &body), None);
                    }
                    Route::Refuse(status, why) => {
                        info!(
                            "user=- peer={peer} {} {} refused with {status}: {why}",
                            req.method, req.path
                        );
                        self.answer(id, http::refusal(status, &why), None);
                    }
                    Route::Echo => {
                        let key = req.ws_key.unwrap_or_default();
                        self.answer(id, http::upgrade_response(&key), Some((Kind::Echo, rest)));
                    }
                    Route::Chat { user, since } => {
                        if !self.make_room_for(&user) {
                            warn!(
                                "user={user} peer={peer} refused with 503: session cap {} reached",
                                self.config.max_sessions
                            );
                            self.answer(id, http::refusal(503, "too many sessions"), None);
                            return;
                        }
                        let key = req.ws_key.unwrap_or_default();
                        self.answer(
                            id,
                            http::upgrade_response(&key),
                            Some((Kind::Chat { user, since }, rest)),
                        );
                    }
                }
            }
        }
    }

    pub(super) fn answer(&mut self, id: ConnId, bytes: Vec<u8>, upgrade: Option<(Kind, Vec<u8>)>) {
        let deadline = Instant::now() + LINGER_TIMEOUT;
        if let Some(conn) = self.conn(id) {
            conn.respond(bytes, upgrade, deadline);
            self.on_writable(id);
        }
    }

    /// The 101 went out: attach the WebSocket to its session.
    pub(super) fn open(&mut self, id: ConnId, kind: Kind, rest: Vec<u8>) {
        let now = self.now();
        let ping_at = now.mono + self.config.ping_interval;
        let ws_config = self.ws_config;
        let max_unsent = self.config.max_buffered_bytes;
        let Some(conn) = self.conn(id) else { return };
        conn.upgrade(kind.clone(), rest, ws_config, max_unsent);
        conn.last_rx = now.mono;
        conn.next_ping = ping_at;
        let peer = conn.peer;
        conn.timer_at = None;
        self.schedule_conn(id, ping_at);
        if let Kind::Chat { user, since } = kind {
            let limits = self.limits;
            let epoch = self.next_generation;
            self.next_generation += 1;
            let (held_total, history_total) = (&self.held_total, &self.history_total);
            let entry = self.sessions.entry(user.clone()).or_insert_with(|| {
                let mut session = Session::new(user.clone(), now.mono);
                session.count_held_in(Arc::clone(held_total));
                session.count_history_in(Arc::clone(history_total));
                Entry {
                    session,
                    timer_at: None,
                    epoch,
                }
            });
            let (replaced, frames) = entry.session.attach(id, since, &limits, now);
            let epoch = entry.epoch;
            if let Some(c) = conn_mut(&mut self.conns, id) {
                c.session_epoch = epoch;
            }
            info!(
                "user={user} peer={peer} connected{}; {} frames to deliver",
                since.map(|s| format!(" (since={s})")).unwrap_or_default(),
                frames.len()
            );
            if let Some(old) = replaced
                && let Some(old_conn) = self.conn(old)
            {
                info!(
                    "user={user} peer={} replaced by a new connection from {peer}",
                    old_conn.peer
                );
                old_conn.close(CloseCode::Normal, "replaced", now.mono + CLOSE_TIMEOUT);
                self.schedule_conn(old, now.mono + CLOSE_TIMEOUT);
                self.flush_queue.push(old);
            }
            for frame in frames {
                self.write_to(id, frame);
            }
        } else {
            debug!("user=(echo) peer={peer} connected");
        }
        // Data the client sent right behind its request is already in our buffer or the
        // kernel's, and no new readiness edge will announce it.
        self.queue_read(id);
    }
}
