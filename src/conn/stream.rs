//! A client's byte stream: plain TCP, or TLS through our own small adapter over
//! `rustls::ServerConnection` and the non-blocking, edge-triggered socket.
//!
//! Why not `rustls::StreamOwned`: its `write` answers `Ok(0)` when rustls' buffers are full
//! and hides the socket's `WouldBlock` behind them, which tungstenite reads as a closed
//! connection, and it keeps no account of what the kernel really took. Here:
//! - read: plaintext rustls already decrypted first; else `read_tls` + `process_new_packets`;
//!   `WouldBlock` only when neither rustls nor the kernel has anything;
//! - write: plaintext is taken only while rustls' outgoing TLS is all with the kernel, at
//!   most one record (16 KiB) at a time, and counts as unsent until its record is out
//!   ([`Socket::unsent_accepted`]), so the unsent-bytes bound and the seqs handed stay exact;
//! - flush: TLS records to the kernel until `WouldBlock`;
//! - shutdown: `close_notify`, then the TCP write side once everything before it is out.

#[cfg(feature = "tls")]
use super::ws::is_interrupted;
use super::ws::is_would_block;
use mio::net::TcpStream;
use std::io::{self, Read, Write};
use std::net::Shutdown;

/// What a WebSocket (and the HTTP phase) runs over: a non-blocking byte stream that can be
/// half-closed. The defaults are those of a plain socket, where the kernel holds every
/// byte not yet read or sent.
pub trait Socket: Read + Write {
    /// Shuts the write side: the peer sees the end of the stream.
    fn shutdown_write(&mut self);

    /// A readable event arrived (`hung_up`: with the peer's hang-up or an error).
    fn readable_again(&mut self, _hung_up: bool) {}

    /// Whether a read that returned less than asked emptied everything below it, so that
    /// only a new readable event can bring more. True for a socket; not for TLS, where
    /// records already pulled from the kernel wait in user space and raise no event.
    fn short_read_drains(&self) -> bool {
        true
    }

    /// Bytes `write` accepted that are not with the kernel yet (TLS: the plaintext of the
    /// record still in rustls' outgoing buffer).
    fn unsent_accepted(&self) -> u64 {
        0
    }
}

impl Socket for TcpStream {
    fn shutdown_write(&mut self) {
        let _ = self.shutdown(Shutdown::Write);
    }
}

/// A client connection's stream, plain or TLS.
pub enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS (`--tls-cert`).
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    Tls(Box<TlsStream>),
}

impl Stream {
    /// The socket, for (de)registration with the poll.
    pub fn tcp_mut(&mut self) -> &mut TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(t) => t.tcp_mut(),
        }
    }

    /// Sends what TLS still has to send (handshake messages, session tickets, the record
    /// of the last write, `close_notify`); a plain socket has nothing of its own. `Err` only
    /// when the socket failed (not for `WouldBlock`: the next writable event goes on).
    pub fn flush_tls(&mut self) -> Result<(), String> {
        match self {
            Stream::Plain(_) => Ok(()),
            Stream::Tls(t) => match t.send_tls() {
                Ok(()) => Ok(()),
                Err(e) if is_would_block(&e) => Ok(()),
                Err(e) => Err(e.to_string()),
            },
        }
    }

    /// The TLS error that ended the connection, if one did.
    pub fn tls_error(&self) -> Option<&str> {
        match self {
            Stream::Plain(_) => None,
            Stream::Tls(t) => t.error(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(t) => t.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(t) => t.flush(),
        }
    }
}

impl Socket for Stream {
    fn shutdown_write(&mut self) {
        match self {
            Stream::Plain(s) => s.shutdown_write(),
            Stream::Tls(t) => t.shutdown_write(),
        }
    }

    fn readable_again(&mut self, hung_up: bool) {
        if let Stream::Tls(t) = self {
            t.readable_again(hung_up);
        }
    }

    fn short_read_drains(&self) -> bool {
        matches!(self, Stream::Plain(_))
    }

    fn unsent_accepted(&self) -> u64 {
        match self {
            Stream::Plain(_) => 0,
            Stream::Tls(t) => t.unsent_accepted(),
        }
    }
}

