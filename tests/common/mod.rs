//! Test harness shared by every integration test: starts the real `straycat` binary on
//! `127.0.0.1:0`, watches its log, and speaks WebSocket and raw HTTP to it over real sockets.
//!
//! Every blocking operation here is bounded by a read timeout or a deadline, so a broken
//! server makes a test fail, never hang.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tungstenite::protocol::WebSocket;
use tungstenite::{Error as WsError, Message};

/// How long a single read may block before the test gives up on it.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the server may take to start and print its listening address.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Lines the server wrote to stderr, shared with the reader thread.
#[derive(Default)]
struct LogState {
    /// Every line so far, in order.
    lines: Vec<String>,
    /// The server closed its stderr (it exited).
    eof: bool,
}

/// A running `straycat` process, killed on drop.
pub struct Server {
    child: Child,
    addr: SocketAddr,
    log: Arc<(Mutex<LogState>, Condvar)>,
}

impl Server {
    /// Starts the server with `--listen 127.0.0.1:0 --log-level debug` plus `args`.
    pub fn start(args: &[&str]) -> Server {
        Server::start_with_env(args, &[])
    }

    /// Like [`Server::start`], with extra environment variables.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_straycat"));
        cmd.args(["--listen", "127.0.0.1:0", "--log-level", "debug"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn straycat");
        let log: Arc<(Mutex<LogState>, Condvar)> = Arc::default();
        let pid = child.id();
        // The log belongs on stderr (tests/cli.rs checks that); stdout is read as well so
        // that a logger writing to the wrong stream does not hide every other result.
        let stderr = child.stderr.take().expect("piped stderr");
        let stdout = child.stdout.take().expect("piped stdout");
        let open = Arc::new(Mutex::new(2u8));
        spawn_log_reader(stderr, "", pid, Arc::clone(&log), Arc::clone(&open));
        spawn_log_reader(stdout, "(stdout) ", pid, Arc::clone(&log), open);
        let mut server = Server {
            child,
            addr: "127.0.0.1:0".parse().unwrap(),
            log,
        };
        let line = server
            .wait_log_line(|l| l.contains("listening on "), START_TIMEOUT)
            .unwrap_or_else(|| {
                panic!(
                    "server did not log `listening on ` within {START_TIMEOUT:?}; log:\n{}",
                    server.logs().join("\n")
                )
            });
        let rest = &line[line.find("listening on ").unwrap() + "listening on ".len()..];
        let addr = rest
            .split_whitespace()
            .next()
            .expect("address after `listening on `");
        server.addr = addr
            .parse()
            .unwrap_or_else(|e| panic!("cannot parse listening address {addr:?}: {e}"));
        server
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A copy of every log line so far.
    pub fn logs(&self) -> Vec<String> {
        self.log.0.lock().unwrap().lines.clone()
    }

    /// Whether some log line so far contains `substr`.
    pub fn has_log(&self, substr: &str) -> bool {
        self.log
            .0
            .lock()
            .unwrap()
            .lines
            .iter()
            .any(|l| l.contains(substr))
    }

    /// Waits until a log line contains `substr`; false when `timeout` passes first.
    pub fn wait_log(&self, substr: &str, timeout: Duration) -> bool {
        self.wait_log_line(|l| l.contains(substr), timeout)
            .is_some()
    }

    /// Waits until a log line contains every one of `substrs`, and returns it.
    pub fn wait_log_all(&self, substrs: &[&str], timeout: Duration) -> Option<String> {
        self.wait_log_line(|l| substrs.iter().all(|s| l.contains(s)), timeout)
    }

    /// Waits until some log line (from the first) satisfies `pred`, and returns it.
    pub fn wait_log_line(&self, pred: impl Fn(&str) -> bool, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.log;
        let mut state = m.lock().unwrap();
        loop {
            if let Some(l) = state.lines.iter().find(|l| pred(l)) {
                return Some(l.clone());
            }
            let now = Instant::now();
            if now >= deadline || state.eof {
                return None;
            }
            state = cv.wait_timeout(state, deadline - now).unwrap().0;
        }
    }

    /// Sends a signal with the `kill` command (no libc needed).
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} failed");
    }

