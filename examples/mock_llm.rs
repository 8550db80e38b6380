//! A mock OpenAI-compatible server for benchmarks (`bench/llm.sh`): every
//! `POST …/chat/completions` is answered with a streamed chat completion at a fixed pace, so
//! that what straycat adds on top of an LLM's own timing can be measured.
//!
//! ```text
//! cargo build --release --example mock_llm
//! target/release/examples/mock_llm --listen 127.0.0.1:18080 &
//! target/release/straycat --agent openai --openai-url http://127.0.0.1:18080/v1 --openai-model m
//! curl -s http://127.0.0.1:18080/stats
//! ```
//!
//! Each answer: `200`, `Content-Type: text/event-stream`, `Transfer-Encoding: chunked`,
//! `Connection: close`; one event per chunk: a role-only chunk at once, then `--tokens`
//! content chunks (the first `--first-token-ms` after the request, the next ones
//! `--token-ms` apart, on a fixed schedule so that lateness does not add up), then a chunk
//! with `finish_reason: "stop"`, `data: [DONE]`, the last chunk, and the connection is
//! closed. One thread per connection: `--threads` threads (small stacks) are started at
//! once and each serves one connection at a time, so a burst of connects costs no thread
//! creation; accepted connections wait for a free thread in a queue of as many, and past
//! that are dropped unanswered.
//!
//! `GET /stats` answers what was served, as JSON: `served`, `active`, `peak_active` (the
//! most answers streaming at once), `refused`, and `records`: for each request, keyed by the
//! text of its last message, the wall-clock instant (µs since the Unix epoch) the request
//! was read and the instant each content chunk was written, so a client on the same machine
//! can tell how late each token reached it. `GET /stats?reset=1` answers the same, then
//! forgets the records and restarts `peak_active` from the answers in progress.
//!
//! Bounded: 127.0.0.1 only, `--threads` threads (≤ 4096) and as many waiting connections,
//! request heads ≤ 16 KiB, bodies ≤ 1 MiB, 10 s to send the request, 10 s per write, at most
//! 100,000 records, and the process exits by itself after `--exit-after-secs` (600). A
//! client that fails or goes away is just dropped.

use socket2::{Domain, Socket, Type};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The largest request head read.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// The largest request body read.
const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Time a client has to send its request, and each write may take.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests remembered for `/stats`; later ones are served but not recorded.
const MAX_RECORDS: usize = 100_000;
/// Characters of the last message kept as a record's key.
const MAX_TAG_CHARS: usize = 120;
/// Stack of each connection's thread: it parses one JSON body and formats small chunks.
const THREAD_STACK_BYTES: usize = 128 * 1024;
/// Backlog of the listening socket: a burst of 200+ connects must not overflow it (a
/// dropped SYN is retried only after a second).
const LISTEN_BACKLOG: i32 = 1024;

/// The words of every answer, one per content chunk (cycled past 20).
const WORDS: [&str; 20] = [
    "Once",
    " upon",
    " a",
    " time",
    ",",
    " a",
    " small",
    " cat",
    " lived",
    " in",
    " a",
    " kiosk",
    " by",
    " the",
    " station",
    " and",
    " answered",
    " every",
    " question",
    ".",
];

const USAGE: &str = "usage: mock_llm [--listen 127.0.0.1:PORT] [options]
  --listen ADDR         127.0.0.1 only; port 0 picks one (printed on stdout) (127.0.0.1:18080)
  --tokens N            content chunks per answer (20)
  --token-ms MS         pause between content chunks (50)
  --first-token-ms MS   from the request to the first content chunk (50)
  --threads N           connections served at once (one thread each; 1..=4096); as many
                        more wait, past that they are dropped (256)
  --exit-after-secs S   exit by itself after S seconds (600)";

struct Opts {
    listen: SocketAddr,
    tokens: usize,
    token_ms: u64,
    first_token_ms: u64,
    threads: usize,
    exit_after_secs: u64,
}

