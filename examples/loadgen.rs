//! Load generator for straycat and its peers (any WebSocket echo server): one thread, a
//! `mio` loop over non-blocking client sockets and a hand-written client side of RFC 6455,
//! so that the generator costs far less per message than the server it measures.
//!
//! ```text
//! cargo build --release --example loadgen
//! target/release/straycat --listen 127.0.0.1:1865 --raw-echo --log-level warn \
//!     --max-messages-per-minute 0 --max-connections-per-ip 0 --max-connects-per-minute-per-ip 0 &
//! target/release/examples/loadgen echo  --addr 127.0.0.1:1865 --pid $! --conns 50 --inflight 8 --size 1024 --secs 3
//! target/release/examples/loadgen rtt   --addr 127.0.0.1:1865 --pid $!
//! target/release/examples/loadgen churn --addr 127.0.0.1:1865 --pid $! --conns 32 --secs 3
//! target/release/examples/loadgen idle  --addr 127.0.0.1:1865 --pid $! --conns 10000
//! target/release/examples/loadgen chat  --addr 127.0.0.1:1865 --pid $! --path '/ws/u{i}'
//! ```
//!
//! Modes:
//! - `echo`: `--conns` connections, each keeping `--inflight` messages of `--size` bytes in
//!   flight; messages per second, latency percentiles, server and own CPU per message.
//! - `rtt`: one connection, one small message at a time; the round-trip percentiles.
//! - `churn`: `--conns` concurrent slots, each doing connect, upgrade, one echo, close, again;
//!   full cycles per second.
//! - `idle`: opens `--conns` connections and leaves them idle; the server's resident memory
//!   before (its start-up RSS) and the growth per connection.
//! - `chat`: like `echo` on `/ws/u{i}` (one user per connection) with `{"text": "<words>"}`;
//!   a turn ends at the `chat` (or `error`) frame; the `chat_token` frames are counted.
//!
//! Server CPU is the growth of the run time of every thread of `--pid` (from
//! `/proc/PID/task/*/schedstat`, nanoseconds) over the measured window, divided by the
//! messages completed in it; the generator's own CPU is measured the same way. Memory is
//! `VmRSS` of `/proc/PID/status`. The output is human-readable, then one JSON line (starting
//! with `{`) for scripts. Only loopback addresses are accepted as a target, and every mode
//! ends by itself (`--secs`, `--count`, or `--timeout-secs` while connecting).

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use serde_json::json;
use slab::Slab;
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Bytes read from a socket per `read` call (shared by all connections).
const READ_CHUNK_BYTES: usize = 256 * 1024;

/// Latency samples kept at most (4 bytes each), so a long run cannot eat the machine.
const MAX_SAMPLES: usize = 50_000_000;

/// The client key of every handshake; a load generator needs no fresh nonce (RFC 6455 §4.1
/// wants one to defeat caching proxies, and there is none on loopback).
const CLIENT_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// Masking key of every frame we send. RFC 6455 §5.3 wants it unpredictable to protect
/// proxies; a fixed non-zero key makes the server do exactly the same unmasking work.
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// What is being measured.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Echo,
    Rtt,
    Churn,
    Idle,
    Chat,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Echo => "echo",
            Mode::Rtt => "rtt",
            Mode::Churn => "churn",
            Mode::Idle => "idle",
            Mode::Chat => "chat",
        }
    }
}

/// Command-line options.
struct Opts {
    /// What to measure.
    mode: Mode,
    /// The server (loopback only).
    addr: SocketAddr,
    /// The server's process id, for its CPU time and memory.
    pid: Option<u32>,
    /// Connections (`echo`, `idle`, `chat`) or concurrent slots (`churn`).
    conns: usize,
    /// Messages (or turns) kept in flight per connection.
    inflight: usize,
    /// Payload bytes per message.
    size_bytes: usize,
    /// Length of the measured window.
    secs: f64,
    /// Stop after this many measured messages instead (if sooner).
    count: Option<u64>,
    /// Unmeasured time between the last connection opening and the window.
    warmup_secs: f64,
    /// Request path; `{i}` is replaced by the connection's index.
    path: String,
    /// Handshakes in progress at once while opening connections.
    open_concurrency: usize,
    /// Give up opening connections after this long.
    timeout_secs: f64,
    /// `idle`: echo one message of `--size` bytes on each connection before it goes idle.
    warm: bool,
    /// `chat`: send one word of `--size` bytes rather than many short ones.
    one_word: bool,
    /// A label copied into the JSON line (the server's name).
    label: String,
}

