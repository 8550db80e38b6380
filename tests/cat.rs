//! The cat agent over real sockets: a front straycat with `--agent cat` relays to an
//! upstream that is either a second straycat with the echo agent (it speaks the Cat's
//! protocol and keeps a session per user, as the Cat does) or, for what the echo agent
//! never sends (notifications, pings, error frames, a 1.x `chat` with `content` only, a
//! close between turns), a scripted Cat in this file.

mod common;

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tungstenite::handshake::server::{Request, Response};
use tungstenite::{Message, WebSocket};

const WAIT: Duration = Duration::from_secs(10);

/// An upstream straycat: the echo agent, 50 ms before each word (so that a turn is long
/// enough to interrupt), plus `args`.
fn upstream(args: &[&str]) -> Server {
    let mut all = vec!["--echo-delay-ms", "50"];
    all.extend_from_slice(args);
    Server::start(&all)
}

/// A front straycat relaying to `up_url`, plus `args`.
fn front(up_url: &str, args: &[&str]) -> Server {
    let mut all = vec!["--agent", "cat", "--cat-url", up_url];
    all.extend_from_slice(args);
    Server::start(&all)
}

/// Lines of `server`'s log where `user` connected.
fn connects(server: &Server, user: &str) -> usize {
    let me = format!("user={user} peer=");
    server
        .logs()
        .iter()
        .filter(|l| l.contains(&me) && l.contains(" connected"))
        .count()
}

