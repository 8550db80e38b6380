//! TLS towards clients (`--tls-cert`, `--tls-key`): wss:// and https:// through the real
//! binary on 127.0.0.1, with certificates made by rcgen in a temp dir and a rustls client
//! (tungstenite over a blocking TLS stream). Plain clients, unfinished handshakes, SIGHUP
//! reloads, large replies and slow consumers, all over TLS.
#![cfg(feature = "tls")]

mod common;

use common::{
    OP_TEXT, READ_TIMEOUT, RawMsg, Server, assert_chat, flood_until_slow_consumer, read_raw_msg,
    read_until_eof, words, write_frame,
};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use serde_json::{Value, json};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use tungstenite::{Message, WebSocket};

type Tls = StreamOwned<ClientConnection, TcpStream>;

/// A certificate for `localhost` and 127.0.0.1 with its own name and serial.
struct Cert {
    pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
}

fn make_cert(cn: &str, serial: u64) -> Cert {
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    params.serial_number = Some(rcgen::SerialNumber::from(serial));
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("self-signed");
    Cert {
        pem: cert.pem(),
        key_pem: key.serialize_pem(),
        der: cert.der().clone(),
    }
}

/// A temp dir holding `cert.pem` and `key.pem`; removed on drop.
struct Files {
    dir: PathBuf,
}