#[cfg(feature = "tls")]
pub use with_tls::TlsStream;

/// Without the `tls` feature no stream is ever TLS: the type has no value.
#[cfg(not(feature = "tls"))]
pub enum TlsStream {}

#[cfg(not(feature = "tls"))]
impl TlsStream {
    fn tcp_mut(&mut self) -> &mut TcpStream {
        match *self {}
    }
    fn send_tls(&mut self) -> io::Result<()> {
        match *self {}
    }
    fn error(&self) -> Option<&str> {
        match *self {}
    }
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        match *self {}
    }
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        match *self {}
    }
    fn flush(&mut self) -> io::Result<()> {
        match *self {}
    }
    fn shutdown_write(&mut self) {
        match *self {}
    }
    fn readable_again(&mut self, _: bool) {
        match *self {}
    }
    fn unsent_accepted(&self) -> u64 {
        match *self {}
    }
}

#[cfg(feature = "tls")]
mod with_tls {
    use super::{Socket, is_interrupted, is_would_block};
    use mio::net::TcpStream;
    use rustls::ServerConnection;
    use std::io::{self, Read, Write};

    /// Plaintext taken per `write`: one TLS record's worth (RFC 8446 §5.1: 2^14 bytes).
    /// This is the slack: at most this much plaintext (plus the record's overhead) sits in
    /// rustls beyond what the kernel took, and it counts as unsent until its record is out.
    const RECORD_PLAINTEXT: usize = 16 * 1024;

    /// A TLS connection over a non-blocking socket (`S`: a mock in the tests).
    pub struct TlsStream<S: Socket = TcpStream> {
        tcp: S,
        tls: ServerConnection,
        /// The last kernel read returned less than asked, or `WouldBlock`, and no readable
        /// event came since: a read would only say `WouldBlock` again (the saving `Counted`
        /// makes for a plain socket, which cannot see into rustls' buffers).
        kernel_drained: bool,
        /// A hang-up or error event was seen: the end of the stream may sit behind the last
        /// bytes read, so reads always go to the kernel.
        hung_up: bool,
        /// Plaintext accepted by `write` whose records are not all with the kernel yet.
        pending_plain: u64,
        /// `shutdown_write` was asked for: the TCP write side goes once all is sent.
        shut_wanted: bool,
        /// The TCP write side is shut.
        shut_done: bool,
        /// The TLS error that failed the connection (its alert sent if the kernel took it).
        error: Option<String>,
    }

