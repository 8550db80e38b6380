//! The OpenAI-compatible agent against a mock upstream of our own (`common/mock_openai.rs`):
//! streaming through awkward framing, the request it sends, every way the upstream can
//! fail, the turn timeout, a user leaving mid-answer, concurrency without threads, TLS, and
//! image messages.

mod common;
#[path = "common/mock_openai.rs"]
mod mock_openai;

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use common::*;
use mock_openai::*;
use serde_json::{Value, json};

/// Bound of every wait for the mock (requests, closes).
const WAIT: Duration = Duration::from_secs(10);

/// Starts straycat with the openai agent on `url` (model `test`), plus `extra`.
fn straycat(url: &str, extra: &[&str]) -> Server {
    straycat_env(url, extra, &[])
}

fn straycat_env(url: &str, extra: &[&str], env: &[(&str, &str)]) -> Server {
    let mut args = vec![
        "--agent",
        "openai",
        "--openai-url",
        url,
        "--openai-model",
        "test",
    ];
    args.extend_from_slice(extra);
    Server::start_with_env(&args, env)
}

/// Reads `chat_token` frames up to the first other frame; returns the tokens and it.
fn recv_turn(c: &mut Client) -> (Vec<String>, Value) {
    let mut tokens = Vec::new();
    loop {
        let v = c.recv_json();
        if v["type"] == "chat_token" {
            assert!(v.get("seq").is_none(), "chat_token carries no seq: {v}");
            tokens.push(
                v["content"]
                    .as_str()
                    .unwrap_or_else(|| panic!("chat_token without content: {v}"))
                    .to_string(),
            );
        } else {
            return (tokens, v);
        }
    }
}

/// Asserts `v` is the `chat` answering `input` with `text`.
fn assert_answer(v: &Value, user: &str, input: &str, text: &str, reply_to: Option<&str>) {
    assert_eq!(v["type"], "chat", "{v}");
    assert_eq!(v["user_id"], user, "{v}");
    assert_eq!(v["who"], "AI", "{v}");
    assert_eq!(v["text"], text, "{v}");
    assert_eq!(v["content"], text, "{v}");
    assert_eq!(v["why"]["input"], input, "{v}");
    assert!(v["seq"].is_u64(), "{v}");
    match reply_to {
        Some(id) => assert_eq!(v["reply_to"], id, "{v}"),
        None => assert!(v.get("reply_to").is_none(), "{v}"),
    }
}

/// A plain answer: the role chunk, `tokens`, finish, usage, `[DONE]`.
fn plain(tokens: &[&str]) -> Vec<Seg> {
    let mut s = Sse::new().role();
    for t in tokens {
        s = s.token(t);
    }
    s.finish("stop").usage().done().segs()
}

/// The tokens the mock answers `text` with when nothing else is asked for: "re: " and the
/// text, word by word.
fn echo_tokens(text: &str) -> Vec<String> {
    let mut out = vec!["re:".to_string()];
    out.extend(text.split(' ').map(|w| format!(" {w}")));
    out
}

fn echo_reply(req: &Request) -> Reply {
    let tokens = echo_tokens(&req.last_text());
    let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    Reply::stream(Framing::Chunked, plain(&refs))
}

/// Sends `text` (id `id`) and asserts the mock's echo answer comes back whole.
fn chat_ok(c: &mut Client, text: &str, id: &str) -> Value {
    c.say(text, Some(id));
    let (tokens, chat) = recv_turn(c);
    let want = echo_tokens(text);
    assert_eq!(tokens, want, "tokens of {text:?}");
    assert_answer(&chat, &c.user.clone(), text, &want.concat(), Some(id));
    chat
}

// ---------------------------------------------------------------------------------------
// 1. Streaming
// ---------------------------------------------------------------------------------------

/// Pieces with what breaks naive relays: leading, trailing and lone spaces, a line feed,
/// two-, three- and four-byte characters and a ZWJ sequence.
const PIECES: &[&str] = &[
    "Hello",
    ",",
    " world",
    "!",
    " ",
    " Ça va",
    " très",
    " bien",
    " — ",
    "日本語",
    "のテキスト",
    " 🐈‍⬛",
    "\n",
    "line two ",
    " trailing  ",
    "€",
];

