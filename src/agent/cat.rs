//! The cat agent: each turn is relayed to a Cheshire Cat 1.x server over its chat WebSocket,
//! `ws://HOST:PORT/ws/{user_id}` (`?token=` with `--cat-token`), driven by the event loop.
//!
//! The user's message goes up as `{"text": ..., <the client's other fields>}`; the Cat's
//! `chat_token` and `notification` frames come back as ours, and its `chat` (text in `text`
//! or, before Cat 1.8, in `content`) or `error` ends the turn. The Cat keeps the
//! conversation itself (per user id), so no history is sent.
//!
//! One upstream socket per user, kept while the user talks: between turns it is parked
//! here, deregistered from the loop, in a table bounded by `--max-sessions` (the least
//! recently used goes first) and by [`PARKED_IDLE`]. A parked socket is not read, so the
//! Cat's pings go unanswered and it drops the socket in the end; the next turn finds out
//! before it sends anything (it reads what arrived first) and connects again, unseen by the
//! user. A socket that fails once the message is on its way fails the turn (`AgentError`):
//! whether the Cat got the message cannot be known, and the next turn connects afresh.
//!
//! Everything is non-blocking: the address is resolved once at start-up, the TCP connect
//! and tungstenite's client handshake resume on readiness (`MidHandshake`), and tungstenite
//! answers the Cat's pings whenever we read and flush.

use super::upstream::Upstream;
use super::{AgentError, PolledAgent, Step, Task, TaskCtx, Turn};
use crate::protocol::UserId;
use log::{debug, info};
use mio::net::TcpStream;
use mio::{Interest, Registry};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tungstenite::client::client_with_config;
use tungstenite::error::{Error as WsError, ProtocolError};
use tungstenite::handshake::HandshakeError;
use tungstenite::handshake::MidHandshake;
use tungstenite::handshake::client::ClientHandshake;
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};

/// A parked socket unused this long is closed. The Cat (uvicorn) and straycat ping every
/// 20 s and drop a socket that has not answered 20 s after a ping; a parked socket answers
/// nothing, so it is dead 40 s after its last turn at the latest.
pub const PARKED_IDLE: Duration = Duration::from_secs(40);

/// Idle parked sockets are looked for at most this often (the look is a scan of the table).
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Out of descriptors: for this process (`EMFILE`), for the system (`ENFILE`).
const EMFILE: i32 = 24;
const ENFILE: i32 = 23;

/// Messages read from the Cat per call before the task gives the loop back.
const READ_BUDGET_MESSAGES: usize = 64;

/// Bytes tungstenite reads per call and keeps allocated per socket, parked ones included:
/// as small as the server's own, since up to `--max-sessions` may be parked.
const READ_BUFFER_BYTES: usize = 2 * 1024;

/// What `Cat::new` needs.
pub struct CatConfig {
    /// `--cat-url`, `ws://HOST:PORT`.
    pub url: String,
    /// `--cat-token`.
    pub token: Option<String>,
    /// `--max-message-bytes`: the largest frame taken from the Cat.
    pub max_frame_bytes: usize,
    /// `--max-sessions`: upstream sockets kept at most.
    pub max_connections: usize,
}

/// Relays turns to a Cheshire Cat.
pub struct Cat {
    /// Resolved once at start-up: no DNS on the loop.
    addr: SocketAddr,
    /// `ws://host[:port][/path]`, which `/ws/{user}` follows (and names the `Host`).
    base_url: String,
    /// `?token=...`, percent-encoded, or empty.
    query: String,
    /// Bounded frames and messages, a small read buffer (see `Cat::new`).
    ws_config: WebSocketConfig,
    /// `--max-message-bytes`: the largest frame taken from the Cat.
    max_frame_bytes: usize,
    /// The users' sockets between turns.
    parking: Arc<Parking>,
}