fn parse_opts() -> Result<Opts, String> {
    let mut o = Opts {
        listen: SocketAddr::from(([127, 0, 0, 1], 18080)),
        tokens: 20,
        token_ms: 50,
        first_token_ms: 50,
        threads: 256,
        exit_after_secs: 600,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = || format!("bad value for {flag}: {value:?}");
        match flag.as_str() {
            "--listen" => o.listen = value.parse().map_err(|_| bad())?,
            "--tokens" => o.tokens = value.parse().map_err(|_| bad())?,
            "--token-ms" => o.token_ms = value.parse().map_err(|_| bad())?,
            "--first-token-ms" => o.first_token_ms = value.parse().map_err(|_| bad())?,
            "--threads" => o.threads = value.parse().map_err(|_| bad())?,
            "--exit-after-secs" => o.exit_after_secs = value.parse().map_err(|_| bad())?,
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    if o.listen.ip() != std::net::IpAddr::from([127, 0, 0, 1]) {
        return Err(format!(
            "{} is not 127.0.0.1: the mock serves this machine only",
            o.listen
        ));
    }
    if o.tokens == 0 || o.tokens > 100_000 || !(1..=4096).contains(&o.threads) {
        return Err("--tokens must be in 1..=100000 and --threads in 1..=4096".into());
    }
    if o.token_ms > 60_000 || o.first_token_ms > 60_000 {
        return Err("--token-ms and --first-token-ms must be at most 60000".into());
    }
    if !(1..=86_400).contains(&o.exit_after_secs) {
        return Err("--exit-after-secs must be in 1..=86400".into());
    }
    Ok(o)
}

/// When a request came and when each of its content chunks went out (µs since the epoch).
struct Record {
    request_us: u64,
    tokens_us: Vec<u64>,
}

/// What all connections share.
struct Shared {
    opts: Opts,
    /// Connections being served now.
    active: AtomicUsize,
    /// The most `active` since the start or the last reset.
    peak_active: AtomicUsize,
    /// Answers streamed to the end.
    served: AtomicUsize,
    /// Connections dropped: every thread busy and the queue full.
    refused: AtomicUsize,
    records: Mutex<HashMap<String, Record>>,
}

impl Shared {
    fn records(&self) -> std::sync::MutexGuard<'_, HashMap<String, Record>> {
        // A panicking connection thread cannot leave the map half-updated (inserts are
        // whole), so a poisoned lock is still good to use.
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Wall-clock microseconds since the Unix epoch: comparable across processes on one machine.
fn wall_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn main() -> ExitCode {
    let opts = match parse_opts() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("mock_llm: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let listener = match listen(opts.listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("mock_llm: cannot listen on {}: {e}", opts.listen);
            return ExitCode::FAILURE;
        }
    };
    let local = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    println!("mock_llm listening on {local}");
    let _ = io::stdout().flush();
    let exit_after = Duration::from_secs(opts.exit_after_secs);
    thread::spawn(move || {
        thread::sleep(exit_after);
        eprintln!("mock_llm: --exit-after-secs reached, exiting");
        std::process::exit(0);
    });
    let shared = Arc::new(Shared {
        opts,
        active: AtomicUsize::new(0),
        peak_active: AtomicUsize::new(0),
        served: AtomicUsize::new(0),
        refused: AtomicUsize::new(0),
        records: Mutex::new(HashMap::new()),
    });
    let (queue, taken) = mpsc::sync_channel::<TcpStream>(shared.opts.threads);
    let taken = Arc::new(Mutex::new(taken));
    for i in 0..shared.opts.threads {
        let (shared, taken) = (Arc::clone(&shared), Arc::clone(&taken));
        let started = thread::Builder::new()
            .name(format!("conn-{i}"))
            .stack_size(THREAD_STACK_BYTES)
            .spawn(move || connection_thread(&shared, &taken));
        if let Err(e) = started {
            eprintln!("mock_llm: cannot start thread {i}: {e}");
            return ExitCode::FAILURE;
        }
    }
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of descriptors or the like: wait rather than spin.
                eprintln!("mock_llm: accept: {e}");
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if queue.try_send(stream).is_err() {
            shared.refused.fetch_add(1, Ordering::Relaxed); // dropped: closed unanswered
        }
    }
}

/// One of the `--threads`: serves the connections it takes from the queue, one at a time.
fn connection_thread(shared: &Shared, taken: &Mutex<mpsc::Receiver<TcpStream>>) {
    loop {
        // Only the lock holder waits in `recv`; the others queue on the lock. A poisoned
        // lock (a panic while holding it, which `recv` does not do) is still usable.
        let next = taken.lock().unwrap_or_else(|e| e.into_inner()).recv();
        let Ok(stream) = next else {
            return; // the accept loop is gone
        };
        let now = shared.active.fetch_add(1, Ordering::SeqCst) + 1;
        shared.peak_active.fetch_max(now, Ordering::SeqCst);
        let _ = serve(stream, shared);
        shared.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A listening socket on `addr` with a backlog that takes a burst of connects.
fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// One request on `stream`, and its answer.
fn serve(mut stream: TcpStream, shared: &Shared) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let Some((method, path, body)) = read_request(&mut stream)? else {
        return respond(
            &mut stream,
            "400 Bad Request",
            "text/plain",
            b"bad request\n",
        );
    };
    let request_us = wall_us();
    let route = path.split('?').next().unwrap_or("");
    match (method.as_str(), route) {
        ("GET", "/stats") => {
            let stats = stats_json(shared, path.contains("reset=1"));
            respond(&mut stream, "200 OK", "application/json", stats.as_bytes())
        }
        ("GET", "/health") => respond(&mut stream, "200 OK", "application/json", b"{}"),
        ("POST", p) if p.ends_with("/chat/completions") => {
            let Ok(request) = serde_json::from_slice::<serde_json::Value>(&body) else {
                return respond(
                    &mut stream,
                    "400 Bad Request",
                    "application/json",
                    br#"{"error":{"message":"the body is not JSON"}}"#,
                );
            };
            stream_answer(&mut stream, shared, &request, request_us)
        }
        _ => respond(&mut stream, "404 Not Found", "text/plain", b"not found\n"),
    }
}

/// Reads one request: its method, target and body. `None` for a malformed one.
fn read_request(stream: &mut TcpStream) -> io::Result<Option<(String, String, Vec<u8>)>> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let (head_len, method, path, content_length) = loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let mut content_length = 0usize;
                for h in req.headers.iter() {
                    if h.name.eq_ignore_ascii_case("content-length") {
                        let v = std::str::from_utf8(h.value).ok().map(str::trim);
                        match v.and_then(|v| v.parse().ok()) {
                            Some(n) => content_length = n,
                            None => return Ok(None),
                        }
                    }
                }
                let method = req.method.unwrap_or("").to_string();
                let path = req.path.unwrap_or("").to_string();
                break (len, method, path, content_length);
            }
            Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD_BYTES => {}
            _ => return Ok(None),
        }
    };
    if content_length > MAX_BODY_BYTES {
        return Ok(None);
    }
    let mut body = buf.split_off(head_len);
    while body.len() < content_length {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(content_length);
    Ok(Some((method, path, body)))
}