fn streams_every_piece(framing: Framing, crlf: bool, seed_base: u64) {
    let mock = Mock::start(seed(seed_base), move |_| {
        Reply::stream(framing, awkward_answer(PIECES, crlf))
    });
    let server = straycat(&mock.url(), &[]);
    let mut c = server.connect("stream", "");
    // Several turns: each connection gets split points of its own.
    for i in 1..=4 {
        let id = format!("s{i}");
        let input = format!("question {i}");
        c.say(&input, Some(&id));
        let (tokens, chat) = recv_turn(&mut c);
        assert_eq!(
            tokens, PIECES,
            "turn {i} ({framing:?}): one chat_token per non-empty delta.content, exactly it"
        );
        assert_answer(&chat, "stream", &input, &PIECES.concat(), Some(&id));
        assert_eq!(seq(&chat), i, "{chat}");
    }
    assert_eq!(mock.requests().len(), 4, "one request per turn");
    // With chunked framing the mock holds each connection open after the body: straycat
    // closed every one when the turn ended (no leak, no waiting for EOF).
    if framing != Framing::Close {
        assert!(
            mock.wait_peer_closed(4, WAIT),
            "straycat closes its upstream connection at the end of each turn"
        );
    }
}

#[test]
fn streaming_chunked_every_delta_is_one_token() {
    streams_every_piece(Framing::Chunked, false, 1);
}

#[test]
fn streaming_close_delimited_every_delta_is_one_token() {
    streams_every_piece(Framing::Close, false, 2);
}

#[test]
fn streaming_content_length_crlf_every_delta_is_one_token() {
    streams_every_piece(Framing::Length, true, 3);
}

#[test]
fn streaming_chunked_crlf_every_delta_is_one_token() {
    streams_every_piece(Framing::Chunked, true, 4);
}

// ---------------------------------------------------------------------------------------
// 2. The request
// ---------------------------------------------------------------------------------------

/// Checks what every request has: the method, path, headers, `stream` and the model.
fn assert_request_basics(req: &Request, mock: &Mock) {
    assert_eq!(req.method, "POST", "{req:?}");
    assert_eq!(req.path, "/v1/chat/completions", "{req:?}");
    assert_eq!(
        req.header("content-type"),
        Some("application/json"),
        "{req:?}"
    );
    assert_eq!(req.header("accept"), Some("text/event-stream"), "{req:?}");
    assert_eq!(
        req.header("host"),
        Some(mock.addr().to_string().as_str()),
        "{req:?}"
    );
    assert_eq!(
        req.header("content-length"),
        Some(req.raw_body.len().to_string().as_str()),
        "{req:?}"
    );
    assert_eq!(req.body["stream"], json!(true), "{}", req.body);
    assert_eq!(req.body["model"], "test", "{}", req.body);
}

#[test]
fn request_with_api_key_and_system_prompt() {
    let mock = Mock::start(seed(10), echo_reply);
    let server = straycat(
        &mock.url(),
        &[
            "--openai-api-key",
            "K-123",
            "--system-prompt",
            "You are a cat.",
        ],
    );
    let mut c = server.connect("req", "");
    chat_ok(&mut c, "first", "a");
    let first_answer = echo_tokens("first").concat();
    chat_ok(&mut c, "second one", "b");

    let reqs = mock.wait_requests(2, WAIT);
    assert_eq!(reqs.len(), 2);
    for req in &reqs {
        assert_request_basics(req, &mock);
        assert_eq!(req.header("authorization"), Some("Bearer K-123"), "{req:?}");
    }
    assert_eq!(
        reqs[0].body["messages"],
        json!([
            {"role": "system", "content": "You are a cat."},
            {"role": "user", "content": "first"},
        ])
    );
    assert_eq!(
        reqs[1].body["messages"],
        json!([
            {"role": "system", "content": "You are a cat."},
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": first_answer},
            {"role": "user", "content": "second one"},
        ])
    );
}

