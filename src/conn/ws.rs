//! An open WebSocket over a non-blocking socket: tungstenite for the framing, plus what it
//! does not track for us: how much the client has left unread, and which frames (by seq)
//! the kernel has taken; its unsent bytes counted in the server's totals; a closing
//! socket read no more than a bounded amount.

use super::counted::Counted;
use super::stream::Socket;
use crate::tally::Tally;
use std::collections::VecDeque;
use std::io::{self, Read};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tungstenite::{Message, Utf8Bytes, WebSocket};

/// Bytes a closing socket still reads once our close frame is queued or the peer's came:
/// enough for the peer's close reply behind a few messages in flight. Past it the socket is
/// not read again (a peer that keeps sending costs no CPU) and waits for its deadline.
pub const CLOSING_READ_BYTES: u64 = 64 * 1024;

/// The server-wide unsent bytes, kept up to date by every socket as its backlog changes.
#[derive(Clone, Debug, Default)]
pub struct UnsentTotals {
    /// Of open sockets: what `--max-buffered-bytes-total` bounds.
    open: Arc<AtomicUsize>,
    /// Of closing sockets, not counted against the budget: they take no more frames, are
    /// gone by their close deadline, and closing open sockets would not free them sooner.
    closing: Arc<AtomicUsize>,
}

impl UnsentTotals {
    /// Unsent bytes of open sockets.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Unsent bytes of closing sockets.
    pub fn closing(&self) -> usize {
        self.closing.load(Ordering::Relaxed)
    }
}

/// What reading the WebSocket gave.
#[derive(Debug)]
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
#[derive(Debug)]
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

/// A WebSocket and its unsent-bytes accounting.
pub struct Ws<S> {
    ws: WebSocket<Counted<S>>,
    /// The peer broke the protocol: we only send our close frame and drain what arrives.
    failed: bool,
    /// Our write side is shut (after a failure): once only, because each shutdown is a new
    /// readiness event, and the flush it wakes would shut again (a busy loop until the
    /// close deadline, found by the abuse soak).
    write_shut: bool,
    /// Bytes of WebSocket frames handed to tungstenite (resynchronised with what the
    /// kernel took at every complete flush).
    queued: u64,
    /// `--max-buffered-bytes`: unsent bytes past which the client is a slow consumer.
    max_unsent: u64,
    /// Frames with a seq written to tungstenite, with the byte offset (on the `queued`
    /// scale) at which each ends: once the kernel has taken that many bytes, it is handed.
    in_flight: VecDeque<(u64, u64)>,
    /// Our close frame is queued or the peer's came: reads are limited, the backlog counts
    /// as closing.
    closing: bool,
    /// `unsent()` as last counted in the server's totals (open, then closing).
    tally: Tally,
    /// Where `tally` moves once closing.
    closing_total: Arc<AtomicUsize>,
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

pub(super) fn is_would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

pub(super) fn is_interrupted(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::Interrupted
}

impl<S: Socket> Ws<S> {
    /// The server side of a WebSocket whose upgrade answer went out; `rest` is what the
    /// client sent behind its request head, `hung_up` whether a hang-up was already seen.
    pub fn new(
        stream: S,
        rest: Vec<u8>,
        config: WebSocketConfig,
        max_unsent: usize,
        hung_up: bool,
        totals: &UnsentTotals,
    ) -> Ws<S> {
        Ws {
            ws: WebSocket::from_partially_read(
                Counted::new(stream, hung_up),
                rest,
                Role::Server,
                Some(config),
            ),
            failed: false,
            write_shut: false,
            queued: 0,
            max_unsent: max_unsent as u64,
            in_flight: VecDeque::new(),
            closing: false,
            tally: Tally::new(Arc::clone(&totals.open)),
            closing_total: Arc::clone(&totals.closing),
        }
    }

    /// Counts the backlog as it is now in the server's totals. Every method that may
    /// change `unsent()` ends here (and dropping the socket takes its count out), so the
    /// totals need no scan of the connections.
    fn report(&mut self) {
        self.tally
            .set(usize::try_from(self.unsent()).unwrap_or(usize::MAX));
    }

