//! The HTTP side of a connection: parse the request head, decide what it asks for
//! (a chat upgrade, the raw echo, health, or a refusal), and build the responses.
//! Pure functions over bytes; the connection code does the I/O.

use crate::auth::{self, Secret};
use crate::protocol::UserId;

/// Largest request head accepted; a browser's upgrade request is well under 2 KiB.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;

/// Largest `?since=` accepted (2^53).
pub const MAX_SINCE: u64 = 1 << 53;

/// Headers parsed at most; more is a 400.
const MAX_HEADERS: usize = 32;

/// The parts of a request head the server looks at.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `POST`, …
    pub method: String,
    /// The path without the query.
    pub path: String,
    /// The raw query, without `?`.
    pub query: String,
    /// `Upgrade: websocket` was present.
    pub upgrade_websocket: bool,
    /// `Connection` listed `upgrade`.
    pub connection_upgrade: bool,
    /// `Sec-WebSocket-Key`.
    pub ws_key: Option<String>,
    /// `Sec-WebSocket-Version`.
    pub ws_version: Option<String>,
    /// `Content-Length`, if present and a number.
    pub content_length: Option<usize>,
    /// `Transfer-Encoding` was present (not supported: a body needs a length).
    pub transfer_encoding: bool,
    /// Cheshire Cat's `user_id` header (its HTTP API's user).
    pub user_id: Option<String>,
    /// The credential of `Authorization: Bearer …` or Cheshire Cat's `access_token` header.
    pub credential: Option<String>,
    /// `Accept` asked for JSON and not for HTML (a Cat client, not a browser).
    pub wants_json: bool,
    /// `Host`, as sent.
    pub host: Option<String>,
    /// `Origin`, as sent (browsers send it on upgrades and on cross-site requests).
    pub origin: Option<String>,
}

impl Request {
    /// The request target for a log line, with the value of any `token` in the query
    /// replaced: the log must not hand out credentials.
    pub fn logged_target(&self) -> String {
        if self.query.is_empty() {
            return self.path.clone();
        }
        let mut out = self.path.clone();
        for (i, pair) in self.query.split('&').enumerate() {
            out.push(if i == 0 { '?' } else { '&' });
            match pair.split_once('=') {
                Some((k, _)) if is_secret_param(k) => {
                    out.push_str(k);
                    out.push_str("=<redacted>");
                }
                _ => out.push_str(pair),
            }
        }
        out
    }
}

/// Query parameters that carry credentials.
fn is_secret_param(name: &str) -> bool {
    matches!(
        name.to_ascii_lowercase().as_str(),
        "token" | "access_token" | "api_key" | "key"
    )
}

/// Who may do what: the credentials and Origins the server accepts, and the time tokens
/// are checked at.
#[derive(Clone, Copy, Debug)]
pub struct Access<'a> {
    /// `--api-key`.
    pub api_key: Option<&'a str>,
    /// `--jwt-secret`.
    pub jwt: Option<&'a Secret>,
    /// `--allowed-origins` (lower case; `*` allows any).
    pub origins: &'a [String],
    /// Unix seconds now, for tokens' `exp` and `nbf`.
    pub now_unix: u64,
}

