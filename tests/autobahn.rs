//! The Autobahn TestSuite cases 1–10 against `/echo`, driven by `kosoku` (PyPI), which
//! `tests/all.sh` installs. Compression (12.*, 13.*) is out of scope.

mod common;

use std::path::PathBuf;
use std::process::Command;

/// `kosoku` from `$KOSOKU`, the PATH, or the scripts folder of `python3`'s install.
fn kosoku() -> PathBuf {
    if let Some(p) = std::env::var_os("KOSOKU") {
        return PathBuf::from(p);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("kosoku");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .output()
        .expect("python3 is needed to find kosoku");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("kosoku")
}

/// The server's options for the suite: case 9 sends messages of up to 16 MiB and reads
/// nothing until it has sent them.
const SUITE_ARGS: [&str; 7] = [
    "--raw-echo",
    "--max-message-bytes",
    "16777216",
    "--max-buffered-bytes",
    "67108864",
    "--log-level",
    "info",
];

#[test]
fn autobahn_cases_1_to_10_pass_on_echo() {
    let server = common::Server::start(&SUITE_ARGS);
    run_suite(&format!("ws://{}/echo", server.addr()));
}

/// Runs cases 1-10 against `url` and fails the test unless every one passes.
fn run_suite(url: &str) {
    let kosoku = kosoku();
    assert!(
        kosoku.is_file(),
        "kosoku not found at {}: run tests/all.sh, which installs it (pip install kosoku)",
        kosoku.display()
    );
    let reports = std::env::temp_dir().join(format!(
        "straycat-autobahn-{}-{}",
        std::process::id(),
        url.len()
    ));
    let out = Command::new(&kosoku)
        .args(["-x", "12.*", "-x", "13.*", "-o"])
        .arg(&reports)
        .arg(url)
        .output()
        .expect("kosoku runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let _ = std::fs::remove_dir_all(&reports);
    let summary = stdout
        .lines()
        .chain(stderr.lines())
        .filter(|l| l.contains("cases passed") || l.contains("failed"))
        .collect::<Vec<_>>();
    assert!(out.status.success(), "kosoku failed:\n{stdout}\n{stderr}");
    assert!(
        summary
            .iter()
            .any(|l| l.trim_end().ends_with("cases passed")),
        "no pass summary:\n{stdout}\n{stderr}"
    );
    assert!(
        !summary.iter().any(|l| l.contains("failed")),
        "failures:\n{stdout}"
    );
    let passed: usize = summary
        .iter()
        .find_map(|l| l.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0);
    assert!(
        passed >= 290,
        "expected every case of 1-10 to run, saw {passed}"
    );
}

/// The same cases through straycat's TLS. kosoku 0.1 speaks no `wss://` ("invalid url
/// scheme"), so it talks `ws://` to a small TLS client of ours on 127.0.0.1, which carries
/// each connection over TLS to straycat: every frame of the suite crosses straycat's TLS
/// read and write paths.
#[cfg(feature = "tls")]
#[test]
fn autobahn_cases_1_to_10_pass_over_tls() {
    let key = rcgen::KeyPair::generate().expect("key");
    let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    let cert = params.self_signed(&key).expect("certificate");
    let dir = std::env::temp_dir().join(format!("straycat-autobahn-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).expect("write cert");
    std::fs::write(&key_path, key.serialize_pem()).expect("write key");
    let mut args: Vec<String> = SUITE_ARGS.iter().map(|s| s.to_string()).collect();
    args.extend([
        "--tls-cert".to_string(),
        cert_path.display().to_string(),
        "--tls-key".to_string(),
        key_path.display().to_string(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = common::Server::start(&args);
    let proxy = tls_proxy::start(server.addr(), cert.der().clone());
    run_suite(&format!("ws://{proxy}/echo"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A TLS-originating relay for the suite: plain TCP in, TLS (rustls) out.
#[cfg(feature = "tls")]
mod tls_proxy {
    use rustls::pki_types::{CertificateDer, ServerName};
    use rustls::{ClientConfig, ClientConnection, RootCertStore};
    use std::io::{ErrorKind, Read, Write};
    use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
    use std::sync::Arc;
    use std::time::Duration;

    /// Listens on 127.0.0.1 and relays every connection to `server` over TLS, trusting
    /// `cert`; returns the address to give the client. The threads end with the test.
    pub fn start(server: SocketAddr, cert: CertificateDer<'static>) -> SocketAddr {
        let mut roots = RootCertStore::empty();
        roots.add(cert).expect("root");
        let config = Arc::new(
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_root_certificates(roots)
                .with_no_client_auth(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the relay");
        let addr = listener.local_addr().expect("relay address");
        std::thread::spawn(move || {
            for plain in listener.incoming().flatten() {
                let config = Arc::clone(&config);
                std::thread::spawn(move || {
                    let Ok(tls) = TcpStream::connect(server) else {
                        return;
                    };
                    let name = ServerName::try_from("localhost").expect("name");
                    let Ok(mut conn) = ClientConnection::new(config, name) else {
                        return;
                    };
                    // Case 9's 16 MiB messages go through whole.
                    conn.set_buffer_limit(None);
                    relay(plain, tls, conn);
                });
            }
        });
        addr
    }

    /// Moves bytes both ways until both ends are done (or one fails), polling two
    /// non-blocking sockets with a 1 ms pause when nothing moved.
    fn relay(plain: TcpStream, tls: TcpStream, mut conn: ClientConnection) {
        let _ = plain.set_nodelay(true);
        let _ = tls.set_nodelay(true);
        if plain.set_nonblocking(true).is_err() || tls.set_nonblocking(true).is_err() {
            return;
        }
        let (mut plain, mut tls) = (plain, tls);
        let mut buf = vec![0u8; 64 * 1024];
        let mut to_plain: Vec<u8> = Vec::new();
        let (mut plain_eof, mut tls_eof, mut plain_shut) = (false, false, false);
        loop {
            let mut moved = false;
            if !plain_eof {
                match plain.read(&mut buf) {
                    Ok(0) => {
                        plain_eof = true;
                        conn.send_close_notify();
                        moved = true;
                    }
                    Ok(n) => {
                        if conn.writer().write_all(&buf[..n]).is_err() {
                            return;
                        }
                        moved = true;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => return,
                }
            }
            while conn.wants_write() {
                match conn.write_tls(&mut tls) {
                    Ok(_) => moved = true,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => return,
                }
            }
            if !tls_eof {
                match conn.read_tls(&mut tls) {
                    Ok(0) => {
                        tls_eof = true;
                        moved = true;
                    }
                    Ok(_) => {
                        if conn.process_new_packets().is_err() {
                            return;
                        }
                        moved = true;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => tls_eof = true,
                }
            }
            loop {
                match conn.reader().read(&mut buf) {
                    Ok(0) => {
                        tls_eof = true;
                        break;
                    }
                    Ok(n) => {
                        to_plain.extend_from_slice(&buf[..n]);
                        moved = true;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => {
                        tls_eof = true;
                        break;
                    }
                }
            }
            if !to_plain.is_empty() {
                match plain.write(&to_plain) {
                    Ok(n) => {
                        to_plain.drain(..n);
                        moved = true;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => return,
                }
            }
            if tls_eof && to_plain.is_empty() && !plain_shut {
                // straycat closed: so does the relay, towards the suite.
                let _ = plain.shutdown(Shutdown::Write);
                plain_shut = true;
            }
            if plain_shut && plain_eof && !conn.wants_write() {
                return;
            }
            if !moved {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}