    /// From now on the socket is closing: its backlog counts as closing, and it reads at
    /// most [`CLOSING_READ_BYTES`] more.
    fn enter_closing(&mut self) {
        if !self.closing {
            self.closing = true;
            self.tally.count_in(Arc::clone(&self.closing_total));
            self.ws.get_mut().limit_reads(CLOSING_READ_BYTES);
        }
    }

    /// The peer started the close handshake (tungstenite queued our reply).
    pub fn begin_closing(&mut self) {
        self.enter_closing();
    }

    /// A closing socket that read all it may: it is not to be read again.
    pub fn is_deaf(&self) -> bool {
        self.closing && self.ws.get_ref().reads_exhausted()
    }

    /// The socket, for (de)registration.
    pub fn stream_mut(&mut self) -> &mut S {
        self.ws.get_mut().inner_mut()
    }

    /// A readable event arrived: the socket must be read again.
    pub fn readable_again(&mut self, hung_up: bool) {
        self.ws.get_mut().readable_again(hung_up);
    }

    /// Reads one message.
    pub fn read(&mut self) -> WsRead {
        let result = self.read_unreported();
        // Tungstenite may have flushed (a pong, a close reply) while reading.
        self.report();
        result
    }

    fn read_unreported(&mut self) -> WsRead {
        if self.failed {
            // RFC 6455 §7.1.7: after failing the connection, nothing more is processed;
            // tungstenite's reader is mid-frame and must not be used again. Read through
            // `Counted`, so that the closing socket's read limit holds here too.
            return drain_raw(self.ws.get_mut());
        }
        let result = self.ws.read();
        if let Err(WsError::Capacity(_) | WsError::Utf8(_) | WsError::Protocol(_)) = &result {
            self.failed = true;
        }
        match result {
            Ok(Message::Ping(payload)) => {
                // Tungstenite queues the pong itself; count it so the offsets of our own
                // frames behind it stay conservative (a later pong may replace an unsent
                // one, which only makes us count a frame as handed later, never earlier).
                // Once closing, it answers no pings.
                if !self.closing {
                    self.queued += frame_bytes(payload.len());
                }
                WsRead::Message(Message::Ping(payload))
            }
            Ok(msg) => WsRead::Message(msg),
            Err(WsError::Io(e)) if is_would_block(&e) || is_interrupted(&e) => WsRead::Idle,
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
        let result = self.write_unreported(msg);
        self.report();
        result
    }

    fn write_unreported(&mut self, msg: Message) -> WsWrite {
        if self.unsent() > self.max_unsent {
            // Only what the kernel refuses counts against the client: try it first.
            match self.flush(false) {
                WsWrite::Ok | WsWrite::Pending => {}
                other => return other,
            }
            if self.unsent() > self.max_unsent {
                return WsWrite::Full;
            }
        }
        self.queued += frame_bytes(msg.len());
        ws_result(self.ws.write(msg))
    }

    /// Queues a text frame; one with a `seq` is tracked until the kernel has taken it.
    pub fn write_text(&mut self, text: Utf8Bytes, seq: Option<u64>) -> WsWrite {
        let result = self.write(Message::Text(text));
        if let (Some(seq), WsWrite::Ok | WsWrite::Pending) = (seq, &result) {
            self.in_flight.push_back((self.queued, seq));
        }
        result
    }

    /// Bytes written to tungstenite that the kernel has not taken yet.
    pub fn unsent(&self) -> u64 {
        self.queued.saturating_sub(self.ws.get_ref().written())
    }

    /// The highest seq whose frame the kernel has now taken, if any became so since the
    /// last call.
    pub fn take_handed(&mut self) -> Option<u64> {
        let written = self.ws.get_ref().written();
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

    /// Writes out everything queued. `closing`: our close frame is (or will be) queued, so
    /// a backlog is no longer a reason to close.
    pub fn flush(&mut self, closing: bool) -> WsWrite {
        let result = self.flush_unreported(closing);
        self.report();
        result
    }

    fn flush_unreported(&mut self, closing: bool) -> WsWrite {
        let result = ws_result(self.ws.flush());
        let written = self.ws.get_ref().written();
        match result {
            // Everything went, pongs and close frames tungstenite added included.
            WsWrite::Ok => {
                if self.failed && closing && !self.write_shut {
                    // Our close frame is out and we will not parse the peer's reply:
                    // closing our side lets the peer see the end and close too.
                    self.write_shut = true;
                    self.stream_mut().shutdown_write();
                }
                if let Some(&(_, seq)) = self.in_flight.back() {
                    self.in_flight.clear();
                    self.in_flight.push_back((written, seq));
                }
                self.queued = written;
            }
            WsWrite::Pending if !closing && self.unsent() > self.max_unsent => {
                return WsWrite::Full;
            }
            _ => {}
        }
        result
    }

    /// Starts the close handshake with `code` (RFC 6455 §7.1.2).
    pub fn close(&mut self, code: CloseCode, reason: &str) -> WsWrite {
        if !self.closing {
            // The close frame is part of the backlog until the kernel takes it.
            self.queued += frame_bytes(2 + reason.len());
        }
        self.enter_closing();
        let frame = CloseFrame {
            code,
            reason: Utf8Bytes::from(reason.to_string()),
        };
        let result = ws_result(self.ws.close(Some(frame)));
        self.report();
        result
    }
}

/// Reads and drops whatever the peer still sends, until it closes, the kernel has nothing
/// more, or the closing socket's read limit is reached (`stream` then says `WouldBlock`).
fn drain_raw(stream: &mut impl Read) -> WsRead {
    let mut scratch = [0u8; 1024];
    loop {
        match stream.read(&mut scratch) {
            Ok(0) => return WsRead::Closed,
            Ok(_) => {}
            Err(e) if is_would_block(&e) => return WsRead::Idle,
            Err(e) if is_interrupted(&e) => {}
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

#[cfg(test)]
mod tests {
    use super::super::counted::MockStream;
    use super::*;

    fn ws(room: usize, max_unsent: usize) -> Ws<MockStream> {
        ws_in(&UnsentTotals::default(), room, max_unsent)
    }

    fn ws_in(totals: &UnsentTotals, room: usize, max_unsent: usize) -> Ws<MockStream> {
        let config = WebSocketConfig::default()
            .write_buffer_size(usize::MAX - 1)
            .max_write_buffer_size(usize::MAX);
        let stream = MockStream {
            room,
            ..Default::default()
        };
        Ws::new(stream, Vec::new(), config, max_unsent, false, totals)
    }

    /// A masked binary client frame (mask 0: the payload goes as is) of `n` bytes; `first`
    /// is its first byte (0x82: final binary; 0xc2 sets a reserved bit, a protocol error).
    fn client_frame(first: u8, n: usize) -> Vec<u8> {
        let mut f = vec![first, 0x80 | 126];
        f.extend_from_slice(&u16::try_from(n).unwrap().to_be_bytes());
        f.extend_from_slice(&[0; 4]);
        f.extend(std::iter::repeat_n(b'x', n));
        f
    }

    #[test]
    fn the_backlog_is_counted_in_the_totals_and_moves_to_closing() {
        let totals = UnsentTotals::default();
        let mut w = ws_in(&totals, 150, 1 << 20);
        assert!(matches!(w.write_text(text(100), Some(1)), WsWrite::Ok));
        assert!(matches!(w.write_text(text(100), Some(2)), WsWrite::Ok));
        assert_eq!(totals.open(), 204);
        assert!(matches!(w.flush(false), WsWrite::Pending));
        assert_eq!(totals.open(), 54);
        let mut other = ws_in(&totals, 0, 1 << 20);
        assert!(matches!(other.write_text(text(10), None), WsWrite::Ok));
        assert_eq!(totals.open(), 66);
        drop(other);
        assert_eq!(totals.open(), 54, "a dropped socket takes its count out");
        // Closing moves the backlog, and the close frame (2 + 2 + 3 bytes) behind it, out
        // of the budget's total.
        assert!(matches!(
            w.close(CloseCode::Normal, "bye"),
            WsWrite::Pending
        ));
        assert_eq!((totals.open(), totals.closing()), (0, 54 + 7));
        w.stream_mut().room = 1000;
        assert!(matches!(w.flush(true), WsWrite::Ok));
        assert_eq!(totals.closing(), 0);
        drop(w);
        assert_eq!((totals.open(), totals.closing()), (0, 0));
    }

    #[test]
    fn a_closing_socket_reads_a_bounded_amount_then_is_deaf() {
        for first in [0x82, 0xc2] {
            let mut w = ws(1 << 20, 1 << 20);
            let flood: Vec<u8> = (0..400).flat_map(|_| client_frame(first, 1000)).collect();
            w.stream_mut().input.extend(&flood);
            assert!(matches!(w.close(CloseCode::Policy, "slow"), WsWrite::Ok));
            assert!(!w.is_deaf());
            let mut messages = 0;
            loop {
                match w.read() {
                    WsRead::Message(_) => messages += 1,
                    WsRead::Idle => break,
                    WsRead::Fail(..) => assert_eq!(first, 0xc2, "only the bad frames fail"),
                    other => panic!("{other:?}"),
                }
            }
            let taken = flood.len() - w.stream_mut().input.len();
            assert_eq!(taken as u64, CLOSING_READ_BYTES, "first byte {first:#x}");
            assert!(w.is_deaf());
            if first == 0x82 {
                assert_eq!(
                    messages,
                    65536 / 1008,
                    "the whole frames among the bytes read"
                );
            }
        }
    }

    fn text(n: usize) -> Utf8Bytes {
        Utf8Bytes::from("x".repeat(n))
    }

    #[test]
    fn a_frame_is_handed_once_the_kernel_took_all_of_it() {
        // Each 100-byte text frame is 102 bytes on the wire.
        let mut w = ws(150, 1 << 20);
        assert!(matches!(w.write_text(text(100), Some(1)), WsWrite::Ok));
        assert!(matches!(w.write_text(text(100), Some(2)), WsWrite::Ok));
        assert!(matches!(w.write_text(text(100), None), WsWrite::Ok));
        assert_eq!(w.unsent(), 306);
        assert!(matches!(w.flush(false), WsWrite::Pending));
        assert_eq!(w.unsent(), 156);
        assert_eq!(w.take_handed(), Some(1), "frame 2 is only half out");
        assert_eq!(w.take_handed(), None);
        w.stream_mut().room = 1000;
        assert!(matches!(w.flush(false), WsWrite::Ok));
        assert_eq!(w.unsent(), 0);
        assert_eq!(w.take_handed(), Some(2));
    }

    #[test]
    fn a_backlog_past_the_bound_is_full_but_one_large_frame_is_not() {
        let mut w = ws(0, 1000);
        // One frame larger than the bound is accepted: the client may well read it.
        assert!(matches!(w.write_text(text(3000), Some(1)), WsWrite::Ok));
        assert!(matches!(w.flush(false), WsWrite::Full));
        assert!(matches!(w.write_text(text(10), Some(2)), WsWrite::Full));
        // Once the client reads, the same write goes through.
        w.stream_mut().room = 2500;
        assert!(matches!(w.write_text(text(10), Some(2)), WsWrite::Ok));
        assert_eq!(w.unsent(), 3004 - 2500 + 12);
        assert_eq!(w.take_handed(), None);
        // A closing socket's backlog is no reason to close it again.
        w.stream_mut().room = 0;
        assert!(matches!(
            w.close(CloseCode::Normal, "bye"),
            WsWrite::Pending
        ));
        assert!(matches!(w.flush(true), WsWrite::Pending));
    }

    #[test]
    fn a_ping_from_the_client_is_answered_and_counted() {
        let mut w = ws(1000, 1 << 20);
        // A masked ping with an empty payload, as a client sends it.
        w.stream_mut().input.extend([0x89, 0x80, 1, 2, 3, 4]);
        assert!(matches!(w.read(), WsRead::Message(Message::Ping(_))));
        assert!(matches!(w.read(), WsRead::Idle));
        assert!(matches!(w.write_text(text(1), Some(5)), WsWrite::Ok));
        assert!(matches!(w.flush(false), WsWrite::Ok));
        assert_eq!(
            w.stream_mut().output[..2],
            [0x8a, 0x00],
            "the pong went first"
        );
        assert_eq!(w.take_handed(), Some(5));
    }
}
