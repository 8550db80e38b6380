//! The table of options: each one's name, value name, help, setter and how its value is
//! shown, written once.

use super::{AgentKind, Config, ConfigError, MAX_SECS};
use crate::agent::upstream::Upstream;
use std::time::Duration;

/// One option, written once: `--help`, the environment variable, the parser and the default
/// shown all come from this entry, so they cannot drift apart. The default *value* lives in
/// `Config::default()` alone; `show` renders it.
pub(super) struct Opt {
    /// The flag without `--`; the environment variable is derived from it (`env_name`).
    pub(super) name: &'static str,
    /// Value name in `--help` and in "needs a value" errors; empty for a switch.
    pub(super) value: &'static str,
    /// One line of `--help`.
    pub(super) help: &'static str,
    /// Parses a value into the option's field.
    pub(super) set: fn(&mut Config, &Value<'_>) -> Result<(), ConfigError>,
    /// The field in a form `set` accepts back, so the default that `--help`, the README and
    /// /etc/default/straycat show can be checked by a round trip.
    pub(super) show: fn(&Config) -> String,
}

impl Opt {
    /// `--name VALUE`, or `--name` for a switch: as `--help` and the README write it.
    pub(super) fn flag(&self) -> String {
        if self.value.is_empty() {
            format!("--{}", self.name)
        } else {
            format!("--{} {}", self.name, self.value)
        }
    }

    /// The default as `--help` prints it: an empty value (no API key) reads "none".
    pub(super) fn shown_default(&self) -> String {
        let shown = (self.show)(&Config::default());
        if shown.is_empty() {
            "none".to_string()
        } else {
            shown
        }
    }
}

/// A value given to an option, with where it came from (`--flag` or `STRAYCAT_*`), which
/// every error names so a bad line in an environment file can be found.
pub(super) struct Value<'a> {
    pub(super) text: &'a str,
    pub(super) origin: &'a str,
}

impl Value<'_> {
    pub(super) fn bad(&self, what: &str) -> ConfigError {
        ConfigError(format!(
            "invalid value '{}' for {}: {what}",
            self.text, self.origin
        ))
    }

    pub(super) fn count(&self, min: u64) -> Result<u64, ConfigError> {
        match self.text.trim().parse::<u64>() {
            Ok(n) if n >= min => Ok(n),
            Ok(_) => Err(self.bad(&format!("must be at least {min}"))),
            Err(_) => Err(self.bad("expected a whole number")),
        }
    }

    /// A count that fits the rate limiters (0 turns the limit off).
    pub(super) fn per_minute(&self) -> Result<u32, ConfigError> {
        match u32::try_from(self.count(0)?) {
            Ok(n) if n <= 1_000_000 => Ok(n),
            _ => Err(self.bad("must be at most 1000000")),
        }
    }

    pub(super) fn size(&self, min: u64) -> Result<usize, ConfigError> {
        // Past usize (32-bit boards) a limit is as good as none.
        self.count(min)
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
    }

    // Deadlines are `Instant + Duration`, which panics on overflow: a year is longer than
    // any sensible timeout and far from the limit.
    pub(super) fn secs(&self, min: u64) -> Result<Duration, ConfigError> {
        match self.count(min)? {
            n if n > MAX_SECS => Err(self.bad(&format!("must be at most {MAX_SECS} (a year)"))),
            n => Ok(Duration::from_secs(n)),
        }
    }

    pub(super) fn millis(&self, min: u64) -> Result<Duration, ConfigError> {
        match self.count(min)? {
            n if n > MAX_SECS * 1000 => Err(self.bad("must be at most a year")),
            n => Ok(Duration::from_millis(n)),
        }
    }

    /// Sets an optional text option (empty: unset).
    pub(super) fn optional_into(&self, field: &mut Option<String>) -> Result<(), ConfigError> {
        *field = self.optional();
        Ok(())
    }

    /// An optional text: empty means unset.
    pub(super) fn optional(&self) -> Option<String> {
        let t = self.text.trim();
        (!t.is_empty()).then(|| t.to_string())
    }

    pub(super) fn switch(&self) -> Result<bool, ConfigError> {
        match self.text {
            "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" => Ok(false),
            _ => Err(self.bad("expected true or false")),
        }
    }
}

