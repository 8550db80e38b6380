//! The event loop: one thread, one `mio::Poll`, a slab of connections and a map of
//! sessions. It accepts, moves bytes, routes messages to sessions and session frames to
//! sockets, hands turns to the worker pool and takes their results back through the waker.

mod accept;
mod chat;
mod timers;

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
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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

/// How long shutdown waits for worker threads to finish their (cancelled) turns; an agent
/// that ignores cancellation is abandoned to the process exit rather than hold it up.
const WORKER_EXIT_WAIT: Duration = Duration::from_millis(500);

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

    /// Starts the graceful shutdown on the first SIGTERM or SIGINT. The signals are read on
    /// a small thread of their own (signal-hook), which only calls [`ShutdownHandle::shutdown`]:
    /// nothing runs in a signal handler but signal-hook's own.
    pub fn on_termination_signals(&self) -> io::Result<()> {
        let mut signals = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGINT,
        ])?;
        let handle = self.clone();
        std::thread::Builder::new()
            .name("straycat-signals".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    info!("signal {sig} received");
                    handle.shutdown();
                }
            })
            .map(|_| ())
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
    /// Bytes of frames held by all sessions (each session keeps its share counted here).
    held_total: Arc<AtomicUsize>,
    /// Bytes of conversation history of all sessions, counted the same way.
    history_total: Arc<AtomicUsize>,
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
            max_held_bytes: config.max_held_bytes,
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
            held_total: Arc::default(),
            history_total: Arc::default(),
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
                        let hung_up = event.is_read_closed() || event.is_error();
                        let (writable, readable) =
                            (event.is_writable(), event.is_readable() || hung_up);
                        self.guarded(id, |s| {
                            if writable {
                                s.on_writable(id);
                            }
                            if readable {
                                if let Some(c) = s.conn(id) {
                                    c.readable_again(hung_up);
                                }
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
            self.enforce_memory_budgets();
            self.flush_all();
            self.pool.kick();
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
                let busy = self.pool.reap(Instant::now() + WORKER_EXIT_WAIT);
                if busy == 0 {
                    info!("stopped");
                } else {
                    warn!("stopped; {busy} worker threads still busy are abandoned");
                }
                return Ok(());
            }
        }
    }

    /// Runs `f` for connection `id`; should it panic (a bug, in our code or a library's),
    /// only that connection is dropped and the loop serves everybody else.
    pub(super) fn guarded(&mut self, id: ConnId, f: impl FnOnce(&mut Server)) {
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

    /// Past `--max-held-bytes-total`, the sessions holding the most bytes give up their
    /// oldest frames (never a session's newest) until the total fits; past
    /// `--max-history-bytes-total`, the sessions with the longest history forget their
    /// oldest turns. Sessions are scanned only while over a budget.
    pub(super) fn enforce_memory_budgets(&mut self) {
        let shed = shed_until_within(
            &mut self.sessions,
            &self.held_total,
            self.config.max_held_bytes_total,
            |s| (s.held_frames() > 1).then(|| s.held_bytes()),
            Session::shed_oldest,
        );
        if shed > 0 {
            warn!(
                "held frames over the server-wide budget of {} bytes: dropped the {shed} oldest of the largest sessions",
                self.config.max_held_bytes_total
            );
        }
        let shed = shed_until_within(
            &mut self.sessions,
            &self.history_total,
            self.config.max_history_bytes_total,
            |s| (s.history_bytes() > 0).then(|| s.history_bytes()),
            Session::shed_oldest_turn,
        );
        if shed > 0 {
            info!(
                "history over the server-wide budget of {} bytes: the longest sessions forgot {shed} turns",
                self.config.max_history_bytes_total
            );
        }
    }

    pub(super) fn now(&self) -> Now {
        Now {
            mono: Instant::now(),
            unix: unix_now(),
        }
    }

    pub(super) fn conn(&mut self, id: ConnId) -> Option<&mut Conn> {
        conn_mut(&mut self.conns, id)
    }

    pub(super) fn health_json(&self) -> String {
        serde_json::json!({
            "status": "ok",
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_s": self.started.elapsed().as_secs(),
            "connections": self.conns.len(),
            "sessions": self.sessions.len(),
        })
        .to_string()
    }

    pub(super) fn begin_shutdown(&mut self) {
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

/// While `total` is over `budget`, asks the session with the largest `size` (`None`: has
/// nothing to give) to `shed`; returns how many times one did.
fn shed_until_within(
    sessions: &mut HashMap<UserId, Entry>,
    total: &AtomicUsize,
    budget: usize,
    size: impl Fn(&Session) -> Option<usize>,
    shed: impl Fn(&mut Session) -> bool,
) -> usize {
    let mut count = 0;
    while total.load(Ordering::Relaxed) > budget {
        let largest = sessions
            .values_mut()
            .filter_map(|e| size(&e.session).map(|n| (n, e)))
            .max_by_key(|(n, _)| *n);
        if !largest.is_some_and(|(_, e)| shed(&mut e.session)) {
            break;
        }
        count += 1;
    }
    count
}

/// The connection `id` names, if the slot still holds that generation.
pub(super) fn conn_mut(conns: &mut Slab<Conn>, id: ConnId) -> Option<&mut Conn> {
    conns
        .get_mut(id.slot)
        .filter(|c| c.id.generation == id.generation)
}

pub(super) fn is_resource_exhaustion(e: &io::Error) -> bool {
    // EMFILE, ENFILE, ENOBUFS, ENOMEM: out of descriptors or kernel memory.
    matches!(e.raw_os_error(), Some(24 | 23 | 105 | 12))
}