    /// Waits for the process to exit; `None` if it is still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `ws://addr{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// Connects a chat client as `user`; `query` is appended verbatim (`""` or `"?since=3"`).
    pub fn connect(&self, user: &str, query: &str) -> Client {
        connect(self.addr, user, query)
    }

    /// `GET /health`, parsed.
    pub fn health(&self) -> Value {
        let resp = http_get(self.addr, "/health");
        assert_eq!(resp.status, 200, "GET /health: {resp:?}");
        serde_json::from_str(&resp.body).expect("/health body is JSON")
    }
}

/// Copies `stream` line by line into the shared log (and to the test's stderr).
fn spawn_log_reader(
    stream: impl Read + Send + 'static,
    tag: &'static str,
    pid: u32,
    log: Arc<(Mutex<LogState>, Condvar)>,
    open: Arc<Mutex<u8>>,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line).trim_end().to_string();
            eprintln!("[straycat {pid}] {tag}{line}");
            let (m, cv) = &*log;
            m.lock().unwrap().lines.push(line);
            cv.notify_all();
        }
        let mut open = open.lock().unwrap();
        *open -= 1;
        if *open == 0 {
            let (m, cv) = &*log;
            m.lock().unwrap().eof = true;
            cv.notify_all();
        }
    });
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// WebSocket client (tungstenite over a blocking TcpStream with a read timeout)
// ---------------------------------------------------------------------------------------

/// What a client read from its socket.
#[derive(Debug)]
pub enum Incoming {
    /// A text frame, parsed as JSON (a text frame that is not JSON fails the test).
    Json(Value),
    /// A binary frame.
    Binary(Vec<u8>),
    /// A close frame: code and reason (`None` if the close frame had no payload).
    Close(Option<(u16, String)>),
    /// The connection ended without a close frame (EOF, reset, ...).
    Gone(String),
}

/// A blocking WebSocket chat client.
pub struct Client {
    pub ws: WebSocket<TcpStream>,
    /// The user id this client connected as (empty for non-chat paths).
    pub user: String,
    /// The client's own address, as the server sees it (`peer=` in the log).
    pub local: SocketAddr,
}

/// Why a connection attempt failed.
#[derive(Debug)]
pub enum ConnectError {
    /// The server answered with this HTTP status instead of 101.
    Status(u16, String),
    /// Anything else (refused, reset, timed out).
    Other(String),
}

/// Opens a TCP connection to `addr` with read and write timeouts set.
pub fn tcp(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("tcp connect");
    s.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(READ_TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// WebSocket handshake on `path` (e.g. `/ws/alice?since=2`).
pub fn try_connect_path(addr: SocketAddr, path: &str) -> Result<Client, ConnectError> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| ConnectError::Other(format!("tcp connect: {e}")))?;
    stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(READ_TIMEOUT)).unwrap();
    stream.set_nodelay(true).unwrap();
    try_connect_stream(addr, path, stream)
}

/// WebSocket handshake on `path` over an already connected stream.
pub fn try_connect_stream(
    addr: SocketAddr,
    path: &str,
    stream: TcpStream,
) -> Result<Client, ConnectError> {
    let local = stream.local_addr().unwrap();
    let url = format!("ws://{addr}{path}");
    match tungstenite::client(url.as_str(), stream) {
        Ok((ws, _resp)) => Ok(Client {
            ws,
            user: user_of_path(path),
            local,
        }),
        Err(tungstenite::HandshakeError::Failure(WsError::Http(resp))) => {
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).to_string())
                .unwrap_or_default();
            Err(ConnectError::Status(resp.status().as_u16(), body))
        }
        Err(e) => Err(ConnectError::Other(format!("handshake on {path}: {e}"))),
    }
}

