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

        /// Whether the TLS handshake is still going on.
        #[cfg(test)]
        pub fn is_handshaking(&self) -> bool {
            self.tls.is_handshaking()
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
                    // rustls refusing the bytes (a handshake message over its 64 KiB): a
                    // TLS failure like any other, for the log.
                    Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                        self.error = Some(e.to_string());
                        return Err(e);
                    }
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

#[cfg(all(test, feature = "tls"))]
mod tests {
    use super::super::counted::MockStream;
    use super::TlsStream;
    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
    use std::io::{self, Read, Write};
    use std::sync::Arc;

    /// A server `TlsStream` over a mock socket and a rustls client, handshake done.
    fn pair() -> (TlsStream<MockStream>, ClientConnection) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut s = TlsStream::new(
            MockStream {
                room: usize::MAX,
                ..Default::default()
            },
            ServerConnection::new(Arc::new(server)).unwrap(),
        );
        let name = ServerName::try_from("localhost").unwrap();
        let mut c = ClientConnection::new(Arc::new(client), name).unwrap();
        for _ in 0..10 {
            to_server(&mut c, &mut s);
            let _ = s.read(&mut [0u8; 64]);
            to_client(&mut s, &mut c);
            if !c.is_handshaking() && !s.is_handshaking() {
                return (s, c);
            }
        }
        panic!("no handshake");
    }

    fn to_server(c: &mut ClientConnection, s: &mut TlsStream<MockStream>) {
        let mut wire = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut wire).unwrap();
        }
        s.tcp_mut().input.extend(wire);
        s.readable_again(false);
    }

    fn to_client(s: &mut TlsStream<MockStream>, c: &mut ClientConnection) {
        let out = std::mem::take(&mut s.tcp_mut().output);
        let mut rd = &out[..];
        while !rd.is_empty() {
            c.read_tls(&mut rd).unwrap();
            c.process_new_packets().unwrap();
        }
    }

    fn would_block<T>(r: io::Result<T>) -> bool {
        matches!(r, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    #[test]
    fn plaintext_counts_as_unsent_until_its_record_is_with_the_kernel() {
        let (mut s, mut c) = pair();
        s.tcp_mut().room = 100;
        let data = vec![7u8; 40_000];
        assert_eq!(s.write(&data).unwrap(), 16 * 1024, "one record at a time");
        assert_eq!(s.unsent_accepted(), 16 * 1024, "its record is not out");
        assert!(
            would_block(s.write(&data[16 * 1024..])),
            "nothing more meanwhile"
        );
        assert!(would_block(s.flush()));
        s.tcp_mut().room = usize::MAX;
        s.flush().unwrap();
        assert_eq!(s.unsent_accepted(), 0, "all of it with the kernel");
        to_client(&mut s, &mut c);
        let mut got = vec![0u8; 20_000];
        assert_eq!(c.reader().read(&mut got).unwrap(), 16 * 1024);
    }

    #[test]
    fn records_already_read_are_served_without_a_new_event() {
        let (mut s, mut c) = pair();
        for i in 0..20u8 {
            c.writer().write_all(&[i; 300]).unwrap();
        }
        to_server(&mut c, &mut s);
        let mut all = Vec::new();
        let mut buf = [0u8; 1000];
        // Small reads, as tungstenite's: each one short of the 6,000 bytes in flight.
        loop {
            match s.read(&mut buf) {
                Ok(n) => all.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(
            all.len(),
            6000,
            "every record, with no readable event between"
        );
        let reads = s.tcp_mut().reads;
        assert!(would_block(s.read(&mut buf)));
        assert_eq!(s.tcp_mut().reads, reads, "the kernel was empty: no syscall");
    }

    #[test]
    fn a_tls_failure_is_recorded_and_sticks() {
        let (mut s, _) = pair();
        s.tcp_mut()
            .input
            .extend([0x17, 0x03, 0x03, 0x00, 0x05, 1, 2, 3, 4, 5]);
        s.readable_again(false);
        assert!(s.read(&mut [0u8; 64]).is_err());
        assert!(s.error().is_some());
        assert!(s.read(&mut [0u8; 64]).is_err());
        assert!(s.write(b"x").is_err());
    }
}
