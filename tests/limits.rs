//! Limits and liveness: heartbeat, half-open handshakes, the connection cap, queued turns,
//! turn timeout, slow consumers.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use tungstenite::{Error as WsError, Message};

/// Reads once from a client that answers pings (tungstenite queues the pong and sends it on
/// the next read); returns true if a ping arrived. Anything but a ping or a read timeout fails.
fn pump(c: &mut Client) -> bool {
    match c.ws.read() {
        Ok(Message::Ping(_)) => true,
        Ok(Message::Pong(_)) => false,
        Err(WsError::Io(e)) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            false
        }
        Ok(other) => panic!("[{}] unexpected message {other:?}", c.user),
        Err(e) => panic!("[{}] connection lost: {e}", c.user),
    }
}

#[test]
fn silent_client_is_dropped_by_heartbeat_answering_client_stays() {
    let server = Server::start(&["--ping-interval-secs", "1", "--ping-timeout-secs", "1"]);
    let mut good = server.connect("good", "");
    good.ws
        .get_ref()
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    // Completes the handshake, then never reads nor writes.
    let mut silent = raw_ws(server.addr(), "/ws/silent");

    let is_silent_drop = |l: &str| l.contains("heartbeat") && l.contains("user=silent");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut pings = 0;
    while !server.logs().iter().any(|l| is_silent_drop(l)) {
        assert!(
            Instant::now() < deadline,
            "no heartbeat drop logged for the silent client"
        );
        pings += pump(&mut good) as u32;
    }
    let line = server
        .wait_log_line(is_silent_drop, Duration::ZERO)
        .unwrap();
    assert!(line.contains("WARN"), "heartbeat drop is a warning: {line}");
    assert!(line.contains("peer="), "{line}");

    assert!(
        read_until_eof(&mut silent, Duration::from_secs(15)),
        "the silent client's socket was closed by the server"
    );

    // The answering client lives on through more ping rounds.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut more = 0;
    while more < 2 {
        assert!(
            Instant::now() < deadline,
            "no more pings for the answering client"
        );
        more += pump(&mut good) as u32;
    }
    eprintln!("answering client saw {} pings", pings + more);
    good.ws
        .get_ref()
        .set_read_timeout(Some(READ_TIMEOUT))
        .unwrap();
    good.say("still alive", None);
    let (_, chat) = good.recv_until_chat();
    assert_chat(&chat, "good", "still alive", None);
    assert!(
        !server
            .logs()
            .iter()
            .any(|l| l.contains("heartbeat") && l.contains("user=good")),
        "the answering client was never considered dead"
    );
}

const HALF_REQUEST: &[u8] = b"GET /ws/half HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgr";
const REST_OF_REQUEST: &[u8] = b"ade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

/// 20 connections that sent half a request and 5 that sent nothing.
fn half_open(server: &Server) -> Vec<TcpStream> {
    let mut v: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut s = tcp(server.addr());
            s.write_all(HALF_REQUEST).expect("write half request");
            s
        })
        .collect();
    v.extend((0..5).map(|_| tcp(server.addr())));
    v
}

fn chat_once(server: &Server, user: &str) {
    let mut c = server.connect(user, "");
    c.say("through", None);
    let (tokens, chat) = c.recv_until_chat();
    assert_eq!(tokens, words("through"));
    assert_chat(&chat, user, "through", None);
    c.close();
}

#[test]
fn half_open_handshakes_do_not_block_others() {
    // A long handshake timeout, so a blocked server would fail the client's read timeout.
    let server = Server::start(&["--handshake-timeout-secs", "60"]);
    let mut halves = half_open(&server);
    chat_once(&server, "full");

    // The half-open ones are still being served: one can finish its handshake.
    let s = &mut halves[0];
    s.write_all(REST_OF_REQUEST).expect("write rest");
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(0) => panic!("EOF: {:?}", String::from_utf8_lossy(&head)),
            Ok(_) => head.push(b[0]),
            Err(e) => panic!("read: {e}"),
        }
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
}

#[test]
fn half_open_handshakes_are_closed_after_the_handshake_timeout() {
    let server = Server::start(&["--handshake-timeout-secs", "1"]);
    let mut halves = half_open(&server);
    chat_once(&server, "full");
    for (i, s) in halves.iter_mut().enumerate() {
        assert!(
            read_until_eof(s, Duration::from_secs(15)),
            "half-open connection {i} was not closed by the server"
        );
    }
    chat_once(&server, "again");
}

#[test]
fn connection_cap_refuses_with_503_and_frees_slots() {
    let server = Server::start(&["--max-connections", "3"]);
    let addr = server.addr();
    let mut cs: Vec<Client> = (1..=3)
        .map(|i| server.connect(&format!("c{i}"), ""))
        .collect();

    let resp = upgrade_refused(addr, "/ws/c4");
    assert_eq!(resp.status, 503, "{resp:?}");
    resp.assert_connection_close();
    match try_connect_path(addr, "/ws/c4") {
        Err(ConnectError::Status(503, _)) => {}
        other => panic!("expected 503, got {:?}", other.map(|_| "101")),
    }

    for c in cs.iter_mut() {
        c.say("still served", None);
        let (_, chat) = c.recv_until_chat();
        assert_chat(&chat, &c.user.clone(), "still served", None);
    }

    cs.remove(0).close();
    let mut c4 = poll(
        "a free connection slot",
        Duration::from_secs(10),
        || match try_connect_path(addr, "/ws/c4") {
            Ok(c) => Some(c),
            Err(ConnectError::Status(503, _)) => None,
            Err(e) => panic!("unexpected connect failure: {e:?}"),
        },
    );
    c4.say("in", None);
    let (_, chat) = c4.recv_until_chat();
    assert_chat(&chat, "c4", "in", None);
    // Full again.
    let resp = upgrade_refused(addr, "/ws/c5");
    assert_eq!(resp.status, 503, "{resp:?}");
    for c in cs.iter_mut() {
        c.say("ok", None);
        c.recv_until_chat();
    }
}

