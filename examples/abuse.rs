//! A bounded abuse soak against a straycat server on loopback (`bench/abuse.sh` runs the
//! whole thing): well-behaved users chat while attackers do everything a hostile client
//! can, and the users' reply times and the server's memory, file descriptors and CPU are
//! measured before, during and after the attack.
//!
//! ```text
//! cargo build --release --bin straycat --example abuse
//! target/release/straycat --listen 127.0.0.1:19400 --log-level warn 2>server.log &
//! target/release/examples/abuse --addr 127.0.0.1:19400 --pid $! > abuse.json
//! ```
//!
//! Three phases: `baseline` (well-behaved users only), `attack` (the attackers too),
//! `after` (the attackers gone, the users still chatting). A short unmeasured warm-up
//! before the baseline lets the users connect.
//!
//! Well-behaved users (`--users`, from 127.0.0.1, `/ws/good{i}`, tungstenite's blocking
//! client, one thread each) send one message at a time, wait for its `chat` (matched by
//! `reply_to`), think `--think-ms` (±25 %), and reconnect if the socket closes. A reply
//! counts in the phase its message was sent in; no reply within `--reply-timeout-secs`
//! is an error, as is any `error` frame, a close or a failed connect.
//!
//! Attackers connect from other loopback source addresses (127.0.0.2 … 127.0.0.9, one per
//! kind), so per-address limits can tell them from the users on 127.0.0.1:
//! - `slowloris` (.2): `--slowloris` sockets trickle an HTTP head a byte a second;
//! - `silent` (.3): `--silent` sockets connect and send nothing;
//! - `slow_consumer` (.4): `--slow-consumers` upgraded sockets with a 4 KiB receive
//!   buffer send a 20 KB message every 100 ms and never read (the server owes them about
//!   1 MB of replies a second);
//! - `ping_flood` (.5): `--ping-floods` upgraded sockets send `--pings-per-sec` pings each
//!   and read the pongs;
//! - `storm` (.6): `--storm-threads` threads each reconnect `--storm-rate` times a second,
//!   alternately with one user id (the server closes the older socket with `replaced`) and
//!   with a fresh id each time;
//! - `garbage` (.7): random bytes after the upgrade and instead of a request, invalid
//!   UTF-8, unmasked frames;
//! - `oversize` (.8): a frame announcing 16 MiB, a fragmented message past 64 KiB, a
//!   20 KiB request head, a head of 40 headers;
//! - `invalid_json` (.9): `--invalid-json` upgraded sockets send `--invalid-per-sec`
//!   messages a second that are not valid chat messages, and read the errors.
//!
//! Every attacker counts what the server answered (HTTP statuses, close codes, error
//! names, resets) and how long its sockets lived. A sampler thread reads the server's
//! `VmRSS`, `VmHWM`, `RssAnon` (`/proc/PID/status`), open descriptors (`/proc/PID/fd`) and
//! CPU time (`utime`+`stime` of `/proc/PID/stat`) every second; `/metrics` is read at each
//! phase boundary. Output: progress on stderr, one JSON object on stdout. Loopback only;
//! every wait is bounded and everything stops by itself at the end of its phase.

use serde_json::{Map, Value, json};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::process::ExitCode;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};
use tungstenite::Message;

/// Unmeasured time for the users to connect before the baseline starts.
const WARMUP: Duration = Duration::from_secs(2);
/// Users keep chatting (uncounted) this long past the end, so that the last readings of
/// the server see them still connected.
const USER_TAIL: Duration = Duration::from_secs(1);
/// Every connect and HTTP answer an attacker waits for.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Bytes of a server's frames an attacker keeps while parsing (past it: dropped).
const MAX_FRAME_BUF: usize = 1 << 20;
/// Reply times kept per phase (a run at the defaults makes a few thousand).
const MAX_LATENCIES: usize = 1_000_000;
/// Bytes of each word of a slow consumer's message.
const SLOW_WORD_BYTES: usize = 400;
/// The largest `/metrics` answer read.
const MAX_METRICS_BYTES: usize = 1 << 20;
/// The request head every raw upgrade sends (the key is RFC 6455's sample; the accept
/// value is not checked: attackers do not care).
const UPGRADE_HEAD: &str = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";

const USAGE: &str = "usage: abuse --addr 127.0.0.1:PORT --pid PID [options]
  --baseline-secs S      well-behaved users only (15)
  --attack-secs S        attackers and users (45)
  --after-secs S         users only, attackers gone (15)
  --users N              well-behaved users (50)
  --think-ms MS          a user's pause between a reply and its next message (2000)
  --reply-timeout-secs S a reply later than this is an error (10)
  --slowloris N          sockets trickling a request head (96)
  --silent N             sockets that send nothing (96)
  --slow-consumers N     upgraded sockets that never read (32)
  --slow-words N         400-byte words of each slow consumer's message (50)
  --ping-floods N        upgraded sockets sending pings (8)
  --pings-per-sec N      pings per flooding socket (5000)
  --storm-threads N      reconnecting threads (2)
  --storm-rate N         reconnects per second per storm thread (20)
  --garbage-rate N       garbage connections per second (10; 0: none)
  --oversize-rate N      oversize attempts per second (5; 0: none)
  --invalid-json N       upgraded sockets sending invalid messages (8)
  --invalid-per-sec N    invalid messages per second per socket (100)
  --clk-tck N            clock ticks per second of /proc/PID/stat (100)";

/// The soak's settings (see `USAGE`).
#[derive(Clone)]
struct Opts {
    addr: SocketAddr,
    pid: u32,
    baseline: Duration,
    attack: Duration,
    after: Duration,
    users: usize,
    think_ms: u64,
    reply_timeout: Duration,
    slowloris: usize,
    silent: usize,
    slow_consumers: usize,
    slow_words: usize,
    ping_floods: usize,
    pings_per_sec: usize,
    storm_threads: usize,
    storm_rate: u64,
    garbage_rate: u64,
    oversize_rate: u64,
    invalid_json: usize,
    invalid_per_sec: usize,
    clk_tck: u64,
}