impl Cat {
    /// Takes the URL apart and resolves its host (blocking: call at start-up).
    pub fn new(config: CatConfig) -> Result<Cat, String> {
        let upstream = Upstream::parse(&config.url, &["ws"])?;
        let addr = upstream.resolve()?;
        info!(
            "cat agent: {} resolved to {addr} (once, at start-up)",
            upstream.host
        );
        let max_frame_bytes = config.max_frame_bytes.max(16);
        // Writes only queue (one message per turn, flushed at once); reads are bounded by
        // the frame and message size, as the server's own sockets are.
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER_BYTES)
            .write_buffer_size(usize::MAX - 1)
            .max_write_buffer_size(usize::MAX)
            .max_message_size(Some(max_frame_bytes))
            .max_frame_size(Some(max_frame_bytes));
        let query = match &config.token {
            Some(t) => format!("?token={}", encode(t)),
            None => String::new(),
        };
        Ok(Cat {
            addr,
            base_url: format!("ws://{}{}", upstream.host_header(), upstream.path),
            query,
            ws_config,
            max_frame_bytes,
            parking: Arc::new(Parking::new(config.max_connections.max(1), PARKED_IDLE)),
        })
    }

    /// The URL of `user`'s chat socket.
    fn url(&self, user: &UserId) -> String {
        format!(
            "{}/ws/{}{}",
            self.base_url,
            encode(user.as_str()),
            self.query
        )
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl PolledAgent for Cat {
    fn name(&self) -> &str {
        "cat"
    }

    fn start(&self, turn: Turn, _now: Instant) -> Box<dyn Task> {
        let id = turn
            .fields
            .get("id")
            .and_then(Value::as_str)
            .map(String::from);
        let mut message = Map::new();
        message.insert("text".into(), Value::String(turn.text));
        for (k, v) in turn.fields {
            if k != "text" {
                message.insert(k, v);
            }
        }
        Box::new(CatTask {
            url: self.url(&turn.user),
            user: turn.user,
            addr: self.addr,
            ws_config: self.ws_config,
            max_frame_bytes: self.max_frame_bytes,
            parking: Arc::clone(&self.parking),
            message: Some(Value::Object(message).to_string()),
            id,
            state: State::Idle,
            reused: false,
            again: None,
        })
    }
}

// ---------------------------------------------------------------------------------------
// Parked sockets
// ---------------------------------------------------------------------------------------

/// One user's socket between turns.
struct Parked {
    /// Open, deregistered from the loop, not read until the user's next turn.
    ws: WebSocket<TcpStream>,
    /// When its last turn ended: for the idle bound and the least-recently-used choice.
    since: Instant,
}

/// The parked sockets, shared by the agent and its tasks (the agent must be `Sync`).
struct Parking {
    /// Sockets kept at most (`--max-sessions`).
    max: usize,
    /// Sockets parked longer are closed.
    idle: Duration,
    /// Taken by a turn's start and end, on the loop thread (the lock is never contended).
    table: Mutex<Table>,
}

/// What the lock guards.
#[derive(Default)]
struct Table {
    /// At most one socket per user: a user runs one turn at a time.
    by_user: HashMap<UserId, Parked>,
    /// The last scan for idle sockets.
    swept: Option<Instant>,
}

impl Table {
    /// Takes out the least recently used socket (a scan: only when the table is full, or
    /// out of descriptors).
    fn remove_oldest(&mut self) -> Option<(UserId, WebSocket<TcpStream>)> {
        let user = self
            .by_user
            .iter()
            .min_by_key(|(_, p)| p.since)
            .map(|(u, _)| u.clone())?;
        let parked = self.by_user.remove(&user)?;
        Some((user, parked.ws))
    }
}

impl Parking {
    fn new(max: usize, idle: Duration) -> Parking {
        Parking {
            max,
            idle,
            table: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // A panic elsewhere leaves a table that is still consistent (plain inserts and
        // removes): keep using it.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `user`'s parked socket, if it has one that is not too old.
    fn take(&self, user: &UserId, now: Instant) -> Option<WebSocket<TcpStream>> {
        let mut gone = Vec::new();
        let got = {
            let mut table = self.lock();
            self.sweep(&mut table, now, &mut gone);
            table.by_user.remove(user)
        };
        for old in gone {
            close_quietly(old);
        }
        let parked = got?;
        if now.saturating_duration_since(parked.since) >= self.idle {
            debug!("user={user} cat: its parked upstream socket was idle too long; closed");
            close_quietly(parked.ws);
            return None;
        }
        Some(parked.ws)
    }

    /// Parks `user`'s socket at `now`; past the bound, the least recently used goes.
    fn put(&self, user: UserId, ws: WebSocket<TcpStream>, now: Instant) {
        let mut gone = Vec::new();
        {
            let mut table = self.lock();
            self.sweep(&mut table, now, &mut gone);
            if let Some(old) = table.by_user.insert(user, Parked { ws, since: now }) {
                gone.push(old.ws);
            }
            while table.by_user.len() > self.max
                && let Some((oldest, ws)) = table.remove_oldest()
            {
                debug!(
                    "user={oldest} cat: parked upstream socket closed (least recently used; {} kept at most)",
                    self.max
                );
                gone.push(ws);
            }
        }
        for old in gone {
            close_quietly(old);
        }
    }

    /// Closes the least recently used parked socket; false when none is parked.
    fn drop_oldest(&self) -> bool {
        let oldest = self.lock().remove_oldest();
        let Some((user, ws)) = oldest else {
            return false;
        };
        info!("user={user} cat: parked upstream socket closed to free a descriptor");
        close_quietly(ws);
        true
    }

    /// Moves the sockets parked longer than the idle bound to `gone` (at most once a second).
    fn sweep(&self, table: &mut Table, now: Instant, gone: &mut Vec<WebSocket<TcpStream>>) {
        if table
            .swept
            .is_some_and(|at| now.saturating_duration_since(at) < SWEEP_EVERY)
        {
            return;
        }
        table.swept = Some(now);
        let idle = self.idle;
        let old: Vec<UserId> = table
            .by_user
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.since) >= idle)
            .map(|(u, _)| u.clone())
            .collect();
        for user in old {
            debug!(
                "user={user} cat: parked upstream socket closed (idle {} s)",
                idle.as_secs()
            );
            gone.extend(table.by_user.remove(&user).map(|p| p.ws));
        }
    }

    #[cfg(test)]
    fn users(&self) -> Vec<String> {
        let mut users: Vec<String> = self.lock().by_user.keys().map(|u| u.to_string()).collect();
        users.sort();
        users
    }
}

impl Drop for Parking {
    fn drop(&mut self) {
        let table = std::mem::take(&mut *self.lock());
        for (_, parked) in table.by_user {
            close_quietly(parked.ws);
        }
    }
}

/// Sends a close frame if the kernel takes it now, then drops the socket (the Cat sees a
/// clean close rather than a reset). Never blocks.
fn close_quietly(mut ws: WebSocket<TcpStream>) {
    let _ = ws.close(None);
    let _ = ws.flush();
}

// ---------------------------------------------------------------------------------------
// One turn
// ---------------------------------------------------------------------------------------

/// Where the turn's socket is.
enum State {
    /// No socket (before `start`, after the end).
    Idle,
    /// The TCP connect is under way.
    Connecting(TcpStream),
    /// The upgrade request is out (or going); waiting for the 101.
    Handshaking(MidHandshake<ClientHandshake<TcpStream>>),
    /// The chat socket.
    Open(WebSocket<TcpStream>),
}

/// One turn: the message to send, the socket, and what came back.
struct CatTask {
    /// Whose turn: the Cat's user id too.
    user: UserId,
    /// The Cat's address, resolved at start-up.
    addr: SocketAddr,
    /// `ws://…/ws/{user}?token=…`, for the upgrade request.
    url: String,
    ws_config: WebSocketConfig,
    /// `--max-message-bytes`, for the error that names it.
    max_frame_bytes: usize,
    /// Where the socket comes from and goes back to.
    parking: Arc<Parking>,
    /// The JSON to send, until it is handed to tungstenite.
    message: Option<String>,
    /// The client's `id`, sent along: a `chat` or `error` whose `reply_to` names another id
    /// answers an earlier message (a straycat upstream sends `reply_to`; the Cat does not).
    id: Option<String>,
    /// The socket.
    state: State,
    /// The socket came from the parking: if it turns out dead before the message went,
    /// connect again once.
    reused: bool,
    /// The read budget ran out: call again at this instant (the loop's next iteration).
    again: Option<Instant>,
}

/// What one frame from the Cat means for the turn.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Relay {
    /// A `chat_token` preview.
    Token(String),
    /// A `notification`.
    Notification(String),
    /// The end of the turn: the `chat`'s text, or the `error`'s description.
    End(Result<String, AgentError>),
    /// Nothing for the user (an unknown type, an answer to another message); why, for the log.
    Skip(String),
}

