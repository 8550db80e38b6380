//! Measures straycat's openai agent under many concurrent streamed turns, against the mock
//! upstream of `examples/mock_llm.rs` (`bench/llm.sh` runs the whole thing).
//!
//! ```text
//! cargo build --release --bin straycat --example mock_llm --example llm_bench
//! target/release/examples/mock_llm --listen 127.0.0.1:18080 &
//! target/release/straycat --listen 127.0.0.1:18081 --agent openai --openai-model m \
//!     --openai-url http://127.0.0.1:18080/v1 --openai-max-concurrent 200 --log-level warn &
//! target/release/examples/llm_bench chat   --addr 127.0.0.1:18081 --pid $! --mock 127.0.0.1:18080 --users 200
//! target/release/examples/llm_bench direct --mock 127.0.0.1:18080 --users 200
//! ```
//!
//! Modes:
//! - `chat`: opens `--users` WebSocket sessions (`/ws/bench{i}`, tungstenite's client
//!   handshake, then non-blocking sockets on one `mio` loop, so the client is one thread),
//!   lets them sit idle for `--settle-ms`, then runs `--rounds` rounds: in each, every user
//!   sends one message at once and the round ends at the last `chat` frame. Per round: the
//!   wall time from the first send to the last `chat`; each user's time to its first
//!   `chat_token`; straycat's CPU (all its threads' run time from `/proc/PID/task/*/schedstat`,
//!   and `utime`/`stime` of `/proc/PID/stat`, over the round plus a 200 ms tail; also from
//!   the sends to every user's 2nd token, the turns' start, and from there to every user's
//!   second-to-last token, relaying only) and its run-queue wait (the second schedstat
//!   field: time it was ready to run but had no core, which other load causes); its thread
//!   count (`Threads:` of `/proc/PID/status`, sampled every `--sample-ms` by a second thread
//!   from the start to the end); its memory (`VmRSS`/`RssAnon` of `status`, and the exact
//!   `Rss`/`Anonymous` of `smaps_rollup`) idle before the round, at the moment every user has
//!   had `--peak-token` tokens (all turns in flight), and after the round.
//! - `direct`: `--users` concurrent streamed requests straight to the mock (non-blocking
//!   sockets, one thread), each its own connection: the wall time and each request's time
//!   from its connect to its first content chunk.
//!
//! Both modes read the mock's `/stats` after each round: when each request reached it and
//! when it wrote each content chunk (wall clock, µs), matched to the client's own
//! timestamps by the message text, which gives each token's relay delay (mock write to
//! client receipt) and each turn's upstream delay (client send to request at the mock).
//! The client's own CPU (all its threads) and the mock's (`--mock-pid`) are reported too,
//! to show neither is the bottleneck. Output: a human-readable summary on stderr, then one
//! JSON line on stdout. 127.0.0.1 only; every wait is bounded by `--timeout-secs`.

use mio::net::TcpStream as MioStream;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use serde_json::{Value, json};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tungstenite::{Message, WebSocket};

/// Samples the sampler thread keeps at most (≈ 33 min at 10 ms).
const MAX_SAMPLES: usize = 200_000;
/// Token timestamps kept per user and round.
const MAX_TOKENS_KEPT: usize = 4096;
/// Time after the last `chat` still counted as the round's (the turns' clean-up).
const TAIL: Duration = Duration::from_millis(200);
/// The largest `/stats` answer read.
const MAX_STATS_BYTES: u64 = 64 * 1024 * 1024;
/// The largest response head read in `direct` mode.
const MAX_HEAD_BYTES: usize = 16 * 1024;

const USAGE: &str =
    "usage: llm_bench chat   --addr 127.0.0.1:PORT --pid PID --mock 127.0.0.1:PORT [options]
       llm_bench direct --mock 127.0.0.1:PORT [options]
  --users N         concurrent users / requests (200)
  --rounds R        rounds, each one turn per user (1)
  --tokens N        content tokens the mock sends per answer, to check the count (20)
  --mock-pid PID    the mock's process, for its CPU
  --peak-token K    chat: read the server's memory once every user has K tokens (10)
  --settle-ms MS    chat: idle time after connecting and after each round (500)
  --sample-ms MS    chat: thread and memory sampling period (10)
  --timeout-secs S  bound of connecting and of each round (60)
  --model NAME      direct: the request's model (m)
  --label NAME      copied into the JSON line
  --dump PATH       append one CSV line per turn (label, round, user, then ms after the round's
                    start: sent, at the mock, first token written by the mock, first token
                    received, last token written, last token received, done)";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Chat,
    Direct,
}

struct Opts {
    mode: Mode,
    addr: SocketAddr,
    mock: SocketAddr,
    pid: Option<u32>,
    mock_pid: Option<u32>,
    users: usize,
    rounds: usize,
    tokens: usize,
    peak_token: usize,
    settle: Duration,
    sample_every: Duration,
    timeout: Duration,
    model: String,
    label: String,
    dump: Option<String>,
}