fn parse_opts() -> Result<Opts, String> {
    let mut o = Opts {
        addr: SocketAddr::from(([127, 0, 0, 1], 1865)),
        pid: 0,
        baseline: Duration::from_secs(15),
        attack: Duration::from_secs(45),
        after: Duration::from_secs(15),
        users: 50,
        think_ms: 2000,
        reply_timeout: Duration::from_secs(10),
        slowloris: 96,
        silent: 96,
        slow_consumers: 32,
        slow_words: 50,
        ping_floods: 8,
        pings_per_sec: 5000,
        storm_threads: 2,
        storm_rate: 20,
        garbage_rate: 10,
        oversize_rate: 5,
        invalid_json: 8,
        invalid_per_sec: 100,
        clk_tck: 100,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--help" || a == "-h" {
            return Err("the soak's options:".into());
        }
        let v = args.next().ok_or_else(|| format!("{a} needs a value"))?;
        let n = || {
            v.parse::<u64>()
                .map_err(|_| format!("{a}: not a number: {v}"))
        };
        let secs = || n().map(Duration::from_secs);
        match a.as_str() {
            "--addr" => o.addr = v.parse().map_err(|_| format!("--addr: {v}"))?,
            "--pid" => o.pid = n()? as u32,
            "--baseline-secs" => o.baseline = secs()?,
            "--attack-secs" => o.attack = secs()?,
            "--after-secs" => o.after = secs()?,
            "--users" => o.users = n()? as usize,
            "--think-ms" => o.think_ms = n()?,
            "--reply-timeout-secs" => o.reply_timeout = secs()?.max(Duration::from_secs(1)),
            "--slowloris" => o.slowloris = n()? as usize,
            "--silent" => o.silent = n()? as usize,
            "--slow-consumers" => o.slow_consumers = n()? as usize,
            "--slow-words" => o.slow_words = n()? as usize,
            "--ping-floods" => o.ping_floods = n()? as usize,
            "--pings-per-sec" => o.pings_per_sec = n()? as usize,
            "--storm-threads" => o.storm_threads = n()? as usize,
            "--storm-rate" => o.storm_rate = n()?,
            "--garbage-rate" => o.garbage_rate = n()?,
            "--oversize-rate" => o.oversize_rate = n()?,
            "--invalid-json" => o.invalid_json = n()? as usize,
            "--invalid-per-sec" => o.invalid_per_sec = n()? as usize,
            "--clk-tck" => o.clk_tck = n()?.max(1),
            _ => return Err(format!("unknown option {a}")),
        }
    }
    if !o.addr.ip().is_loopback() {
        return Err("the soak only targets loopback addresses".into());
    }
    if o.pid == 0 {
        return Err("--pid of the straycat server is required".into());
    }
    let total = o.slowloris + o.silent + o.slow_consumers + o.ping_floods + o.invalid_json;
    if o.users + total > 2000 {
        return Err(format!(
            "{} sockets at once is past this soak's bound of 2000",
            o.users + total
        ));
    }
    Ok(o)
}

/// The phases' boundaries, fixed before any thread starts.
struct Plan {
    /// Baseline start: the end of the warm-up.
    t0: Instant,
    /// Attack start.
    attack: Instant,
    /// Attack end, the after phase's start: attackers stop here.
    attack_end: Instant,
    /// The end of the run: users stop here.
    end: Instant,
}

const PHASES: [&str; 3] = ["baseline", "attack", "after"];

impl Plan {
    /// The phase an instant falls in (`None`: the warm-up or past the end).
    fn phase(&self, t: Instant) -> Option<usize> {
        if t < self.t0 || t >= self.end {
            None
        } else if t < self.attack {
            Some(0)
        } else if t < self.attack_end {
            Some(1)
        } else {
            Some(2)
        }
    }
}

/// What the well-behaved users saw in one phase.
#[derive(Default)]
struct Good {
    sent: u64,
    /// Reply times, send to the matching `chat` (µs).
    latencies_us: Vec<u64>,
    /// Errors and disconnects by kind (`timeout`, `close_1011`, `error_Busy`, …).
    errors: BTreeMap<String, u64>,
}

/// Counters shared by every thread.
struct Shared {
    opts: Opts,
    plan: Plan,
    good: Mutex<[Good; 3]>,
    /// Attackers' counters, `kind.event` → count (or a maximum for `…max_ms` keys).
    tally: Mutex<BTreeMap<String, u64>>,
}

/// A lock that survives a panicked holder (the counters stay usable).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn count(&self, kind: &str, event: &str) {
        *lock(&self.tally)
            .entry(format!("{kind}.{event}"))
            .or_default() += 1;
    }

    /// Records a socket's lifetime: its sum, count and maximum.
    fn lifetime(&self, kind: &str, since: Instant) {
        let ms = since.elapsed().as_millis() as u64;
        let mut t = lock(&self.tally);
        *t.entry(format!("{kind}.lifetime_sum_ms")).or_default() += ms;
        *t.entry(format!("{kind}.lifetimes")).or_default() += 1;
        let max = t.entry(format!("{kind}.lifetime_max_ms")).or_default();
        *max = (*max).max(ms);
    }

    fn good_error(&self, phase: Option<usize>, what: String) {
        if let Some(p) = phase {
            *lock(&self.good)[p].errors.entry(what).or_default() += 1;
        }
    }

    fn attacking(&self) -> bool {
        Instant::now() < self.plan.attack_end
    }
}

/// Sleeps until `t` or the attack's end, whichever comes first.
fn sleep_until(shared: &Shared, t: Instant) {
    let until = t.min(shared.plan.attack_end);
    let now = Instant::now();
    if until > now {
        thread::sleep(until - now);
    }
}

