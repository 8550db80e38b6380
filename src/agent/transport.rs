//! A client connection to an upstream on the event loop: a non-blocking TCP socket, plain
//! or through rustls (sans-IO TLS, which fits mio: we move the bytes, it does the rest).

use mio::net::TcpStream;
#[cfg(feature = "tls")]
pub use rustls::ClientConfig;
#[cfg(feature = "tls")]
use rustls::ClientConnection;
#[cfg(feature = "tls")]
use rustls::pki_types::ServerName;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;

/// Bytes read from the socket per `read` call.
const READ_CHUNK: usize = 16 * 1024;

thread_local! {
    /// The loop thread's read buffer, shared by every upstream connection: zeroed once, not
    /// per read, and no memory per connection.
    static SCRATCH: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0u8; READ_CHUNK].into_boxed_slice());
}

/// Without the `tls` feature there is no TLS to configure.
#[cfg(not(feature = "tls"))]
pub struct ClientConfig;

/// Without the `tls` feature, an `https://` upstream is refused at start-up.
#[cfg(not(feature = "tls"))]
pub fn tls_config() -> Result<Arc<ClientConfig>, String> {
    Err("this straycat was built without TLS (the tls cargo feature): use http://".into())
}

/// Without TLS no connection is ever TLS: the type has no value.
#[cfg(not(feature = "tls"))]
enum ClientConnection {}

/// The TLS settings of every upstream connection: the system's CA roots (or the bundle
/// `SSL_CERT_FILE` names), read once at start-up.
#[cfg(feature = "tls")]
pub fn tls_config() -> Result<Arc<ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map(|e| e.to_string())
            .unwrap_or_else(|| "none found".into());
        return Err(format!("no CA certificates for https:// upstreams: {why}"));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// One connection, plain or TLS.
pub struct Transport {
    sock: TcpStream,
    tls: Option<Box<ClientConnection>>,
    /// The TCP connect finished (a writable event with no error).
    connected: bool,
    /// A plain read returned less than asked: the kernel's queue is empty, and with
    /// edge-triggered readiness new bytes raise a new event. Until then a read would only
    /// say `WouldBlock`, so it is not made (one syscall per token saved).
    drained: bool,
    /// A hang-up was seen: the end of the stream may sit behind the bytes of a short read
    /// and raise no event of its own, so every read goes to the kernel.
    hung_up: bool,
}

/// What a read gave.
pub struct Got {
    /// Bytes of the response appended to the caller's buffer.
    pub bytes: usize,
    /// The peer closed (the TCP end, with or without a TLS close_notify before it).
    pub eof: bool,
}

impl Transport {
    /// Starts connecting to `addr` without waiting; with `tls`, checks the certificate
    /// against `host`.
    pub fn connect(
        addr: SocketAddr,
        tls: Option<(&Arc<ClientConfig>, &str)>,
    ) -> Result<Transport, String> {
        let sock =
            TcpStream::connect(addr).map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        let _ = sock.set_nodelay(true);
        #[cfg(not(feature = "tls"))]
        let tls: Option<Box<ClientConnection>> = match tls {
            Some(_) => return Err("built without TLS".into()),
            None => None,
        };
        #[cfg(feature = "tls")]
        let tls = match tls {
            Some((config, host)) => {
                let name = ServerName::try_from(host.to_string())
                    .map_err(|_| format!("{host} is not a name TLS can check"))?;
                let conn = ClientConnection::new(Arc::clone(config), name)
                    .map_err(|e| format!("TLS set-up: {e}"))?;
                Some(Box::new(conn))
            }
            None => None,
        };
        Ok(Transport {
            sock,
            tls,
            connected: false,
            drained: false,
            hung_up: false,
        })
    }

    /// A readable event came (`hung_up`: with the peer's hang-up or an error).
    pub fn readable_again(&mut self, hung_up: bool) {
        self.drained = false;
        self.hung_up |= hung_up;
    }

    /// The socket, to register with the loop.
    pub fn socket(&mut self) -> &mut TcpStream {
        &mut self.sock
    }