fn parse_opts() -> Result<Opts, String> {
    let mut args = std::env::args().skip(1);
    let mode = match args.next().as_deref() {
        Some("chat") => Mode::Chat,
        Some("direct") => Mode::Direct,
        Some(other) => return Err(format!("unknown mode {other:?}")),
        None => return Err("a mode is required".into()),
    };
    let mut o = Opts {
        mode,
        addr: SocketAddr::from(([127, 0, 0, 1], 1865)),
        mock: SocketAddr::from(([127, 0, 0, 1], 18080)),
        pid: None,
        mock_pid: None,
        users: 200,
        rounds: 1,
        tokens: 20,
        peak_token: 10,
        settle: Duration::from_millis(500),
        sample_every: Duration::from_millis(10),
        timeout: Duration::from_secs(60),
        model: "m".into(),
        label: String::new(),
        dump: None,
    };
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = || format!("bad value for {flag}: {value:?}");
        let ms = |v: &str| {
            v.parse::<u64>()
                .map(Duration::from_millis)
                .map_err(|_| bad())
        };
        match flag.as_str() {
            "--addr" => o.addr = value.parse().map_err(|_| bad())?,
            "--mock" => o.mock = value.parse().map_err(|_| bad())?,
            "--pid" => o.pid = Some(value.parse().map_err(|_| bad())?),
            "--mock-pid" => o.mock_pid = Some(value.parse().map_err(|_| bad())?),
            "--users" => o.users = value.parse().map_err(|_| bad())?,
            "--rounds" => o.rounds = value.parse().map_err(|_| bad())?,
            "--tokens" => o.tokens = value.parse().map_err(|_| bad())?,
            "--peak-token" => o.peak_token = value.parse().map_err(|_| bad())?,
            "--settle-ms" => o.settle = ms(&value)?,
            "--sample-ms" => o.sample_every = ms(&value)?,
            "--timeout-secs" => o.timeout = Duration::from_secs(value.parse().map_err(|_| bad())?),
            "--model" => o.model = value,
            "--label" => o.label = value,
            "--dump" => o.dump = Some(value),
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    for a in [o.addr, o.mock] {
        if !a.ip().is_loopback() {
            return Err(format!(
                "{a} is not a loopback address; llm_bench stays on this machine"
            ));
        }
    }
    if !(1..=10_000).contains(&o.users) || !(1..=100).contains(&o.rounds) {
        return Err("--users must be in 1..=10000 and --rounds in 1..=100".into());
    }
    if o.timeout.is_zero() || o.timeout > Duration::from_secs(600) {
        return Err("--timeout-secs must be in 1..=600".into());
    }
    if o.sample_every.is_zero() || o.settle > Duration::from_secs(60) {
        return Err("--sample-ms must be at least 1 and --settle-ms at most 60000".into());
    }
    if o.mode == Mode::Chat && o.pid.is_none() {
        return Err("chat needs --pid (the server's process)".into());
    }
    Ok(o)
}

// ---------------------------------------------------------------- /proc

/// Wall-clock microseconds since the Unix epoch (the mock stamps with the same clock).
fn wall_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Run time and run-queue wait of every thread of `pid`, in nanoseconds (the first two
/// fields of `/proc/PID/task/*/schedstat`; threads that exited are not counted: use it for
/// processes whose threads live throughout).
fn sched_ns(pid: u32) -> Option<(u64, u64)> {
    let (mut run, mut wait) = (0u64, 0u64);
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let path = entry.ok()?.path().join("schedstat");
        if let Ok(s) = std::fs::read_to_string(path) {
            let mut f = s.split_whitespace();
            run += f.next()?.parse::<u64>().ok()?;
            wait += f.next()?.parse::<u64>().ok()?;
        }
    }
    Some((run, wait))
}

/// `utime` and `stime` of `pid` (every thread, exited ones included), in clock ticks.
fn ticks(pid: u32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace().skip(11);
    Some((fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
}

/// The value in kB (or the count) of field `name` in a `/proc` file's text.
fn field(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    line[name.len()..].split_whitespace().next()?.parse().ok()
}

/// Threads, VmRSS and RssAnon (KiB) of `/proc/PID/status`.
#[derive(Clone, Copy, Default)]
struct Status {
    threads: u64,
    rss_kib: u64,
    anon_kib: u64,
}

fn status(pid: u32) -> Option<Status> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(Status {
        threads: field(&s, "Threads:")?,
        rss_kib: field(&s, "VmRSS:")?,
        anon_kib: field(&s, "RssAnon:")?,
    })
}

/// Memory from both sources: `status` (the kernel's per-CPU counters, which may lag by a
/// few dozen pages) and `smaps_rollup` (a walk of the page tables: exact).
#[derive(Clone, Copy, Default)]
struct Mem {
    rss_kib: u64,
    anon_kib: u64,
    exact_rss_kib: u64,
    exact_anon_kib: u64,
}

fn mem(pid: u32) -> Option<Mem> {
    let st = status(pid)?;
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    Some(Mem {
        rss_kib: st.rss_kib,
        anon_kib: st.anon_kib,
        exact_rss_kib: field(&rollup, "Rss:")?,
        exact_anon_kib: field(&rollup, "Anonymous:")?,
    })
}

fn mem_json(m: Mem) -> Value {
    json!({"rss_kib": m.rss_kib, "anon_kib": m.anon_kib,
           "exact_rss_kib": m.exact_rss_kib, "exact_anon_kib": m.exact_anon_kib})
}

/// Bytes per user of the growth from `a` to `b`: VmRSS, RssAnon, exact Rss, exact Anonymous.
fn per_user(a: Mem, b: Mem, users: usize) -> Value {
    let f = |x: u64, y: u64| (y as f64 - x as f64) * 1024.0 / users as f64;
    json!({"rss_b": f(a.rss_kib, b.rss_kib), "anon_b": f(a.anon_kib, b.anon_kib),
           "exact_rss_b": f(a.exact_rss_kib, b.exact_rss_kib),
           "exact_anon_b": f(a.exact_anon_kib, b.exact_anon_kib)})
}

/// One reading of the sampler.
struct Sample {
    at: Instant,
    st: Status,
}

/// A thread reading `/proc/PID/status` every period until stopped.
struct Sampler {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Vec<Sample>>,
}

impl Sampler {
    fn start(pid: u32, every: Duration) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = thread::spawn(move || {
            let mut out = Vec::new();
            let mut next = Instant::now();
            while !flag.load(Ordering::Relaxed) && out.len() < MAX_SAMPLES {
                let Some(st) = status(pid) else { break };
                out.push(Sample {
                    at: Instant::now(),
                    st,
                });
                next += every;
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    thread::sleep(wait);
                } else {
                    next = Instant::now();
                }
            }
            out
        });
        Sampler { stop, handle }
    }

    fn finish(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or_default()
    }
}

