//! The OpenAI-compatible agent: each turn is one streamed `POST {URL}/chat/completions`
//! (llama.cpp's `llama-server`, Ollama, vLLM, OpenAI itself), driven by the event loop:
//! connect, write the request, read the event stream and relay each piece of
//! `choices[0].delta.content` as a `chat_token`.
//!
//! What ends a turn well: `data: [DONE]` after a chunk with a `finish_reason`, or the end of
//! the body after one. Anything else is an `AgentError` that says what happened, never an
//! empty or partial `chat`: a non-2xx status (with the upstream's own message), a refused or
//! reset connection, a stream cut before its `finish_reason` (llama-cpp-python's server cuts
//! the stream in progress when another request comes), an empty body (what that server
//! sends for a prompt too long for its context), a body that is not an event stream of
//! chat-completion chunks, an answer past `--max-message-bytes`.

use super::http1::{self, Progress, ResponseReader};
use super::sse::{Event, SseDecoder};
use super::task::refused;
use super::transport::{ClientConfig, Transport, tls_config};
use super::upstream::Upstream;
use super::{AgentError, PolledAgent, Step, Task, TaskCtx, Turn, Who};
use log::info;
use mio::{Interest, Registry};

use serde::Deserialize;
use serde_json::{Value, json};
use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

/// A response head larger than this is refused.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// Bytes of a non-2xx body kept for its error message.
const MAX_ERROR_BODY_BYTES: usize = 16 * 1024;

/// Bytes read from the upstream per call before the task gives the loop back.
const READ_BUDGET_BYTES: usize = 64 * 1024;

/// Bytes of the start of a 2xx body kept to show in the error when it is not an event
/// stream.
const BODY_START_BYTES: usize = 256;

/// How the agent is set up; one value serves every turn.
pub struct OpenAi {
    inner: Arc<Inner>,
}

/// The agent's settings, shared with its turns (a turn that must be sent again with a
/// shorter history builds its request anew).
struct Inner {
    upstream: Upstream,
    /// Resolved once at start-up: no DNS on the loop.
    addr: SocketAddr,
    tls: Option<Arc<ClientConfig>>,
    model: String,
    api_key: Option<String>,
    system_prompt: Option<String>,
    max_concurrent: usize,
    /// `--max-message-bytes`: the longest answer relayed, and the bound of one event.
    max_answer_bytes: usize,
}

/// What `OpenAi::new` needs.
pub struct OpenAiConfig {
    /// `--openai-url`.
    pub url: String,
    /// `--openai-model`.
    pub model: String,
    /// `--openai-api-key`.
    pub api_key: Option<String>,
    /// `--system-prompt`.
    pub system_prompt: Option<String>,
    /// `--openai-max-concurrent`.
    pub max_concurrent: usize,
    /// `--max-message-bytes`.
    pub max_answer_bytes: usize,
}

impl OpenAi {
    /// Takes the URL apart, resolves its host (blocking: call at start-up) and, for
    /// `https://`, loads the CA roots.
    pub fn new(c: OpenAiConfig) -> Result<OpenAi, String> {
        let upstream = Upstream::parse(&c.url, &["http", "https"])?;
        let addr = upstream.resolve()?;
        info!(
            "openai agent: {} resolved to {addr} (once, at start-up)",
            upstream.host
        );
        let tls = if upstream.tls() {
            Some(tls_config()?)
        } else {
            None
        };
        let inner = Inner {
            upstream,
            addr,
            tls,
            model: c.model,
            api_key: c.api_key,
            system_prompt: c.system_prompt,
            max_concurrent: c.max_concurrent.max(1),
            max_answer_bytes: c.max_answer_bytes,
        };
        Ok(OpenAi {
            inner: Arc::new(inner),
        })
    }
}

impl Inner {
    /// The request body for `turn`: the system prompt, the history as alternating user and
    /// assistant messages, then the user's message.
    fn body(&self, turn: &Turn) -> Vec<u8> {
        let mut messages = Vec::with_capacity(turn.history.len() + 2);
        if let Some(system) = &self.system_prompt {
            messages.push(json!({"role": "system", "content": system}));
        }
        for line in &turn.history {
            let role = match line.who {
                Who::Human => "user",
                Who::Ai => "assistant",
            };
            messages.push(json!({"role": role, "content": &*line.text}));
        }
        messages.push(json!({"role": "user", "content": user_content(turn)}));
        json!({"model": self.model, "stream": true, "messages": messages})
            .to_string()
            .into_bytes()
    }