/// Reads frames up to the turn's end: the tokens, the notifications and the last frame.
fn recv_turn(c: &mut Client) -> (Vec<String>, Vec<Value>, Value) {
    let (mut tokens, mut notes) = (Vec::new(), Vec::new());
    loop {
        let v = c.recv_json();
        match v["type"].as_str() {
            Some("chat_token") => tokens.push(v["content"].as_str().unwrap().to_string()),
            Some("notification") => notes.push(v),
            Some("chat" | "error") => return (tokens, notes, v),
            _ => panic!("[{}] unexpected frame {v}", c.user),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Through a straycat upstream
// ---------------------------------------------------------------------------------------

#[test]
fn tokens_come_one_by_one_and_the_reply_carries_our_seq_and_reply_to() {
    let up = upstream(&[]);
    // The upstream session of alice already has a turn, so its seq is ahead of ours.
    let mut direct = up.connect("alice", "");
    direct.say("earlier", None);
    let (_, chat) = direct.recv_until_chat();
    assert_eq!(seq(&chat), 1);
    direct.close();

    let front = front(&up.url(""), &[]);
    let mut c = front.connect("alice", "");
    let text = "one two three four";
    c.send_json(&json!({"text": text, "id": "m1", "prompt_settings": {"x": 1}}));
    let (tokens, chat) = c.recv_until_chat();
    assert_eq!(tokens, words(text), "each token is its own frame, in order");
    assert_eq!(tokens.concat(), text);
    assert_chat(&chat, "alice", text, Some("m1"));
    assert_eq!(seq(&chat), 1, "our seq, not the upstream's 2");

    c.say("five", None);
    let (tokens, chat) = c.recv_until_chat();
    assert_eq!(tokens, ["five"]);
    assert_chat(&chat, "alice", "five", None);
    assert_eq!(seq(&chat), 2);

    // The upstream session got the message with its other fields (`id` included: its
    // reply carries it) and answered with its own seq.
    let mut direct = up.connect("alice", "?since=1");
    let held = direct.recv_json();
    assert_eq!(held["type"], "chat", "{held}");
    assert_eq!(held["text"], text, "{held}");
    assert_eq!(held["reply_to"], "m1", "{held}");
    assert_eq!(seq(&held), 2, "{held}");
}

#[test]
fn two_turns_of_a_user_share_one_upstream_socket_and_session() {
    let up = upstream(&[]);
    let front = front(&up.url(""), &[]);
    let mut c = front.connect("bob", "");
    for (k, text) in ["first turn", "second turn"].iter().enumerate() {
        c.say(text, Some(&format!("b{k}")));
        let (tokens, chat) = c.recv_until_chat();
        assert_eq!(tokens, words(text));
        assert_chat(&chat, "bob", text, Some(&format!("b{k}")));
    }
    assert!(front.has_log("user=bob cat: reusing its upstream socket"));
    assert_eq!(connects(&up, "bob"), 1, "one upstream socket for two turns");
    // The Cat keeps the history: both turns are in the one upstream session.
    let mut direct = up.connect("bob", "?since=0");
    let texts: Vec<Value> = (0..2).map(|_| direct.recv_json()["text"].clone()).collect();
    assert_eq!(texts, [json!("first turn"), json!("second turn")]);
}

#[test]
fn two_users_at_once_get_their_own_answers() {
    let up = upstream(&[]);
    let front = front(&up.url(""), &[]);
    let barrier = Barrier::new(2);
    std::thread::scope(|s| {
        for user in ["carol", "dan"] {
            let (front, barrier) = (&front, &barrier);
            s.spawn(move || {
                let mut c = front.connect(user, "");
                let text = format!("{user} says a b c d e");
                barrier.wait();
                c.say(&text, Some(user));
                let (tokens, chat) = c.recv_until_chat();
                assert_eq!(tokens, words(&text), "{user} got only its own tokens");
                assert_chat(&chat, user, &text, Some(user));
            });
        }
    });
    // Both turns ran at once: each user has its own upstream socket.
    assert_eq!(connects(&up, "carol"), 1);
    assert_eq!(connects(&up, "dan"), 1);
}

#[test]
fn a_dead_upstream_fails_the_turn_and_the_next_turn_reconnects() {
    let mut up = upstream(&[]);
    let port = up.addr().port();
    let front = front(&up.url(""), &[]);
    let mut c = front.connect("erin", "");
    c.say("w1 w2 w3 w4 w5 w6 w7 w8 w9 w10", Some("e1"));
    let first = c.recv_json();
    assert_eq!(first["type"], "chat_token", "{first}");
    up.signal("KILL");
    up.wait_exit(WAIT).expect("the upstream exits on SIGKILL");
    let (_, _, end) = recv_turn(&mut c);
    assert_error(&end, "AgentError");
    assert_eq!(end["reply_to"], "e1");
    let why = end["description"].as_str().unwrap();
    assert!(why.contains("the Cat") && why.contains("mid-turn"), "{why}");

    // A new upstream on the same port: the next turn connects to it.
    let listen = format!("127.0.0.1:{port}");
    let up = upstream(&["--listen", &listen]);
    assert_eq!(up.addr().port(), port);
    c.say("back again", Some("e2"));
    let (tokens, chat) = c.recv_until_chat();
    assert_eq!(tokens, words("back again"));
    assert_chat(&chat, "erin", "back again", Some("e2"));
    assert_eq!(connects(&up, "erin"), 1);

    // Killed while the socket is parked: the next turn finds it dead before sending and
    // connects again, unseen by the user.
    let mut up = up;
    up.signal("KILL");
    up.wait_exit(WAIT).expect("the upstream exits on SIGKILL");
    let up = upstream(&["--listen", &listen]);
    c.say("and again", Some("e3"));
    let (tokens, chat) = c.recv_until_chat();
    assert_eq!(tokens, words("and again"));
    assert_chat(&chat, "erin", "and again", Some("e3"));
    assert_eq!(connects(&up, "erin"), 1);
    assert!(front.has_log("user=erin cat: the parked upstream socket is gone"));
}

#[test]
fn a_parked_socket_the_upstream_closed_is_replaced_unseen() {
    let up = upstream(&[]);
    let front = front(&up.url(""), &[]);
    let mut c = front.connect("fay", "");
    c.say("hello", None);
    let _ = c.recv_until_chat();
    // Another connection of fay takes the upstream session over: the front's parked
    // socket is closed with 1000 `replaced`. A turn on the direct socket makes sure the
    // close went out before the front's next turn.
    let mut direct = up.connect("fay", "");
    assert!(
        up.wait_log_all(&["user=fay", "replaced by a new connection"], WAIT)
            .is_some()
    );
    direct.say("in between", None);
    let _ = direct.recv_until_chat();
    direct.close();

    c.say("still here", Some("f2"));
    let (tokens, chat) = c.recv_until_chat();
    assert_eq!(tokens, words("still here"), "no error, no missing token");
    assert_chat(&chat, "fay", "still here", Some("f2"));
    assert!(front.has_log("user=fay cat: the parked upstream socket is gone"));
    assert_eq!(connects(&up, "fay"), 3, "front, direct, front again");
}

#[test]
fn the_cat_token_is_sent_and_a_refusal_names_the_403() {
    let key = "K&y=1+2 %";
    let up = upstream(&["--api-key", key]);
    let without = front(&up.url(""), &[]);
    let mut c = without.connect("gus", "");
    c.say("let me in", Some("g1"));
    let err = c.recv_json();
    assert_error(&err, "AgentError");
    let why = err["description"].as_str().unwrap();
    assert!(why.contains("403"), "{why}");
    assert!(up.wait_log_all(&["refused with 403"], WAIT).is_some());

    let with = front(&up.url(""), &["--cat-token", key]);
    let mut c = with.connect("gus", "");
    c.say("let me in", Some("g2"));
    let (_, chat) = c.recv_until_chat();
    assert_chat(&chat, "gus", "let me in", Some("g2"));
}

#[test]
fn a_user_leaving_mid_answer_gets_the_held_reply_and_the_upstream_never_notices() {
    let up = upstream(&[]);
    let front = front(&up.url(""), &[]);
    let text = "a b c d e f g h i j";
    let mut c = front.connect("hal", "");
    c.say(text, Some("h1"));
    assert_eq!(c.recv_json()["type"], "chat_token");
    c.drop_tcp();
    assert!(
        front
            .wait_log_all(&["user=hal", "left while a turn was running"], WAIT)
            .is_some()
    );
    assert!(
        front
            .wait_log_all(&["user=hal reply ready while away"], WAIT)
            .is_some()
    );

    let mut c = front.connect("hal", "");
    let held = c.recv_json();
    assert_chat(&held, "hal", text, Some("h1"));
    // The user's next turn goes up the same socket.
    c.say("next", Some("h2"));
    let (_, chat) = c.recv_until_chat();
    assert_chat(&chat, "hal", "next", Some("h2"));

    assert_eq!(connects(&up, "hal"), 1, "the upstream socket stayed");
    for line in up.logs().iter().filter(|l| l.contains("user=hal")) {
        assert!(
            !["left", "disconnected", "away", "replaced", "failed"]
                .iter()
                .any(|w| line.contains(w)),
            "the upstream was disturbed: {line}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Through a scripted Cat
// ---------------------------------------------------------------------------------------

/// What the scripted Cat saw.
#[derive(Debug)]
enum Seen {
    /// A connection on this path (query included).
    Connected(String),
    /// A message.
    Message(Value),
    /// The script ran its course for a message (the frames are with the kernel).
    Answered,
    /// The connection ended (a close frame, EOF or a reset).
    Gone,
}

/// A Cheshire Cat stand-in: accepts WebSocket connections and answers each message with
/// `script`, reporting what it saw.
struct FakeCat {
    addr: SocketAddr,
    seen: Receiver<Seen>,
}

type Script = dyn Fn(&Value, &mut WebSocket<TcpStream>) + Send + Sync;

impl FakeCat {
    fn start(script: impl Fn(&Value, &mut WebSocket<TcpStream>) + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, seen) = mpsc::channel();
        let script: Arc<Script> = Arc::new(script);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { break };
                let (tx, script) = (tx.clone(), Arc::clone(&script));
                std::thread::spawn(move || serve(stream, tx, script));
            }
        });
        FakeCat { addr, seen }
    }

    fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    fn next(&self) -> Seen {
        self.seen
            .recv_timeout(WAIT)
            .expect("the scripted Cat saw nothing in time")
    }
}

fn serve(stream: TcpStream, tx: Sender<Seen>, script: Arc<Script>) {
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let path_tx = tx.clone();
    // The error type is tungstenite's, an HTTP response: never built here.
    #[allow(clippy::result_large_err)]
    let callback = move |req: &Request, resp: Response| {
        let _ = path_tx.send(Seen::Connected(req.uri().to_string()));
        Ok(resp)
    };
    let Ok(mut ws) = tungstenite::accept_hdr(stream, callback) else {
        return;
    };
    loop {
        match ws.read() {
            Ok(Message::Text(t)) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                let _ = tx.send(Seen::Message(v.clone()));
                script(&v, &mut ws);
                let _ = tx.send(Seen::Answered);
            }
            Ok(Message::Close(_)) => {
                let _ = ws.flush();
                let _ = tx.send(Seen::Gone);
                return;
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => {
                let _ = tx.send(Seen::Gone);
                return;
            }
        }
    }
}

fn send(ws: &mut WebSocket<TcpStream>, v: Value) {
    ws.send(Message::text(v.to_string())).unwrap();
}

/// Reads the next frame, which must be the front's pong, within the read timeout.
fn await_pong(ws: &mut WebSocket<TcpStream>) {
    match ws.read() {
        Ok(Message::Pong(p)) => assert_eq!(p.as_ref(), b"are you there"),
        Ok(other) => panic!("expected a pong, got {other:?}"),
        Err(e) => panic!("no pong: {e}"),
    }
}

/// The Cat 1.x way: a notification, tokens, a `chat` with `content` and no `text`; a ping
/// in the middle, answered before the Cat goes on; `fail` gets an error frame; `big` a
/// token past the front's frame bound; `hang` nothing at all; `close` a chat, then a close
/// frame.
fn cat_script(msg: &Value, ws: &mut WebSocket<TcpStream>) {
    let text = msg["text"].as_str().unwrap_or_default();
    match text {
        "fail" => send(
            ws,
            json!({"type": "error", "name": "ValueError", "description": "the LLM is down"}),
        ),
        "hang" => {}
        "big" => send(
            ws,
            json!({"type": "chat_token", "content": "x".repeat(2000)}),
        ),
        _ => {
            send(
                ws,
                json!({"type": "notification", "content": "Looking that up…"}),
            );
            send(ws, json!({"type": "chat_token", "content": "Hel"}));
            ws.send(Message::Ping(b"are you there".to_vec().into()))
                .unwrap();
            await_pong(ws);
            send(ws, json!({"type": "chat_token", "content": "lo"}));
            send(
                ws,
                json!({"type": "chat", "user_id": "x", "who": "AI", "content": "Hello",
                       "why": {"input": text}}),
            );
            if text == "close" {
                ws.close(None).unwrap();
                let _ = ws.flush();
            }
        }
    }
}

#[test]
fn a_cat_1x_upstream_notifications_pings_and_a_content_only_chat() {
    let cat = FakeCat::start(cat_script);
    let front = front(&cat.url(), &["--cat-token", "t0k"]);
    let mut c = front.connect("al@ice", "");
    c.send_json(&json!({"text": "hi", "id": "a1", "prompt_settings": {"temp": 0}}));
    let (tokens, notes, chat) = recv_turn(&mut c);

    assert!(
        matches!(cat.next(), Seen::Connected(p) if p == "/ws/al%40ice?token=t0k"),
        "user id and token are percent-encoded in the path"
    );
    let Seen::Message(sent) = cat.next() else {
        panic!("expected the message")
    };
    assert_eq!(
        sent,
        json!({"text": "hi", "id": "a1", "prompt_settings": {"temp": 0}}),
        "the text and every other field of the client, no history"
    );
    assert!(
        matches!(cat.next(), Seen::Answered),
        "the ping was answered"
    );

    assert_eq!(notes.len(), 1, "{notes:?}");
    assert_eq!(notes[0]["content"], "Looking that up…");
    assert_eq!(notes[0]["reply_to"], "a1");
    assert_eq!(tokens, ["Hel", "lo"]);
    assert_eq!(chat["type"], "chat", "{chat}");
    assert_eq!(
        chat["text"], "Hello",
        "1.x `content` becomes our text: {chat}"
    );
    assert_eq!(chat["content"], "Hello");
    assert_eq!(chat["user_id"], "al@ice", "ours, not the Cat's: {chat}");
    assert_eq!(chat["reply_to"], "a1");
    assert_eq!(seq(&chat), seq(&notes[0]) + 1);
}

#[test]
fn an_error_frame_of_the_cat_is_an_agent_error_and_the_socket_stays() {
    let cat = FakeCat::start(cat_script);
    let front = front(&cat.url(), &[]);
    let mut c = front.connect("ivy", "");
    c.say("fail", Some("i1"));
    let (_, _, end) = recv_turn(&mut c);
    assert_error(&end, "AgentError");
    assert_eq!(end["description"], "the Cat: the LLM is down");
    assert_eq!(end["reply_to"], "i1");
    c.say("hi", None);
    let (_, _, chat) = recv_turn(&mut c);
    assert_eq!(chat["text"], "Hello", "{chat}");
    let connected = cat
        .seen
        .try_iter()
        .filter(|s| matches!(s, Seen::Connected(_)))
        .count();
    assert_eq!(connected, 1, "an error frame ends the turn, not the socket");
}

#[test]
fn a_frame_past_the_bound_fails_the_turn_and_the_next_one_reconnects() {
    let cat = FakeCat::start(cat_script);
    let front = front(&cat.url(), &["--max-message-bytes", "1024"]);
    let mut c = front.connect("jo", "");
    c.say("big", None);
    let (tokens, _, end) = recv_turn(&mut c);
    assert!(tokens.is_empty());
    assert_error(&end, "AgentError");
    let why = end["description"].as_str().unwrap();
    assert!(why.contains("larger than 1024 bytes"), "{why}");
    c.say("hi", None);
    let (_, _, chat) = recv_turn(&mut c);
    assert_eq!(chat["text"], "Hello", "{chat}");
    let connected = cat
        .seen
        .try_iter()
        .filter(|s| matches!(s, Seen::Connected(_)))
        .count();
    assert_eq!(connected, 2, "the oversized socket was dropped");
}

#[test]
fn a_cat_that_closes_between_turns_is_reconnected_unseen() {
    let cat = FakeCat::start(cat_script);
    let front = front(&cat.url(), &[]);
    let mut c = front.connect("kim", "");
    c.say("close", None);
    let (_, _, chat) = recv_turn(&mut c);
    assert_eq!(chat["text"], "Hello");
    // The close frame is with the kernel once the script is done.
    let seen: Vec<Seen> = (0..3).map(|_| cat.next()).collect();
    assert!(matches!(seen[2], Seen::Answered), "{seen:?}");

    c.say("again", Some("k2"));
    let (tokens, notes, chat) = recv_turn(&mut c);
    assert_eq!(chat["type"], "chat", "no error: {chat}");
    assert_eq!((tokens.len(), notes.len()), (2, 1));
    // The first socket answered the close (after the front read it) and a second one
    // carried the message; the two threads of the scripted Cat report in either order.
    let seen: Vec<Seen> = (0..4).map(|_| cat.next()).collect();
    let count = |f: fn(&Seen) -> bool| seen.iter().filter(|s| f(s)).count();
    assert_eq!(count(|s| matches!(s, Seen::Gone)), 1, "{seen:?}");
    assert_eq!(count(|s| matches!(s, Seen::Connected(_))), 1, "{seen:?}");
    assert_eq!(
        count(|s| matches!(s, Seen::Message(m) if m["text"] == "again")),
        1
    );
    assert!(front.has_log("user=kim cat: the parked upstream socket is gone"));
}

#[test]
fn a_turn_that_times_out_closes_its_upstream_socket() {
    let cat = FakeCat::start(cat_script);
    let front = front(&cat.url(), &["--turn-timeout-secs", "1"]);
    let mut c = front.connect("lee", "");
    c.say("hang", Some("l1"));
    let (_, _, end) = recv_turn(&mut c);
    assert_error(&end, "Timeout");
    let seen: Vec<Seen> = (0..4).map(|_| cat.next()).collect();
    assert!(
        matches!(
            seen[..],
            [
                Seen::Connected(_),
                Seen::Message(_),
                Seen::Answered,
                Seen::Gone
            ]
        ),
        "the aborted turn's socket is closed, not parked: {seen:?}"
    );
    c.say("hi", None);
    let (_, _, chat) = recv_turn(&mut c);
    assert_eq!(chat["text"], "Hello", "{chat}");
    assert!(matches!(cat.next(), Seen::Connected(_)), "a new connection");
}
