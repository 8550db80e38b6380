//! TLS towards clients (`--tls-cert`, `--tls-key`): the certificate chain and key read from
//! PEM files into a rustls `ServerConfig`, and their reload on SIGHUP. A reload reads the
//! files on the signal thread, never the loop's, builds the new config there and hands it
//! to the loop through a slot and the loop's waker; connections made before keep theirs.

use crate::agent::pool::Notifier;
use crate::config::Config;
use crate::conn::Stream;
use mio::net::TcpStream;

/// Largest PEM file read. A chain of a few certificates is a few KiB; the bound is what a
/// wrong path (a log, a device) may cost.
#[cfg_attr(not(feature = "tls"), allow(dead_code))]
const MAX_PEM_BYTES: u64 = 1024 * 1024;

#[cfg(feature = "tls")]
pub(crate) use with_tls::{Reload, ServerTls};

/// Without the `tls` feature there is no TLS: the types have no value.
#[cfg(not(feature = "tls"))]
pub(crate) enum ServerTls {}

/// Without the `tls` feature there is nothing to reload.
#[cfg(not(feature = "tls"))]
pub(crate) enum Reload {}

#[cfg(not(feature = "tls"))]
impl ServerTls {
    /// Refuses a configured certificate: this build cannot serve it.
    pub(crate) fn from_config(
        config: &Config,
        _notifier: &Notifier,
    ) -> Result<Option<ServerTls>, String> {
        match config.tls_cert.is_some() || config.tls_key.is_some() {
            true => Err(crate::config::NO_TLS.to_string()),
            false => Ok(None),
        }
    }

    pub(crate) fn accept(&self, _tcp: TcpStream) -> Result<Stream, String> {
        match *self {}
    }

    pub(crate) fn take_reloaded(&mut self) {
        match *self {}
    }

    pub(crate) fn reload_handle(&self) -> std::sync::Arc<Reload> {
        match *self {}
    }
}

#[cfg(not(feature = "tls"))]
impl Reload {
    pub(crate) fn run(&self) {
        match *self {}
    }
}

/// The TLS error that `ServerTls::from_config` gives, carried in an `io::Error` so that the
/// binary can tell a bad certificate (exit code 2, like a bad option) from a failed bind.
#[derive(Debug)]
pub struct TlsSetupError(pub String);

impl std::fmt::Display for TlsSetupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsSetupError {}

/// When a DER certificate expires (its `notAfter`), as `YYYY-MM-DD HH:MM:SS UTC`; `None`
/// if it cannot be read (rustls checked the certificate is usable; this is for the log).
#[cfg_attr(not(feature = "tls"), allow(dead_code))]
fn not_after(der: &[u8]) -> Option<String> {
    /// One DER element: its tag, its contents and what follows it.
    fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = input.split_first()?;
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
            (len, &rest[n..])
        };
        (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
    }
    const SEQUENCE: u8 = 0x30;
    let (SEQUENCE, cert, _) = element(der)? else {
        return None;
    };
    let (SEQUENCE, tbs, _) = element(cert)? else {
        return None;
    };
    // RFC 5280 §4.1: [0] version (optional), serialNumber, signature, issuer, validity.
    let (tag, _, mut rest) = element(tbs)?;
    if tag == 0xa0 {
        rest = element(rest)?.2;
    }
    let rest = element(element(rest)?.2)?.2;
    let (SEQUENCE, validity, _) = element(rest)? else {
        return None;
    };
    let (_, not_after, _) = element(element(validity)?.2)?;
    let digits = not_after.strip_suffix(b"Z")?;
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // All ASCII digits, so every index below is a character boundary.
    let digits = std::str::from_utf8(digits).ok()?;
    let (year, rest) = match digits.len() {
        12 => {
            // UTCTime: YY from 50 on is 19YY (RFC 5280 §4.1.2.5.1).
            let yy: u32 = digits[..2].parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &digits[2..])
        }
        14 => (digits[..4].parse().ok()?, &digits[4..]),
        _ => return None,
    };
    Some(format!(
        "{year:04}-{}-{} {}:{}:{} UTC",
        &rest[0..2],
        &rest[2..4],
        &rest[4..6],
        &rest[6..8],
        &rest[8..10]
    ))
}

/// Reads a PEM file of at most [`MAX_PEM_BYTES`].
#[cfg_attr(not(feature = "tls"), allow(dead_code))]
fn read_pem(path: &str, what: &str) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let file =
        std::fs::File::open(path).map_err(|e| format!("cannot read the TLS {what} {path}: {e}"))?;
    let mut buf = Vec::new();
    file.take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(|e| format!("cannot read the TLS {what} {path}: {e}"))?;
    if buf.len() as u64 > MAX_PEM_BYTES {
        return Err(format!(
            "the TLS {what} {path} is larger than {MAX_PEM_BYTES} bytes: not a PEM file"
        ));
    }
    Ok(buf)
}

#[cfg(feature = "tls")]
mod with_tls {
    use super::{Config, Notifier, Stream, TcpStream, not_after, read_pem};
    use crate::conn::TlsStream;
    use log::{error, info};
    use rustls::ServerConfig;
    use rustls::pki_types::pem::{self, PemObject};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use std::sync::{Arc, Mutex, PoisonError};

