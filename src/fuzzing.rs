//! The entry points of the fuzz targets in `fuzz/` (cargo feature `fuzzing`, off by
//! default; not an API): one function per parser, taking arbitrary bytes. Each feeds the
//! parser the way straycat does, in arbitrary pieces where the parser is fed from a socket,
//! and panics when an invariant that is cheap to check fails (a result that depends on how
//! the bytes were split, a bound exceeded, a decoded record that does not encode back).
//! A panic is what the fuzzer reports as a crash.
//!
//! The first byte or two of an input often choose a limit or the way the rest is split, so
//! one corpus explores both the format and the feeding.

use crate::agent::{Progress, Relay, ResponseReader, SseDecoder, relay, shorten};
use crate::conn::{HeadRead, MockStream, Ws, WsRead, WsWrite, read_head};
use crate::http::{self, Head, MAX_HEAD_BYTES, MAX_SINCE, Route};
use crate::protocol::{self, Held, MAX_ID_CHARS, UserId};
use crate::session::{Effect, Limits, Now, Sessions, TableLimits};
use crate::store::{Change, Decoded, decode, encode, replay};
use std::time::{Duration, Instant};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, Utf8Bytes};

/// Splits `data` into pieces whose sizes a small generator seeded with `seed` draws: mostly
/// short ones (1 to 8 bytes, so line ends and UTF-8 characters are cut), now and then long.
fn pieces(seed: u8, data: &[u8]) -> Vec<&[u8]> {
    let mut state = u32::from(seed) | 0x1_0000;
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let n = match state % 4 {
            0 => 1,
            1 | 2 => 1 + (state >> 8) as usize % 8,
            _ => 1 + (state >> 8) as usize % 512,
        };
        let (piece, tail) = rest.split_at(n.min(rest.len()));
        out.push(piece);
        rest = tail;
    }
    out
}

/// A well-formed HTTP/1.1 response head and body, as `httparse` reads them back.
fn check_response(bytes: &[u8]) {
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut resp = httparse::Response::new(&mut headers);
    let Ok(httparse::Status::Complete(len)) = resp.parse(bytes) else {
        panic!(
            "not a complete response: {:?}",
            String::from_utf8_lossy(bytes)
        );
    };
    let length = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map(|h| {
            std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.parse().ok())
        });
    if let Some(length) = length {
        assert_eq!(
            length,
            Some(bytes.len() - len),
            "Content-Length is the body's"
        );
    }
}

/// The request head parser and the router (`http.rs`), on one buffer.
pub fn http_head(data: &[u8]) {
    let Head::Complete(req, len) = http::parse_head(data) else {
        return;
    };
    assert!(len <= data.len());
    // The head alone parses the same: nothing after it was looked at.
    let Head::Complete(alone, alone_len) = http::parse_head(&data[..len]) else {
        panic!("the head alone does not parse");
    };
    assert_eq!((&alone, alone_len), (&req, len));
    let secret = crate::auth::Secret::new("fuzz-secret");
    let origins = ["https://kiosk.example".to_string()];
    let open = http::Access {
        api_key: None,
        jwt: None,
        origins: &[],
        now_unix: 1_800_000_000,
    };
    let guarded = http::Access {
        api_key: Some("s3cret"),
        jwt: Some(&secret),
        origins: &origins,
        ..open
    };
    for (access, echo) in [(open, false), (guarded, true)] {
        match http::route(&req, &access, echo) {
            Route::Chat(target) => {
                assert!(UserId::parse(target.user.as_str()).is_some());
                assert!(target.since.is_none_or(|s| s <= MAX_SINCE));
                check_response(&http::upgrade_response(req.ws_key.as_deref().unwrap_or("")));
            }
            Route::Refuse(status, why) => {
                assert!((400..600).contains(&status), "{status}");
                check_response(&http::refusal(status, &why));
            }
            Route::Api(_, user) => assert!(UserId::parse(user.as_str()).is_some()),
            _ => {}
        }
    }
    if let Some(decoded) = http::percent_decode(&req.query) {
        assert!(decoded.len() <= req.query.len());
    }
}

