//! Measures what the state dir costs: bytes written per chat turn against the bytes of the
//! frames the turn produced, syncs per second under load, the state dir's size against
//! the live data, and the start-up time with a full state (4,096 sessions of 20 turns).
//! `bench/state.sh` builds and runs it.
//!
//! ```text
//! cargo build --release --bin straycat --example state_bench
//! target/release/examples/state_bench --bin target/release/straycat --dir /tmp/straycat-state
//! ```
//!
//! It starts the server itself (echo agent, 127.0.0.1 only), reads the server's counters
//! from `/health` and `write_bytes` of `/proc/PID/io`, and prints a summary on stderr and
//! one JSON line on stdout. Every wait is bounded.

use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};
use tungstenite::{Message, WebSocket};

const WAIT: Duration = Duration::from_secs(120);

struct Opts {
    bin: String,
    dir: String,
    users: usize,
    turns: usize,
    conns: usize,
}

fn main() -> ExitCode {
    let mut o = Opts {
        bin: "target/release/straycat".into(),
        dir: "/tmp/straycat-state-bench".into(),
        users: 4096,
        turns: 20,
        conns: 32,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let v = pair.get(1).cloned().unwrap_or_default();
        match pair[0].as_str() {
            "--bin" => o.bin = v,
            "--dir" => o.dir = v,
            "--users" => o.users = v.parse().unwrap_or(o.users),
            "--turns" => o.turns = v.parse().unwrap_or(o.turns),
            "--conns" => o.conns = v.parse().unwrap_or(o.conns),
            other => {
                eprintln!("unknown option {other}");
                return ExitCode::from(2);
            }
        }
    }
    match run(&o) {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("state_bench: {e}");
            ExitCode::FAILURE
        }
    }
}

struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(o: &Opts) -> Result<(Server, Duration), String> {
    let t0 = Instant::now();
    let mut child = Command::new(&o.bin)
        .args(["--listen", "127.0.0.1:0", "--log-level", "info"])
        .args([
            "--state-dir",
            &o.dir,
            "--max-sessions",
            &o.users.max(1).to_string(),
            // One client process on 127.0.0.1 plays every user, as fast as it can.
            "--max-messages-per-minute",
            "0",
            "--max-connections-per-ip",
            "0",
            "--max-connects-per-minute-per-ip",
            "0",
        ])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", o.bin))?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines
            .next()
            .ok_or("the server exited before listening")?
            .map_err(|e| e.to_string())?;
        if let Some(rest) = line.split("listening on ").nth(1) {
            break rest.trim().parse().map_err(|e| format!("{rest}: {e}"))?;
        }
    };
    // Keep draining its log so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    let server = Server { child, addr };
    health(server.addr)?;
    Ok((server, t0.elapsed()))
}

fn health(addr: SocketAddr) -> Result<Value, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut body = String::new();
    s.read_to_string(&mut body).map_err(|e| e.to_string())?;
    let json = body.split("\r\n\r\n").nth(1).ok_or("no body")?;
    serde_json::from_str(json).map_err(|e| e.to_string())
}