/// Reads one text frame of the Cat; `id` is the id of the message it may answer.
pub(crate) fn relay(text: &str, id: Option<&str>) -> Relay {
    let Ok(Value::Object(frame)) = serde_json::from_str::<Value>(text) else {
        return Relay::Skip("a frame that is not a JSON object".into());
    };
    let kind = frame.get("type").and_then(Value::as_str).unwrap_or("");
    let field = |name: &str| frame.get(name).and_then(Value::as_str).map(String::from);
    let other_id = match (frame.get("reply_to").and_then(Value::as_str), id) {
        (Some(theirs), Some(ours)) => theirs != ours,
        (Some(_), None) => true,
        _ => false,
    };
    match kind {
        "chat_token" => match field("content") {
            Some(t) if !t.is_empty() => Relay::Token(t),
            _ => Relay::Skip("an empty chat_token".into()),
        },
        "notification" => Relay::Notification(match frame.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => String::new(),
        }),
        "chat" | "error" if other_id => Relay::Skip(format!("a {kind} for another message")),
        // Cat 1.8 and straycat: `text` (straycat sends `content` too); before 1.8: `content`.
        "chat" => match field("text").or_else(|| field("content")) {
            Some(t) => Relay::End(Ok(t)),
            None => Relay::End(Err(AgentError::Failed(
                "the Cat sent a chat without text".into(),
            ))),
        },
        "error" => {
            let why = field("description")
                .or_else(|| field("content"))
                .or_else(|| field("name"))
                .unwrap_or_else(|| "an error without a description".into());
            Relay::End(Err(AgentError::Failed(format!("the Cat: {why}"))))
        }
        other => Relay::Skip(format!("a frame of type {other:?}")),
    }
}