/// A small xorshift generator: attackers' garbage needs no quality.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

// ---------------------------------------------------------------- well-behaved users

fn good_user(shared: Arc<Shared>, i: usize) {
    let o = &shared.opts;
    let url = format!("ws://{}/ws/good{i}", o.addr);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((i as u64 + 1) * 0x1000_0001));
    let mut ws = None;
    let mut n = 0u64;
    while Instant::now() < shared.plan.end + USER_TAIL {
        let socket = match ws.as_mut() {
            Some(s) => s,
            None => {
                let phase = shared.plan.phase(Instant::now());
                match good_connect(&url, o.addr, o.reply_timeout) {
                    Ok(s) => ws.insert(s),
                    Err(e) => {
                        shared.good_error(phase, e);
                        thread::sleep(Duration::from_millis(500));
                        continue;
                    }
                }
            }
        };
        n += 1;
        let id = format!("g{n}");
        let text = format!("hello from good{i} number {n}");
        let sent_at = Instant::now();
        let phase = shared.plan.phase(sent_at);
        let msg = json!({"text": text, "id": id}).to_string();
        if let Err(e) = socket.send(Message::text(msg)) {
            shared.good_error(phase, format!("send_{}", ws_error_kind(&e)));
            ws = None;
            continue;
        }
        if let Some(p) = phase {
            lock(&shared.good)[p].sent += 1;
        }
        let deadline = sent_at + o.reply_timeout;
        loop {
            if Instant::now() >= deadline {
                shared.good_error(phase, "timeout".into());
                ws = None;
                break;
            }
            match socket.read() {
                Ok(Message::Text(t)) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap_or(Value::Null);
                    if v["reply_to"] != id.as_str() {
                        continue; // a token, or a frame held from before a reconnect
                    }
                    match v["type"].as_str() {
                        Some("chat") => {
                            let us = sent_at.elapsed().as_micros() as u64;
                            if let Some(p) = phase {
                                let mut g = lock(&shared.good);
                                if g[p].latencies_us.len() < MAX_LATENCIES {
                                    g[p].latencies_us.push(us);
                                }
                            }
                            break;
                        }
                        Some("error") => {
                            let name = v["name"].as_str().unwrap_or("?");
                            shared.good_error(phase, format!("error_{name}"));
                            break;
                        }
                        _ => {}
                    }
                }
                Ok(Message::Close(c)) => {
                    let code = c.map(|c| u16::from(c.code)).unwrap_or(0);
                    shared.good_error(phase, format!("close_{code}"));
                    ws = None;
                    break;
                }
                Ok(_) => {}
                Err(e) => {
                    shared.good_error(phase, format!("read_{}", ws_error_kind(&e)));
                    ws = None;
                    break;
                }
            }
        }
        // Think ±25 %, but not past the end.
        let jitter = o.think_ms / 2;
        let think = o.think_ms - jitter / 2 + rng.next() % (jitter + 1);
        let wake = Instant::now() + Duration::from_millis(think);
        let wake = wake.min(shared.plan.end + USER_TAIL);
        let now = Instant::now();
        if wake > now {
            thread::sleep(wake - now);
        }
    }
}

type GoodWs = tungstenite::WebSocket<TcpStream>;

fn good_connect(url: &str, addr: SocketAddr, timeout: Duration) -> Result<GoodWs, String> {
    let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .map_err(|e| format!("connect_{:?}", e.kind()))?;
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    match tungstenite::client(url, stream) {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r))) => {
            Err(format!("http_{}", r.status().as_u16()))
        }
        Err(tungstenite::HandshakeError::Failure(e)) => {
            Err(format!("handshake_{}", ws_error_kind(&e)))
        }
        Err(tungstenite::HandshakeError::Interrupted(_)) => Err("handshake_timeout".into()),
    }
}

fn ws_error_kind(e: &tungstenite::Error) -> String {
    match e {
        tungstenite::Error::Io(e) => format!("{:?}", e.kind()),
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => "closed".into(),
        tungstenite::Error::Protocol(_) => "protocol".into(),
        other => format!("{other:?}").chars().take(24).collect(),
    }
}

// ---------------------------------------------------------------- raw client side

/// The loopback source address of an attacker kind (127.0.0.2 … 127.0.0.9).
fn source(kind: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 2 + (kind % 8) as u8)
}

/// A TCP connection from `src` (bound before connecting), with an optional receive
/// buffer set before the handshake so that the advertised window stays small.
fn connect_from(
    src: Ipv4Addr,
    addr: SocketAddr,
    rcvbuf: Option<usize>,
) -> Result<TcpStream, String> {
    let err = |e: io::Error| format!("connect_{:?}", e.kind());
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).map_err(err)?;
    if let Some(n) = rcvbuf {
        socket.set_recv_buffer_size(n).map_err(err)?;
    }
    socket
        .bind(&SockAddr::from(SocketAddr::new(IpAddr::V4(src), 0)))
        .map_err(err)?;
    socket
        .connect_timeout(&SockAddr::from(addr), IO_TIMEOUT)
        .map_err(err)?;
    let stream = TcpStream::from(socket);
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// What a server's answer to a raw request was.
fn io_outcome(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "timeout".into(),
        io::ErrorKind::ConnectionReset => "reset".into(),
        io::ErrorKind::BrokenPipe => "broken_pipe".into(),
        k => format!("{k:?}"),
    }
}

/// Reads an HTTP response head (bounded); returns `http_NNN` and the bytes after it.
fn read_status(stream: &mut TcpStream) -> (String, Vec<u8>) {
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let code = head.split_whitespace().nth(1).unwrap_or("?").to_owned();
            return (format!("http_{code}"), buf[end + 4..].to_vec());
        }
        if buf.len() > 16 * 1024 {
            return ("http_head_too_long".into(), Vec::new());
        }
        match stream.read(&mut chunk) {
            Ok(0) => return ("eof".into(), Vec::new()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return (io_outcome(&e), Vec::new()),
        }
    }
}