/// The HTTP phase's read loop (`conn/handshake.rs`) over a socket that hands the bytes over
/// in pieces. Byte 0 chooses the pieces, byte 1 the body bound (`--max-message-bytes`).
pub fn handshake(data: &[u8]) {
    let [seed, body, input @ ..] = data else {
        return;
    };
    let max_body = usize::from(*body) * 8;
    let mut stream = MockStream::default();
    let mut buf = Vec::new();
    let mut outcome = None;
    for piece in pieces(*seed, input) {
        stream.input.extend(piece);
        match read_head(&mut stream, &mut buf, max_body) {
            HeadRead::Partial => {
                assert!(
                    buf.len() <= MAX_HEAD_BYTES + 1 + max_body,
                    "the head buffer is bounded"
                );
            }
            other => {
                outcome = Some(other);
                break;
            }
        }
    }
    let outcome = outcome.unwrap_or_else(|| {
        stream.eof = true;
        read_head(&mut stream, &mut buf, max_body)
    });
    let whole = http::parse_head(input);
    match outcome {
        HeadRead::Complete(req, rest) => {
            let Head::Complete(expected, len) = whole else {
                panic!("read_head completed a head parse_head does not: {whole:?}");
            };
            assert_eq!(req, expected);
            let body = req.content_length.unwrap_or(0);
            assert!(body <= max_body);
            assert!(rest.len() >= body, "the body is read whole");
            assert_eq!(
                rest[..],
                input[len..len + rest.len()],
                "what follows is kept"
            );
        }
        HeadRead::Partial => panic!("all input fed and the end seen, still partial"),
        HeadRead::Gone | HeadRead::TooLarge | HeadRead::Invalid(_) => {
            if let Head::Complete(req, len) = whole {
                let body = req.content_length.unwrap_or(0);
                assert!(
                    len > MAX_HEAD_BYTES || body > max_body || input.len() < len + body,
                    "a head parse_head completes within the bounds was refused"
                );
            }
        }
    }
}

/// The WebSocket read path (`conn/ws.rs`): tungstenite configured as the server does, over a
/// socket that takes writes up to a room the input sets, fed frames in pieces with writes,
/// flushes and closes in between. Byte 0 is the length of what came behind the request head.
pub fn ws(data: &[u8]) {
    const MAX_MESSAGE: usize = 1024;
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let (behind_head, mut ops) = rest.split_at(usize::from(first % 32).min(rest.len()));
    // As `Server::new` configures it, with a small --max-message-bytes.
    let config = WebSocketConfig::default()
        .read_buffer_size(crate::conn::READ_BUFFER_BYTES)
        .write_buffer_size(usize::MAX - 1)
        .max_write_buffer_size(usize::MAX)
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE));
    let stream = MockStream {
        room: 64,
        ..MockStream::default()
    };
    let totals = crate::conn::UnsentTotals::default();
    let mut ws = Ws::new(stream, behind_head.to_vec(), config, 4096, false, &totals);
    let mut seq = 0u64;
    let mut handed = 0u64;
    let mut done = false;
    while let Some((&op, tail)) = ops.split_first() {
        ops = tail;
        let arg = usize::from(op >> 3);
        match op & 7 {
            0..=3 => {
                let (piece, tail) = ops.split_at((arg + 1).min(ops.len()));
                ops = tail;
                ws.stream_mut().input.extend(piece);
                ws.readable_again(false);
                read_all(&mut ws, MAX_MESSAGE, &mut done);
            }
            4 if !done => {
                seq += 1;
                let text = Utf8Bytes::from("é".repeat(arg * 7));
                match ws.write_text(text, Some(seq)) {
                    WsWrite::Ok | WsWrite::Pending | WsWrite::Full => {}
                    WsWrite::Closed | WsWrite::Lost(_) => done = true,
                }
            }
            5 => {
                ws.stream_mut().room += arg * 16;
                let _ = ws.flush(done);
            }
            6 if !done => {
                let _ = ws.close(CloseCode::Normal, "bye");
                let _ = ws.flush(true);
            }
            7 => {
                ws.stream_mut().eof = arg % 2 == 1;
                ws.readable_again(arg % 2 == 1);
                if !done {
                    let _ = ws.write(Message::Ping(tungstenite::Bytes::new()));
                }
                read_all(&mut ws, MAX_MESSAGE, &mut done);
            }
            _ => {}
        }
        if let Some(h) = ws.take_handed() {
            assert!(
                h > handed && h <= seq,
                "handed seqs grow: {handed} then {h} of {seq}"
            );
            handed = h;
        }
    }
}

