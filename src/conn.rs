//! One TCP connection through its life: reading the HTTP request head, writing the HTTP
//! answer, speaking WebSocket through tungstenite, and closing. Only byte moving lives here;
//! what a message means is the server's business.

use crate::http::{self, Head, MAX_HEAD_BYTES};
use crate::protocol::UserId;
use crate::session::ConnId;
use mio::net::TcpStream;
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::Instant;
use tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tungstenite::{Message, Utf8Bytes, WebSocket};

/// Bytes tungstenite reads per `read` call and keeps allocated per connection. Small,
/// because an idle kiosk connection must cost a few KiB; a larger message grows the buffer
/// only while it is being read.
pub const READ_BUFFER_BYTES: usize = 2 * 1024;

/// Bytes a refused client may still send after its answer before the socket is dropped.
const LINGER_DISCARD_BYTES: usize = 64 * 1024;

/// What the WebSocket carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A chat session.
    Chat {
        /// Whose.
        user: UserId,
        /// The client's resume point.
        since: Option<u64>,
    },
    /// The raw echo endpoint.
    Echo,
}

/// Where a connection is in its life.
pub enum Phase {
    /// Reading the HTTP request head.
    Handshake {
        /// The socket.
        stream: TcpStream,
        /// Bytes read so far (at most `MAX_HEAD_BYTES`).
        buf: Vec<u8>,
    },
    /// Writing an HTTP answer.
    Respond {
        /// The socket.
        stream: TcpStream,
        /// The answer.
        out: Vec<u8>,
        /// How much of it is written.
        pos: usize,
        /// After the answer: the WebSocket and the bytes the client sent past the head,
        /// or `None` to close.
        upgrade: Option<(Kind, Vec<u8>)>,
    },
    /// Answer written and write side shut: reading what the client still sends until it
    /// closes, so that unread data does not turn our close into a reset that destroys the
    /// answer in flight.
    Linger {
        /// The socket.
        stream: TcpStream,
        /// Bytes discarded so far.
        discarded: usize,
    },
    /// An open WebSocket.
    Open(Box<WebSocket<Counted>>),
    /// We or the client started the close handshake.
    Closing(Box<WebSocket<Counted>>),
    /// Only while one phase is moved into the next; never seen outside `Conn`'s methods.
    Gone,
}

/// A connection in the server's slab.
pub struct Conn {
    /// Its id (slot and generation).
    pub id: ConnId,
    /// The client's address, for logs.
    pub peer: SocketAddr,
    /// Where it is in its life.
    pub phase: Phase,
    /// What the WebSocket carries, once upgraded.
    pub kind: Option<Kind>,
    /// End of the current handshake, answer or close phase.
    pub deadline: Instant,
    /// The instant this connection is scheduled in the timer heap for.
    pub timer_at: Option<Instant>,
    /// Last time anything arrived from the client (heartbeat).
    pub last_rx: Instant,
    /// The first unanswered ping, if one is outstanding.
    pub ping_sent: Option<Instant>,
    /// When the next ping is due.
    pub next_ping: Instant,
    /// Written since the last flush.
    pub dirty: bool,
    /// In the loop's queue of connections that may have unread data.
    pub queued_read: bool,
    /// Accepted over the connection cap only to be told 503.
    pub refusing: bool,
    /// The epoch of the session this socket was attached to.
    pub session_epoch: u64,
    /// The peer broke the protocol: we only send our close frame and drain what arrives.
    failed: bool,
    /// A hang-up or error event was seen, in any phase: handed to [`Counted`] at the
    /// upgrade, because the one edge-triggered event for it may have come before.
    hung_up: bool,
    /// Bytes of WebSocket frames handed to tungstenite (resynchronised with what the
    /// kernel took at every complete flush).
    queued: u64,
    /// `--max-buffered-bytes`: unsent bytes past which the client is a slow consumer.
    max_unsent: u64,
    /// Frames with a seq written to tungstenite, with the byte offset (on the `queued`
    /// scale) at which each ends: once the kernel has taken that many bytes, it is handed.
    in_flight: VecDeque<(u64, u64)>,
}

