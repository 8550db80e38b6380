//! One TCP connection through its life: reading the HTTP request head, writing the HTTP
//! answer, speaking WebSocket through tungstenite, and closing. Only byte moving and the
//! connection's own deadlines live here; what a message means is the server's business.

mod counted;
mod handshake;
mod heartbeat;
mod stream;
mod ws;

pub use handshake::HeadRead;
pub use heartbeat::{Beat, Heartbeat};
pub use stream::Stream;
#[cfg(feature = "tls")]
pub use stream::TlsStream;
pub use ws::{UnsentTotals, WsRead, WsWrite};
#[cfg(feature = "fuzzing")]
pub(crate) use {counted::MockStream, handshake::read_head};

use crate::http::ChatTarget;
use crate::session::SessionRef;
use mio::net::TcpStream;
use std::borrow::Cow;
use std::fmt;
use std::net::SocketAddr;
use std::time::Instant;
use stream::Socket;
use tungstenite::Message;
use tungstenite::Utf8Bytes;
use tungstenite::protocol::WebSocketConfig;
use tungstenite::protocol::frame::coding::CloseCode;
pub(crate) use ws::Ws;

/// Bytes tungstenite reads per `read` call and keeps allocated per connection. Small,
/// because an idle kiosk connection must cost a few KiB; a larger message grows the buffer
/// only while it is being read.
pub const READ_BUFFER_BYTES: usize = 2 * 1024;

/// Bytes a refused client may still send after its answer before the socket is dropped.
const LINGER_DISCARD_BYTES: usize = 64 * 1024;

/// Names a connection from outside the event loop. Slab slots are reused, so the
/// generation tells a reference to an old occupant from one to the current.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId {
    slot: usize,
    generation: u64,
}

impl ConnId {
    /// The connection in slab slot `slot`, the `generation`-th made.
    pub fn new(slot: usize, generation: u64) -> ConnId {
        ConnId { slot, generation }
    }

    /// The slab slot (also the mio token).
    pub fn slot(self) -> usize {
        self.slot
    }
}

/// What an upgrade answer turns the connection into.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Upgrade {
    /// A chat session, to be attached once the 101 is out.
    Chat(ChatTarget),
    /// The raw echo endpoint.
    Echo,
}

/// What an open WebSocket carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The chat session it was attached to.
    Chat(SessionRef),
    /// The raw echo endpoint.
    Echo,
}

/// Where a connection is in its life, for the loop's dispatch and for logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Reading the HTTP request head.
    Handshake,
    /// Writing an HTTP answer.
    Respond,
    /// Answered and refused: reading what the client still sends until it closes.
    Linger,
    /// An HTTP API call waits for its answer (a turn).
    Await,
    /// An open WebSocket.
    Open,
    /// In the close handshake.
    Closing,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Handshake => "handshake",
            Stage::Respond => "respond",
            Stage::Linger => "linger",
            Stage::Await => "await",
            Stage::Open => "open",
            Stage::Closing => "closing",
        })
    }
}

/// The phases, each with what it needs.
enum Phase {
    Handshake {
        stream: Stream,
        /// Bytes read so far (at most `MAX_HEAD_BYTES`).
        buf: Vec<u8>,
    },
    Respond {
        stream: Stream,
        /// The answer, and how much of it is written. The served page is static and not
        /// copied per request.
        out: Cow<'static, [u8]>,
        pos: usize,
        /// After the answer: the WebSocket and the bytes the client sent past the head,
        /// or `None` to close.
        upgrade: Option<(Upgrade, Vec<u8>)>,
    },
    /// Answer written and write side shut: reading what the client still sends until it
    /// closes, so that unread data does not turn our close into a reset that destroys the
    /// answer in flight.
    Linger {
        stream: Stream,
        discarded: usize,
    },
    /// A request read, its answer not ready yet (a turn of `POST /message` runs).
    Await {
        stream: Stream,
        discarded: usize,
    },
    Open {
        ws: Box<Ws<Stream>>,
        kind: Kind,
        heartbeat: Heartbeat,
    },
    Closing {
        ws: Box<Ws<Stream>>,
        kind: Kind,
    },
    /// Only while one phase is moved into the next, inside `Conn`'s methods.
    Gone,
}

/// A connection in the server's slab.
pub struct Conn {
    id: ConnId,
    /// The client's address, for logs.
    peer: SocketAddr,
    phase: Phase,
    /// End of the current handshake, answer, linger or close phase.
    deadline: Instant,
    /// Written since the last flush.
    dirty: bool,
    /// Accepted over the connection cap only to be told 503.
    refusing: bool,
    /// A hang-up or error event was seen, in any phase: handed to the WebSocket at the
    /// upgrade, because the one edge-triggered event for it may have come before.
    hung_up: bool,
}