/// Reads messages until there is none to read now.
fn read_all(ws: &mut Ws<MockStream>, max_message: usize, done: &mut bool) {
    // Each message takes at least two bytes of the bounded input: this ends.
    for _ in 0..100_000 {
        match ws.read() {
            WsRead::Message(msg) => assert!(msg.len() <= max_message, "{}", msg.len()),
            WsRead::Idle => return,
            WsRead::Closed | WsRead::Lost(_) => {
                *done = true;
                return;
            }
            WsRead::Fail(code, _) => {
                let _ = ws.close(code, "fail");
                let _ = ws.flush(true);
            }
        }
    }
    panic!("reading never became idle");
}

/// The client message parser (`protocol.rs`), and the frames that carry its text back.
pub fn client_message(data: &[u8]) {
    let frame = String::from_utf8_lossy(data);
    let Ok(msg) = protocol::parse_client_message(&frame) else {
        return;
    };
    assert!(
        msg.id
            .as_ref()
            .is_none_or(|id| id.chars().count() <= MAX_ID_CHARS)
    );
    assert!(!msg.fields.contains_key("text"));
    let user = UserId::default_user();
    let held = Held::Chat {
        text: msg.text.clone(),
        input: msg.text.clone(),
    };
    let encoded = protocol::encode_held(&held, &user, 7, msg.id.as_deref(), 1.5);
    let v: serde_json::Value = serde_json::from_str(&encoded).expect("a chat frame is JSON");
    assert_eq!(v["text"].as_str(), Some(msg.text.as_str()));
    assert_eq!(v["why"]["input"].as_str(), Some(msg.text.as_str()));
    assert_eq!(v["reply_to"].as_str(), msg.id.as_deref());
    let token: serde_json::Value =
        serde_json::from_str(&protocol::encode_token(&msg.text)).expect("a token is JSON");
    assert_eq!(token["content"].as_str(), Some(msg.text.as_str()));
}

/// Feeds `pieces` to a fresh SSE decoder; the events and the first error.
fn sse_run(max: usize, pieces: &[&[u8]]) -> (Vec<crate::agent::SseEvent>, Option<String>) {
    let mut d = SseDecoder::new(max);
    let mut events = Vec::new();
    for p in pieces {
        if let Err(e) = d.feed(p, &mut events) {
            return (events, Some(e.to_string()));
        }
    }
    (events, None)
}

/// The SSE decoder (`agent/sse.rs`): the same events however the stream is split, and
/// every event within the bound. Byte 0 chooses the pieces, byte 1 the bound.
pub fn sse(data: &[u8]) {
    let [seed, max, input @ ..] = data else {
        return;
    };
    let max = 1 + usize::from(*max);
    let whole = sse_run(max, &[input]);
    assert_eq!(sse_run(max, &pieces(*seed, input)), whole);
    for e in &whole.0 {
        assert!(e.data.len() <= max, "data {} over {max}", e.data.len());
        assert!(e.event.as_ref().is_none_or(|n| n.len() <= max));
    }
}

/// What one response reader made of `pieces` (and of the end of the stream).
#[derive(Debug, PartialEq)]
struct Response {
    body: Vec<u8>,
    progress: Result<Progress, String>,
    head: Option<crate::agent::HttpHead>,
    eof: Result<(), String>,
}

