//! An OpenAI-compatible upstream for `tests/openai.rs`, in process: a `TcpListener` with a
//! thread per connection, plain or TLS (rustls, server side), and awkward the way real
//! servers are. Each response is written in small slices of random size (a seeded
//! xorshift, so a failure reproduces with `STRAYCAT_MOCK_SEED`), every multi-byte UTF-8
//! character is split between two writes, a chunked body's chunk boundaries fall anywhere
//! (inside an event, inside a character), and the event stream has what real ones have:
//! `: keep-alive` comments, a role-only first chunk, empty deltas, a final usage chunk with
//! `"choices": []`.
//!
//! Every request is recorded (method, path, headers, the JSON body), and so are the number
//! of requests in flight at once and the connections the client closed, for tests to
//! assert on. Every socket has a timeout: a stuck test fails, it does not hang.
#![allow(dead_code)]

use serde_json::{Value, json};
use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long a mock connection waits on its client before it gives up on it.
const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// The largest request the mock reads.
const MAX_REQUEST_BYTES: usize = 4 << 20;

/// A tiny xorshift64* generator: no rand crate in the dev-dependencies, and a seed makes
/// every split point reproducible.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // Never zero (xorshift's fixed point), and nearby seeds give unrelated streams.
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// True once in `n` times on average.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }
}

/// The seed of a mock: `STRAYCAT_MOCK_SEED` when set (to reproduce a failure), else the
/// test's own.
pub fn seed(default: u64) -> u64 {
    std::env::var("STRAYCAT_MOCK_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(default)
}

/// One request as the mock received it.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Header fields in order, names as sent.
    pub headers: Vec<(String, String)>,
    pub raw_body: Vec<u8>,
    /// The body parsed as JSON; `Null` when it is not JSON.
    pub body: Value,
}

impl Request {
    /// The value of the one header field `name` (case-insensitive); fails the test if it
    /// is there more than once.
    pub fn header(&self, name: &str) -> Option<&str> {
        let all = self.headers_named(name);
        assert!(all.len() <= 1, "header {name} sent {} times", all.len());
        all.first().copied()
    }

    /// Every value of header `name`.
    pub fn headers_named(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The `messages` of the body.
    pub fn messages(&self) -> Vec<Value> {
        self.body["messages"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The text of the last message: its string `content`, or its text parts joined.
    pub fn last_text(&self) -> String {
        let msgs = self.messages();
        let Some(last) = msgs.last() else {
            return String::new();
        };
        match &last["content"] {
            Value::String(s) => s.clone(),
            Value::Array(parts) => parts
                .iter()
                .filter_map(|p| p["text"].as_str())
                .collect::<Vec<_>>()
                .join(" "),
            _ => String::new(),
        }
    }
}

/// How the end of a response body is told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// No `Content-Length`, no chunked: the body ends when the mock closes.
    Close,
    /// `Content-Length`.
    Length,
}

/// A piece of a response body.
#[derive(Clone, Debug)]
pub enum Seg {
    /// Bytes to send (one chunk or more, in chunked framing).
    Data(Vec<u8>),
    /// Wait this long before the next piece (a model generating).
    Pause(Duration),
}

/// How a response ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// As its framing says; with chunked and `Content-Length` framing the mock then keeps
    /// the connection open until the client closes it (which shows the client ends the
    /// turn on the end of the body, not on the end of the connection).
    Complete,
    /// Closed (FIN) before the body's end: a partial chunk, or short of the length.
    Cut,
    /// Reset (RST: `SO_LINGER` 0) before the body's end.
    Reset,
    /// As its framing says, then closed at once, over TLS without a close_notify (what
    /// many HTTPS servers do after a response with `Connection: close`).
    Abrupt,
}

/// What the mock answers to a request.
#[derive(Clone, Debug)]
pub enum Reply {
    Http {
        status: u16,
        reason: String,
        headers: Vec<(String, String)>,
        framing: Framing,
        body: Vec<Seg>,
        end: End,
        /// The whole response in one write (pauses ignored), so the client reads it and
        /// the close together.
        burst: bool,
    },
    /// These bytes, not HTTP at all, then close.
    Raw(Vec<u8>),
    /// Nothing: hold the connection until the client closes it.
    Hang,
}

impl Reply {
    /// `200 OK`, `text/event-stream`, with `body`.
    pub fn stream(framing: Framing, body: Vec<Seg>) -> Reply {
        Reply::Http {
            status: 200,
            reason: "OK".into(),
            headers: vec![
                (
                    "Content-Type".into(),
                    "text/event-stream; charset=utf-8".into(),
                ),
                ("Cache-Control".into(), "no-cache".into()),
                ("X-Accel-Buffering".into(), "no".into()),
            ],
            framing,
            body,
            end: End::Complete,
            burst: false,
        }
    }

