//! Unsent backlogs: a connection closed with 1008 whose peer floods it is read no more and
//! dropped at its close deadline; the server-wide unsent-bytes budget closes the largest
//! backlogs first, and their frames wait for the user's next socket.

mod common;

use std::io::{ErrorKind, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

/// `count` masked binary frames of `size` bytes, back to back: a stream that can be
/// written from its start over and over.
fn frames(count: usize, size: usize) -> Vec<u8> {
    let payload = vec![b'x'; size];
    let mut buf = Vec::new();
    for _ in 0..count {
        write_frame(&mut buf, OP_BINARY, &payload).expect("to a Vec");
    }
    buf
}

/// The most the kernel may buffer for one connection on 127.0.0.1: the server's receive
/// buffer and the client's send buffer at their autotuning maxima (net.ipv4.tcp_rmem and
/// tcp_wmem), which a flooder fills once the server stops reading.
fn socket_buffers_max() -> u64 {
    let max = |name: &str| {
        std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"))
            .ok()
            .and_then(|s| s.split_whitespace().last()?.parse::<u64>().ok())
            .unwrap_or(32 << 20)
    };
    max("tcp_rmem") + max("tcp_wmem")
}

/// How the flooder's close handshake starts.
#[derive(Clone, Copy, Debug, PartialEq)]
enum CloseBy {
    /// The server: echoes nobody reads get the socket closed with 1008.
    Server,
    /// The client: a close frame behind a backlog of echoes (so the server's reply waits),
    /// then data frames, which are a protocol error after a close (RFC 6455 §5.5.1).
    Client,
}

/// Floods an `/echo` socket past the start of its close handshake, as fast as the socket
/// takes it, never reading. Returns the bytes written before the close started and after it,
/// and the seconds from it to the drop.
fn flood_past_close(by: CloseBy) -> (u64, u64, f64) {
    let max_unsent = if by == CloseBy::Server {
        "65536"
    } else {
        "16777216"
    };
    let server = Server::start(&["--raw-echo", "--max-buffered-bytes", max_unsent]);
    let mut s = tiny_window(server.addr(), "/echo");
    let buf = frames(64, 16 * 1024);
    let (mut pos, mut written) = (0usize, 0u64);
    let mut closed_at: Option<(Instant, u64)> = None;
    if by == CloseBy::Client {
        // More than the kernel's buffers take (tcp_wmem's maximum, 4 MiB by default).
        for _ in 0..8 {
            s.write_all(&buf).expect("echoes to owe");
        }
        write_frame(&mut s, OP_CLOSE, &1000u16.to_be_bytes()).expect("close frame");
        written = 8 * buf.len() as u64;
        closed_at = Some((Instant::now(), written));
    }
    s.set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let give_up = Instant::now() + Duration::from_secs(60);
    let why = loop {
        assert!(
            Instant::now() < give_up,
            "the flooding socket was not dropped within 60 s ({written} bytes written; close at {:?})",
            closed_at.map(|(_, n)| n)
        );
        match s.write(&buf[pos..]) {
            Ok(0) => break "wrote 0".to_string(),
            Ok(n) => {
                written += n as u64;
                pos = (pos + n) % buf.len();
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => break e.to_string(),
        }
        if closed_at.is_none() && server.has_log("slow consumer") {
            closed_at = Some((Instant::now(), written));
        }
    };
    let (at, before) = closed_at.expect("the server closed the echo socket with 1008");
    let secs = at.elapsed().as_secs_f64();
    eprintln!(
        "{by:?} close: flooder dropped ({why}) {secs:.1} s after the close began; {before} bytes written before, {} after",
        written - before
    );
    let closes: Vec<String> = server
        .logs()
        .into_iter()
        .filter(|l| l.contains("closing with"))
        .collect();
    assert!(
        closes.len() <= usize::from(by == CloseBy::Server),
        "a closing socket is not closed again (nor its deadline moved): {closes:?}"
    );
    (before, written - before, secs)
}

#[test]
fn a_closing_flooder_is_read_no_more_and_dropped_at_its_deadline() {
    let bound = socket_buffers_max() + (1 << 20);
    for by in [CloseBy::Server, CloseBy::Client] {
        let (_, after, _) = flood_past_close(by);
        assert!(
            after < bound,
            "{by:?} close: a closing socket must not be read on: {after} bytes taken after the close began (bound {bound})"
        );
    }
}

/// One sample of `GET /metrics`, written exactly `series` (name and labels).
fn metric(server: &Server, series: &str) -> f64 {
    let resp = http_get(server.addr(), "/metrics");
    assert_eq!(resp.status, 200, "GET /metrics: {resp:?}");
    resp.body
        .lines()
        .find_map(|l| l.rsplit_once(' ').filter(|(s, _)| *s == series))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in /metrics"))
}

/// A chat user on a socket it never reads, owed the echo of `text` (as message `id`).
fn owed(server: &Server, user: &str, text: &str, id: &str) -> TcpStream {
    let mut s = tiny_window(server.addr(), &format!("/ws/{user}"));
    let m = serde_json::json!({"text": text, "id": id}).to_string();
    write_frame(&mut s, OP_TEXT, m.as_bytes()).expect("send the message");
    s
}

fn chat_once(c: &mut Client, text: &str) {
    c.say(text, None);
    let (_, chat) = c.recv_until_chat();
    assert_chat(&chat, &c.user.clone(), text, None);
}

#[test]
fn past_the_total_budget_the_largest_backlogs_close_and_keep_their_frames() {
    const BUDGET: u64 = 4 << 20;
    let budget = BUDGET.to_string();
    // The per-connection bound is far off: only the total can close anyone here.
    let server = Server::start(&[
        "--max-buffered-bytes-total",
        &budget,
        "--max-buffered-bytes",
        "67108864",
        "--max-message-bytes",
        "4194304",
        "--max-held-bytes",
        "16777216",
    ]);
    let mut good = server.connect("good", "");
    chat_once(&mut good, "before");

    // 20 users that never read: 16 owed a few KiB (the kernel's buffers take it), one
    // ~2 MB (the echo's token and its chat: within the budget alone), 3 ~4 MB, each
    // about the whole budget, so that with the medium one the total is well past it.
    let small_text = "s".repeat(3000);
    let small: Vec<TcpStream> = (0..16)
        .map(|i| owed(&server, &format!("small{i}"), &small_text, "q"))
        .collect();
    let medium_text = "m".repeat(1_000_000);
    let medium = owed(&server, "medium", &medium_text, "q");
    chat_once(&mut good, "meanwhile");
    let big_text = "b".repeat(2_000_000);
    let mut big = Vec::new();
    for i in 0..3 {
        let user = format!("big{i}");
        big.push(owed(&server, &user, &big_text, "q"));
        let line = server
            .wait_log_all(
                &[
                    "slow consumer",
                    "the largest backlog",
                    &format!("user={user} "),
                ],
                Duration::from_secs(20),
            )
            .unwrap_or_else(|| panic!("{user} was not closed for the total budget"));
        assert!(line.contains("WARN") && line.contains("peer="), "{line}");
        chat_once(&mut good, &format!("after {user}"));
    }

    // Every turn ran (20, and good's 4); the open sockets then hold at most the budget:
    // the medium user's backlog.
    poll("every turn to finish", Duration::from_secs(30), || {
        let done = metric(&server, r#"straycat_turns_finished_total{outcome="chat"}"#);
        (done >= 24.0).then_some(())
    });
    let open = metric(&server, r#"straycat_unsent_bytes{stage="open"}"#);
    assert!(
        open <= BUDGET as f64,
        "open sockets hold {open} unsent bytes"
    );
    assert!(open > 0.0, "the medium user's reply is still owed");
    assert_eq!(metric(&server, "straycat_unsent_budget_closes_total"), 3.0);
    assert_eq!(
        metric(&server, r#"straycat_ws_closes_total{code="1008"}"#),
        3.0
    );
    let wrongly: Vec<String> = server
        .logs()
        .into_iter()
        .filter(|l| l.contains("slow consumer") && !l.contains("user=big"))
        .collect();
    assert!(
        wrongly.is_empty(),
        "only the largest backlogs close: {wrongly:?}"
    );
    chat_once(&mut good, "still here");
    // The closing sockets go at their deadline, and their backlogs with them.
    poll(
        "the closing backlogs to go",
        Duration::from_secs(30),
        || {
            let closing = metric(&server, r#"straycat_unsent_bytes{stage="closing"}"#);
            (closing == 0.0).then_some(())
        },
    );

    // A closed user comes back and gets its reply from the held frames.
    for i in 0..3 {
        let user = format!("big{i}");
        let mut again = server.connect(&user, "?since=0");
        let chat = again.recv_json();
        assert_chat(&chat, &user, &big_text, Some("q"));
    }
    // The others were never closed: reading now, they get their replies.
    let others = small
        .into_iter()
        .enumerate()
        .map(|(i, s)| (format!("small{i}"), s, &small_text))
        .chain([("medium".to_string(), medium, &medium_text)]);
    for (user, mut s, text) in others {
        let chat = loop {
            match read_raw_msg(&mut s).expect("read a never-closed user's socket") {
                RawMsg::Text(t) => {
                    let v: serde_json::Value = serde_json::from_slice(&t).expect("JSON");
                    if v["type"] == "chat" {
                        break v;
                    }
                }
                RawMsg::Ping | RawMsg::Pong => {}
                other => panic!("{user}: expected its reply, got {other:?}"),
            }
        };
        assert_chat(&chat, &user, text, Some("q"));
    }
    drop(big);
}

/// The kernel's send buffer of a client socket is fixed, not autotuned: a client that never
/// reads pins at most that much kernel memory, not `tcp_wmem`'s maximum (4 MiB on Debian),
/// which no budget of ours would see.
#[test]
fn a_reader_that_never_reads_pins_little_kernel_memory() {
    let max_unsent = 256 * 1024;
    let server = Server::start(&[
        "--raw-echo",
        "--max-buffered-bytes",
        &max_unsent.to_string(),
    ]);
    let mut s = tiny_window(server.addr(), "/echo");
    // Short: what is queued for the client must be read well before the close deadline
    // (5 s) resets the connection and the kernel throws it away.
    s.set_write_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    // 8 MiB of echoes asked for, none read, until the server closes with 1008 and stops
    // reading (a write then blocks, and times out).
    let burst = frames(128, 64 * 1024);
    let _ = s.write_all(&burst);
    assert!(
        server.wait_log("slow consumer", Duration::from_secs(30)),
        "{:?}",
        server.logs()
    );
    // Everything that reaches the client now was in the kernel's buffers or in the
    // server's backlog (at most --max-buffered-bytes and one frame) when it closed.
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut received = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match std::io::Read::read(&mut s, &mut buf) {
            Ok(0) => break,
            Ok(n) => received += n as u64,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            // The reset at the close deadline (our flood was never read).
            Err(_) => break,
        }
    }
    let bound = max_unsent as u64 + 64 * 1024 + (1 << 20);
    eprintln!("received after the close: {received} bytes (bound {bound})");
    assert!(
        received < bound,
        "{received} bytes were queued for a client that never read: the kernel buffered far more than its fixed send buffer"
    );
}

/// The loop's iterations so far, from `/metrics` (each scrape is one more).
fn loop_iterations(server: &Server) -> u64 {
    let body = http_get(server.addr(), "/metrics").body;
    body.lines()
        .find_map(|l| l.strip_prefix("straycat_loop_iteration_seconds_count "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no iteration count in {body}"))
}

/// A socket we failed (a protocol error) and shut for writing, whose peer then neither
/// reads nor closes: the loop must sleep until the close deadline, not wake for it again
/// and again (each shutdown of the write side was a new readiness event, whose flush shut
/// it again: tens of thousands of iterations a second).
#[test]
fn a_failed_socket_waiting_for_its_deadline_costs_no_iterations() {
    let server = Server::start(&["--raw-echo"]);
    let mut s = tcp(server.addr());
    raw_handshake(&mut s, server.addr(), "/echo");
    // Opcode 3 is reserved (RFC 6455 §5.2): a protocol error, close 1002.
    write_frame(&mut s, 0x3, b"x").expect("write");
    assert!(
        server.wait_log("closing with 1002", Duration::from_secs(10)),
        "{:?}",
        server.logs()
    );
    let before = loop_iterations(&server);
    // The socket waits out its 5 s close deadline; a second of it is watched.
    std::thread::sleep(Duration::from_secs(1));
    let during = loop_iterations(&server) - before;
    eprintln!("loop iterations in 1 s while the failed socket waits: {during}");
    assert!(
        during < 200,
        "{during} loop iterations in a second with nothing to do"
    );
    drop(s);
}
