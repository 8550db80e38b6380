//! The event loop: one thread, one `mio::Poll`, a slab of connections and the session
//! table. It reads the clock once per iteration, moves bytes, hands what sockets say to the
//! session table, and applies what the table answers (frames to send, sockets to close,
//! turns to start). Agents run on the worker pool and come back through the waker.
//!
//! Files by owner: this one the loop and its shutdown; `accept.rs` accepting and the HTTP
//! phase; `io.rs` WebSocket reads, writes, flushes and closes, and the server-wide unsent
//! budget; `effects.rs` chat messages into the session table and its effects out;
//! `timers.rs` the deadlines.

mod accept;
mod api;
mod effects;
mod io;
mod tasks;
mod timers;

use crate::agent::Backend;
use crate::agent::pool::{Notifier, Pool};
use crate::auth::Secret;
use crate::config::Config;
use crate::conn::{Conn, ConnId, READ_BUFFER_BYTES, Stage, UnsentTotals};
use crate::limits::PerClient;
use crate::metrics::{self, Gauges, Metrics, StateGauges};
use crate::protocol::unix_now;
use crate::session::{Effect, Limits, Now, Sessions, TableLimits};
use crate::store::{self, Store};
use crate::systemd::SdNotify;
use crate::timer::Timers;
use crate::tls::{Reload, ServerTls, TlsSetupError};
use log::{error, info, warn};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tasks::{TASK_TOKEN_BASE, Tasks};
use timers::TimerKey;
use tungstenite::protocol::WebSocketConfig;
use tungstenite::protocol::frame::coding::CloseCode;

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);

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
    /// With TLS: what SIGHUP does (re-read the certificate and key).
    reload: Option<Arc<Reload>>,
}

impl ShutdownHandle {
    /// Starts the graceful shutdown: stop accepting, close every socket with 1001, wait at
    /// most 5 s for the close handshakes, return from [`Server::run`].
    pub fn shutdown(&self) {
        self.flag.store(true, Ordering::Release);
        self.notifier.wake();
    }

    /// Starts the graceful shutdown on the first SIGTERM or SIGINT; with TLS, also re-reads
    /// the certificate and key on every SIGHUP. The signals are read on a small thread of
    /// their own (signal-hook), which only calls [`ShutdownHandle::shutdown`] or reads the
    /// two files: nothing runs in a signal handler but signal-hook's own, and the event loop
    /// never waits for a file. Without TLS, SIGHUP keeps its default action.
    pub fn on_termination_signals(&self) -> std::io::Result<()> {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let mut wanted = vec![SIGTERM, SIGINT];
        if self.reload.is_some() {
            wanted.push(SIGHUP);
        }
        let mut signals = signal_hook::iterator::Signals::new(&wanted)?;
        let handle = self.clone();
        std::thread::Builder::new()
            .name("straycat-signals".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                for sig in signals.forever() {
                    if sig == SIGHUP
                        && let Some(reload) = &handle.reload
                    {
                        info!("signal {sig} received: reloading the TLS certificate");
                        reload.run();
                        continue;
                    }
                    info!("signal {sig} received");
                    handle.shutdown();
                    break;
                }
            })
            .map(|_| ())
    }
}

/// A connection and the loop's bookkeeping for it.
struct Slot {
    conn: Conn,
    /// The instant this connection is scheduled in the timer heap for.
    timer_at: Option<Instant>,
    /// In `read_queue`.
    queued_read: bool,
    /// Counted in `per_client` (to be uncounted when it goes).
    per_client: bool,
    /// A closing socket no longer registered for reading (see `Server::stop_reading`).
    deaf: bool,
}