impl Conn {
    /// A connection that has just been accepted; it has until `deadline` to send its
    /// request head.
    pub fn new(id: ConnId, peer: SocketAddr, stream: Stream, deadline: Instant) -> Conn {
        Conn {
            id,
            peer,
            phase: Phase::Handshake {
                stream,
                buf: Vec::new(),
            },
            deadline,
            dirty: false,
            refusing: false,
            hung_up: false,
        }
    }

    /// A connection refused before it was read: it only gets `answer`.
    pub fn refused(
        id: ConnId,
        peer: SocketAddr,
        stream: Stream,
        deadline: Instant,
        answer: Vec<u8>,
    ) -> Conn {
        Conn {
            phase: Phase::Respond {
                stream,
                out: Cow::Owned(answer),
                pos: 0,
                upgrade: None,
            },
            refusing: true,
            ..Conn::new_gone(id, peer, deadline)
        }
    }

    fn new_gone(id: ConnId, peer: SocketAddr, deadline: Instant) -> Conn {
        Conn {
            id,
            peer,
            phase: Phase::Gone,
            deadline,
            dirty: false,
            refusing: false,
            hung_up: false,
        }
    }

    /// Its id (slot and generation).
    pub fn id(&self) -> ConnId {
        self.id
    }

    /// The client's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Where it is in its life (`None` only inside a transition, never seen outside).
    pub fn stage(&self) -> Option<Stage> {
        Some(match self.phase {
            Phase::Handshake { .. } => Stage::Handshake,
            Phase::Respond { .. } => Stage::Respond,
            Phase::Linger { .. } => Stage::Linger,
            Phase::Await { .. } => Stage::Await,
            Phase::Open { .. } => Stage::Open,
            Phase::Closing { .. } => Stage::Closing,
            Phase::Gone => return None,
        })
    }

    /// Whether it was accepted over the connection cap only to be told 503.
    pub fn is_refusing(&self) -> bool {
        self.refusing
    }

    /// Whether the WebSocket is open for messages.
    pub fn is_open(&self) -> bool {
        matches!(self.phase, Phase::Open { .. })
    }

    /// Bytes an open WebSocket holds that the kernel has not taken (0 in other phases).
    pub fn unsent(&self) -> u64 {
        match &self.phase {
            Phase::Open { ws, .. } => ws.unsent(),
            _ => 0,
        }
    }

    /// A closing WebSocket that read all it may: not to be read again.
    pub fn is_deaf(&self) -> bool {
        match &self.phase {
            Phase::Closing { ws, .. } => ws.is_deaf(),
            _ => false,
        }
    }

    /// Whether a hang-up or error event was seen.
    pub fn hung_up(&self) -> bool {
        self.hung_up
    }

    /// Whether something was written since the last flush.
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// What the WebSocket carries, once upgraded.
    pub fn kind(&self) -> Option<&Kind> {
        match &self.phase {
            Phase::Open { kind, .. } | Phase::Closing { kind, .. } => Some(kind),
            _ => None,
        }
    }

    /// The session this socket was attached to, if it is a chat socket.
    pub fn session(&self) -> Option<&SessionRef> {
        match self.kind() {
            Some(Kind::Chat(at)) => Some(at),
            _ => None,
        }
    }

    /// The user this connection serves, for logs (`-` before the upgrade).
    pub fn user(&self) -> &str {
        match self.kind() {
            Some(Kind::Chat(at)) => at.user.as_str(),
            Some(Kind::Echo) => "(echo)",
            None => "-",
        }
    }

    /// When the connection next needs the loop: its phase's deadline, or, open, its
    /// heartbeat's next step.
    pub fn poll_at(&self) -> Instant {
        match &self.phase {
            Phase::Open { heartbeat, .. } => heartbeat.poll_at(),
            _ => self.deadline,
        }
    }

    /// The heartbeat of an open WebSocket.
    pub fn heartbeat_mut(&mut self) -> Option<&mut Heartbeat> {
        match &mut self.phase {
            Phase::Open { heartbeat, .. } => Some(heartbeat),
            _ => None,
        }
    }

    /// The socket, for (de)registration.
    pub fn stream_mut(&mut self) -> Option<&mut TcpStream> {
        self.any_stream_mut().map(Stream::tcp_mut)
    }

