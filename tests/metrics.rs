//! `GET /metrics` over real sockets: scrape, act, scrape again, and every metric moved by
//! what happened; the key; `--metrics=0`; the exposition read by a real parser
//! (prometheus_client, `tests/metrics/check_exposition.py`) when it is installed.

mod common;

use common::*;
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// How long a metric may take to move (the journal's thread writes on its own time).
const MOVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Every family a scrape of a server with a state dir shows, by its exposition name.
const FAMILIES: &[&str] = &[
    "straycat_build_info",
    "straycat_connections",
    "straycat_sessions",
    "straycat_turns_started_total",
    "straycat_turns_finished_total",
    "straycat_chat_tokens_relayed_total",
    "straycat_held_frames",
    "straycat_held_bytes",
    "straycat_history_bytes",
    "straycat_sockets_replaced_total",
    "straycat_resumes_total",
    "straycat_resume_gaps_total",
    "straycat_ws_closes_total",
    "straycat_http_refused_total",
    "straycat_agent_first_token_seconds",
    "straycat_agent_turn_duration_seconds",
    "straycat_loop_iteration_seconds",
    "straycat_state_records_written_total",
    "straycat_state_written_bytes_total",
    "straycat_state_syncs_total",
    "straycat_state_write_errors_total",
    "straycat_state_disk_bytes",
    "straycat_state_unsynced_records",
    "straycat_state_degraded",
];

/// One scrape: the text and every sample by its series as written (`name{labels}`).
struct Scrape {
    text: String,
    values: HashMap<String, f64>,
}

impl Scrape {
    fn get(&self, series: &str) -> f64 {
        *self
            .values
            .get(series)
            .unwrap_or_else(|| panic!("no sample {series} in:\n{}", self.text))
    }

    fn has(&self, series: &str) -> bool {
        self.values.contains_key(series)
    }
}

fn metrics_request(server: &Server, auth: Option<&str>) -> HttpResponse {
    let auth = auth
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "GET /metrics HTTP/1.1\r\nHost: {}\r\n{auth}Connection: close\r\n\r\n",
        server.addr()
    );
    http_raw(server.addr(), req.as_bytes())
}

fn parse(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("not a sample: {l}"));
            let value = value
                .parse()
                .unwrap_or_else(|_| panic!("not a number: {l}"));
            (series.to_string(), value)
        })
        .collect()
}

fn scrape_with(server: &Server, auth: Option<&str>) -> Scrape {
    let resp = metrics_request(server, auth);
    assert_eq!(resp.status, 200, "GET /metrics: {resp:?}");
    assert_eq!(resp.header("content-type").as_deref(), Some(CONTENT_TYPE));
    resp.assert_connection_close();
    Scrape {
        values: parse(&resp.body),
        text: resp.body,
    }
}

fn scrape(server: &Server) -> Scrape {
    scrape_with(server, None)
}

/// Scrapes until `ready` holds for the scrape.
fn scrape_until(server: &Server, what: &str, ready: impl Fn(&Scrape) -> bool) -> Scrape {
    poll(what, MOVE_TIMEOUT, || {
        let s = scrape(server);
        ready(&s).then_some(s)
    })
}