/// CPU readings of the processes involved and of the machine, at one instant.
#[derive(Clone, Default)]
struct Cpu {
    server_ns: u64,
    /// Time the server was runnable but waited for a core.
    server_wait_ns: u64,
    server_ticks: (u64, u64),
    own_ns: u64,
    own_wait_ns: u64,
    mock_ticks: (u64, u64),
    /// Per core (`cpuN` of `/proc/stat`): busy ticks, all ticks, stolen ticks.
    cores: Vec<(u64, u64, u64)>,
}

fn cpu(o: &Opts) -> Cpu {
    let (server_ns, server_wait_ns) = o.pid.and_then(sched_ns).unwrap_or((0, 0));
    let (own_ns, own_wait_ns) = sched_ns(std::process::id()).unwrap_or((0, 0));
    Cpu {
        server_ns,
        server_wait_ns,
        server_ticks: o.pid.and_then(ticks).unwrap_or((0, 0)),
        own_ns,
        own_wait_ns,
        mock_ticks: o.mock_pid.and_then(ticks).unwrap_or((0, 0)),
        cores: cores(),
    }
}

/// Busy, total and stolen ticks of each core, from `/proc/stat`.
fn cores() -> Vec<(u64, u64, u64)> {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return Vec::new();
    };
    stat.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .map(|l| {
            // user nice system idle iowait irq softirq steal ...
            let v: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .take(8)
                .filter_map(|x| x.parse().ok())
                .collect();
            let get = |i: usize| v.get(i).copied().unwrap_or(0);
            let total: u64 = v.iter().sum();
            (total - get(3) - get(4), total, get(7))
        })
        .collect()
}

/// The growth from `a` to `b` over `secs`, as JSON; `tokens` relayed in it.
fn cpu_json(a: &Cpu, b: &Cpu, secs: f64, tokens: u64, with_server: bool) -> Value {
    let hz = 100.0; // USER_HZ: clock ticks per second on Linux
    let server_ns = b.server_ns.saturating_sub(a.server_ns);
    let user = b.server_ticks.0.saturating_sub(a.server_ticks.0);
    let sys = b.server_ticks.1.saturating_sub(a.server_ticks.1);
    let own_ns = b.own_ns.saturating_sub(a.own_ns);
    let mock = (b.mock_ticks.0 + b.mock_ticks.1).saturating_sub(a.mock_ticks.0 + a.mock_ticks.1);
    let pct = |x: u64, of: u64| x as f64 * 100.0 / of.max(1) as f64;
    let busy: Vec<f64> = a
        .cores
        .iter()
        .zip(&b.cores)
        .map(|(x, y)| pct(y.0 - x.0, y.1 - x.1))
        .collect();
    let steal: Vec<f64> = a
        .cores
        .iter()
        .zip(&b.cores)
        .map(|(x, y)| pct(y.2 - x.2, y.1 - x.1))
        .collect();
    let mut out = json!({
        "secs": secs,
        "client_cpu_ns": own_ns,
        "client_util_pct": own_ns as f64 / 1e9 / secs * 100.0,
        "client_runqueue_wait_ms": b.own_wait_ns.saturating_sub(a.own_wait_ns) as f64 / 1e6,
        "mock_ticks": mock,
        "mock_util_pct": mock as f64 / hz / secs * 100.0,
        "core_busy_pct": busy,
        "core_steal_pct": steal,
    });
    if with_server {
        out["server_cpu_ns"] = json!(server_ns);
        out["server_us_per_token"] = json!(server_ns as f64 / 1000.0 / tokens.max(1) as f64);
        out["server_utime_ticks"] = json!(user);
        out["server_stime_ticks"] = json!(sys);
        out["server_ticks_us_per_token"] =
            json!((user + sys) as f64 / hz * 1e6 / tokens.max(1) as f64);
        out["server_util_pct"] = json!(server_ns as f64 / 1e9 / secs * 100.0);
        out["server_runqueue_wait_ms"] =
            json!(b.server_wait_ns.saturating_sub(a.server_wait_ns) as f64 / 1e6);
    }
    out
}

