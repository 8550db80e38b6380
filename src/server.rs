//! The event loop: one thread, one `mio::Poll`, a slab of connections and a map of
//! sessions. It accepts, moves bytes, routes messages to sessions and session frames to
//! sockets, hands turns to the worker pool and takes their results back through the waker.

use crate::agent::{Agent, Stream};
use crate::config::Config;
use crate::conn::{Conn, HeadRead, Kind, Phase, READ_BUFFER_BYTES, WsRead, WsWrite};
use crate::http::{self, Route};
use crate::protocol::{ErrorName, Held, UserId, parse_client_message, unix_now};
use crate::session::{Accepted, ConnId, Limits, Now, Outgoing, Session};
use crate::systemd::SdNotify;
use crate::timer::{Timers, schedule};
use crate::workers::{Job, Notifier, Pool, TurnEvent, TurnKey};
use log::{debug, error, info, warn};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;
use std::collections::{HashMap, VecDeque};
use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tungstenite::Message;
use tungstenite::protocol::WebSocketConfig;
use tungstenite::protocol::frame::coding::CloseCode;

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);

/// Messages read from one connection before the loop moves on to others (fairness: a
/// flooding client gets its turn again on the next iteration, not the whole loop).
const READ_BUDGET_MESSAGES: usize = 32;

/// How long a close handshake we started may take before the socket is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a refused client is read from after its answer before the socket is dropped.
const LINGER_TIMEOUT: Duration = Duration::from_secs(2);

/// Connections over the cap kept just long enough to be told 503 (beyond: dropped unread).
const REFUSAL_SLACK: usize = 64;

/// Pause before accepting again after the process ran out of file descriptors; without it
/// an edge-triggered listener with a pending connection would spin the CPU.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// How long shutdown waits for close handshakes before exiting anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Events taken from the kernel per poll.
const EVENTS_CAPACITY: usize = 1024;

/// Asks a running server to stop; cheap to clone and safe to use from any thread.
#[derive(Clone)]
pub struct ShutdownHandle {
    flag: Arc<AtomicBool>,
    notifier: Notifier,
}

impl ShutdownHandle {
    /// Starts the graceful shutdown: stop accepting, close every socket with 1001, wait at
    /// most 5 s for the close handshakes, return from [`Server::run`].
    pub fn shutdown(&self) {
        self.flag.store(true, Ordering::Release);
        self.notifier.wake();
    }
}

/// Something with a deadline.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKey {
    Conn(usize, u64),
    Session(UserId),
    Accept,
    Watchdog,
}

/// A session and its place in the timer heap.
struct Entry {
    session: Session,
    timer_at: Option<Instant>,
    /// Unique per session made: a closing socket of an expired session must not mark
    /// frames of a new session of the same user as handed.
    epoch: u64,
}

/// The server: everything the event loop owns.
pub struct Server {
    poll: Poll,
    listener: TcpListener,
    local_addr: SocketAddr,
    conns: Slab<Conn>,
    sessions: HashMap<UserId, Entry>,
    timers: Timers<TimerKey>,
    pool: Pool,
    config: Config,
    limits: Limits,
    ws_config: WebSocketConfig,
    /// Connections that may still have unread data (edge-triggered readiness will not
    /// tell us again), served one budget each per loop iteration.
    read_queue: VecDeque<ConnId>,
    /// Connections written to since the last flush.
    flush_queue: Vec<ConnId>,
    next_generation: u64,
    next_turn: u64,
    /// Connections being told 503 because the cap was reached.
    refusing: usize,
    accept_paused: bool,
    started: Instant,
    shutdown_flag: Arc<AtomicBool>,
    shutdown_handle: ShutdownHandle,
    stopping: Option<Instant>,
    /// The service manager's notification socket, when run by systemd.
    sd_notify: Option<SdNotify>,
    /// How often to tell systemd the loop is alive (half of `WatchdogSec`).
    watchdog: Option<Duration>,
}

impl Server {
    /// Binds the listener and starts the worker pool.
    pub fn bind(config: Config, agent: Arc<dyn Agent>) -> io::Result<Server> {
        let listener = TcpListener::bind(config.listen)?;
        Server::from_listener(listener, config, agent)
    }