#[test]
fn request_without_key_or_prompt_and_history_oldest_first() {
    let mock = Mock::start(seed(11), echo_reply);
    // A trailing slash on the URL changes nothing.
    let url = format!("{}/", mock.url());
    let server = straycat(&url, &[]);
    let mut c = server.connect("hist", "");
    let texts = ["one", "two \"quoted\"", "three ü"];
    for (i, t) in texts.iter().enumerate() {
        chat_ok(&mut c, t, &format!("h{i}"));
    }
    let reqs = mock.wait_requests(3, WAIT);
    for req in &reqs {
        assert_request_basics(req, &mock);
        assert!(
            req.headers_named("authorization").is_empty(),
            "no Authorization without --openai-api-key: {req:?}"
        );
    }
    let mut want = Vec::new();
    for (i, t) in texts.iter().enumerate() {
        want.push(json!({"role": "user", "content": t}));
        assert_eq!(
            reqs[i].body["messages"],
            Value::Array(want.clone()),
            "turn {i}: no system message, the history oldest first, then the new message"
        );
        want.push(json!({"role": "assistant", "content": echo_tokens(t).concat()}));
    }
}

// ---------------------------------------------------------------------------------------
// 3. Failures
// ---------------------------------------------------------------------------------------

/// The mock answers messages starting with "fail" with `failure`, others with the echo.
fn failing_mock(seed_base: u64, failure: impl Fn() -> Reply + Send + Sync + 'static) -> Mock {
    Mock::start(seed(seed_base), move |req| {
        if req.last_text().starts_with("fail") {
            failure()
        } else {
            echo_reply(req)
        }
    })
}

/// Sends "fail", expects exactly one `AgentError` whose description contains each of
/// `expect` (case-insensitive), then checks the socket still works. Returns the
/// description and the tokens streamed before the error.
fn expect_agent_error(server: &Server, expect: &[&str]) -> (String, Vec<String>) {
    let mut c = server.connect("f", "");
    c.say("fail now", Some("x1"));
    let (tokens, err) = recv_turn(&mut c);
    assert_error(&err, "AgentError");
    assert_eq!(err["reply_to"], "x1", "{err}");
    assert_eq!(seq(&err), 1, "{err}");
    let desc = err["description"].as_str().unwrap().to_string();
    for e in expect {
        assert!(
            desc.to_lowercase().contains(&e.to_lowercase()),
            "the description {desc:?} says {e:?}"
        );
    }
    assert!(
        server
            .wait_log_all(&["user=f", "turn failed"], WAIT)
            .is_some(),
        "the failure is logged"
    );
    // The socket stays open and the next message works (and no second error came first:
    // `chat_ok` fails on any frame but tokens and the chat).
    let chat = chat_ok(&mut c, "next please", "x2");
    assert_eq!(seq(&chat), 2, "{chat}");
    (desc, tokens)
}

#[test]
fn upstream_500_with_json_error() {
    let mock = failing_mock(20, || {
        Reply::status(
            500,
            "Internal Server Error",
            "application/json",
            r#"{"error":{"message":"model not found","type":"invalid_request_error","code":null}}"#,
        )
    });
    let server = straycat(&mock.url(), &[]);
    let (desc, tokens) = expect_agent_error(&server, &["500", "model not found"]);
    assert!(tokens.is_empty(), "{tokens:?}");
    assert!(!desc.contains("invalid_request_error"), "{desc}");
}

#[test]
fn upstream_404_with_plain_text_chunked() {
    let mock = failing_mock(21, || {
        Reply::status(
            404,
            "Not Found",
            "text/plain",
            "no route for /v1/chat/completions\n",
        )
        .framed(Framing::Chunked)
    });
    let server = straycat(&mock.url(), &[]);
    expect_agent_error(&server, &["404", "no route for /v1/chat/completions"]);
}

#[test]
fn upstream_refused_then_back() {
    // A port with nothing listening: bind, note it, drop it.
    let addr: SocketAddr = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let server = straycat(&format!("http://{addr}/v1"), &[]);
    let mut c = server.connect("f", "");
    c.say("fail now", Some("x1"));
    let (tokens, err) = recv_turn(&mut c);
    assert!(tokens.is_empty());
    assert_error(&err, "AgentError");
    assert_eq!(err["reply_to"], "x1");
    let desc = err["description"].as_str().unwrap();
    assert!(desc.to_lowercase().contains("refused"), "{desc}");
    assert!(desc.contains("connect"), "{desc}");

    // The upstream comes up on that port: the next message works.
    let listener = TcpListener::bind(addr).expect("rebind the refused port");
    let mock = Mock::serve(listener, None, seed(22), echo_reply);
    let chat = chat_ok(&mut c, "next please", "x2");
    assert_eq!(seq(&chat), 2);
    assert_eq!(mock.requests().len(), 1);
}