fn http1_run(max_head: usize, max_body: usize, pieces: &[&[u8]]) -> Response {
    let mut r = ResponseReader::new(max_head, max_body);
    let mut body = Vec::new();
    let mut progress = Ok(Progress::HeadPending);
    for p in pieces {
        progress = r.feed(p, &mut body).map_err(|e| e.to_string());
        if progress.is_err() {
            break;
        }
        assert!(body.len() <= max_body, "the body is bounded");
    }
    let eof = r.eof().map_err(|e| e.to_string());
    Response {
        body,
        progress,
        head: r.head().cloned(),
        eof,
    }
}

/// The HTTP/1 response decoder (`agent/http1.rs`) for upstream answers: the same head, body
/// and errors however the response is split, and the body within its bound. Byte 0
/// chooses the pieces, byte 1 the bounds.
pub fn http1(data: &[u8]) {
    let [seed, bounds, input @ ..] = data else {
        return;
    };
    let max_head = 64 + usize::from(bounds & 0x0f) * 64;
    let max_body = usize::from(bounds >> 4) * 256;
    let whole = http1_run(max_head, max_body, &[input]);
    let split = http1_run(max_head, max_body, &pieces(*seed, input));
    if whole.head.is_none() && split.head.is_none() {
        // A head is parsed again only once a piece brings a line end (so that a head fed
        // byte by byte costs O(n), not O(n²)): bad bytes after the last line end are found
        // by one feed and not by another, which then ends "inside its head". No head either
        // way, and an error at the end either way.
        assert!(whole.body.is_empty() && split.body.is_empty());
        assert!(whole.eof.is_err() && split.eof.is_err());
    } else if whole.progress.is_err() && split.progress == whole.progress {
        // Failed the same way: how much of the body went out before the error depends on
        // where the pieces end, but both are the start of the same body.
        assert_eq!((&split.head, &split.eof), (&whole.head, &whole.eof));
        let n = split.body.len().min(whole.body.len());
        assert_eq!(split.body[..n], whole.body[..n]);
    } else {
        assert_eq!(split, whole);
    }
    assert!(whole.body.len() <= max_body);
}

/// The journal's record decoder (`store/record.rs`): a record decodes to a change that
/// encodes back to the same bytes (for a client message, to a record that decodes to the
/// same message: its JSON fields are written compactly, in key order).
pub fn record(data: &[u8]) {
    let Decoded::Record { user, change, len } = decode(data) else {
        return;
    };
    assert!(len <= data.len());
    let mut again = Vec::new();
    let written = encode(user.as_ref(), &change, &mut again);
    assert_eq!(written, Some(again.len()));
    match &change {
        Change::Accepted(_) => {
            let Decoded::Record {
                user: user2,
                change: change2,
                ..
            } = decode(&again)
            else {
                panic!("a re-encoded client message does not decode");
            };
            assert_eq!(user2, user);
            let (Change::Accepted(a), Change::Accepted(b)) = (&change, &change2) else {
                panic!("decoded as another change: {change2:?}");
            };
            assert_eq!((&a.text, &a.id), (&b.text, &b.id));
            assert!(a.fields.keys().eq(b.fields.keys()));
        }
        _ => assert_eq!(again[..], data[..len], "{change:?} encodes to other bytes"),
    }
}

/// Small bounds, so that a short journal reaches every one of them.
fn small_limits() -> TableLimits {
    TableLimits {
        session: Limits {
            history_turns: 2,
            max_held_frames: 3,
            max_held_bytes: 64,
            max_queued_turns: 2,
            turn_timeout: Duration::from_secs(60),
            max_messages_per_minute: 3,
        },
        ttl: Duration::from_secs(600),
        max_sessions: 3,
        max_held_bytes_total: 128,
        max_history_bytes_total: 96,
    }
}

/// Every session of `sessions` written whole as records, in user order, idle times left
/// out (they go through a float and back and may move by a nanosecond).
fn snapshot_bytes(sessions: &Sessions, now: Now) -> Vec<u8> {
    let mut users = sessions.users();
    users.sort();
    let mut changes = Vec::new();
    for user in &users {
        sessions.snapshot(user, now, &mut changes);
    }
    let mut out = Vec::new();
    for (user, mut change) in changes {
        if let Change::Reset { idle_unix, .. } = &mut change {
            *idle_unix = idle_unix.map(|_| 0.0);
        }
        encode(Some(&user), &change, &mut out);
    }
    out
}

