//! SIGTERM: every socket gets close 1001 and the process exits 0.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn sigterm_closes_every_socket_with_1001_and_exits_0() {
    let mut server = Server::start(&["--echo-delay-ms", "200"]);
    let mut busy = server.connect("busy", "");
    let mut idle = server.connect("idle", "");
    let mut other = server.connect("other", "");
    other.say("x", None);
    other.recv_until_chat();
    // One mid-answer, and one connection that never finished its handshake.
    busy.say("one two three four five", Some("q"));
    let first = busy.recv_json();
    assert_eq!(first["type"], "chat_token", "{first}");
    let mut half = tcp(server.addr());
    std::io::Write::write_all(&mut half, b"GET /ws/half HTTP/1.1\r\n").unwrap();

    server.signal("TERM");
    for c in [&mut busy, &mut idle, &mut other] {
        let (before, close) = c.expect_close();
        for f in &before {
            match f {
                Incoming::Json(v) if v["type"] == "chat_token" || v["type"] == "chat" => {}
                other => panic!("[{}] unexpected frame before close: {other:?}", c.user),
            }
        }
        assert_eq!(
            close.map(|c| c.0),
            Some(1001),
            "[{}] close code on shutdown",
            c.user
        );
    }
    assert!(
        read_until_eof(&mut half, Duration::from_secs(10)),
        "half-open socket closed"
    );
    assert!(server.wait_log("shutting down", Duration::from_secs(10)));
    let status = server
        .wait_exit(Duration::from_secs(15))
        .expect("server exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
}

#[test]
fn sigint_also_shuts_down_cleanly() {
    let mut server = Server::start(&[]);
    let mut c = server.connect("solo", "");
    server.signal("INT");
    let (_, close) = c.expect_close();
    assert_eq!(close.map(|c| c.0), Some(1001));
    let status = server
        .wait_exit(Duration::from_secs(15))
        .expect("server exits after SIGINT");
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
}
