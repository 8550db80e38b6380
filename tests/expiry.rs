//! Sessions end: `--session-ttl-secs` expiry of a detached idle session, and the
//! `--max-sessions` cap, where the longest-idle detached session gives way (or 503).

mod common;

use std::time::Duration;

use common::*;

fn sessions(server: &Server) -> u64 {
    let h = server.health();
    h["sessions"]
        .as_u64()
        .unwrap_or_else(|| panic!("health.sessions is a number: {h}"))
}

#[test]
fn a_detached_idle_session_expires_after_the_ttl() {
    let server = Server::start(&["--session-ttl-secs", "1"]);
    let mut a = server.connect("ttl", "");
    a.say("hello there", Some("m1"));
    let (_, chat) = a.recv_until_chat();
    assert_chat(&chat, "ttl", "hello there", Some("m1"));
    assert_eq!(seq(&chat), 1);
    // Attached, the session does not expire however long it is idle; the first wait for
    // the expiry line below would otherwise find it early.
    assert_eq!(sessions(&server), 1);
    a.close();

    let line = server
        .wait_log_all(&["user=ttl", "session expired"], Duration::from_secs(10))
        .expect("an expiry log line");
    assert!(line.contains("after 1 s idle"), "{line}");
    assert!(
        !line.contains("undelivered"),
        "the reply had been delivered: {line}"
    );
    assert_eq!(sessions(&server), 0);

    // The user comes back: a new session, which says so to a client that resumes, and
    // which no longer knows message m1 (it runs again).
    let mut b = server.connect("ttl", "?since=1");
    let gap = b.recv_json();
    assert_error(&gap, "ResumeGap");
    assert!(
        gap["description"]
            .as_str()
            .is_some_and(|d| d.contains("restarted or expired")),
        "{gap}"
    );
    assert_eq!(seq(&gap), 2, "numbering goes on above what the client saw");
    b.say("hello there", Some("m1"));
    let (_, again) = b.recv_until_chat();
    assert_chat(&again, "ttl", "hello there", Some("m1"));
    assert_eq!(seq(&again), 3);
}

#[test]
fn at_the_session_cap_the_longest_idle_detached_session_gives_way() {
    let server = Server::start(&["--max-sessions", "2"]);
    let mut alice = server.connect("alice", "");
    alice.say("hi from alice", None);
    alice.recv_until_chat();
    alice.close();
    server
        .wait_log_all(&["user=alice", "disconnected"], Duration::from_secs(10))
        .expect("alice's session detached");
    let mut bob = server.connect("bob", "");
    assert_eq!(sessions(&server), 2);

    // A third user: alice's detached session is dropped to make room.
    let mut carol = server.connect("carol", "");
    let line = server
        .wait_log_all(
            &["user=alice", "session dropped to make room"],
            Duration::from_secs(10),
        )
        .expect("alice's session evicted");
    assert!(line.contains("session cap 2"), "{line}");
    assert_eq!(sessions(&server), 2);

    // Both sessions attached: a fourth user is refused, and nobody is evicted.
    match try_connect_path(server.addr(), "/ws/dave") {
        Err(ConnectError::Status(503, body)) => {
            assert!(body.contains("too many sessions"), "{body}")
        }
        Err(e) => panic!("dave: expected 503, got {e:?}"),
        Ok(_) => panic!("dave: expected 503, got a WebSocket"),
    }
    bob.say("still here", None);
    let (_, chat) = bob.recv_until_chat();
    assert_chat(&chat, "bob", "still here", None);
    carol.say("me too", None);
    let (_, chat) = carol.recv_until_chat();
    assert_chat(&chat, "carol", "me too", None);

    // Carol leaves; alice comes back to a new session (hers was dropped), taking carol's
    // place.
    carol.close();
    server
        .wait_log_all(&["user=carol", "disconnected"], Duration::from_secs(10))
        .expect("carol's session detached");
    let mut alice = server.connect("alice", "?since=1");
    assert_error(&alice.recv_json(), "ResumeGap");
    server
        .wait_log_all(
            &["user=carol", "session dropped to make room"],
            Duration::from_secs(10),
        )
        .expect("carol's session evicted");
    assert_eq!(sessions(&server), 2);
}