impl Access<'_> {
    /// No credential needed, any Origin.
    #[cfg(test)]
    pub const OPEN: Access<'static> = Access {
        api_key: None,
        jwt: None,
        origins: &[],
        now_unix: 0,
    };

    /// The user a request for `asked` (the user in the path or the `user_id` header, if
    /// any) is served as, given the `token` it carries; else the refusal's reason.
    fn user(&self, asked: Option<UserId>, token: Option<&str>) -> Result<UserId, String> {
        let by_key = || asked.clone().unwrap_or_else(UserId::default_user);
        if self.api_key.is_none() && self.jwt.is_none() {
            return Ok(by_key());
        }
        let Some(token) = token else {
            return Err("missing token".into());
        };
        if self.api_key.is_some() && key_ok(self.api_key, Some(token)) {
            return Ok(by_key());
        }
        let Some(secret) = self.jwt else {
            return Err("wrong token".into());
        };
        match auth::verify(token, secret, self.now_unix) {
            Ok(user) if asked.as_ref().is_none_or(|a| *a == user) => Ok(user),
            Ok(user) => Err(format!("the token is for user {user}, not this one")),
            // A wrong API key reads as a malformed token: say both.
            Err(auth::TokenError::Malformed(_)) if self.api_key.is_some() => {
                Err("wrong token (neither the API key nor a valid signed token)".into())
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// Whether a browser on `origin` may use this server reached as `host`. No Origin (not
    /// a browser) and the server's own (the page it serves) always may.
    fn origin_ok(&self, origin: Option<&str>, host: Option<&str>) -> bool {
        let Some(origin) = origin else { return true };
        let origin = origin.trim().trim_end_matches('/').to_ascii_lowercase();
        if self.origins.iter().any(|o| o == "*" || *o == origin) {
            return true;
        }
        let Some((scheme, authority)) = origin.split_once("://") else {
            return false;
        };
        let Some(host) = host else { return false };
        let default_port = match scheme {
            "http" => ":80",
            "https" => ":443",
            _ => return false,
        };
        let host = host.trim().to_ascii_lowercase();
        let strip = |a: &str| a.strip_suffix(default_port).unwrap_or(a).to_string();
        strip(authority) == strip(&host)
    }
}

/// Result of looking at the bytes received so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Head {
    /// More bytes are needed.
    Partial,
    /// A complete head of `len` bytes; anything after it is WebSocket data.
    Complete(Box<Request>, usize),
    /// Not HTTP, or too large.
    Invalid(&'static str),
}

/// Parses the request head in `buf`.
pub fn parse_head(buf: &[u8]) -> Head {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => {
            Head::Invalid("request head too large")
        }
        Ok(httparse::Status::Partial) => Head::Partial,
        Ok(httparse::Status::Complete(len)) => {
            let target = req.path.unwrap_or("/");
            let (path, query) = target.split_once('?').unwrap_or((target, ""));
            let mut out = Request {
                method: req.method.unwrap_or("").to_string(),
                path: path.to_string(),
                query: query.to_string(),
                ..Request::default()
            };
            for h in req.headers.iter() {
                let value = String::from_utf8_lossy(h.value);
                let value = value.trim();
                if h.name.eq_ignore_ascii_case("upgrade") {
                    out.upgrade_websocket |= value.eq_ignore_ascii_case("websocket");
                } else if h.name.eq_ignore_ascii_case("connection") {
                    out.connection_upgrade |= value
                        .split(',')
                        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
                } else if h.name.eq_ignore_ascii_case("sec-websocket-key") {
                    out.ws_key = Some(value.to_string());
                } else if h.name.eq_ignore_ascii_case("sec-websocket-version") {
                    out.ws_version = Some(value.to_string());
                } else if h.name.eq_ignore_ascii_case("content-length") {
                    match value.parse() {
                        Ok(n) => out.content_length = Some(n),
                        Err(_) => return Head::Invalid("malformed Content-Length"),
                    }
                } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                    out.transfer_encoding = true;
                } else if h.name.eq_ignore_ascii_case("user_id") {
                    out.user_id = Some(value.to_string());
                } else if h.name.eq_ignore_ascii_case("authorization") {
                    let bearer = value
                        .split_once(' ')
                        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"));
                    out.credential = bearer.map(|(_, token)| token.trim().to_string());
                } else if h.name.eq_ignore_ascii_case("accept") {
                    out.wants_json =
                        value.contains("application/json") && !value.contains("text/html");
                } else if h.name.eq_ignore_ascii_case("access_token") {
                    out.credential = Some(value.to_string());
                } else if h.name.eq_ignore_ascii_case("host") {
                    out.host = Some(value.to_string());
                } else if h.name.eq_ignore_ascii_case("origin") {
                    out.origin = Some(value.to_string());
                }
            }
            Head::Complete(Box::new(out), len)
        }
        Err(httparse::Error::TooManyHeaders) => Head::Invalid("too many headers"),
        Err(_) => Head::Invalid("malformed request"),
    }
}

/// The chat session an upgrade asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatTarget {
    /// Whose session.
    pub user: UserId,
    /// `?since=N`: the client has every frame up to N.
    pub since: Option<u64>,
}

/// What a request is routed to.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// A chat session.
    Chat(ChatTarget),
    /// The raw echo endpoint.
    Echo,
    /// `GET /health`.
    Health,
    /// `GET /`: the chat page (served unless `--page=0`).
    Page,
    /// `GET /` asking for JSON: Cheshire Cat's status answer, which its clients read.
    Status,
    /// `GET /metrics` (served unless `--metrics=0`); `authorized`: no `--api-key` is set,
    /// or the request carried it as `Authorization: Bearer KEY`.
    Metrics {
        /// The request may see the metrics.
        authorized: bool,
    },
    /// The chat part of Cheshire Cat's HTTP API, for this user.
    Api(Api, UserId),
    /// Refused with this status and reason (the reason becomes the body and the log line).
    Refuse(u16, String),
}

