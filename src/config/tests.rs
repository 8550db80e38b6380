//! Unit tests of the options, and of the files that must agree with them.

use super::opts::Opt;
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
    [
        "1",
        "2",
        "2048",
        "127.0.0.1:9",
        "on",
        "off",
        "debug",
        "cat",
        "http://127.0.0.1:9/v1",
        "ws://127.0.0.1:9",
    ]
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
    const EXAMPLES: &[(&str, &str)] = &[
        ("STRAYCAT_API_KEY", "change-me"),
        ("STRAYCAT_STATE_DIR", "/var/lib/straycat"),
    ];
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

#[test]
fn the_token_subcommand_takes_its_secret_from_the_option_or_the_environment() {
    let token = |args: &[&str], env: Option<&str>| {
        let env = env.map(str::to_string);
        parse(args.iter().map(|s| s.to_string()), |k| {
            (k == "STRAYCAT_JWT_SECRET").then(|| env.clone()).flatten()
        })
    };
    match token(&["token", "--user", "kiosk-1", "--ttl-secs=60"], Some("s")) {
        Ok(Command::Token {
            user,
            ttl_secs,
            secret,
        }) => {
            assert_eq!(user.as_str(), "kiosk-1");
            assert_eq!(ttl_secs, 60);
            assert_eq!(secret, "s");
        }
        other => panic!("{other:?}"),
    }
    let by_flag = token(
        &[
            "token",
            "--jwt-secret",
            "t",
            "--user",
            "a",
            "--ttl-secs",
            "5",
        ],
        Some("s"),
    );
    assert!(matches!(by_flag, Ok(Command::Token { secret, .. }) if secret == "t"));
    for bad in [
        &["token", "--user", "a", "--ttl-secs", "5"][..],
        &[
            "token",
            "--user",
            "a b",
            "--ttl-secs",
            "5",
            "--jwt-secret",
            "s",
        ],
        &[
            "token",
            "--user",
            "a",
            "--ttl-secs",
            "0",
            "--jwt-secret",
            "s",
        ],
        &["token", "--user", "a", "--jwt-secret", "s"],
        &[
            "token",
            "--user",
            "a",
            "--ttl-secs",
            "5",
            "--jwt-secret",
            "s",
            "--what",
            "x",
        ],
        &["token", "--user"],
    ] {
        assert!(token(bad, None).is_err(), "{bad:?}");
    }
}

#[test]
fn origins_and_rate_limits_parse() {
    let c = run(
        &["--allowed-origins", " https://A.example/ ,http://b:8080,"],
        &[("STRAYCAT_MAX_MESSAGES_PER_MINUTE", "0")],
    )
    .unwrap();
    assert_eq!(c.allowed_origins, ["https://a.example", "http://b:8080"]);
    assert_eq!(c.max_messages_per_minute, 0);
    assert!(run(&["--max-connections-per-ip", "-1"], &[]).is_err());
    assert!(run(&["--max-connects-per-minute-per-ip", "99999999999"], &[]).is_err());
}
