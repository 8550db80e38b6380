//! Sessions outlive sockets: disconnects mid-answer, replacement, resume with `?since=N`.

mod common;

use std::time::Duration;

use common::*;

const SLOW_TEXT: &str = "one two three four five";

/// How the first socket goes away in the middle of a slow answer.
enum Disconnect {
    /// A close frame, then the TCP close.
    Clean,
    /// `shutdown(Both)` with no close frame.
    TcpDrop,
    /// A second connection of the same user while the first is still open.
    Replaced,
}

/// Number of WebSocket connections `/health` reports.
fn connections(server: &Server) -> u64 {
    let h = server.health();
    h["connections"]
        .as_u64()
        .unwrap_or_else(|| panic!("health.connections is a number: {h}"))
}

fn disconnect_mid_answer(how: Disconnect) {
    let server = Server::start(&["--echo-delay-ms", "200"]);
    let user = "mid";
    let mut old = server.connect(user, "");
    let with_socket = connections(&server);
    old.say(SLOW_TEXT, Some("q1"));
    let first = old.recv_json();
    assert_eq!(first["type"], "chat_token", "turn is running: {first}");
    assert_eq!(first["content"], "one");

    let mut new = match how {
        Disconnect::Clean | Disconnect::TcpDrop => {
            if matches!(how, Disconnect::Clean) {
                old.close();
            } else {
                old.drop_tcp();
            }
            // Wait until the server has noticed the socket is gone.
            poll(
                "the server to drop the old socket",
                Duration::from_secs(10),
                || (connections(&server) < with_socket).then_some(()),
            );
            server.connect(user, "")
        }
        Disconnect::Replaced => {
            let new = server.connect(user, "");
            let (before, close) = old.expect_close();
            assert_eq!(
                close,
                Some((1000, "replaced".to_string())),
                "old socket closed with 1000 replaced"
            );
            for f in &before {
                match f {
                    Incoming::Json(v) if v["type"] == "chat_token" => {}
                    other => panic!("old socket got {other:?} before its close"),
                }
            }
            let line = server
                .wait_log_all(
                    &["replaced", &format!("user={user}")],
                    Duration::from_secs(10),
                )
                .expect("a log line about the replaced connection");
            assert!(line.contains("peer="), "log line names the peer: {line}");
            new
        }
    };

    // The held (or still running) reply arrives on the new socket, once, with its seq.
    let (tokens, chat) = new.recv_until_chat();
    let all = words(SLOW_TEXT);
    assert!(
        tokens.len() < all.len() && all.ends_with(&tokens),
        "only live tokens of the rest of the turn may arrive, got {tokens:?}"
    );
    assert_chat(&chat, user, SLOW_TEXT, Some("q1"));
    assert_eq!(seq(&chat), 1);

    // And the session goes on.
    new.say("next", Some("q2"));
    let (tokens, chat) = new.recv_until_chat();
    assert_eq!(tokens, words("next"));
    assert_chat(&chat, user, "next", Some("q2"));
    assert_eq!(seq(&chat), 2);
}

#[test]
fn clean_close_mid_answer_then_reconnect_gets_held_reply() {
    disconnect_mid_answer(Disconnect::Clean);
}

#[test]
fn tcp_drop_mid_answer_then_reconnect_gets_held_reply() {
    disconnect_mid_answer(Disconnect::TcpDrop);
}

#[test]
fn new_connection_replaces_old_one_mid_answer() {
    disconnect_mid_answer(Disconnect::Replaced);
}