/// The server: everything the event loop owns.
pub struct Server {
    poll: Poll,
    listener: TcpListener,
    local_addr: SocketAddr,
    conns: Slab<Slot>,
    sessions: Sessions,
    /// Connection deadlines, accept back-off and the watchdog (sessions keep their own).
    timers: Timers<TimerKey>,
    /// The worker threads of a blocking agent.
    pool: Option<Pool>,
    /// The turns of an agent driven by the loop.
    tasks: Option<Tasks>,
    /// Wakes the loop from other threads (workers' results, the shutdown handle).
    notifier: Notifier,
    config: Config,
    /// Tungstenite's settings for every WebSocket (see `from_listener`).
    ws_config: WebSocketConfig,
    /// The time, read once per loop iteration.
    now: Now,
    /// Connections that may still have unread data (edge-triggered readiness will not
    /// tell us again), served one budget each per loop iteration.
    read_queue: VecDeque<ConnId>,
    /// Connections written to since the last flush.
    flush_queue: Vec<ConnId>,
    /// What the session table asked for and the loop has not done yet; kept to reuse its
    /// allocation.
    effects: Vec<Effect>,
    /// Generations of connections made, so a slot's later occupant is told from the first.
    next_generation: u64,
    /// Connections being told 503 because the cap was reached.
    refusing: usize,
    /// Accepting paused after running out of file descriptors.
    accept_paused: bool,
    started: Instant,
    shutdown_flag: Arc<AtomicBool>,
    shutdown_handle: ShutdownHandle,
    /// Set by the shutdown: when the grace period ends.
    stopping: Option<Instant>,
    /// The service manager's notification socket, when run by systemd.
    sd_notify: Option<SdNotify>,
    /// How often to tell systemd the loop is alive (half of `WatchdogSec`).
    watchdog: Option<Duration>,
    /// The state dir's journal, with `--state-dir`.
    store: Option<Store>,
    /// What `/metrics` shows (and the agent's part of `/health`).
    metrics: Metrics,
    /// `--jwt-secret`, ready to verify tokens with.
    jwt: Option<Secret>,
    /// Open connections and upgrade attempts per client address.
    per_client: PerClient,
    /// Unsent bytes of all sockets, kept by the sockets themselves as they change
    /// (`--max-buffered-bytes-total`).
    unsent: UnsentTotals,
    /// With `--tls-cert`: every connection is TLS, with this certificate.
    tls: Option<ServerTls>,
}

impl Server {
    /// Binds the listener and gets the agent ready (a blocking agent: its worker threads).
    pub fn bind(config: Config, agent: impl Into<Backend>) -> std::io::Result<Server> {
        let listener = TcpListener::bind(config.listen)?;
        Server::from_listener(listener, config, agent)
    }