fn user_of_path(path: &str) -> String {
    let p = path.split('?').next().unwrap_or("");
    match p.strip_prefix("/ws/") {
        Some(u) => u.to_string(),
        None if p == "/ws" => "user".to_string(),
        None => String::new(),
    }
}

/// Connects as `user` on `/ws/{user}{query}`; fails the test if the handshake fails.
pub fn connect(addr: SocketAddr, user: &str, query: &str) -> Client {
    let path = format!("/ws/{user}{query}");
    try_connect_path(addr, &path).unwrap_or_else(|e| panic!("connect {path}: {e:?}"))
}

impl Client {
    /// Sends one text frame.
    pub fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::text(text.to_string()))
            .unwrap_or_else(|e| panic!("[{}] send: {e}", self.user));
    }

    /// Sends a JSON value as one text frame.
    pub fn send_json(&mut self, v: &Value) {
        self.send_text(&v.to_string());
    }

    /// Sends `{"text": text}` (with `"id"` when given).
    pub fn say(&mut self, text: &str, id: Option<&str>) {
        let mut v = serde_json::json!({ "text": text });
        if let Some(id) = id {
            v["id"] = Value::from(id);
        }
        self.send_json(&v);
    }

    /// Sends one binary frame.
    pub fn send_binary(&mut self, data: &[u8]) {
        self.ws
            .send(Message::binary(data.to_vec()))
            .unwrap_or_else(|e| panic!("[{}] send binary: {e}", self.user));
    }

    /// Reads the next frame (ping and pong are answered by tungstenite and not returned).
    /// Fails the test if nothing arrives within the socket's read timeout.
    pub fn recv(&mut self) -> Incoming {
        loop {
            match self.ws.read() {
                Ok(Message::Text(t)) => {
                    let v = serde_json::from_str(t.as_str()).unwrap_or_else(|e| {
                        panic!("[{}] text frame is not JSON ({e}): {t}", self.user)
                    });
                    return Incoming::Json(v);
                }
                Ok(Message::Binary(b)) => return Incoming::Binary(b.to_vec()),
                Ok(Message::Ping(_)) | Ok(Message::Pong(_)) => continue,
                Ok(Message::Close(cf)) => {
                    // Like every real client: send the queued close reply, completing
                    // the close handshake (RFC 6455 §5.5.1).
                    let _ = self.ws.flush();
                    return Incoming::Close(
                        cf.map(|cf| (u16::from(cf.code), cf.reason.as_str().to_string())),
                    );
                }
                Ok(Message::Frame(_)) => unreachable!("raw frames are never read"),
                Err(WsError::Io(e))
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                {
                    panic!("[{}] no frame within the read timeout", self.user)
                }
                Err(e) => return Incoming::Gone(e.to_string()),
            }
        }
    }

    /// The next frame, which must be a JSON text frame.
    pub fn recv_json(&mut self) -> Value {
        match self.recv() {
            Incoming::Json(v) => v,
            other => panic!("[{}] expected a JSON text frame, got {other:?}", self.user),
        }
    }

    /// Reads `chat_token` frames up to the next `chat`; returns the token contents and the
    /// chat. Any other frame (error, close, ...) fails the test.
    pub fn recv_until_chat(&mut self) -> (Vec<String>, Value) {
        let mut tokens = Vec::new();
        loop {
            let v = self.recv_json();
            match v["type"].as_str() {
                Some("chat_token") => tokens.push(
                    v["content"]
                        .as_str()
                        .unwrap_or_else(|| panic!("chat_token without content: {v}"))
                        .to_string(),
                ),
                Some("chat") => return (tokens, v),
                _ => panic!("[{}] expected chat_token or chat, got {v}", self.user),
            }
        }
    }

    /// Reads frames up to a close frame; returns the frames before it and the close
    /// code/reason. Fails the test if the connection ends without a close frame.
    pub fn expect_close(&mut self) -> (Vec<Incoming>, Option<(u16, String)>) {
        let mut before = Vec::new();
        loop {
            match self.recv() {
                Incoming::Close(c) => return (before, c),
                Incoming::Gone(e) => panic!(
                    "[{}] connection ended without a close frame ({e}); frames before: {before:?}",
                    self.user
                ),
                other => before.push(other),
            }
        }
    }

    /// Closes cleanly (close frame, then waits for the server's close or EOF).
    pub fn close(mut self) {
        let _ = self.ws.close(None);
        let deadline = Instant::now() + READ_TIMEOUT;
        while Instant::now() < deadline {
            match self.ws.read() {
                Ok(_) => continue,
                Err(_) => break,
            }
        }
    }

    /// Drops the TCP connection without a close frame.
    pub fn drop_tcp(self) {
        let _ = self.ws.get_ref().shutdown(Shutdown::Both);
    }
}