    /// The task that sends `turn`.
    fn task(this: &Arc<Inner>, turn: Turn) -> OpenAiTask {
        let me = this.as_ref();
        let body = me.body(&turn);
        let path = format!("{}/chat/completions", me.upstream.path);
        let host = me.upstream.host_header();
        let auth = me.api_key.as_ref().map(|k| format!("Bearer {k}"));
        let mut headers = vec![
            ("Content-Type", "application/json"),
            ("Accept", "text/event-stream"),
        ];
        if let Some(auth) = &auth {
            headers.push(("Authorization", auth.as_str()));
        }
        let request = http1::request("POST", &host, &path, &headers, &body);
        OpenAiTask {
            inner: Arc::clone(this),
            addr: me.addr,
            tls: me.tls.clone().map(|c| (c, me.upstream.host.clone())),
            conn: None,
            request,
            written: 0,
            reader: ResponseReader::new(MAX_HEAD_BYTES, usize::MAX),
            sse: SseDecoder::new(me.max_answer_bytes.max(4096)),
            max_answer_bytes: me.max_answer_bytes,
            raw: Vec::new(),
            body: Vec::new(),
            events: Vec::new(),
            answer: String::new(),
            finish_reason: None,
            error_body: Vec::new(),
            body_start: Vec::new(),
            saw_event: false,
            again: None,
            overflow: false,
            turn,
        }
    }
}

/// The user message's content: its text, or (with an `image`) the OpenAI vision format's
/// parts, text and `image_url`.
fn user_content(turn: &Turn) -> Value {
    match turn.fields.get("image").and_then(Value::as_str) {
        Some(image) => {
            let mut parts = Vec::new();
            if !turn.text.is_empty() {
                parts.push(json!({"type": "text", "text": turn.text}));
            }
            parts.push(json!({"type": "image_url", "image_url": {"url": image}}));
            Value::Array(parts)
        }
        None => Value::String(turn.text.clone()),
    }
}

impl PolledAgent for OpenAi {
    fn name(&self) -> &str {
        "openai"
    }

    fn start(&self, turn: Turn, _now: Instant) -> Box<dyn Task> {
        if turn.text.is_empty() && !turn.fields.get("image").is_some_and(Value::is_string) {
            return refused(
                "the openai agent answers text and images; this message has neither".into(),
            );
        }
        Box::new(Inner::task(&self.inner, turn))
    }

    fn max_concurrent(&self) -> Option<usize> {
        Some(self.inner.max_concurrent)
    }
}

/// What straycat reads of a streamed chat-completion chunk (other fields are ignored).
#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(borrow)]
    choices: Option<Vec<Choice<'a>>>,
    error: Option<Value>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(borrow)]
    delta: Option<Delta<'a>>,
    #[serde(borrow)]
    finish_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(borrow)]
    content: Option<Cow<'a, str>>,
}

/// One turn's request and response.
struct OpenAiTask {
    inner: Arc<Inner>,
    /// The turn, kept to send it again with less history if the prompt did not fit.
    turn: Turn,
    /// The upstream said the prompt is too long for its context (an empty 200, as
    /// llama-cpp-python answers, or a 400 that says so).
    overflow: bool,
    addr: SocketAddr,
    tls: Option<(Arc<ClientConfig>, String)>,
    conn: Option<Transport>,
    request: Vec<u8>,
    written: usize,
    reader: ResponseReader,
    sse: SseDecoder,
    max_answer_bytes: usize,
    /// Bytes read from the socket, not yet fed to the reader.
    raw: Vec<u8>,
    /// Decoded body bytes, not yet fed to the event decoder.
    body: Vec<u8>,
    events: Vec<Event>,
    answer: String,
    finish_reason: Option<String>,
    /// The body of a non-2xx answer, for its error message.
    error_body: Vec<u8>,
    /// The first bytes of a 2xx body, for the error when it holds no event.
    body_start: Vec<u8>,
    /// The body held at least one event.
    saw_event: bool,
    /// The read budget ran out: call again at this instant (the next loop iteration).
    again: Option<Instant>,
}

/// The turn failed with this description.
fn fail<T>(why: impl Into<String>) -> Result<T, AgentError> {
    Err(AgentError::Failed(why.into()))
}

