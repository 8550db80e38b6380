//! Command-line and environment configuration: every option, its default and its
//! `STRAYCAT_*` variable, parsed without a dependency so the binary stays small.

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
    /// Shared secret every `/ws` upgrade must carry as `?token=`; `None` disables auth.
    pub api_key: Option<String>,
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
    /// Log level name (`error`, `warn`, `info`, `debug`, `trace`, `off`).
    pub log_level: String,
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
            api_key: None,
            session_ttl: Duration::from_secs(3600),
            history_turns: 20,
            max_held_frames: 256,
            max_held_bytes: 1024 * 1024,
            max_held_bytes_total: 64 * 1024 * 1024,
            max_history_bytes_total: 32 * 1024 * 1024,
            max_sessions: 4096,
            handshake_timeout: Duration::from_secs(10),
            raw_echo: false,
            log_level: "info".to_string(),
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

/// One option: its flag, value name (empty for a switch), default shown in help, and help text.
struct Opt {
    name: &'static str,
    value: &'static str,
    default: &'static str,
    help: &'static str,
}

const OPTS: &[Opt] = &[
    Opt {
        name: "listen",
        value: "ADDR",
        default: "0.0.0.0:1865",
        help: "address and port to listen on",
    },
    Opt {
        name: "workers",
        value: "N",
        default: "2",
        help: "worker threads that run agent turns",
    },
    Opt {
        name: "max-queued-turns",
        value: "N",
        default: "8",
        help: "turns a user may queue behind the running one; past it: error Busy",
    },
    Opt {
        name: "turn-timeout-secs",
        value: "SECS",
        default: "120",
        help: "a turn running longer ends with error Timeout",
    },
    Opt {
        name: "echo-delay-ms",
        value: "MS",
        default: "0",
        help: "pause of the echo agent before each word (simulates a slow model)",
    },
    Opt {
        name: "ping-interval-secs",
        value: "SECS",
        default: "20",
        help: "ping every open socket this often",
    },
    Opt {
        name: "ping-timeout-secs",
        value: "SECS",
        default: "20",
        help: "drop a socket silent this long after a ping (close 1011)",
    },
    Opt {
        name: "max-message-bytes",
        value: "BYTES",
        default: "65536",
        help: "largest incoming message; larger: close 1009",
    },
    Opt {
        name: "max-connections",
        value: "N",
        default: "1024",
        help: "connections kept at once; past it: HTTP 503",
    },
    Opt {
        name: "max-buffered-bytes",
        value: "BYTES",
        default: "1048576",
        help: "unsent bytes per connection; past it: close 1008, frames stay held",
    },
    Opt {
        name: "api-key",
        value: "KEY",
        default: "",
        help: "require ?token=KEY on /ws upgrades (else HTTP 403)",
    },
    Opt {
        name: "session-ttl-secs",
        value: "SECS",
        default: "3600",
        help: "drop a session with no socket and no work after this long",
    },
    Opt {
        name: "history-turns",
        value: "N",
        default: "20",
        help: "conversation turns kept per session and handed to the agent",
    },
    Opt {
        name: "max-held-frames",
        value: "N",
        default: "256",
        help: "frames kept per session for delivery and replay",
    },
    Opt {
        name: "max-held-bytes",
        value: "B",
        default: "1048576",
        help: "bytes of frames kept per session (the newest frame always stays)",
    },
    Opt {
        name: "max-held-bytes-total",
        value: "B",
        default: "67108864",
        help: "bytes of frames kept by all sessions together; past it the largest give way",
    },
    Opt {
        name: "max-history-bytes-total",
        value: "B",
        default: "33554432",
        help: "bytes of history kept by all sessions together; past it the longest forget first",
    },
    Opt {
        name: "max-sessions",
        value: "N",
        default: "4096",
        help: "sessions kept at once; past it the longest-idle detached one goes",
    },
    Opt {
        name: "handshake-timeout-secs",
        value: "SECS",
        default: "10",
        help: "time a client has to send its upgrade request",
    },
    Opt {
        name: "raw-echo",
        value: "",
        default: "off",
        help: "serve /echo, a raw echo for the conformance suite and benchmarks",
    },
    Opt {
        name: "log-level",
        value: "LEVEL",
        default: "info",
        help: "error, warn, info, debug, trace or off (RUST_LOG also works)",
    },
];

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
        let flag = if opt.value.is_empty() {
            format!("--{}", opt.name)
        } else {
            format!("--{} {}", opt.name, opt.value)
        };
        let default = if opt.default.is_empty() {
            "none"
        } else {
            opt.default
        };
        out.push_str(&format!(
            "  {flag:<30} {} [default: {default}] [env: {}]\n",
            opt.help,
            env_name(opt.name)
        ));
    }
    out.push_str("  -h, --help                     print this help\n");
    out.push_str("  -V, --version                  print the version\n");
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
    let mut cfg = Config::default();
    for opt in OPTS {
        if let Some(value) = env(&env_name(opt.name)) {
            apply(&mut cfg, opt, &value, &env_name(opt.name).to_string())?;
        }
    }
    let mut args = args.into_iter();
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
        let value = if opt.value.is_empty() {
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
        apply(&mut cfg, opt, &value, &format!("--{name}"))?;
    }
    Ok(Command::Run(Box::new(cfg)))
}

