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
    let Value::Object(mut fields) = value else {
        return Err(InvalidMessage(
            "frame is not a JSON object with a string \"text\"".into(),
        ));
    };
    let text = match fields.remove("text") {
        Some(Value::String(s)) => s,
        Some(_) => return Err(InvalidMessage("field \"text\" is not a string".into())),
        None => {
            return Err(InvalidMessage(
                "frame is not a JSON object with a string \"text\"".into(),
            ));
        }
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
    to_json(&TokenFrame {
        kind: "chat_token",
        content,
    })
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
        Held::Chat { text, input } => to_json(&ChatFrame {
            kind: "chat",
            user_id: user.as_str(),
            who: "AI",
            text,
            content: text,
            when,
            why: Why {
                input,
                intermediate_steps: [],
                memory: Map::new(),
            },
            seq,
            reply_to,
        }),
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

fn to_json<T: Serialize>(value: &T) -> String {
    // Serializing these plain structs cannot fail: every key is a string and no map has
    // non-string keys; the fallback keeps that promise without a panic.
    serde_json::to_string(value)
        .unwrap_or_else(|_| String::from("{\"type\":\"error\",\"content\":\"encoding failed\"}"))
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
