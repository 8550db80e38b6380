//! Memory benchmark: opens N idle WebSocket connections to a running straycat and reports
//! the server's resident memory per connection, read from `/proc/PID/status`.
//!
//! ```text
//! cargo build --release
//! ulimit -n 20000
//! target/release/straycat --listen 127.0.0.1:1865 --max-connections 11000 \
//!     --max-connections-per-ip 0 --max-connects-per-minute-per-ip 0 &
//! cargo run --release --example idle_conns -- --pid $! --n 10000
//! ```
//!
//! Every connection is a chat session of its own user (`/ws/idle-<i>`), so the figure
//! includes the session as well as the socket, tungstenite's state and the slab slot.
//! Only 127.0.0.1 (or another loopback address) is accepted as a target.

use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn main() -> ExitCode {
    let mut addr: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 1865));
    let mut pid: Option<u32> = None;
    let mut n: usize = 10_000;
    let mut path = String::from("/ws/idle-");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next().unwrap_or_default();
        match a.as_str() {
            "--addr" => addr = v.parse().unwrap_or(addr),
            "--pid" => pid = v.parse().ok(),
            "--n" => n = v.parse().unwrap_or(n),
            "--path" => path = v,
            _ => {
                eprintln!(
                    "usage: idle_conns --pid PID [--addr 127.0.0.1:1865] [--n 10000] [--path /ws/idle-]"
                );
                return ExitCode::from(2);
            }
        }
    }
    if !addr.ip().is_loopback() {
        eprintln!("idle_conns only targets loopback addresses");
        return ExitCode::from(2);
    }
    let Some(pid) = pid else {
        eprintln!("--pid of the straycat server is required");
        return ExitCode::from(2);
    };
    let Some(before) = rss_kib(pid) else {
        eprintln!("cannot read /proc/{pid}/status");
        return ExitCode::FAILURE;
    };
    let started = Instant::now();
    let mut sockets = Vec::with_capacity(n);
    for i in 0..n {
        let url = if path.ends_with('-') {
            format!("ws://{addr}{path}{i}")
        } else {
            format!("ws://{addr}{path}")
        };
        let stream = match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("connection {i}: {e} (raise `ulimit -n` and --max-connections)");
                return ExitCode::FAILURE;
            }
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        match tungstenite::client(url.as_str(), stream) {
            Ok((ws, _)) => sockets.push(ws),
            Err(e) => {
                eprintln!("handshake {i}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let opened = started.elapsed();
    let Some(after) = rss_kib(pid) else {
        eprintln!("cannot read /proc/{pid}/status");
        return ExitCode::FAILURE;
    };
    let per_conn = (after.saturating_sub(before)) as f64 * 1024.0 / n as f64;
    println!(
        "connections:            {n} ({path}, opened in {:.1} s)",
        opened.as_secs_f64()
    );
    println!("server RSS before:      {before} KiB");
    println!("server RSS with conns:  {after} KiB");
    println!(
        "per idle connection:    {:.0} bytes ({:.2} KiB)",
        per_conn,
        per_conn / 1024.0
    );
    drop(sockets);
    ExitCode::SUCCESS
}