// ---------------------------------------------------------------- statistics

/// Percentile `p` (0–100) of `v` (sorted here), nearest rank; NaN when empty.
fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((p / 100.0) * (v.len() - 1) as f64).round() as usize]
}

/// p50, p99 and max of `v` (milliseconds or microseconds: whatever `v` holds).
fn dist(mut v: Vec<f64>) -> Value {
    let p50 = pct(&mut v, 50.0);
    let p99 = pct(&mut v, 99.0);
    let max = pct(&mut v, 100.0);
    json!({"n": v.len(), "p50": p50, "p99": p99, "max": max})
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

// ---------------------------------------------------------------- the mock's /stats

/// `GET path` on the mock (a `Connection: close` answer), the body as JSON.
fn http_get(addr: SocketAddr, path: &str) -> Result<Value, String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect to the mock: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .map_err(|e| format!("ask the mock: {e}"))?;
    let mut buf = Vec::new();
    s.take(MAX_STATS_BYTES)
        .read_to_end(&mut buf)
        .map_err(|e| format!("read the mock's answer: {e}"))?;
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("the mock's answer has no head")?;
    serde_json::from_slice(&buf[end + 4..]).map_err(|e| format!("the mock's /stats: {e}"))
}

/// One request the mock recorded: when it came, when each content chunk went out.
struct MockRecord {
    request_us: u64,
    tokens_us: Vec<u64>,
}

fn mock_record(stats: &Value, tag: &str) -> Option<MockRecord> {
    let r = stats.get("records")?.get(tag)?;
    Some(MockRecord {
        request_us: r.get("request_us")?.as_u64()?,
        tokens_us: r
            .get("tokens_us")?
            .as_array()?
            .iter()
            .filter_map(Value::as_u64)
            .collect(),
    })
}

/// What one user (or direct request) saw in one round.
#[derive(Default)]
struct Turn {
    /// The message text (also the mock's record key).
    tag: String,
    sent: Option<Instant>,
    sent_wall: u64,
    first: Option<Instant>,
    tokens: usize,
    /// Receipt instants of the tokens (wall clock, µs).
    tokens_wall: Vec<u64>,
    text: String,
    done: Option<Instant>,
    failed: Option<String>,
}

impl Turn {
    fn new(tag: String) -> Turn {
        Turn {
            tag,
            sent: Some(Instant::now()),
            sent_wall: wall_us(),
            ..Turn::default()
        }
    }

    fn token(&mut self, piece: &str) {
        let now = Instant::now();
        self.first.get_or_insert(now);
        self.tokens += 1;
        if self.tokens_wall.len() < MAX_TOKENS_KEPT {
            self.tokens_wall.push(wall_us());
        }
        if self.text.len() < 1 << 20 {
            self.text.push_str(piece);
        }
    }

    fn ended(&self) -> bool {
        self.done.is_some() || self.failed.is_some()
    }
}

/// What the turns of one round measured: timing, the mock's view, the errors.
fn turns_json(turns: &[Turn], t0: Instant, stats: &Value, expect_tokens: usize) -> Value {
    let mut ttft = Vec::new();
    let mut relay = Vec::new();
    let mut relay_first = Vec::new();
    let mut upstream = Vec::new();
    let mut outside = Vec::new();
    let mut mock_late = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    let mut failed = 0;
    let mut last = t0;
    for t in turns {
        if let Some(e) = &t.failed {
            errors.push(e.clone());
            failed += 1;
            continue;
        }
        if t.tokens != expect_tokens {
            errors.push(format!("{} tokens instead of {expect_tokens}", t.tokens));
            failed += 1;
        }
        if let (Some(s), Some(f)) = (t.sent, t.first) {
            ttft.push(ms(f - s));
        }
        if let Some(d) = t.done {
            last = last.max(d);
        }
        if let Some(r) = mock_record(stats, &t.tag) {
            let to_mock = (r.request_us as f64 - t.sent_wall as f64) / 1000.0;
            upstream.push(to_mock);
            if let (Some(put), Some(got), Some(s), Some(f)) =
                (r.tokens_us.first(), t.tokens_wall.first(), t.sent, t.first)
            {
                // The time to the first token that is not the model's own: getting the
                // request to the mock, and the first token back from it.
                outside.push(to_mock + (*got as f64 - *put as f64) / 1000.0);
                // How much later than its schedule the mock wrote the first token.
                mock_late.push(ms(f - s) - outside[outside.len() - 1]);
            }
            for (k, (got, put)) in t.tokens_wall.iter().zip(&r.tokens_us).enumerate() {
                let d = (*got as f64 - *put as f64) / 1000.0;
                relay.push(d);
                if k == 0 {
                    relay_first.push(d);
                }
            }
        }
    }
    errors.sort();
    errors.dedup();
    json!({
        "wall_ms": ms(last - t0),
        "ttft_ms": dist(ttft),
        "relay_ms": dist(relay),
        "relay_first_ms": dist(relay_first),
        "upstream_request_ms": dist(upstream),
        "ttft_outside_model_ms": dist(outside),
        "ttft_model_ms": dist(mock_late),
        "tokens": turns.iter().map(|t| t.tokens).sum::<usize>(),
        "failed": failed,
        "errors": errors.into_iter().take(5).collect::<Vec<_>>(),
        "mock_peak_active": stats.get("peak_active").cloned().unwrap_or(Value::Null),
        "mock_served": stats.get("served").cloned().unwrap_or(Value::Null),
        "mock_refused": stats.get("refused").cloned().unwrap_or(Value::Null),
    })
}

