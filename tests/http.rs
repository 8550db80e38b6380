//! Plain HTTP on the chat port: `/health`, status codes, auth, `/echo`.

mod common;

use common::*;
use std::io::{Read, Write};
use std::time::Duration;
use tungstenite::Message;

#[test]
fn health_reports_status_version_uptime_connections_sessions() {
    let server = Server::start(&[]);
    let resp = http_get(server.addr(), "/health");
    assert_eq!(resp.status, 200, "{resp:?}");
    resp.assert_connection_close();
    let h: serde_json::Value = serde_json::from_str(&resp.body).expect("JSON body");
    assert_eq!(h["status"], "ok", "{h}");
    assert!(h["version"].is_string(), "{h}");
    assert!(h["uptime_s"].is_number(), "{h}");
    assert!(h["connections"].is_u64(), "{h}");
    assert!(h["sessions"].is_u64(), "{h}");

    let mut c = server.connect("healthy", "");
    c.say("hi", None);
    c.recv_until_chat();
    let h2 = server.health();
    assert!(
        h2["connections"].as_u64().unwrap() > h["connections"].as_u64().unwrap(),
        "a WebSocket counts as a connection: before {h}, after {h2}"
    );
    assert!(h2["sessions"].as_u64().unwrap() >= 1, "{h2}");
}

#[test]
fn unknown_path_404_other_method_405_garbage_400() {
    let server = Server::start(&[]);
    let addr = server.addr();

    for path in ["/nope", "/health/x", "/wsx", "/index.htm"] {
        let resp = http_get(addr, path);
        assert_eq!(resp.status, 404, "GET {path}: {resp:?}");
        resp.assert_connection_close();
    }
    // `/` is the chat page, unless --page 0.
    let page = http_get(addr, "/");
    assert_eq!(page.status, 200, "{page:?}");
    assert_eq!(
        page.header("content-type").as_deref(),
        Some("text/html; charset=utf-8")
    );
    let off = Server::start(&["--page=0"]);
    assert_eq!(http_get(off.addr(), "/").status, 404);
    for req in [
        "POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        "DELETE /ws/alice HTTP/1.1\r\nHost: x\r\n\r\n",
        "PUT /nope HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    ] {
        let resp = http_raw(addr, req.as_bytes());
        assert_eq!(resp.status, 405, "{req:?}: {resp:?}");
        resp.assert_connection_close();
    }
    for req in [
        &b"this is not http\r\n\r\n"[..],
        &b"GET /health HTTP/1.1\r\nBad Header Line\r\n\r\n"[..],
        &b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n"[..],
    ] {
        let resp = http_raw(addr, req);
        assert_eq!(resp.status, 400, "{req:?}: {resp:?}");
        resp.assert_connection_close();
    }
    // The server is still fine.
    assert_eq!(server.health()["status"], "ok");
}

#[test]
fn bad_user_id_is_refused_with_400_before_the_upgrade() {
    let server = Server::start(&[]);
    let addr = server.addr();
    let long = format!("/ws/{}", "a".repeat(65));
    for path in [
        "/ws/bad!id",
        "/ws/a%20b",
        "/ws/%ZZ",
        "/ws/a/b",
        "/ws/%C3%A9",
        long.as_str(),
        // An empty id is not 1-64 characters either (not the same as plain `/ws`).
        "/ws/",
    ] {
        let resp = upgrade_refused(addr, path);
        assert_eq!(resp.status, 400, "{path}: {resp:?}");
        resp.assert_connection_close();
    }
    // 64 characters of every allowed kind is fine.
    let ok = format!("/ws/Az09_.@-{}", "b".repeat(53));
    let mut c = try_connect_path(addr, &ok).expect("64-char id accepted");
    c.say("hi", None);
    c.recv_until_chat();
}

