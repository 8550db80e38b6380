//! Deadlines: handshakes, close handshakes, heartbeats, turn timeouts and session expiry.

use super::*;

impl Server {
    pub(super) fn schedule_conn(&mut self, id: ConnId, at: Instant) {
        if let Some(conn) = conn_mut(&mut self.conns, id) {
            schedule(
                &mut self.timers,
                &mut conn.timer_at,
                at,
                TimerKey::Conn(id.slot, id.generation),
            );
        }
    }

    pub(super) fn run_timers(&mut self) {
        let now = Instant::now();
        while let Some((at, key)) = self.timers.pop_due(now) {
            match key {
                TimerKey::Accept => {
                    self.accept_paused = false;
                    self.accept();
                }
                TimerKey::Watchdog => {
                    if let (Some(sd), Some(every)) = (&self.sd_notify, self.watchdog) {
                        sd.send("WATCHDOG=1");
                        self.timers.push(now + every, TimerKey::Watchdog);
                    }
                }
                TimerKey::Conn(slot, generation) => {
                    let id = ConnId { slot, generation };
                    if self.conn(id).is_some_and(|c| c.timer_at == Some(at)) {
                        if let Some(c) = self.conn(id) {
                            c.timer_at = None;
                        }
                        self.conn_timer(id, now);
                    }
                }
                TimerKey::Session(user) => {
                    if self
                        .sessions
                        .get(&user)
                        .is_some_and(|e| e.timer_at == Some(at))
                    {
                        if let Some(e) = self.sessions.get_mut(&user) {
                            e.timer_at = None;
                        }
                        self.session_timer(&user, now);
                    }
                }
            }
        }
    }

    pub(super) fn conn_timer(&mut self, id: ConnId, now: Instant) {
        let ping_interval = self.config.ping_interval;
        let ping_timeout = self.config.ping_timeout;
        let Some(conn) = self.conn(id) else { return };
        let (user, peer) = (conn.user().to_string(), conn.peer);
        match conn.phase {
            Phase::Handshake { .. }
            | Phase::Respond { .. }
            | Phase::Linger { .. }
            | Phase::Closing(_)
            | Phase::Gone => {
                if now >= conn.deadline {
                    if matches!(conn.phase, Phase::Handshake { .. }) {
                        info!("user={user} peer={peer} handshake timed out");
                    }
                    self.remove(id, "deadline passed");
                } else {
                    let at = conn.deadline;
                    self.schedule_conn(id, at);
                }
            }
            Phase::Open(_) => {
                if let Some(sent) = conn.ping_sent {
                    if conn.last_rx > sent {
                        conn.ping_sent = None;
                    } else if now >= sent + ping_timeout {
                        warn!(
                            "user={user} peer={peer} heartbeat: nothing received for {} s after a ping; dropping the socket (1011)",
                            ping_timeout.as_secs()
                        );
                        // The peer is gone or stuck: a close handshake would only wait for
                        // it again, so the close frame is a courtesy and the socket goes now.
                        self.detach(id);
                        if let Some(c) = self.conn(id) {
                            let _ = c.close(CloseCode::Error, "heartbeat timeout", now);
                            let _ = c.flush();
                        }
                        self.remove(id, "heartbeat timeout");
                        return;
                    }
                }
                let Some(conn) = self.conn(id) else { return };
                if now >= conn.next_ping {
                    conn.next_ping = now + ping_interval;
                    if conn.ping_sent.is_none() {
                        conn.ping_sent = Some(now);
                    }
                    let result = conn.ping();
                    self.after_write(id, result);
                }
                let Some(conn) = self.conn(id) else { return };
                let next = match conn.ping_sent {
                    Some(sent) => conn.next_ping.min(sent + ping_timeout),
                    None => conn.next_ping,
                };
                self.schedule_conn(id, next);
            }
        }
    }

    pub(super) fn session_timer(&mut self, user: &UserId, now: Instant) {
        let at = Now {
            mono: now,
            unix: unix_now(),
        };
        let limits = self.limits;
        let ttl = self.config.session_ttl;
        let Some(entry) = self.sessions.get_mut(user) else {
            return;
        };
        if let Some(frame) = entry.session.check_timeout(&limits, at) {
            warn!(
                "user={user} turn timed out after {} s",
                limits.turn_timeout.as_secs()
            );
            self.deliver(user, frame);
            self.start_turn(user);
        }
        let Some(entry) = self.sessions.get_mut(user) else {
            return;
        };
        if let Some(idle) = entry.session.idle_since()
            && now >= idle + ttl
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
            self.sessions.remove(user);
            return;
        }
        let Some(entry) = self.sessions.get_mut(user) else {
            return;
        };
        let next = match (entry.session.running(), entry.session.idle_since()) {
            (Some((_, deadline)), _) => Some(deadline),
            (None, Some(idle)) => Some(idle + ttl),
            (None, None) => None,
        };
        if let Some(next) = next {
            schedule(
                &mut self.timers,
                &mut entry.timer_at,
                next,
                TimerKey::Session(user.clone()),
            );
        }
    }
}