/// The start-up replay (`store/mod.rs` and the session table's restore): a journal of
/// arbitrary records rebuilds a table within every bound of the configuration, and that
/// table written whole and replayed again is the same table.
pub fn journal(data: &[u8]) {
    let now = Now {
        mono: Instant::now(),
        unix: 1_750_000_000.0,
    };
    let limits = small_limits();
    let mut sessions = Sessions::new(limits);
    let replayed = replay(data, |user, change| sessions.restore(user, change, now));
    assert!(replayed.dropped <= data.len());
    let mut effects = Vec::new();
    sessions.restored(0, now, &mut effects);
    assert!(sessions.len() <= limits.max_sessions);
    let occupancy = sessions.occupancy();
    assert!(occupancy.history_bytes <= limits.max_history_bytes_total);
    assert!(
        occupancy.held_bytes <= limits.max_held_bytes_total
            || occupancy.held_frames <= sessions.len(),
        "{occupancy:?}"
    );
    assert!(occupancy.held_frames <= sessions.len() * limits.session.max_held_frames);
    let starts = effects
        .iter()
        .filter(|e| matches!(e, Effect::Start(_)))
        .count();
    assert!(starts <= sessions.len());
    let first = snapshot_bytes(&sessions, now);
    let mut again = Sessions::new(limits);
    replay(&first, |user, change| again.restore(user, change, now));
    again.restored(0, now, &mut Vec::new());
    assert!(
        snapshot_bytes(&again, now) == first,
        "a snapshot replays to itself"
    );
}

/// The Cheshire Cat upstream's frame reader (`agent/cat.rs`), and the shortening of its text
/// for error messages.
pub fn cat_frame(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    for id in [None, Some("c-1")] {
        if let Relay::Token(t) = relay(&text, id) {
            assert!(!t.is_empty());
        }
    }
    let short = shorten(&text);
    assert!(short.chars().count() <= 201);
    assert!(text.starts_with(short.trim_end_matches('…')));
}

/// The process agent's stdout and stderr readers (`agent/process.rs`): the same reply
/// however stdout is split, the tokens joining to it, and the stderr line bounded. Byte 0
/// chooses the pieces, byte 1 the bound.
pub fn process_output(data: &[u8]) {
    let [seed, max, input @ ..] = data else {
        return;
    };
    let max = usize::from(*max) * 4;
    let run = |pieces: &[&[u8]]| {
        let mut out = crate::agent::Output::new(max);
        let mut tokens = String::new();
        for p in pieces {
            match out.feed(p) {
                Ok(Some(t)) => {
                    assert!(!t.is_empty());
                    tokens.push_str(&t);
                }
                Ok(None) => {}
                Err(_) => return None,
            }
        }
        let reply = out.finish().ok()?;
        assert_eq!(tokens, reply, "the tokens join to the reply");
        Some(reply)
    };
    let whole = run(&[input]);
    assert_eq!(run(&pieces(*seed, input)), whole);
    if let Some(reply) = &whole {
        assert!(reply.len() <= max);
        let text = std::str::from_utf8(input).expect("a reply is UTF-8");
        assert_eq!(reply, text.strip_suffix('\n').unwrap_or(text));
    }
    let mut tail = crate::agent::Tail::default();
    for p in pieces(seed.wrapping_add(1), input) {
        tail.push(p);
    }
    if let Some(line) = tail.last_line() {
        assert!(line.chars().count() <= 301 && !line.contains('\n'));
    }
}