#[test]
fn reply_finished_while_disconnected_is_delivered_on_next_socket() {
    // The echo agent answers in the loop iteration that reads the message: without a delay
    // the reply could reach the dying socket's kernel buffer (and count as handed) before
    // the hang-up is read. With one, the reply is sure to finish after the disconnect,
    // which the log line below proves.
    let server = Server::start(&["--echo-delay-ms", "300"]);
    let mut c = server.connect("later", "");
    let with_socket = connections(&server);
    c.say("quick", Some("k1"));
    c.drop_tcp();
    server
        .wait_log_all(
            &["user=later", "left while a turn was running"],
            Duration::from_secs(10),
        )
        .expect("the socket went before the reply was ready");
    poll(
        "the server to drop the socket",
        Duration::from_secs(10),
        || (connections(&server) < with_socket).then_some(()),
    );
    server
        .wait_log_all(
            &["user=later reply ready while away"],
            Duration::from_secs(10),
        )
        .expect("the reply finished with no socket");
    let mut c = server.connect("later", "");
    let (_, chat) = c.recv_until_chat();
    assert_chat(&chat, "later", "quick", Some("k1"));
    assert_eq!(seq(&chat), 1);
    c.say("then", Some("k2"));
    let (tokens, chat) = c.recv_until_chat();
    assert_eq!(tokens, words("then"));
    assert_eq!(seq(&chat), 2, "the held reply was sent once: {chat}");
}

/// Sends `n` messages `m{i}` with ids `i{i}` and returns their replies.
fn chat_n(c: &mut Client, n: usize) -> Vec<serde_json::Value> {
    (1..=n)
        .map(|i| {
            c.say(&format!("m{i}"), Some(&format!("i{i}")));
            let (_, chat) = c.recv_until_chat();
            chat
        })
        .collect()
}

#[test]
fn resume_since_replays_later_frames_in_order() {
    let server = Server::start(&[]);
    let user = "res";
    let mut c = server.connect(user, "");
    let replies = chat_n(&mut c, 3);
    let seqs: Vec<u64> = replies.iter().map(seq).collect();
    assert_eq!(seqs, [1, 2, 3]);
    c.close();

    // since=1: frames 2 and 3, in order, no tokens.
    let mut c = server.connect(user, "?since=1");
    for i in 2..=3u64 {
        let v = c.recv_json();
        assert_eq!(v["type"], "chat", "replayed frame {i}: {v}");
        assert_chat(&v, user, &format!("m{i}"), Some(&format!("i{i}")));
        assert_eq!(seq(&v), i);
    }
    c.say("s1", Some("s1"));
    let (tokens, chat) = c.recv_until_chat();
    assert_eq!(tokens, words("s1"), "nothing else was replayed");
    assert_eq!(seq(&chat), 4);
    c.close();

    // since=latest: nothing replayed.
    let mut c = server.connect(user, "?since=4");
    c.say("s2", Some("s2"));
    let (tokens, chat) = c.recv_until_chat();
    assert_eq!(tokens, words("s2"));
    assert_eq!(seq(&chat), 5);
    c.close();

    // No since, everything handed out already: nothing replayed.
    let mut c = server.connect(user, "");
    c.say("s3", Some("s3"));
    let (tokens, chat) = c.recv_until_chat();
    assert_eq!(tokens, words("s3"));
    assert_eq!(seq(&chat), 6);
    c.close();

    // since=0: the whole history, in order.
    let mut c = server.connect(user, "?since=0");
    let expect = ["m1", "m2", "m3", "s1", "s2", "s3"];
    for (i, text) in expect.iter().enumerate() {
        let v = c.recv_json();
        assert_eq!(v["type"], "chat", "{v}");
        assert_eq!(v["text"], *text, "{v}");
        assert_eq!(seq(&v), i as u64 + 1);
    }
    c.say("s4", None);
    let (tokens, chat) = c.recv_until_chat();
    assert_eq!(tokens, words("s4"));
    assert_eq!(seq(&chat), 7);
}

#[test]
fn resume_beyond_held_frames_yields_resume_gap_first() {
    let server = Server::start(&["--max-held-frames", "2"]);
    let user = "gap";
    let mut c = server.connect(user, "");
    let seqs: Vec<u64> = chat_n(&mut c, 4).iter().map(seq).collect();
    assert_eq!(seqs, [1, 2, 3, 4]);
    c.close();

    // Frames after 2 are all held: no gap.
    let mut c = server.connect(user, "?since=2");
    for i in 3..=4u64 {
        let v = c.recv_json();
        assert_eq!(v["type"], "chat", "{v}");
        assert_eq!(seq(&v), i, "{v}");
    }
    c.close();

    // Frames 1 and 2 were evicted: ResumeGap, then what is held, in order.
    let mut c = server.connect(user, "?since=0");
    let gap = c.recv_json();
    assert_error(&gap, "ResumeGap");
    for i in 3..=4u64 {
        let v = c.recv_json();
        assert_eq!(v["type"], "chat", "{v}");
        assert_chat(&v, user, &format!("m{i}"), Some(&format!("i{i}")));
        assert_eq!(seq(&v), i, "{v}");
    }
    c.say("after", None);
    let (tokens, chat) = c.recv_until_chat();
    assert_eq!(tokens, words("after"), "nothing else replayed");
    assert_chat(&chat, user, "after", None);
    assert!(server.wait_log(&format!("user={user}"), Duration::from_secs(5)));
}