impl OpenAiTask {
    /// Moves the request out and the response in; `Ok(Some(answer))` when the turn ends.
    fn drive(&mut self, ctx: &mut TaskCtx<'_>) -> Result<Option<String>, AgentError> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(None);
        };
        if !conn.check_connected().map_err(upstream_error)? {
            return Ok(None);
        }
        // With TLS the request waits in rustls until the handshake is done: flush each time.
        if self.written < self.request.len() || self.tls.is_some() {
            conn.write(&self.request, &mut self.written)
                .map_err(upstream_error)?;
        }
        let got = conn
            .read(&mut self.raw, READ_BUDGET_BYTES)
            .map_err(upstream_error)?;
        let fed = self.reader.feed(&self.raw, &mut self.body);
        self.raw.clear();
        let progress =
            fed.map_err(|e| AgentError::Failed(format!("the upstream's answer: {e}")))?;
        if got.bytes >= READ_BUDGET_BYTES && !got.eof {
            // More may be waiting, and edge-triggered readiness will not say so again:
            // come back on the loop's next iteration, after the others had their turn.
            self.again = Some(ctx.now());
        }
        let status = self.reader.head().map(|h| (h.status, h.reason.clone()));
        if let Some((status, reason)) = status
            && !(200..300).contains(&status)
        {
            let room = MAX_ERROR_BODY_BYTES.saturating_sub(self.error_body.len());
            let take = self.body.len().min(room);
            self.error_body.extend_from_slice(&self.body[..take]);
            self.body.clear();
            if progress == Progress::Complete || got.eof {
                let why = status_error(status, &reason, &self.error_body);
                let lower = why.to_ascii_lowercase();
                self.overflow = matches!(status, 400 | 413)
                    && ["context", "too long", "too many tokens"]
                        .iter()
                        .any(|w| lower.contains(w));
                return fail(why);
            }
            return Ok(None);
        }
        if !self.body.is_empty() {
            let room = BODY_START_BYTES.saturating_sub(self.body_start.len());
            let start = &self.body[..self.body.len().min(room)];
            self.body_start.extend_from_slice(start);
            let fed = self.sse.feed(&self.body, &mut self.events);
            // Buffers keep their memory from token to token: no allocation per token.
            self.body.clear();
            fed.map_err(|e| AgentError::Failed(format!("the upstream's event stream: {e}")))?;
            let mut events = std::mem::take(&mut self.events);
            for event in events.drain(..) {
                self.saw_event = true;
                if let Some(answer) = self.on_event(&event, ctx)? {
                    return Ok(Some(answer));
                }
            }
            self.events = events;
        }
        if got.eof {
            self.sse.finish();
            self.reader
                .eof()
                .map_err(|e| AgentError::Failed(format!("the upstream's answer: {e}")))?;
            return self.finished_by_end().map(Some);
        }
        if progress == Progress::Complete {
            return self.finished_by_end().map(Some);
        }
        Ok(None)
    }

    /// One server-sent event: a chunk of the answer, `[DONE]`, or an error object.
    fn on_event(
        &mut self,
        event: &Event,
        ctx: &mut TaskCtx<'_>,
    ) -> Result<Option<String>, AgentError> {
        let data = event.data.trim();
        if data == "[DONE]" {
            return match &self.finish_reason {
                Some(_) => self.answer_or_empty().map(Some),
                None => fail(
                    "the upstream ended the stream before the answer was finished \
                     (no finish_reason: it may serve one request at a time and another took over)",
                ),
            };
        }
        // Typed and borrowing: a token costs no map of the whole chunk, and no copy of
        // its text unless it has escapes.
        let chunk: Chunk<'_> = serde_json::from_str(data).map_err(|_| {
            AgentError::Failed(format!(
                "the upstream sent an event that is not a chat-completion chunk: {}",
                shorten(data)
            ))
        })?;
        if let Some(err) = &chunk.error {
            return fail(format!("the upstream failed: {}", error_message(err)));
        }
        let Some(choices) = chunk.choices else {
            return fail("the upstream sent a chunk without choices");
        };
        // A final usage chunk has none; a role-only first chunk has no content.
        let Some(choice) = choices.into_iter().next() else {
            return Ok(None);
        };
        if let Some(piece) = choice
            .delta
            .and_then(|d| d.content)
            .filter(|p| !p.is_empty())
        {
            if self.answer.len() + piece.len() > self.max_answer_bytes {
                return fail(format!(
                    "the answer is longer than {} bytes (--max-message-bytes)",
                    self.max_answer_bytes
                ));
            }
            self.answer.push_str(&piece);
            ctx.token_text(piece.into_owned());
        }
        if let Some(reason) = choice.finish_reason {
            self.finish_reason = Some(reason.into_owned());
        }
        Ok(None)
    }

    /// The body ended (or the connection closed) without `[DONE]`.
    fn finished_by_end(&mut self) -> Result<String, AgentError> {
        if self.finish_reason.is_some() {
            return self.answer_or_empty();
        }
        if self.body_start.is_empty() {
            self.overflow = true;
            fail(
                "the upstream answered with an empty body (is the prompt too long for its context?)",
            )
        } else if let Some(kind) = self.not_an_event_stream() {
            // An HTML page from a proxy, a non-streamed JSON answer: say what came.
            let start = String::from_utf8_lossy(&self.body_start);
            fail(format!(
                "the upstream's answer is not an event stream{kind}: {}",
                shorten(start.trim())
            ))
        } else {
            fail("the upstream's stream ended before the answer was finished (no finish_reason)")
        }
    }

    /// The body held no event and is not labelled an event stream (a stream of comments
    /// only is one, cut short): `Some` of its Content-Type for the error message.
    fn not_an_event_stream(&self) -> Option<String> {
        if self.saw_event {
            return None;
        }
        match self.reader.head().and_then(|h| h.content_type.as_deref()) {
            Some(ct) if ct.to_ascii_lowercase().starts_with("text/event-stream") => None,
            Some(ct) => Some(format!(" (Content-Type: {ct})")),
            None => Some(String::new()),
        }
    }

    fn answer_or_empty(&mut self) -> Result<String, AgentError> {
        if self.answer.is_empty() {
            let reason = self.finish_reason.as_deref().unwrap_or("none");
            return fail(format!(
                "the model's answer was empty (finish_reason: {reason})"
            ));
        }
        Ok(std::mem::take(&mut self.answer))
    }

    fn step(&mut self, ctx: &mut TaskCtx<'_>) -> Step {
        self.again = None;
        match self.drive(ctx) {
            Ok(None) => Step::Pending,
            Ok(Some(answer)) => self.done(ctx, Ok(answer)),
            Err(e) if self.overflow && !self.turn.history.is_empty() => {
                // A conversation longer than the model's context would otherwise fail at
                // every turn from now on (nothing new enters the history): send it again
                // with the older half of the history left out, down to none.
                self.close(ctx.registry());
                let mut turn = std::mem::replace(&mut self.turn, empty_turn());
                let all = turn.history.len();
                let drop = all.div_ceil(2).next_multiple_of(2).min(all);
                turn.history.drain(..drop);
                info!(
                    "user={} the prompt did not fit the upstream's context ({e}); sending it again with the newest {} of {all} history lines",
                    turn.user,
                    turn.history.len()
                );
                *self = Inner::task(&self.inner, turn);
                Task::start(self, ctx)
            }
            Err(e) => self.done(ctx, Err(e)),
        }
    }

    fn done(&mut self, ctx: &mut TaskCtx<'_>, outcome: Result<String, AgentError>) -> Step {
        self.close(ctx.registry());
        Step::Done(outcome)
    }

    fn close(&mut self, registry: &Registry) {
        if let Some(mut conn) = self.conn.take() {
            let _ = registry.deregister(conn.socket());
        }
    }
}

