//! Bad input: error frames that keep the connection open, and the close codes 1007 and 1009.

mod common;

use std::io::Write;
use std::time::Duration;

use common::*;
use serde_json::json;

#[test]
fn every_invalid_message_gets_an_error_and_the_connection_stays_usable() {
    let server = Server::start(&[]);
    let mut bystander = server.connect("bystander", "");
    let mut c = server.connect("bad", "");

    let long_id = "x".repeat(65);
    let bad_texts: Vec<String> = vec![
        "not json".into(),
        "{\"text\": \"unterminated".into(),
        "[1, 2, 3]".into(),
        "\"just a string\"".into(),
        "42".into(),
        "null".into(),
        "{}".into(),
        json!({"text": 5}).to_string(),
        json!({"text": null}).to_string(),
        json!({"text": ["a"]}).to_string(),
        json!({"message": "hi"}).to_string(),
        json!({"text": "hi", "id": long_id}).to_string(),
        "".into(),
    ];
    let mut last_seq = 0;
    for bad in &bad_texts {
        c.send_text(bad);
        let v = c.recv_json();
        assert_error(&v, "InvalidMessage");
        assert!(seq(&v) > last_seq, "seq increases: {v}");
        last_seq = seq(&v);
    }
    // A binary frame is not a chat message either.
    c.send_binary(&[0x7b, 0x7d, 0x00, 0xff]);
    let v = c.recv_json();
    assert_error(&v, "InvalidMessage");
    assert_eq!(seq(&v), last_seq + 1);
    last_seq = seq(&v);

    // The connection is still usable.
    c.say("still here", Some("ok"));
    let (tokens, chat) = c.recv_until_chat();
    assert_eq!(tokens, words("still here"));
    assert_chat(&chat, "bad", "still here", Some("ok"));
    assert_eq!(seq(&chat), last_seq + 1);

    // The other user saw nothing and is served normally.
    bystander.say("hello there", None);
    let (tokens, chat) = bystander.recv_until_chat();
    assert_eq!(tokens, words("hello there"));
    assert_chat(&chat, "bystander", "hello there", None);
    assert_eq!(seq(&chat), 1, "the bystander's session saw no error frame");
}

#[test]
fn invalid_utf8_in_a_text_frame_closes_with_1007() {
    let server = Server::start(&[]);
    let mut bystander = server.connect("bystander", "");
    let mut s = raw_ws(server.addr(), "/ws/utf8");

    // A valid message first, so the raw client is known to work.
    write_frame(&mut s, OP_TEXT, br#"{"text":"ok"}"#).expect("write frame");
    let mut got_chat = false;
    while !got_chat {
        match read_raw_msg(&mut s).expect("read") {
            RawMsg::Text(t) => {
                let v: serde_json::Value = serde_json::from_slice(&t).expect("JSON");
                got_chat = v["type"] == "chat";
            }
            RawMsg::Ping | RawMsg::Pong => {}
            other => panic!("unexpected {other:?}"),
        }
    }

    let mut bad = br#"{"text":""#.to_vec();
    bad.extend_from_slice(&[0xff, 0xfe, 0xc3, 0x28]);
    bad.extend_from_slice(br#""}"#);
    write_frame(&mut s, OP_TEXT, &bad).expect("write bad frame");
    loop {
        match read_raw_msg(&mut s).expect("read") {
            RawMsg::Close(code, _) => {
                assert_eq!(code, Some(1007), "close code for invalid UTF-8");
                break;
            }
            RawMsg::Ping | RawMsg::Pong => {}
            other => panic!("expected close 1007, got {other:?}"),
        }
    }
    let _ = write_frame(&mut s, OP_CLOSE, &1007u16.to_be_bytes());
    let _ = s.flush();
    assert!(
        read_until_eof(&mut s, Duration::from_secs(10)),
        "server closes the TCP connection"
    );

    bystander.say("fine", None);
    let (_, chat) = bystander.recv_until_chat();
    assert_chat(&chat, "bystander", "fine", None);
}

#[test]
fn message_over_the_size_limit_closes_with_1009() {
    let server = Server::start(&["--max-message-bytes", "1024"]);
    let mut bystander = server.connect("bystander", "");
    let mut c = server.connect("big", "");

    // Just under the limit is fine.
    let text = "y".repeat(900);
    c.say(&text, None);
    let (_, chat) = c.recv_until_chat();
    assert_chat(&chat, "big", &text, None);

    c.say(&"z".repeat(2000), Some("big"));
    let (before, close) = c.expect_close();
    assert!(before.is_empty(), "no frame before the close: {before:?}");
    assert_eq!(
        close.map(|c| c.0),
        Some(1009),
        "close code for an oversize message"
    );

    bystander.say("fine", None);
    let (_, chat) = bystander.recv_until_chat();
    assert_chat(&chat, "bystander", "fine", None);

    // The user can come back.
    let mut c = server.connect("big", "");
    c.say("small", None);
    let (_, chat) = c.recv_until_chat();
    assert_chat(&chat, "big", "small", None);
}