    /// The stream (plain or TLS), in whichever phase.
    fn any_stream_mut(&mut self) -> Option<&mut Stream> {
        match &mut self.phase {
            Phase::Handshake { stream, .. }
            | Phase::Respond { stream, .. }
            | Phase::Linger { stream, .. }
            | Phase::Await { stream, .. } => Some(stream),
            Phase::Open { ws, .. } | Phase::Closing { ws, .. } => Some(ws.stream_mut()),
            Phase::Gone => None,
        }
    }

    /// The TLS error that failed this connection, if one did (for the log line of its end).
    pub fn tls_error(&mut self) -> Option<String> {
        self.any_stream_mut()?.tls_error().map(str::to_string)
    }

    /// A writable event in a phase with nothing of its own to write (reading the head,
    /// lingering, awaiting an answer): what TLS still has to send (its handshake, session
    /// tickets, `close_notify`) goes out. `Err` when the socket failed.
    pub fn flush_tls(&mut self) -> Result<(), String> {
        match self.any_stream_mut() {
            Some(stream) => stream.flush_tls(),
            None => Ok(()),
        }
    }

    fn ws_mut(&mut self) -> Option<&mut Ws<Stream>> {
        match &mut self.phase {
            Phase::Open { ws, .. } | Phase::Closing { ws, .. } => Some(ws),
            _ => None,
        }
    }

    /// A readable event arrived (`hung_up`: with the peer's hang-up or an error): the socket
    /// must be read again.
    pub fn readable_again(&mut self, hung_up: bool) {
        self.hung_up |= hung_up;
        let hung_up = self.hung_up;
        if let Some(ws) = self.ws_mut() {
            ws.readable_again(hung_up);
        } else if let Some(stream) = self.any_stream_mut() {
            stream.readable_again(hung_up);
        }
    }

    /// Reads the request head until it is complete, invalid or the socket would block.
    pub fn read_head(&mut self, max_body: usize) -> HeadRead {
        match &mut self.phase {
            Phase::Handshake { stream, buf } => handshake::read_head(stream, buf, max_body),
            _ => HeadRead::Partial,
        }
    }

    /// Switches from reading the head to writing `answer`, within `deadline`.
    pub fn respond(
        &mut self,
        answer: Cow<'static, [u8]>,
        upgrade: Option<(Upgrade, Vec<u8>)>,
        deadline: Instant,
    ) {
        let phase = std::mem::replace(&mut self.phase, Phase::Gone);
        self.phase = match phase {
            Phase::Handshake { stream, .. } | Phase::Await { stream, .. } => Phase::Respond {
                stream,
                out: answer,
                pos: 0,
                upgrade,
            },
            other => other,
        };
        self.deadline = deadline;
    }

    /// The request is read; its answer comes later (a turn), at the latest by `deadline`.
    pub fn await_answer(&mut self, deadline: Instant) {
        let phase = std::mem::replace(&mut self.phase, Phase::Gone);
        self.phase = match phase {
            Phase::Handshake { stream, .. } => Phase::Await {
                stream,
                discarded: 0,
            },
            other => other,
        };
        self.deadline = deadline;
    }

    /// While awaiting: reads and drops what the client sends; `true` once it closed (or
    /// sent more than a request's worth), and the wait is over.
    pub fn drain_await(&mut self) -> bool {
        match &mut self.phase {
            Phase::Await { stream, discarded } => {
                handshake::drain(stream, discarded, LINGER_DISCARD_BYTES)
            }
            _ => false,
        }
    }

    /// Writes the HTTP answer. `Ok(Some(..))` once an upgrade answer is out (call
    /// [`Conn::upgrade`] next); `Ok(None)` while more is to be written or the connection
    /// now lingers until `linger_deadline`; `Err` when it is finished.
    pub fn write_answer(
        &mut self,
        linger_deadline: Instant,
    ) -> Result<Option<(Upgrade, Vec<u8>)>, String> {
        let Phase::Respond {
            stream, out, pos, ..
        } = &mut self.phase
        else {
            return Ok(None);
        };
        if !handshake::write_out(stream, out, pos)? {
            return Ok(None);
        }
        let phase = std::mem::replace(&mut self.phase, Phase::Gone);
        match phase {
            Phase::Respond {
                stream,
                upgrade: Some(up),
                ..
            } => {
                // Held in the handshake phase until `upgrade` gives it its session.
                self.phase = Phase::Handshake {
                    stream,
                    buf: Vec::new(),
                };
                Ok(Some(up))
            }
            Phase::Respond {
                mut stream,
                upgrade: None,
                ..
            } => {
                stream.shutdown_write();
                self.phase = Phase::Linger {
                    stream,
                    discarded: 0,
                };
                self.deadline = linger_deadline;
                Ok(None)
            }
            other => {
                self.phase = other;
                Ok(None)
            }
        }
    }