    /// A complete response with `Content-Length`.
    pub fn status(status: u16, reason: &str, content_type: &str, body: &str) -> Reply {
        Reply::Http {
            status,
            reason: reason.into(),
            headers: vec![("Content-Type".into(), content_type.into())],
            framing: Framing::Length,
            body: vec![Seg::Data(body.as_bytes().to_vec())],
            end: End::Complete,
            burst: false,
        }
    }

    /// The same reply, ended another way.
    pub fn ending(mut self, how: End) -> Reply {
        if let Reply::Http { end, .. } = &mut self {
            *end = how;
        }
        self
    }

    /// The same reply, written in one piece.
    pub fn in_one_write(mut self) -> Reply {
        if let Reply::Http { burst, .. } = &mut self {
            *burst = true;
        }
        self
    }

    /// The same reply with another framing.
    pub fn framed(mut self, f: Framing) -> Reply {
        if let Reply::Http { framing, .. } = &mut self {
            *framing = f;
        }
        self
    }
}

/// Builds an event stream of chat-completion chunks.
pub struct Sse {
    segs: Vec<Seg>,
    /// Line end: `\n` (OpenAI, llama.cpp) or `\r\n`.
    eol: &'static str,
    n: usize,
}

impl Default for Sse {
    fn default() -> Self {
        Self::new()
    }
}

impl Sse {
    pub fn new() -> Sse {
        Sse {
            segs: Vec::new(),
            eol: "\n",
            n: 0,
        }
    }

    /// Lines end with CRLF.
    pub fn crlf(mut self) -> Sse {
        self.eol = "\r\n";
        self
    }

    /// Raw text, sent as it is.
    pub fn raw(mut self, s: &str) -> Sse {
        self.segs.push(Seg::Data(s.as_bytes().to_vec()));
        self
    }

    /// One event whose data is `data` (already a line's worth: no line end inside).
    pub fn event(self, data: &str) -> Sse {
        let eol = self.eol;
        self.raw(&format!("data: {data}{eol}{eol}"))
    }

    /// A chunk with this `choices` array.
    fn chunk(mut self, choices: Value) -> Sse {
        self.n += 1;
        let c = json!({
            "id": "chatcmpl-mock",
            "object": "chat.completion.chunk",
            "created": 1_763_900_000,
            "model": "test",
            "system_fingerprint": "fp_mock",
            "choices": choices,
        });
        self.event(&c.to_string())
    }

    /// The role-only first chunk (`content` null, as llama.cpp sends it).
    pub fn role(self) -> Sse {
        self.chunk(
            json!([{"index": 0, "delta": {"role": "assistant", "content": null},
            "logprobs": null, "finish_reason": null}]),
        )
    }

    /// A piece of the answer.
    pub fn token(self, content: &str) -> Sse {
        self.chunk(json!([{"index": 0, "delta": {"content": content},
            "logprobs": null, "finish_reason": null}]))
    }

    /// A chunk with an empty delta.
    pub fn empty_delta(self) -> Sse {
        self.chunk(json!([{"index": 0, "delta": {}, "finish_reason": null}]))
    }