/// Some tokens, then no finish_reason: the stream is cut by `end`.
fn cut_stream(framing: Framing, end: End) -> Reply {
    let segs = Sse::new()
        .role()
        .token("partial")
        .token(" answ")
        .comment()
        .segs();
    Reply::stream(framing, segs).ending(end)
}

#[test]
fn upstream_closes_mid_chunk() {
    let mock = failing_mock(23, || cut_stream(Framing::Chunked, End::Cut));
    let server = straycat(&mock.url(), &[]);
    let (_, tokens) = expect_agent_error(&server, &["ended inside a chunk"]);
    assert_eq!(tokens, ["partial", " answ"], "tokens before the cut");
}

#[test]
fn upstream_resets_mid_stream() {
    let mock = failing_mock(24, || cut_stream(Framing::Chunked, End::Reset));
    let server = straycat(&mock.url(), &[]);
    expect_agent_error(&server, &["reset"]);
}

#[test]
fn upstream_closes_close_delimited_stream_before_finish() {
    let mock = failing_mock(25, || cut_stream(Framing::Close, End::Complete));
    let server = straycat(&mock.url(), &[]);
    let (_, tokens) = expect_agent_error(&server, &["before the answer was finished"]);
    assert_eq!(tokens, ["partial", " answ"]);
}

#[test]
fn upstream_content_length_short() {
    let mock = failing_mock(26, || cut_stream(Framing::Length, End::Cut));
    let server = straycat(&mock.url(), &[]);
    expect_agent_error(&server, &["short of its content-length"]);
}

#[test]
fn upstream_done_without_finish_reason_like_llama_cpp_python() {
    // llama-cpp-python's server, when another request takes over: `[DONE]` with no
    // finish_reason, then the chunked body just stops.
    let mock = failing_mock(27, || {
        let segs = Sse::new()
            .role()
            .token("The answer")
            .token(" is")
            .done()
            .segs();
        Reply::stream(Framing::Chunked, segs).ending(End::Cut)
    });
    let server = straycat(&mock.url(), &[]);
    let (_, tokens) = expect_agent_error(&server, &["before the answer was finished"]);
    assert_eq!(tokens, ["The answer", " is"]);
}

#[test]
fn upstream_200_with_empty_body() {
    for framing in [Framing::Length, Framing::Chunked, Framing::Close] {
        let mock = failing_mock(28, move || Reply::stream(framing, Vec::new()));
        let server = straycat(&mock.url(), &[]);
        expect_agent_error(&server, &["empty body"]);
    }
}

/// A conversation that grew past the model's context must not fail every later turn: the
/// turn is sent again with the older half of the history left out.
#[test]
fn a_prompt_too_long_for_the_context_is_sent_again_with_less_history() {
    for (seed_n, overflow) in [
        (40, Reply::stream(Framing::Chunked, Vec::new())),
        (
            41,
            Reply::status(
                400,
                "Bad Request",
                "application/json",
                r#"{"error":{"message":"This model's maximum context length is 512 tokens"}}"#,
            ),
        ),
    ] {
        // The "model" takes at most 3 messages (one turn of history and the question).
        let mock = Mock::start(seed(seed_n), move |req| {
            if req.messages().len() > 3 {
                overflow.clone()
            } else {
                echo_reply(req)
            }
        });
        let server = straycat(&mock.url(), &[]);
        let mut c = server.connect("long", "");
        chat_ok(&mut c, "one", "a");
        chat_ok(&mut c, "two", "b");
        // 2 turns of history + the question = 5 messages: too long; sent again with the
        // newest turn only.
        chat_ok(&mut c, "three", "c");
        let sizes: Vec<usize> = mock.requests().iter().map(|r| r.messages().len()).collect();
        assert_eq!(sizes, [1, 3, 5, 3], "the retry left the oldest turn out");
        let retry = &mock.requests()[3];
        assert_eq!(
            retry.messages()[0]["content"],
            "two",
            "the newest turn stayed"
        );
        assert!(
            server
                .wait_log_all(&["user=long", "did not fit the upstream's context"], WAIT)
                .is_some()
        );
    }
}

#[test]
fn upstream_200_with_a_body_that_is_not_an_event_stream() {
    let mock = failing_mock(29, || {
        Reply::status(
            200,
            "OK",
            "text/html",
            "<html><body><h1>Welcome to nginx!</h1></body></html>\n",
        )
    });
    let server = straycat(&mock.url(), &[]);
    expect_agent_error(&server, &["not an event stream", "Welcome to nginx"]);
}

