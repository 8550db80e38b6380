//! Command line: `--help`, bad options, options from the environment.

mod common;

use std::process::Command;

use common::*;

fn run(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_straycat"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run straycat")
}

#[test]
fn help_prints_options_and_exits_0() {
    let out = run(&["--help"], &[]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for opt in [
        "--listen",
        "--workers",
        "--echo-delay-ms",
        "--api-key",
        "--raw-echo",
        "STRAYCAT_",
    ] {
        assert!(text.contains(opt), "help mentions {opt}: {text}");
    }
}

#[test]
fn bad_option_prints_one_line_and_exits_2() {
    for (args, env) in [
        (vec!["--no-such-option"], vec![]),
        (vec!["--workers", "many"], vec![]),
        (vec!["--workers"], vec![]),
        (vec!["--listen", "not-an-address"], vec![]),
        (vec!["--max-message-bytes", "-5"], vec![]),
        (vec![], vec![("STRAYCAT_WORKERS", "many")]),
    ] {
        let out = run(&args, &env);
        assert_eq!(out.status.code(), Some(2), "{args:?} {env:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(
            lines.len(),
            1,
            "{args:?} {env:?}: one line on stderr, got {err:?}"
        );
    }
}

#[test]
fn options_come_from_the_environment_too() {
    let server = Server::start_with_env(
        &[],
        &[
            ("STRAYCAT_RAW_ECHO", "1"),
            ("STRAYCAT_MAX_CONNECTIONS", "1"),
        ],
    );
    let mut c =
        try_connect_path(server.addr(), "/echo").expect("/echo enabled by STRAYCAT_RAW_ECHO");
    c.ws.send(tungstenite::Message::text("hi")).unwrap();
    assert_eq!(c.ws.read().unwrap().into_text().unwrap().as_str(), "hi");
    let resp = upgrade_refused(server.addr(), "/ws/second");
    assert_eq!(resp.status, 503, "STRAYCAT_MAX_CONNECTIONS=1: {resp:?}");
}

#[test]
fn log_goes_to_stderr() {
    use std::io::{BufRead, BufReader, Read};
    use std::process::Stdio;
    use std::sync::mpsc::{Sender, channel};

    let mut child = Command::new(env!("CARGO_BIN_EXE_straycat"))
        .args(["--listen", "127.0.0.1:0", "--log-level", "debug"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // One reader per stream reports where the listening line shows up; the wait is bounded.
    fn watch(stream: impl Read + Send + 'static, name: &'static str, tx: Sender<&'static str>) {
        std::thread::spawn(move || {
            let found = BufReader::new(stream)
                .lines()
                .map_while(Result::ok)
                .any(|l| l.contains("listening on "));
            if found {
                let _ = tx.send(name);
            }
        });
    }
    let (tx, rx) = channel();
    watch(child.stderr.take().unwrap(), "stderr", tx.clone());
    watch(child.stdout.take().unwrap(), "stdout", tx);
    let got = rx.recv_timeout(std::time::Duration::from_secs(20));
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        got,
        Ok("stderr"),
        "the log (`listening on` line) goes to stderr"
    );
}

fn project_file(path: &str) -> String {
    let full = format!("{}/{path}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{full}: {e}"))
}

/// What the package test does on a device, here on every build: each `#STRAYCAT_X=value`
/// line of /etc/default/straycat, uncommented, is accepted by the binary itself.
#[test]
fn default_file_values_are_accepted_by_the_binary() {
    let text = project_file("cross/straycat.default");
    let env: Vec<(&str, &str)> = text
        .lines()
        .filter_map(|l| l.strip_prefix('#'))
        .filter(|l| l.starts_with("STRAYCAT_"))
        .filter_map(|l| l.split_once('='))
        .collect();
    assert!(env.len() >= 17, "every option in straycat.default: {env:?}");
    // The environment is read before the arguments, so --version exits 0 only if every
    // variable parsed, and no port is bound.
    let out = run(&["--version"], &env);
    assert_eq!(out.status.code(), Some(0), "{env:?}: {out:?}");
}

/// The README says `straycat --help` prints its Options table: each row's flag, default and
/// variable are on one line of the real output, and the output has no option more.
#[test]
fn help_agrees_with_the_readme_table() {
    let out = run(&["--help"], &[]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let help = String::from_utf8_lossy(&out.stdout);
    let readme = project_file("README.md");
    let section = readme
        .split_once("\n## Options\n")
        .map(|(_, s)| s.split("\n## ").next().unwrap_or_default())
        .expect("README.md has an Options section");
    let rows: Vec<Vec<&str>> = section
        .lines()
        .filter(|l| l.starts_with("| `--"))
        .map(|l| l.split('|').map(|c| c.trim().trim_matches('`')).collect())
        .collect();
    let option_lines: Vec<&str> = help.lines().filter(|l| l.contains("[env: ")).collect();
    assert_eq!(rows.len(), option_lines.len(), "{rows:?}\n{help}");
    for (row, line) in rows.iter().zip(&option_lines) {
        let (flag, env, default) = (row[1], row[2], row[3]);
        assert!(
            line.trim_start().starts_with(&format!("{flag} "))
                && line.ends_with(&format!("[default: {default}] [env: {env}]")),
            "README row {row:?} against help line {line:?}"
        );
    }
}

/// With its stderr gone (the reading end closed), a log line must not kill the thread that
/// writes it: SIGTERM still stops the server.
#[test]
fn sigterm_works_when_stderr_is_gone() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    use std::time::{Duration, Instant};

    let mut child = Command::new(env!("CARGO_BIN_EXE_straycat"))
        .args(["--listen", "127.0.0.1:0", "--log-level", "debug"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    assert!(
        lines
            .by_ref()
            .map_while(Result::ok)
            .any(|l| l.contains("listening on ")),
        "never listened"
    );
    drop(lines);
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let exited = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        exited.is_some_and(|s| s.success()),
        "{exited:?}: SIGTERM ignored"
    );
}