    /// The chunk with the `finish_reason` and an empty delta.
    pub fn finish(self, reason: &str) -> Sse {
        self.chunk(json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": reason}]))
    }

    /// The final usage chunk (`stream_options.include_usage`): no choices.
    pub fn usage(self) -> Sse {
        let c = json!({
            "id": "chatcmpl-mock",
            "object": "chat.completion.chunk",
            "created": 1_763_900_000,
            "model": "test",
            "choices": [],
            "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19},
        });
        self.event(&c.to_string())
    }

    /// A `: keep-alive` comment.
    pub fn comment(self) -> Sse {
        let eol = self.eol;
        self.raw(&format!(": keep-alive{eol}{eol}"))
    }

    /// `data: [DONE]`.
    pub fn done(self) -> Sse {
        self.event("[DONE]")
    }

    pub fn pause(mut self, d: Duration) -> Sse {
        self.segs.push(Seg::Pause(d));
        self
    }

    pub fn segs(self) -> Vec<Seg> {
        self.segs
    }
}

/// The whole awkward stream of an answer made of `tokens`: a comment first, the role-only
/// chunk, the pieces with comments, empty deltas and empty contents, an `id:` line and an
/// event whose data spans two `data:` lines in between, the finish chunk, the usage chunk,
/// `[DONE]`.
pub fn awkward_answer(tokens: &[&str], crlf: bool) -> Vec<Seg> {
    let mut s = if crlf { Sse::new().crlf() } else { Sse::new() };
    let eol = s.eol;
    s = s.comment().role().comment();
    for (i, t) in tokens.iter().enumerate() {
        s = match i % 4 {
            // Legal SSE that real servers send now and then: an `id:` field.
            1 => s.raw(&format!("id: {i}{eol}")).token(t),
            // One event's data on two `data:` lines (joined with a line feed: still JSON).
            2 => {
                let content = serde_json::to_string(t).unwrap();
                s.raw(&format!(
                    "data: {{\"choices\":[{{\"index\":0,{eol}\
                     data: \"delta\":{{\"content\":{content}}},\"finish_reason\":null}}]}}{eol}{eol}"
                ))
            }
            3 => s.empty_delta().token("").token(t).comment(),
            _ => s.token(t),
        };
    }
    s.finish("stop").usage().done().segs()
}

/// What the mock has seen.
#[derive(Default)]
struct State {
    requests: Vec<Request>,
    /// Requests being answered now.
    active: usize,
    max_active: usize,
    /// Connections whose client closed them while the mock waited for that.
    peer_closed: usize,
    connections: usize,
}

struct Shared {
    state: Mutex<State>,
    cv: Condvar,
    handler: Box<dyn Fn(&Request) -> Reply + Send + Sync>,
    tls: Option<Arc<rustls::ServerConfig>>,
    seed: u64,
    stop: AtomicBool,
}

/// A running mock upstream; stops accepting on drop.
pub struct Mock {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Mock {
    /// A plain HTTP mock on 127.0.0.1.
    pub fn start(seed: u64, handler: impl Fn(&Request) -> Reply + Send + Sync + 'static) -> Mock {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the mock");
        Mock::serve(listener, None, seed, handler)
    }