/// A placeholder while a turn moves to its retry.
fn empty_turn() -> Turn {
    Turn {
        user: crate::protocol::UserId::default_user(),
        text: String::new(),
        fields: serde_json::Map::new(),
        history: Vec::new(),
    }
}

fn upstream_error(why: String) -> AgentError {
    AgentError::Failed(format!("the upstream: {why}"))
}

/// "upstream answered 404 Not Found: model not found".
fn status_error(status: u16, reason: &str, body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let detail = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v.get("error").map(error_message))
        .unwrap_or_else(|| shorten(text.trim()));
    let mut out = format!("the upstream answered {status}");
    if !reason.is_empty() {
        out.push(' ');
        out.push_str(reason);
    }
    if !detail.is_empty() {
        out.push_str(": ");
        out.push_str(&detail);
    }
    out
}

/// The message of an OpenAI-style error object (`{"message": ...}`) or string.
fn error_message(err: &Value) -> String {
    match err {
        Value::String(s) => shorten(s),
        _ => err
            .get("message")
            .and_then(Value::as_str)
            .map(shorten)
            .unwrap_or_else(|| shorten(&err.to_string())),
    }
}

/// At most 200 characters of an upstream's text, for an error description.
fn shorten(s: &str) -> String {
    match s.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

impl Task for OpenAiTask {
    fn start(&mut self, ctx: &mut TaskCtx<'_>) -> Step {
        let tls = self.tls.as_ref().map(|(c, host)| (c, host.as_str()));
        let mut conn = match Transport::connect(self.addr, tls) {
            Ok(c) => c,
            Err(why) => return Step::Done(Err(upstream_error(why))),
        };
        if let Err(e) = ctx.register(conn.socket(), 0, Interest::READABLE | Interest::WRITABLE) {
            return Step::Done(Err(upstream_error(format!("cannot watch the socket: {e}"))));
        }
        self.conn = Some(conn);
        Step::Pending
    }

    fn ready(&mut self, _: usize, readable: bool, _: bool, ctx: &mut TaskCtx<'_>) -> Step {
        if readable && let Some(conn) = self.conn.as_mut() {
            conn.readable_again(ctx.hung_up());
        }
        self.step(ctx)
    }

    fn timeout(&mut self, ctx: &mut TaskCtx<'_>) -> Step {
        self.step(ctx)
    }

    fn poll_at(&self) -> Option<Instant> {
        self.again
    }

    fn abort(&mut self, registry: &Registry) {
        self.close(registry);
    }
}