const USAGE: &str = "usage: loadgen MODE --addr 127.0.0.1:PORT [--pid PID] [options]
modes: echo | rtt | churn | idle | chat
  --conns N          connections (echo 50, idle 1000, chat 50) or churn slots (32)
  --inflight K       messages in flight per connection (echo 8, chat 8, rtt 1)
  --size B           payload bytes (1024; rtt 32)
  --secs S           measured window (3)
  --count M          stop after M measured messages, if before --secs
  --warmup S         unmeasured seconds before the window (0.5)
  --path P           request path, {i} = connection index (/echo; chat /ws/u{i})
  --open-concurrency handshakes at once while opening (256)
  --timeout-secs S   give up opening connections after S (60)
  --warm             idle: one echo per connection before it goes idle
  --one-word         chat: the text is one word, so a turn is one chat_token and one chat
  --label NAME       copied into the JSON line";

fn parse_opts() -> Result<Opts, String> {
    let mut args = std::env::args().skip(1);
    let mode = match args.next().as_deref() {
        Some("echo") => Mode::Echo,
        Some("rtt") => Mode::Rtt,
        Some("churn") => Mode::Churn,
        Some("idle") => Mode::Idle,
        Some("chat") => Mode::Chat,
        Some(other) => return Err(format!("unknown mode {other:?}")),
        None => return Err("a mode is required".into()),
    };
    let mut o = Opts {
        mode,
        addr: SocketAddr::from(([127, 0, 0, 1], 1865)),
        pid: None,
        conns: match mode {
            Mode::Echo | Mode::Chat => 50,
            Mode::Rtt => 1,
            Mode::Churn => 32,
            Mode::Idle => 1000,
        },
        inflight: match mode {
            Mode::Echo | Mode::Chat => 8,
            _ => 1,
        },
        size_bytes: if mode == Mode::Rtt { 32 } else { 1024 },
        secs: 3.0,
        count: None,
        warmup_secs: 0.5,
        path: if mode == Mode::Chat {
            "/ws/u{i}".into()
        } else {
            "/echo".into()
        },
        open_concurrency: 256,
        timeout_secs: 60.0,
        warm: false,
        one_word: false,
        label: String::new(),
    };
    while let Some(flag) = args.next() {
        if flag == "--warm" {
            o.warm = true;
            continue;
        }
        if flag == "--one-word" {
            o.one_word = true;
            continue;
        }
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = || format!("bad value for {flag}: {value:?}");
        match flag.as_str() {
            "--addr" => {
                o.addr = value
                    .parse()
                    .map_err(|_| format!("bad address {value:?}"))?
            }
            "--pid" => o.pid = Some(value.parse().map_err(|_| bad())?),
            "--conns" => o.conns = value.parse().map_err(|_| bad())?,
            "--inflight" => o.inflight = value.parse().map_err(|_| bad())?,
            "--size" => o.size_bytes = value.parse().map_err(|_| bad())?,
            "--secs" => o.secs = value.parse().map_err(|_| bad())?,
            "--count" => o.count = Some(value.parse().map_err(|_| bad())?),
            "--warmup" => o.warmup_secs = value.parse().map_err(|_| bad())?,
            "--path" => o.path = value,
            "--open-concurrency" => o.open_concurrency = value.parse().map_err(|_| bad())?,
            "--timeout-secs" => o.timeout_secs = value.parse().map_err(|_| bad())?,
            "--label" => o.label = value,
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    if !o.addr.ip().is_loopback() {
        return Err(format!(
            "{} is not a loopback address; loadgen only targets this machine",
            o.addr
        ));
    }
    if o.mode == Mode::Rtt {
        o.conns = 1;
        o.inflight = 1;
    }
    if o.conns == 0 || o.inflight == 0 || o.open_concurrency == 0 {
        return Err("--conns, --inflight and --open-concurrency must be at least 1".into());
    }
    let secs_ok = o.secs > 0.0 && o.secs <= 600.0;
    if !secs_ok || !(0.0..=60.0).contains(&o.warmup_secs) {
        return Err("--secs must be in (0, 600] and --warmup in [0, 60]".into());
    }
    Ok(o)
}

/// CPU time of every thread of `pid`, in nanoseconds.
fn cpu_ns(pid: u32) -> Option<u64> {
    let mut total = 0u64;
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let path = entry.ok()?.path().join("schedstat");
        if let Ok(s) = std::fs::read_to_string(path) {
            total += s.split_whitespace().next()?.parse::<u64>().ok()?;
        }
    }
    Some(total)
}

/// User and system CPU time of `pid` (all its threads), in clock ticks (utime and stime
/// of `/proc/PID/stat`): how much of the server's time is its own code and how much the
/// kernel's (system calls, TCP).
fn user_sys_ticks(pid: u32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace().skip(11);
    Some((fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
}

/// Resident memory of `pid`, in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

/// A `KiB` line of `/proc/PID/status`: `VmRSS:` (all resident pages, the shared pages of
/// libc and the binary included) or `RssAnon:` (the process's own heap and stacks).
fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Appends one masked client frame (FIN set) to `out` (RFC 6455 §5.2).
fn push_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    out.push(0x80 | opcode);
    let n = payload.len();
    if n < 126 {
        out.push(0x80 | n as u8);
    } else if n <= u16::MAX as usize {
        out.push(0x80 | 126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    out.extend_from_slice(&MASK);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
}

/// What a complete message from the server is, as far as the load cares.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Got {
    /// A text or binary message that ends a round trip (echo) or a turn (`chat`, `error`).
    Reply,
    /// A `chat_token` (or any other non-final chat frame).
    Token,
    /// A ping: answer with a pong carrying the same payload.
    Ping,
    /// A close frame.
    Close,
    /// A pong or anything else to ignore.
    Other,
}

/// Does this chat frame end a turn (`"type":"chat"` or `"type":"error"`)?
fn ends_turn(payload: &[u8]) -> bool {
    let head = &payload[..payload.len().min(256)];
    let has = |pat: &[u8]| head.windows(pat.len()).any(|w| w == pat);
    has(b"\"type\":\"chat\"") || has(b"\"type\":\"error\"")
}

/// Parses the complete server frames at the start of `buf`, calling `on` for each complete
/// message (continuation frames are folded into their message; `frag` carries whether one
/// is open between calls). Returns the bytes consumed, or `Err` on a frame we cannot accept.
fn parse_frames(
    buf: &[u8],
    chat: bool,
    frag: &mut Option<Vec<u8>>,
    mut on: impl FnMut(Got, &[u8]),
) -> Result<usize, &'static str> {
    let mut pos = 0;
    loop {
        let b = &buf[pos..];
        if b.len() < 2 {
            return Ok(pos);
        }
        let fin = b[0] & 0x80 != 0;
        let opcode = b[0] & 0x0f;
        let masked = b[1] & 0x80 != 0;
        let (len, mut hdr) = match b[1] & 0x7f {
            126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
            127 if b.len() >= 10 => {
                let mut n = [0u8; 8];
                n.copy_from_slice(&b[2..10]);
                (u64::from_be_bytes(n) as usize, 10)
            }
            126 | 127 => return Ok(pos),
            n => (n as usize, 2),
        };
        if masked {
            return Err("server sent a masked frame");
        }
        if len > 64 * 1024 * 1024 {
            return Err("frame over 64 MiB");
        }
        if b.len() < hdr + len {
            return Ok(pos);
        }
        let payload = &b[hdr..hdr + len];
        hdr += len;
        match opcode {
            0x1 | 0x2 if fin && frag.is_none() => {
                let kind = if !chat || ends_turn(payload) {
                    Got::Reply
                } else {
                    Got::Token
                };
                on(kind, payload);
            }
            0x1 | 0x2 if frag.is_none() => *frag = Some(payload.to_vec()),
            0x0 if frag.is_some() => {
                let mut whole = frag.take().unwrap_or_default();
                whole.extend_from_slice(payload);
                if fin {
                    let kind = if !chat || ends_turn(&whole) {
                        Got::Reply
                    } else {
                        Got::Token
                    };
                    on(kind, &whole);
                } else {
                    *frag = Some(whole);
                }
            }
            0x8 => on(Got::Close, payload),
            0x9 => on(Got::Ping, payload),
            0xA => on(Got::Other, payload),
            _ => return Err("unexpected opcode or continuation"),
        }
        pos += hdr;
    }
}

/// Where a client connection is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    /// TCP connect in progress.
    Connecting,
    /// Upgrade request sent, waiting for `101`.
    Upgrading,
    /// WebSocket open.
    Open,
    /// Our close frame sent, waiting for the server's.
    Closing,
}

/// One client connection.
struct Client {
    /// The socket.
    stream: TcpStream,
    /// Where it is.
    state: State,
    /// Its index (for `{i}` in the path).
    index: usize,
    /// Received bytes not parsed yet (a partial frame or head).
    rbuf: Vec<u8>,
    /// Bytes to send, from `wpos` on.
    wbuf: Vec<u8>,
    /// How much of `wbuf` is sent.
    wpos: usize,
    /// Send instants of the messages in flight, oldest first (echo replies come in order).
    sent: VecDeque<Instant>,
    /// A fragmented message being reassembled.
    frag: Option<Vec<u8>>,
    /// When this connection (a churn cycle) began.
    began: Instant,
    /// `idle --warm`: the warming echo has come back.
    warmed: bool,
}

/// Counters of a run.
#[derive(Default)]
struct Counts {
    /// Round trips (echo, rtt), turns (chat) or cycles (churn) completed in the window.
    done: u64,
    /// `chat_token` frames received in the window.
    tokens: u64,
    /// Connections that completed the upgrade (all time).
    opened: u64,
    /// Connect, upgrade or protocol failures (all time).
    errors: u64,
    /// Payload bytes received in the window.
    bytes: u64,
}

/// The generator.
struct Gen {
    opts: Opts,
    poll: Poll,
    clients: Slab<Client>,
    /// The upgrade request of each connection index is built from this template.
    request_head: String,
    /// One complete masked message frame, reused for every send.
    msg_frame: Vec<u8>,
    /// Shared read buffer.
    scratch: Vec<u8>,
    counts: Counts,
    /// Latency samples of the window, nanoseconds.
    samples: Vec<u32>,
    /// Messages parsed from one read (reused).
    parsed: Vec<(Got, usize)>,
    /// Inside the measured window.
    measuring: bool,
    /// Past the window: send nothing new.
    stopping: bool,
    /// Connections begun so far (next index).
    next_index: usize,
    /// Last error text, for the report.
    last_error: Option<String>,
}

impl Gen {
    fn new(opts: Opts) -> io::Result<Gen> {
        let payload: Vec<u8> = if opts.mode == Mode::Chat {
            let mut words = String::new();
            let mut i = 0;
            let room = opts.size_bytes.saturating_sub(12).max(8);
            while opts.one_word && words.len() < room {
                words.push((b'a' + (words.len() % 26) as u8) as char);
            }
            while words.len() + 8 < room {
                words.push_str(["lorem", "ipsum", "dolor", "sit", "amet", "kiosk", "cat"][i % 7]);
                words.push(' ');
                i += 1;
            }
            format!("{{\"text\":\"{}\"}}", words.trim_end()).into_bytes()
        } else {
            (0..opts.size_bytes)
                .map(|i| b'a' + (i % 26) as u8)
                .collect()
        };
        let mut msg_frame = Vec::new();
        push_frame(&mut msg_frame, 0x1, &payload);
        let host = opts.addr;
        Ok(Gen {
            request_head: format!(
                "Host: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Key: {CLIENT_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ),
            poll: Poll::new()?,
            clients: Slab::with_capacity(opts.conns),
            msg_frame,
            scratch: vec![0; READ_CHUNK_BYTES],
            counts: Counts::default(),
            samples: Vec::new(),
            parsed: Vec::new(),
            measuring: false,
            stopping: false,
            next_index: 0,
            last_error: None,
            opts,
        })
    }

    /// Starts one more connection.
    fn connect(&mut self) {
        let index = self.next_index;
        self.next_index += 1;
        let mut stream = match TcpStream::connect(self.opts.addr) {
            Ok(s) => s,
            Err(e) => {
                self.fail(format!("connect: {e}"));
                return;
            }
        };
        let _ = stream.set_nodelay(true);
        let entry = self.clients.vacant_entry();
        let token = Token(entry.key());
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            token,
            Interest::READABLE | Interest::WRITABLE,
        ) {
            self.fail(format!("register: {e}"));
            return;
        }
        entry.insert(Client {
            stream,
            state: State::Connecting,
            index,
            rbuf: Vec::new(),
            wbuf: Vec::new(),
            wpos: 0,
            sent: VecDeque::new(),
            frag: None,
            began: Instant::now(),
            warmed: false,
        });
    }

    fn fail(&mut self, what: String) {
        self.counts.errors += 1;
        self.last_error = Some(what);
    }

    /// Drops a connection.
    fn remove(&mut self, key: usize) {
        if self.clients.contains(key) {
            let mut c = self.clients.remove(key);
            let _ = self.poll.registry().deregister(&mut c.stream);
        }
    }

    /// Queues `k` messages on connection `key`, stamping each.
    fn send_messages(&mut self, key: usize, k: usize) {
        let c = &mut self.clients[key];
        let now = Instant::now();
        for _ in 0..k {
            c.wbuf.extend_from_slice(&self.msg_frame);
            c.sent.push_back(now);
        }
    }

    /// The connection just opened: start its load.
    fn on_open(&mut self, key: usize) {
        self.counts.opened += 1;
        match self.opts.mode {
            Mode::Echo | Mode::Rtt | Mode::Chat if !self.stopping => {
                let k = self.opts.inflight;
                self.send_messages(key, k);
            }
            Mode::Churn => self.send_messages(key, 1),
            Mode::Idle if self.opts.warm => self.send_messages(key, 1),
            _ => {}
        }
    }

    /// A reply (echo, or the end of a chat turn) arrived on `key`.
    fn on_reply(&mut self, key: usize, len: usize) {
        let now = Instant::now();
        let c = &mut self.clients[key];
        let Some(t) = c.sent.pop_front() else {
            self.fail("reply without a message in flight".into());
            return;
        };
        match self.opts.mode {
            Mode::Echo | Mode::Rtt | Mode::Chat => {
                if self.measuring {
                    self.counts.done += 1;
                    self.counts.bytes += len as u64;
                    if self.samples.len() < MAX_SAMPLES {
                        self.samples
                            .push((now - t).as_nanos().min(u32::MAX as u128) as u32);
                    }
                }
                if !self.stopping {
                    self.send_messages(key, 1);
                }
            }
            Mode::Churn => {
                // Close handshake: our close frame, then wait for the server's (RFC 6455 §7).
                push_frame(&mut c.wbuf, 0x8, &1000u16.to_be_bytes());
                c.state = State::Closing;
            }
            Mode::Idle => c.warmed = true,
        }
    }

    /// Handles readiness of connection `key`.
    fn ready(&mut self, key: usize) {
        if !self.clients.contains(key) {
            return;
        }
        if self.clients[key].state == State::Connecting {
            let c = &mut self.clients[key];
            match c.stream.take_error() {
                Ok(None) => {}
                Ok(Some(e)) | Err(e) => {
                    self.fail(format!("connect: {e}"));
                    self.remove(key);
                    return;
                }
            }
            match c.stream.peer_addr() {
                Ok(_) => {
                    let path = self.opts.path.replace("{i}", &c.index.to_string());
                    c.wbuf.extend_from_slice(
                        format!("GET {path} HTTP/1.1\r\n{}", self.request_head).as_bytes(),
                    );
                    c.state = State::Upgrading;
                }
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
                Err(e) => {
                    self.fail(format!("connect: {e}"));
                    self.remove(key);
                    return;
                }
            }
        }
        if let Err(e) = self.read(key) {
            if self.clients.contains(key) {
                self.finish(key, Some(e));
            }
            return;
        }
        if self.clients.contains(key)
            && let Err(e) = self.write(key)
        {
            self.finish(key, Some(e));
        }
    }

    /// A connection ended: a churn cycle completes when it was closing; anything else is an
    /// error.
    fn finish(&mut self, key: usize, err: Option<String>) {
        let c = &self.clients[key];
        let closing = c.state == State::Closing;
        let began = c.began;
        self.remove(key);
        if closing && self.opts.mode == Mode::Churn {
            if self.measuring {
                self.counts.done += 1;
                if self.samples.len() < MAX_SAMPLES {
                    self.samples
                        .push(began.elapsed().as_nanos().min(u32::MAX as u128) as u32);
                }
            }
        } else if !self.stopping {
            self.fail(err.unwrap_or_else(|| "server closed the connection".into()));
        }
        // A churn slot is refilled by `poll_once` after the whole event batch, so a slab
        // key is never reused while events for its old connection are being handled.
    }

    /// Reads until the socket would block (edge-triggered readiness needs `WouldBlock`),
    /// handling every complete frame.
    fn read(&mut self, key: usize) -> Result<(), String> {
        // Borrow the shared buffer out of `self` while the frames in it are handled.
        let mut scratch = std::mem::take(&mut self.scratch);
        let result = self.read_with(key, &mut scratch);
        self.scratch = scratch;
        result
    }

    fn read_with(&mut self, key: usize, scratch: &mut [u8]) -> Result<(), String> {
        loop {
            let n = match self.clients[key].stream.read(scratch) {
                Ok(0) => {
                    self.finish(key, None);
                    return Ok(());
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("read: {e}")),
            };
            // Parse straight from the shared buffer unless a partial frame is waiting.
            let mut pending = std::mem::take(&mut self.clients[key].rbuf);
            if pending.is_empty() {
                let consumed = self.handle_bytes(key, &scratch[..n])?;
                if !self.clients.contains(key) {
                    return Ok(());
                }
                if consumed < n {
                    self.clients[key].rbuf = scratch[consumed..n].to_vec();
                }
            } else {
                pending.extend_from_slice(&scratch[..n]);
                let consumed = self.handle_bytes(key, &pending)?;
                if !self.clients.contains(key) {
                    return Ok(());
                }
                pending.drain(..consumed);
                self.clients[key].rbuf = pending;
            }
        }
    }

    /// Handles the bytes `buf` received on `key`; returns how many were consumed.
    fn handle_bytes(&mut self, key: usize, buf: &[u8]) -> Result<usize, String> {
        let mut pos = 0;
        if self.clients[key].state == State::Upgrading {
            let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                if buf.len() > 8192 {
                    return Err("response head over 8 KiB".into());
                }
                return Ok(0);
            };
            if !buf.starts_with(b"HTTP/1.1 101") {
                let line = String::from_utf8_lossy(
                    &buf[..buf.iter().position(|&b| b == b'\r').unwrap_or(0)],
                )
                .into_owned();
                return Err(format!("upgrade refused: {line}"));
            }
            pos = end + 4;
            self.clients[key].state = State::Open;
            self.on_open(key);
        }
        let chat = self.opts.mode == Mode::Chat;
        let mut events = std::mem::take(&mut self.parsed);
        events.clear();
        let mut pongs: Vec<Vec<u8>> = Vec::new();
        let mut frag = self.clients[key].frag.take();
        let used = parse_frames(&buf[pos..], chat, &mut frag, |got, payload| {
            if got == Got::Ping {
                pongs.push(payload.to_vec());
            }
            events.push((got, payload.len()));
        })?;
        self.clients[key].frag = frag;
        for p in pongs {
            push_frame(&mut self.clients[key].wbuf, 0xA, &p);
        }
        let result = self.apply(key, &events).map(|()| pos + used);
        self.parsed = events;
        result
    }

    /// Acts on the messages parsed from one read.
    fn apply(&mut self, key: usize, events: &[(Got, usize)]) -> Result<(), String> {
        for &(got, len) in events {
            match got {
                Got::Reply => self.on_reply(key, len),
                Got::Token => {
                    if self.measuring {
                        self.counts.tokens += 1;
                    }
                }
                Got::Close => {
                    let c = &mut self.clients[key];
                    if c.state == State::Closing {
                        // The handshake is complete; the server closes TCP first (§7.1.1),
                        // so its side keeps TIME_WAIT. Drop our socket now.
                        self.finish(key, None);
                        return Ok(());
                    }
                    push_frame(&mut c.wbuf, 0x8, &[]);
                    let _ = self.write(key);
                    self.finish(key, Some("server closed the WebSocket".into()));
                    return Ok(());
                }
                Got::Ping | Got::Other => {}
            }
        }
        Ok(())
    }

    /// Writes queued bytes until done or the socket would block.
    fn write(&mut self, key: usize) -> Result<(), String> {
        let c = &mut self.clients[key];
        while c.wpos < c.wbuf.len() {
            match c.stream.write(&c.wbuf[c.wpos..]) {
                Ok(0) => return Err("write returned 0".into()),
                Ok(n) => c.wpos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("write: {e}")),
            }
        }
        if c.wpos == c.wbuf.len() {
            c.wbuf.clear();
            c.wpos = 0;
        } else if c.wpos > 64 * 1024 {
            c.wbuf.drain(..c.wpos);
            c.wpos = 0;
        }
        Ok(())
    }

    /// Waits at most `wait` for readiness and handles it; then refills churn slots.
    fn poll_once(&mut self, events: &mut Events, wait: Duration) -> io::Result<()> {
        match self.poll.poll(events, Some(wait)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e),
        }
        for ev in events.iter() {
            self.ready(ev.token().0);
        }
        if self.opts.mode == Mode::Churn && !self.stopping {
            while self.clients.len() < self.opts.conns {
                self.connect();
            }
        }
        Ok(())
    }

    /// Runs the event loop until `until` returns true (then `true`) or `deadline` passes.
    fn pump(
        &mut self,
        events: &mut Events,
        deadline: Instant,
        mut until: impl FnMut(&Gen) -> bool,
    ) -> io::Result<bool> {
        loop {
            if until(self) {
                return Ok(true);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            self.poll_once(events, (deadline - now).min(Duration::from_millis(10)))?;
        }
    }

    /// Opens `--conns` connections, at most `--open-concurrency` of them handshaking at
    /// once (a burst of thousands of SYNs would overflow the listen backlog). `false` on the
    /// first error or at `--timeout-secs`.
    fn open_all(&mut self, events: &mut Events) -> io::Result<bool> {
        let deadline = Instant::now() + Duration::from_secs_f64(self.opts.timeout_secs);
        let target = self.opts.conns;
        while (self.counts.opened as usize) < target {
            if self.counts.errors > 0 || Instant::now() >= deadline {
                return Ok(false);
            }
            while self.next_index < target
                && self.next_index - (self.counts.opened as usize) < self.opts.open_concurrency
            {
                self.connect();
            }
            self.poll_once(events, Duration::from_millis(10))?;
        }
        Ok(self.counts.errors == 0)
    }
}