    /// The socket under `read_tls`, noting whether the kernel's queue was emptied.
    struct Kernel<'a, S> {
        tcp: &'a mut S,
        short: bool,
    }

    impl<S: Read> Read for Kernel<'_, S> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.tcp.read(buf)?;
            self.short = n > 0 && n < buf.len();
            Ok(n)
        }
    }

    impl<S: Socket> TlsStream<S> {
        /// The server side of a TLS connection that has just been accepted.
        pub fn new(tcp: S, tls: ServerConnection) -> TlsStream<S> {
            TlsStream {
                tcp,
                tls,
                kernel_drained: false,
                hung_up: false,
                pending_plain: 0,
                shut_wanted: false,
                shut_done: false,
                error: None,
            }
        }

        /// The socket.
        pub fn tcp_mut(&mut self) -> &mut S {
            &mut self.tcp
        }

        /// The TLS error that failed the connection, if any.
        pub fn error(&self) -> Option<&str> {
            self.error.as_deref()
        }

        /// See [`Socket::readable_again`].
        pub fn readable_again(&mut self, hung_up: bool) {
            self.kernel_drained = false;
            self.hung_up |= hung_up;
        }

        /// See [`Socket::unsent_accepted`].
        pub fn unsent_accepted(&self) -> u64 {
            self.pending_plain
        }

        /// Writes TLS records to the kernel until none is left (`Ok`) or it takes no more
        /// (`WouldBlock`); then, if asked for, shuts the TCP write side.
        pub fn send_tls(&mut self) -> io::Result<()> {
            while self.tls.wants_write() {
                match self.tls.write_tls(&mut self.tcp) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(_) => {}
                    Err(e) if is_interrupted(&e) => {}
                    Err(e) => return Err(e),
                }
            }
            // Plaintext written during the handshake waits in rustls until it is done.
            if !self.tls.is_handshaking() {
                self.pending_plain = 0;
                if self.shut_wanted && !self.shut_done {
                    self.shut_done = true;
                    self.tcp.shutdown_write();
                }
            }
            Ok(())
        }

        /// The TLS connection failed: a record of why, and the alert out if the kernel
        /// takes it now (the socket is dropped next, so there is no later chance).
        fn fail(&mut self, e: rustls::Error) -> io::Error {
            let err = io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}"));
            let plain = matches!(
                e,
                rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType)
            ) && self.tls.is_handshaking();
            let hint = if plain {
                " (not TLS: a plain http:// or ws:// client?)"
            } else {
                ""
            };
            self.error = Some(format!("{e}{hint}"));
            let _ = self.send_tls();
            err
        }

        /// Queues `close_notify` and shuts the TCP write side once everything before it is
        /// out (now, or on a later writable event).
        pub fn shutdown_write(&mut self) {
            if !self.shut_wanted {
                self.shut_wanted = true;
                self.tls.send_close_notify();
            }
            let _ = self.send_tls();
        }
    }

    impl<S: Socket> Read for TlsStream<S> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if buf.is_empty() {
                return Ok(0);
            }
            if self.error.is_some() {
                return Err(io::ErrorKind::InvalidData.into());
            }
            loop {
                match self.tls.reader().read(buf) {
                    // 0: the peer's close_notify, the end of the stream.
                    Ok(n) => return Ok(n),
                    Err(e) if is_would_block(&e) => {}
                    // The TCP end without a close_notify: an end like a plain socket's.
                    // WebSocket and HTTP frame their own messages, so a cut shows there.
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                    Err(e) => return Err(e),
                }
                if self.kernel_drained && !self.hung_up {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                let mut kernel = Kernel {
                    tcp: &mut self.tcp,
                    short: false,
                };
                match self.tls.read_tls(&mut kernel) {
                    // The TCP end: rustls notes it, and its reader says so above.
                    Ok(0) => {}
                    Ok(_) => self.kernel_drained = kernel.short,
                    Err(e) if is_would_block(&e) => {
                        self.kernel_drained = true;
                        return Err(e);
                    }
                    Err(e) if is_interrupted(&e) => continue,
                    Err(e) => return Err(e),
                }
                if let Err(e) = self.tls.process_new_packets() {
                    return Err(self.fail(e));
                }
                // Handshake messages, session tickets, alerts: out now if the kernel takes
                // them; the rest goes on the next writable event.
                match self.send_tls() {
                    Ok(()) => {}
                    Err(e) if is_would_block(&e) => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }

    impl<S: Socket> Write for TlsStream<S> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if buf.is_empty() {
                return Ok(0);
            }
            if self.error.is_some() {
                return Err(io::ErrorKind::InvalidData.into());
            }
            // Backpressure: nothing new while the last record is not all with the kernel.
            self.send_tls()?;
            let take = buf.len().min(RECORD_PLAINTEXT);
            let n = self.tls.writer().write(&buf[..take])?;
            if n == 0 {
                // Only during a handshake, past rustls' 64 KiB of buffered plaintext.
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.pending_plain += n as u64;
            // Taken either way: a full kernel is the next call's `WouldBlock`, a failed
            // socket its error.
            let _ = self.send_tls();
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            self.send_tls()?;
            if self.pending_plain > 0 {
                // Accepted during the handshake: not out until it is done.
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(())
        }
    }

    impl<S: Socket> Drop for TlsStream<S> {
        fn drop(&mut self) {
            // Dropped without a shutdown (a close handshake that finished, a deadline): a
            // courtesy close_notify if the kernel takes it now; nothing waits for it.
            if !self.shut_wanted && self.error.is_none() && !self.tls.is_handshaking() {
                self.tls.send_close_notify();
                let _ = self.tls.write_tls(&mut self.tcp);
            }
        }
    }
}
