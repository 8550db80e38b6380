//! The Cheshire Cat 1.x wire format: user ids, what a client may send, and the JSON frames
//! the server sends back (PROTOCOL.md is the spec).

use serde::Serialize;
use serde_json::{Map, Value};
use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Longest user id and client message id PROTOCOL.md allows.
pub const MAX_ID_CHARS: usize = 64;

/// A validated user id: 1–64 characters of `A-Z a-z 0-9 _ . @ -`.
///
/// Validation lives in the constructor so no unchecked id can reach a log line or a map.
/// Shared, not owned: the id is cloned into every turn, worker result and timer, and a
/// clone should cost a reference count, not an allocation.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(Arc<str>);

impl UserId {
    /// The id of `/ws` without a path segment, as in Cheshire Cat.
    pub fn default_user() -> UserId {
        UserId(Arc::from("user"))
    }

    /// Checks an already percent-decoded id.
    pub fn parse(raw: &str) -> Option<UserId> {
        let ok = !raw.is_empty()
            && raw.len() <= MAX_ID_CHARS
            && raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'@' | b'-'));
        ok.then(|| UserId(Arc::from(raw)))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A chat message a client sent: `{"text": "...", "id": "...", ...}`.
#[derive(Clone, Debug, PartialEq)]
pub struct ClientMessage {
    /// The user's words.
    pub text: String,
    /// The client's id for this message (*extension*), used to run a resend only once.
    pub id: Option<String>,
    /// Every other field of the object, handed to the agent untouched (plugins read them).
    pub fields: Map<String, Value>,
}

/// Why a frame was refused; the text goes into the `InvalidMessage` error frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidMessage(pub String);

/// Parses one text frame from a client.
pub fn parse_client_message(frame: &str) -> Result<ClientMessage, InvalidMessage> {
    let value: Value = serde_json::from_str(frame)
        .map_err(|e| InvalidMessage(format!("frame is not JSON: {e}")))?;
    const NOT_A_MESSAGE: &str =
        "frame is not a JSON object with a string \"text\" (or \"image\" or \"audio\")";
    let Value::Object(mut fields) = value else {
        return Err(InvalidMessage(NOT_A_MESSAGE.into()));
    };
    // Cheshire Cat 1.8 takes an image or a recording (a URL or a data URI, as its TypeScript
    // client sends) with or without text; they stay in `fields` for the agent. Their size is
    // bounded by --max-message-bytes like the rest of the frame.
    for media in ["image", "audio"] {
        if fields
            .get(media)
            .is_some_and(|v| !v.is_string() && !v.is_null())
        {
            return Err(InvalidMessage(format!("field \"{media}\" is not a string")));
        }
    }
    let has_media = ["image", "audio"]
        .iter()
        .any(|m| fields.get(*m).is_some_and(Value::is_string));
    let text = match fields.remove("text") {
        Some(Value::String(s)) => s,
        Some(Value::Null) | None if has_media => String::new(),
        Some(Value::Null) | None => return Err(InvalidMessage(NOT_A_MESSAGE.into())),
        Some(_) => return Err(InvalidMessage("field \"text\" is not a string".into())),
    };
    let id = match fields.get("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.chars().count() <= MAX_ID_CHARS => Some(s.clone()),
        Some(Value::String(_)) => {
            return Err(InvalidMessage(format!(
                "field \"id\" is longer than {MAX_ID_CHARS} characters"
            )));
        }
        Some(_) => return Err(InvalidMessage("field \"id\" is not a string".into())),
    };
    Ok(ClientMessage { text, id, fields })
}

/// Error names clients may see (PROTOCOL.md; clients must accept unknown ones too).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorName {
    /// The frame was not a chat message.
    InvalidMessage,
    /// Too many turns queued for this user.
    Busy,
    /// The agent failed.
    AgentError,
    /// The turn ran past the turn timeout.
    Timeout,
    /// Frames the client asked for are no longer held.
    ResumeGap,
    /// The user sent more messages than `--max-messages-per-minute`; this one was not run.
    RateLimited,
}