/// The turn failed with this description.
fn failed(why: impl Into<String>) -> AgentError {
    AgentError::Failed(why.into())
}

/// Why reading from or writing to the Cat failed.
fn ws_error(e: &WsError, max_frame_bytes: usize) -> String {
    match e {
        WsError::Capacity(_) => format!(
            "the Cat sent a message larger than {max_frame_bytes} bytes (--max-message-bytes)"
        ),
        WsError::ConnectionClosed | WsError::AlreadyClosed => {
            "the Cat closed the connection".into()
        }
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            "the connection to the Cat dropped (no close frame)".into()
        }
        WsError::Io(e) => format!("the connection to the Cat failed: {e}"),
        e => format!("the Cat's WebSocket: {e}"),
    }
}

fn is_would_block(e: &WsError) -> bool {
    matches!(e, WsError::Io(e) if e.kind() == io::ErrorKind::WouldBlock)
}

/// Whether the TCP connect is done (mio: a writable event, then `take_error` and
/// `peer_addr` tell).
fn tcp_connected(sock: &TcpStream) -> Result<bool, String> {
    if let Ok(Some(e)) | Err(e) = sock.take_error() {
        return Err(e.to_string());
    }
    match sock.peer_addr() {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
        Err(e) => Err(e.to_string()),
    }
}