/// The chat part of Cheshire Cat's HTTP API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    /// `GET /memory/conversation_history`: the session's history.
    History,
    /// `DELETE /memory/conversation_history`: forget it.
    ForgetHistory,
    /// `POST /message`: one turn, answered with its final `chat`.
    Message,
}

/// Decides what `req` gets, given who may do what; `raw_echo`: whether `/echo` is served.
pub fn route(req: &Request, access: &Access<'_>, raw_echo: bool) -> Route {
    let api_key = access.api_key;
    // The Python client asks for the history with a trailing slash (the Cat redirects it).
    let path = match req.path.strip_suffix('/') {
        Some(p) if !p.is_empty() => p,
        _ => req.path.as_str(),
    };
    let api = match (req.method.as_str(), path) {
        ("GET", "/memory/conversation_history") => Some(Api::History),
        ("DELETE", "/memory/conversation_history") => Some(Api::ForgetHistory),
        ("POST", "/message") => Some(Api::Message),
        _ => None,
    };
    if let Some(api) = api {
        return route_api(req, api, access);
    }
    if req.method != "GET" {
        return Route::Refuse(405, format!("method {} not allowed", req.method));
    }
    // `/ws`: the token's user, or the default one; `/ws/{id}`: that one.
    let (chat, asked) = if req.path == "/ws" {
        (true, None)
    } else if let Some(raw) = req.path.strip_prefix("/ws/") {
        match percent_decode(raw).as_deref().and_then(UserId::parse) {
            Some(u) => (true, Some(u)),
            None => {
                return Route::Refuse(400, format!("invalid user id: {USER_ID_RULE}"));
            }
        }
    } else {
        (false, None)
    };
    let wants_ws = chat || (raw_echo && req.path == "/echo");
    if !wants_ws {
        return match req.path.as_str() {
            "/health" => Route::Health,
            "/" if req.wants_json => Route::Status,
            "/" | "/index.html" => Route::Page,
            "/metrics" => Route::Metrics {
                authorized: key_ok(api_key, req.credential.as_deref()),
            },
            _ => Route::Refuse(404, format!("no such endpoint {}", req.path)),
        };
    }
    if !req.upgrade_websocket || !req.connection_upgrade {
        return Route::Refuse(400, "expected a WebSocket upgrade".into());
    }
    if req.ws_version.as_deref() != Some("13") {
        // RFC 6455 §4.4: answer with the versions we speak.
        return Route::Refuse(
            426,
            "unsupported Sec-WebSocket-Version (this server speaks 13)".into(),
        );
    }
    if !req.ws_key.as_deref().is_some_and(valid_key) {
        return Route::Refuse(400, "missing or malformed Sec-WebSocket-Key".into());
    }
    // Cross-site WebSocket hijacking: a page elsewhere must not open a kiosk's socket.
    if !access.origin_ok(req.origin.as_deref(), req.host.as_deref()) {
        return Route::Refuse(403, "Origin not allowed (--allowed-origins)".into());
    }
    if !chat {
        return Route::Echo;
    }
    let mut token = None;
    let mut since = None;
    for pair in req.query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let Some(v) = percent_decode(v) else {
            return Route::Refuse(400, "malformed query".into());
        };
        match k {
            "token" => token = Some(v),
            // Bounded so seq arithmetic cannot overflow; 2^53 is also the largest integer
            // a JavaScript client can hold exactly.
            "since" => match v.parse::<u64>() {
                Ok(n) if n <= MAX_SINCE => since = Some(n),
                Ok(_) => return Route::Refuse(400, "since is out of range".into()),
                Err(_) => return Route::Refuse(400, "since must be a whole number".into()),
            },
            _ => {}
        }
    }
    match access.user(asked, token.as_deref()) {
        Ok(user) => Route::Chat(ChatTarget { user, since }),
        Err(why) => Route::Refuse(403, why),
    }
}