    /// Drains a lingering socket; `true` once it is finished with.
    pub fn drain_linger(&mut self) -> bool {
        match &mut self.phase {
            Phase::Linger { stream, discarded } => {
                handshake::drain(stream, discarded, LINGER_DISCARD_BYTES)
            }
            _ => false,
        }
    }

    /// Turns the connection into a WebSocket carrying `kind` after the 101 answer went out;
    /// `rest` is what the client sent behind its request head.
    pub fn upgrade(
        &mut self,
        kind: Kind,
        rest: Vec<u8>,
        config: WebSocketConfig,
        max_unsent: usize,
        heartbeat: Heartbeat,
        totals: &UnsentTotals,
    ) {
        let phase = std::mem::replace(&mut self.phase, Phase::Gone);
        self.phase = match phase {
            Phase::Handshake { stream, .. } | Phase::Respond { stream, .. } => Phase::Open {
                ws: Box::new(Ws::new(
                    stream,
                    rest,
                    config,
                    max_unsent,
                    self.hung_up,
                    totals,
                )),
                kind,
                heartbeat,
            },
            other => other,
        };
    }

    /// Reads one message; anything that arrives counts for the heartbeat.
    pub fn read_message(&mut self, now: Instant) -> WsRead {
        let result = match self.ws_mut() {
            Some(ws) => ws.read(),
            None => return WsRead::Idle,
        };
        if let (WsRead::Message(_), Some(hb)) = (&result, self.heartbeat_mut()) {
            hb.on_rx(now);
        }
        result
    }

    /// Queues a message on an open WebSocket; it goes out at the next flush.
    pub fn write(&mut self, msg: Message) -> WsWrite {
        let Phase::Open { ws, .. } = &mut self.phase else {
            return WsWrite::Lost("not open".into());
        };
        self.dirty = true;
        ws.write(msg)
    }

    /// Queues a text frame; one with a `seq` is tracked until the kernel has taken it.
    pub fn write_text(&mut self, text: Utf8Bytes, seq: Option<u64>) -> WsWrite {
        let Phase::Open { ws, .. } = &mut self.phase else {
            return WsWrite::Lost("not open".into());
        };
        self.dirty = true;
        ws.write_text(text, seq)
    }

    /// Sends a heartbeat ping.
    pub fn ping(&mut self) -> WsWrite {
        self.write(Message::Ping(tungstenite::Bytes::new()))
    }

    /// The highest seq whose frame the kernel has now taken, if any became so since the
    /// last call.
    pub fn take_handed(&mut self) -> Option<u64> {
        self.ws_mut()?.take_handed()
    }

    /// Writes out everything queued.
    pub fn flush(&mut self) -> WsWrite {
        self.dirty = false;
        match &mut self.phase {
            Phase::Open { ws, .. } => ws.flush(false),
            Phase::Closing { ws, .. } => ws.flush(true),
            _ => WsWrite::Ok,
        }
    }

    /// Starts the close handshake with `code` (RFC 6455 §7.1.2); the connection is then
    /// kept only until the client answers or `deadline`. A socket already closing keeps its
    /// first deadline: nothing the peer does moves it.
    pub fn close(&mut self, code: CloseCode, reason: &str, deadline: Instant) -> WsWrite {
        let phase = std::mem::replace(&mut self.phase, Phase::Gone);
        let (mut ws, kind) = match phase {
            Phase::Open { ws, kind, .. } => (ws, kind),
            closing @ Phase::Closing { .. } => {
                self.phase = closing;
                return WsWrite::Ok;
            }
            other => {
                self.phase = other;
                return WsWrite::Closed;
            }
        };
        let result = ws.close(code, reason);
        self.phase = Phase::Closing { ws, kind };
        self.deadline = deadline;
        self.dirty = true;
        result
    }

    /// The client started the close handshake and tungstenite queued our reply: the socket
    /// is kept until that is flushed or `deadline`. `false` if it was not open.
    pub fn begin_closing(&mut self, deadline: Instant) -> bool {
        let phase = std::mem::replace(&mut self.phase, Phase::Gone);
        match phase {
            Phase::Open { mut ws, kind, .. } => {
                ws.begin_closing();
                self.phase = Phase::Closing { ws, kind };
                self.deadline = deadline;
                self.dirty = true;
                true
            }
            other => {
                self.phase = other;
                false
            }
        }
    }
}