/// What the reads before the message goes found.
enum Before {
    /// Nothing more is there: send.
    Clear,
    /// The read budget ran out first.
    Budget,
    /// The socket is dead: why.
    Dead(String),
}

impl CatTask {
    /// Starts a new connection, registered as source 0.
    fn connect(&mut self, ctx: &mut TaskCtx<'_>) -> Result<(), AgentError> {
        info!("user={} cat: connecting to {}", self.user, self.addr);
        let mut attempt = TcpStream::connect(self.addr);
        // Out of descriptors: parked sockets are the cheapest to give up (each user with a
        // socket on our side may hold one to the Cat too).
        while let Err(e) = &attempt
            && matches!(e.raw_os_error(), Some(EMFILE | ENFILE))
            && self.parking.drop_oldest()
        {
            attempt = TcpStream::connect(self.addr);
        }
        let mut sock = attempt
            .map_err(|e| failed(format!("cannot connect to the Cat at {}: {e}", self.addr)))?;
        let _ = sock.set_nodelay(true);
        ctx.register(&mut sock, 0, Interest::READABLE | Interest::WRITABLE)
            .map_err(|e| failed(format!("cannot watch the Cat's socket: {e}")))?;
        self.state = State::Connecting(sock);
        Ok(())
    }

    /// Moves the turn along; `Ok(Some(outcome))` when the Cat ended it (the socket is
    /// still good), `Err` when the socket failed.
    fn drive(
        &mut self,
        ctx: &mut TaskCtx<'_>,
    ) -> Result<Option<Result<String, AgentError>>, AgentError> {
        loop {
            match std::mem::replace(&mut self.state, State::Idle) {
                State::Idle => return Ok(None),
                State::Connecting(mut sock) => match tcp_connected(&sock) {
                    Ok(false) => {
                        self.state = State::Connecting(sock);
                        return Ok(None);
                    }
                    Ok(true) => {
                        let started =
                            client_with_config(self.url.as_str(), sock, Some(self.ws_config));
                        self.state = self.handshake(started)?;
                    }
                    Err(e) => {
                        let _ = ctx.registry().deregister(&mut sock);
                        return Err(failed(format!(
                            "cannot connect to the Cat at {}: {e}",
                            self.addr
                        )));
                    }
                },
                State::Handshaking(mid) => self.state = self.handshake(mid.handshake())?,
                State::Open(ws) => {
                    self.state = State::Open(ws);
                    return self.exchange(ctx);
                }
            }
            if let State::Handshaking(_) = self.state {
                return Ok(None);
            }
        }
    }

    /// The next state after a round of the client handshake. A handshake that fails
    /// drops its socket inside tungstenite: closing the descriptor takes it out of the
    /// poll set.
    fn handshake(
        &self,
        result: Result<
            (
                WebSocket<TcpStream>,
                tungstenite::handshake::client::Response,
            ),
            HandshakeError<ClientHandshake<TcpStream>>,
        >,
    ) -> Result<State, AgentError> {
        match result {
            Ok((ws, _)) => {
                info!("user={} cat: connected to {}", self.user, self.addr);
                Ok(State::Open(ws))
            }
            Err(HandshakeError::Interrupted(mid)) => Ok(State::Handshaking(mid)),
            Err(HandshakeError::Failure(WsError::Http(resp))) => {
                let status = resp.status();
                let body = resp
                    .body()
                    .as_deref()
                    .map(|b| String::from_utf8_lossy(b).trim().to_string())
                    .filter(|b| !b.is_empty())
                    .map(|b| format!(": {}", shorten(&b)))
                    .unwrap_or_default();
                Err(failed(format!(
                    "the Cat at {} refused the connection with {status}{body}{}",
                    self.addr,
                    if status.as_u16() == 403 {
                        " (is --cat-token right?)"
                    } else {
                        ""
                    }
                )))
            }
            Err(HandshakeError::Failure(e)) => Err(failed(format!(
                "the WebSocket handshake with the Cat at {} failed: {e}",
                self.addr
            ))),
        }
    }

