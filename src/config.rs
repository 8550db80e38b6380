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

/// One option, written once: `--help`, the environment variable, the parser and the default
/// shown all come from this entry, so they cannot drift apart. The default *value* lives in
/// `Config::default()` alone; `show` renders it.
struct Opt {
    /// The flag without `--`; the environment variable is derived from it (`env_name`).
    name: &'static str,
    /// Value name in `--help` and in "needs a value" errors; empty for a switch.
    value: &'static str,
    /// One line of `--help`.
    help: &'static str,
    /// Parses a value into the option's field.
    set: fn(&mut Config, &Value<'_>) -> Result<(), ConfigError>,
    /// The field in a form `set` accepts back, so the default that `--help`, the README and
    /// /etc/default/straycat show can be checked by a round trip.
    show: fn(&Config) -> String,
}

impl Opt {
    /// `--name VALUE`, or `--name` for a switch: as `--help` and the README write it.
    fn flag(&self) -> String {
        if self.value.is_empty() {
            format!("--{}", self.name)
        } else {
            format!("--{} {}", self.name, self.value)
        }
    }

    /// The default as `--help` prints it: an empty value (no API key) reads "none".
    fn shown_default(&self) -> String {
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
struct Value<'a> {
    text: &'a str,
    origin: &'a str,
}

impl Value<'_> {
    fn bad(&self, what: &str) -> ConfigError {
        ConfigError(format!(
            "invalid value '{}' for {}: {what}",
            self.text, self.origin
        ))
    }

    fn count(&self, min: u64) -> Result<u64, ConfigError> {
        match self.text.trim().parse::<u64>() {
            Ok(n) if n >= min => Ok(n),
            Ok(_) => Err(self.bad(&format!("must be at least {min}"))),
            Err(_) => Err(self.bad("expected a whole number")),
        }
    }

    fn size(&self, min: u64) -> Result<usize, ConfigError> {
        // Past usize (32-bit boards) a limit is as good as none.
        self.count(min)
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
    }

    // Deadlines are `Instant + Duration`, which panics on overflow: a year is longer than
    // any sensible timeout and far from the limit.
    fn secs(&self, min: u64) -> Result<Duration, ConfigError> {
        match self.count(min)? {
            n if n > MAX_SECS => Err(self.bad(&format!("must be at most {MAX_SECS} (a year)"))),
            n => Ok(Duration::from_secs(n)),
        }
    }

    fn millis(&self, min: u64) -> Result<Duration, ConfigError> {
        match self.count(min)? {
            n if n > MAX_SECS * 1000 => Err(self.bad("must be at most a year")),
            n => Ok(Duration::from_millis(n)),
        }
    }

    fn switch(&self) -> Result<bool, ConfigError> {
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
const OPTS: &[Opt] = &[
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
        help: "worker threads that run agent turns",
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
    Ok(Command::Run(Box::new(cfg)))
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

    /// A value `opt` accepts and shows back unchanged, other than its default: the tests
    /// move every option off its default with it. A new kind of option may need a candidate.
    fn off_default(opt: &Opt) -> &'static str {
        let default = (opt.show)(&Config::default());
        ["1", "2", "2048", "127.0.0.1:9", "on", "debug"]
            .into_iter()
            .find(|text| {
                let mut cfg = Config::default();
                let value = Value {
                    text,
                    origin: "test",
                };
                *text != default && (opt.set)(&mut cfg, &value).is_ok() && (opt.show)(&cfg) == *text
            })
            .unwrap_or_else(|| {
                panic!(
                    "--{}: no candidate off its default that it shows back",
                    opt.name
                )
            })
    }

    fn set(cfg: &mut Config, opt: &Opt, text: &str) {
        let value = Value {
            text,
            origin: "test",
        };
        if let Err(e) = (opt.set)(cfg, &value) {
            panic!("--{}: {e}", opt.name);
        }
    }

    /// Fails when a setter and its `show` name different fields, or two options share one:
    /// the round trip below could not see that when both fields have the same default.
    #[test]
    fn every_option_sets_and_shows_its_own_field() {
        let default = Config::default();
        for opt in OPTS {
            let mut cfg = Config::default();
            let text = off_default(opt);
            set(&mut cfg, opt, text);
            assert_eq!((opt.show)(&cfg), text, "--{}", opt.name);
            for other in OPTS.iter().filter(|o| o.name != opt.name) {
                assert_eq!(
                    (other.show)(&cfg),
                    (other.show)(&default),
                    "setting --{} changed --{}",
                    opt.name,
                    other.name
                );
            }
        }
    }

    /// The default `--help` shows is the one `Config::default()` holds: every option moved
    /// off its default and set back from what `show` printed gives the default config again.
    #[test]
    fn every_shown_default_sets_the_default_back() {
        let default = Config::default();
        let mut cfg = Config::default();
        for opt in OPTS {
            set(&mut cfg, opt, off_default(opt));
        }
        assert_ne!(format!("{cfg:?}"), format!("{default:?}"));
        for opt in OPTS {
            set(&mut cfg, opt, &(opt.show)(&default));
        }
        assert_eq!(format!("{cfg:?}"), format!("{default:?}"));
    }

    fn project_file(path: &str) -> String {
        let full = format!("{}/{path}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{full}: {e}"))
    }