/// How `show` writes a switch; `Value::switch` reads both words back.
fn on_off(on: bool) -> String {
    if on { "on" } else { "off" }.to_string()
}

/// Every option, in `--help` order (the README table and /etc/default/straycat are checked
/// against it by the tests below).
pub(super) const OPTS: &[Opt] = &[
    Opt {
        name: "listen",
        value: "ADDR",
        help: "address and port to listen on",
        set: |c, v| {
            v.text
                .trim()
                .parse()
                .map(|a| c.listen = a)
                .map_err(|_| v.bad("expected IP:PORT, e.g. 0.0.0.0:1865"))
        },
        show: |c| c.listen.to_string(),
    },
    Opt {
        name: "workers",
        value: "N",
        help: "threads for a blocking agent; children at once for --agent process",
        set: |c, v| v.size(1).map(|n| c.workers = n.min(1024)),
        show: |c| c.workers.to_string(),
    },
    Opt {
        name: "max-queued-turns",
        value: "N",
        help: "turns a user may queue behind the running one; past it: error Busy",
        set: |c, v| v.size(0).map(|n| c.max_queued_turns = n),
        show: |c| c.max_queued_turns.to_string(),
    },
    Opt {
        name: "turn-timeout-secs",
        value: "SECS",
        help: "a turn running longer ends with error Timeout",
        set: |c, v| v.secs(1).map(|d| c.turn_timeout = d),
        show: |c| c.turn_timeout.as_secs().to_string(),
    },
    Opt {
        name: "echo-delay-ms",
        value: "MS",
        help: "pause of the echo agent before each word (simulates a slow model)",
        set: |c, v| v.millis(0).map(|d| c.echo_delay = d),
        show: |c| c.echo_delay.as_millis().to_string(),
    },
    Opt {
        name: "ping-interval-secs",
        value: "SECS",
        help: "ping every open socket this often",
        set: |c, v| v.secs(1).map(|d| c.ping_interval = d),
        show: |c| c.ping_interval.as_secs().to_string(),
    },
    Opt {
        name: "ping-timeout-secs",
        value: "SECS",
        help: "drop a socket silent this long after a ping (close 1011)",
        set: |c, v| v.secs(1).map(|d| c.ping_timeout = d),
        show: |c| c.ping_timeout.as_secs().to_string(),
    },
    Opt {
        name: "max-message-bytes",
        value: "BYTES",
        help: "largest incoming message; larger: close 1009",
        set: |c, v| v.size(16).map(|n| c.max_message_bytes = n),
        show: |c| c.max_message_bytes.to_string(),
    },
    Opt {
        name: "max-connections",
        value: "N",
        help: "connections kept at once; past it: HTTP 503",
        set: |c, v| v.size(1).map(|n| c.max_connections = n),
        show: |c| c.max_connections.to_string(),
    },
    Opt {
        name: "max-buffered-bytes",
        value: "BYTES",
        help: "unsent bytes per connection; past it: close 1008, frames stay held",
        set: |c, v| v.size(1024).map(|n| c.max_buffered_bytes = n),
        show: |c| c.max_buffered_bytes.to_string(),
    },
    Opt {
        name: "max-buffered-bytes-total",
        value: "BYTES",
        help: "unsent bytes of all open connections; past it the largest backlog: close 1008",
        set: |c, v| v.size(1024).map(|n| c.max_buffered_bytes_total = n),
        show: |c| c.max_buffered_bytes_total.to_string(),
    },
    Opt {
        name: "api-key",
        value: "KEY",
        help: "require ?token=KEY on /ws upgrades (else HTTP 403)",
        // An empty value (`STRAYCAT_API_KEY=` in an environment file) means no key.
        set: |c, v| {
            c.api_key = Some(v.text.to_string()).filter(|k| !k.is_empty());
            Ok(())
        },
        show: |c| c.api_key.clone().unwrap_or_default(),
    },
    Opt {
        name: "jwt-secret",
        value: "SECRET",
        help: "accept signed per-user tokens (JWT, HS256) as ?token=; the user is the token's sub",
        set: |c, v| v.optional_into(&mut c.jwt_secret),
        show: |c| c.jwt_secret.clone().unwrap_or_default(),
    },
    Opt {
        name: "allowed-origins",
        value: "LIST",
        help: "browser Origins allowed besides the page's own, comma-separated (*: any; others: 403)",
        set: |c, v| {
            c.allowed_origins = v
                .text
                .split(',')
                .map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase())
                .filter(|o| !o.is_empty())
                .collect();
            Ok(())
        },
        show: |c| c.allowed_origins.join(","),
    },
    Opt {
        name: "max-messages-per-minute",
        value: "N",
        help: "messages a user may send a minute (a minute's worth at once); past it: error RateLimited; 0: no limit",
        set: |c, v| v.per_minute().map(|n| c.max_messages_per_minute = n),
        show: |c| c.max_messages_per_minute.to_string(),
    },
    Opt {
        name: "max-connects-per-minute-per-ip",
        value: "N",
        help: "WebSocket upgrades a client address may ask for a minute; past it: HTTP 429; 0: no limit",
        set: |c, v| v.per_minute().map(|n| c.max_connects_per_minute_per_ip = n),
        show: |c| c.max_connects_per_minute_per_ip.to_string(),
    },
    Opt {
        name: "max-connections-per-ip",
        value: "N",
        help: "connections one client address may have open; past it: HTTP 429; 0: no limit",
        set: |c, v| v.per_minute().map(|n| c.max_connections_per_ip = n),
        show: |c| c.max_connections_per_ip.to_string(),
    },
    Opt {
        name: "tls-cert",
        value: "FILE",
        help: "serve only TLS (https://, wss://) with this PEM certificate chain; with --tls-key",
        set: |c, v| v.optional_into(&mut c.tls_cert),
        show: |c| c.tls_cert.clone().unwrap_or_default(),
    },
    Opt {
        name: "tls-key",
        value: "FILE",
        help: "the PEM private key of --tls-cert (PKCS#8, RSA or EC); SIGHUP re-reads both",
        set: |c, v| v.optional_into(&mut c.tls_key),
        show: |c| c.tls_key.clone().unwrap_or_default(),
    },
    Opt {
        name: "session-ttl-secs",
        value: "SECS",
        help: "drop a session with no socket and no work after this long",
        set: |c, v| v.secs(1).map(|d| c.session_ttl = d),
        show: |c| c.session_ttl.as_secs().to_string(),
    },
    Opt {
        name: "history-turns",
        value: "N",
        help: "conversation turns kept per session and handed to the agent",
        set: |c, v| v.size(0).map(|n| c.history_turns = n),
        show: |c| c.history_turns.to_string(),
    },
    Opt {
        name: "max-held-frames",
        value: "N",
        help: "frames kept per session for delivery and replay",
        set: |c, v| v.size(1).map(|n| c.max_held_frames = n),
        show: |c| c.max_held_frames.to_string(),
    },
    Opt {
        name: "max-held-bytes",
        value: "B",
        help: "bytes of frames kept per session (the newest frame always stays)",
        set: |c, v| v.size(1024).map(|n| c.max_held_bytes = n),
        show: |c| c.max_held_bytes.to_string(),
    },
    Opt {
        name: "max-held-bytes-total",
        value: "B",
        help: "bytes of frames kept by all sessions together; past it the largest give way",
        set: |c, v| v.size(1024).map(|n| c.max_held_bytes_total = n),
        show: |c| c.max_held_bytes_total.to_string(),
    },
    Opt {
        name: "max-history-bytes-total",
        value: "B",
        help: "bytes of history kept by all sessions together; past it the longest forget first",
        set: |c, v| v.size(1024).map(|n| c.max_history_bytes_total = n),
        show: |c| c.max_history_bytes_total.to_string(),
    },
    Opt {
        name: "max-sessions",
        value: "N",
        help: "sessions kept at once; past it the longest-idle detached one goes",
        set: |c, v| v.size(1).map(|n| c.max_sessions = n),
        show: |c| c.max_sessions.to_string(),
    },
    Opt {
        name: "handshake-timeout-secs",
        value: "SECS",
        help: "time a client has to send its upgrade request",
        set: |c, v| v.secs(1).map(|d| c.handshake_timeout = d),
        show: |c| c.handshake_timeout.as_secs().to_string(),
    },
    Opt {
        name: "raw-echo",
        value: "",
        help: "serve /echo, a raw echo for the conformance suite and benchmarks",
        set: |c, v| v.switch().map(|on| c.raw_echo = on),
        show: |c| on_off(c.raw_echo),
    },
    Opt {
        name: "page",
        value: "",
        help: "serve the chat page at / (off: / is 404)",
        set: |c, v| v.switch().map(|on| c.page = on),
        show: |c| on_off(c.page),
    },
    Opt {
        name: "metrics",
        value: "",
        help: "serve GET /metrics, Prometheus text format (off: 404; --api-key: Bearer KEY)",
        set: |c, v| v.switch().map(|on| c.metrics = on),
        show: |c| on_off(c.metrics),
    },
    Opt {
        name: "state-dir",
        value: "DIR",
        help: "keep sessions in DIR across restarts and crashes (made if missing; none: memory only)",
        set: |c, v| v.optional_into(&mut c.state_dir),
        show: |c| c.state_dir.clone().unwrap_or_default(),
    },
    Opt {
        name: "log-level",
        value: "LEVEL",
        help: "error, warn, info, debug, trace or off (RUST_LOG also works)",
        set: |c, v| {
            let level = v.text.trim().to_ascii_lowercase();
            if !matches!(
                level.as_str(),
                "error" | "warn" | "info" | "debug" | "trace" | "off"
            ) {
                return Err(v.bad("expected error, warn, info, debug, trace or off"));
            }
            c.log_level = level;
            Ok(())
        },
        show: |c| c.log_level.clone(),
    },
    Opt {
        name: "agent",
        value: "NAME",
        help: "what answers: echo, openai, process or cat",
        set: |c, v| {
            c.agent = match v.text.trim() {
                "echo" => AgentKind::Echo,
                "openai" => AgentKind::Openai,
                "process" => AgentKind::Process,
                "cat" => AgentKind::Cat,
                _ => return Err(v.bad("expected echo, openai, process or cat")),
            };
            Ok(())
        },
        show: |c| c.agent.name().to_string(),
    },
    Opt {
        name: "openai-url",
        value: "URL",
        help: "openai: the API base, e.g. http://127.0.0.1:8080/v1 (https:// too)",
        set: |c, v| {
            if let Some(url) = v.optional() {
                Upstream::parse(&url, &["http", "https"]).map_err(|why| v.bad(&why))?;
            }
            c.openai_url = v.optional();
            Ok(())
        },
        show: |c| c.openai_url.clone().unwrap_or_default(),
    },
    Opt {
        name: "openai-model",
        value: "NAME",
        help: "openai: the model of each request",
        set: |c, v| v.optional_into(&mut c.openai_model),
        show: |c| c.openai_model.clone().unwrap_or_default(),
    },
    Opt {
        name: "openai-api-key",
        value: "KEY",
        help: "openai: sent as Authorization: Bearer KEY",
        set: |c, v| v.optional_into(&mut c.openai_api_key),
        show: |c| c.openai_api_key.clone().unwrap_or_default(),
    },
    Opt {
        name: "system-prompt",
        value: "TEXT",
        help: "openai: the system message that starts every conversation",
        set: |c, v| v.optional_into(&mut c.system_prompt),
        show: |c| c.system_prompt.clone().unwrap_or_default(),
    },
    Opt {
        name: "openai-max-concurrent",
        value: "N",
        help: "openai: requests in flight at once; more turns wait their turn",
        set: |c, v| v.size(1).map(|n| c.openai_max_concurrent = n),
        show: |c| c.openai_max_concurrent.to_string(),
    },
    Opt {
        name: "process-cmd",
        value: "CMD",
        help: "process: the command run per turn by /bin/sh -c",
        set: |c, v| v.optional_into(&mut c.process_cmd),
        show: |c| c.process_cmd.clone().unwrap_or_default(),
    },
    Opt {
        name: "cat-url",
        value: "URL",
        help: "cat: the Cheshire Cat server, e.g. ws://127.0.0.1:1865",
        set: |c, v| {
            if let Some(url) = v.optional() {
                Upstream::parse(&url, &["ws"]).map_err(|why| v.bad(&why))?;
            }
            c.cat_url = v.optional();
            Ok(())
        },
        show: |c| c.cat_url.clone().unwrap_or_default(),
    },
    Opt {
        name: "cat-token",
        value: "KEY",
        help: "cat: the Cat's token (?token=)",
        set: |c, v| v.optional_into(&mut c.cat_token),
        show: |c| c.cat_token.clone().unwrap_or_default(),
    },
];