    /// A mock on `listener`, speaking TLS with `tls` when given.
    pub fn serve(
        listener: TcpListener,
        tls: Option<Arc<rustls::ServerConfig>>,
        seed: u64,
        handler: impl Fn(&Request) -> Reply + Send + Sync + 'static,
    ) -> Mock {
        let addr = listener.local_addr().unwrap();
        eprintln!("mock upstream on {addr}, seed {seed} (set STRAYCAT_MOCK_SEED to change it)");
        let shared = Arc::new(Shared {
            state: Mutex::default(),
            cv: Condvar::new(),
            handler: Box::new(handler),
            tls,
            seed,
            stop: AtomicBool::new(false),
        });
        let s = Arc::clone(&shared);
        std::thread::spawn(move || {
            for (i, stream) in listener.incoming().enumerate() {
                if s.stop.load(Ordering::Acquire) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let s = Arc::clone(&s);
                s.state.lock().unwrap().connections += 1;
                std::thread::spawn(move || {
                    let rng = Rng::new(s.seed ^ (i as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03));
                    serve_conn(&s, stream, rng);
                });
            }
        });
        Mock { addr, shared }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR/v1`.
    pub fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Every request so far, in the order they were read.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.state.lock().unwrap().requests.clone()
    }

    /// The most requests that were being answered at once.
    pub fn max_active(&self) -> usize {
        self.shared.state.lock().unwrap().max_active
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.state.lock().unwrap().connections
    }

    /// Waits until `pred` holds for (requests, active, peer_closed); false at `timeout`.
    fn wait(&self, timeout: Duration, pred: impl Fn(&State) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.state.lock().unwrap();
        loop {
            if pred(&st) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self.shared.cv.wait_timeout(st, deadline - now).unwrap().0;
        }
    }

    /// Waits for `n` requests; fails the test at `timeout`.
    pub fn wait_requests(&self, n: usize, timeout: Duration) -> Vec<Request> {
        assert!(
            self.wait(timeout, |s| s.requests.len() >= n),
            "the mock did not get {n} requests within {timeout:?} (got {})",
            self.requests().len()
        );
        self.requests()
    }

    /// Waits until `n` requests are being answered at once; false at `timeout`.
    pub fn wait_active(&self, n: usize, timeout: Duration) -> bool {
        self.wait(timeout, |s| s.active >= n)
    }

    /// Waits until the client has closed `n` connections the mock was holding open.
    pub fn wait_peer_closed(&self, n: usize, timeout: Duration) -> bool {
        self.wait(timeout, |s| s.peer_closed >= n)
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        // Wakes the accept loop so that it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

/// The connection, plain or TLS.
enum Conn {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ServerConnection, TcpStream>>),
}

impl Conn {
    fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(s) => &s.sock,
        }
    }

    /// The TLS close_notify, for a body that ends with the connection.
    fn close_notify(&mut self) {
        if let Conn::Tls(s) = self {
            s.conn.send_close_notify();
            let _ = s.flush();
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
        }
    }
}

fn serve_conn(shared: &Shared, stream: TcpStream, mut rng: Rng) {
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_nodelay(true);
    let mut conn = match &shared.tls {
        None => Conn::Plain(stream),
        Some(config) => {
            let tls = rustls::ServerConnection::new(Arc::clone(config)).expect("TLS server");
            Conn::Tls(Box::new(rustls::StreamOwned::new(tls, stream)))
        }
    };
    // EOF, a TLS handshake the client refused, garbage: nothing to answer.
    let Some(req) = read_request(&mut conn) else {
        return;
    };
    let reply = (shared.handler)(&req);
    {
        let mut st = shared.state.lock().unwrap();
        st.requests.push(req);
        st.active += 1;
        st.max_active = st.max_active.max(st.active);
        shared.cv.notify_all();
    }
    // The request stops counting as in flight just before the last piece of its body is
    // written: the client cannot have finished it (and started another) before that.
    let mut released = false;
    let mut release = || {
        if !released {
            released = true;
            let mut st = shared.state.lock().unwrap();
            st.active -= 1;
            shared.cv.notify_all();
        }
    };
    let after = write_reply(&mut conn, reply, &mut rng, &mut release);
    if !matches!(after, Ok(After::Hang)) {
        release();
    }
    match after {
        Ok(After::WaitForClient | After::Hang) => {
            let closed = wait_for_client_close(&mut conn);
            release();
            if closed {
                let mut st = shared.state.lock().unwrap();
                st.peer_closed += 1;
                shared.cv.notify_all();
            }
        }
        Ok(After::Close) => {
            conn.close_notify();
            drop(conn);
        }
        Ok(After::CloseNoNotify) => drop(conn),
        Ok(After::Reset) => {
            let _ = socket2::SockRef::from(conn.tcp()).set_linger(Some(Duration::ZERO));
            drop(conn);
        }
        // The client closed while we wrote (after the `[DONE]` it needed, the rest of
        // the body may meet a closed socket): that counts as its close.
        Err(e) => {
            let closed = matches!(
                e.kind(),
                ErrorKind::BrokenPipe | ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
            );
            if closed {
                let mut st = shared.state.lock().unwrap();
                st.peer_closed += 1;
                shared.cv.notify_all();
            }
        }
    }
}

/// Reads until the client closes (EOF, reset, a TLS connection dropped without
/// close_notify); false if it is still open after [`IO_TIMEOUT`].
fn wait_for_client_close(conn: &mut Conn) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false;
            }
            Err(_) => return true,
        }
    }
}

/// Reads one request: the head, then `Content-Length` bytes of body.
fn read_request(conn: &mut Conn) -> Option<Request> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_REQUEST_BYTES {
            return None;
        }
        match conn.read(&mut chunk) {
            Ok(0) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return None,
        }
    };
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(&buf[..head_end]) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return None,
    }
    let method = parsed.method?.to_string();
    let path = parsed.path?.to_string();
    let headers: Vec<(String, String)> = parsed
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_string(),
                String::from_utf8_lossy(h.value).to_string(),
            )
        })
        .collect();
    let length: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        match conn.read(&mut chunk) {
            Ok(0) => return None,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return None,
        }
    }
    let parsed_body = serde_json::from_slice(&body).unwrap_or(Value::Null);
    Some(Request {
        method,
        path,
        headers,
        raw_body: body,
        body: parsed_body,
    })
}

/// What the connection does once the reply is written.
enum After {
    /// Keep it open until the client closes it.
    WaitForClient,
    /// Nothing was sent: keep it open until the client closes it, in flight all along.
    Hang,
    /// Close it (after a TLS close_notify).
    Close,
    /// Close it without a TLS close_notify.
    CloseNoNotify,
    /// Reset it.
    Reset,
}

/// Writes `bytes` in slices of random size, each its own write (and TCP segment, with
/// `TCP_NODELAY`); every multi-byte UTF-8 character is split after its first byte, with a
/// short pause, so the client reads the halves apart.
fn send(conn: &mut Conn, rng: &mut Rng, bytes: &[u8]) -> io::Result<()> {
    const MAX_SLICE: [usize; 6] = [1, 2, 5, 13, 40, 200];
    let mut pos = 0;
    while pos < bytes.len() {
        let max = MAX_SLICE[rng.below(MAX_SLICE.len())];
        let mut end = (pos + 1 + rng.below(max)).min(bytes.len());
        // A UTF-8 lead byte in the slice: end the slice right after it.
        let split_char = match (pos..end).find(|&i| bytes[i] >= 0xC0) {
            Some(i) => {
                end = i + 1;
                true
            }
            None => false,
        };
        conn.write_all(&bytes[pos..end])?;
        conn.flush()?;
        pos = end;
        if split_char {
            std::thread::sleep(Duration::from_millis(1));
        } else if rng.one_in(6) {
            std::thread::sleep(Duration::from_micros(100 + rng.below(600) as u64));
        }
    }
    Ok(())
}

/// `data` as one to three chunks of random sizes (boundaries anywhere, even inside a
/// character), hex digits in either case.
fn chunked(rng: &mut Rng, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 32);
    let mut rest = data;
    while !rest.is_empty() {
        let n = if rng.one_in(2) {
            rest.len()
        } else {
            1 + rng.below(rest.len())
        };
        let (this, tail) = rest.split_at(n);
        let size = if rng.one_in(2) {
            format!("{n:x}")
        } else {
            format!("{n:X}")
        };
        out.extend_from_slice(size.as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(this);
        out.extend_from_slice(b"\r\n");
        rest = tail;
    }
    out
}

fn write_reply(
    conn: &mut Conn,
    reply: Reply,
    rng: &mut Rng,
    release: &mut dyn FnMut(),
) -> io::Result<After> {
    let (status, reason, headers, framing, body, end, burst) = match reply {
        Reply::Raw(bytes) => {
            send(conn, rng, &bytes)?;
            return Ok(After::Close);
        }
        Reply::Hang => return Ok(After::Hang),
        Reply::Http {
            status,
            reason,
            headers,
            framing,
            body,
            end,
            burst,
        } => (status, reason, headers, framing, body, end, burst),
    };
    let total: usize = body
        .iter()
        .map(|s| match s {
            Seg::Data(d) => d.len(),
            Seg::Pause(_) => 0,
        })
        .sum();
    let mut head = format!("HTTP/1.1 {status} {reason}\r\nServer: mock-openai\r\n");
    for (k, v) in &headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    match framing {
        Framing::Chunked => head.push_str("Transfer-Encoding: chunked\r\n"),
        Framing::Length => {
            // Cut short: announce more than will come.
            let announced = if matches!(end, End::Complete | End::Abrupt) {
                total
            } else {
                total + 50
            };
            head.push_str(&format!("Content-Length: {announced}\r\n"));
        }
        Framing::Close => head.push_str("Connection: close\r\n"),
    }
    head.push_str("\r\n");
    // In one write: everything gathers here and goes at the end.
    let mut gathered = Vec::new();
    let mut emit = |conn: &mut Conn, rng: &mut Rng, bytes: &[u8]| {
        if burst {
            gathered.extend_from_slice(bytes);
            Ok(())
        } else {
            send(conn, rng, bytes)
        }
    };
    emit(conn, rng, head.as_bytes())?;
    let last = body
        .iter()
        .rposition(|s| matches!(s, Seg::Data(d) if !d.is_empty()));
    for (i, seg) in body.into_iter().enumerate() {
        if Some(i) == last && !burst {
            release();
        }
        match seg {
            Seg::Pause(d) if !burst => std::thread::sleep(d),
            Seg::Pause(_) => {}
            Seg::Data(d) if d.is_empty() => {}
            Seg::Data(d) => {
                let bytes = match framing {
                    Framing::Chunked => chunked(rng, &d),
                    _ => d,
                };
                emit(conn, rng, &bytes)?;
            }
        }
    }
    let after = match (end, framing) {
        (End::Complete | End::Abrupt, Framing::Chunked) => {
            emit(conn, rng, b"0\r\n\r\n")?;
            if end == End::Abrupt {
                After::CloseNoNotify
            } else {
                After::WaitForClient
            }
        }
        (End::Complete, Framing::Length) => After::WaitForClient,
        (End::Complete, Framing::Close) => After::Close,
        (End::Abrupt, _) => After::CloseNoNotify,
        (End::Cut, Framing::Chunked) => {
            // A chunk that announces 64 bytes and brings 14.
            emit(conn, rng, b"40\r\ndata: {\"cho")?;
            After::CloseNoNotify
        }
        (End::Cut, _) => After::CloseNoNotify,
        (End::Reset, _) => After::Reset,
    };
    if burst {
        release();
        conn.write_all(&gathered)?;
        conn.flush()?;
    }
    Ok(after)
}