/// Appends one CSV line per turn to `--dump` (see the usage text for the columns).
fn dump(o: &Opts, round: usize, turns: &[Turn], t0: Instant, t0_wall: u64, stats: &Value) {
    let Some(path) = &o.dump else {
        return;
    };
    let at = |us: u64| format!("{:.3}", (us as f64 - t0_wall as f64) / 1000.0);
    let mut out = String::new();
    for (i, t) in turns.iter().enumerate() {
        let r = mock_record(stats, &t.tag);
        let opt = |v: Option<u64>| v.map(at).unwrap_or_default();
        out.push_str(&format!(
            "{},{round},{i},{},{},{},{},{},{},{}\n",
            o.label,
            at(t.sent_wall),
            opt(r.as_ref().map(|r| r.request_us)),
            opt(r.as_ref().and_then(|r| r.tokens_us.first().copied())),
            opt(t.tokens_wall.first().copied()),
            opt(r.as_ref().and_then(|r| r.tokens_us.last().copied())),
            opt(t.tokens_wall.last().copied()),
            t.done
                .map(|d| format!("{:.3}", ms(d - t0)))
                .unwrap_or_default(),
        ));
    }
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(out.as_bytes()));
    if let Err(e) = written {
        eprintln!("llm_bench: cannot write {path}: {e}");
    }
}

// ---------------------------------------------------------------- chat mode

/// One WebSocket user.
struct User {
    ws: WebSocket<TcpStream>,
    /// A message is waiting in tungstenite's buffer for the socket.
    need_flush: bool,
    turn: Turn,
}