    /// Serves an already bound listener (socket activation, tests).
    pub fn from_listener(
        mut listener: TcpListener,
        config: Config,
        agent: impl Into<Backend>,
    ) -> std::io::Result<Server> {
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let notifier = Notifier::new(waker);
        let tls = ServerTls::from_config(&config, &notifier)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, TlsSetupError(e)))?;
        let backend = agent.into();
        let agent_kind =
            metrics::agent_kind(matches!(backend, Backend::Threads(_)), backend.name());
        let (pool, tasks) = match backend {
            Backend::Threads(agent) => (
                Some(Pool::start(config.workers, agent, notifier.clone())?),
                None,
            ),
            Backend::Polled(agent) => (None, Some(Tasks::new(agent))),
        };
        let local_addr = listener.local_addr()?;
        let shutdown_flag = Arc::new(AtomicBool::new(false));
        let sessions = Sessions::new(TableLimits {
            session: Limits {
                history_turns: config.history_turns,
                max_held_frames: config.max_held_frames,
                max_held_bytes: config.max_held_bytes,
                max_queued_turns: config.max_queued_turns,
                turn_timeout: config.turn_timeout,
                max_messages_per_minute: config.max_messages_per_minute,
            },
            ttl: config.session_ttl,
            max_sessions: config.max_sessions,
            max_held_bytes_total: config.max_held_bytes_total,
            max_history_bytes_total: config.max_history_bytes_total,
        });
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
            sessions,
            timers: Timers::default(),
            shutdown_handle: ShutdownHandle {
                flag: Arc::clone(&shutdown_flag),
                notifier: notifier.clone(),
                reload: tls.as_ref().map(ServerTls::reload_handle),
            },
            pool,
            tasks,
            notifier: notifier.clone(),
            ws_config,
            now: clock(),
            read_queue: VecDeque::new(),
            flush_queue: Vec::new(),
            effects: Vec::new(),
            next_generation: 1,
            refusing: 0,
            accept_paused: false,
            started: Instant::now(),
            shutdown_flag,
            stopping: None,
            sd_notify: None,
            watchdog: None,
            store: None,
            metrics: Metrics::new(agent_kind),
            jwt: config.jwt_secret.as_deref().map(|s| {
                if s.len() < 32 {
                    warn!("--jwt-secret is shorter than 32 bytes: tokens signed with it can be guessed offline");
                }
                Secret::new(s)
            }),
            per_client: PerClient::new(
                config.max_connections_per_ip,
                config.max_connects_per_minute_per_ip,
            ),
            unsent: UnsentTotals::default(),
            tls,
            config,
        })
    }

    /// With `--state-dir`: replays the state dir's journal into the session table (the
    /// turns it owes start when the loop runs) and keeps writing it from now on. An
    /// error is one sentence: the dir cannot be made, locked, read or written.
    pub fn with_state_dir(mut self) -> Result<Server, String> {
        let Some(dir) = self.config.state_dir.clone() else {
            return Ok(self);
        };
        let now = clock();
        let store = store::restore_into(
            std::path::Path::new(&dir),
            &mut self.sessions,
            now,
            &mut self.effects,
        )?;
        self.store = Some(store);
        Ok(self)
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
    pub fn run(mut self) -> std::io::Result<()> {
        let mut events = Events::with_capacity(EVENTS_CAPACITY);
        let tls = if self.tls.is_some() {
            " (TLS only)"
        } else {
            ""
        };
        info!("straycat listening on {}{tls}", self.local_addr);
        if let Some(sd) = &self.sd_notify {
            sd.send(&format!("READY=1\nSTATUS=listening on {}", self.local_addr));
        }
        if let Some(every) = self.watchdog {
            info!("systemd watchdog: notifying every {} ms", every.as_millis());
            self.timers.push(Instant::now(), TimerKey::Watchdog);
        }
        // The turns a restored state dir owes.
        self.apply_effects();
        loop {
            let store_busy = self.store.as_ref().is_some_and(Store::busy);
            let timeout = if self.read_queue.is_empty() && !store_busy {
                let store_at = self.store.as_ref().and_then(Store::wake_at);
                let next = [self.timers.next_at(), self.sessions.poll_at(), store_at]
                    .into_iter()
                    .flatten()
                    .min();
                next.map(|at| at.saturating_duration_since(Instant::now()))
            } else {
                Some(Duration::ZERO)
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            self.now = clock();
            let mut woken = false;
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    WAKER => woken = true,
                    token if token.0 >= TASK_TOKEN_BASE => {
                        let hung_up = event.is_read_closed() || event.is_error();
                        let readable = event.is_readable() || hung_up;
                        self.task_event(token, (readable, event.is_writable(), hung_up));
                    }
                    Token(slot) => {
                        let Some(s) = self.conns.get(slot) else {
                            continue;
                        };
                        let id = s.conn.id();
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
                self.notifier.clear();
                if let Some(tls) = &mut self.tls {
                    tls.take_reloaded();
                }
                self.drain_results();
            }
            self.serve_read_queue();
            self.run_timers();
            self.sessions.enforce_budgets();
            self.flush_all();
            self.enforce_unsent_budget();
            if let Some(store) = &mut self.store {
                store.after_iteration(&mut self.sessions, self.now);
            }
            if let Some(pool) = &self.pool {
                pool.kick();
            }
            // A second clock read per iteration (vDSO, tens of nanoseconds): what tells a
            // loop that stalls on a slow snapshot or a flood from one that idles.
            self.metrics
                .iteration(Instant::now().saturating_duration_since(self.now.mono));
            if self.stopping.is_none() && self.shutdown_flag.load(Ordering::Acquire) {
                self.begin_shutdown();
            }
            if self.shutdown_finished() {
                if let Some(store) = self.store.take() {
                    store.stop(&mut self.sessions);
                }
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
                .map(|c| (c.user().to_string(), c.peer().to_string()))
                .unwrap_or_default();
            error!(
                "user={user} peer={peer} internal error while serving this connection; dropping it"
            );
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.remove(id, "internal error")
            }));
        }
    }

    /// The connection `id` names, if the slot still holds that generation.
    fn conn(&mut self, id: ConnId) -> Option<&mut Conn> {
        self.slot(id).map(|s| &mut s.conn)
    }

    fn slot(&mut self, id: ConnId) -> Option<&mut Slot> {
        slot_in(&mut self.conns, id)
    }

    fn health_json(&self) -> String {
        let degraded = self.store.as_ref().is_some_and(Store::degraded);
        let mut health = serde_json::json!({
            "status": if degraded { "degraded" } else { "ok" },
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_s": self.started.elapsed().as_secs(),
            "connections": self.conns.len(),
            "sessions": self.sessions.len(),
        });
        if let Some(store) = &self.store {
            health["state"] = store.health();
        }
        health["agent"] = self.metrics.agent_health();
        health.to_string()
    }

    /// The `/metrics` exposition: the loop's counters, and what the connections, the
    /// session table and the state dir hold right now.
    fn metrics_text(&self) -> String {
        const STAGES: [Stage; 6] = [
            Stage::Handshake,
            Stage::Respond,
            Stage::Linger,
            Stage::Await,
            Stage::Open,
            Stage::Closing,
        ];
        let mut by_stage = STAGES.map(|stage| (stage, 0u64));
        for (_, slot) in &self.conns {
            if let Some(stage) = slot.conn.stage()
                && let Some((_, n)) = by_stage.iter_mut().find(|(s, _)| *s == stage)
            {
                *n += 1;
            }
        }
        let table = self.sessions.occupancy();
        // The store's counters as `/health` shows them, so both read the same figures
        // (and the store needs no second accessor).
        let state = self.store.as_ref().map(|store| {
            let h = store.health();
            let get = |k: &str| h[k].as_u64().unwrap_or(0);
            StateGauges {
                records_written: get("records_written"),
                bytes_written: get("bytes_written"),
                syncs: get("syncs"),
                write_errors: get("write_errors"),
                disk_bytes: get("disk_bytes"),
                unsynced_records: get("unsynced_records"),
                degraded: store.degraded(),
            }
        });
        let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        self.metrics.render(&Gauges {
            connections: by_stage
                .iter()
                .map(|(stage, n)| (stage.to_string(), *n))
                .collect(),
            sessions_attached: count(table.attached),
            sessions_detached: count(table.detached),
            held_frames: count(table.held_frames),
            held_bytes: count(table.held_bytes),
            history_bytes: count(table.history_bytes),
            unsent_open: count(self.unsent.open()),
            unsent_closing: count(self.unsent.closing()),
            state,
        })
    }

    /// Stops accepting, cancels every turn, and closes every socket with 1001.
    fn begin_shutdown(&mut self) {
        let until = self.now.mono + SHUTDOWN_GRACE;
        info!(
            "shutting down: closing {} connections with 1001",
            self.conns.len()
        );
        self.stopping = Some(until);
        if let Some(sd) = &self.sd_notify {
            sd.send("STOPPING=1");
        }
        let _ = self.poll.registry().deregister(&mut self.listener);
        self.sessions.cancel_all();
        self.metrics.forget_turns();
        self.abort_all_tasks();
        if let Some(pool) = &mut self.pool {
            pool.close();
        }
        let ids: Vec<(ConnId, Option<Stage>)> = self
            .conns
            .iter()
            .map(|(_, s)| (s.conn.id(), s.conn.stage()))
            .collect();
        for (id, stage) in ids {
            match stage {
                Some(Stage::Open) => self.close_conn(id, CloseCode::Away, "server shutting down"),
                Some(Stage::Closing) => {}
                _ => self.remove(id, "server shutting down"),
            }
        }
        self.flush_all();
    }

    /// After the shutdown began: whether every socket is gone or the grace period is over;
    /// then the worker threads are given a last moment and the loop may return.
    fn shutdown_finished(&mut self) -> bool {
        let Some(until) = self.stopping else {
            return false;
        };
        if !self.conns.is_empty() && Instant::now() < until {
            return false;
        }
        let left = self.conns.len();
        if left > 0 {
            warn!("shutdown grace period over: dropping {left} connections");
        }
        let busy = match &mut self.pool {
            Some(pool) => {
                pool.close();
                pool.reap(Instant::now() + WORKER_EXIT_WAIT)
            }
            None => 0,
        };
        if busy == 0 {
            info!("stopped");
        } else {
            warn!("stopped; {busy} worker threads still busy are abandoned");
        }
        true
    }
}

/// The slot of connection `id`, if it still holds that generation. A function of the slab
/// alone, so that the rest of the server can be borrowed beside it.
fn slot_in(conns: &mut Slab<Slot>, id: ConnId) -> Option<&mut Slot> {
    conns.get_mut(id.slot()).filter(|s| s.conn.id() == id)
}

/// The time, for deadlines and for the `when` of chat frames.
fn clock() -> Now {
    Now {
        mono: Instant::now(),
        unix: unix_now(),
    }
}