/// Upgrades `path` from `src`: the socket and any bytes read past the 101, or what the
/// server answered instead (`http_429`, `connect_…`).
fn upgrade(
    src: Ipv4Addr,
    addr: SocketAddr,
    path: &str,
    rcvbuf: Option<usize>,
) -> Result<(TcpStream, Vec<u8>), String> {
    let mut stream = connect_from(src, addr, rcvbuf)?;
    let head = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{UPGRADE_HEAD}\r\n");
    stream
        .write_all(head.as_bytes())
        .map_err(|e| format!("write_{}", io_outcome(&e)))?;
    match read_status(&mut stream) {
        (s, rest) if s == "http_101" => Ok((stream, rest)),
        (s, _) => Err(s),
    }
}

/// One client frame (RFC 6455 §5.2), masked as a client's must be (§5.3).
fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    frame_header(&mut out, fin, opcode, payload.len() as u64, true);
    let key = [0x37, 0xfa, 0x21, 0x3d];
    out.extend_from_slice(&key);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    out
}

fn frame_header(out: &mut Vec<u8>, fin: bool, opcode: u8, len: u64, masked: bool) {
    out.push(if fin { 0x80 } else { 0 } | opcode);
    let m = if masked { 0x80 } else { 0 };
    if len < 126 {
        out.push(m | len as u8);
    } else if len <= 0xffff {
        out.push(m | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(m | 127);
        out.extend_from_slice(&len.to_be_bytes());
    }
}

/// The server's frames (unmasked), parsed from what was read so far.
#[derive(Default)]
struct Frames {
    buf: Vec<u8>,
}

impl Frames {
    /// One read into the buffer: `Ok(0)` is the end of the stream.
    fn fill(&mut self, stream: &mut TcpStream) -> io::Result<usize> {
        let mut chunk = [0u8; 16 * 1024];
        let n = stream.read(&mut chunk)?;
        if self.buf.len() + n > MAX_FRAME_BUF {
            self.buf.clear(); // bounded: an attacker does not need what it missed
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// The next whole frame: its opcode and payload.
    fn next(&mut self) -> Option<(u8, Vec<u8>)> {
        let b = &self.buf;
        if b.len() < 2 {
            return None;
        }
        let (len, at) = match b[1] & 0x7f {
            126 => (
                u16::from_be_bytes(b.get(2..4)?.try_into().ok()?) as usize,
                4,
            ),
            127 => (
                u64::from_be_bytes(b.get(2..10)?.try_into().ok()?) as usize,
                10,
            ),
            n => (n as usize, 2),
        };
        if len > MAX_FRAME_BUF {
            self.buf.clear();
            return None;
        }
        let payload = b.get(at..at + len)?.to_vec();
        let opcode = b[0] & 0x0f;
        self.buf.drain(..at + len);
        Some((opcode, payload))
    }
}

/// The name of a close frame's code: `close_1009`.
fn close_name(payload: &[u8]) -> String {
    match payload.get(..2) {
        Some(c) => format!("close_{}", u16::from_be_bytes([c[0], c[1]])),
        None => "close_none".into(),
    }
}

/// Reads until the server's close frame, the end of the stream or `timeout`.
fn read_close(stream: &mut TcpStream, mut frames: Frames, timeout: Duration) -> String {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(timeout));
    let deadline = Instant::now() + timeout;
    loop {
        while let Some((op, payload)) = frames.next() {
            if op == 8 {
                let reason = String::from_utf8_lossy(payload.get(2..).unwrap_or(&[])).into_owned();
                let name = close_name(&payload);
                return if reason.is_empty() {
                    name
                } else {
                    format!("{name}_{reason}")
                };
            }
        }
        if Instant::now() >= deadline {
            return "timeout".into();
        }
        match frames.fill(stream) {
            Ok(0) => return "eof".into(),
            Ok(_) => {}
            Err(e) => return io_outcome(&e),
        }
    }
}

/// Writes what `pending` holds without blocking: `Err` when the socket is gone.
fn write_some(stream: &mut TcpStream, pending: &mut Vec<u8>) -> Result<(), String> {
    while !pending.is_empty() {
        match stream.write(pending) {
            Ok(0) => return Err("write_zero".into()),
            Ok(n) => {
                pending.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("write_{}", io_outcome(&e))),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- attackers

/// Slowloris (`trickle`) or silent sockets: `n` slots, each reopened when the server
/// drops it, checked once a second.
fn idle_sockets(shared: Arc<Shared>, kind: &'static str, src: Ipv4Addr, n: usize, trickle: bool) {
    let addr = shared.opts.addr;
    // Long enough never to end within the attack at a byte a second.
    let mut head = format!("GET /ws/loris HTTP/1.1\r\nHost: {addr}\r\n{UPGRADE_HEAD}");
    while head.len() < 4096 {
        head.push_str("X-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    let head = head.into_bytes();
    let mut slots: Vec<Option<(TcpStream, usize, Instant)>> = (0..n).map(|_| None).collect();
    let mut tick = Instant::now();
    while shared.attacking() {
        for slot in slots.iter_mut() {
            let Some((stream, sent, since)) = slot else {
                match connect_from(src, addr, None) {
                    Ok(s) => {
                        let _ = s.set_nonblocking(true);
                        shared.count(kind, "opened");
                        *slot = Some((s, 0, Instant::now()));
                    }
                    Err(e) => shared.count(kind, &e),
                }
                continue;
            };
            let mut gone = None;
            if trickle && *sent < head.len() {
                match stream.write(&head[*sent..*sent + 1]) {
                    Ok(_) => *sent += 1,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => gone = Some(format!("write_{}", io_outcome(&e))),
                }
            }
            if gone.is_none() {
                let mut buf = [0u8; 512];
                match stream.read(&mut buf) {
                    Ok(0) => gone = Some("eof".into()),
                    Ok(k) => {
                        let text = String::from_utf8_lossy(&buf[..k]);
                        let code = text.split_whitespace().nth(1).unwrap_or("?");
                        gone = Some(format!("http_{code}"));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => gone = Some(io_outcome(&e)),
                }
            }
            if let Some(why) = gone {
                shared.count(kind, &why);
                shared.lifetime(kind, *since);
                *slot = None;
            }
        }
        tick += Duration::from_secs(1);
        sleep_until(&shared, tick);
    }
    // Still open at the end: the longest lived, counted as such.
    for (_, _, since) in slots.into_iter().flatten() {
        shared.count(kind, "open_at_end");
        shared.lifetime(kind, since);
    }
}

/// How an upgraded attacker socket behaves.
struct Upgraded {
    kind: &'static str,
    src: Ipv4Addr,
    /// The request path (the same on every reconnect: the same user).
    path: String,
    rcvbuf: Option<usize>,
    /// Read what the server sends (else never: a slow consumer).
    read: bool,
    tick: Duration,
    /// What it sends each tick (once the previous tick's bytes are out).
    batch: Vec<u8>,
}

/// An upgraded socket that sends its batch every tick, reconnecting when the server
/// drops it.
fn upgraded(shared: Arc<Shared>, u: Upgraded) {
    let addr = shared.opts.addr;
    while shared.attacking() {
        let (mut stream, rest) = match upgrade(u.src, addr, &u.path, u.rcvbuf) {
            Ok(s) => s,
            Err(e) => {
                shared.count(u.kind, &e);
                sleep_until(&shared, Instant::now() + Duration::from_secs(1));
                continue;
            }
        };
        shared.count(u.kind, "upgraded");
        let since = Instant::now();
        let _ = stream.set_nonblocking(true);
        let mut frames = Frames { buf: rest };
        let mut pending = Vec::new();
        let mut tick = Instant::now();
        let gone = loop {
            if !shared.attacking() {
                break None;
            }
            if pending.is_empty() {
                pending.extend_from_slice(&u.batch);
            } else {
                shared.count(u.kind, "send_blocked");
            }
            if let Err(e) = write_some(&mut stream, &mut pending) {
                break Some(e);
            }
            if u.read
                && let Some(why) = drain(&shared, u.kind, &mut stream, &mut frames)
            {
                break Some(why);
            }
            tick += u.tick;
            sleep_until(&shared, tick);
        };
        match gone {
            Some(why) => {
                shared.count(u.kind, &why);
                shared.lifetime(u.kind, since);
            }
            None => {
                shared.count(u.kind, "open_at_end");
                shared.lifetime(u.kind, since);
            }
        }
    }
}

/// Reads everything available and counts the server's frames: `Some` when it closed.
fn drain(
    shared: &Shared,
    kind: &str,
    stream: &mut TcpStream,
    frames: &mut Frames,
) -> Option<String> {
    loop {
        while let Some((op, payload)) = frames.next() {
            match op {
                1 => {
                    let v: Value = serde_json::from_slice(&payload).unwrap_or(Value::Null);
                    let t = v["type"].as_str().unwrap_or("?");
                    match v["name"].as_str() {
                        Some(name) => shared.count(kind, &format!("frame_{t}_{name}")),
                        None => shared.count(kind, &format!("frame_{t}")),
                    }
                }
                8 => return Some(close_name(&payload)),
                9 => {}
                10 => shared.count(kind, "pongs"),
                _ => shared.count(kind, &format!("frame_op{op}")),
            }
        }
        match frames.fill(stream) {
            Ok(0) => return Some("eof".into()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Some(io_outcome(&e)),
        }
    }
}

/// Reconnects rapidly: odd rounds with one user id (the older socket should be closed with
/// `replaced`), even rounds with a fresh id each time.
fn storm(shared: Arc<Shared>, t: usize) {
    let (kind, src, addr) = ("storm", source(4), shared.opts.addr);
    let every = Duration::from_micros(1_000_000 / shared.opts.storm_rate.max(1));
    let mut prev: Option<TcpStream> = None;
    let mut n = 0u64;
    let mut tick = Instant::now();
    while shared.attacking() {
        n += 1;
        let same = n % 2 == 1;
        let path = if same {
            format!("/ws/storm{t}")
        } else {
            format!("/ws/fresh{t}-{n}")
        };
        match upgrade(src, addr, &path, None) {
            Ok((stream, _)) if same => {
                shared.count(kind, "same_upgraded");
                if let Some(mut old) = prev.replace(stream) {
                    let why = read_close(&mut old, Frames::default(), IO_TIMEOUT);
                    shared.count(kind, &format!("older_{why}"));
                }
            }
            Ok(_) => shared.count(kind, "fresh_upgraded"),
            Err(e) => shared.count(kind, &e),
        }
        tick += every;
        sleep_until(&shared, tick);
    }
}

/// Garbage: random bytes after the upgrade and instead of a request, invalid UTF-8 in a
/// text frame, an unmasked client frame; reads what the server answers.
fn garbage(shared: Arc<Shared>) {
    let (kind, src, addr) = ("garbage", source(5), shared.opts.addr);
    let every = Duration::from_micros(1_000_000 / shared.opts.garbage_rate.max(1));
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let mut n = 0u64;
    let mut tick = Instant::now();
    while shared.attacking() {
        n += 1;
        let (what, after_upgrade, bytes) = match n % 4 {
            0 => ("random_request", false, rng.bytes(512)),
            1 => ("random_frames", true, rng.bytes(512)),
            2 => ("bad_utf8", true, frame(true, 1, &[b'h', 0xff, 0xfe, b'i'])),
            _ => {
                let mut f = Vec::new();
                frame_header(&mut f, true, 1, 5, false);
                f.extend_from_slice(b"hello");
                ("unmasked", true, f)
            }
        };
        let outcome = if after_upgrade {
            match upgrade(src, addr, &format!("/ws/garbage{n}"), None) {
                Ok((mut s, rest)) => {
                    let _ = s.write_all(&bytes);
                    read_close(&mut s, Frames { buf: rest }, IO_TIMEOUT)
                }
                Err(e) => e,
            }
        } else {
            match connect_from(src, addr, None) {
                Ok(mut s) => {
                    let _ = s.write_all(&bytes);
                    read_status(&mut s).0
                }
                Err(e) => e,
            }
        };
        shared.count(kind, &format!("{what}_{outcome}"));
        tick += every;
        sleep_until(&shared, tick);
    }
}

/// Oversized frames and request heads.
fn oversize(shared: Arc<Shared>) {
    let (kind, src, addr) = ("oversize", source(6), shared.opts.addr);
    let every = Duration::from_micros(1_000_000 / shared.opts.oversize_rate.max(1));
    let mut n = 0u64;
    let mut tick = Instant::now();
    while shared.attacking() {
        n += 1;
        let (what, outcome) = match n % 4 {
            0 => {
                // A frame announcing 16 MiB, then 256 KiB of it.
                let o = match upgrade(src, addr, &format!("/ws/big{n}"), None) {
                    Ok((mut s, rest)) => {
                        let mut f = Vec::new();
                        frame_header(&mut f, true, 1, 16 << 20, true);
                        f.extend_from_slice(&[0, 0, 0, 0]);
                        f.extend(std::iter::repeat_n(b'a', 256 * 1024));
                        let _ = s.set_write_timeout(Some(IO_TIMEOUT));
                        let _ = s.write_all(&f);
                        read_close(&mut s, Frames { buf: rest }, IO_TIMEOUT)
                    }
                    Err(e) => e,
                };
                ("frame_16mib", o)
            }
            1 => {
                // 70 fragments of 1 KiB: a 70 KiB message, past the default 64 KiB.
                let o = match upgrade(src, addr, &format!("/ws/frag{n}"), None) {
                    Ok((mut s, rest)) => {
                        let chunk = vec![b'a'; 1024];
                        let mut f = Vec::new();
                        for k in 0..70 {
                            let op = if k == 0 { 1 } else { 0 };
                            f.extend(frame(k == 69, op, &chunk));
                        }
                        let _ = s.set_write_timeout(Some(IO_TIMEOUT));
                        let _ = s.write_all(&f);
                        read_close(&mut s, Frames { buf: rest }, IO_TIMEOUT)
                    }
                    Err(e) => e,
                };
                ("fragments_70kib", o)
            }
            2 => {
                let mut head = format!("GET /ws/h{n} HTTP/1.1\r\nHost: {addr}\r\nX-Big: ");
                head.push_str(&"a".repeat(20 * 1024));
                head.push_str("\r\n\r\n");
                ("head_20kib", raw_request(src, addr, head.as_bytes()))
            }
            _ => {
                let mut head = format!("GET /ws/h{n} HTTP/1.1\r\nHost: {addr}\r\n{UPGRADE_HEAD}");
                for k in 0..40 {
                    head.push_str(&format!("X-H{k}: v\r\n"));
                }
                head.push_str("\r\n");
                ("headers_40", raw_request(src, addr, head.as_bytes()))
            }
        };
        shared.count(kind, &format!("{what}_{outcome}"));
        tick += every;
        sleep_until(&shared, tick);
    }
}

/// Sends `bytes` on a fresh connection and reads the answer's status.
fn raw_request(src: Ipv4Addr, addr: SocketAddr, bytes: &[u8]) -> String {
    match connect_from(src, addr, None) {
        Ok(mut s) => {
            let _ = s.set_write_timeout(Some(IO_TIMEOUT));
            let _ = s.write_all(bytes);
            read_status(&mut s).0
        }
        Err(e) => e,
    }
}

// ---------------------------------------------------------------- the server's side

/// One reading of the server's `/proc` figures.
#[derive(Clone, Copy, Default)]
struct Proc {
    rss_kib: u64,
    hwm_kib: u64,
    anon_kib: u64,
    fds: u64,
    cpu_ticks: u64,
}

fn read_proc(pid: u32) -> Option<Proc> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is the 3rd field,
    // utime and stime the 14th and 15th.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some(Proc {
        rss_kib: field("VmRSS:"),
        hwm_kib: field("VmHWM:"),
        anon_kib: field("RssAnon:"),
        fds,
        cpu_ticks: ticks(11) + ticks(12),
    })
}

/// `GET /metrics`: every sample that is not a histogram's and not zero.
fn metrics(addr: SocketAddr) -> Value {
    let get = || -> io::Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.write_all(
            format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )?;
        let mut body = Vec::new();
        s.take(MAX_METRICS_BYTES as u64).read_to_end(&mut body)?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    };
    let mut out = Map::new();
    match get() {
        Ok(text) => {
            for line in text.lines().filter(|l| l.starts_with("straycat_")) {
                let Some((name, value)) = line.rsplit_once(' ') else {
                    continue;
                };
                let histogram =
                    name.contains("_bucket") || name.ends_with("_sum") || name.ends_with("_count");
                if histogram && !name.starts_with(LOOP) {
                    continue;
                }
                if let Ok(v) = value.parse::<f64>()
                    && v != 0.0
                {
                    out.insert(name.to_owned(), json!(v));
                }
            }
        }
        Err(e) => {
            out.insert("error".into(), json!(e.to_string()));
        }
    }
    Value::Object(out)
}

/// The event loop's iteration-time histogram in `/metrics`.
const LOOP: &str = "straycat_loop_iteration_seconds";

/// The loop's iterations between two `/metrics` readings: how many, their mean, how many
/// took longer than 1 ms and 10 ms, and the bucket bound under which 99 % of them stayed.
fn loop_stats(from: &Value, to: &Value) -> Value {
    let get = |m: &Value, k: &str| m.get(k).and_then(Value::as_f64).unwrap_or(0.0);
    let delta = |k: &str| get(to, k) - get(from, k);
    let count = delta(&format!("{LOOP}_count"));
    let sum = delta(&format!("{LOOP}_sum"));
    let le = |b: &str| delta(&format!("{LOOP}_bucket{{le=\"{b}\"}}"));
    let bounds = [
        "0.00001", "0.000025", "0.00005", "0.0001", "0.00025", "0.0005", "0.001", "0.0025",
        "0.005", "0.01", "0.025", "0.05", "0.1",
    ];
    let p99 = bounds
        .iter()
        .find(|b| count > 0.0 && le(b) >= 0.99 * count)
        .map(|b| json!(b.parse::<f64>().unwrap_or(0.0) * 1000.0))
        .unwrap_or(Value::Null);
    json!({
        "iterations": count,
        "mean_us": if count > 0.0 { sum / count * 1e6 } else { 0.0 },
        "over_1ms": count - le("0.001"),
        "over_10ms": count - le("0.01"),
        "over_100ms": count - le("0.1"),
        "p99_bound_ms": p99,
    })
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1000.0
}

fn main() -> ExitCode {
    let opts = match parse_opts() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let Some(first) = read_proc(opts.pid) else {
        eprintln!("cannot read /proc/{}/status", opts.pid);
        return ExitCode::FAILURE;
    };
    let start = Instant::now();
    let t0 = start + WARMUP;
    let plan = Plan {
        t0,
        attack: t0 + opts.baseline,
        attack_end: t0 + opts.baseline + opts.attack,
        end: t0 + opts.baseline + opts.attack + opts.after,
    };
    let shared = Arc::new(Shared {
        opts: opts.clone(),
        plan,
        good: Mutex::new(Default::default()),
        tally: Mutex::new(BTreeMap::new()),
    });

    // The sampler: one reading a second, from the start to the end.
    let sampler = {
        let shared = Arc::clone(&shared);
        thread::spawn(move || {
            let mut samples = Vec::new();
            let mut tick = shared.plan.t0;
            while tick <= shared.plan.end {
                let now = Instant::now();
                if tick > now {
                    thread::sleep(tick - now);
                }
                if let Some(p) = read_proc(shared.opts.pid) {
                    samples.push((tick.saturating_duration_since(shared.plan.t0), p));
                }
                tick += Duration::from_secs(1);
            }
            samples
        })
    };

    let mut users: Vec<JoinHandle<()>> = Vec::new();
    for i in 0..opts.users {
        let shared = Arc::clone(&shared);
        users.push(thread::spawn(move || good_user(shared, i)));
    }
    eprintln!(
        "soak: {} users; baseline {} s, attack {} s, after {} s",
        opts.users,
        opts.baseline.as_secs(),
        opts.attack.as_secs(),
        opts.after.as_secs()
    );

    // The boundaries: /proc and /metrics at each; the attackers start at the second.
    let mut bounds = Vec::new();
    let mut attackers: Vec<JoinHandle<()>> = Vec::new();
    let marks = [
        shared.plan.t0,
        shared.plan.attack,
        shared.plan.attack_end,
        shared.plan.end,
    ];
    for (k, mark) in marks.iter().enumerate() {
        let now = Instant::now();
        if *mark > now {
            thread::sleep(*mark - now);
        }
        if k == 2 {
            eprintln!("soak: attack over, waiting for the attackers to stop");
            for a in attackers.drain(..) {
                let _ = a.join();
            }
        }
        bounds.push((read_proc(opts.pid).unwrap_or_default(), metrics(opts.addr)));
        match k {
            0 => eprintln!("soak: baseline"),
            1 => {
                eprintln!("soak: attack");
                attackers = start_attackers(&shared);
            }
            2 => eprintln!("soak: after"),
            _ => {}
        }
    }
    for u in users {
        let _ = u.join();
    }
    let samples = sampler.join().unwrap_or_default();

    // Per phase: the users' figures and the server's.
    let good = std::mem::take(&mut *lock(&shared.good));
    let mut phases = Vec::new();
    for (p, g) in good.into_iter().enumerate() {
        let mut lat = g.latencies_us;
        lat.sort_unstable();
        let (from, to) = (bounds[p].0, bounds[p + 1].0);
        let lo = match p {
            0 => Duration::ZERO,
            1 => opts.baseline,
            _ => opts.baseline + opts.attack,
        };
        let hi = lo + [opts.baseline, opts.attack, opts.after][p];
        let inside: Vec<Proc> = samples
            .iter()
            .filter(|(t, _)| *t >= lo && *t <= hi)
            .map(|(_, s)| *s)
            .chain([from, to])
            .collect();
        let peak = |f: fn(&Proc) -> u64| inside.iter().map(f).max().unwrap_or(0);
        let errors: u64 = g.errors.values().sum();
        eprintln!(
            "{:>8}: {} replies, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, {} errors; RSS {}→{} (peak {}) KiB, fds {}→{} (peak {})",
            PHASES[p],
            lat.len(),
            percentile(&lat, 0.50),
            percentile(&lat, 0.99),
            percentile(&lat, 1.0),
            errors,
            from.rss_kib,
            to.rss_kib,
            peak(|s| s.rss_kib),
            from.fds,
            to.fds,
            peak(|s| s.fds)
        );
        phases.push(json!({
            "phase": PHASES[p],
            "secs": (hi - lo).as_secs(),
            "good": {
                "sent": g.sent,
                "replies": lat.len(),
                "p50_ms": percentile(&lat, 0.50),
                "p99_ms": percentile(&lat, 0.99),
                "max_ms": percentile(&lat, 1.0),
                "errors": g.errors,
                "errors_total": errors,
            },
            "server": {
                "cpu_s": (to.cpu_ticks.saturating_sub(from.cpu_ticks)) as f64 / opts.clk_tck as f64,
                "rss_kib": {"start": from.rss_kib, "peak": peak(|s| s.rss_kib), "end": to.rss_kib},
                "anon_kib": {"start": from.anon_kib, "peak": peak(|s| s.anon_kib), "end": to.anon_kib},
                "hwm_kib": to.hwm_kib,
                "fds": {"start": from.fds, "peak": peak(|s| s.fds), "end": to.fds},
            },
            "loop": loop_stats(&bounds[p].1, &bounds[p + 1].1),
            "metrics_at_end": bounds[p + 1].1,
        }));
    }
    let attack: BTreeMap<String, u64> = lock(&shared.tally).clone();
    let timeline: Vec<Value> = samples
        .iter()
        .map(|(t, s)| {
            json!([
                t.as_secs(),
                s.rss_kib,
                s.hwm_kib,
                s.anon_kib,
                s.fds,
                s.cpu_ticks
            ])
        })
        .collect();
    let out = json!({
        "config": {
            "addr": opts.addr.to_string(),
            "users": opts.users,
            "think_ms": opts.think_ms,
            "reply_timeout_s": opts.reply_timeout.as_secs(),
            "slowloris": opts.slowloris,
            "silent": opts.silent,
            "slow_consumers": opts.slow_consumers,
            "slow_words": opts.slow_words,
            "ping_floods": opts.ping_floods,
            "pings_per_sec": opts.pings_per_sec,
            "storm_threads": opts.storm_threads,
            "storm_rate": opts.storm_rate,
            "garbage_rate": opts.garbage_rate,
            "oversize_rate": opts.oversize_rate,
            "invalid_json": opts.invalid_json,
            "invalid_per_sec": opts.invalid_per_sec,
            "sources": {
                "good": "127.0.0.1", "slowloris": source(0).to_string(), "silent": source(1).to_string(),
                "slow_consumer": source(2).to_string(), "ping_flood": source(3).to_string(),
                "storm": source(4).to_string(), "garbage": source(5).to_string(),
                "oversize": source(6).to_string(), "invalid_json": source(7).to_string(),
            },
        },
        "server_at_start": {"rss_kib": first.rss_kib, "anon_kib": first.anon_kib, "fds": first.fds},
        "phases": phases,
        "attackers": attack,
        "timeline_columns": ["t_s", "rss_kib", "hwm_kib", "anon_kib", "fds", "cpu_ticks"],
        "timeline": timeline,
    });
    println!("{out:#}");
    ExitCode::SUCCESS
}

/// Starts every attacker thread; each stops by itself at the attack's end.
fn start_attackers(shared: &Arc<Shared>) -> Vec<JoinHandle<()>> {
    let o = &shared.opts;
    let mut threads = Vec::new();
    let mut spawn = |f: Box<dyn FnOnce(Arc<Shared>) + Send>| {
        let shared = Arc::clone(shared);
        threads.push(thread::spawn(move || f(shared)));
    };
    let (loris, silent) = (o.slowloris, o.silent);
    if loris > 0 {
        spawn(Box::new(move |s| {
            idle_sockets(s, "slowloris", source(0), loris, true)
        }));
    }
    if silent > 0 {
        spawn(Box::new(move |s| {
            idle_sockets(s, "silent", source(1), silent, false)
        }));
    }
    for i in 0..o.slow_consumers {
        // Long words: the echo agent's pause is per word, so fewer, longer ones make the
        // server owe more bytes a second (a turn of 50 × 400 B words: about 100 KB out).
        let words: Vec<String> = (0..o.slow_words)
            .map(|k| format!("w{k:03}{}", "x".repeat(SLOW_WORD_BYTES - 4)))
            .collect();
        let msg = json!({"text": words.join(" ")}).to_string();
        let f = frame(true, 1, msg.as_bytes());
        let u = Upgraded {
            kind: "slow_consumer",
            src: source(2),
            path: format!("/ws/slow{i}"),
            rcvbuf: Some(4096),
            read: false,
            tick: Duration::from_millis(100),
            batch: f,
        };
        spawn(Box::new(move |s| upgraded(s, u)));
    }
    for i in 0..o.ping_floods {
        // A batch every 10 ms.
        let batch = (o.pings_per_sec / 100).max(1);
        let mut pings = Vec::new();
        for k in 0..batch {
            pings.extend(frame(true, 9, &(k as u64).to_be_bytes()));
        }
        let u = Upgraded {
            kind: "ping_flood",
            src: source(3),
            path: format!("/ws/ping{i}"),
            rcvbuf: None,
            read: true,
            tick: Duration::from_millis(10),
            batch: pings,
        };
        spawn(Box::new(move |s| upgraded(s, u)));
    }
    for t in 0..o.storm_threads {
        spawn(Box::new(move |s| storm(s, t)));
    }
    if o.garbage_rate > 0 {
        spawn(Box::new(garbage));
    }
    if o.oversize_rate > 0 {
        spawn(Box::new(oversize));
    }
    for i in 0..o.invalid_json {
        let per_tick = (o.invalid_per_sec / 10).max(1);
        let bad: [&[u8]; 6] = [
            b"not json",
            b"{",
            b"[1,2,3]",
            b"{\"text\": 5}",
            b"\"just a string\"",
            b"{\"no_text\": true}",
        ];
        let mut batch = Vec::new();
        for k in 0..per_tick {
            batch.extend(frame(true, 1, bad[k % bad.len()]));
        }
        batch.extend(frame(true, 2, b"\x00\x01binary"));
        let u = Upgraded {
            kind: "invalid_json",
            src: source(7),
            path: format!("/ws/invalid{i}"),
            rcvbuf: None,
            read: true,
            tick: Duration::from_millis(100),
            batch,
        };
        spawn(Box::new(move |s| upgraded(s, u)));
    }
    threads
}
