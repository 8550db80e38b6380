//! The chat part of Cheshire Cat's HTTP API over real sockets: `POST /message` runs a turn
//! in the user's session (ids, history, held frames and seqs shared with the socket),
//! `GET`/`DELETE /memory/conversation_history`, the Cat's credentials, and bad requests.

mod common;

use common::*;
use serde_json::{Value, json};
use std::io::Write;

/// A request with `headers` (each a whole `Name: value` line) and a JSON `body`.
fn call(server: &Server, method: &str, path: &str, headers: &[&str], body: &str) -> HttpResponse {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\n");
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    if !body.is_empty() {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    http_raw(server.addr(), req.as_bytes())
}

/// `GET /memory/conversation_history` of `user`, parsed.
fn history_of(server: &Server, user: &str) -> Value {
    let header = format!("user_id: {user}");
    json_of(&call(
        server,
        "GET",
        "/memory/conversation_history",
        &[&header],
        "",
    ))
}

fn json_of(resp: &HttpResponse) -> Value {
    serde_json::from_str(&resp.body).unwrap_or_else(|e| panic!("{e}: {resp:?}"))
}

/// A turn over HTTP is a turn of the session: its reply is held for the socket, a resent
/// id is answered from the held frame, the history is the socket's, and forgetting it
/// keeps seqs and held frames.
#[test]
fn a_message_over_http_runs_in_the_session() {
    let server = Server::start(&[]);
    let msg = json!({"text": "hello over http", "id": "h1"}).to_string();
    let resp = call(&server, "POST", "/message", &["user_id: ann"], &msg);
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(
        resp.header("content-type").as_deref(),
        Some("application/json")
    );
    let chat = json_of(&resp);
    assert_chat(&chat, "ann", "hello over http", Some("h1"));
    // The same id again: the same frame, not a second turn.
    let again = json_of(&call(&server, "POST", "/message", &["user_id: ann"], &msg));
    assert_eq!(again, chat);
    // The socket sees the held frame and the same history.
    let mut c = server.connect("ann", "?since=0");
    assert_eq!(c.recv_json(), chat);
    c.say("and over the socket", Some("w1"));
    let (_, ws_chat) = c.recv_until_chat();
    assert_eq!(seq(&ws_chat), seq(&chat) + 1);
    let history = history_of(&server, "ann");
    let lines: Vec<(&str, &str)> = history["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| (h["who"].as_str().unwrap(), h["message"].as_str().unwrap()))
        .collect();
    assert_eq!(
        lines,
        [
            ("Human", "hello over http"),
            ("AI", "hello over http"),
            ("Human", "and over the socket"),
            ("AI", "and over the socket"),
        ]
    );
    let deleted = call(
        &server,
        "DELETE",
        "/memory/conversation_history",
        &["user_id: ann"],
        "",
    );
    assert_eq!(json_of(&deleted), json!({"deleted": true}));
    let history = history_of(&server, "ann");
    assert_eq!(history, json!({"history": []}));
    // Seqs go on; the held reply to h1 still answers a resend.
    c.say("after forgetting", None);
    let (_, next) = c.recv_until_chat();
    assert_eq!(seq(&next), seq(&ws_chat) + 1);
    let again = json_of(&call(&server, "POST", "/message", &["user_id: ann"], &msg));
    assert_eq!(again, chat);
    // The Cat's status, for a client asking for JSON at `/` (a browser gets the page).
    let status = call(&server, "GET", "/", &["Accept: application/json"], "");
    assert_eq!(json_of(&status)["status"], "We're purring");
    // Without user_id: the Cat's default user.
    let resp = call(&server, "POST", "/message", &[], r#"{"text":"who am i"}"#);
    assert_eq!(json_of(&resp)["user_id"], "user");
}

/// A client that leaves before the answer: the reply is held for the user's socket.
#[test]
fn a_reply_whose_request_left_is_held() {
    let server = Server::start(&["--echo-delay-ms", "200"]);
    let body = r#"{"text":"slow reply here","id":"gone"}"#;
    let req = format!(
        "POST /message HTTP/1.1\r\nHost: x\r\nuser_id: bo\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut s = tcp(server.addr());
    s.write_all(req.as_bytes()).unwrap();
    assert!(server.wait_log("user=bo", READ_TIMEOUT));
    drop(s);
    assert!(server.wait_log("reply ready while away", READ_TIMEOUT));
    let mut c = server.connect("bo", "");
    assert_chat(&c.recv_json(), "bo", "slow reply here", Some("gone"));
}

/// The API key of the socket, carried the Cat's ways; bad requests get clear statuses.
#[test]
fn credentials_and_bad_requests() {
    let server = Server::start(&["--api-key", "s3cret", "--max-message-bytes", "1024"]);
    let body = r#"{"text":"hi"}"#;
    for headers in [
        &[][..],
        &["access_token: nope"],
        &["Authorization: Bearer nope"],
    ] {
        let resp = call(&server, "POST", "/message", headers, body);
        assert_eq!(resp.status, 403, "{headers:?}: {resp:?}");
    }
    for (path, headers) in [
        ("/message", &["access_token: s3cret"][..]),
        ("/message", &["Authorization: Bearer s3cret"]),
        ("/message?token=s3cret", &[]),
    ] {
        let resp = call(&server, "POST", path, headers, body);
        assert_eq!(resp.status, 200, "{path} {headers:?}: {resp:?}");
    }
    let ok = ["access_token: s3cret"];
    let resp = call(&server, "POST", "/message", &ok, "not json");
    assert_eq!(resp.status, 400, "{resp:?}");
    assert!(
        json_of(&resp)["detail"]
            .as_str()
            .unwrap()
            .contains("not JSON")
    );
    let resp = call(
        &server,
        "POST",
        "/message",
        &["access_token: s3cret", "user_id: bad id"],
        body,
    );
    assert_eq!(resp.status, 400, "{resp:?}");
    let resp = call(
        &server,
        "POST",
        "/message",
        &ok,
        &format!(r#"{{"text":"{}"}}"#, "x".repeat(2000)),
    );
    assert_eq!(resp.status, 413, "{resp:?}");
    let chunked = "POST /message HTTP/1.1\r\nHost: x\r\naccess_token: s3cret\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    assert_eq!(http_raw(server.addr(), chunked.as_bytes()).status, 411);
    let resp = call(&server, "POST", "/message", &ok, "");
    assert_eq!(resp.status, 400, "no body: {resp:?}");
}