impl Files {
    fn new(tag: &str, cert: &Cert) -> Files {
        let dir = std::env::temp_dir().join(format!("straycat-tls-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let files = Files { dir };
        files.write(cert);
        files
    }

    fn write(&self, cert: &Cert) {
        std::fs::write(self.cert(), &cert.pem).expect("write cert");
        std::fs::write(self.key(), &cert.key_pem).expect("write key");
    }

    fn cert(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }

    fn key(&self) -> PathBuf {
        self.dir.join("key.pem")
    }

    fn args(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.cert().display().to_string(),
            "--tls-key".into(),
            self.key().display().to_string(),
        ]
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start(files: &Files, extra: &[&str]) -> Server {
    let mut args: Vec<String> = files.args();
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start(&args)
}

/// A server on a fresh certificate (`serial` tells the tests' certificates apart) and a
/// client config trusting it; the files live as long as the returned `Files`.
fn setup(tag: &str, serial: u64, extra: &[&str]) -> (Files, Server, Arc<ClientConfig>) {
    let cert = make_cert("straycat-test", serial);
    let files = Files::new(tag, &cert);
    let server = start(&files, extra);
    let config = client_config(&[&cert]);
    (files, server, config)
}

/// A client config trusting exactly `certs` (self-signed, each its own root).
fn client_config(certs: &[&Cert]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for c in certs {
        roots.add(c.der.clone()).expect("root");
    }
    Arc::new(
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// A TLS connection to `addr` as `localhost`, handshake done, with timeouts set.
fn tls_connect(addr: SocketAddr, config: &Arc<ClientConfig>) -> Tls {
    tls_over(common::tcp(addr), config)
}

fn tls_over(tcp: TcpStream, config: &Arc<ClientConfig>) -> Tls {
    let name = ServerName::try_from("localhost").expect("name");
    let conn = ClientConnection::new(Arc::clone(config), name).expect("client connection");
    let mut tls = StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .expect("TLS handshake with straycat");
    }
    tls
}

/// The certificate the server presented.
fn presented(tls: &Tls) -> CertificateDer<'static> {
    tls.conn
        .peer_certificates()
        .and_then(|c| c.first())
        .expect("a server certificate")
        .clone()
        .into_owned()
}

/// A wss:// chat client.
struct WsClient {
    ws: WebSocket<Tls>,
}

fn wss(addr: SocketAddr, config: &Arc<ClientConfig>, path: &str) -> WsClient {
    let tls = tls_connect(addr, config);
    let url = format!("wss://localhost:{}{path}", addr.port());
    let (ws, resp) = tungstenite::client(url.as_str(), tls)
        .unwrap_or_else(|e| panic!("wss upgrade on {path}: {e}"));
    assert_eq!(resp.status().as_u16(), 101);
    WsClient { ws }
}

impl WsClient {
    fn say(&mut self, text: &str, id: &str) {
        let m = json!({"text": text, "id": id}).to_string();
        self.ws.send(Message::text(m)).expect("send over wss");
    }

    fn recv_json(&mut self) -> Value {
        loop {
            match self.ws.read() {
                Ok(Message::Text(t)) => return serde_json::from_str(t.as_str()).expect("JSON"),
                Ok(Message::Ping(_) | Message::Pong(_)) => continue,
                Ok(other) => panic!("expected a text frame, got {other:?}"),
                Err(e) => panic!("wss read: {e}"),
            }
        }
    }

    /// Tokens, then the chat.
    fn recv_until_chat(&mut self) -> (Vec<String>, Value) {
        let mut tokens = Vec::new();
        loop {
            let v = self.recv_json();
            match v["type"].as_str() {
                Some("chat_token") => tokens.push(v["content"].as_str().unwrap().to_string()),
                Some("chat") => return (tokens, v),
                _ => panic!("expected chat_token or chat, got {v}"),
            }
        }
    }

    fn turn(&mut self, user: &str, text: &str, id: &str) {
        self.say(text, id);
        let (tokens, chat) = self.recv_until_chat();
        assert_eq!(tokens, words(text));
        assert_chat(&chat, user, text, Some(id));
    }
}

/// An HTTP/1.1 request over TLS; the status, head and body of the answer (read to the end).
fn https(addr: SocketAddr, config: &Arc<ClientConfig>, path: &str) -> (u16, String, String) {
    let mut tls = tls_connect(addr, config);
    write!(
        tls,
        "GET {path} HTTP/1.1\r\nHost: localhost:{}\r\nConnection: close\r\n\r\n",
        addr.port()
    )
    .expect("write request");
    let mut raw = Vec::new();
    // The server ends with close_notify, so a clean end of stream.
    tls.read_to_end(&mut raw)
        .expect("read the answer to its end");
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status");
    (status, head.to_string(), body.to_string())
}

#[test]
fn a_wss_chat_turn_with_the_echo_agent() {
    let cert = make_cert("straycat-test", 1);
    let files = Files::new("chat", &cert);
    let server = start(&files, &[]);
    assert!(server.has_log("TLS only"), "the start says it serves TLS");
    let config = client_config(&[&cert]);
    let mut c = wss(server.addr(), &config, "/ws/alice");
    c.turn("alice", "hello over tls", "t1");
    c.turn("alice", "and once more", "t2");
    assert!(
        server
            .wait_log_all(&["user=alice", "connected"], READ_TIMEOUT)
            .is_some()
    );
}

#[test]
fn https_serves_health_the_page_and_metrics() {
    let cert = make_cert("straycat-test", 2);
    let files = Files::new("https", &cert);
    // Through the environment, as /etc/default/straycat sets it.
    let cert_path = files.cert().display().to_string();
    let key_path = files.key().display().to_string();
    let server = Server::start_with_env(
        &[],
        &[
            ("STRAYCAT_TLS_CERT", cert_path.as_str()),
            ("STRAYCAT_TLS_KEY", key_path.as_str()),
        ],
    );
    let config = client_config(&[&cert]);
    let (status, _, body) = https(server.addr(), &config, "/health");
    assert_eq!(status, 200, "{body}");
    let health: Value = serde_json::from_str(&body).expect("JSON health");
    assert_eq!(health["status"], "ok");
    let (status, head, body) = https(server.addr(), &config, "/");
    assert_eq!(status, 200);
    assert!(head.contains("Content-Security-Policy"), "{head}");
    assert!(body.contains("<html"), "the page");
    let (status, _, body) = https(server.addr(), &config, "/metrics");
    assert_eq!(status, 200);
    assert!(body.contains("straycat_build_info"), "{body}");
    let (status, _, _) = https(server.addr(), &config, "/nowhere");
    assert_eq!(status, 404);
}

#[test]
fn a_plain_client_on_the_tls_port_is_dropped_and_others_chat_on() {
    let (_files, server, config) = setup("plain", 3, &[]);
    let mut alice = wss(server.addr(), &config, "/ws/alice");
    alice.turn("alice", "before the plain client", "a1");

    // Plain HTTP and a plain WebSocket upgrade: no answer in plaintext, the socket closed.
    for request in [
        "GET /health HTTP/1.1\r\nHost: x\r\n\r\n".to_string(),
        common::upgrade_request(server.addr(), "/ws/mallory"),
    ] {
        let mut s = common::tcp(server.addr());
        let local = s.local_addr().unwrap();
        s.write_all(request.as_bytes()).expect("write");
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
                Err(e) => panic!("the plain client was not dropped: {e}"),
            }
        }
        assert!(
            !String::from_utf8_lossy(&got).contains("HTTP/1.1"),
            "no plaintext answer: {got:?}"
        );
        let line = server
            .wait_log_all(&["TLS error", &format!("peer={local}")], READ_TIMEOUT)
            .expect("one log line naming the peer");
        assert!(line.contains("not TLS"), "{line}");
    }
    alice.turn("alice", "after the plain client", "a2");
    let mut bob = wss(server.addr(), &config, "/ws/bob");
    bob.turn("bob", "a new user too", "b1");
    let (status, _, _) = https(server.addr(), &config, "/health");
    assert_eq!(status, 200);
}

#[test]
fn an_unfinished_tls_handshake_is_dropped_at_the_handshake_deadline() {
    let cert = make_cert("straycat-test", 4);
    let files = Files::new("deadline", &cert);
    let server = start(&files, &["--handshake-timeout-secs", "1"]);
    // One socket that says nothing, one that starts a ClientHello record and stops.
    let mut silent = common::tcp(server.addr());
    let mut partial = common::tcp(server.addr());
    partial
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .expect("write a partial record");
    assert!(
        read_until_eof(&mut silent, Duration::from_secs(30)),
        "the silent socket is dropped"
    );
    assert!(
        read_until_eof(&mut partial, Duration::from_secs(30)),
        "the half handshake is dropped"
    );
    assert!(server.wait_log("handshake timed out", READ_TIMEOUT));
    // The slots are free again: a full client still gets in.
    let config = client_config(&[&cert]);
    wss(server.addr(), &config, "/ws/late").turn("late", "still served", "l1");
    // The two dropped sockets hold no slot: eventually only the probe itself is counted.
    common::poll("the slots freed", Duration::from_secs(30), || {
        (server_connections(&server, &config) == 1).then_some(())
    });
}

/// `connections` of `/health` over https (the probe itself counts).
fn server_connections(server: &Server, config: &Arc<ClientConfig>) -> u64 {
    let (_, _, body) = https(server.addr(), config, "/health");
    let v: Value = serde_json::from_str(&body).expect("health");
    v["connections"].as_u64().expect("connections")
}

#[test]
fn sighup_reloads_the_certificate_and_open_connections_keep_theirs() {
    let old = make_cert("straycat-old", 10);
    let new = make_cert("straycat-new", 11);
    let files = Files::new("reload", &old);
    let server = start(&files, &[]);
    let config = client_config(&[&old, &new]);

    let before_tls = tls_connect(server.addr(), &config);
    assert_eq!(presented(&before_tls), old.der);
    let url = format!("wss://localhost:{}/ws/before", server.addr().port());
    let (ws, _) = tungstenite::client(url.as_str(), before_tls).expect("upgrade");
    let mut before = WsClient { ws };
    before.turn("before", "on the old certificate", "o1");

    files.write(&new);
    server.signal("HUP");
    assert!(
        server.wait_log("TLS: reloaded the certificate", READ_TIMEOUT),
        "the reload is logged"
    );
    let line = server
        .wait_log_line(|l| l.contains("reloaded the certificate"), READ_TIMEOUT)
        .unwrap();
    assert!(line.contains("expires"), "{line}");
    // The loop takes the new config on its next wake: poll until a new connection sees it.
    let seen = common::poll("the new certificate", Duration::from_secs(30), || {
        let tls = tls_connect(server.addr(), &config);
        (presented(&tls) == new.der).then_some(tls)
    });
    let url = format!("wss://localhost:{}/ws/after", server.addr().port());
    let (ws, _) = tungstenite::client(url.as_str(), seen).expect("upgrade");
    let mut after = WsClient { ws };
    after.turn("after", "on the new certificate", "n1");
    // The connection made before chats on, over the old one.
    before.turn("before", "still on the old certificate", "o2");
    assert_eq!(
        before.ws.get_ref().conn.peer_certificates().unwrap()[0],
        old.der
    );

    // A bad file on reload: one error line, the certificate in use stays.
    std::fs::write(files.cert(), "not a certificate\n").expect("write garbage");
    server.signal("HUP");
    let line = server
        .wait_log_line(|l| l.contains("TLS: cannot reload"), READ_TIMEOUT)
        .expect("the failed reload is logged");
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains("cert.pem"), "names the file: {line}");
    // A key that does not match the certificate is refused as well.
    let other = make_cert("straycat-other", 12);
    std::fs::write(files.cert(), &other.pem).expect("write cert");
    server.signal("HUP");
    assert!(
        server
            .wait_log_line(
                |l| l.contains("TLS: cannot reload") && l.contains("key"),
                READ_TIMEOUT
            )
            .is_some(),
        "a mismatched key is refused"
    );
    assert_eq!(presented(&tls_connect(server.addr(), &config)), new.der);
    after.turn("after", "the failed reloads changed nothing", "n2");
    before.turn("before", "nor for me", "o3");
    assert_eq!(
        server
            .logs()
            .iter()
            .filter(|l| l.contains("reloaded the certificate"))
            .count(),
        1
    );
}

