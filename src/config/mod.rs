//! Command-line and environment configuration: every option, its default and its
//! `STRAYCAT_*` variable, parsed without a dependency so the binary stays small.

mod opts;

use opts::{OPTS, Value};
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

/// Everything the server can be told. Defaults are the ones PROTOCOL.md and the README state.
#[derive(Clone, Debug)]
pub struct Config {
    /// Address the listener binds to.
    pub listen: SocketAddr,
    /// Worker threads that run agent turns, so the event loop never waits on an agent.
    pub workers: usize,
    /// Turns a user may have waiting behind the running one before `Busy` is answered.
    pub max_queued_turns: usize,
    /// Longest a turn may run before it ends with a `Timeout` error.
    pub turn_timeout: Duration,
    /// Pause the echo agent makes before each word, to stand in for a slow model.
    pub echo_delay: Duration,
    /// How often an open socket is pinged.
    pub ping_interval: Duration,
    /// How long after a ping a silent socket is kept before it is dropped.
    pub ping_timeout: Duration,
    /// Largest incoming message (and frame); bigger ones close the socket with 1009.
    pub max_message_bytes: usize,
    /// Open connections (handshaking, open or closing) the server keeps at once.
    pub max_connections: usize,
    /// Unsent bytes one connection may hold before it is closed with 1008.
    pub max_buffered_bytes: usize,
    /// Unsent bytes all open connections may hold together: past it the largest backlog is
    /// closed with 1008, so that many slow consumers cannot add up past a small board's
    /// memory. Closing sockets' backlogs are not counted (they go within 5 s).
    pub max_buffered_bytes_total: usize,
    /// Shared secret every `/ws` upgrade must carry as `?token=`; `None` disables auth.
    pub api_key: Option<String>,
    /// The secret of signed per-user tokens (JWT HS256), which `?token=` may carry instead
    /// of the API key; `None`: no tokens.
    pub jwt_secret: Option<String>,
    /// Browser `Origin`s allowed to open sockets and call the API besides the page's own
    /// (lower case, no trailing `/`); `*` allows any.
    pub allowed_origins: Vec<String>,
    /// Messages a user may send a minute (token bucket); 0: no limit.
    pub max_messages_per_minute: u32,
    /// WebSocket upgrades a client address may ask for a minute; 0: no limit.
    pub max_connects_per_minute_per_ip: u32,
    /// Connections a client address may have open at once; 0: no limit.
    pub max_connections_per_ip: u32,
    /// PEM certificate chain: with it (and `tls_key`) the listener serves only TLS.
    pub tls_cert: Option<String>,
    /// PEM private key of `tls_cert` (PKCS#8, PKCS#1 RSA or SEC1 EC).
    pub tls_key: Option<String>,
    /// How long a session with no socket and no work is kept.
    pub session_ttl: Duration,
    /// Conversation turns (a user message and its reply) kept per session for the agent.
    pub history_turns: usize,
    /// Frames with a `seq` a session keeps for delivery and replay.
    pub max_held_frames: usize,
    /// Bytes of encoded frames a session keeps for delivery and replay: with 64 KiB
    /// messages, 256 frames alone could hold 50 MiB per session.
    pub max_held_bytes: usize,
    /// Bytes of held frames across all sessions: past it the sessions holding the most give
    /// up their oldest frames, so that many sessions cannot add up past a small board's memory.
    pub max_held_bytes_total: usize,
    /// Bytes of conversation history across all sessions: past it the sessions with the
    /// longest history forget their oldest turns.
    pub max_history_bytes_total: usize,
    /// Sessions kept at once; past it the longest-idle detached session is dropped.
    pub max_sessions: usize,
    /// Time a client has to finish its HTTP upgrade request.
    pub handshake_timeout: Duration,
    /// Serve the `/echo` endpoint (conformance suite and benchmarks).
    pub raw_echo: bool,
    /// Serve the chat page at `/`.
    pub page: bool,
    /// Serve `GET /metrics` (Prometheus text format).
    pub metrics: bool,
    /// Where sessions are kept across restarts; `None`: in memory only.
    pub state_dir: Option<String>,
    /// Log level name (`error`, `warn`, `info`, `debug`, `trace`, `off`).
    pub log_level: String,
    /// Which agent answers.
    pub agent: AgentKind,
    /// `--agent openai`: the API base, e.g. `http://127.0.0.1:8080/v1`.
    pub openai_url: Option<String>,
    /// `--agent openai`: the `model` of each request.
    pub openai_model: Option<String>,
    /// `--agent openai`: sent as `Authorization: Bearer KEY`; `None`: no header.
    pub openai_api_key: Option<String>,
    /// `--agent openai`: the system message that starts every conversation; `None`: none.
    pub system_prompt: Option<String>,
    /// `--agent openai`: requests in flight to the upstream at once; more turns wait.
    pub openai_max_concurrent: usize,
    /// `--agent process`: the command run per turn by `/bin/sh -c`.
    pub process_cmd: Option<String>,
    /// `--agent cat`: the Cheshire Cat server, e.g. `ws://127.0.0.1:1865`.
    pub cat_url: Option<String>,
    /// `--agent cat`: the Cat's token (`?token=`), if it wants one.
    pub cat_token: Option<String>,
}