impl ErrorName {
    /// The name as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorName::InvalidMessage => "InvalidMessage",
            ErrorName::Busy => "Busy",
            ErrorName::AgentError => "AgentError",
            ErrorName::Timeout => "Timeout",
            ErrorName::ResumeGap => "ResumeGap",
            ErrorName::RateLimited => "RateLimited",
        }
    }
}

/// A frame the server sends that carries a `seq` and is held for replay.
#[derive(Clone, Debug, PartialEq)]
pub enum Held {
    /// The final answer of a turn.
    Chat {
        /// The reply text.
        text: String,
        /// The user message it answers (for `why.input`).
        input: String,
    },
    /// A progress message from the agent.
    Notification(String),
    /// A failed turn or a refused frame.
    Error(ErrorName, String),
}

/// Seconds since the Unix epoch, as Cheshire Cat's `when`.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[derive(Serialize)]
struct NoteFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    content: &'a str,
    seq: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    reply_to: Option<&'a str>,
}

/// Encodes a `chat_token` preview frame.
pub fn encode_token(content: &str) -> String {
    let mut out = String::with_capacity(content.len() + 40);
    out.push_str("{\"type\":\"chat_token\",\"content\":\"");
    escape_json_into(&mut out, content);
    out.push_str("\"}");
    out
}

/// Appends `s` as the inside of a JSON string (RFC 8259 §7), byte for byte what
/// `serde_json` writes: `"` `\\` and control characters escaped (`\n` `\r` `\t` `\b` `\f`,
/// else `\u00XX`), everything else as it is.
///
/// Every reply goes through here two or three times (a `chat` frame carries its text as
/// `text`, `content` and, for echo, `why.input`), so plain text is skipped over eight bytes
/// at a time and copied in one piece.
pub fn escape_json_into(out: &mut String, s: &str) {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    /// Whether any byte of `v` is zero (the classic bit trick: exact for "any").
    fn has_zero(v: u64) -> bool {
        v.wrapping_sub(LO) & !v & HI != 0
    }
    let bytes = s.as_bytes();
    let mut start = 0; // first byte not yet copied
    let mut i = 0;
    while i < bytes.len() {
        if let Some(chunk) = bytes.get(i..i + 8) {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            let v = u64::from_le_bytes(word);
            // A byte below 0x20 has its top three bits clear; '"' and '\\' compare equal.
            let control = has_zero(v & 0xe0e0_e0e0_e0e0_e0e0);
            if !control && !has_zero(v ^ (LO * b'"' as u64)) && !has_zero(v ^ (LO * b'\\' as u64)) {
                i += 8;
                continue;
            }
        }
        let b = bytes[i];
        let short = match b {
            b'"' => Some("\\\""),
            b'\\' => Some("\\\\"),
            b'\n' => Some("\\n"),
            b'\r' => Some("\\r"),
            b'\t' => Some("\\t"),
            0x08 => Some("\\b"),
            0x0c => Some("\\f"),
            _ => None,
        };
        if short.is_none() && b >= 0x20 {
            i += 1;
            continue;
        }
        // Only ASCII bytes are escaped, so these slice bounds are char boundaries.
        out.push_str(&s[start..i]);
        match short {
            Some(esc) => out.push_str(esc),
            None => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.push_str("\\u00");
                out.push(HEX[usize::from(b >> 4)] as char);
                out.push(HEX[usize::from(b & 0xf)] as char);
            }
        }
        i += 1;
        start = i;
    }
    out.push_str(&s[start..]);
}

/// Encodes a held frame with its `seq` and, when the client message had one, its `reply_to`.
pub fn encode_held(
    frame: &Held,
    user: &UserId,
    seq: u64,
    reply_to: Option<&str>,
    when: f64,
) -> String {
    match frame {
        Held::Chat { text, input } => encode_chat(user, text, input, when, seq, reply_to),
        Held::Notification(content) => to_json(&NoteFrame {
            kind: "notification",
            name: None,
            description: None,
            content,
            seq,
            reply_to,
        }),
        Held::Error(name, description) => to_json(&NoteFrame {
            kind: "error",
            name: Some(name.as_str()),
            description: Some(description),
            content: description,
            seq,
            reply_to,
        }),
    }
}

