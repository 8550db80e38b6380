//! systemd integration: readiness and watchdog notifications to a `NOTIFY_SOCKET` the test
//! owns, serving a listening socket handed over as with socket activation, and journal
//! log lines.

mod common;

use common::{Server, http_get};
use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn temp_path(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("straycat-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join("notify")
}

/// The next datagram, within `timeout`.
fn recv(sock: &UnixDatagram, timeout: Duration) -> String {
    sock.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = [0u8; 512];
    let n = sock
        .recv(&mut buf)
        .expect("a notification within the timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn notify_socket_gets_ready_then_watchdog_then_stopping() {
    let path = temp_path("notify");
    let manager = UnixDatagram::bind(&path).expect("bind notify socket");
    let mut server = Server::start_with_env(
        &[],
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let ready = recv(&manager, Duration::from_secs(10));
    assert!(
        ready.lines().any(|l| l == "READY=1"),
        "first notification: {ready:?}"
    );
    // The server is serving by the time it says so.
    assert_eq!(http_get(server.addr(), "/health").status, 200);
    // WATCHDOG=1 keeps coming (at half of WATCHDOG_USEC) while the loop runs.
    for _ in 0..3 {
        assert_eq!(recv(&manager, Duration::from_secs(10)), "WATCHDOG=1");
    }
    server.signal("TERM");
    let stopping = loop {
        let msg = recv(&manager, Duration::from_secs(10));
        if msg != "WATCHDOG=1" {
            break msg;
        }
    };
    assert_eq!(stopping, "STOPPING=1");
    let status = server
        .wait_exit(Duration::from_secs(10))
        .expect("exits after SIGTERM");
    assert!(status.success(), "{status:?}");
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[test]
fn without_notify_socket_nothing_is_sent_and_watchdog_is_ignored() {
    // WATCHDOG_USEC alone (no NOTIFY_SOCKET) must not break anything.
    let server = Server::start_with_env(&[], &[("WATCHDOG_USEC", "100000")]);
    assert_eq!(http_get(server.addr(), "/health").status, 200);
    assert!(
        !server.has_log("watchdog"),
        "no watchdog without a notify socket"
    );
}

/// Starts straycat the way systemd's socket activation does: a listening socket on fd 3,
/// `LISTEN_FDS=1`, `LISTEN_PID` = the process's own pid (python keeps its pid across exec).
#[test]
fn serves_an_inherited_listening_socket() {
    let script = r#"
import os, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.bind(("127.0.0.1", 0))
s.listen(128)
print(s.getsockname()[1], flush=True)
os.dup2(s.fileno(), 3)
os.set_inheritable(3, True)
env = dict(os.environ, LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
os.execve(sys.argv[1], [sys.argv[1], "--listen", "127.0.0.1:1", "--log-level", "info"], env)
"#;
    let mut child = Command::new("python3")
        .args(["-c", script, env!("CARGO_BIN_EXE_straycat")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut port = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut port)
        .expect("port line");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", port.trim()).parse().expect("port");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[straycat] {line}");
            let _ = tx.send(line);
        }
    });
    // `--listen 127.0.0.1:1` is given too: the server must ignore it and serve (and log)
    // the inherited socket's address.
    let deadline = Instant::now() + Duration::from_secs(20);
    let listening = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.contains("listening on ") => break l,
            Ok(_) => continue,
            Err(_) => {
                let _ = child.kill();
                panic!("no `listening on` line from the socket-activated server");
            }
        }
    };
    assert!(listening.contains(&addr.to_string()), "{listening}");
    assert_eq!(http_get(addr, "/health").status, 200);
    let mut c = common::connect(addr, "activated", "");
    c.say("hello socket activation", None);
    let (_, chat) = c.recv_until_chat();
    common::assert_chat(&chat, "activated", "hello socket activation", None);
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn journal_lines_carry_priority_and_no_timestamp() {
    // JOURNAL_STREAM must name stderr's device and inode; a pipe stands in for the journal
    // socket. Python learns them with fstat on its stderr and passes them through exec.
    let script = r#"
import os, sys
st = os.fstat(2)
env = dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
os.execve(sys.argv[1], [sys.argv[1], "--listen", "127.0.0.1:0", "--log-level", "debug"], env)
"#;
    let mut child = Command::new("python3")
        .args(["-c", script, env!("CARGO_BIN_EXE_straycat")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut first = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut first)
        .expect("a log line");
    let _ = child.kill();
    let _ = child.wait();
    assert!(first.starts_with("<6>INFO "), "journal line: {first:?}");
    assert!(first.contains("listening on 127.0.0.1:"), "{first:?}");
    assert!(!first.contains("Z "), "no timestamp of our own: {first:?}");
}