/// A state dir of its own for one test, removed at the end.
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Scratch {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "straycat-metrics-{test}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        Scratch(dir)
    }

    fn path(&self) -> String {
        self.0.display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Reads the exposition with prometheus_client's parser and the structural checks of
/// `tests/metrics/check_exposition.py`; skipped (with a note) when python3 or
/// prometheus_client is missing. `tests/all.sh` installs it.
fn check_with_prometheus_client(text: &str, families: &[&str]) {
    let importable = Command::new("python3")
        .args(["-c", "import prometheus_client"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !importable {
        eprintln!("prometheus_client is not importable by python3: exposition check skipped");
        return;
    }
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/metrics/check_exposition.py"
    );
    let mut child = Command::new("python3")
        .arg(script)
        .args(families)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python3");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(text.as_bytes())
        .expect("write the exposition to the checker");
    let out = child.wait_with_output().expect("wait for the checker");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "check_exposition.py: {said}{}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.starts_with("ok: "), "{said}");
}

const TTFT_COUNT_ECHO: &str = r#"straycat_agent_first_token_seconds_count{agent="echo"}"#;
const TURN_COUNT_ECHO: &str = r#"straycat_agent_turn_duration_seconds_count{agent="echo"}"#;
const LOOP_COUNT: &str = "straycat_loop_iteration_seconds_count";

#[test]
fn every_metric_moves_when_its_event_happens() {
    let dir = Scratch::new("moves");
    let server = Server::start(&["--state-dir", &dir.path(), "--max-message-bytes", "1024"]);
    let s0 = scrape(&server);
    let build = s0
        .text
        .lines()
        .find(|l| l.starts_with("straycat_build_info{"))
        .unwrap_or_default();
    assert!(
        build.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION")))
            && build.contains(&format!("target=\"{}-", std::env::consts::ARCH))
            && build.ends_with(" 1"),
        "{build}"
    );
    assert_eq!(s0.get(r#"straycat_connections{stage="open"}"#), 0.0);
    assert_eq!(s0.get(r#"straycat_sessions{state="attached"}"#), 0.0);
    assert_eq!(s0.get("straycat_state_degraded"), 0.0);

    // A turn: three tokens and a chat.
    let mut alice = server.connect("alice", "");
    alice.say("hello metrics world", Some("m1"));
    let (tokens, chat) = alice.recv_until_chat();
    assert_eq!(tokens.len(), 3, "{tokens:?}");
    assert_chat(&chat, "alice", "hello metrics world", Some("m1"));
    let s1 = scrape_until(&server, "the journal to write the turn", |s| {
        s.get("straycat_state_records_written_total")
            > s0.get("straycat_state_records_written_total")
            && s.get("straycat_state_syncs_total") > s0.get("straycat_state_syncs_total")
    });
    assert_eq!(s1.get(r#"straycat_connections{stage="open"}"#), 1.0);
    assert_eq!(s1.get(r#"straycat_sessions{state="attached"}"#), 1.0);
    assert_eq!(
        s1.get("straycat_turns_started_total") - s0.get("straycat_turns_started_total"),
        1.0
    );
    let chats = r#"straycat_turns_finished_total{outcome="chat"}"#;
    assert_eq!(s1.get(chats) - s0.get(chats), 1.0);
    let relayed = "straycat_chat_tokens_relayed_total";
    assert_eq!(s1.get(relayed) - s0.get(relayed), 3.0);
    assert_eq!(s1.get("straycat_held_frames"), 1.0);
    assert!(s1.get("straycat_held_bytes") > 0.0);
    assert!(s1.get("straycat_history_bytes") >= "hello metrics world".len() as f64 * 2.0);
    assert_eq!(s1.get(TTFT_COUNT_ECHO) - s0.get(TTFT_COUNT_ECHO), 1.0);
    assert_eq!(s1.get(TURN_COUNT_ECHO) - s0.get(TURN_COUNT_ECHO), 1.0);
    assert!(s1.get(LOOP_COUNT) > s0.get(LOOP_COUNT));
    assert!(
        s1.get("straycat_state_written_bytes_total") > s0.get("straycat_state_written_bytes_total")
    );
    assert!(s1.get("straycat_state_disk_bytes") > 0.0);
    assert_eq!(s1.get("straycat_state_write_errors_total"), 0.0);

    // A second socket for alice, resuming: the first is replaced with 1000.
    let mut alice2 = server.connect("alice", "?since=0");
    let (_, close) = alice.expect_close();
    assert_eq!(close.map(|c| c.0), Some(1000));
    assert_eq!(seq(&alice2.recv_json()), seq(&chat), "the chat replayed");
    let s2 = scrape(&server);
    let replaced = "straycat_sockets_replaced_total";
    assert_eq!(s2.get(replaced) - s1.get(replaced), 1.0);
    let c1000 = r#"straycat_ws_closes_total{code="1000"}"#;
    assert_eq!(s2.get(c1000) - s1.get(c1000), 1.0);
    let resumes = "straycat_resumes_total";
    assert_eq!(s2.get(resumes) - s1.get(resumes), 1.0);
    let gaps = "straycat_resume_gaps_total";
    assert_eq!(s2.get(gaps), s1.get(gaps), "no gap in that resume");

    // A resume past what bob's new session ever sent: a ResumeGap.
    let mut bob = server.connect("bob", "?since=99");
    assert_error(&bob.recv_json(), "ResumeGap");
    let s3 = scrape(&server);
    assert_eq!(s3.get(gaps) - s2.get(gaps), 1.0);
    assert_eq!(s3.get(resumes) - s2.get(resumes), 1.0);
    assert_eq!(s3.get(r#"straycat_sessions{state="attached"}"#), 2.0);

    // A message over --max-message-bytes: 1009, and bob's session is detached.
    bob.send_text(&"x".repeat(2000));
    let (_, close) = bob.expect_close();
    assert_eq!(close.map(|c| c.0), Some(1009));
    let c1009 = r#"straycat_ws_closes_total{code="1009"}"#;
    let s4 = scrape_until(&server, "bob's session to be detached", |s| {
        s.get(r#"straycat_sessions{state="detached"}"#) == 1.0
    });
    assert_eq!(s4.get(c1009) - s3.get(c1009), 1.0);
    assert_eq!(s4.get(r#"straycat_sessions{state="attached"}"#), 1.0);

    // Refusals, by status.
    assert_eq!(http_get(server.addr(), "/nope").status, 404);
    assert_eq!(upgrade_refused(server.addr(), "/ws/a%20b").status, 400);
    let s5 = scrape(&server);
    for status in ["404", "400"] {
        let series = format!(r#"straycat_http_refused_total{{status="{status}"}}"#);
        assert_eq!(s5.get(&series) - s4.get(&series), 1.0, "{series}");
    }

    // /health: the agent's state, and nothing of the users'.
    let health = server.health();
    assert_eq!(health["agent"]["kind"], "echo", "{health}");
    assert!(health["agent"]["last_error"].is_null(), "{health}");
    let shown = health.to_string();
    assert!(
        !shown.contains("alice") && !shown.contains("metrics world"),
        "{shown}"
    );

    check_with_prometheus_client(&s5.text, FAMILIES);
    alice2.close();
}

#[test]
fn agent_errors_and_timeouts_are_outcomes_with_their_durations() {
    // The process agent: "fail" fails with a line on stderr, "slow" outlives the turn
    // timeout, anything else is answered.
    let cmd = r#"read line; case "$line" in *slow*) sleep 30;; *fail*) echo secret-oops >&2; exit 3;; *) printf 'hi there';; esac"#;
    let server = Server::start(&[
        "--agent",
        "process",
        "--process-cmd",
        cmd,
        "--turn-timeout-secs",
        "1",
    ]);
    let s0 = scrape(&server);
    let outcome = |o: &str| format!(r#"straycat_turns_finished_total{{outcome="{o}"}}"#);
    let turns = r#"straycat_agent_turn_duration_seconds_count{agent="process"}"#;
    let first = r#"straycat_agent_first_token_seconds_count{agent="process"}"#;
    assert!(
        !s0.has(TURN_COUNT_ECHO),
        "the histograms name this agent only"
    );

    let mut carol = server.connect("carol", "");
    carol.say("fail", None);
    assert_error(&carol.recv_json(), "AgentError");
    let s1 = scrape(&server);
    assert_eq!(
        s1.get(&outcome("AgentError")) - s0.get(&outcome("AgentError")),
        1.0
    );
    assert_eq!(s1.get(turns) - s0.get(turns), 1.0);
    let health = server.health();
    assert_eq!(health["agent"]["kind"], "process", "{health}");
    assert_eq!(health["agent"]["last_error"], "AgentError", "{health}");
    assert!(health["agent"]["last_error_at"].is_f64(), "{health}");
    assert!(!health.to_string().contains("secret-oops"), "{health}");

    carol.say("slow", None);
    assert_error(&carol.recv_json(), "Timeout");
    let s2 = scrape(&server);
    assert_eq!(
        s2.get(&outcome("Timeout")) - s1.get(&outcome("Timeout")),
        1.0
    );
    assert_eq!(s2.get(turns) - s1.get(turns), 1.0);
    let slow_enough = r#"straycat_agent_turn_duration_seconds_bucket{agent="process",le="0.5"}"#;
    assert_eq!(s2.get(slow_enough), s1.get(slow_enough), "a 1 s turn");
    assert_eq!(server.health()["agent"]["last_error"], "Timeout");

    carol.say("hello", None);
    let (tokens, chat) = carol.recv_until_chat();
    assert_eq!(chat["text"], "hi there");
    let s3 = scrape(&server);
    assert_eq!(s3.get(&outcome("chat")) - s2.get(&outcome("chat")), 1.0);
    assert_eq!(s3.get(first) - s2.get(first), 1.0);
    let relayed = "straycat_chat_tokens_relayed_total";
    assert_eq!(s3.get(relayed) - s2.get(relayed), tokens.len() as f64);
    assert_eq!(
        s3.get("straycat_turns_started_total") - s0.get("straycat_turns_started_total"),
        3.0
    );
    // No state dir: no state metrics.
    assert!(!s3.text.contains("straycat_state_"), "{}", s3.text);
    let families: Vec<&str> = FAMILIES
        .iter()
        .copied()
        .filter(|f| !f.starts_with("straycat_state_"))
        .collect();
    check_with_prometheus_client(&s3.text, &families);
    carol.close();
}

#[test]
fn with_an_api_key_metrics_want_it_as_a_bearer_token() {
    let server = Server::start(&["--api-key", "s3cret"]);
    for auth in [
        None,
        Some("Bearer nope"),
        Some("Basic czNjcmV0"),
        Some("s3cret"),
    ] {
        let resp = metrics_request(&server, auth);
        assert_eq!(resp.status, 401, "{auth:?}: {resp:?}");
        assert_eq!(
            resp.header("www-authenticate").as_deref(),
            Some("Bearer"),
            "{resp:?}"
        );
        assert!(!resp.body.contains("straycat_"), "{resp:?}");
    }
    let s = scrape_with(&server, Some("Bearer s3cret"));
    assert_eq!(s.get(r#"straycat_http_refused_total{status="401"}"#), 4.0);
    // /health stays open to the load balancer.
    assert_eq!(server.health()["agent"]["kind"], "echo");
}

#[test]
fn metrics_off_is_404() {
    let server = Server::start(&["--metrics=0"]);
    let resp = metrics_request(&server, None);
    assert_eq!(resp.status, 404, "{resp:?}");
    resp.assert_connection_close();
    // Off wins over a missing key: no 401 that would say the endpoint exists.
    let server = Server::start_with_env(&["--api-key", "k"], &[("STRAYCAT_METRICS", "off")]);
    assert_eq!(metrics_request(&server, None).status, 404);
    assert_eq!(metrics_request(&server, Some("Bearer k")).status, 404);
    assert_eq!(server.health()["status"], "ok");
}

#[test]
fn connections_are_counted_by_stage() {
    let server = Server::start(&["--handshake-timeout-secs", "30"]);
    // Half a request head: a connection in its handshake.
    let mut half = tcp(server.addr());
    half.write_all(b"GET /ws/dan HTTP/1.1\r\nHost: x\r\n")
        .expect("write half a head");
    // The scrape's own connection is in its handshake too while it is answered.
    let s = scrape_until(&server, "the half-open connection", |s| {
        s.get(r#"straycat_connections{stage="handshake"}"#) == 2.0
    });
    for stage in ["respond", "linger", "await", "open", "closing"] {
        assert!(
            s.has(&format!(r#"straycat_connections{{stage="{stage}"}}"#)),
            "{stage}"
        );
    }
    drop(half);
    scrape_until(&server, "the handshake connection to go", |s| {
        s.get(r#"straycat_connections{stage="handshake"}"#) == 1.0
    });
}
