//! Chat over real sockets: the echo agent's frames, resend by `id`, many users at once.

mod common;

use std::collections::HashSet;
use std::sync::Barrier;

use common::*;
use serde_json::json;

#[test]
fn echo_reply_has_tokens_then_chat_with_seq_and_reply_to() {
    let server = Server::start(&[]);
    let mut c = server.connect("alice", "");

    c.say("a b c", Some("m1"));
    let (tokens, chat) = c.recv_until_chat();
    assert_eq!(tokens, words("a b c"));
    assert_chat(&chat, "alice", "a b c", Some("m1"));
    assert_eq!(seq(&chat), 1, "seq starts at 1");

    // No id: no reply_to; seq goes on.
    c.say("hello", None);
    let (tokens, chat) = c.recv_until_chat();
    assert_eq!(tokens, words("hello"));
    assert_chat(&chat, "alice", "hello", None);
    assert_eq!(seq(&chat), 2);

    // Other fields are accepted and the message is answered; UTF-8 survives.
    c.send_json(&json!({"text": "héllo 世界 🐈", "id": "m3", "prompt_settings": {"x": 1}}));
    let (tokens, chat) = c.recv_until_chat();
    assert_eq!(tokens, words("héllo 世界 🐈"));
    assert_chat(&chat, "alice", "héllo 世界 🐈", Some("m3"));
    assert_eq!(seq(&chat), 3);

    // An id of exactly 64 characters is fine.
    let id64 = "i".repeat(64);
    c.say("edge", Some(&id64));
    let (_, chat) = c.recv_until_chat();
    assert_chat(&chat, "alice", "edge", Some(&id64));
}

#[test]
fn plain_ws_path_is_user_user_and_percent_decoding_applies() {
    let server = Server::start(&[]);
    let mut c = try_connect_path(server.addr(), "/ws").expect("connect /ws");
    c.say("hi", None);
    let (_, chat) = c.recv_until_chat();
    assert_chat(&chat, "user", "hi", None);

    let mut c = try_connect_path(server.addr(), "/ws/al%40ice").expect("connect /ws/al%40ice");
    c.say("hi", None);
    let (_, chat) = c.recv_until_chat();
    assert_chat(&chat, "al@ice", "hi", None);
}

#[test]
fn resend_with_same_id_runs_once() {
    let server = Server::start(&["--echo-delay-ms", "200"]);
    let text = "one two three four five";
    let mut c = server.connect("dup", "");

    c.say(text, Some("d1"));
    let first = c.recv_json();
    assert_eq!(first["type"], "chat_token", "{first}");
    assert_eq!(first["content"], "one");

    // Resend while running: nothing extra may happen.
    c.say(text, Some("d1"));
    let (tokens, chat) = c.recv_until_chat();
    assert_eq!(tokens, words(text)[1..], "one set of tokens only");
    assert_chat(&chat, "dup", text, Some("d1"));
    let s = seq(&chat);

    // Resend after completion: the held reply again, same seq, no tokens.
    c.say(text, Some("d1"));
    let again = c.recv_json();
    assert_eq!(
        again["type"], "chat",
        "held reply re-sent without tokens: {again}"
    );
    assert_chat(&again, "dup", text, Some("d1"));
    assert_eq!(seq(&again), s, "re-sent reply keeps its seq");

    // A sentinel proves nothing else was queued: its tokens and chat come next.
    c.say("fin", Some("f"));
    let (tokens, chat) = c.recv_until_chat();
    assert_eq!(tokens, words("fin"));
    assert_chat(&chat, "dup", "fin", Some("f"));
    assert_eq!(seq(&chat), s + 1);

    // The same after a reconnect (the real use of resend).
    c.close();
    let mut c = server.connect("dup", "");
    c.say(text, Some("d1"));
    let again = c.recv_json();
    assert_eq!(again["type"], "chat", "{again}");
    assert_chat(&again, "dup", text, Some("d1"));
    assert_eq!(seq(&again), s);
    c.say("fin2", Some("f2"));
    let (tokens, chat) = c.recv_until_chat();
    assert_eq!(tokens, words("fin2"));
    assert_eq!(seq(&chat), s + 2);
}

#[test]
fn fifty_users_at_once_each_get_only_their_own_replies() {
    const USERS: usize = 50;
    const MSGS: usize = 3;
    let server = Server::start(&[]);
    let barrier = Barrier::new(USERS);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..USERS)
            .map(|i| {
                let server = &server;
                let barrier = &barrier;
                scope.spawn(move || {
                    let user = format!("u{i}");
                    let mut c = server.connect(&user, "");
                    barrier.wait();
                    let texts: Vec<String> = (0..MSGS)
                        .map(|k| format!("{user}-m{k} alpha{i} beta{k}"))
                        .collect();
                    for (k, t) in texts.iter().enumerate() {
                        c.say(t, Some(&format!("{user}-{k}")));
                    }
                    let own_words: HashSet<String> = texts.iter().flat_map(|t| words(t)).collect();
                    let mut seen = Vec::new();
                    let mut last_seq = 0;
                    while seen.len() < MSGS {
                        let v = c.recv_json();
                        match v["type"].as_str() {
                            Some("chat_token") => {
                                let w = v["content"].as_str().expect("token content");
                                assert!(own_words.contains(w), "{user} got foreign token {v}");
                            }
                            Some("chat") => {
                                assert_eq!(v["user_id"], user.as_str(), "{user} got {v}");
                                let k = seen.len();
                                assert_chat(&v, &user, &texts[k], Some(&format!("{user}-{k}")));
                                assert!(seq(&v) > last_seq, "seq increases: {v}");
                                last_seq = seq(&v);
                                seen.push(v);
                            }
                            _ => panic!("{user} got unexpected frame {v}"),
                        }
                    }
                    c.close();
                })
            })
            .collect();
        for h in handles {
            h.join().expect("client thread");
        }
    });
}