#[test]
fn held_frames_are_bounded_in_bytes_too() {
    // A chat frame carries its 1,000-character text three times: about 3.2 KB, so a
    // 4 KiB bound holds one of them.
    let server = Server::start(&["--max-held-bytes", "4096"]);
    let user = "bytes";
    let mut c = server.connect(user, "");
    for i in 1..=3u64 {
        let text = format!("m{i}{}", "x".repeat(1000));
        c.say(&text, None);
        let (_, chat) = c.recv_until_chat();
        assert_eq!(seq(&chat), i);
    }
    c.close();

    let mut c = server.connect(user, "?since=0");
    assert_error(&c.recv_json(), "ResumeGap");
    let v = c.recv_json();
    assert_eq!(v["type"], "chat", "{v}");
    assert_eq!(seq(&v), 3, "only the newest fits: {v}");
    c.say("after", None);
    let (tokens, chat) = c.recv_until_chat();
    assert_eq!(tokens, words("after"), "nothing else replayed");
    assert_chat(&chat, user, "after", None);
}

#[test]
fn held_frames_of_all_sessions_together_stay_within_the_total_budget() {
    // Chat frames of a 1,000-character text are about 3.2 KB: an 8 KiB budget for all
    // sessions holds two of them, however many each session may hold on its own.
    let server = Server::start(&["--max-held-bytes-total", "8192"]);
    for user in ["first", "second"] {
        let mut c = server.connect(user, "");
        for i in 1..=3u64 {
            c.say(&format!("{user}{i}{}", "x".repeat(1000)), None);
            let (_, chat) = c.recv_until_chat();
            assert_eq!(seq(&chat), i);
        }
        c.close();
    }
    assert!(server.wait_log("server-wide budget", Duration::from_secs(5)));
    // The first session, the largest while the second one's replies came, gave way first:
    // only its newest frame is left.
    let mut c = server.connect("first", "?since=0");
    assert_error(&c.recv_json(), "ResumeGap");
    let v = c.recv_json();
    assert_eq!((v["type"].as_str(), seq(&v)), (Some("chat"), 3), "{v}");
    c.say("after", None);
    let (tokens, chat) = c.recv_until_chat();
    assert_eq!(tokens, words("after"), "nothing else replayed");
    assert_eq!(seq(&chat), 5, "4 was the ResumeGap error");
    // The second session keeps its newest frame too.
    let mut c = server.connect("second", "?since=2");
    let v = c.recv_json();
    assert_eq!((v["type"].as_str(), seq(&v)), (Some("chat"), 3), "{v}");
}

#[test]
fn history_of_all_sessions_together_stays_within_its_budget() {
    // Each turn of a 1,000-character text keeps about 2 KB of history (the line and the
    // echoed reply): a 4 KiB budget keeps two turns in all.
    let server = Server::start(&["--max-history-bytes-total", "4096"]);
    let mut c = server.connect("talker", "");
    for i in 1..=3u64 {
        c.say(&format!("t{i}{}", "y".repeat(1000)), None);
        let (_, chat) = c.recv_until_chat();
        assert_eq!(seq(&chat), i);
    }
    assert!(server.wait_log(
        "history over the server-wide budget",
        Duration::from_secs(5)
    ));
    // Forgetting history costs the session nothing else: it keeps answering.
    c.say("still here", None);
    let (tokens, chat) = c.recv_until_chat();
    assert_eq!(tokens, words("still here"));
    assert_eq!(seq(&chat), 4);
}