/// Asserts the shape of an echo-agent `chat` reply.
pub fn assert_chat(v: &Value, user: &str, text: &str, reply_to: Option<&str>) {
    assert_eq!(v["type"], "chat", "{v}");
    assert_eq!(v["user_id"], user, "{v}");
    assert_eq!(v["who"], "AI", "{v}");
    assert_eq!(v["text"], text, "{v}");
    assert_eq!(v["content"], text, "{v}");
    assert!(
        v["when"].is_f64() || v["when"].is_u64(),
        "when is a number: {v}"
    );
    assert_eq!(v["why"]["input"], text, "{v}");
    assert!(v["why"]["intermediate_steps"].is_array(), "{v}");
    assert!(v["why"]["memory"].is_object(), "{v}");
    assert!(v["seq"].is_u64(), "seq is an unsigned integer: {v}");
    match reply_to {
        Some(id) => assert_eq!(v["reply_to"], id, "{v}"),
        None => assert!(v.get("reply_to").is_none(), "no reply_to expected: {v}"),
    }
}

/// The tokens the echo agent streams for `text`: each word with the whitespace before it
/// (the trailing whitespace with the last), so that they join to the text.
pub fn words(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut piece = String::new();
    let mut prev_space = true;
    for c in text.chars() {
        if c.is_whitespace() && !prev_space {
            out.push(std::mem::take(&mut piece));
        }
        prev_space = c.is_whitespace();
        piece.push(c);
    }
    match out.last_mut() {
        // Only whitespace after the last word: it stays with that word.
        Some(last) if prev_space => last.push_str(&piece),
        _ if piece.trim().is_empty() => {}
        _ => out.push(piece),
    }
    out
}

/// `seq` of a frame, which must have one.
pub fn seq(v: &Value) -> u64 {
    v["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("frame without seq: {v}"))
}

/// Asserts `v` is an error frame named `name`, with the fields the protocol promises.
pub fn assert_error(v: &Value, name: &str) {
    assert_eq!(v["type"], "error", "expected error {name}: {v}");
    assert_eq!(v["name"], name, "{v}");
    assert!(v["description"].is_string(), "error has a description: {v}");
    assert!(v.get("content").is_some(), "error has content: {v}");
    assert!(v["seq"].is_u64(), "error has a seq: {v}");
}

// ---------------------------------------------------------------------------------------
// Raw HTTP
// ---------------------------------------------------------------------------------------

/// A raw HTTP response, read until EOF.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl HttpResponse {
    /// Value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }

    /// Asserts the response carries `Connection: close`.
    pub fn assert_connection_close(&self) {
        let c = self.header("connection").unwrap_or_default();
        assert!(
            c.eq_ignore_ascii_case("close"),
            "expected `Connection: close`, got {:?} in {:?}",
            c,
            self.head
        );
    }
}

/// Sends `request` verbatim and reads the response until the server closes.
pub fn http_raw(addr: SocketAddr, request: &[u8]) -> HttpResponse {
    let mut s = tcp(addr);
    s.write_all(request).expect("write request");
    read_http_response(&mut s)
}