fn synced(addr: SocketAddr) -> Result<Value, String> {
    let deadline = Instant::now() + WAIT;
    loop {
        let h = health(addr)?;
        if h["state"]["unsynced_records"] == 0 && h["state"]["compacting"] == false {
            return Ok(h);
        }
        if Instant::now() > deadline {
            return Err(format!("never synced: {h}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn write_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("write_bytes: ").map(|n| n.parse().ok()))
        })
        .flatten()
        .unwrap_or(0)
}

fn counter(h: &Value, name: &str) -> u64 {
    h["state"][name].as_u64().unwrap_or(0)
}

type Ws = WebSocket<TcpStream>;

fn connect(addr: SocketAddr, user: &str) -> Result<Ws, String> {
    let stream = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let url = format!("ws://{addr}/ws/{user}");
    let (ws, _) = tungstenite::client(url.as_str(), stream).map_err(|e| e.to_string())?;
    Ok(ws)
}

/// Sends one message and reads up to its `chat`; returns the bytes of the frames with a
/// seq (what the session holds and the journal must keep).
fn turn(ws: &mut Ws, text: &str, id: &str) -> Result<usize, String> {
    let msg = json!({"text": text, "id": id}).to_string();
    ws.send(Message::text(msg)).map_err(|e| e.to_string())?;
    let mut held = 0;
    loop {
        match ws.read().map_err(|e| e.to_string())? {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(t.as_str()).map_err(|e| e.to_string())?;
                if v.get("seq").is_some() {
                    held += t.len();
                }
                if v["type"] == "chat" && v["reply_to"] == id {
                    return Ok(held);
                }
            }
            Message::Close(_) => return Err("closed".into()),
            _ => {}
        }
    }
}

/// A message of about 100 bytes, as a kiosk visitor types.
const TEXT: &str =
    "What time does the museum open on Sundays, and is there a guided tour for children?";

fn run(o: &Opts) -> Result<Value, String> {
    let _ = std::fs::remove_dir_all(&o.dir);
    let (server, _) = start(o)?;
    let pid = server.child.id();
    let addr = server.addr;

    // 1. One user, one turn at a time: every turn its own group commit.
    let mut ws = connect(addr, "solo")?;
    let h0 = synced(addr)?;
    let io0 = write_bytes(pid);
    let mut frame_bytes = 0;
    let solo_turns = 100;
    for i in 0..solo_turns {
        frame_bytes += turn(&mut ws, TEXT, &format!("s{i}"))?;
        // Wait for the sync, so that each turn is written and synced alone.
        synced(addr)?;
    }
    let h1 = synced(addr)?;
    let solo_written = counter(&h1, "bytes_written") - counter(&h0, "bytes_written");
    let solo_io = write_bytes(pid) - io0;
    let solo = json!({
        "turns": solo_turns,
        "frame_bytes_per_turn": frame_bytes / solo_turns,
        "journal_bytes_per_turn": solo_written / solo_turns as u64,
        "storage_bytes_per_turn": solo_io / solo_turns as u64,
        "syncs": counter(&h1, "syncs") - counter(&h0, "syncs"),
    });
    eprintln!("one turn at a time: {solo}");
    drop(ws);

    // 2. Fill: users x turns over `conns` connections at once.
    let t0 = Instant::now();
    let io0 = write_bytes(pid);
    let per = o.users.div_ceil(o.conns);
    let mut threads = Vec::new();
    for c in 0..o.conns {
        let (first, turns) = (c * per, o.turns);
        let last = ((c + 1) * per).min(o.users);
        threads.push(std::thread::spawn(move || -> Result<usize, String> {
            let mut bytes = 0;
            for u in first..last {
                let mut ws = connect(addr, &format!("user{u}"))?;
                for t in 0..turns {
                    bytes += turn(&mut ws, TEXT, &format!("t{t}"))?;
                }
                let _ = ws.close(None);
            }
            Ok(bytes)
        }));
    }
    let mut fill_frame_bytes = 0;
    for t in threads {
        fill_frame_bytes += t.join().map_err(|_| "a client thread panicked")??;
    }
    let fill_secs = t0.elapsed().as_secs_f64();
    let h2 = synced(addr)?;
    let fill_turns = (o.users * o.turns) as u64;
    let written = counter(&h2, "bytes_written") - counter(&h1, "bytes_written");
    let fill = json!({
        "users": o.users,
        "turns": fill_turns,
        "secs": fill_secs,
        "turns_per_sec": fill_turns as f64 / fill_secs,
        "frame_bytes_per_turn": fill_frame_bytes as u64 / fill_turns,
        "journal_bytes_per_turn": written / fill_turns,
        "storage_bytes_per_turn": (write_bytes(pid) - io0) / fill_turns,
        "syncs_per_sec": (counter(&h2, "syncs") - counter(&h1, "syncs")) as f64 / fill_secs,
        "disk_bytes": counter(&h2, "disk_bytes"),
        "dir_bytes": dir_bytes(&o.dir),
    });
    eprintln!("fill: {fill}");

    // 3. Idle: nothing is written.
    let (io_idle, b_idle) = (write_bytes(pid), counter(&h2, "bytes_written"));
    std::thread::sleep(Duration::from_secs(3));
    let h3 = health(addr)?;
    let idle = json!({
        "secs": 3,
        "storage_bytes": write_bytes(pid) - io_idle,
        "journal_bytes": counter(&h3, "bytes_written") - b_idle,
    });
    eprintln!("idle: {idle}");

    // 4. Start-up with the full state, after SIGKILL and after a clean stop.
    drop(server);
    let (server, killed_start) = start(o)?;
    let sessions = health(server.addr)?["sessions"].clone();
    let h4 = synced(server.addr)?;
    let after_compaction = dir_bytes(&o.dir);
    let _ = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status();
    let mut server = server;
    let _ = server.child.wait();
    let (server, clean_start) = start(o)?;
    let startup = json!({
        "sessions": sessions,
        "after_sigkill_secs": killed_start.as_secs_f64(),
        "after_clean_stop_secs": clean_start.as_secs_f64(),
        "dir_bytes_after_start_snapshot": after_compaction,
        "live_snapshot_bytes": counter(&h4, "disk_bytes"),
        "rss_kib": rss_kib(server.child.id()),
    });
    eprintln!("start-up: {startup}");
    drop(server);
    let _ = std::fs::remove_dir_all(&o.dir);
    Ok(json!({"solo": solo, "fill": fill, "idle": idle, "startup": startup}))
}

fn dir_bytes(dir: &str) -> u64 {
    std::fs::read_dir(dir)
        .map(|it| {
            it.filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("VmRSS:")
                    .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            })
        })
        .unwrap_or(0)
}