    /// Whether the TCP connect is done; on a writable event, finds out (mio: check
    /// `take_error`, then `peer_addr`).
    pub fn check_connected(&mut self) -> Result<bool, String> {
        if self.connected {
            return Ok(true);
        }
        if let Ok(Some(e)) | Err(e) = self.sock.take_error() {
            return Err(format!("cannot connect: {e}"));
        }
        match self.sock.peer_addr() {
            Ok(_) => {
                self.connected = true;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
            Err(e) => Err(format!("cannot connect: {e}")),
        }
    }

    /// Writes `out[*pos..]` (the request), and whatever TLS has to send; `Ok(true)` once all
    /// of it is with the kernel.
    pub fn write(&mut self, out: &[u8], pos: &mut usize) -> Result<bool, String> {
        match &mut self.tls {
            None => {
                while *pos < out.len() {
                    match self.sock.write(&out[*pos..]) {
                        Ok(0) => return Err("it closed while we wrote".into()),
                        Ok(n) => *pos += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(format!("writing: {e}")),
                    }
                }
                Ok(true)
            }
            #[cfg(not(feature = "tls"))]
            Some(never) => match **never {},
            #[cfg(feature = "tls")]
            Some(tls) => {
                if *pos < out.len() {
                    // rustls keeps it until the handshake is done (its buffer limit is far
                    // above a request's size).
                    tls.writer()
                        .write_all(&out[*pos..])
                        .map_err(|e| format!("TLS: {e}"))?;
                    *pos = out.len();
                }
                flush_tls(tls, &mut self.sock)
            }
        }
    }

    /// Reads what is there now into `buf`, at most `limit` bytes more than it holds.
    pub fn read(&mut self, buf: &mut Vec<u8>, limit: usize) -> Result<Got, String> {
        SCRATCH.with(|scratch| self.read_with(&mut scratch.borrow_mut(), buf, limit))
    }

    fn read_with(
        &mut self,
        chunk: &mut [u8],
        buf: &mut Vec<u8>,
        limit: usize,
    ) -> Result<Got, String> {
        let start = buf.len();
        let got = |buf: &Vec<u8>, eof| {
            Ok(Got {
                bytes: buf.len() - start,
                eof,
            })
        };
        match &mut self.tls {
            None => loop {
                if buf.len() - start >= limit || (self.drained && !self.hung_up) {
                    return got(buf, false);
                }
                match self.sock.read(chunk) {
                    Ok(0) => return got(buf, true),
                    Ok(n) => {
                        buf.extend_from_slice(&chunk[..n]);
                        self.drained = n < chunk.len();
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return got(buf, false),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(format!("reading: {e}")),
                }
            },
            #[cfg(not(feature = "tls"))]
            Some(never) => match **never {},
            #[cfg(feature = "tls")]
            Some(tls) => {
                let mut tcp_eof = false;
                loop {
                    // Plaintext first: what rustls already decrypted.
                    match tls.reader().read(chunk) {
                        Ok(0) => {
                            return got(buf, true);
                        }
                        Ok(n) => {
                            buf.extend_from_slice(&chunk[..n]);
                            if buf.len() - start >= limit {
                                return got(buf, false);
                            }
                            continue;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        // The peer closed without a close_notify, as many HTTPS servers do
                        // after a `Connection: close` response. An end like a plain TCP
                        // one, with the bytes read before it: the caller's framing (the
                        // chunked end, the Content-Length, the stream's finish_reason)
                        // tells a whole answer from a truncated one.
                        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                            return got(buf, true);
                        }
                        Err(e) => return Err(format!("TLS: {e}")),
                    }
                    if tcp_eof {
                        return got(buf, true);
                    }
                    match tls.read_tls(&mut self.sock) {
                        Ok(0) => tcp_eof = true,
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            // Handshake replies, key updates.
                            flush_tls(tls, &mut self.sock)?;
                            return got(buf, false);
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(format!("reading: {e}")),
                    }
                    tls.process_new_packets().map_err(|e| format!("TLS: {e}"))?;
                }
            }
        }
    }
}

/// Writes what rustls has to send; `Ok(true)` when nothing is left.
#[cfg(feature = "tls")]
fn flush_tls(tls: &mut ClientConnection, sock: &mut TcpStream) -> Result<bool, String> {
    while tls.wants_write() {
        match tls.write_tls(sock) {
            Ok(0) => return Err("it closed while we wrote".into()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("writing: {e}")),
        }
    }
    Ok(true)
}