    /// Serves an already bound listener (socket activation, tests).
    pub fn from_listener(
        mut listener: TcpListener,
        config: Config,
        agent: Arc<dyn Agent>,
    ) -> io::Result<Server> {
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let notifier = Notifier::new(waker);
        let pool = Pool::start(config.workers, agent, notifier.clone())?;
        let local_addr = listener.local_addr()?;
        let shutdown_flag = Arc::new(AtomicBool::new(false));
        let limits = Limits {
            history_turns: config.history_turns,
            max_held_frames: config.max_held_frames,
            max_queued_turns: config.max_queued_turns,
            turn_timeout: config.turn_timeout,
        };
        // Tungstenite's defaults (128 KiB read buffer, unbounded writes) are for servers
        // with gigabytes. Here: a small read buffer, and writes that only queue, so that we
        // flush once per loop iteration. The unsent-bytes bound is ours (`Conn::write`),
        // because tungstenite's would refuse a single frame larger than it even to a
        // client that reads everything.
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER_BYTES)
            .write_buffer_size(usize::MAX - 1)
            .max_write_buffer_size(usize::MAX)
            .max_message_size(Some(config.max_message_bytes))
            .max_frame_size(Some(config.max_message_bytes));
        Ok(Server {
            poll,
            listener,
            local_addr,
            conns: Slab::new(),
            sessions: HashMap::new(),
            timers: Timers::default(),
            shutdown_handle: ShutdownHandle {
                flag: Arc::clone(&shutdown_flag),
                notifier,
            },
            pool,
            limits,
            ws_config,
            read_queue: VecDeque::new(),
            flush_queue: Vec::new(),
            next_generation: 1,
            next_turn: 1,
            refusing: 0,
            accept_paused: false,
            started: Instant::now(),
            shutdown_flag,
            stopping: None,
            sd_notify: None,
            watchdog: None,
            config,
        })
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A handle that stops [`Server::run`] from another thread or a signal handler thread.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown_handle.clone()
    }

    /// Reports to systemd through `notify` (READY once listening, STOPPING at shutdown)
    /// and, with `watchdog`, sends `WATCHDOG=1` that often from the event loop itself, so a
    /// stuck loop gets the service restarted.
    pub fn with_systemd(mut self, notify: Option<SdNotify>, watchdog: Option<Duration>) -> Server {
        self.watchdog = watchdog.filter(|_| notify.is_some());
        self.sd_notify = notify;
        self
    }

    /// Runs the event loop until shutdown. Only a failing `Poll` ends it with an error.
    pub fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(EVENTS_CAPACITY);
        info!("straycat listening on {}", self.local_addr);
        if let Some(sd) = &self.sd_notify {
            sd.send(&format!("READY=1\nSTATUS=listening on {}", self.local_addr));
        }
        if let Some(every) = self.watchdog {
            info!("systemd watchdog: notifying every {} ms", every.as_millis());
            self.timers.push(Instant::now(), TimerKey::Watchdog);
        }
        loop {
            let now = Instant::now();
            let timeout = if self.read_queue.is_empty() {
                self.timers.timeout(now)
            } else {
                Some(Duration::ZERO)
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let mut woken = false;
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    WAKER => woken = true,
                    Token(slot) => {
                        let Some(conn) = self.conns.get(slot) else {
                            continue;
                        };
                        let id = conn.id;
                        let (writable, readable) = (
                            event.is_writable(),
                            event.is_readable() || event.is_read_closed() || event.is_error(),
                        );
                        self.guarded(id, |s| {
                            if writable {
                                s.on_writable(id);
                            }
                            if readable {
                                s.on_readable(id);
                            }
                        });
                    }
                }
            }
            if woken {
                self.pool.notifier().clear();
                self.drain_results();
            }
            self.serve_read_queue();
            self.run_timers();
            self.flush_all();
            if self.stopping.is_none() && self.shutdown_flag.load(Ordering::Acquire) {
                self.begin_shutdown();
            }
            if let Some(until) = self.stopping
                && (self.conns.is_empty() || Instant::now() >= until)
            {
                let left = self.conns.len();
                if left > 0 {
                    warn!("shutdown grace period over: dropping {left} connections");
                }
                self.pool.close();
                let busy = self.pool.reap();
                info!("stopped ({busy} worker threads still busy are abandoned)");
                return Ok(());
            }
        }
    }

    /// Runs `f` for connection `id`; should it panic (a bug, in our code or a library's),
    /// only that connection is dropped and the loop serves everybody else.
    fn guarded(&mut self, id: ConnId, f: impl FnOnce(&mut Server)) {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(self)));
        if outcome.is_err() {
            let (user, peer) = self
                .conn(id)
                .map(|c| (c.user().to_string(), c.peer.to_string()))
                .unwrap_or_default();
            error!(
                "user={user} peer={peer} internal error while serving this connection; dropping it"
            );
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.remove(id, "internal error")
            }));
        }
    }

    fn now(&self) -> Now {
        Now {
            mono: Instant::now(),
            unix: unix_now(),
        }
    }

    // ----- accepting -------------------------------------------------------------------

    fn accept(&mut self) {
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

    fn admit(&mut self, mut stream: TcpStream, peer: SocketAddr) {
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

    // ----- connection events -----------------------------------------------------------

    fn conn(&mut self, id: ConnId) -> Option<&mut Conn> {
        conn_mut(&mut self.conns, id)
    }

    fn on_readable(&mut self, id: ConnId) {
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

    fn on_writable(&mut self, id: ConnId) {
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

    fn read_head(&mut self, id: ConnId) {
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

    fn answer(&mut self, id: ConnId, bytes: Vec<u8>, upgrade: Option<(Kind, Vec<u8>)>) {
        let deadline = Instant::now() + LINGER_TIMEOUT;
        if let Some(conn) = self.conn(id) {
            conn.respond(bytes, upgrade, deadline);
            self.on_writable(id);
        }
    }

    /// The 101 went out: attach the WebSocket to its session.
    fn open(&mut self, id: ConnId, kind: Kind, rest: Vec<u8>) {
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
            let entry = self.sessions.entry(user.clone()).or_insert_with(|| Entry {
                session: Session::new(user.clone(), now.mono),
                timer_at: None,
                epoch,
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

    fn queue_read(&mut self, id: ConnId) {
        if let Some(conn) = self.conn(id)
            && !conn.queued_read
        {
            conn.queued_read = true;
            self.read_queue.push_back(id);
        }
    }

    fn serve_read_queue(&mut self) {
        for _ in 0..self.read_queue.len() {
            let Some(id) = self.read_queue.pop_front() else {
                break;
            };
            let Some(conn) = self.conn(id) else { continue };
            conn.queued_read = false;
            self.read_messages(id);
        }
    }

    fn read_messages(&mut self, id: ConnId) {
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

    fn on_message(&mut self, id: ConnId, msg: Message) {
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

    fn on_chat_text(&mut self, id: ConnId, user: UserId, text: &str) {
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

    fn start_turn(&mut self, user: &UserId) {
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

    fn push_error(&mut self, user: &UserId, name: ErrorName, why: String, reply_to: Option<&str>) {
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
    fn deliver(&mut self, user: &UserId, frame: Outgoing) {
        if let Some(id) = self.sessions.get(user).and_then(|e| e.session.conn()) {
            self.write_to(id, frame);
        }
    }

    fn write_to(&mut self, id: ConnId, frame: Outgoing) {
        let Some(conn) = self.conn(id) else { return };
        if !conn.is_open() {
            return;
        }
        let result = conn.write_text(frame.text, frame.seq);
        self.after_write(id, result);
    }

    fn after_write(&mut self, id: ConnId, result: WsWrite) {
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

    fn flush_all(&mut self) {
        let queue = std::mem::take(&mut self.flush_queue);
        for id in queue {
            if self.conn(id).is_some_and(|c| c.dirty) {
                self.flush(id);
            }
        }
    }

    fn flush(&mut self, id: ConnId) {
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
    fn close_conn(&mut self, id: ConnId, code: CloseCode, reason: &str) {
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

    fn phase_to_closing(&mut self, id: ConnId) {
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
    fn detach(&mut self, id: ConnId) {
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

    fn remove(&mut self, id: ConnId, why: &str) {
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

    // ----- worker results ----------------------------------------------------------------

    fn drain_results(&mut self) {
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

    fn schedule_session_idle(&mut self, user: &UserId) {
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

    // ----- timers -------------------------------------------------------------------------

    fn schedule_conn(&mut self, id: ConnId, at: Instant) {
        if let Some(conn) = conn_mut(&mut self.conns, id) {
            schedule(
                &mut self.timers,
                &mut conn.timer_at,
                at,
                TimerKey::Conn(id.slot, id.generation),
            );
        }
    }

    fn run_timers(&mut self) {
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

    fn conn_timer(&mut self, id: ConnId, now: Instant) {
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

    fn session_timer(&mut self, user: &UserId, now: Instant) {
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

    /// Ensures a session for `user` exists or can be made: at the cap, the longest-idle
    /// detached session goes. `false` when every session is busy.
    fn make_room_for(&mut self, user: &UserId) -> bool {
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

    fn health_json(&self) -> String {
        serde_json::json!({
            "status": "ok",
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_s": self.started.elapsed().as_secs(),
            "connections": self.conns.len(),
            "sessions": self.sessions.len(),
        })
        .to_string()
    }

    // ----- shutdown ---------------------------------------------------------------------

    fn begin_shutdown(&mut self) {
        let now = Instant::now();
        let until = now + SHUTDOWN_GRACE;
        info!(
            "shutting down: closing {} connections with 1001",
            self.conns.len()
        );
        self.stopping = Some(until);
        if let Some(sd) = &self.sd_notify {
            sd.send("STOPPING=1");
        }
        let _ = self.poll.registry().deregister(&mut self.listener);
        for entry in self.sessions.values_mut() {
            entry.session.cancel_all();
        }
        self.pool.close();
        let ids: Vec<ConnId> = self.conns.iter().map(|(_, c)| c.id).collect();
        for id in ids {
            let open = self.conn(id).is_some_and(|c| c.is_open());
            if open {
                self.close_conn(id, CloseCode::Away, "server shutting down");
                if let Some(c) = self.conn(id) {
                    c.dirty = true;
                }
                self.flush_queue.push(id);
            } else if self
                .conn(id)
                .is_some_and(|c| !matches!(c.phase, Phase::Closing(_)))
            {
                self.remove(id, "server shutting down");
            }
        }
        self.flush_all();
    }
}

/// The connection `id` names, if the slot still holds that generation.
fn conn_mut(conns: &mut Slab<Conn>, id: ConnId) -> Option<&mut Conn> {
    conns
        .get_mut(id.slot)
        .filter(|c| c.id.generation == id.generation)
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    // EMFILE, ENFILE, ENOBUFS, ENOMEM: out of descriptors or kernel memory.
    matches!(e.raw_os_error(), Some(24 | 23 | 105 | 12))
}