fn connect_user(o: &Opts, i: usize) -> Result<WebSocket<TcpStream>, String> {
    let stream = TcpStream::connect_timeout(&o.addr, Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let url = format!("ws://{}/ws/bench{i}", o.addr);
    let (ws, _) = tungstenite::client(url.as_str(), stream).map_err(|e| match e {
        tungstenite::HandshakeError::Failure(e) => format!("upgrade: {e}"),
        tungstenite::HandshakeError::Interrupted(_) => "upgrade interrupted".into(),
    })?;
    ws.get_ref()
        .set_nonblocking(true)
        .map_err(|e| e.to_string())?;
    Ok(ws)
}

/// Handles one text frame from the server.
fn on_frame(turn: &mut Turn, text: &str) {
    let Ok(v) = serde_json::from_str::<Value>(text) else {
        turn.failed = Some(format!("not JSON: {text:.80}"));
        return;
    };
    match v.get("type").and_then(Value::as_str) {
        Some("chat_token") => turn.token(v.get("content").and_then(Value::as_str).unwrap_or("")),
        Some("chat") => {
            turn.done = Some(Instant::now());
            if v.get("text").and_then(Value::as_str) != Some(turn.text.as_str()) {
                turn.failed = Some("the chat text is not the tokens put together".into());
            }
        }
        Some("error") => {
            let name = v.get("name").and_then(Value::as_str).unwrap_or("?");
            let why = v.get("description").and_then(Value::as_str).unwrap_or("");
            turn.failed = Some(format!("error {name}: {why:.120}"));
        }
        _ => {}
    }
}

/// Reads what `user` has until the socket would block (the readiness is edge-triggered).
fn drain(user: &mut User) {
    loop {
        match user.ws.read() {
            Ok(Message::Text(t)) => on_frame(&mut user.turn, t.as_str()),
            Ok(Message::Close(_)) => {
                user.turn.failed = Some("the server closed the WebSocket".into());
                break;
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => {
                if user.turn.failed.is_none() {
                    user.turn.failed = Some(format!("read: {e}"));
                }
                break;
            }
        }
    }
    if user.need_flush {
        flush(user);
    }
}

fn flush(user: &mut User) {
    match user.ws.flush() {
        Ok(()) => user.need_flush = false,
        Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => user.turn.failed = Some(format!("write: {e}")),
    }
}

/// Polls the users' sockets until `until` (called before every wait) says so, then `true`,
/// or until `deadline`, then `false`.
fn pump(
    poll: &mut Poll,
    events: &mut Events,
    users: &mut [User],
    deadline: Instant,
    mut until: impl FnMut(&[User]) -> bool,
) -> io::Result<bool> {
    loop {
        if until(users) {
            return Ok(true);
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(false);
        }
        let pending = users.iter().any(|u| u.need_flush);
        let wait = (deadline - now).min(Duration::from_millis(if pending { 1 } else { 20 }));
        match poll.poll(events, Some(wait)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for ev in events.iter() {
            if let Some(u) = users.get_mut(ev.token().0) {
                drain(u);
            }
        }
        if pending {
            for u in users.iter_mut().filter(|u| u.need_flush) {
                flush(u);
            }
        }
    }
}

fn run_chat(o: &Opts) -> Result<Value, String> {
    let pid = o.pid.ok_or("no --pid")?;
    let st_start = status(pid).ok_or("cannot read the server's /proc status")?;
    let sampler = Sampler::start(pid, o.sample_every);
    let t_start = Instant::now();
    let mut poll = Poll::new().map_err(|e| e.to_string())?;
    let mut events = Events::with_capacity(1024);
    let mut users = Vec::with_capacity(o.users);
    let open_deadline = Instant::now() + o.timeout;
    for i in 0..o.users {
        if Instant::now() >= open_deadline {
            return Err(format!("opened {i} of {} sessions in time", o.users));
        }
        let ws = connect_user(o, i).map_err(|e| format!("user {i}: {e}"))?;
        let fd = ws.get_ref().as_raw_fd();
        poll.registry()
            .register(&mut SourceFd(&fd), Token(i), Interest::READABLE)
            .map_err(|e| e.to_string())?;
        users.push(User {
            ws,
            need_flush: false,
            turn: Turn::default(),
        });
    }
    let open_ms = ms(t_start.elapsed());
    let settle = |poll: &mut Poll, events: &mut Events, users: &mut [User]| {
        pump(poll, events, users, Instant::now() + o.settle, |_| false)
    };
    settle(&mut poll, &mut events, &mut users).map_err(|e| e.to_string())?;
    let mut idle = mem(pid).ok_or("cannot read the server's memory")?;
    let idle_first = idle;
    let threads_idle = status(pid).map(|s| s.threads).unwrap_or(0);
    let mut rounds = Vec::new();
    let mut windows = Vec::new();
    for r in 1..=o.rounds {
        let _ = http_get(o.mock, "/stats?reset=1");
        let c0 = cpu(o);
        let t0 = Instant::now();
        let t0_wall = wall_us();
        for (i, u) in users.iter_mut().enumerate() {
            u.turn = Turn::new(format!("bench r{r} u{i}: tell me a story about a cat"));
            let msg = json!({ "text": u.turn.tag }).to_string();
            match u.ws.send(Message::text(msg)) {
                Ok(()) => {}
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    u.need_flush = true;
                }
                Err(e) => u.turn.failed = Some(format!("send: {e}")),
            }
        }
        let send_ms = ms(t0.elapsed());
        let deadline = t0 + o.timeout;
        // Memory once every user has had `peak_token` tokens: all turns in flight.
        let mut at_peak: Option<(Mem, f64)> = None;
        let k = o.peak_token;
        // CPU once every user has had 2 tokens and once every user has had all but one:
        // between the two, only tokens are relayed (no turn starts or ends).
        let (k_a, k_b) = (2, o.tokens.saturating_sub(1));
        let mut mark_a: Option<(Cpu, usize, Instant)> = None;
        let mut mark_b: Option<(Cpu, usize, Instant)> = None;
        let all_in = pump(&mut poll, &mut events, &mut users, deadline, |us| {
            let all_had = |k: usize| us.iter().all(|u| u.turn.tokens >= k || u.turn.ended());
            let sum = || us.iter().map(|u| u.turn.tokens).sum::<usize>();
            if mark_a.is_none() && all_had(k_a) {
                mark_a = Some((cpu(o), sum(), Instant::now()));
            }
            if mark_b.is_none() && mark_a.is_some() && all_had(k_b) {
                mark_b = Some((cpu(o), sum(), Instant::now()));
            }
            if at_peak.is_none() && all_had(k) {
                at_peak = mem(pid).map(|m| (m, ms(t0.elapsed())));
            }
            us.iter().all(|u| u.turn.ended())
        })
        .map_err(|e| e.to_string())?;
        let t_last = users.iter().filter_map(|u| u.turn.done).max().unwrap_or(t0);
        let c_last = cpu(o);
        pump(&mut poll, &mut events, &mut users, t_last + TAIL, |_| false)
            .map_err(|e| e.to_string())?;
        let c1 = cpu(o);
        let t1 = Instant::now();
        let after = mem(pid).unwrap_or_default();
        let stats = http_get(o.mock, "/stats?reset=1").unwrap_or(Value::Null);
        let turns: Vec<Turn> = users
            .iter_mut()
            .map(|u| std::mem::take(&mut u.turn))
            .collect();
        dump(o, r, &turns, t0, t0_wall, &stats);
        let tokens = turns.iter().map(|t| t.tokens as u64).sum();
        let mut round = turns_json(&turns, t0, &stats, o.tokens);
        if !all_in {
            round["timed_out"] = json!(true);
        }
        round["round"] = json!(r);
        round["send_ms"] = json!(send_ms);
        round["cpu"] = cpu_json(&c0, &c1, (t1 - t0).as_secs_f64(), tokens, true);
        round["cpu_to_last_chat"] = cpu_json(
            &c0,
            &c_last,
            (t_last - t0).as_secs_f64().max(1e-9),
            tokens,
            true,
        );
        round["mem_idle"] = mem_json(idle);
        round["mem_after"] = mem_json(after);
        round["retained_per_user"] = per_user(idle, after, o.users);
        if let (Some((a, ta, ia)), Some((b, tb, ib))) = (&mark_a, &mark_b)
            && k_b > k_a + 1
        {
            let n = (tb - ta) as u64;
            round["cpu_steady"] = cpu_json(a, b, (*ib - *ia).as_secs_f64(), n, true);
            round["cpu_steady"]["tokens"] = json!(n);
            round["cpu_start"] = cpu_json(&c0, a, (*ia - t0).as_secs_f64(), *ta as u64, true);
            round["cpu_start"]["us_per_turn"] =
                json!(a.server_ns.saturating_sub(c0.server_ns) as f64 / 1000.0 / o.users as f64);
        }
        if let Some((m, when)) = at_peak {
            round["mem_peak"] = mem_json(m);
            round["mem_peak_at_ms"] = json!(when);
            round["inflight_per_user"] = per_user(idle, m, o.users);
        }
        windows.push((t0, t1));
        rounds.push(round);
        settle(&mut poll, &mut events, &mut users).map_err(|e| e.to_string())?;
        idle = mem(pid).unwrap_or(after);
    }
    drop(users);
    let samples = sampler.finish();
    let max_in = |a: Instant, b: Instant| {
        samples
            .iter()
            .filter(|s| s.at >= a && s.at <= b)
            .fold(Status::default(), |m, s| Status {
                threads: m.threads.max(s.st.threads),
                rss_kib: m.rss_kib.max(s.st.rss_kib),
                anon_kib: m.anon_kib.max(s.st.anon_kib),
            })
    };
    for (round, (a, b)) in rounds.iter_mut().zip(&windows) {
        let m = max_in(*a, *b);
        round["threads_peak"] = json!(m.threads);
        round["sampled_rss_peak_kib"] = json!(m.rss_kib);
        round["sampled_anon_peak_kib"] = json!(m.anon_kib);
    }
    let all = max_in(t_start, Instant::now());
    Ok(json!({
        "open_ms": open_ms,
        "threads_at_start": st_start.threads,
        "threads_idle": threads_idle,
        "threads_peak": all.threads,
        "samples": samples.len(),
        "mem_start": {"rss_kib": st_start.rss_kib, "anon_kib": st_start.anon_kib},
        "mem_idle_connected": mem_json(idle_first),
        "rounds": rounds,
    }))
}

// ---------------------------------------------------------------- direct mode

/// One streamed request straight to the mock.
struct Direct {
    stream: MioStream,
    request: Vec<u8>,
    written: usize,
    /// Bytes received and not yet split into lines.
    rbuf: Vec<u8>,
    head_done: bool,
    turn: Turn,
}

impl Direct {
    /// Reads until the socket would block, handling every complete line.
    fn ready(&mut self, scratch: &mut [u8]) {
        while self.written < self.request.len() {
            match self.stream.write(&self.request[self.written..]) {
                Ok(n) => self.written += n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::NotConnected
                    ) =>
                {
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.turn.failed = Some(format!("write: {e}"));
                    return;
                }
            }
        }
        loop {
            match self.stream.read(scratch) {
                Ok(0) => {
                    if !self.turn.ended() {
                        self.turn.failed = Some("the mock closed before [DONE]".into());
                    }
                    return;
                }
                Ok(n) => {
                    self.rbuf.extend_from_slice(&scratch[..n]);
                    self.lines();
                    if self.turn.ended() {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.turn.failed = Some(format!("read: {e}"));
                    return;
                }
            }
        }
    }

    /// The head, then each `data:` line of the (chunked) event stream; chunk-size lines
    /// and blank lines are skipped (the mock sends one event per chunk).
    fn lines(&mut self) {
        if !self.head_done {
            let Some(end) = self.rbuf.windows(4).position(|w| w == b"\r\n\r\n") else {
                if self.rbuf.len() > MAX_HEAD_BYTES {
                    self.turn.failed = Some("response head too large".into());
                }
                return;
            };
            if !self.rbuf.starts_with(b"HTTP/1.1 200") {
                let line = String::from_utf8_lossy(&self.rbuf[..end.min(80)]).into_owned();
                self.turn.failed = Some(format!("the mock answered {line}"));
                return;
            }
            self.rbuf.drain(..end + 4);
            self.head_done = true;
        }
        let mut start = 0;
        while let Some(nl) = self.rbuf[start..].iter().position(|&b| b == b'\n') {
            let line = &self.rbuf[start..start + nl];
            start += nl + 1;
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let Some(data) = line.strip_prefix(b"data: ") else {
                continue;
            };
            if data == b"[DONE]" {
                self.turn.done = Some(Instant::now());
                return;
            }
            let Ok(v) = serde_json::from_slice::<Value>(data) else {
                self.turn.failed = Some("an event that is not JSON".into());
                return;
            };
            let piece = v
                .pointer("/choices/0/delta/content")
                .and_then(Value::as_str)
                .unwrap_or("");
            if !piece.is_empty() {
                let piece = piece.to_string();
                self.turn.token(&piece);
            }
        }
        self.rbuf.drain(..start);
    }
}

fn run_direct(o: &Opts) -> Result<Value, String> {
    let mut poll = Poll::new().map_err(|e| e.to_string())?;
    let mut events = Events::with_capacity(1024);
    let mut scratch = vec![0u8; 64 * 1024];
    let mut rounds = Vec::new();
    for r in 1..=o.rounds {
        let _ = http_get(o.mock, "/stats?reset=1");
        let c0 = cpu(o);
        let t0 = Instant::now();
        let t0_wall = wall_us();
        let mut reqs = Vec::with_capacity(o.users);
        let mut open = 0;
        for i in 0..o.users {
            let tag = format!("bench r{r} u{i}: tell me a story about a cat");
            let body = json!({"model": o.model, "stream": true,
                              "messages": [{"role": "user", "content": tag}]})
            .to_string();
            let request = format!(
                "POST /v1/chat/completions HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
                 Accept: text/event-stream\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
                o.mock,
                body.len()
            )
            .into_bytes();
            let turn = Turn::new(tag);
            let mut stream = MioStream::connect(o.mock).map_err(|e| format!("connect: {e}"))?;
            let _ = stream.set_nodelay(true);
            poll.registry()
                .register(
                    &mut stream,
                    Token(i),
                    Interest::READABLE | Interest::WRITABLE,
                )
                .map_err(|e| e.to_string())?;
            let mut d = Direct {
                stream,
                request,
                written: 0,
                rbuf: Vec::new(),
                head_done: false,
                turn,
            };
            // On loopback the connect is usually complete at once: send the request now,
            // as the next connect would otherwise delay it.
            d.ready(&mut scratch);
            if d.turn.ended() {
                let _ = poll.registry().deregister(&mut d.stream);
            } else {
                open += 1;
            }
            reqs.push(d);
        }
        let send_ms = ms(t0.elapsed());
        let deadline = t0 + o.timeout;
        while open > 0 && Instant::now() < deadline {
            let wait = (deadline - Instant::now()).min(Duration::from_millis(20));
            match poll.poll(&mut events, Some(wait)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.to_string()),
            }
            for ev in events.iter() {
                let Some(d) = reqs.get_mut(ev.token().0) else {
                    continue;
                };
                if d.turn.ended() {
                    continue;
                }
                d.ready(&mut scratch);
                if d.turn.ended() {
                    // Like straycat: the answer is complete, drop the connection.
                    let _ = poll.registry().deregister(&mut d.stream);
                    let _ = d.stream.shutdown(std::net::Shutdown::Both);
                    open -= 1;
                }
            }
        }
        let t_last = reqs.iter().filter_map(|d| d.turn.done).max().unwrap_or(t0);
        let c1 = cpu(o);
        let stats = http_get(o.mock, "/stats?reset=1").unwrap_or(Value::Null);
        let turns: Vec<Turn> = reqs.into_iter().map(|d| d.turn).collect();
        dump(o, r, &turns, t0, t0_wall, &stats);
        let tokens = turns.iter().map(|t| t.tokens as u64).sum();
        let mut round = turns_json(&turns, t0, &stats, o.tokens);
        if open > 0 {
            round["timed_out"] = json!(true);
        }
        round["round"] = json!(r);
        round["send_ms"] = json!(send_ms);
        round["cpu"] = cpu_json(
            &c0,
            &c1,
            (t_last - t0).as_secs_f64().max(1e-9),
            tokens,
            false,
        );
        rounds.push(round);
        thread::sleep(Duration::from_millis(200));
    }
    Ok(json!({ "rounds": rounds }))
}

// ---------------------------------------------------------------- main

fn summary(mode: Mode, out: &Value) {
    for r in out["rounds"].as_array().into_iter().flatten() {
        let f = |p: &str| r.pointer(p).and_then(Value::as_f64).unwrap_or(f64::NAN);
        eprintln!(
            "round {}: wall {:.1} ms, ttft p50 {:.1} p99 {:.1} ms, relay p50 {:.2} p99 {:.2} ms, \
             {} tokens, {} failed, mock peak {}",
            r["round"],
            f("/wall_ms"),
            f("/ttft_ms/p50"),
            f("/ttft_ms/p99"),
            f("/relay_ms/p50"),
            f("/relay_ms/p99"),
            r["tokens"],
            r["failed"],
            r["mock_peak_active"],
        );
        if mode == Mode::Chat {
            eprintln!(
                "  server CPU {:.2} us/token ({} user + {} sys ticks), threads peak {}, \
                 in flight {:.0} B/user (exact anon {:.0}), client {:.0} % of a core, mock {:.0} %, \
                 run-queue wait server {:.1} ms client {:.1} ms",
                f("/cpu/server_us_per_token"),
                r["cpu"]["server_utime_ticks"],
                r["cpu"]["server_stime_ticks"],
                r["threads_peak"],
                f("/inflight_per_user/rss_b"),
                f("/inflight_per_user/exact_anon_b"),
                f("/cpu/client_util_pct"),
                f("/cpu/mock_util_pct"),
                f("/cpu/server_runqueue_wait_ms"),
                f("/cpu/client_runqueue_wait_ms"),
            );
        }
        for e in r["errors"].as_array().into_iter().flatten() {
            eprintln!("  error: {e}");
        }
    }
}

fn main() -> ExitCode {
    let o = match parse_opts() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("llm_bench: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let result = match o.mode {
        Mode::Chat => run_chat(&o),
        Mode::Direct => run_direct(&o),
    };
    let mut out = match result {
        Ok(v) => v,
        Err(e) => {
            eprintln!("llm_bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    summary(o.mode, &out);
    out["mode"] = json!(if o.mode == Mode::Chat {
        "chat"
    } else {
        "direct"
    });
    out["label"] = json!(o.label);
    out["users"] = json!(o.users);
    out["tokens_per_turn"] = json!(o.tokens);
    let failed = out["rounds"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|r| r["failed"].as_u64() != Some(0) || r.get("timed_out").is_some());
    println!("{out}");
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