/// The agents straycat ships.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentKind {
    /// Streams the message back (tests, demos).
    Echo,
    /// An OpenAI-compatible chat-completions server, streamed.
    Openai,
    /// A local program run per turn.
    Process,
    /// A Cheshire Cat 1.x server upstream.
    Cat,
}

impl AgentKind {
    /// The option's spelling.
    pub fn name(self) -> &'static str {
        match self {
            AgentKind::Echo => "echo",
            AgentKind::Openai => "openai",
            AgentKind::Process => "process",
            AgentKind::Cat => "cat",
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 1865)),
            workers: 2,
            max_queued_turns: 8,
            turn_timeout: Duration::from_secs(120),
            echo_delay: Duration::ZERO,
            ping_interval: Duration::from_secs(20),
            ping_timeout: Duration::from_secs(20),
            max_message_bytes: 64 * 1024,
            max_connections: 1024,
            max_buffered_bytes: 1024 * 1024,
            max_buffered_bytes_total: 32 * 1024 * 1024,
            api_key: None,
            jwt_secret: None,
            allowed_origins: Vec::new(),
            max_messages_per_minute: 30,
            max_connects_per_minute_per_ip: 600,
            max_connections_per_ip: 256,
            tls_cert: None,
            tls_key: None,
            session_ttl: Duration::from_secs(3600),
            history_turns: 20,
            max_held_frames: 256,
            max_held_bytes: 1024 * 1024,
            max_held_bytes_total: 64 * 1024 * 1024,
            max_history_bytes_total: 32 * 1024 * 1024,
            max_sessions: 4096,
            handshake_timeout: Duration::from_secs(10),
            raw_echo: false,
            page: true,
            metrics: true,
            state_dir: None,
            log_level: "info".to_string(),
            agent: AgentKind::Echo,
            openai_url: None,
            openai_model: None,
            openai_api_key: None,
            system_prompt: None,
            openai_max_concurrent: 4,
            process_cmd: None,
            cat_url: None,
            cat_token: None,
        }
    }
}

/// Longest accepted duration option, in seconds (a year).
const MAX_SECS: u64 = 365 * 24 * 3600;

/// What the command line asked for.
#[derive(Debug)]
pub enum Command {
    /// Run the server with this configuration.
    Run(Box<Config>),
    /// Print the help text and exit 0.
    Help,
    /// Print the version and exit 0.
    Version,
    /// `straycat token --user ID --ttl-secs N`: print a token for `user`, signed with the
    /// `--jwt-secret` (or `STRAYCAT_JWT_SECRET`), valid for `ttl_secs`.
    Token {
        /// Whom the token is for.
        user: crate::UserId,
        /// How long it is valid from now.
        ttl_secs: u64,
        /// The secret it is signed with.
        secret: String,
    },
}

/// A bad option or value: printed as one line, exit code 2.
#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// The environment variable that sets option `name`, e.g. `STRAYCAT_MAX_CONNECTIONS`.
pub fn env_name(name: &str) -> String {
    format!("STRAYCAT_{}", name.replace('-', "_").to_ascii_uppercase())
}

/// The `--help` text: every option, its default and its environment variable.
pub fn help_text() -> String {
    let mut out = format!(
        "straycat {} - a small synchronous WebSocket chat server (Cheshire Cat 1.x protocol)\n\n\
         Usage: straycat [OPTIONS]\n\n\
         Every option can also be set by its environment variable; the command line wins.\n\n\
         Options:\n",
        env!("CARGO_PKG_VERSION")
    );
    for opt in OPTS {
        out.push_str(&format!(
            "  {:<30} {} [default: {}] [env: {}]\n",
            opt.flag(),
            opt.help,
            opt.shown_default(),
            env_name(opt.name)
        ));
    }
    out.push_str("  -h, --help                     print this help\n");
    out.push_str("  -V, --version                  print the version\n");
    out.push('\n');
    out.push_str(TOKEN_USAGE);
    out
}

/// Parses the command line (without the program name) over the environment `env`.
///
/// `env` is passed in rather than read here so tests need not touch the process environment.
pub fn parse<I, E>(args: I, env: E) -> Result<Command, ConfigError>
where
    I: IntoIterator<Item = String>,
    E: Fn(&str) -> Option<String>,
{
    let mut args = args.into_iter().peekable();
    if args.peek().is_some_and(|a| a == "token") {
        args.next();
        return parse_token(args, env);
    }
    let mut cfg = Config::default();
    for opt in OPTS {
        let var = env_name(opt.name);
        if let Some(text) = env(&var) {
            (opt.set)(
                &mut cfg,
                &Value {
                    text: &text,
                    origin: &var,
                },
            )?;
        }
    }
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            _ => {}
        }
        let Some(body) = arg.strip_prefix("--") else {
            return Err(ConfigError(format!(
                "unexpected argument '{arg}' (try --help)"
            )));
        };
        let (name, inline) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (body, None),
        };
        let Some(opt) = OPTS.iter().find(|o| o.name == name) else {
            return Err(ConfigError(format!(
                "unknown option '--{name}' (try --help)"
            )));
        };
        let text = if opt.value.is_empty() {
            inline.unwrap_or_else(|| "true".to_string())
        } else {
            match inline.or_else(|| args.next()) {
                Some(v) => v,
                None => {
                    return Err(ConfigError(format!(
                        "option '--{name}' needs a value {}",
                        opt.value
                    )));
                }
            }
        };
        (opt.set)(
            &mut cfg,
            &Value {
                text: &text,
                origin: &format!("--{name}"),
            },
        )?;
    }
    check_agent(&cfg)?;
    check_tls(&cfg)?;
    Ok(Command::Run(Box::new(cfg)))
}

