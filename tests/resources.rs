//! Running out of file descriptors (EMFILE) must neither spin the CPU nor stop accepting
//! for good: the server pauses accepting, and takes the waiting connections once
//! descriptors are free again.

mod common;

use common::{Server, connect, poll, tcp};
use std::process::Command;
use std::time::Duration;

/// CPU time (user + system) the process has used, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')').expect("comm field") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Reads an HTTP response head (up to the blank line), bounded by the socket's read timeout.
fn read_head(s: &mut std::net::TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match std::io::Read::read(s, &mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

#[test]
fn out_of_file_descriptors_pauses_accepting_without_spinning_and_recovers() {
    let server = Server::start(&["--max-connections", "1000"]);
    let pid = server.pid();
    let base = open_fds(pid);
    let limit = base + 8;
    let status = Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={limit}:{limit}"))
        .status()
        .expect("prlimit (util-linux) runs");
    assert!(status.success(), "prlimit failed");

    // Fill every free descriptor with chat connections.
    let mut held = Vec::new();
    for i in 0..8 {
        held.push(connect(server.addr(), &format!("fd-{i}"), ""));
    }
    // These wait in the listen backlog: the server cannot accept them.
    let mut waiting = Vec::new();
    for _ in 0..4 {
        let mut s = tcp(server.addr());
        let req = common::upgrade_request(server.addr(), "/ws/late");
        std::io::Write::write_all(&mut s, req.as_bytes()).expect("send upgrade request");
        waiting.push(s);
    }
    assert!(
        server.wait_log("cannot accept", Duration::from_secs(10)),
        "server never reported running out of descriptors"
    );

    // Paused, not spinning: over two seconds of waiting connections it uses a fraction of
    // a core (a busy accept loop would use all of it).
    let before = cpu_ticks(pid);
    let window = std::time::Instant::now();
    while window.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let used = cpu_ticks(pid) - before;
    assert!(
        used < 100,
        "server used {used} ticks (of 200) while out of descriptors: it spins"
    );

    // Free descriptors: the waiting connections are taken and upgraded.
    for c in held.drain(..4) {
        c.close();
    }
    for s in waiting.iter_mut() {
        let head = read_head(s);
        assert!(
            head.starts_with("HTTP/1.1 101 "),
            "a waiting connection was not served after descriptors were freed: {head:?}"
        );
    }
    drop(waiting);
    // And the server keeps working for everybody.
    let mut c = poll("a new chat connection", Duration::from_secs(10), || {
        common::try_connect_path(server.addr(), "/ws/after").ok()
    });
    c.say("still here", None);
    let (_, chat) = c.recv_until_chat();
    common::assert_chat(&chat, "after", "still here", None);
}