/// Reads an HTTP response until EOF (the server always sends `Connection: close`).
pub fn read_http_response(s: &mut TcpStream) -> HttpResponse {
    let mut buf = Vec::new();
    let deadline = Instant::now() + READ_TIMEOUT;
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                // A 101 is not followed by EOF: return it at once so the caller's
                // status assertion names the request.
                if buf.starts_with(b"HTTP/1.1 101") && buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!(
                    "server did not close the connection after its response; got so far: {:?}",
                    String::from_utf8_lossy(&buf)
                )
            }
            // A reset after the whole response is fine: the server closed.
            Err(_) if !buf.is_empty() => break,
            Err(e) => panic!("reading HTTP response: {e}"),
        }
        assert!(
            Instant::now() < deadline,
            "HTTP response not finished in time"
        );
    }
    parse_http_response(&buf)
}

fn parse_http_response(buf: &[u8]) -> HttpResponse {
    let text = String::from_utf8_lossy(buf).to_string();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of HTTP head in {text:?}"));
    let status_line = head.lines().next().unwrap_or("");
    assert!(
        status_line.starts_with("HTTP/1.1 ") || status_line.starts_with("HTTP/1.0 "),
        "bad status line {status_line:?}"
    );
    let status = status_line[9..12]
        .parse()
        .unwrap_or_else(|_| panic!("bad status line {status_line:?}"));
    HttpResponse {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

/// `GET path` with `Connection: close`.
pub fn http_get(addr: SocketAddr, path: &str) -> HttpResponse {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    http_raw(addr, req.as_bytes())
}

/// A WebSocket upgrade request for `path`.
pub fn upgrade_request(addr: SocketAddr, path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// Sends an upgrade request for `path` and reads the (non-101) response until EOF.
pub fn upgrade_refused(addr: SocketAddr, path: &str) -> HttpResponse {
    http_raw(addr, upgrade_request(addr, path).as_bytes())
}

// ---------------------------------------------------------------------------------------
// Raw WebSocket frames, for what tungstenite will not send (bad UTF-8, silent clients)
// ---------------------------------------------------------------------------------------

/// Does the upgrade on `stream` by hand; reads the response head byte by byte so no frame
/// byte is consumed. Fails the test unless the answer is 101.
pub fn raw_handshake(stream: &mut TcpStream, addr: SocketAddr, path: &str) {
    stream
        .write_all(upgrade_request(addr, path).as_bytes())
        .expect("write upgrade");
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut b) {
            Ok(0) => panic!("EOF during handshake: {:?}", String::from_utf8_lossy(&head)),
            Ok(_) => head.push(b[0]),
            Err(e) => panic!("handshake read: {e}"),
        }
    }
    let head = String::from_utf8_lossy(&head);
    assert!(
        head.starts_with("HTTP/1.1 101"),
        "expected 101, got {head:?}"
    );
    assert!(
        head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "bad Sec-WebSocket-Accept in {head:?}"
    );
}

/// Opens a TCP connection and upgrades it on `path` by hand.
pub fn raw_ws(addr: SocketAddr, path: &str) -> TcpStream {
    let mut s = tcp(addr);
    raw_handshake(&mut s, addr, path);
    s
}

/// Like [`raw_ws`], from a socket whose receive buffer is tiny (4 KiB), so that what the
/// server sends and the client leaves unread piles up unsent on the server's side.
pub fn tiny_window(addr: SocketAddr, path: &str) -> TcpStream {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
    sock.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    sock.connect_timeout(&addr.into(), Duration::from_secs(5))
        .expect("connect");
    let mut s: TcpStream = sock.into();
    s.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(READ_TIMEOUT)).unwrap();
    raw_handshake(&mut s, addr, path);
    s
}