/// The socket under tungstenite, counting the bytes the kernel accepted, so the server
/// knows how much the client has left unread without reaching into tungstenite's buffer.
///
/// Reads take up to [`SCRATCH_BYTES`] from the kernel at once into a buffer the loop
/// thread shares between all connections, although tungstenite asks for at most
/// [`READ_BUFFER_BYTES`]: a client with eight 1 KiB messages in flight costs one `read`
/// rather than five. What tungstenite did not take yet waits in a per-connection stash,
/// which is freed once emptied, so an idle connection still holds no more than before.
///
/// It also saves the `read` that would only say `WouldBlock`: a read that returns less than
/// was asked for emptied the kernel's receive queue, and with edge-triggered readiness any
/// byte that arrives after it raises a new readable event (which calls
/// [`Conn::readable_again`]). Until then a read answers `WouldBlock` without a system call:
/// one syscall fewer per message for a client that sends one message at a time. Not once
/// the peer has hung up: its end of stream (or error) may sit behind the bytes of a short
/// read and raises no new event, so from then on every read goes to the kernel.
pub struct Counted {
    inner: TcpStream,
    written: u64,
    /// The last read emptied the receive queue and no readable event came since.
    drained: bool,
    /// A hang-up or error event was seen: reads always go to the kernel.
    hung_up: bool,
    /// Bytes read from the kernel that tungstenite has not taken yet (from `stash_at`).
    stash: Vec<u8>,
    /// How much of `stash` tungstenite has taken.
    stash_at: usize,
}

/// Bytes read from the kernel per `read` call: a few messages' worth. Also the most a
/// connection keeps in its stash between two loop iterations (a flooding client whose read
/// budget ran out), the same order as tungstenite's own buffer for one large message.
pub const SCRATCH_BYTES: usize = 16 * 1024;

thread_local! {
    /// The loop thread's read buffer, shared by every connection.
    static SCRATCH: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0u8; SCRATCH_BYTES].into_boxed_slice());
}

impl Counted {
    fn new(inner: TcpStream, hung_up: bool) -> Counted {
        Counted {
            inner,
            written: 0,
            drained: false,
            hung_up,
            stash: Vec::new(),
            stash_at: 0,
        }
    }

    /// Reads from the kernel through the scratch buffer.
    fn read_kernel(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let n = self.inner.read(&mut scratch[..])?;
            self.drained = n > 0 && n < scratch.len();
            let give = n.min(buf.len());
            buf[..give].copy_from_slice(&scratch[..give]);
            if n > give {
                self.stash.clear();
                self.stash.extend_from_slice(&scratch[give..n]);
                self.stash_at = 0;
            }
            Ok(give)
        })
    }
}

impl Read for Counted {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.stash_at < self.stash.len() {
            let rest = &self.stash[self.stash_at..];
            let give = rest.len().min(buf.len());
            buf[..give].copy_from_slice(&rest[..give]);
            self.stash_at += give;
            if self.stash_at == self.stash.len() {
                // Emptied: give the memory back, an idle connection keeps none.
                self.stash = Vec::new();
                self.stash_at = 0;
            }
            return Ok(give);
        }
        if self.drained && !self.hung_up {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        // n == 0 is the end of the stream, which every later read must see too.
        self.read_kernel(buf)
    }
}