fn api_key_checks(server: &Server) {
    let addr = server.addr();
    for path in [
        "/ws/alice",
        "/ws/alice?token=wrong",
        "/ws/alice?token=",
        "/ws?token=s3cre",
        "/ws/alice?since=0",
    ] {
        let resp = upgrade_refused(addr, path);
        assert_eq!(resp.status, 403, "{path}: {resp:?}");
        resp.assert_connection_close();
        match try_connect_path(addr, path) {
            Err(ConnectError::Status(403, _)) => {}
            other => panic!("{path}: expected 403, got {:?}", other.map(|_| "101")),
        }
    }
    for path in [
        "/ws/alice?token=s3cret",
        "/ws?token=s3cret",
        "/ws/alice?since=0&token=s3cret",
    ] {
        let mut c = try_connect_path(addr, path).unwrap_or_else(|e| panic!("{path}: {e:?}"));
        c.say("let me in", None);
        let (_, chat) = c.recv_until_chat();
        assert_eq!(chat["text"], "let me in");
        c.close();
    }
    // /health needs no token.
    assert_eq!(server.health()["status"], "ok");
}

#[test]
fn api_key_option_requires_token_403() {
    let server = Server::start(&["--api-key", "s3cret"]);
    api_key_checks(&server);
}

#[test]
fn api_key_from_environment_requires_token_403() {
    let server = Server::start_with_env(&[], &[("STRAYCAT_API_KEY", "s3cret")]);
    api_key_checks(&server);
}

#[test]
fn echo_is_404_without_raw_echo() {
    let server = Server::start(&[]);
    let resp = upgrade_refused(server.addr(), "/echo");
    assert_eq!(resp.status, 404, "{resp:?}");
    resp.assert_connection_close();
    match try_connect_path(server.addr(), "/echo") {
        Err(ConnectError::Status(404, _)) => {}
        other => panic!("expected 404, got {:?}", other.map(|_| "101")),
    }
}

#[test]
fn echo_returns_text_and_binary_with_raw_echo() {
    let server = Server::start(&["--raw-echo"]);
    let mut c = try_connect_path(server.addr(), "/echo").expect("connect /echo");
    let big = "é".repeat(20_000);
    for text in ["hello", "not even json {", "", big.as_str()] {
        c.ws.send(Message::text(text.to_string())).expect("send");
        match c.ws.read().expect("read") {
            Message::Text(t) => assert_eq!(t.as_str(), text),
            other => panic!("expected text echo, got {other:?}"),
        }
    }
    for data in [vec![0u8, 1, 2, 255], vec![], vec![7u8; 50_000]] {
        c.ws.send(Message::binary(data.clone())).expect("send");
        match c.ws.read().expect("read") {
            Message::Binary(b) => assert_eq!(&b[..], &data[..]),
            other => panic!("expected binary echo, got {other:?}"),
        }
    }
    c.close();
    // The chat endpoint still works next to it.
    let mut chat = server.connect("beside", "");
    chat.say("hi", None);
    chat.recv_until_chat();
}

/// A client that sends its upgrade request and frames and then half-closes, all before the
/// server looks at the socket: its one hang-up event arrives while the request is being
/// read, and the end of stream must still be seen after the upgrade (else the socket would
/// stay open until the heartbeat, 40 s with the defaults). The server must end it.
#[test]
fn half_close_right_after_pipelined_frames_still_ends_the_connection() {
    let server = Server::start(&["--raw-echo"]);
    let addr = server.addr();
    let mut s = tcp(addr);
    let mut bytes = upgrade_request(addr, "/echo").into_bytes();
    let payload = "p".repeat(300);
    for _ in 0..6 {
        write_frame(&mut bytes, OP_TEXT, payload.as_bytes()).expect("frame into a Vec");
    }
    s.write_all(&bytes).expect("request and frames");
    s.shutdown(std::net::Shutdown::Write).expect("half-close");
    s.set_read_timeout(Some(Duration::from_secs(15)))
        .expect("read timeout");
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).expect("response head"), 1, "EOF in the head");
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{:?}",
        String::from_utf8_lossy(&head)
    );
    // The echoes may or may not come before it: a peer that vanishes without a close
    // frame has its socket dropped with whatever was still unsent (chat frames stay held
    // for the next socket; see tests/sessions.rs).
    let mut echoes = 0;
    loop {
        match read_frame(&mut s) {
            Ok(None) => break,
            Ok(Some((_, OP_TEXT, p))) => {
                assert_eq!(p, payload.as_bytes());
                echoes += 1;
            }
            Ok(Some(_)) => {}
            Err(e) => panic!("no end of stream within 15 s after {echoes} echoes: {e}"),
        }
    }
    assert!(echoes <= 6);
}