/// Percentile `p` (0–100) of sorted samples, in microseconds.
fn pct_us(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn main() -> ExitCode {
    let opts = match parse_opts() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("loadgen: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(opts) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(opts: Opts) -> io::Result<ExitCode> {
    let mode = opts.mode;
    let pid = opts.pid;
    if pid.is_none() {
        eprintln!("loadgen: no --pid: server CPU and memory are not reported");
    }
    let me = std::process::id();
    let rss_start = pid.and_then(rss_kib);
    let anon_start = pid.and_then(|p| status_kib(p, "RssAnon:"));
    let mut g = Gen::new(opts)?;
    let mut events = Events::with_capacity(1024);
    let t_open = Instant::now();

    // Open the connections (churn: its slots start in the loop itself).
    let open_conns = if mode == Mode::Churn { 0 } else { g.opts.conns };
    if open_conns > 0 && !g.open_all(&mut events)? {
        eprintln!(
            "loadgen: opened {} of {} connections: {}",
            g.counts.opened,
            g.opts.conns,
            g.last_error.as_deref().unwrap_or("timed out")
        );
        return Ok(ExitCode::FAILURE);
    }
    let open_secs = t_open.elapsed().as_secs_f64();

    let mut out = json!({
        "mode": mode.name(),
        "label": g.opts.label,
        "conns": g.opts.conns,
        "path": g.opts.path,
    });

    if mode == Mode::Idle {
        if g.opts.warm {
            let deadline = Instant::now() + Duration::from_secs_f64(g.opts.timeout_secs);
            g.pump(&mut events, deadline, |g| {
                g.clients.iter().all(|(_, c)| c.warmed)
            })?;
        }
        // Let the server settle (lazy frees, deferred work) before reading its memory.
        g.pump(
            &mut events,
            Instant::now() + Duration::from_millis(500),
            |_| false,
        )?;
        let rss_after = pid.and_then(rss_kib);
        let n = g.opts.conns as f64;
        println!(
            "mode idle: {} connections on {} opened in {open_secs:.2} s{}",
            g.opts.conns,
            g.opts.path,
            if g.opts.warm { " (one echo each)" } else { "" }
        );
        if let (Some(b), Some(a)) = (rss_start, rss_after) {
            let per = (a as f64 - b as f64) * 1024.0 / n;
            println!(
                "server RSS at start:     {b} KiB ({:.2} MiB)",
                b as f64 / 1024.0
            );
            println!(
                "server RSS with conns:   {a} KiB ({:.2} MiB)",
                a as f64 / 1024.0
            );
            println!(
                "per idle connection:     {per:.0} bytes ({:.2} KiB)",
                per / 1024.0
            );
            out["rss_start_kib"] = json!(b);
            out["anon_start_kib"] = json!(anon_start);
            out["rss_kib"] = json!(a);
            out["bytes_per_conn"] = json!(per.round());
        }
        out["warm"] = json!(g.opts.warm);
        out["open_secs"] = json!(open_secs);
        out["errors"] = json!(g.counts.errors);
        println!("{out}");
        return Ok(ExitCode::SUCCESS);
    }

    if mode == Mode::Churn {
        for _ in 0..g.opts.conns {
            g.connect();
        }
    }
    // Warm up, then measure.
    g.pump(
        &mut events,
        Instant::now() + Duration::from_secs_f64(g.opts.warmup_secs),
        |_| false,
    )?;
    let errors_before = g.counts.errors;
    let server_cpu0 = pid.and_then(cpu_ns);
    let split0 = pid.and_then(user_sys_ticks);
    let own_cpu0 = cpu_ns(me);
    let t0 = Instant::now();
    g.measuring = true;
    let count = g.opts.count.unwrap_or(u64::MAX);
    g.pump(
        &mut events,
        t0 + Duration::from_secs_f64(g.opts.secs),
        |g| g.counts.done >= count,
    )?;
    let elapsed = t0.elapsed().as_secs_f64();
    let server_cpu1 = pid.and_then(cpu_ns);
    let split1 = pid.and_then(user_sys_ticks);
    let own_cpu1 = cpu_ns(me);
    g.measuring = false;
    g.stopping = true;
    let rss_end = pid.and_then(rss_kib);

    let done = g.counts.done;
    let rate = done as f64 / elapsed;
    let mut samples = std::mem::take(&mut g.samples);
    samples.sort_unstable();
    let (p50, p99, p999) = (
        pct_us(&samples, 50.0),
        pct_us(&samples, 99.0),
        pct_us(&samples, 99.9),
    );
    let unit = match mode {
        Mode::Churn => "cycles",
        Mode::Chat => "turns",
        _ => "msgs",
    };
    println!(
        "mode {}: {} conns x {} in flight, {} B, path {}, {:.2} s measured",
        mode.name(),
        g.opts.conns,
        g.opts.inflight,
        g.opts.size_bytes,
        g.opts.path,
        elapsed
    );
    println!("completed:               {done} {unit} ({rate:.0} {unit}/s)");
    println!("latency us:              p50 {p50:.1}  p99 {p99:.1}  p99.9 {p999:.1}");
    out["inflight"] = json!(g.opts.inflight);
    out["size"] = json!(g.opts.size_bytes);
    out["secs"] = json!(elapsed);
    out["done"] = json!(done);
    out["rate"] = json!(rate.round());
    out["p50_us"] = json!(p50);
    out["p99_us"] = json!(p99);
    out["p999_us"] = json!(p999);
    if mode == Mode::Chat {
        let per_turn = g.counts.tokens as f64 / done.max(1) as f64;
        println!(
            "chat_token frames:       {} ({per_turn:.0} per turn)",
            g.counts.tokens
        );
        out["tokens"] = json!(g.counts.tokens);
    }
    if let (Some(a), Some(b)) = (server_cpu0, server_cpu1) {
        let us = (b - a) as f64 / 1000.0 / done.max(1) as f64;
        let util = (b - a) as f64 / 1e9 / elapsed * 100.0;
        println!(
            "server CPU:              {us:.2} us per {} ({util:.0} % of a core)",
            &unit[..unit.len() - 1]
        );
        out["server_cpu_us"] = json!(us);
        out["server_util_pct"] = json!(util.round());
        if let (Some((u0, s0)), Some((u1, s1))) = (split0, split1) {
            let (user, sys) = (u1.saturating_sub(u0), s1.saturating_sub(s0));
            let user_share = user as f64 / (user + sys).max(1) as f64;
            println!(
                "  of which user space:   {:.2} us ({:.0} %; the rest is the kernel)",
                us * user_share,
                user_share * 100.0
            );
            out["server_user_us"] = json!(us * user_share);
        }
    }
    if let (Some(a), Some(b)) = (own_cpu0, own_cpu1) {
        let us = (b - a) as f64 / 1000.0 / done.max(1) as f64;
        let util = (b - a) as f64 / 1e9 / elapsed * 100.0;
        println!(
            "loadgen CPU:             {us:.2} us per {} ({util:.0} % of a core)",
            &unit[..unit.len() - 1]
        );
        out["loadgen_cpu_us"] = json!(us);
        out["loadgen_util_pct"] = json!(util.round());
    }
    if let Some(r) = rss_end {
        println!("server RSS at end:       {r} KiB");
        out["rss_kib"] = json!(r);
    }
    let errors = g.counts.errors - errors_before;
    if errors > 0 {
        println!(
            "errors in window:        {errors} (last: {})",
            g.last_error.as_deref().unwrap_or("?")
        );
    }
    out["errors"] = json!(errors);
    println!("{out}");
    Ok(ExitCode::SUCCESS)
}