    /// On the open socket: read what came before the message, send it, flush, read the
    /// answer.
    fn exchange(
        &mut self,
        ctx: &mut TaskCtx<'_>,
    ) -> Result<Option<Result<String, AgentError>>, AgentError> {
        let max = self.max_frame_bytes;
        let State::Open(ws) = &mut self.state else {
            return Ok(None);
        };
        let mut budget = READ_BUDGET_MESSAGES;
        if let Some(message) = self.message.take() {
            match read_before(ws, ctx, &self.user, &mut budget, max) {
                Before::Clear => {}
                Before::Budget => {
                    self.message = Some(message);
                    self.again = Some(ctx.now());
                    return Ok(None);
                }
                Before::Dead(why) => {
                    self.message = Some(message);
                    return self.redial(ctx, why);
                }
            }
            match ws.write(Message::text(message)) {
                Ok(()) => {}
                Err(e) if is_would_block(&e) => {} // queued
                Err(e) => return Err(failed(ws_error(&e, max))),
            }
        }
        match ws.flush() {
            Ok(()) => {}
            Err(e) if is_would_block(&e) => {}
            Err(e) => return Err(failed(ws_error(&e, max))),
        }
        loop {
            if budget == 0 {
                // More may be buffered, and edge-triggered readiness will not say so again.
                self.again = Some(ctx.now());
                return Ok(None);
            }
            budget -= 1;
            match ws.read() {
                Ok(Message::Text(text)) => match relay(text.as_str(), self.id.as_deref()) {
                    Relay::Token(t) => ctx.token_text(t),
                    Relay::Notification(n) => ctx.notify(n),
                    Relay::End(outcome) => return Ok(Some(outcome)),
                    Relay::Skip(what) => debug!("user={} cat: skipped {what}", self.user),
                },
                Ok(Message::Close(frame)) => {
                    let why = frame
                        .map(|f| format!(" ({} {})", u16::from(f.code), f.reason))
                        .unwrap_or_default();
                    return Err(failed(format!(
                        "the Cat closed the connection mid-turn{why}"
                    )));
                }
                // Pings are answered by tungstenite (at the next read or flush).
                Ok(_) => {}
                Err(e) if is_would_block(&e) => return Ok(None),
                Err(e) => {
                    return Err(failed(format!(
                        "lost the Cat mid-turn: {}",
                        ws_error(&e, max)
                    )));
                }
            }
        }
    }

    /// The socket died before the message went: a parked one is replaced by a new
    /// connection, once; a new one fails the turn.
    fn redial(
        &mut self,
        ctx: &mut TaskCtx<'_>,
        why: String,
    ) -> Result<Option<Result<String, AgentError>>, AgentError> {
        self.close(ctx.registry());
        if !self.reused {
            return Err(failed(why));
        }
        info!(
            "user={} cat: the parked upstream socket is gone ({why}); connecting again",
            self.user
        );
        self.reused = false;
        self.connect(ctx)?;
        Ok(None)
    }

    fn step(&mut self, ctx: &mut TaskCtx<'_>) -> Step {
        self.again = None;
        match self.drive(ctx) {
            Ok(None) => Step::Pending,
            Ok(Some(outcome)) => {
                self.park(ctx);
                Step::Done(outcome)
            }
            Err(e) => {
                self.close(ctx.registry());
                Step::Done(Err(e))
            }
        }
    }

    /// The turn ended well: the socket waits for the user's next turn.
    fn park(&mut self, ctx: &mut TaskCtx<'_>) {
        if let State::Open(mut ws) = std::mem::replace(&mut self.state, State::Idle) {
            let _ = ctx.registry().deregister(ws.get_mut());
            self.parking.put(self.user.clone(), ws, ctx.now());
        }
    }

    /// Releases the socket, whatever its state.
    fn close(&mut self, registry: &Registry) {
        match std::mem::replace(&mut self.state, State::Idle) {
            State::Idle => {}
            State::Connecting(mut sock) => {
                let _ = registry.deregister(&mut sock);
            }
            State::Handshaking(mut mid) => {
                let _ = registry.deregister(mid.get_mut().get_mut());
            }
            State::Open(mut ws) => {
                let _ = registry.deregister(ws.get_mut());
                close_quietly(ws);
            }
        }
    }
}