#[test]
fn too_many_queued_turns_is_busy() {
    let server = Server::start(&["--echo-delay-ms", "300", "--max-queued-turns", "1"]);
    let mut c = server.connect("busy", "");
    c.say("w1", Some("b1"));
    c.say("w2", Some("b2"));
    c.say("w3", Some("b3"));

    let mut chats = Vec::new();
    let mut busy = Vec::new();
    let mut last_seq = 0;
    let mut saw = |v: &Value, chats: &mut Vec<String>, busy: &mut Vec<Value>| {
        match v["type"].as_str() {
            Some("chat_token") => return,
            Some("chat") => chats.push(v["reply_to"].as_str().unwrap_or("?").to_string()),
            Some("error") => {
                assert_error(v, "Busy");
                busy.push(v.clone());
            }
            _ => panic!("unexpected frame {v}"),
        }
        assert!(seq(v) > last_seq, "seq increases: {v}");
        last_seq = seq(v);
    };
    while chats.len() < 2 {
        let v = c.recv_json();
        saw(&v, &mut chats, &mut busy);
    }
    // A fourth message, once the queue has room, is answered.
    c.say("w4", Some("b4"));
    loop {
        let v = c.recv_json();
        saw(&v, &mut chats, &mut busy);
        if v["reply_to"] == "b4" {
            break;
        }
    }
    assert_eq!(chats, ["b1", "b2", "b4"], "the third message was not run");
    assert_eq!(busy.len(), 1, "exactly one Busy: {busy:?}");
    if let Some(r) = busy[0].get("reply_to") {
        assert_eq!(r, "b3", "Busy answers the third message");
    }
}

#[test]
fn turn_timeout_is_an_error_and_the_next_message_works() {
    let server = Server::start(&["--turn-timeout-secs", "1", "--echo-delay-ms", "600"]);
    let mut c = server.connect("slowpoke", "");
    c.say("a b c", Some("t1"));
    loop {
        let v = c.recv_json();
        match v["type"].as_str() {
            Some("chat_token") => assert!(["a", "b"].contains(&v["content"].as_str().unwrap())),
            Some("error") => {
                assert_error(&v, "Timeout");
                if let Some(r) = v.get("reply_to") {
                    assert_eq!(r, "t1");
                }
                break;
            }
            _ => panic!("expected tokens then a Timeout error, got {v}"),
        }
    }
    // Nothing of the timed-out turn may leak into the next turns.
    for (text, id) in [("next", "t2"), ("last", "t3")] {
        c.say(text, Some(id));
        let (tokens, chat) = c.recv_until_chat();
        assert_eq!(tokens, words(text), "only this turn's tokens");
        assert_chat(&chat, "slowpoke", text, Some(id));
    }
}

#[test]
fn slow_consumer_is_closed_with_1008_and_keeps_its_frames() {
    let server = Server::start(&["--max-buffered-bytes", "65536", "--max-held-frames", "4096"]);
    let mut s = tiny_window(server.addr(), "/ws/slow");
    s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();

    // Many 30 KB messages, never reading the ~120 KB of answer each one produces.
    let sent = flood_until_slow_consumer(&server, &mut s);
    let line = server
        .wait_log_all(&["slow consumer", "user=slow"], Duration::from_secs(20))
        .unwrap_or_else(|| panic!("no `slow consumer` warning after {sent} messages"));
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("peer="), "{line}");

    // Now read everything: frames, then a close 1008.
    let mut seqs = Vec::new();
    let close = loop {
        match read_raw_msg(&mut s) {
            Ok(RawMsg::Text(t)) => {
                let v: Value = serde_json::from_slice(&t).expect("JSON frame");
                if let Some(q) = v["seq"].as_u64() {
                    seqs.push(q);
                }
            }
            Ok(RawMsg::Ping | RawMsg::Pong) => {}
            Ok(RawMsg::Close(code, reason)) => break (code, reason),
            Ok(other) => {
                panic!("expected frames then close 1008, got {other:?} after seqs {seqs:?}")
            }
            Err(e) => panic!("reading the slow socket failed ({e}) after seqs {seqs:?}"),
        }
    };
    assert_eq!(
        close.0,
        Some(1008),
        "slow consumer close code; reason {:?}",
        close.1
    );
    let k = seqs.len() as u64;
    assert_eq!(
        seqs,
        (1..=k).collect::<Vec<_>>(),
        "frames before the close are in order"
    );

    // The next socket gets every frame the old one did not, in order, then carries on.
    let mut c = server.connect("slow", "");
    c.say("end", Some("end"));
    let mut next = k + 1;
    let mut replayed = 0;
    loop {
        let v = c.recv_json();
        if v["type"] == "chat_token" {
            continue;
        }
        assert_eq!(
            seq(&v),
            next,
            "frame {next} after the slow socket's last one: {}",
            {
                let mut v = v.clone();
                v["text"] = Value::Null;
                v["content"] = Value::Null;
                v["why"] = Value::Null;
                v
            }
        );
        next += 1;
        if v["reply_to"] == "end" {
            assert_chat(&v, "slow", "end", Some("end"));
            break;
        }
        replayed += 1;
    }
    eprintln!("sent {sent} messages; {k} frames read before close; {replayed} replayed");
}