/// The token verifier (`auth.rs`). Byte 0 even: the rest is a token as a client sends it
/// (whose signature will not match: this explores the parts, the base64 and the header).
/// Odd: the rest, split at its first `.`, is a header and claims of our own that are
/// signed with the secret, so the claims parser past the signature is reached too. No
/// input panics, and an accepted token names a valid user and is not expired.
pub fn jwt(data: &[u8]) {
    use base64::Engine;
    let [mode, rest @ ..] = data else { return };
    let secret = crate::auth::Secret::new("fuzz-secret");
    let now = 1_800_000_000;
    let token = if mode % 2 == 0 {
        String::from_utf8_lossy(rest).into_owned()
    } else {
        let cut = rest.iter().position(|&b| b == b'.').unwrap_or(rest.len());
        let (header, claims) = rest.split_at(cut);
        crate::auth::sign_parts(header, claims.get(1..).unwrap_or_default(), &secret)
    };
    if let Ok(user) = crate::auth::verify(&token, &secret, now) {
        assert!(UserId::parse(user.as_str()).is_some());
        let claims: serde_json::Value = token
            .split('.')
            .nth(1)
            .and_then(|c| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(c)
                    .ok()
            })
            .and_then(|c| serde_json::from_slice(&c).ok())
            .unwrap_or_default();
        let exp = claims["exp"].as_f64().unwrap_or(-1.0);
        assert!(
            exp + crate::auth::LEEWAY_SECS as f64 >= now as f64 - 1.0,
            "{token}"
        );
    }
    // What `straycat token` signs is accepted back.
    if let Some(user) = std::str::from_utf8(rest).ok().and_then(UserId::parse) {
        let t = crate::auth::sign(&user, &secret, now, 60);
        assert_eq!(crate::auth::verify(&t, &secret, now).ok(), Some(user));
    }
}

/// Records of every kind, as the encoder writes them, in an order a journal could have
/// them: the seeds of the `record` and `journal` targets (`examples/fuzz_seeds.rs`).
pub fn sample_records() -> Vec<Vec<u8>> {
    let alice = UserId::parse("alice").expect("a valid id");
    let bob = UserId::parse("bob.k@x-1").expect("a valid id");
    let msg = |text: &str, id: Option<&str>| {
        let json = match id {
            Some(id) => format!(r#"{{"text":"{text}","id":"{id}","plugin":{{"n":1.5}}}}"#),
            None => format!(r#"{{"text":"{text}"}}"#),
        };
        protocol::parse_client_message(&json).expect("a valid message")
    };
    let frame = |seq: u64, text: &str| Change::Frame {
        seq,
        text: Utf8Bytes::from(protocol::encode_held(
            &Held::Chat {
                text: text.into(),
                input: "hi".into(),
            },
            &alice,
            seq,
            Some("c-1"),
            1_750_000_000.25,
        )),
    };
    let changes = [
        (
            Some(&alice),
            Change::Reset {
                next_seq: 1,
                handed: 0,
                idle_unix: None,
            },
        ),
        (Some(&alice), Change::Attached),
        (Some(&alice), Change::Accepted(msg("hi", Some("c-1")))),
        (
            Some(&alice),
            Change::Line {
                who: crate::agent::Who::Human,
                text: "hi".into(),
                unix: 1_750_000_000.0,
            },
        ),
        (Some(&alice), frame(1, "hello, h\u{e9}llo \u{1f408}")),
        (
            Some(&alice),
            Change::Line {
                who: crate::agent::Who::Ai,
                text: "hello".into(),
                unix: 1_750_000_001.5,
            },
        ),
        (Some(&alice), Change::Finished { seq: 1 }),
        (Some(&alice), Change::Handed { seq: 1 }),
        (Some(&alice), Change::Accepted(msg("again", None))),
        (Some(&alice), frame(2, "x")),
        (Some(&alice), Change::DropFrame),
        (Some(&alice), Change::ForgetLine),
        (
            Some(&alice),
            Change::Idle {
                unix: 1_750_000_002.0,
            },
        ),
        (
            Some(&bob),
            Change::Reset {
                next_seq: 1 << 40,
                handed: 300,
                idle_unix: Some(1_749_999_000.5),
            },
        ),
        (
            Some(&bob),
            Change::Answered {
                id: "c-9".into(),
                seq: 299,
            },
        ),
        (Some(&bob), Change::Gone),
        (None, Change::Clean),
    ];
    changes
        .iter()
        .map(|(user, change)| {
            let mut out = Vec::new();
            encode(*user, change, &mut out);
            out
        })
        .collect()
}