/// Reads what the Cat sent before this turn's message: notifications are the user's and go
/// through; a token, chat or error answers an earlier message and is dropped. Tells
/// whether the socket is still alive.
fn read_before(
    ws: &mut WebSocket<TcpStream>,
    ctx: &mut TaskCtx<'_>,
    user: &UserId,
    budget: &mut usize,
    max_frame_bytes: usize,
) -> Before {
    loop {
        if *budget == 0 {
            return Before::Budget;
        }
        *budget -= 1;
        match ws.read() {
            Ok(Message::Text(text)) => match relay(text.as_str(), None) {
                Relay::Notification(n) => ctx.notify(n),
                Relay::Token(_) => debug!("user={user} cat: dropped a token of an earlier turn"),
                Relay::End(_) => info!(
                    "user={user} cat: dropped a chat or error that came before this turn's message"
                ),
                Relay::Skip(what) => debug!("user={user} cat: skipped {what}"),
            },
            Ok(Message::Close(_)) => return Before::Dead("the Cat closed it".into()),
            Ok(_) => {}
            Err(e) if is_would_block(&e) => return Before::Clear,
            Err(e) => return Before::Dead(ws_error(&e, max_frame_bytes)),
        }
    }
}

/// At most 200 characters of the Cat's text, for an error description.
pub(crate) fn shorten(s: &str) -> String {
    match s.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

impl Task for CatTask {
    fn start(&mut self, ctx: &mut TaskCtx<'_>) -> Step {
        if let Some(mut ws) = self.parking.take(&self.user, ctx.now()) {
            match ctx.register(ws.get_mut(), 0, Interest::READABLE | Interest::WRITABLE) {
                Ok(()) => {
                    debug!("user={} cat: reusing its upstream socket", self.user);
                    self.state = State::Open(ws);
                    self.reused = true;
                    return self.step(ctx);
                }
                Err(e) => {
                    debug!(
                        "user={} cat: cannot watch the parked socket: {e}",
                        self.user
                    );
                    close_quietly(ws);
                }
            }
        }
        match self.connect(ctx) {
            Ok(()) => Step::Pending,
            Err(e) => Step::Done(Err(e)),
        }
    }

    fn ready(&mut self, _: usize, _: bool, _: bool, ctx: &mut TaskCtx<'_>) -> Step {
        self.step(ctx)
    }

    fn timeout(&mut self, ctx: &mut TaskCtx<'_>) -> Step {
        self.step(ctx)
    }

    fn poll_at(&self) -> Option<Instant> {
        self.again
    }

    fn abort(&mut self, registry: &Registry) {
        // Mid-turn: the Cat may still answer on this socket, so it is never parked.
        self.close(registry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use tungstenite::protocol::Role;

    #[test]
    fn frames_of_the_cat_are_read_in_both_dialects() {
        assert_eq!(
            relay(r#"{"type":"chat_token","content":"Hel"}"#, None),
            Relay::Token("Hel".into())
        );
        assert_eq!(
            relay(r#"{"type":"notification","content":"Looking…"}"#, None),
            Relay::Notification("Looking…".into())
        );
        // Cat 1.8 and straycat: `text`; older: `content` only.
        assert_eq!(
            relay(
                r#"{"type":"chat","text":"Hi","content":"Hi","who":"AI"}"#,
                None
            ),
            Relay::End(Ok("Hi".into()))
        );
        assert_eq!(
            relay(r#"{"type":"chat","content":"Old","who":"AI"}"#, None),
            Relay::End(Ok("Old".into()))
        );
        assert_eq!(
            relay(
                r#"{"type":"error","name":"ValueError","description":"llm down"}"#,
                None
            ),
            Relay::End(Err(failed("the Cat: llm down")))
        );
        assert!(matches!(relay("[1]", None), Relay::Skip(_)));
        assert!(matches!(relay("nope", None), Relay::Skip(_)));
        assert!(matches!(relay(r#"{"type":"x"}"#, None), Relay::Skip(_)));
        assert!(matches!(
            relay(r#"{"type":"chat","who":"AI"}"#, None),
            Relay::End(Err(_))
        ));
    }

    #[test]
    fn a_reply_to_another_message_is_skipped() {
        let chat = r#"{"type":"chat","text":"old","reply_to":"m1"}"#;
        assert!(matches!(relay(chat, Some("m2")), Relay::Skip(_)));
        assert!(matches!(relay(chat, None), Relay::Skip(_)));
        assert_eq!(relay(chat, Some("m1")), Relay::End(Ok("old".into())));
        // The Cat sends no reply_to: its chat answers whatever was asked.
        assert_eq!(
            relay(r#"{"type":"chat","text":"x"}"#, Some("m2")),
            Relay::End(Ok("x".into()))
        );
    }

    #[test]
    fn urls_are_built_and_encoded() {
        assert_eq!(encode("al@ice"), "al%40ice");
        assert_eq!(encode("a-b_c.d~"), "a-b_c.d~");
        assert_eq!(encode("k&y=1+ %"), "k%26y%3D1%2B%20%25");
        let cat = Cat::new(CatConfig {
            url: "ws://127.0.0.1:1865/cat/".into(),
            token: Some("s/3".into()),
            max_frame_bytes: 1 << 16,
            max_connections: 4,
        })
        .unwrap();
        let user = UserId::parse("al@ice").unwrap();
        assert_eq!(
            cat.url(&user),
            "ws://127.0.0.1:1865/cat/ws/al%40ice?token=s%2F3"
        );
        for bad in ["http://127.0.0.1:1", "wss://127.0.0.1:1", "127.0.0.1:1"] {
            let config = CatConfig {
                url: bad.into(),
                token: None,
                max_frame_bytes: 1 << 16,
                max_connections: 4,
            };
            assert!(Cat::new(config).is_err(), "{bad}");
        }
    }

    /// A WebSocket over a real loopback socket (no handshake: parking never reads it).
    fn socket(listener: &TcpListener) -> WebSocket<TcpStream> {
        let std = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        std.set_nonblocking(true).unwrap();
        WebSocket::from_raw_socket(TcpStream::from_std(std), Role::Client, None)
    }

    #[test]
    fn parking_keeps_the_most_recent_and_forgets_the_idle() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let user = |s: &str| UserId::parse(s).unwrap();
        let t0 = Instant::now();
        let secs = Duration::from_secs;
        let parking = Parking::new(2, secs(40));
        parking.put(user("a"), socket(&listener), t0);
        parking.put(user("b"), socket(&listener), t0 + secs(1));
        parking.put(user("c"), socket(&listener), t0 + secs(2));
        assert_eq!(parking.users(), ["b", "c"], "the least recently used went");
        // Taking b and parking it again makes c the oldest.
        let b = parking.take(&user("b"), t0 + secs(3)).expect("b is parked");
        parking.put(user("b"), b, t0 + secs(4));
        parking.put(user("d"), socket(&listener), t0 + secs(5));
        assert_eq!(parking.users(), ["b", "d"]);
        // A socket parked too long is not handed out, and the sweep closes the others.
        assert!(parking.take(&user("b"), t0 + secs(45)).is_none());
        assert!(parking.users().is_empty(), "d was idle too and is gone");
        assert!(parking.take(&user("nobody"), t0 + secs(46)).is_none());
        // Out of descriptors: the oldest goes first, then there is nothing to give.
        parking.put(user("e"), socket(&listener), t0 + secs(47));
        parking.put(user("f"), socket(&listener), t0 + secs(48));
        assert!(parking.drop_oldest());
        assert_eq!(parking.users(), ["f"]);
        assert!(parking.drop_oldest());
        assert!(!parking.drop_oldest());
    }
}