/// A whole non-streamed answer, then the connection closes.
fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &[u8],
) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    stream.write_all(&out)?;
    close(stream);
    Ok(())
}

/// Half-closes, then waits briefly for the client to close too, so the last bytes are not
/// lost to a reset when the client still has something unread in flight.
fn close(stream: &mut TcpStream) {
    let _ = stream.shutdown(Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let mut sink = [0u8; 1024];
    for _ in 0..64 {
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

/// Appends one event as one chunk of the chunked body.
fn push_event(out: &mut Vec<u8>, data: &str) {
    let event = format!("data: {data}\n\n");
    out.extend_from_slice(format!("{:x}\r\n", event.len()).as_bytes());
    out.extend_from_slice(event.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// One chat-completion chunk with `delta` and `finish_reason` (`null` or a JSON string).
fn chunk_json(id: &str, created: u64, model: &str, delta: &str, finish: &str) -> String {
    format!(
        "{{\"id\":\"{id}\",\"object\":\"chat.completion.chunk\",\"created\":{created},\
         \"model\":{model},\"choices\":[{{\"index\":0,\"delta\":{delta},\
         \"finish_reason\":{finish}}}]}}"
    )
}

/// The streamed answer to `request`.
fn stream_answer(
    stream: &mut TcpStream,
    shared: &Shared,
    request: &serde_json::Value,
    request_us: u64,
) -> io::Result<()> {
    let start = Instant::now();
    let o = &shared.opts;
    let model = serde_json::to_string(request.get("model").unwrap_or(&serde_json::Value::Null))
        .unwrap_or_else(|_| "null".into());
    let tag = last_message_text(request);
    let n = shared.served.load(Ordering::Relaxed);
    let id = format!("chatcmpl-mock-{n}");
    let created = request_us / 1_000_000;
    let mut out =
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\
        Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            .to_vec();
    let role = r#"{"role":"assistant","content":""}"#;
    push_event(&mut out, &chunk_json(&id, created, &model, role, "null"));
    stream.write_all(&out)?;
    let mut tokens_us = Vec::with_capacity(o.tokens);
    for k in 0..o.tokens {
        let due = start
            + Duration::from_millis(o.first_token_ms)
            + Duration::from_millis(o.token_ms) * k as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        let word = serde_json::to_string(WORDS[k % WORDS.len()]).unwrap_or_default();
        let delta = format!("{{\"content\":{word}}}");
        out.clear();
        push_event(&mut out, &chunk_json(&id, created, &model, &delta, "null"));
        tokens_us.push(wall_us());
        stream.write_all(&out)?;
    }
    out.clear();
    push_event(
        &mut out,
        &chunk_json(&id, created, &model, "{}", "\"stop\""),
    );
    push_event(&mut out, "[DONE]");
    out.extend_from_slice(b"0\r\n\r\n");
    stream.write_all(&out)?;
    shared.served.fetch_add(1, Ordering::Relaxed);
    if let Some(tag) = tag {
        let mut records = shared.records();
        if records.len() < MAX_RECORDS {
            records.insert(
                tag,
                Record {
                    request_us,
                    tokens_us,
                },
            );
        }
    }
    close(stream);
    Ok(())
}

/// The text of the request's last message (a string, or its text parts), shortened.
fn last_message_text(request: &serde_json::Value) -> Option<String> {
    let content = request
        .get("messages")?
        .as_array()?
        .last()?
        .get("content")?;
    let text = match content {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(serde_json::Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => return None,
    };
    Some(text.chars().take(MAX_TAG_CHARS).collect())
}

/// `/stats` as JSON; with `reset`, the records are forgotten afterwards.
fn stats_json(shared: &Shared, reset: bool) -> String {
    let mut records = shared.records();
    let map: serde_json::Map<String, serde_json::Value> = records
        .iter()
        .map(|(tag, r)| {
            (
                tag.clone(),
                serde_json::json!({"request_us": r.request_us, "tokens_us": r.tokens_us}),
            )
        })
        .collect();
    // This connection is one of the active ones; it is not an answer.
    let active = shared.active.load(Ordering::SeqCst).saturating_sub(1);
    let out = serde_json::json!({
        "served": shared.served.load(Ordering::Relaxed),
        "active": active,
        "peak_active": shared.peak_active.load(Ordering::SeqCst),
        "refused": shared.refused.load(Ordering::Relaxed),
        "records": map,
    });
    if reset {
        records.clear();
        shared.peak_active.store(active, Ordering::SeqCst);
    }
    out.to_string()
}