#[test]
fn past_the_connection_cap_a_tls_client_is_closed_without_a_handshake() {
    let (_files, server, config) = setup("cap", 14, &["--max-connections", "1"]);
    let mut first = wss(server.addr(), &config, "/ws/first");
    first.turn("first", "i hold the only slot", "f1");
    let tcp = common::tcp(server.addr());
    let name = ServerName::try_from("localhost").expect("name");
    let conn = ClientConnection::new(Arc::clone(&config), name).expect("client connection");
    let mut tls = StreamOwned::new(conn, tcp);
    let mut refused = false;
    while tls.conn.is_handshaking() {
        if tls.conn.complete_io(&mut tls.sock).is_err() {
            refused = true;
            break;
        }
    }
    assert!(refused, "no handshake past the cap");
    assert!(server.wait_log("refused (closed): connection cap 1 reached", READ_TIMEOUT));
    first.turn("first", "still served", "f2");
}

#[test]
fn a_large_message_and_reply_cross_tls_whole() {
    let (_files, server, config) = setup(
        "large",
        5,
        &[
            "--max-message-bytes",
            "1048576",
            "--max-buffered-bytes",
            "16777216",
        ],
    );
    let mut c = wss(server.addr(), &config, "/ws/big");
    // About 400 KB in one message; the reply is its words as tokens, then all of it again.
    let text: String = (0..4000)
        .map(|i| format!("word{i:05}-{}", "x".repeat(90)))
        .collect::<Vec<_>>()
        .join(" ");
    assert!(text.len() > 390_000);
    c.turn("big", &text, "big1");
    // And the socket carries on with small ones.
    c.turn("big", "small after big", "big2");
}