/// The user and the credential of a Cheshire Cat HTTP API call: the user from the
/// `user_id` header (`user` without one), the key from `?token=`, `access_token` or
/// `Authorization: Bearer`, as the Cat's clients send them.
fn route_api(req: &Request, api: Api, access: &Access<'_>) -> Route {
    let asked = match req.user_id.as_deref() {
        None => None,
        Some(raw) => match UserId::parse(raw) {
            Some(u) => Some(u),
            None => {
                return Route::Refuse(400, format!("invalid user_id: {USER_ID_RULE}"));
            }
        },
    };
    // A form on another site can POST without a preflight: the same Origin rule as sockets.
    if !access.origin_ok(req.origin.as_deref(), req.host.as_deref()) {
        return Route::Refuse(403, "Origin not allowed (--allowed-origins)".into());
    }
    let token = req
        .query
        .split('&')
        .find_map(|p| p.strip_prefix("token="))
        .and_then(percent_decode)
        .or_else(|| req.credential.clone());
    let user = match access.user(asked, token.as_deref()) {
        Ok(user) => user,
        Err(why) => return Route::Refuse(403, why),
    };
    if api == Api::Message {
        if req.transfer_encoding {
            return Route::Refuse(411, "send the message with a Content-Length".into());
        }
        if req.content_length.unwrap_or(0) == 0 {
            return Route::Refuse(400, "expected a JSON message as the body".into());
        }
    }
    Route::Api(api, user)
}

/// What a user id may be, for the 400 that refuses one.
pub(crate) const USER_ID_RULE: &str = "1-64 characters of A-Z a-z 0-9 _ . @ -";

/// Whether `given` is the `--api-key` (always, without one); compared in constant time.
fn key_ok(api_key: Option<&str>, given: Option<&str>) -> bool {
    api_key.is_none_or(|key| given.is_some_and(|t| constant_time_eq(t.as_bytes(), key.as_bytes())))
}