/// The `chat` frame, written by hand rather than through serde so that the reply is
/// escaped once for both `text` and `content`. Same bytes as serializing [`ChatFrame`],
/// which a test checks.
fn encode_chat(
    user: &UserId,
    text: &str,
    input: &str,
    when: f64,
    seq: u64,
    reply_to: Option<&str>,
) -> String {
    let mut escaped = String::with_capacity(text.len() + 16);
    escape_json_into(&mut escaped, text);
    let mut out = String::with_capacity(2 * escaped.len() + input.len() + 256);
    out.push_str("{\"type\":\"chat\",\"user_id\":\"");
    // A UserId is only ever `A-Z a-z 0-9 _ . @ -`: nothing to escape.
    out.push_str(user.as_str());
    out.push_str("\",\"who\":\"AI\",\"text\":\"");
    out.push_str(&escaped);
    out.push_str("\",\"content\":\"");
    out.push_str(&escaped);
    out.push_str("\",\"when\":");
    out.push_str(&to_json(&when));
    out.push_str(",\"why\":{\"input\":\"");
    escape_json_into(&mut out, input);
    out.push_str("\",\"intermediate_steps\":[],\"memory\":{}},\"seq\":");
    out.push_str(&seq.to_string());
    if let Some(id) = reply_to {
        out.push_str(",\"reply_to\":\"");
        escape_json_into(&mut out, id);
        out.push('"');
    }
    out.push('}');
    out
}