#[test]
fn a_burst_of_small_messages_is_all_read() {
    // Many small records in flight at once: the server pulls several into rustls with one
    // kernel read and returns less than a read asks for. No readable event announces what
    // rustls (or the kernel) still holds, so a stream that took a short read for "empty"
    // would strand messages here and the client would wait for ever.
    let (_files, server, config) = setup(
        "burst",
        9,
        &[
            "--max-queued-turns",
            "200",
            "--max-messages-per-minute",
            "0",
        ],
    );
    let mut c = wss(server.addr(), &config, "/ws/burst");
    const N: usize = 150;
    // One TLS record per message, all handed to the kernel in one write.
    let tls = c.ws.get_mut();
    for i in 0..N {
        let m = json!({"text": format!("m{i}"), "id": format!("b{i}")}).to_string();
        let mut frame = Vec::new();
        write_frame(&mut frame, OP_TEXT, m.as_bytes()).expect("frame");
        tls.conn.writer().write_all(&frame).expect("one record");
    }
    let mut wire = Vec::new();
    while tls.conn.wants_write() {
        tls.conn.write_tls(&mut wire).expect("records");
    }
    tls.sock.write_all(&wire).expect("send the burst");
    let mut answered = std::collections::BTreeSet::new();
    while answered.len() < N {
        let v = c.recv_json();
        if matches!(v["type"].as_str(), Some("chat" | "error")) {
            answered.insert(v["reply_to"].as_str().expect("reply_to").to_string());
        }
    }
}