    /// The certificate files, as configured.
    #[derive(Clone, Debug)]
    struct Files {
        cert: String,
        key: String,
    }

    /// A certificate and key made into a rustls config, and when the certificate expires.
    struct Loaded {
        config: Arc<ServerConfig>,
        expires: Option<String>,
    }

    impl Files {
        /// Reads and checks both files (the key must match the certificate). One sentence
        /// on failure, naming the file.
        fn load(&self) -> Result<Loaded, String> {
            let cert_pem = read_pem(&self.cert, "certificate")?;
            let certs = CertificateDer::pem_slice_iter(&cert_pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("the TLS certificate {}: {e}", self.cert))?;
            let Some(first) = certs.first() else {
                return Err(format!(
                    "the TLS certificate {} holds no PEM CERTIFICATE block",
                    self.cert
                ));
            };
            let expires = not_after(first);
            let key_pem = read_pem(&self.key, "key")?;
            let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
                pem::Error::NoItemsFound => format!(
                    "the TLS key {} holds no PEM private key (PKCS#8, RSA or EC)",
                    self.key
                ),
                e => format!("the TLS key {}: {e}", self.key),
            })?;
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("TLS set-up: {e}"))?
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .map_err(|e| {
                    format!(
                        "the TLS certificate {} with the key {}: {e}",
                        self.cert, self.key
                    )
                })?;
            Ok(Loaded {
                config: Arc::new(config),
                expires,
            })
        }

        fn expiry(loaded: &Loaded) -> String {
            match &loaded.expires {
                Some(at) => format!(" (expires {at})"),
                None => String::new(),
            }
        }
    }

    /// What the loop holds: the config new connections get, and the slot a reload fills.
    pub(crate) struct ServerTls {
        config: Arc<ServerConfig>,
        reload: Arc<Reload>,
    }

    /// A SIGHUP's work: re-read the files on the signal thread, leave the new config in
    /// the slot, wake the loop.
    pub(crate) struct Reload {
        files: Files,
        slot: Mutex<Option<Arc<ServerConfig>>>,
        notifier: Notifier,
    }

    impl ServerTls {
        /// The TLS of `config`: `None` without `--tls-cert`; one sentence when the files
        /// cannot be read or used.
        pub(crate) fn from_config(
            config: &Config,
            notifier: &Notifier,
        ) -> Result<Option<ServerTls>, String> {
            let files = match (&config.tls_cert, &config.tls_key) {
                (None, None) => return Ok(None),
                (Some(cert), Some(key)) => Files {
                    cert: cert.clone(),
                    key: key.clone(),
                },
                _ => return Err(crate::config::TLS_PAIR.to_string()),
            };
            let loaded = files.load()?;
            info!(
                "TLS: serving https:// and wss:// with the certificate {}{}",
                files.cert,
                Files::expiry(&loaded)
            );
            Ok(Some(ServerTls {
                config: loaded.config,
                reload: Arc::new(Reload {
                    files,
                    slot: Mutex::new(None),
                    notifier: notifier.clone(),
                }),
            }))
        }

        /// The stream of a connection just accepted: TLS with the current certificate.
        pub(crate) fn accept(&self, tcp: TcpStream) -> Result<Stream, String> {
            let conn = rustls::ServerConnection::new(Arc::clone(&self.config))
                .map_err(|e| format!("TLS set-up: {e}"))?;
            Ok(Stream::Tls(Box::new(TlsStream::new(tcp, conn))))
        }

        /// On a wake of the loop: a reloaded config, if one came, serves the connections
        /// made from now on.
        pub(crate) fn take_reloaded(&mut self) {
            let new = self
                .reload
                .slot
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            if let Some(config) = new {
                self.config = config;
            }
        }

        /// What the signal thread needs to reload.
        pub(crate) fn reload_handle(&self) -> Arc<Reload> {
            Arc::clone(&self.reload)
        }
    }

    impl Reload {
        /// Re-reads the certificate and key (on the signal thread). A bad file: one error
        /// line, and the certificate in use stays.
        pub(crate) fn run(&self) {
            match self.files.load() {
                Ok(loaded) => {
                    info!(
                        "TLS: reloaded the certificate {}{}; new connections use it",
                        self.files.cert,
                        Files::expiry(&loaded)
                    );
                    *self.slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(loaded.config);
                    self.notifier.wake();
                }
                Err(e) => error!("TLS: cannot reload: {e}; keeping the certificate in use"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::not_after;

    #[test]
    fn the_expiry_of_a_generated_certificate_is_read() {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.not_after = rcgen::date_time_ymd(2031, 7, 9);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(
            not_after(cert.der()).as_deref(),
            Some("2031-07-09 00:00:00 UTC")
        );
        // Past 2049 the certificate says GeneralizedTime (RFC 5280 §4.1.2.5).
        params.not_after = rcgen::date_time_ymd(2051, 1, 2);
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(
            not_after(cert.der()).as_deref(),
            Some("2051-01-02 00:00:00 UTC")
        );
    }

    #[test]
    fn garbage_has_no_expiry() {
        assert_eq!(not_after(b""), None);
        assert_eq!(not_after(&[0x30, 0x82, 0xff]), None);
        assert_eq!(not_after(&[0x30, 0x03, 0x30, 0x01, 0x02]), None);
    }
}