/// RFC 6455 §4.1: the key is 16 random bytes in base64, so 24 characters ending in `==`.
fn valid_key(key: &str) -> bool {
    key.len() == 24
        && key.ends_with("==")
        && key[..22]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

/// Decodes `%XX` escapes; `None` for a bad escape or a result that is not UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Compares without stopping at the first difference, so the time taken does not tell an
/// attacker how much of a guessed key was right (only its length).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The `101 Switching Protocols` answer to a valid upgrade.
pub fn upgrade_response(key: &str) -> Vec<u8> {
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n").into_bytes()
}

/// A complete response that ends the connection.
pub fn response(status: u16, content_type: &str, body: &str) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Content Too Large",
        429 => "Too Many Requests",
        502 => "Bad Gateway",
        504 => "Gateway Timeout",
        426 => "Upgrade Required",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let extra = match status {
        // RFC 9110 §11.6.1: a 401 names the scheme it wants.
        401 => "WWW-Authenticate: Bearer\r\n",
        405 => "Allow: GET\r\n",
        503 => "Retry-After: 5\r\n",
        426 => "Sec-WebSocket-Version: 13\r\n",
        _ => "",
    };
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A 429 with a one-line body, telling the client when to try again (RFC 6585 §4).
pub fn too_many(why: &str, retry_after: std::time::Duration) -> Vec<u8> {
    with_retry_after(refusal(429, why), retry_after)
}

/// `response` with a `Retry-After` header (whole seconds, rounded up, at least 1).
pub fn with_retry_after(mut response: Vec<u8>, wait: std::time::Duration) -> Vec<u8> {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    // Behind the status line, which every response here has.
    let at = response
        .windows(2)
        .position(|w| w == b"\r\n")
        .map_or(0, |i| i + 2);
    let header = format!("Retry-After: {}\r\n", secs.max(1));
    response.splice(at..at, header.into_bytes());
    response
}

/// A refusal with a one-line plain-text body.
pub fn refusal(status: u16, why: &str) -> Vec<u8> {
    response(status, "text/plain; charset=utf-8", &format!("{why}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn key(k: &'static str) -> Access<'static> {
        Access {
            api_key: Some(k),
            ..Access::OPEN
        }
    }

    fn upgrade(path: &str) -> Request {
        let raw = format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        match parse_head(raw.as_bytes()) {
            Head::Complete(r, len) => {
                assert_eq!(len, raw.len());
                *r
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn heads() {
        assert_eq!(parse_head(b"GET / HTTP/1.1\r\nHost:"), Head::Partial);
        assert!(matches!(
            parse_head(b"\x16\x03\x01garbage\r\n\r\n"),
            Head::Invalid(_)
        ));
        let big = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(MAX_HEAD_BYTES));
        assert!(matches!(parse_head(big.as_bytes()), Head::Invalid(_)));
    }

    #[test]
    fn routes() {
        assert_eq!(
            route(&upgrade("/ws"), &Access::OPEN, false),
            Route::Chat(ChatTarget {
                user: UserId::default_user(),
                since: None
            })
        );
        assert_eq!(
            route(&upgrade("/ws/al%40ice?since=5&x=1"), &Access::OPEN, false),
            Route::Chat(ChatTarget {
                user: UserId::parse("al@ice").unwrap(),
                since: Some(5)
            })
        );
        assert!(matches!(
            route(&upgrade("/ws/a%20b"), &Access::OPEN, false),
            Route::Refuse(400, _)
        ));
        assert!(matches!(
            route(&upgrade("/ws/a?since=x"), &Access::OPEN, false),
            Route::Refuse(400, _)
        ));
        assert!(matches!(
            route(
                &upgrade("/ws/a?since=18446744073709551615"),
                &Access::OPEN,
                false
            ),
            Route::Refuse(400, _)
        ));
        assert!(matches!(
            route(&upgrade("/ws/%zz"), &Access::OPEN, false),
            Route::Refuse(400, _)
        ));
        assert!(matches!(
            route(&upgrade("/echo"), &Access::OPEN, false),
            Route::Refuse(404, _)
        ));
        assert_eq!(route(&upgrade("/echo"), &key("k"), true), Route::Echo);
        assert!(matches!(
            route(&upgrade("/nope"), &Access::OPEN, true),
            Route::Refuse(404, _)
        ));
        let mut post = upgrade("/ws");
        post.method = "POST".into();
        assert!(matches!(
            route(&post, &Access::OPEN, false),
            Route::Refuse(405, _)
        ));
        let mut plain = upgrade("/health");
        plain.upgrade_websocket = false;
        assert_eq!(route(&plain, &Access::OPEN, false), Route::Health);
        let mut old = upgrade("/ws");
        old.ws_version = Some("8".into());
        assert!(matches!(
            route(&old, &Access::OPEN, false),
            Route::Refuse(426, _)
        ));
    }

    #[test]
    fn api_key() {
        assert!(matches!(
            route(&upgrade("/ws"), &key("s3cret"), false),
            Route::Refuse(403, _)
        ));
        assert!(matches!(
            route(&upgrade("/ws?token=nope"), &key("s3cret"), false),
            Route::Refuse(403, _)
        ));
        assert!(matches!(
            route(&upgrade("/ws/bob?token=s3cret"), &key("s3cret"), false),
            Route::Chat(_)
        ));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    const NOW: u64 = 1_800_000_000;

    fn with_origin(path: &str, origin: &str) -> Request {
        Request {
            origin: Some(origin.into()),
            ..upgrade(path)
        }
    }

    #[test]
    fn signed_tokens_name_the_user() {
        let secret = Secret::new("0123456789abcdef0123456789abcdef");
        let jwt = Access {
            jwt: Some(&secret),
            now_unix: NOW,
            ..Access::OPEN
        };
        let bob = UserId::parse("bob").unwrap();
        let token = auth::sign(&bob, &secret, NOW, 60);
        let chat = |path: &str, access: &Access<'_>| route(&upgrade(path), access, false);
        assert_eq!(
            chat(&format!("/ws?token={token}"), &jwt),
            Route::Chat(ChatTarget {
                user: bob.clone(),
                since: None
            })
        );
        assert!(matches!(
            chat(&format!("/ws/bob?token={token}"), &jwt),
            Route::Chat(_)
        ));
        let Route::Refuse(403, why) = chat(&format!("/ws/alice?token={token}"), &jwt) else {
            panic!("another user's token was taken");
        };
        assert!(why.contains("for user bob"), "{why}");
        assert_eq!(
            chat("/ws/bob", &jwt),
            Route::Refuse(403, "missing token".into())
        );
        let late = Access {
            now_unix: NOW + 3600,
            ..jwt
        };
        assert_eq!(
            chat(&format!("/ws?token={token}"), &late),
            Route::Refuse(403, "token expired".into())
        );
        // Either credential, with both set: the key keeps its meaning (the user of the path).
        let both = Access {
            api_key: Some("k3y"),
            ..jwt
        };
        assert!(
            matches!(chat("/ws/alice?token=k3y", &both), Route::Chat(t) if t.user.as_str() == "alice")
        );
        assert!(
            matches!(chat(&format!("/ws?token={token}"), &both), Route::Chat(t) if t.user == bob)
        );
        assert!(matches!(
            chat("/ws/alice?token=nope", &both),
            Route::Refuse(403, _)
        ));
        // The HTTP API: the token's user, which a user_id header must not contradict.
        let api = |user_id: Option<&str>| {
            let mut r = upgrade("/memory/conversation_history");
            r.credential = Some(token.clone());
            r.user_id = user_id.map(Into::into);
            route(&r, &jwt, false)
        };
        assert_eq!(api(None), Route::Api(Api::History, bob.clone()));
        assert_eq!(api(Some("bob")), Route::Api(Api::History, bob.clone()));
        assert!(matches!(api(Some("alice")), Route::Refuse(403, _)));
    }

    #[test]
    fn foreign_origins_are_refused() {
        let open = Access::OPEN;
        let own = |origin: &str, host: &str| {
            let mut r = with_origin("/ws", origin);
            r.host = Some(host.into());
            route(&r, &open, false)
        };
        assert!(matches!(
            own("http://kiosk.local:1865", "kiosk.local:1865"),
            Route::Chat(_)
        ));
        assert!(matches!(
            own("HTTPS://Kiosk.local", "kiosk.local:443"),
            Route::Chat(_)
        ));
        assert!(matches!(
            own("http://kiosk.local", "kiosk.local"),
            Route::Chat(_)
        ));
        assert!(matches!(
            own("http://evil.example", "kiosk.local:1865"),
            Route::Refuse(403, _)
        ));
        assert!(matches!(
            own("http://kiosk.local:8080", "kiosk.local:1865"),
            Route::Refuse(403, _)
        ));
        assert!(matches!(
            own("null", "kiosk.local:1865"),
            Route::Refuse(403, _)
        ));
        let listed = ["https://admin.example".to_string()];
        let some = Access {
            origins: &listed,
            ..Access::OPEN
        };
        assert!(matches!(
            route(&with_origin("/ws", "https://admin.example/"), &some, false),
            Route::Chat(_)
        ));
        assert!(matches!(
            route(&with_origin("/ws", "https://other.example"), &some, false),
            Route::Refuse(403, _)
        ));
        let any = ["*".to_string()];
        let any = Access {
            origins: &any,
            ..Access::OPEN
        };
        assert!(matches!(
            route(&with_origin("/ws", "null"), &any, false),
            Route::Chat(_)
        ));
        let mut post = with_origin("/message", "http://evil.example");
        post.method = "POST".into();
        post.content_length = Some(10);
        assert!(matches!(route(&post, &open, false), Route::Refuse(403, _)));
    }

    #[test]
    fn tokens_are_not_logged() {
        let r = upgrade("/ws/bob?since=3&token=s3cret&Access_Token=x");
        assert_eq!(
            r.logged_target(),
            "/ws/bob?since=3&token=<redacted>&Access_Token=<redacted>"
        );
        assert_eq!(upgrade("/ws").logged_target(), "/ws");
    }

    #[test]
    fn metrics_route_and_its_key() {
        let mut get = upgrade("/metrics");
        get.upgrade_websocket = false;
        assert_eq!(
            route(&get, &Access::OPEN, false),
            Route::Metrics { authorized: true }
        );
        assert_eq!(
            route(&get, &key("s3cret"), false),
            Route::Metrics { authorized: false }
        );
        get.credential = Some("nope".into());
        assert_eq!(
            route(&get, &key("s3cret"), false),
            Route::Metrics { authorized: false }
        );
        get.credential = Some("s3cret".into());
        assert_eq!(
            route(&get, &key("s3cret"), false),
            Route::Metrics { authorized: true }
        );
        let head = b"GET /metrics HTTP/1.1\r\nAuthorization: Bearer s3cret\r\n\r\n";
        let Head::Complete(req, _) = parse_head(head) else {
            panic!("not parsed");
        };
        assert_eq!(
            route(&req, &key("s3cret"), false),
            Route::Metrics { authorized: true }
        );
        let r = String::from_utf8(refusal(401, "no")).unwrap();
        assert!(r.starts_with("HTTP/1.1 401 Unauthorized\r\n"), "{r}");
        assert!(r.contains("\r\nWWW-Authenticate: Bearer\r\n"), "{r}");
    }

    #[test]
    fn upgrade_accept_key_is_rfc_6455_example() {
        let r = String::from_utf8(upgrade_response(KEY)).unwrap();
        assert!(r.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
    }
}