#[test]
fn a_slow_consumer_over_tls_is_closed_with_1008() {
    use socket2::{Domain, Protocol, Socket, Type};

    let cert = make_cert("straycat-test", 6);
    let files = Files::new("slow", &cert);
    let server = start(
        &files,
        &["--max-buffered-bytes", "65536", "--max-held-frames", "4096"],
    );
    let addr = server.addr();
    let sock = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
    sock.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    sock.connect_timeout(&addr.into(), Duration::from_secs(5))
        .expect("connect");
    let tcp: TcpStream = sock.into();
    tcp.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    tcp.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    let config = client_config(&[&cert]);
    let mut s = tls_over(tcp, &config);
    s.write_all(common::upgrade_request(addr, "/ws/slow").as_bytes())
        .expect("upgrade");
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).expect("101 head");
        head.push(b[0]);
    }
    assert!(String::from_utf8_lossy(&head).starts_with("HTTP/1.1 101"));

    // Many 30 KB messages, never reading the answers.
    flood_until_slow_consumer(&server, &mut s);
    let line = server
        .wait_log_all(&["slow consumer", "user=slow"], Duration::from_secs(20))
        .expect("a slow consumer warning");
    assert!(line.contains("peer="), "{line}");
    let close = loop {
        match read_raw_msg(&mut s) {
            Ok(RawMsg::Text(_) | RawMsg::Ping | RawMsg::Pong) => {}
            Ok(RawMsg::Close(code, _)) => break code,
            Ok(other) => panic!("expected frames then a close, got {other:?}"),
            Err(e) => panic!("reading the slow socket over TLS failed: {e}"),
        }
    };
    assert_eq!(close, Some(1008));
    // Others are served meanwhile and after.
    wss(addr, &config, "/ws/fast").turn("fast", "not slow", "f1");
}

/// Runs the binary with `args` (and no TLS variables from the caller's environment);
/// returns its exit code and stderr.
fn run_to_exit(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_straycat"))
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .env_remove("STRAYCAT_TLS_CERT")
        .env_remove("STRAYCAT_TLS_KEY")
        .output()
        .expect("run straycat");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn bad_tls_options_and_files_are_one_line_and_exit_code_2() {
    let cert = make_cert("straycat-test", 7);
    let files = Files::new("bad", &cert);
    let (cert_path, key_path) = (
        files.cert().display().to_string(),
        files.key().display().to_string(),
    );
    let missing = files.dir.join("missing.pem").display().to_string();
    let garbage = files.dir.join("garbage.pem");
    std::fs::write(&garbage, "-----BEGIN CERTIFICATE-----\nnot base64!\n").unwrap();
    let garbage = garbage.display().to_string();
    let other = make_cert("straycat-other", 8);
    let other_key = files.dir.join("other-key.pem");
    std::fs::write(&other_key, &other.key_pem).unwrap();
    let other_key = other_key.display().to_string();
    let cases: [(&[&str], &str); 6] = [
        (&["--tls-cert", &cert_path], "go together"),
        (&["--tls-key", &key_path], "go together"),
        (
            &["--tls-cert", &missing, "--tls-key", &key_path],
            "missing.pem",
        ),
        (
            &["--tls-cert", &garbage, "--tls-key", &key_path],
            "garbage.pem",
        ),
        (
            &["--tls-cert", &cert_path, "--tls-key", &cert_path],
            "no PEM private key",
        ),
        (&["--tls-cert", &cert_path, "--tls-key", &other_key], "key"),
    ];
    for (args, want) in cases {
        let (code, stderr) = run_to_exit(args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: one line, got {stderr}");
        assert!(lines[0].contains(want), "{args:?}: {stderr}");
    }
}