    /// `/etc/default/straycat` shows every option once, commented out at its default, and
    /// nothing else that looks like a variable.
    #[test]
    fn default_file_shows_every_option_at_its_default() {
        // No key is the default, but an empty line would not show what a key looks like.
        const EXAMPLES: &[(&str, &str)] = &[("STRAYCAT_API_KEY", "change-me")];
        let text = project_file("cross/straycat.default");
        let mut found: Vec<(&str, &str)> = Vec::new();
        for line in text.lines() {
            let assignment = line.strip_prefix('#').unwrap_or(line);
            let Some((var, value)) = assignment.split_once('=') else {
                continue;
            };
            // Prose such as "# One VARIABLE=value per line" has spaces before the '='.
            let is_var = !var.is_empty()
                && var
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
            if !is_var {
                continue;
            }
            assert!(line.starts_with('#'), "set rather than shown: {line}");
            let opt = OPTS.iter().find(|o| env_name(o.name) == var);
            let Some(opt) = opt else {
                panic!("not an option: {line}");
            };
            // The package test starts straycat with every line of the file uncommented.
            set(&mut Config::default(), opt, value);
            found.push((var, value));
        }
        for opt in OPTS {
            let var = env_name(opt.name);
            let values: Vec<&str> = found
                .iter()
                .filter(|(v, _)| *v == var)
                .map(|(_, value)| *value)
                .collect();
            let expected = match EXAMPLES.iter().find(|(v, _)| *v == var) {
                Some((_, example)) => example.to_string(),
                None => (opt.show)(&Config::default()),
            };
            assert_eq!(values, [expected.as_str()], "#{var}= lines");
        }
    }

    /// The README's Options table is the one `--help` prints: one row per option, in the
    /// same order, with its flag, environment variable and default.
    #[test]
    fn readme_table_matches_the_options() {
        let readme = project_file("README.md");
        let Some((_, section)) = readme.split_once("\n## Options\n") else {
            panic!("README.md has no \"## Options\" section");
        };
        let section = section.split("\n## ").next().unwrap_or_default();
        let mut lines = section.lines().filter(|l| l.starts_with('|'));
        assert_eq!(lines.next(), Some("| option | env | default | meaning |"));
        assert_eq!(lines.next(), Some("|---|---|---|---|"));
        let rows: Vec<[String; 3]> = lines
            .map(|line| {
                let cells: Vec<&str> = line.splitn(5, '|').map(str::trim).collect();
                assert_eq!(cells.len(), 5, "not a row of four cells: {line}");
                // Backticks around a default are formatting only.
                [cells[1], cells[2], cells[3].trim_matches('`')].map(str::to_string)
            })
            .collect();
        let expected: Vec<[String; 3]> = OPTS
            .iter()
            .map(|opt| {
                [
                    format!("`{}`", opt.flag()),
                    format!("`{}`", env_name(opt.name)),
                    opt.shown_default(),
                ]
            })
            .collect();
        for (row, want) in rows.iter().zip(&expected) {
            assert_eq!(row, want, "README.md Options row (flag, env, default)");
        }
        assert!(
            rows.len() <= expected.len(),
            "README.md Options rows that are no option: {:?}",
            &rows[expected.len()..]
        );
        assert!(
            rows.len() >= expected.len(),
            "options missing from README.md: {:?}",
            &expected[rows.len()..]
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