/// Sends 30 KB chat messages on `s` (up to 400) without reading the answers, until the
/// server logs a slow consumer or a write fails: how many were sent.
pub fn flood_until_slow_consumer(server: &Server, s: &mut impl Write) -> usize {
    let word = "a".repeat(30_000);
    let mut sent = 0;
    for i in 0..400 {
        if server.has_log("slow consumer") {
            break;
        }
        let m = serde_json::json!({"text": word, "id": format!("s{i}")}).to_string();
        if let Err(e) = write_frame(s, OP_TEXT, m.as_bytes()) {
            eprintln!("write {i} failed ({e}); stop sending");
            break;
        }
        sent += 1;
    }
    sent
}

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Writes one final, masked client frame (RFC 6455 §5.2).
pub fn write_frame(s: &mut impl Write, opcode: u8, payload: &[u8]) -> std::io::Result<()> {
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    let mut f = Vec::with_capacity(payload.len() + 14);
    f.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n <= 0xffff => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    s.write_all(&f)
}

/// Reads one server frame: `(fin, opcode, payload)`; `Ok(None)` on EOF before a frame.
pub fn read_frame(s: &mut impl Read) -> std::io::Result<Option<(bool, u8, Vec<u8>)>> {
    let mut h = [0u8; 2];
    match s.read(&mut h[..1]) {
        Ok(0) => return Ok(None),
        Ok(_) => {}
        Err(e) => return Err(e),
    }
    s.read_exact(&mut h[1..])?;
    let fin = h[0] & 0x80 != 0;
    let opcode = h[0] & 0x0f;
    let masked = h[1] & 0x80 != 0;
    let len = match h[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            s.read_exact(&mut b)?;
            u16::from_be_bytes(b) as u64
        }
        127 => {
            let mut b = [0u8; 8];
            s.read_exact(&mut b)?;
            u64::from_be_bytes(b)
        }
        n => n as u64,
    };
    let mut mask = [0u8; 4];
    if masked {
        s.read_exact(&mut mask)?;
    }
    let mut payload = vec![0u8; len as usize];
    s.read_exact(&mut payload)?;
    if masked {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
    }
    Ok(Some((fin, opcode, payload)))
}

/// A whole message read by hand: data frames are reassembled, control frames returned as is.
#[derive(Debug)]
pub enum RawMsg {
    Text(Vec<u8>),
    Binary(Vec<u8>),
    Ping,
    Pong,
    /// Close code (if any) and reason.
    Close(Option<u16>, String),
    Eof,
}

/// Reads the next message by hand.
pub fn read_raw_msg(s: &mut impl Read) -> std::io::Result<RawMsg> {
    let mut data: Option<(u8, Vec<u8>)> = None;
    loop {
        let Some((fin, op, payload)) = read_frame(s)? else {
            return Ok(RawMsg::Eof);
        };
        match op {
            OP_PING => return Ok(RawMsg::Ping),
            OP_PONG => return Ok(RawMsg::Pong),
            OP_CLOSE => {
                let code =
                    (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                let reason = String::from_utf8_lossy(payload.get(2..).unwrap_or(&[])).to_string();
                return Ok(RawMsg::Close(code, reason));
            }
            OP_TEXT | OP_BINARY => data = Some((op, payload)),
            OP_CONT => data
                .as_mut()
                .expect("continuation without a start")
                .1
                .extend_from_slice(&payload),
            other => panic!("unknown opcode {other:#x}"),
        }
        if fin {
            let (op, payload) = data.take().expect("data frame");
            return Ok(if op == OP_TEXT {
                RawMsg::Text(payload)
            } else {
                RawMsg::Binary(payload)
            });
        }
    }
}

/// Reads (and discards) until the server closes the connection: true on EOF or reset,
/// false if it is still open at `deadline`.
pub fn read_until_eof(s: &mut TcpStream, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left.min(Duration::from_millis(500))))
            .unwrap();
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => return true, // reset: closed by the server
        }
    }
}

/// Polls `f` until it returns `Some`, or fails the test at `timeout`.
pub fn poll<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}