fn to_json<T: Serialize>(value: &T) -> String {
    // Serializing these plain structs cannot fail: every key is a string and no map has
    // non-string keys; the fallback keeps that promise without a panic.
    serde_json::to_string(value)
        .unwrap_or_else(|_| String::from("{\"type\":\"error\",\"content\":\"encoding failed\"}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    // The serde shapes of the frames written by hand: the reference they must match.
    #[derive(Serialize)]
    struct TokenFrame<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        content: &'a str,
    }

    #[derive(Serialize)]
    struct Why<'a> {
        input: &'a str,
        intermediate_steps: [(); 0],
        memory: Map<String, Value>,
    }

    #[derive(Serialize)]
    struct ChatFrame<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        user_id: &'a str,
        who: &'static str,
        text: &'a str,
        content: &'a str,
        when: f64,
        why: Why<'a>,
        seq: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        reply_to: Option<&'a str>,
    }

    #[test]
    fn user_ids() {
        assert!(UserId::parse("alice.b@x-y_1").is_some());
        assert!(UserId::parse("").is_none());
        assert!(UserId::parse(&"a".repeat(64)).is_some());
        assert!(UserId::parse(&"a".repeat(65)).is_none());
        assert!(UserId::parse("a b").is_none());
        assert!(UserId::parse("é").is_none());
        assert!(UserId::parse("../x").is_none());
    }

    #[test]
    fn client_messages() {
        let m = parse_client_message(r#"{"text":"hi","id":"c-1","plugin":{"a":1}}"#).unwrap();
        assert_eq!(m.text, "hi");
        assert_eq!(m.id.as_deref(), Some("c-1"));
        assert_eq!(m.fields["plugin"]["a"], 1);
        for bad in [
            "nope",
            "[1]",
            "\"text\"",
            "{}",
            r#"{"text":1}"#,
            r#"{"text":"a","id":5}"#,
        ] {
            assert!(parse_client_message(bad).is_err(), "{bad}");
        }
        let long = format!(r#"{{"text":"a","id":"{}"}}"#, "x".repeat(65));
        assert!(parse_client_message(&long).is_err());
        // An image or a recording stands in for the text.
        let m = parse_client_message(r#"{"image":"data:image/png;base64,AAAA"}"#).unwrap();
        assert_eq!(m.text, "");
        assert_eq!(m.fields["image"], "data:image/png;base64,AAAA");
        let m = parse_client_message(r#"{"text":"what is it","audio":"https://x/a.wav"}"#).unwrap();
        assert_eq!(
            (m.text.as_str(), &m.fields["audio"]),
            ("what is it", &Value::from("https://x/a.wav"))
        );
        for bad in [
            r#"{"image":5}"#,
            r#"{"audio":{}}"#,
            r#"{"text":"a","image":[1]}"#,
            r#"{"image":null}"#,
        ] {
            assert!(parse_client_message(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn chat_frame_has_cheshire_cat_fields() {
        let user = UserId::parse("alice").unwrap();
        let held = Held::Chat {
            text: "Hello!".into(),
            input: "Hello".into(),
        };
        let v: Value =
            serde_json::from_str(&encode_held(&held, &user, 42, Some("c-17"), 1.5)).unwrap();
        assert_eq!(v["type"], "chat");
        assert_eq!(v["user_id"], "alice");
        assert_eq!(v["who"], "AI");
        assert_eq!(v["text"], v["content"]);
        assert_eq!(v["why"]["input"], "Hello");
        assert_eq!(v["why"]["intermediate_steps"], serde_json::json!([]));
        assert_eq!(v["seq"], 42);
        assert_eq!(v["reply_to"], "c-17");
        let err = Held::Error(ErrorName::Busy, "too many".into());
        let v: Value = serde_json::from_str(&encode_held(&err, &user, 3, None, 1.0)).unwrap();
        assert_eq!(v["name"], "Busy");
        assert_eq!(v["content"], "too many");
        assert!(v.get("reply_to").is_none());
        let t: Value = serde_json::from_str(&encode_token("Hel")).unwrap();
        assert_eq!(t, serde_json::json!({"type":"chat_token","content":"Hel"}));
    }

    /// A small deterministic generator, so the checks below are reproducible.
    fn next(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    fn random_text(state: &mut u64) -> String {
        const PIECES: &[&str] = &[
            "a", "plain ", "\"", "\\", "\n", "\r", "\t", "\u{8}", "\u{c}", "\u{0}", "\u{1f}",
            "\u{7f}", "é", "€", "😺", "/", "<", "'", "\u{2028}", "abcdefgh",
        ];
        let len = (next(state) % 40) as usize;
        (0..len)
            .map(|_| PIECES[(next(state) % PIECES.len() as u64) as usize])
            .collect()
    }

    #[test]
    fn escaping_matches_serde_json_byte_for_byte() {
        for b in 0u8..0x80 {
            let s = (b as char).to_string().repeat(1 + usize::from(b % 11));
            let mut ours = String::from("\"");
            escape_json_into(&mut ours, &s);
            ours.push('"');
            assert_eq!(ours, serde_json::to_string(&s).unwrap(), "byte {b:#x}");
        }
        let mut state = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..5000 {
            let s = random_text(&mut state);
            let mut ours = String::from("\"");
            escape_json_into(&mut ours, &s);
            ours.push('"');
            assert_eq!(ours, serde_json::to_string(&s).unwrap(), "{s:?}");
        }
    }

    #[test]
    fn hand_written_frames_match_their_serde_shapes() {
        let user = UserId::parse("alice").unwrap();
        let mut state = 42;
        for i in 0..500u64 {
            let text = random_text(&mut state);
            let input = random_text(&mut state);
            let id = random_text(&mut state);
            let reply_to = (i % 2 == 0).then_some(id.as_str());
            let when = if i % 3 == 0 {
                1_763_900_000.0
            } else {
                1_763_900_000.25 + i as f64
            };
            let reference = serde_json::to_string(&ChatFrame {
                kind: "chat",
                user_id: user.as_str(),
                who: "AI",
                text: &text,
                content: &text,
                when,
                why: Why {
                    input: &input,
                    intermediate_steps: [],
                    memory: Map::new(),
                },
                seq: i * 7919,
                reply_to,
            })
            .unwrap();
            let held = Held::Chat {
                text: text.clone(),
                input: input.clone(),
            };
            assert_eq!(
                encode_held(&held, &user, i * 7919, reply_to, when),
                reference
            );
            let token = serde_json::to_string(&TokenFrame {
                kind: "chat_token",
                content: &text,
            })
            .unwrap();
            assert_eq!(encode_token(&text), token);
        }
    }
}