/// The help of `straycat token`.
pub const TOKEN_USAGE: &str = "Usage: straycat token --user ID --ttl-secs N [--jwt-secret SECRET]\n\n\
Prints a token for user ID, valid for N seconds, signed with the --jwt-secret\n\
(or STRAYCAT_JWT_SECRET) the server runs with. A kiosk opens /ws?token=TOKEN.\n";

/// `straycat token …`: its options, and the secret from the command line or `env`.
fn parse_token<I, E>(mut args: I, env: E) -> Result<Command, ConfigError>
where
    I: Iterator<Item = String>,
    E: Fn(&str) -> Option<String>,
{
    let (mut user, mut ttl, mut secret) = (None, None, env(&env_name("jwt-secret")));
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (arg, None),
        };
        if name == "-h" || name == "--help" {
            return Ok(Command::Help);
        }
        let Some(value) = inline.or_else(|| args.next()) else {
            return Err(ConfigError(format!("token: option '{name}' needs a value")));
        };
        match name.as_str() {
            "--user" => match crate::UserId::parse(&value) {
                Some(u) => user = Some(u),
                None => {
                    let rule = crate::http::USER_ID_RULE;
                    return Err(ConfigError(format!(
                        "token: invalid user id '{value}': {rule}"
                    )));
                }
            },
            "--ttl-secs" => {
                let v = Value {
                    text: &value,
                    origin: "--ttl-secs",
                };
                ttl = Some(v.secs(1)?.as_secs());
            }
            "--jwt-secret" => secret = Some(value),
            _ => {
                return Err(ConfigError(format!(
                    "token: unknown option '{name}'\n{TOKEN_USAGE}"
                )));
            }
        }
    }
    let missing = |what: &str| ConfigError(format!("token: {what} is needed\n{TOKEN_USAGE}"));
    Ok(Command::Token {
        user: user.ok_or_else(|| missing("--user"))?,
        ttl_secs: ttl.ok_or_else(|| missing("--ttl-secs"))?,
        secret: secret
            .filter(|s| !s.is_empty())
            .ok_or_else(|| missing("--jwt-secret or STRAYCAT_JWT_SECRET"))?,
    })
}

/// The error for `--tls-cert` without `--tls-key` or the other way round.
pub(crate) const TLS_PAIR: &str =
    "--tls-cert and --tls-key go together: give both (TLS) or neither (plain)";

/// The error for TLS options given to a build without TLS.
#[cfg_attr(feature = "tls", allow(dead_code))]
pub(crate) const NO_TLS: &str =
    "--tls-cert/--tls-key: this straycat was built without TLS (the tls cargo feature)";

/// Both TLS files or neither, and only in a build that has TLS.
fn check_tls(cfg: &Config) -> Result<(), ConfigError> {
    match (&cfg.tls_cert, &cfg.tls_key) {
        (None, None) => Ok(()),
        (Some(_), Some(_)) if cfg!(feature = "tls") => Ok(()),
        (Some(_), Some(_)) => Err(ConfigError(NO_TLS.to_string())),
        _ => Err(ConfigError(TLS_PAIR.to_string())),
    }
}

/// What the chosen agent cannot do without.
fn check_agent(cfg: &Config) -> Result<(), ConfigError> {
    let need = |what: Option<&String>, opt: &str, why: &str| match what {
        Some(_) => Ok(()),
        None => Err(ConfigError(format!(
            "--agent {} needs --{opt} ({why})",
            cfg.agent.name()
        ))),
    };
    match cfg.agent {
        AgentKind::Echo => Ok(()),
        AgentKind::Openai => {
            need(
                cfg.openai_url.as_ref(),
                "openai-url",
                "the API base, e.g. http://127.0.0.1:8080/v1",
            )?;
            need(
                cfg.openai_model.as_ref(),
                "openai-model",
                "the model name; any name for llama.cpp's server",
            )
        }
        AgentKind::Process => need(
            cfg.process_cmd.as_ref(),
            "process-cmd",
            "the command to run per turn",
        ),
        AgentKind::Cat => need(
            cfg.cat_url.as_ref(),
            "cat-url",
            "the Cat's address, e.g. ws://127.0.0.1:1865",
        ),
    }
}

#[cfg(test)]
mod tests;
