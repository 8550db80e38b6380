//! Accepting connections and their HTTP phase: reading the request head, answering, and
//! turning an upgrade into a WebSocket attached to its session.

use super::timers::TimerKey;
use super::{Server, Slot};
use crate::conn::{Conn, ConnId, HeadRead, Heartbeat, Kind, Stage, Stream, Upgrade};
use crate::http::{self, Access, Route};
use crate::limits::{Client, Refused};
use crate::metrics;
use crate::page;
use log::{debug, error, info, warn};
use mio::net::TcpStream;
use mio::{Interest, Token};
use std::borrow::Cow;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::time::Duration;

/// How long a refused client is read from after its answer before the socket is dropped.
const LINGER_TIMEOUT: Duration = Duration::from_secs(2);

/// Connections over the cap kept just long enough to be told 503 (beyond: dropped unread).
const REFUSAL_SLACK: usize = 64;

/// The kernel's send buffer per client socket. Autotuned, Linux lets a socket whose peer
/// does not read queue up to `tcp_wmem`'s maximum (4 MiB on Debian), outside every budget
/// of ours: 1,024 slow consumers could pin 4 GiB of kernel memory before `--max-buffered-bytes`
/// even starts counting. 64 KiB (the kernel doubles it for its bookkeeping) still fills a
/// LAN: 64 MB/s at 1 ms round trip, 13 MB/s over Wi-Fi at 5 ms; a chat reply is kilobytes.
const SEND_BUFFER_BYTES: usize = 64 * 1024;

/// What a client at `--max-connections-per-ip` is told to wait (`Retry-After`).
const RETRY_OPEN: Duration = Duration::from_secs(5);

/// Pause before accepting again after the process ran out of file descriptors; without it
/// an edge-triggered listener with a pending connection would spin the CPU.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

