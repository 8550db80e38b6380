//! Who gets in and how much a client may ask: signed per-user tokens, the Origin check, the
//! rate limits per user and per client address, and credentials kept out of the logs.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use straycat::UserId;
use straycat::auth::{Secret, sign};

const SECRET: &str = "0123456789abcdef0123456789abcdef-kiosk";

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn token_for(user: &str, issued: u64, ttl: u64, secret: &str) -> String {
    let user = UserId::parse(user).unwrap();
    sign(&user, &Secret::new(secret), issued, ttl)
}

/// `straycat token …` with `STRAYCAT_JWT_SECRET` set: its stdout, or its stderr on failure.
fn token_command(args: &[&str]) -> Result<String, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_straycat"))
        .arg("token")
        .args(args)
        .env("STRAYCAT_JWT_SECRET", SECRET)
        .output()
        .expect("run straycat token");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).to_string())
    }
}

/// Base64url without padding, for hand-made tokens.
fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A TCP connection to `addr` from the loopback address `source` (127.0.0.x): the rate
/// limits count client addresses apart.
fn tcp_from(source: Ipv4Addr, addr: SocketAddr) -> TcpStream {
    let sock =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    sock.bind(&SocketAddr::new(IpAddr::V4(source), 0).into())
        .expect("bind the source address");
    sock.connect(&addr.into()).expect("connect");
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Sends an upgrade for `path` from `source` with these extra header lines; the status.
fn upgrade_from(source: Ipv4Addr, addr: SocketAddr, path: &str, extra: &str) -> HttpResponse {
    let mut s = tcp_from(source, addr);
    let req = upgrade_request(addr, path).replacen("\r\n\r\n", &format!("\r\n{extra}\r\n"), 1);
    s.write_all(req.as_bytes()).expect("write upgrade");
    read_http_response(&mut s)
}

/// A chat client on `path` (`/ws?token=…`).
fn connect_path(server: &Server, path: &str) -> Client {
    try_connect_path(server.addr(), path).unwrap_or_else(|e| panic!("connect {path}: {e:?}"))
}

const HOME: Ipv4Addr = Ipv4Addr::LOCALHOST;

#[test]
fn a_signed_token_is_the_user_and_nothing_else_gets_in() {
    let server = Server::start(&["--jwt-secret", SECRET]);
    let addr = server.addr();
    // The subcommand makes a token for the configured secret.
    let bob = token_command(&["--user", "bob", "--ttl-secs", "600"]).expect("token");
    assert_eq!(bob.split('.').count(), 3, "{bob}");
    assert!(token_command(&["--user", "b o b", "--ttl-secs", "6"]).is_err());
    assert!(
        token_command(&["--user", "bob"]).is_err(),
        "a ttl is required"
    );

    // /ws takes the user from the token.
    let mut c = connect_path(&server, &format!("/ws?token={bob}"));
    c.say("hello", Some("m1"));
    let (_, chat) = c.recv_until_chat();
    assert_chat(&chat, "bob", "hello", Some("m1"));
    // /ws/{id} must be the token's user.
    let mut c2 = connect_path(&server, &format!("/ws/bob?token={bob}"));
    c2.say("again", None);
    assert_chat(&c2.recv_until_chat().1, "bob", "again", None);
    let other = upgrade_refused(addr, &format!("/ws/alice?token={bob}"));
    assert_eq!(other.status, 403, "{other:?}");
    assert!(other.body.contains("for user bob"), "{other:?}");

    let now = unix_now();
    let refused = [
        ("no token", "/ws/bob".to_string()),
        (
            "expired",
            format!("/ws?token={}", token_for("bob", now - 7200, 60, SECRET)),
        ),
        (
            "another secret",
            format!(
                "/ws?token={}",
                token_for("bob", now, 600, "not-the-servers-secret-at-all!!")
            ),
        ),
        (
            "alg none",
            format!(
                "/ws?token={}.{}.",
                b64(br#"{"alg":"none","typ":"JWT"}"#),
                b64(format!(r#"{{"sub":"bob","exp":{}}}"#, now + 600).as_bytes())
            ),
        ),
        ("HS512 header on an HS256 signature", {
            let t = token_for("bob", now, 600, SECRET);
            let rest = t.split_once('.').unwrap().1;
            format!(
                "/ws?token={}.{rest}",
                b64(br#"{"alg":"HS512","typ":"JWT"}"#)
            )
        }),
        ("garbage", "/ws?token=not.a.token".to_string()),
    ];
    for (what, path) in &refused {
        let r = upgrade_refused(addr, path);
        assert_eq!(r.status, 403, "{what}: {r:?}");
    }
    // Every refusal was logged without the token.
    assert!(
        server.wait_log("refused with 403: token expired", Duration::from_secs(10)),
        "{:?}",
        server.logs()
    );
    assert!(server.has_log("token=<redacted>"), "{:?}", server.logs());
    for (_, path) in &refused {
        if let Some((_, token)) = path.split_once("token=") {
            assert!(!server.has_log(token), "a token reached the log: {token}");
        }
    }
    assert!(!server.has_log(&bob), "the good token reached the log");

    // The HTTP API: the token's user; a user_id header must agree with it.
    let post = |user_id: &str| {
        let body = r#"{"text":"by http"}"#;
        http_raw(
            addr,
            format!(
                "POST /message HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {bob}\r\n{user_id}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
    };
    let ok = post("");
    assert_eq!(ok.status, 200, "{ok:?}");
    assert!(ok.body.contains(r#""user_id":"bob""#), "{ok:?}");
    assert_eq!(post("user_id: alice\r\n").status, 403);
}

#[test]
fn with_a_key_and_a_secret_either_credential_works() {
    let server = Server::start(&["--jwt-secret", SECRET, "--api-key", "the-shared-key"]);
    let addr = server.addr();
    let mut by_key = server.connect("alice", "?token=the-shared-key");
    by_key.say("key", None);
    assert_chat(&by_key.recv_until_chat().1, "alice", "key", None);
    let t = token_for("carol", unix_now(), 600, SECRET);
    let mut by_token = connect_path(&server, &format!("/ws?token={t}"));
    by_token.say("token", None);
    assert_chat(&by_token.recv_until_chat().1, "carol", "token", None);
    assert_eq!(upgrade_refused(addr, "/ws/alice?token=wrong").status, 403);
    assert_eq!(upgrade_refused(addr, "/ws/alice").status, 403);
}

#[test]
fn a_page_on_another_site_cannot_open_a_socket() {
    let server = Server::start(&["--allowed-origins", "https://admin.example"]);
    let addr = server.addr();
    let origin = |o: &str| upgrade_from(HOME, addr, "/ws/alice", &format!("Origin: {o}\r\n"));
    let foreign = origin("http://evil.example");
    assert_eq!(foreign.status, 403, "{foreign:?}");
    assert!(foreign.body.contains("Origin"), "{foreign:?}");
    assert_eq!(origin("null").status, 403);
    // The page straycat serves (its own Origin), the listed one, and non-browsers get in.
    assert_eq!(origin(&format!("http://{addr}")).status, 101);
    assert_eq!(origin("https://admin.example").status, 101);
    assert_eq!(upgrade_from(HOME, addr, "/ws/alice", "").status, 101);
    // A form on another site cannot post a message either.
    let body = r#"{"text":"csrf"}"#;
    let post = http_raw(
        addr,
        format!(
            "POST /message HTTP/1.1\r\nHost: {addr}\r\nOrigin: http://evil.example\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    assert_eq!(post.status, 403, "{post:?}");
    assert!(
        server.wait_log(
            "refused with 403: Origin not allowed",
            Duration::from_secs(10)
        ),
        "{:?}",
        server.logs()
    );
    let any = Server::start(&["--allowed-origins", "*"]);
    let r = upgrade_from(
        HOME,
        any.addr(),
        "/ws/alice",
        "Origin: http://evil.example\r\n",
    );
    assert_eq!(r.status, 101);
}

#[test]
fn past_its_message_rate_a_user_is_told_and_a_flood_is_closed() {
    let server = Server::start(&["--max-messages-per-minute", "3"]);
    let mut c = server.connect("fast", "");
    for i in 0..3 {
        let id = format!("ok-{i}");
        c.say("hi", Some(&id));
        assert_chat(&c.recv_until_chat().1, "fast", "hi", Some(&id));
    }
    c.say("one too many", Some("late"));
    let err = c.recv_json();
    assert_eq!(err["type"], "error", "{err}");
    assert_eq!(err["name"], "RateLimited", "{err}");
    assert_eq!(err["reply_to"], "late", "{err}");
    assert!(err["seq"].is_u64(), "{err}");
    // The socket stays open, and another user is not affected.
    let mut other = server.connect("calm", "");
    other.say("fine", None);
    assert_chat(&other.recv_until_chat().1, "calm", "fine", None);
    c.say("still too fast", None);
    assert_eq!(c.recv_json()["name"], "RateLimited");
    // A client that goes on regardless is closed with 1008; its session stays.
    for _ in 0..20 {
        c.say("flood", None);
    }
    let (before, close) = c.expect_close();
    assert_eq!(close.map(|(code, _)| code), Some(1008), "{before:?}");
    assert!(
        server.wait_log(
            "kept sending past --max-messages-per-minute",
            Duration::from_secs(10)
        ),
        "{:?}",
        server.logs()
    );
    // Over HTTP: 429 with Retry-After.
    let addr = server.addr();
    let body = r#"{"text":"by http"}"#;
    let r = http_raw(
        addr,
        format!(
            "POST /message HTTP/1.1\r\nHost: {addr}\r\nuser_id: fast\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(r.header("retry-after").as_deref(), Some("20"), "{r:?}");
    assert!(r.body.contains("RateLimited"), "{r:?}");
    let metrics = http_get(addr, "/metrics").body;
    let refused: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("straycat_rate_limited_messages_total "))
        .collect();
    // The flood is closed at the 11th refusal in a row (a minute's allowance of 3 is below
    // the floor of 10): 2 told before it, 9 of its messages; what followed the close was
    // not listened to. And the HTTP one.
    assert_eq!(
        refused,
        ["straycat_rate_limited_messages_total 12"],
        "{metrics}"
    );
}

#[test]
fn upgrades_per_address_are_rate_limited() {
    let server = Server::start(&["--max-connects-per-minute-per-ip", "3"]);
    let addr = server.addr();
    let attacker = Ipv4Addr::new(127, 0, 0, 2);
    // Refused upgrades count too (token guessing is one).
    assert_eq!(upgrade_from(attacker, addr, "/ws/%20", "").status, 400);
    for _ in 0..2 {
        assert_eq!(upgrade_from(attacker, addr, "/ws/a", "").status, 101);
    }
    let r = upgrade_from(attacker, addr, "/ws/a", "");
    assert_eq!(r.status, 429, "{r:?}");
    let retry: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no Retry-After: {r:?}"));
    assert!((1..=20).contains(&retry), "{r:?}");
    // Plain requests do not count, and other addresses have their own allowance.
    let health = http_get(addr, "/health");
    assert_eq!(health.status, 200);
    assert_eq!(upgrade_from(HOME, addr, "/ws/b", "").status, 101);
    assert!(
        server.wait_log(
            "refused with 429: more than 3 upgrades a minute",
            Duration::from_secs(10)
        ),
        "{:?}",
        server.logs()
    );
}

#[test]
fn open_connections_per_address_are_bounded() {
    let server = Server::start(&["--max-connections-per-ip", "2"]);
    let addr = server.addr();
    let attacker = Ipv4Addr::new(127, 0, 0, 3);
    // Two silent sockets (no request at all) use up the address's share.
    let first = tcp_from(attacker, addr);
    let _second = tcp_from(attacker, addr);
    let mut third = tcp_from(attacker, addr);
    let r = read_http_response(&mut third);
    assert_eq!(r.status, 429, "{r:?}");
    assert!(r.header("retry-after").is_some(), "{r:?}");
    // Others are served meanwhile.
    let mut c = server.connect("neighbour", "");
    c.say("hi", None);
    assert_chat(&c.recv_until_chat().1, "neighbour", "hi", None);
    // Once one of the two is gone, the address may connect again.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = upgrade_from(attacker, addr, "/ws/back", "");
        if r.status == 101 {
            break;
        }
        assert_eq!(r.status, 429, "{r:?}");
        assert!(
            Instant::now() < deadline,
            "the closed connection was never uncounted"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut buf = [0u8; 1];
    let _ = third.read(&mut buf);
}

#[test]
fn a_flood_of_unreadable_frames_counts_against_the_rate_and_is_closed() {
    let server = Server::start(&["--max-messages-per-minute", "5"]);
    let mut c = server.connect("garbler", "");
    // Each one is told what was wrong, as always, and the socket stays open...
    for _ in 0..3 {
        c.send_text("not json");
        let e = c.recv_json();
        assert_eq!(e["name"], "InvalidMessage", "{e}");
    }
    // ...and each counts: two messages are left of the minute's five.
    c.say("one", None);
    assert_chat(&c.recv_until_chat().1, "garbler", "one", None);
    c.say("two", None);
    assert_chat(&c.recv_until_chat().1, "garbler", "two", None);
    c.say("three", None);
    assert_eq!(c.recv_json()["name"], "RateLimited");
    // A client that goes on sending garbage regardless is closed with 1008.
    for _ in 0..30 {
        c.send_text("{");
    }
    let (before, close) = c.expect_close();
    assert_eq!(close.map(|(code, _)| code), Some(1008), "{before:?}");
    assert!(
        before.len() <= 12,
        "at most a minute's allowance (the floor of 10) of error frames before the close: {before:?}"
    );
}