#[test]
fn upstream_200_with_a_non_streamed_json_answer() {
    // A server that ignores `"stream": true` and answers with one JSON document.
    let mock = failing_mock(30, || {
        Reply::status(
            200,
            "OK",
            "application/json",
            &json!({"id": "x", "object": "chat.completion", "choices": [{"index": 0,
                "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]})
            .to_string(),
        )
    });
    let server = straycat(&mock.url(), &[]);
    expect_agent_error(&server, &["not an event stream", "chat.completion"]);
}

#[test]
fn upstream_event_stream_of_comments_only() {
    let mock = failing_mock(35, || {
        let segs = Sse::new().comment().comment().segs();
        Reply::stream(Framing::Close, segs)
    });
    let server = straycat(&mock.url(), &[]);
    expect_agent_error(&server, &["before the answer was finished"]);
}

#[test]
fn upstream_event_that_is_not_json() {
    let mock = failing_mock(31, || {
        let segs = Sse::new().role().event("this is not json").segs();
        Reply::stream(Framing::Chunked, segs)
    });
    let server = straycat(&mock.url(), &[]);
    expect_agent_error(&server, &["not JSON", "this is not json"]);
}

#[test]
fn upstream_error_event_mid_stream() {
    let mock = failing_mock(32, || {
        let segs = Sse::new()
            .role()
            .token("a")
            .event(r#"{"error":{"message":"the context is full","code":500}}"#)
            .segs();
        Reply::stream(Framing::Chunked, segs)
    });
    let server = straycat(&mock.url(), &[]);
    expect_agent_error(&server, &["the context is full"]);
}

#[test]
fn upstream_not_http_at_all() {
    let mock = failing_mock(33, || Reply::Raw(b"SSH-2.0-OpenSSH_9.2p1\r\n".to_vec()));
    let server = straycat(&mock.url(), &[]);
    expect_agent_error(&server, &["malformed response head"]);
}

#[test]
fn answer_longer_than_max_message_bytes() {
    let mock = failing_mock(34, || {
        let mut s = Sse::new().role();
        for _ in 0..20 {
            s = s.token("0123456789");
        }
        Reply::stream(Framing::Chunked, s.finish("stop").done().segs())
    });
    let server = straycat(&mock.url(), &["--max-message-bytes", "100"]);
    let (_, tokens) =
        expect_agent_error(&server, &["longer than 100 bytes", "--max-message-bytes"]);
    assert_eq!(
        tokens.concat().len(),
        100,
        "tokens up to the limit: {tokens:?}"
    );
}

// ---------------------------------------------------------------------------------------
// 4. Turn timeout
// ---------------------------------------------------------------------------------------

#[test]
fn turn_timeout_closes_the_upstream_connection() {
    let mock = Mock::start(seed(40), |req| {
        if req.last_text() == "hang" {
            Reply::Hang
        } else {
            echo_reply(req)
        }
    });
    let server = straycat(&mock.url(), &["--turn-timeout-secs", "1"]);
    let mut c = server.connect("slow", "");
    let sent = Instant::now();
    c.say("hang", Some("t1"));
    mock.wait_requests(1, WAIT);
    let (tokens, err) = recv_turn(&mut c);
    let took = sent.elapsed();
    assert!(tokens.is_empty());
    assert_error(&err, "Timeout");
    assert_eq!(err["reply_to"], "t1");
    assert!(
        took >= Duration::from_millis(900),
        "the timeout came after {took:?}"
    );
    assert!(
        mock.wait_peer_closed(1, WAIT),
        "straycat closed the upstream connection of the timed-out turn"
    );
    let chat = chat_ok(&mut c, "after the timeout", "t2");
    assert_eq!(seq(&chat), 2);
    assert_eq!(mock.requests().len(), 2);
}

// ---------------------------------------------------------------------------------------
// 5. The user leaves mid-answer
// ---------------------------------------------------------------------------------------

const SLOW: &[&str] = &[
    "Once", " upon", " a", " time", " there", " was", " a", " cat.",
];

fn slow_mock(seed_base: u64, gap: Duration) -> Mock {
    Mock::start(seed(seed_base), move |_| {
        let mut s = Sse::new().role();
        for t in SLOW {
            s = s.token(t).pause(gap);
        }
        Reply::stream(Framing::Chunked, s.finish("stop").done().segs())
    })
}

#[test]
fn user_leaves_mid_answer_and_gets_the_held_chat() {
    let mock = slow_mock(50, Duration::from_millis(60));
    let server = straycat(&mock.url(), &[]);
    let mut c = server.connect("away", "");
    c.say("tell me a story", Some("d1"));
    let first = c.recv_json();
    assert_eq!(first["type"], "chat_token", "{first}");
    assert_eq!(first["content"], "Once");
    c.close();
    assert!(
        server
            .wait_log_all(&["user=away", "left while a turn was running"], WAIT)
            .is_some(),
        "the server saw the user leave mid-answer"
    );
    assert!(
        server
            .wait_log_all(&["user=away", "reply ready while away"], WAIT)
            .is_some(),
        "the turn ran to the end without a socket"
    );
    let mut c = server.connect("away", "");
    let v = c.recv_json();
    assert_answer(&v, "away", "tell me a story", &SLOW.concat(), Some("d1"));
    assert_eq!(seq(&v), 1);
    assert_eq!(mock.requests().len(), 1, "the turn was not run again");
    // The session goes on, with the held answer in its history.
    c.say("more", Some("d2"));
    let (tokens, chat) = recv_turn(&mut c);
    assert_eq!(tokens, SLOW);
    assert_eq!(seq(&chat), 2);
    let reqs = mock.wait_requests(2, WAIT);
    assert_eq!(
        reqs[1].messages()[1],
        json!({"role": "assistant", "content": SLOW.concat()})
    );
}

#[test]
fn user_drops_tcp_mid_answer_and_reconnects_while_it_runs() {
    let mock = slow_mock(51, Duration::from_millis(200));
    let server = straycat(&mock.url(), &[]);
    let mut c = server.connect("back", "");
    c.say("tell me a story", Some("r1"));
    let first = c.recv_json();
    assert_eq!(first["content"], "Once", "{first}");
    c.drop_tcp();
    assert!(
        server
            .wait_log_all(&["user=back", "left while a turn was running"], WAIT)
            .is_some()
    );
    // Back while the answer is still streaming (8 pieces 200 ms apart): the rest of the
    // tokens live, then the whole chat.
    let mut c = server.connect("back", "");
    let (tokens, chat) = recv_turn(&mut c);
    assert!(
        !tokens.is_empty()
            && tokens.len() < SLOW.len()
            && SLOW[SLOW.len() - tokens.len()..] == tokens[..],
        "live tokens of the rest of the turn only: {tokens:?}"
    );
    assert_answer(&chat, "back", "tell me a story", &SLOW.concat(), Some("r1"));
    assert_eq!(seq(&chat), 1);
}

// ---------------------------------------------------------------------------------------
// 6. Concurrency without threads
// ---------------------------------------------------------------------------------------

/// Threads of process `pid`.
fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("read /proc/PID/task")
        .count()
}

#[test]
fn twenty_users_three_requests_at_once_no_threads() {
    const USERS: usize = 20;
    let mock = Mock::start(seed(60), |req| {
        // Each user's own answer, over about 300 ms.
        let who = req.last_text();
        let mut s = Sse::new().role().comment();
        for i in 0..6 {
            s = s
                .token(&format!("{who}-{i} "))
                .pause(Duration::from_millis(50));
        }
        Reply::stream(Framing::Chunked, s.finish("stop").usage().done().segs())
    });
    let server = straycat(&mock.url(), &["--openai-max-concurrent", "3"]);
    let at_start = threads(server.pid());

    let mut clients: Vec<Client> = (0..USERS)
        .map(|i| server.connect(&format!("u{i}"), ""))
        .collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.say(&format!("user{i}"), Some(&format!("q{i}")));
    }
    assert!(
        mock.wait_active(3, WAIT),
        "three requests in flight at once"
    );
    let while_busy = threads(server.pid());
    for (i, c) in clients.iter_mut().enumerate() {
        let who = format!("user{i}");
        let want: Vec<String> = (0..6).map(|k| format!("{who}-{k} ")).collect();
        let (tokens, chat) = recv_turn(c);
        assert_eq!(tokens, want, "user u{i} gets its own tokens");
        assert_answer(
            &chat,
            &format!("u{i}"),
            &who,
            &want.concat(),
            Some(&format!("q{i}")),
        );
    }
    let max = mock.max_active();
    eprintln!(
        "threads: {at_start} at start, {while_busy} with 3 turns in flight; \
         max {max} requests at once"
    );
    assert!(
        max <= 3,
        "--openai-max-concurrent 3, the mock saw {max} at once"
    );
    assert!(max >= 2, "the turns overlapped: the mock saw {max} at once");
    assert_eq!(mock.requests().len(), USERS);
    assert_eq!(while_busy, at_start, "no thread per turn");
    assert_eq!(threads(server.pid()), at_start);
    // The event loop and the signal thread: the openai agent starts no worker threads
    // (no pool: it is polled by the loop). Under qemu-user (the aarch64 run of
    // tests/all.sh) the emulator adds threads of its own.
    let exe = std::fs::read_link(format!("/proc/{}/exe", server.pid())).unwrap_or_default();
    if !exe.to_string_lossy().contains("qemu") {
        assert_eq!(
            at_start, 2,
            "threads at start: the loop and the signal thread"
        );
    }
}

// ---------------------------------------------------------------------------------------
// 7. TLS (the `tls` cargo feature, on by default)
// ---------------------------------------------------------------------------------------

#[cfg(feature = "tls")]
/// A self-signed certificate for `names`, as PEM, and a TLS server config with it.
fn tls_identity(names: &[&str]) -> (String, std::sync::Arc<rustls::ServerConfig>) {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let ck = rcgen::generate_simple_self_signed(names).expect("rcgen");
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![ck.cert.der().clone()], key)
    .expect("server certificate");
    (ck.cert.pem(), std::sync::Arc::new(config))
}

#[cfg(feature = "tls")]
/// Writes `pem` to a file of its own in the temp dir; removed on drop.
struct TempFile(std::path::PathBuf);

#[cfg(feature = "tls")]
impl TempFile {
    fn new(tag: &str, contents: &str) -> TempFile {
        let path =
            std::env::temp_dir().join(format!("straycat-openai-{}-{tag}.pem", std::process::id()));
        std::fs::write(&path, contents).expect("write the certificate");
        TempFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

#[cfg(feature = "tls")]
impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(feature = "tls")]
/// Where `localhost` resolves first (what straycat will connect to), which must be a
/// loopback address.
fn localhost() -> std::net::IpAddr {
    use std::net::ToSocketAddrs;
    let addr = ("localhost", 0)
        .to_socket_addrs()
        .expect("resolve localhost")
        .next()
        .expect("localhost has an address");
    assert!(addr.ip().is_loopback(), "localhost resolves to {addr}");
    addr.ip()
}

#[cfg(feature = "tls")]
fn tls_mock(
    config: std::sync::Arc<rustls::ServerConfig>,
    ip: std::net::IpAddr,
    seed_base: u64,
) -> Mock {
    let listener = TcpListener::bind((ip, 0)).expect("bind the TLS mock");
    Mock::serve(listener, Some(config), seed(seed_base), |req| {
        let answer = || awkward_answer(PIECES, false);
        match req.last_text().as_str() {
            // The body ends with the connection, after a close_notify.
            "close" => Reply::stream(Framing::Close, answer()),
            // A whole answer, then the TCP close at once with no close_notify, all of it
            // in one write so that straycat reads the end and the close together.
            "abrupt chunked" => Reply::stream(Framing::Chunked, answer())
                .ending(End::Abrupt)
                .in_one_write(),
            "abrupt close" => Reply::stream(Framing::Close, answer())
                .ending(End::Abrupt)
                .in_one_write(),
            // A close-delimited stream that stops early, without close_notify.
            "fail truncated" => {
                Reply::stream(Framing::Close, Sse::new().role().token("partial").segs())
                    .ending(End::Cut)
            }
            _ => Reply::stream(Framing::Chunked, answer()),
        }
    })
}

#[cfg(feature = "tls")]
#[test]
fn tls_upstream_with_ssl_cert_file() {
    let ip = localhost();
    let (pem, config) = tls_identity(&["localhost"]);
    let cert = TempFile::new("localhost", &pem);
    let mock = tls_mock(config, ip, 70);
    let url = format!("https://localhost:{}/v1", mock.addr().port());
    let server = straycat_env(&url, &[], &[("SSL_CERT_FILE", cert.path())]);
    let mut c = server.connect("tls", "");
    let texts = ["chunked", "close", "abrupt chunked", "abrupt close"];
    for (i, text) in texts.iter().enumerate() {
        let id = format!("t{i}");
        c.say(text, Some(&id));
        let (tokens, chat) = recv_turn(&mut c);
        assert_eq!(tokens, PIECES, "over TLS, {text}");
        assert_answer(&chat, "tls", text, &PIECES.concat(), Some(&id));
    }
    let reqs = mock.wait_requests(texts.len(), WAIT);
    assert_eq!(reqs[0].path, "/v1/chat/completions");
    assert_eq!(
        reqs[0].header("host"),
        Some(format!("localhost:{}", mock.addr().port()).as_str())
    );
    // A close-delimited stream cut short, with no close_notify either.
    c.say("fail truncated", Some("t9"));
    let (tokens, err) = recv_turn(&mut c);
    assert_eq!(tokens, ["partial"]);
    assert_error(&err, "AgentError");
    let desc = err["description"].as_str().unwrap();
    assert!(desc.contains("before the answer was finished"), "{desc}");
}

#[cfg(feature = "tls")]
#[test]
fn tls_upstream_by_ip_address_needs_an_ip_san() {
    let (pem, config) = tls_identity(&["localhost", "127.0.0.1"]);
    let cert = TempFile::new("ip", &pem);
    let mock = tls_mock(config, "127.0.0.1".parse().unwrap(), 71);
    let url = format!("https://127.0.0.1:{}/v1", mock.addr().port());
    let server = straycat_env(&url, &[], &[("SSL_CERT_FILE", cert.path())]);
    let mut c = server.connect("tlsip", "");
    c.say("chunked", Some("i1"));
    let (tokens, chat) = recv_turn(&mut c);
    assert_eq!(tokens, PIECES);
    assert_answer(&chat, "tlsip", "chunked", &PIECES.concat(), Some("i1"));
}

#[cfg(feature = "tls")]
#[test]
fn tls_upstream_with_unknown_certificate_fails() {
    let ip = localhost();
    let (_, config) = tls_identity(&["localhost"]);
    let mock = tls_mock(config, ip, 72);
    let url = format!("https://localhost:{}/v1", mock.addr().port());
    // The system's roots only (straycat inherits this process's environment).
    let server = straycat(&url, &[]);
    let mut c = server.connect("tlsbad", "");
    c.say("chunked", Some("b1"));
    let (tokens, err) = recv_turn(&mut c);
    assert!(tokens.is_empty());
    assert_error(&err, "AgentError");
    let desc = err["description"].as_str().unwrap();
    assert!(desc.contains("certificate"), "{desc}");
    assert!(mock.requests().is_empty(), "no request went out");
}

// ---------------------------------------------------------------------------------------
// 8. Images
// ---------------------------------------------------------------------------------------

#[test]
fn image_message_becomes_content_parts() {
    let mock = Mock::start(seed(80), echo_reply);
    let server = straycat(&mock.url(), &[]);
    let mut c = server.connect("img", "");
    c.send_json(&json!({
        "text": "what is this",
        "image": "data:image/png;base64,AAAA",
        "id": "p1",
    }));
    let (tokens, chat) = recv_turn(&mut c);
    let want = echo_tokens("what is this");
    assert_eq!(tokens, want);
    assert_answer(&chat, "img", "what is this", &want.concat(), Some("p1"));
    let reqs = mock.wait_requests(1, WAIT);
    assert_eq!(
        reqs[0].body["messages"],
        json!([{"role": "user", "content": [
            {"type": "text", "text": "what is this"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        ]}])
    );
}

#[test]
fn image_message_without_text_becomes_one_image_part() {
    // Valid since the protocol takes an image with no text (as Cheshire Cat 1.8 does).
    let mock = Mock::start(seed(81), echo_reply);
    let server = straycat(&mock.url(), &[]);
    let mut c = server.connect("img2", "");
    c.send_json(&json!({"image": "https://example.com/cat.png", "id": "p2"}));
    let (_, chat) = recv_turn(&mut c);
    assert_eq!(chat["type"], "chat", "{chat}");
    assert_eq!(chat["reply_to"], "p2", "{chat}");
    let reqs = mock.wait_requests(1, WAIT);
    assert_eq!(
        reqs[0].body["messages"],
        json!([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        ]}])
    );
}