fn apply(cfg: &mut Config, opt: &Opt, value: &str, origin: &str) -> Result<(), ConfigError> {
    let bad = |what: &str| ConfigError(format!("invalid value '{value}' for {origin}: {what}"));
    let count = |min: u64| -> Result<u64, ConfigError> {
        match value.trim().parse::<u64>() {
            Ok(n) if n >= min => Ok(n),
            Ok(_) => Err(bad(&format!("must be at least {min}"))),
            Err(_) => Err(bad("expected a whole number")),
        }
    };
    let size = |min: u64| count(min).map(|n| usize::try_from(n).unwrap_or(usize::MAX));
    // Deadlines are `Instant + Duration`, which panics on overflow: a year is longer than
    // any sensible timeout and far from the limit.
    let secs = |min: u64| match count(min)? {
        n if n > MAX_SECS => Err(bad(&format!("must be at most {MAX_SECS} (a year)"))),
        n => Ok(Duration::from_secs(n)),
    };
    let millis = |min: u64| match count(min)? {
        n if n > MAX_SECS * 1000 => Err(bad("must be at most a year")),
        n => Ok(Duration::from_millis(n)),
    };
    match opt.name {
        "listen" => {
            cfg.listen = value
                .trim()
                .parse()
                .map_err(|_| bad("expected IP:PORT, e.g. 0.0.0.0:1865"))?
        }
        "workers" => cfg.workers = size(1)?.min(1024),
        "max-queued-turns" => cfg.max_queued_turns = size(0)?,
        "turn-timeout-secs" => cfg.turn_timeout = secs(1)?,
        "echo-delay-ms" => cfg.echo_delay = millis(0)?,
        "ping-interval-secs" => cfg.ping_interval = secs(1)?,
        "ping-timeout-secs" => cfg.ping_timeout = secs(1)?,
        "max-message-bytes" => cfg.max_message_bytes = size(16)?,
        "max-connections" => cfg.max_connections = size(1)?,
        "max-buffered-bytes" => cfg.max_buffered_bytes = size(1024)?,
        "api-key" => {
            cfg.api_key = if value.is_empty() {
                None
            } else {
                Some(value.to_string())
            }
        }
        "session-ttl-secs" => cfg.session_ttl = secs(1)?,
        "history-turns" => cfg.history_turns = size(0)?,
        "max-held-frames" => cfg.max_held_frames = size(1)?,
        "max-held-bytes" => cfg.max_held_bytes = size(1024)?,
        "max-held-bytes-total" => cfg.max_held_bytes_total = size(1024)?,
        "max-history-bytes-total" => cfg.max_history_bytes_total = size(1024)?,
        "max-sessions" => cfg.max_sessions = size(1)?,
        "handshake-timeout-secs" => cfg.handshake_timeout = secs(1)?,
        "raw-echo" => {
            cfg.raw_echo = match value {
                "1" | "true" | "yes" | "on" => true,
                "0" | "false" | "no" | "off" => false,
                _ => return Err(bad("expected true or false")),
            }
        }
        "log-level" => {
            let level = value.trim().to_ascii_lowercase();
            if !matches!(
                level.as_str(),
                "error" | "warn" | "info" | "debug" | "trace" | "off"
            ) {
                return Err(bad("expected error, warn, info, debug, trace or off"));
            }
            cfg.log_level = level;
        }
        _ => return Err(bad("unknown option")),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str], env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        match parse(args.iter().map(|s| s.to_string()), |k| {
            env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        })? {
            Command::Run(c) => Ok(*c),
            other => panic!("expected run, got {other:?}"),
        }
    }

    #[test]
    fn defaults_match_the_protocol() {
        let c = run(&[], &[]).unwrap();
        assert_eq!(c.listen.port(), 1865);
        assert_eq!(c.max_message_bytes, 65536);
        assert_eq!(c.max_buffered_bytes, 1 << 20);
        assert_eq!(c.ping_interval, Duration::from_secs(20));
        assert!(!c.raw_echo);
    }

    #[test]
    fn command_line_beats_environment() {
        let c = run(
            &["--workers", "4"],
            &[("STRAYCAT_WORKERS", "3"), ("STRAYCAT_RAW_ECHO", "1")],
        )
        .unwrap();
        assert_eq!(c.workers, 4);
        assert!(c.raw_echo);
        let c = run(&["--max-connections=7", "--raw-echo"], &[]).unwrap();
        assert_eq!(c.max_connections, 7);
        assert!(c.raw_echo);
    }

    #[test]
    fn bad_options_are_one_line_errors() {
        for args in [
            &["--nope"][..],
            &["--workers"],
            &["--workers", "x"],
            &["--workers", "0"],
            &["--listen", "nowhere"],
            &["--turn-timeout-secs", "18446744073709551615"],
            &["--echo-delay-ms", "99999999999999"],
            &["stray"],
        ] {
            let err = run(args, &[]).unwrap_err();
            assert!(!err.0.contains('\n'), "{err}");
        }
        assert!(
            run(&[], &[("STRAYCAT_PING_INTERVAL_SECS", "soon")])
                .unwrap_err()
                .0
                .contains("STRAYCAT_PING_INTERVAL_SECS")
        );
    }

    #[test]
    fn help_lists_every_option_with_env() {
        let help = help_text();
        for opt in OPTS {
            assert!(help.contains(&format!("--{}", opt.name)));
            assert!(help.contains(&env_name(opt.name)));
        }
    }
}