impl Write for Counted {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Bytes a server frame with this payload takes on the wire (RFC 6455 §5.2: server frames
/// are unmasked; the length takes 0, 2 or 8 extra bytes).
fn frame_bytes(payload: usize) -> u64 {
    let header = match payload {
        0..=125 => 2,
        126..=65535 => 4,
        _ => 10,
    };
    (header + payload) as u64
}

/// What reading the request head gave.
pub enum HeadRead {
    /// More is needed.
    Partial,
    /// A full head, and whatever followed it.
    Complete(http::Request, Vec<u8>),
    /// Not a request we can read.
    Invalid(&'static str),
    /// The client went away.
    Gone,
}

/// What reading the WebSocket gave.
pub enum WsRead {
    /// A message (control messages included; tungstenite queues pongs and close replies).
    Message(Message),
    /// Nothing more to read now.
    Idle,
    /// The close handshake finished, or the peer went away after one.
    Closed,
    /// The peer broke the protocol: close with this code.
    Fail(CloseCode, &'static str),
    /// The socket failed or the peer vanished without a close frame.
    Lost(String),
}

/// What a write or flush gave.
pub enum WsWrite {
    /// Done (or queued in tungstenite, to go at the next flush).
    Ok,
    /// The kernel takes no more now; wait for writable.
    Pending,
    /// The client keeps too much unread: close with 1008.
    Full,
    /// The close handshake finished.
    Closed,
    /// The socket failed.
    Lost(String),
}

fn is_would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

impl Conn {
    /// A connection that has just been accepted.
    pub fn new(
        id: ConnId,
        peer: SocketAddr,
        stream: TcpStream,
        now: Instant,
        deadline: Instant,
    ) -> Conn {
        Conn {
            id,
            peer,
            phase: Phase::Handshake {
                stream,
                buf: Vec::new(),
            },
            kind: None,
            deadline,
            timer_at: None,
            last_rx: now,
            ping_sent: None,
            next_ping: now,
            dirty: false,
            queued_read: false,
            refusing: false,
            session_epoch: 0,
            failed: false,
            hung_up: false,
            queued: 0,
            max_unsent: u64::MAX,
            in_flight: VecDeque::new(),
        }
    }

    /// A connection refused before it was read: it only gets `answer`.
    pub fn refused(
        id: ConnId,
        peer: SocketAddr,
        stream: TcpStream,
        now: Instant,
        deadline: Instant,
        answer: Vec<u8>,
    ) -> Conn {
        let mut conn = Conn::new(id, peer, stream, now, deadline);
        conn.refusing = true;
        conn.phase = match conn.phase {
            Phase::Handshake { stream, .. } => Phase::Respond {
                stream,
                out: answer,
                pos: 0,
                upgrade: None,
            },
            other => other,
        };
        conn
    }

    /// The user this connection serves, for logs (`-` before the upgrade).
    pub fn user(&self) -> &str {
        match &self.kind {
            Some(Kind::Chat { user, .. }) => user.as_str(),
            Some(Kind::Echo) => "(echo)",
            None => "-",
        }
    }

    /// The chat user, if this is a chat connection.
    pub fn chat_user(&self) -> Option<&UserId> {
        match &self.kind {
            Some(Kind::Chat { user, .. }) => Some(user),
            _ => None,
        }
    }

    /// The socket, for (de)registration.
    pub fn stream_mut(&mut self) -> Option<&mut TcpStream> {
        match &mut self.phase {
            Phase::Handshake { stream, .. }
            | Phase::Respond { stream, .. }
            | Phase::Linger { stream, .. } => Some(stream),
            Phase::Open(ws) | Phase::Closing(ws) => Some(&mut ws.get_mut().inner),
            Phase::Gone => None,
        }
    }

    /// A readable event arrived (`hung_up`: with the peer's hang-up or an error): the socket
    /// must be read again.
    pub fn readable_again(&mut self, hung_up: bool) {
        self.hung_up |= hung_up;
        if let Phase::Open(ws) | Phase::Closing(ws) = &mut self.phase {
            let counted = ws.get_mut();
            counted.drained = false;
            counted.hung_up = self.hung_up;
        }
    }

    /// Whether the WebSocket is open for messages.
    pub fn is_open(&self) -> bool {
        matches!(self.phase, Phase::Open(_))
    }

    /// Reads the request head until it is complete, invalid or the socket would block.
    pub fn read_head(&mut self) -> HeadRead {
        let Phase::Handshake { stream, buf } = &mut self.phase else {
            return HeadRead::Partial;
        };
        loop {
            let start = buf.len();
            let room = (MAX_HEAD_BYTES + 1).saturating_sub(start).min(1024);
            if room == 0 {
                return HeadRead::Invalid("request head too large");
            }
            buf.resize(start + room, 0);
            let got = stream.read(&mut buf[start..]);
            buf.truncate(start + *got.as_ref().unwrap_or(&0));
            match got {
                Ok(0) => return HeadRead::Gone,
                Ok(_) => match http::parse_head(buf) {
                    Head::Partial => continue,
                    Head::Invalid(why) => return HeadRead::Invalid(why),
                    Head::Complete(req, len) => return HeadRead::Complete(req, buf.split_off(len)),
                },
                Err(e) if is_would_block(&e) => return HeadRead::Partial,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return HeadRead::Gone,
            }
        }
    }

    /// Switches from reading the head to writing `answer`.
    pub fn respond(
        &mut self,
        answer: Vec<u8>,
        upgrade: Option<(Kind, Vec<u8>)>,
        deadline: Instant,
    ) {
        let phase = std::mem::replace(&mut self.phase, Phase::Gone);
        self.phase = match phase {
            Phase::Handshake { stream, .. } => Phase::Respond {
                stream,
                out: answer,
                pos: 0,
                upgrade,
            },
            other => other,
        };
        self.deadline = deadline;
    }

    /// Writes the HTTP answer. `Ok(Some(..))` once an upgrade answer is out; `Ok(None)` while
    /// more is to be written or the connection now lingers; `Err` when it is finished.
    pub fn write_answer(
        &mut self,
        linger_deadline: Instant,
    ) -> Result<Option<(Kind, Vec<u8>)>, String> {
        let Phase::Respond {
            stream, out, pos, ..
        } = &mut self.phase
        else {
            return Ok(None);
        };
        while *pos < out.len() {
            match stream.write(&out[*pos..]) {
                Ok(0) => return Err("connection closed while answering".into()),
                Ok(n) => *pos += n,
                Err(e) if is_would_block(&e) => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        let phase = std::mem::replace(&mut self.phase, Phase::Gone);
        match phase {
            Phase::Respond {
                stream,
                upgrade: Some(up),
                ..
            } => {
                self.phase = Phase::Handshake {
                    stream,
                    buf: Vec::new(),
                };
                Ok(Some(up))
            }
            Phase::Respond {
                stream,
                upgrade: None,
                ..
            } => {
                let _ = stream.shutdown(Shutdown::Write);
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
        let Phase::Linger { stream, discarded } = &mut self.phase else {
            return false;
        };
        let mut scratch = [0u8; 1024];
        loop {
            match stream.read(&mut scratch) {
                Ok(0) => return true,
                Ok(n) => {
                    *discarded += n;
                    if *discarded > LINGER_DISCARD_BYTES {
                        return true;
                    }
                }
                Err(e) if is_would_block(&e) => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return true,
            }
        }
    }

    /// Turns the connection into a WebSocket after the 101 answer went out.
    pub fn upgrade(
        &mut self,
        kind: Kind,
        rest: Vec<u8>,
        config: WebSocketConfig,
        max_unsent: usize,
    ) {
        self.max_unsent = max_unsent as u64;
        let phase = std::mem::replace(&mut self.phase, Phase::Gone);
        self.phase = match phase {
            Phase::Handshake { stream, .. } | Phase::Respond { stream, .. } => {
                Phase::Open(Box::new(WebSocket::from_partially_read(
                    Counted::new(stream, self.hung_up),
                    rest,
                    Role::Server,
                    Some(config),
                )))
            }
            other => other,
        };
        self.kind = Some(kind);
    }

    /// Reads one message.
    pub fn read_message(&mut self) -> WsRead {
        let ws = match &mut self.phase {
            Phase::Open(ws) | Phase::Closing(ws) => ws,
            _ => return WsRead::Idle,
        };
        if self.failed {
            // RFC 6455 §7.1.7: after failing the connection, nothing more is processed;
            // tungstenite's reader is mid-frame and must not be used again.
            return drain_raw(&mut ws.get_mut().inner);
        }
        let result = ws.read();
        if let Err(WsError::Capacity(_) | WsError::Utf8(_) | WsError::Protocol(_)) = &result {
            self.failed = true;
        }
        match result {
            Ok(Message::Ping(payload)) => {
                // Tungstenite queues the pong itself; count it so the offsets of our own
                // frames behind it stay conservative (a later pong may replace an unsent
                // one, which only makes us count a frame as handed later, never earlier).
                self.queued += frame_bytes(payload.len());
                WsRead::Message(Message::Ping(payload))
            }
            Ok(msg) => WsRead::Message(msg),
            Err(WsError::Io(e)) if is_would_block(&e) => WsRead::Idle,
            Err(WsError::Io(e)) if e.kind() == io::ErrorKind::Interrupted => WsRead::Idle,
            Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => WsRead::Closed,
            Err(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)) => {
                WsRead::Lost("closed without a close frame".into())
            }
            Err(WsError::Io(e)) => WsRead::Lost(e.to_string()),
            Err(WsError::Capacity(CapacityError::MessageTooLong { .. })) => {
                WsRead::Fail(CloseCode::Size, "message too big")
            }
            Err(WsError::Capacity(_)) => WsRead::Fail(CloseCode::Size, "frame too big"),
            Err(WsError::Utf8(_)) => {
                WsRead::Fail(CloseCode::Invalid, "invalid UTF-8 in a text message")
            }
            Err(WsError::Protocol(_)) => WsRead::Fail(CloseCode::Protocol, "protocol error"),
            Err(e) => WsRead::Lost(e.to_string()),
        }
    }

    /// Queues a message; it goes out at the next flush. `Full` when the client already
    /// left more than `--max-buffered-bytes` unread: one large frame to a reading client
    /// is fine, a backlog is not.
    pub fn write(&mut self, msg: Message) -> WsWrite {
        let Phase::Open(ws) = &mut self.phase else {
            return WsWrite::Lost("not open".into());
        };
        if self.queued.saturating_sub(ws.get_ref().written) > self.max_unsent {
            // Only what the kernel refuses counts against the client: try it first.
            match self.flush() {
                WsWrite::Ok | WsWrite::Pending => {}
                other => return other,
            }
            if self.unsent() > self.max_unsent {
                return WsWrite::Full;
            }
        }
        let Phase::Open(ws) = &mut self.phase else {
            return WsWrite::Lost("not open".into());
        };
        self.queued += frame_bytes(msg.len());
        self.dirty = true;
        ws_result(ws.write(msg))
    }

    /// Bytes written to tungstenite that the kernel has not taken yet.
    pub fn unsent(&self) -> u64 {
        match &self.phase {
            Phase::Open(ws) | Phase::Closing(ws) => {
                self.queued.saturating_sub(ws.get_ref().written)
            }
            _ => 0,
        }
    }

    /// Queues a text frame; one with a `seq` is tracked until the kernel has taken it.
    pub fn write_text(&mut self, text: Utf8Bytes, seq: Option<u64>) -> WsWrite {
        let result = self.write(Message::Text(text));
        if let (Some(seq), WsWrite::Ok | WsWrite::Pending) = (seq, &result) {
            self.in_flight.push_back((self.queued, seq));
        }
        result
    }

    /// The highest seq whose frame the kernel has now taken, if any became so since the
    /// last call.
    pub fn take_handed(&mut self) -> Option<u64> {
        let written = match &self.phase {
            Phase::Open(ws) | Phase::Closing(ws) => ws.get_ref().written,
            _ => return None,
        };
        let mut handed = None;
        while let Some(&(end, seq)) = self.in_flight.front() {
            if end > written {
                break;
            }
            handed = Some(seq);
            self.in_flight.pop_front();
        }
        handed
    }

    /// Writes out everything queued.
    pub fn flush(&mut self) -> WsWrite {
        self.dirty = false;
        let (result, written) = match &mut self.phase {
            Phase::Open(ws) | Phase::Closing(ws) => (ws_result(ws.flush()), ws.get_ref().written),
            _ => return WsWrite::Ok,
        };
        match result {
            // Everything went, pongs and close frames tungstenite added included.
            WsWrite::Ok => {
                if self.failed
                    && let Phase::Closing(ws) = &mut self.phase
                {
                    // Our close frame is out and we will not parse the peer's reply:
                    // closing our side lets the peer see the end and close too.
                    let _ = ws.get_mut().inner.shutdown(Shutdown::Write);
                }
                if let Some(&(_, seq)) = self.in_flight.back() {
                    self.in_flight.clear();
                    self.in_flight.push_back((written, seq));
                }
                self.queued = written;
            }
            WsWrite::Pending if self.is_open() && self.unsent() > self.max_unsent => {
                return WsWrite::Full;
            }
            _ => {}
        }
        result
    }

    /// Starts the close handshake with `code` (RFC 6455 §7.1.2); the connection is then
    /// kept only until the client answers or `deadline`.
    pub fn close(&mut self, code: CloseCode, reason: &str, deadline: Instant) -> WsWrite {
        let phase = std::mem::replace(&mut self.phase, Phase::Gone);
        let mut ws = match phase {
            Phase::Open(ws) | Phase::Closing(ws) => ws,
            other => {
                self.phase = other;
                return WsWrite::Closed;
            }
        };
        let frame = CloseFrame {
            code,
            reason: Utf8Bytes::from(reason.to_string()),
        };
        let result = ws_result(ws.close(Some(frame)));
        self.phase = Phase::Closing(ws);
        self.deadline = deadline;
        result
    }

    /// Sends a heartbeat ping.
    pub fn ping(&mut self) -> WsWrite {
        self.write(Message::Ping(tungstenite::Bytes::new()))
    }
}

/// Reads and drops whatever the peer still sends, until it closes.
fn drain_raw(stream: &mut TcpStream) -> WsRead {
    let mut scratch = [0u8; 1024];
    loop {
        match stream.read(&mut scratch) {
            Ok(0) => return WsRead::Closed,
            Ok(_) => {}
            Err(e) if is_would_block(&e) => return WsRead::Idle,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return WsRead::Lost(e.to_string()),
        }
    }
}

fn ws_result(r: tungstenite::Result<()>) -> WsWrite {
    match r {
        Ok(()) => WsWrite::Ok,
        Err(WsError::Io(e)) if is_would_block(&e) => WsWrite::Pending,
        Err(WsError::WriteBufferFull(_)) => WsWrite::Full,
        Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => WsWrite::Closed,
        Err(e) => WsWrite::Lost(e.to_string()),
    }
}