impl Server {
    /// Accepts every pending connection.
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
                        .push(self.now.mono + ACCEPT_BACKOFF, TimerKey::Accept);
                    return;
                }
                // A connection reset before we took it, and the like: only that one is lost.
                Err(e) => debug!("accept failed: {e}"),
            }
        }
    }

    /// Accepting may go on: a connection closed, or the back-off is over.
    pub(super) fn resume_accept(&mut self) {
        if self.accept_paused {
            self.accept_paused = false;
            self.accept();
        }
    }

    fn admit(&mut self, mut tcp: TcpStream, peer: SocketAddr) {
        let now = self.now.mono;
        let _ = tcp.set_nodelay(true);
        // Fixed, not autotuned: see SEND_BUFFER_BYTES. A failure only leaves the default.
        let _ = rustix::net::sockopt::set_socket_send_buffer_size(&tcp, SEND_BUFFER_BYTES);
        let live = self.conns.len() - self.refusing;
        let client = Client::of(peer.ip());
        // The connection cap first, then the client's own share of it.
        let refusal = if live >= self.config.max_connections {
            Some((
                http::refusal(503, "too many connections"),
                503,
                format!("connection cap {} reached", self.config.max_connections),
            ))
        } else {
            match self.per_client.open(client, now) {
                Ok(()) => None,
                Err(_) => Some((
                    http::too_many("too many connections from your address", RETRY_OPEN),
                    429,
                    format!(
                        "{} connections open from this address (--max-connections-per-ip)",
                        self.config.max_connections_per_ip
                    ),
                )),
            }
        };
        if let Some((answer, status, why)) = &refusal
            && (self.refusing >= REFUSAL_SLACK || self.tls.is_some())
        {
            self.metrics.refused(*status);
            if self.tls.is_some() {
                // An answer would take a TLS handshake first: the CPU and time the refusal
                // is there to save. The client sees the connection closed.
                warn!("user=- peer={peer} refused (closed): {why}");
            } else {
                warn!("user=- peer={peer} refused: {why}");
                let _ = tcp.write(answer);
            }
            return;
        }
        let stream = match &self.tls {
            None => Stream::Plain(tcp),
            Some(tls) => match tls.accept(tcp) {
                Ok(stream) => stream,
                Err(e) => {
                    error!("user=- peer={peer} {e}");
                    self.per_client.close(client, now);
                    return;
                }
            },
        };
        let id = ConnId::new(self.conns.vacant_key(), self.next_generation);
        self.next_generation += 1;
        let refused = refusal.is_some();
        let mut conn = match refusal {
            Some((answer, status, why)) => {
                warn!("user=- peer={peer} refused with {status}: {why}");
                self.refusing += 1;
                self.metrics.refused(status);
                Conn::refused(id, peer, stream, now + LINGER_TIMEOUT, answer)
            }
            None => {
                debug!("user=- peer={peer} connected");
                Conn::new(id, peer, stream, now + self.config.handshake_timeout)
            }
        };
        let registered = match conn.stream_mut() {
            Some(s) => self.poll.registry().register(
                s,
                Token(id.slot()),
                Interest::READABLE | Interest::WRITABLE,
            ),
            None => Ok(()),
        };
        if let Err(e) = registered {
            error!("user=- peer={peer} cannot register socket: {e}");
            if refused {
                self.refusing -= 1;
            } else {
                self.per_client.close(client, now);
            }
            return;
        }
        let at = conn.poll_at();
        self.conns.insert(Slot {
            conn,
            timer_at: None,
            queued_read: false,
            per_client: !refused,
            deaf: false,
        });
        self.schedule_conn(id, at);
        if refused {
            self.on_writable(id);
        }
    }

    /// The socket has data (or hung up).
    pub(super) fn on_readable(&mut self, id: ConnId) {
        let Some(conn) = self.conn(id) else { return };
        match conn.stage() {
            Some(Stage::Handshake) => self.read_head(id),
            Some(Stage::Linger) => {
                if conn.drain_linger() {
                    self.remove(id, "answered");
                }
            }
            Some(Stage::Open | Stage::Closing) => self.read_messages(id),
            Some(Stage::Await) => {
                if conn.drain_await() {
                    self.end_wait(id, false);
                }
            }
            Some(Stage::Respond) | None => {}
        }
    }

    /// The socket takes data again.
    pub(super) fn on_writable(&mut self, id: ConnId) {
        let linger = self.now.mono + LINGER_TIMEOUT;
        let Some(conn) = self.conn(id) else { return };
        match conn.stage() {
            Some(Stage::Respond) => match conn.write_answer(linger) {
                Ok(Some((upgrade, rest))) => self.open(id, upgrade, rest),
                Ok(None) => {
                    if conn.stage() == Some(Stage::Linger) {
                        self.schedule_conn(id, linger);
                        self.on_readable(id);
                    }
                }
                Err(why) => self.remove(id, &why),
            },
            Some(Stage::Open | Stage::Closing) => self.flush(id),
            // Nothing of their own to write; TLS may have (its handshake, tickets, the
            // close_notify of a lingering socket).
            Some(Stage::Handshake | Stage::Linger | Stage::Await) => {
                if let Err(why) = conn.flush_tls() {
                    self.remove(id, &why);
                }
            }
            None => {}
        }
    }

    fn read_head(&mut self, id: ConnId) {
        let max_body = self.config.max_message_bytes;
        let Some(conn) = self.conn(id) else { return };
        let peer = conn.peer();
        match conn.read_head(max_body) {
            HeadRead::Partial => {}
            HeadRead::Gone => self.remove(id, "closed during the handshake"),
            HeadRead::TooLarge => {
                info!("user=- peer={peer} refused with 413: body over --max-message-bytes");
                self.refuse(id, 413, "body over --max-message-bytes");
            }
            HeadRead::Invalid(why) => {
                info!("user=- peer={peer} bad request: {why}");
                self.refuse(id, 400, why);
            }
            HeadRead::Complete(req, rest) => {
                // Every upgrade attempt counts, refused ones too: guessing tokens is one.
                if req.upgrade_websocket
                    && let Err(Refused::Rate(wait)) = self
                        .per_client
                        .upgrade(Client::of(peer.ip()), self.now.mono)
                {
                    info!(
                        "user=- peer={peer} GET {} refused with 429: more than {} upgrades a minute from this address",
                        req.logged_target(),
                        self.config.max_connects_per_minute_per_ip
                    );
                    self.metrics.refused(429);
                    let answer = http::too_many("too many connection attempts", wait);
                    self.answer(id, answer, None);
                    return;
                }
                let access = Access {
                    api_key: self.config.api_key.as_deref(),
                    jwt: self.jwt.as_ref(),
                    origins: &self.config.allowed_origins,
                    now_unix: self.now.unix.max(0.0) as u64,
                };
                let route = http::route(&req, &access, self.config.raw_echo);
                match route {
                    Route::Health => {
                        debug!("user=- peer={peer} GET /health");
                        let body = self.health_json();
                        self.answer(id, http::response(200, "application/json", &body), None);
                    }
                    Route::Status => {
                        let body = serde_json::json!({
                            "status": "We're purring",
                            "version": env!("CARGO_PKG_VERSION"),
                        })
                        .to_string();
                        self.answer(id, http::response(200, "application/json", &body), None);
                    }
                    Route::Page if self.config.page => {
                        debug!("user=- peer={peer} GET {}", req.path);
                        self.answer(id, page::response(), None);
                    }
                    Route::Page => self.refuse(id, 404, "no page here (--page=0)"),
                    // Off means absent, whatever the credential: 404 before 401.
                    Route::Metrics { .. } if !self.config.metrics => {
                        self.refuse(id, 404, "no metrics here (--metrics=0)");
                    }
                    Route::Metrics { authorized: false } => {
                        info!("user=- peer={peer} GET /metrics refused with 401: no or wrong key");
                        self.refuse(id, 401, "send the --api-key as Authorization: Bearer KEY");
                    }
                    Route::Metrics { authorized: true } => {
                        debug!("user=- peer={peer} GET /metrics");
                        let body = self.metrics_text();
                        let answer = http::response(200, metrics::CONTENT_TYPE, &body);
                        self.answer(id, answer, None);
                    }
                    Route::Api(api, user) => {
                        let mut body = rest;
                        body.truncate(req.content_length.unwrap_or(0));
                        self.serve_api(id, api, user, body);
                    }
                    Route::Refuse(status, why) => {
                        info!(
                            "user=- peer={peer} {} {} refused with {status}: {why}",
                            req.method,
                            req.logged_target()
                        );
                        self.refuse(id, status, &why);
                    }
                    Route::Echo => {
                        let key = req.ws_key.unwrap_or_default();
                        let answer = http::upgrade_response(&key);
                        self.answer(id, answer, Some((Upgrade::Echo, rest)));
                    }
                    Route::Chat(target) => {
                        if !self.sessions.make_room_for(&target.user) {
                            warn!(
                                "user={} peer={peer} refused with 503: session cap {} reached",
                                target.user, self.config.max_sessions
                            );
                            self.refuse(id, 503, "too many sessions");
                            return;
                        }
                        let key = req.ws_key.unwrap_or_default();
                        let answer = http::upgrade_response(&key);
                        self.answer(id, answer, Some((Upgrade::Chat(target), rest)));
                    }
                }
            }
        }
    }

    /// Answers `id` with HTTP error `status` and the one-line reason `why`, and counts it.
    pub(super) fn refuse(&mut self, id: ConnId, status: u16, why: &str) {
        self.metrics.refused(status);
        self.answer(id, http::refusal(status, why), None);
    }

    pub(super) fn answer(
        &mut self,
        id: ConnId,
        bytes: impl Into<Cow<'static, [u8]>>,
        upgrade: Option<(Upgrade, Vec<u8>)>,
    ) {
        let deadline = self.now.mono + LINGER_TIMEOUT;
        if let Some(conn) = self.conn(id) {
            conn.respond(bytes.into(), upgrade, deadline);
            self.on_writable(id);
        }
    }

    /// The 101 went out: attach the WebSocket to its session.
    fn open(&mut self, id: ConnId, upgrade: Upgrade, rest: Vec<u8>) {
        let now = self.now;
        let heartbeat = Heartbeat::new(
            now.mono,
            self.config.ping_interval,
            self.config.ping_timeout,
        );
        let (ws_config, max_unsent) = (self.ws_config, self.config.max_buffered_bytes);
        let Some(peer) = self.conn(id).map(|c| c.peer()) else {
            return;
        };
        let kind = match upgrade {
            Upgrade::Echo => {
                debug!("user=(echo) peer={peer} connected");
                Kind::Echo
            }
            Upgrade::Chat(target) => {
                if target.since.is_some() {
                    self.metrics.resumed();
                }
                let at =
                    self.sessions
                        .attach(id, &target.user, target.since, now, &mut self.effects);
                let frames = self
                    .effects
                    .iter()
                    .filter(|e| matches!(e, crate::session::Effect::Send(..)))
                    .count();
                info!(
                    "user={} peer={peer} connected{}; {frames} frames to deliver",
                    target.user,
                    target
                        .since
                        .map(|s| format!(" (since={s})"))
                        .unwrap_or_default(),
                );
                Kind::Chat(at)
            }
        };
        if let Some(slot) = super::slot_in(&mut self.conns, id) {
            let totals = &self.unsent;
            slot.conn
                .upgrade(kind, rest, ws_config, max_unsent, heartbeat, totals);
            slot.timer_at = None;
        }
        self.schedule_conn(id, heartbeat.poll_at());
        self.apply_effects();
        // Data the client sent right behind its request is already in our buffer or the
        // kernel's, and no new readiness edge will announce it.
        self.queue_read(id);
    }
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    // EMFILE, ENFILE, ENOBUFS, ENOMEM: out of descriptors or kernel memory.
    matches!(e.raw_os_error(), Some(24 | 23 | 105 | 12))
}
