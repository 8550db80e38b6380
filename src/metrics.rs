//! `GET /metrics`: the server's counters, gauges and histograms in the Prometheus text
//! exposition format (version 0.0.4), rendered by hand. The loop owns [`Metrics`] and
//! bumps plain integers (one thread, so no atomics); what is a state rather than an event
//! (connections by stage, sessions, held bytes) is looked up only when scraped and comes in
//! as [`Gauges`]. A scrape costs one pass over the connections and one over the sessions,
//! which on a Pi with a thousand of each is well under a millisecond every 5 s.

use serde_json::{Value, json};
use std::collections::HashMap;
use std::fmt::Write;
use std::time::{Duration, Instant};

/// The `Content-Type` of the exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

const NANOS_PER_SEC: u64 = 1_000_000_000;

/// Buckets of the agents' histograms (time to first token, turn duration), in nanoseconds:
/// from a local echo (milliseconds) to the default turn timeout (120 s).
const AGENT_BUCKETS: &[u64] = &[
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    NANOS_PER_SEC,
    2_500_000_000,
    5 * NANOS_PER_SEC,
    10 * NANOS_PER_SEC,
    30 * NANOS_PER_SEC,
    60 * NANOS_PER_SEC,
    120 * NANOS_PER_SEC,
];

/// Buckets of the loop iteration histogram, in nanoseconds: an iteration that moves a few
/// frames takes tens of microseconds; one past 100 ms is a stall every client feels.
const LOOP_BUCKETS: &[u64] = &[
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
];

/// Close codes the server sends (see README, Close codes), shown at 0 from the start so
/// that `rate()` sees the first one.
const CLOSE_CODES: &[u16] = &[1000, 1001, 1002, 1007, 1008, 1009, 1011];

/// HTTP statuses the server refuses with, shown at 0 from the start for the same reason.
const REFUSAL_STATUSES: &[u16] = &[400, 401, 403, 404, 405, 411, 413, 426, 429, 503];

/// The start of every `ResumeGap` error frame: `NoteFrame`'s fields are serialized in
/// declaration order, so the name is always at this place (a unit test checks it against
/// the encoder). A prefix, so that a chat reply quoting it does not count.
const RESUME_GAP_PREFIX: &str = r#"{"type":"error","name":"ResumeGap""#;

/// The start of every `RateLimited` error frame (the same serialization as above).
const RATE_LIMITED_PREFIX: &str = r#"{"type":"error","name":"RateLimited""#;

/// How a turn ended: its final frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A `chat` reply.
    Chat,
    /// An `AgentError` (the agent failed, or its turn was cancelled).
    AgentError,
    /// A `Timeout` (past `--turn-timeout-secs`).
    Timeout,
}

impl Outcome {
    const ALL: [Outcome; 3] = [Outcome::Chat, Outcome::AgentError, Outcome::Timeout];

    /// The `outcome` label: `chat`, or the error frame's name.
    fn label(self) -> &'static str {
        match self {
            Outcome::Chat => "chat",
            Outcome::AgentError => "AgentError",
            Outcome::Timeout => "Timeout",
        }
    }
}

/// The `agent` label of the agents' histograms: one of straycat's own agents by its
/// name, `threads` for a blocking agent on the worker pool, `polled` for an embedder's
/// polled agent (its own name could be anything, and a label set is better kept fixed).
pub fn agent_kind(threads: bool, name: &str) -> &'static str {
    if threads {
        return "threads";
    }
    match name {
        "echo" => "echo",
        "openai" => "openai",
        "process" => "process",
        "cat" => "cat",
        _ => "polled",
    }
}

/// A histogram of durations: counts per bucket (not cumulative; the renderer adds them
/// up) and the sum, in nanoseconds.
#[derive(Clone, Debug)]
pub struct Histogram {
    /// Upper bounds in nanoseconds, ascending; a last bucket (`+Inf`) follows.
    bounds: &'static [u64],
    counts: Vec<u64>,
    sum_ns: u64,
}

impl Histogram {
    fn new(bounds: &'static [u64]) -> Histogram {
        Histogram {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum_ns: 0,
        }
    }

    /// Counts one duration.
    pub fn observe(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        // `le` is inclusive: a value equal to a bound belongs to that bucket.
        let i = self.bounds.partition_point(|&b| b < ns);
        self.counts[i] += 1;
        self.sum_ns = self.sum_ns.saturating_add(ns);
    }

    /// Durations counted (the renderer adds them up as it goes).
    #[cfg(test)]
    fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// A turn that is running: when it started, and whether its first token came.
#[derive(Clone, Copy, Debug)]
struct LiveTurn {
    started: Instant,
    first_token: bool,
}

/// Counters keyed by a small number (a close code, an HTTP status), in first-seen order.
#[derive(Clone, Debug)]
struct Keyed(Vec<(u16, u64)>);

impl Keyed {
    fn new(known: &[u16]) -> Keyed {
        Keyed(known.iter().map(|&k| (k, 0)).collect())
    }

    /// The keys come from the server's own code (never from a client), so the list stays
    /// as short as the set of statuses and codes it sends.
    fn bump(&mut self, key: u16) {
        match self.0.iter_mut().find(|(k, _)| *k == key) {
            Some((_, n)) => *n += 1,
            None => self.0.push((key, 1)),
        }
    }
}

/// What the loop counts for `/metrics`.
#[derive(Debug)]
pub struct Metrics {
    agent: &'static str,
    turns_started: u64,
    /// By [`Outcome::ALL`]'s order.
    turns_finished: [u64; 3],
    chat_tokens: u64,
    replaced: u64,
    resumes: u64,
    resume_gaps: u64,
    /// Messages refused by `--max-messages-per-minute`.
    rate_limited: u64,
    closes: Keyed,
    /// Of the 1008 closes, those of `--max-buffered-bytes-total`.
    unsent_budget_closes: u64,
    refused: Keyed,
    first_token: Histogram,
    turn_duration: Histogram,
    loop_iteration: Histogram,
    /// Running turns by turn id (unique for the server's life). An entry leaves when its
    /// turn ends, so the map holds at most one turn per session; an event for a turn not
    /// in it (a result that came after its timeout) is not counted twice.
    live: HashMap<u64, LiveTurn>,
    /// The last turn that did not end with a chat, and when (Unix seconds).
    last_error: Option<(Outcome, f64)>,
}

/// What a scrape looks up rather than counts: the state of the server at that moment.
#[derive(Clone, Debug, Default)]
pub struct Gauges {
    /// Connections by stage (`handshake`, `open`, …), every stage listed.
    pub connections: Vec<(String, u64)>,
    /// Sessions with a socket attached.
    pub sessions_attached: u64,
    /// Sessions without one.
    pub sessions_detached: u64,
    /// Frames held by all sessions for delivery and replay.
    pub held_frames: u64,
    /// Bytes of those frames.
    pub held_bytes: u64,
    /// Bytes of conversation history of all sessions.
    pub history_bytes: u64,
    /// Unsent bytes of open sockets (what `--max-buffered-bytes-total` bounds).
    pub unsent_open: u64,
    /// Unsent bytes of closing sockets.
    pub unsent_closing: u64,
    /// The state dir's counters, with `--state-dir`.
    pub state: Option<StateGauges>,
}

/// The state dir's counters (the journal's thread keeps them; `/health` shows them too).
#[derive(Clone, Copy, Debug, Default)]
pub struct StateGauges {
    /// Records written to segment files.
    pub records_written: u64,
    /// Bytes written to segment files.
    pub bytes_written: u64,
    /// `fdatasync` calls.
    pub syncs: u64,
    /// Failed writes and syncs.
    pub write_errors: u64,
    /// Bytes of every segment file.
    pub disk_bytes: u64,
    /// Records handed to the journal and not yet durable.
    pub unsynced_records: u64,
    /// Writes are failing; the server serves from memory.
    pub degraded: bool,
}

impl Metrics {
    /// Nothing counted yet; `agent` is [`agent_kind`]'s label.
    pub fn new(agent: &'static str) -> Metrics {
        Metrics {
            agent,
            turns_started: 0,
            turns_finished: [0; 3],
            chat_tokens: 0,
            replaced: 0,
            resumes: 0,
            resume_gaps: 0,
            rate_limited: 0,
            closes: Keyed::new(CLOSE_CODES),
            unsent_budget_closes: 0,
            refused: Keyed::new(REFUSAL_STATUSES),
            first_token: Histogram::new(AGENT_BUCKETS),
            turn_duration: Histogram::new(AGENT_BUCKETS),
            loop_iteration: Histogram::new(LOOP_BUCKETS),
            live: HashMap::new(),
            last_error: None,
        }
    }

    /// The session table started turn `turn_id` (handed to the agent) at `at`.
    pub fn turn_started(&mut self, turn_id: u64, at: Instant) {
        self.turns_started += 1;
        self.live.insert(
            turn_id,
            LiveTurn {
                started: at,
                first_token: false,
            },
        );
    }

    /// The agent streamed a token for `turn_id`: the first one sets its time to first token.
    pub fn token(&mut self, turn_id: u64, at: Instant) {
        if let Some(turn) = self.live.get_mut(&turn_id)
            && !turn.first_token
        {
            turn.first_token = true;
            self.first_token
                .observe(at.saturating_duration_since(turn.started));
        }
    }

    /// Turn `turn_id` ended with `outcome` at `at` (`unix`: the same instant in Unix
    /// seconds). A turn that already ended is not counted again.
    pub fn turn_ended(&mut self, turn_id: u64, outcome: Outcome, at: Instant, unix: f64) {
        let Some(turn) = self.live.remove(&turn_id) else {
            return;
        };
        self.turn_duration
            .observe(at.saturating_duration_since(turn.started));
        if let Some(i) = Outcome::ALL.iter().position(|o| *o == outcome) {
            self.turns_finished[i] += 1;
        }
        if outcome != Outcome::Chat {
            self.last_error = Some((outcome, unix));
        }
    }

    /// Shutdown cancels every turn: their ends are not outcomes worth counting.
    pub fn forget_turns(&mut self) {
        self.live.clear();
    }

    /// A frame went to a client (socket or HTTP answer); `seq` is `None` for a
    /// `chat_token` preview.
    pub fn frame_sent(&mut self, seq: Option<u64>, text: &str) {
        if seq.is_none() {
            self.chat_tokens += 1;
        } else if text.starts_with(RESUME_GAP_PREFIX) {
            self.resume_gaps += 1;
        } else if text.starts_with(RATE_LIMITED_PREFIX) {
            self.rate_limited += 1;
        }
    }

    /// A newer socket took over a session; its old one is closed with 1000.
    pub fn replaced(&mut self) {
        self.replaced += 1;
    }

    /// A socket attached with `?since=N`.
    pub fn resumed(&mut self) {
        self.resumes += 1;
    }

    /// The server started a close with `code`.
    pub fn closed(&mut self, code: u16) {
        self.closes.bump(code);
    }

    /// The largest backlog was closed (1008, counted by [`Metrics::closed`] as well) because
    /// all sockets together held more than `--max-buffered-bytes-total`.
    pub fn unsent_budget_closed(&mut self) {
        self.unsent_budget_closes += 1;
    }

    /// A request was answered with HTTP error `status` instead of served or upgraded.
    pub fn refused(&mut self, status: u16) {
        self.refused.bump(status);
    }

    /// One loop iteration took `d`, from the poll's return to its end.
    pub fn iteration(&mut self, d: Duration) {
        self.loop_iteration.observe(d);
    }

    /// The agent's part of `/health`: its kind, the turns it runs, the last turn that
    /// failed. The error's description is not here: it may quote the upstream's or the
    /// program's output, and that may quote the user; it is in the log.
    pub fn agent_health(&self) -> Value {
        let (last_error, last_error_at) = match self.last_error {
            Some((outcome, at)) => (json!(outcome.label()), json!(at)),
            None => (Value::Null, Value::Null),
        };
        json!({
            "kind": self.agent,
            "running_turns": self.live.len(),
            "last_error": last_error,
            "last_error_at": last_error_at,
        })
    }

    /// The exposition: every metric with its HELP and TYPE lines.
    pub fn render(&self, g: &Gauges) -> String {
        let mut out = Out(String::with_capacity(8 * 1024));
        let target = format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS);
        out.head(
            "straycat_build_info",
            "gauge",
            "The running build: its version and the machine it was built for; always 1.",
        );
        out.sample(
            "straycat_build_info",
            &[("version", env!("CARGO_PKG_VERSION")), ("target", &target)],
            1,
        );
        out.head(
            "straycat_connections",
            "gauge",
            "Connections by stage (handshaking, answering, open, closing, ...).",
        );
        for (stage, n) in &g.connections {
            out.sample("straycat_connections", &[("stage", stage)], *n);
        }
        out.head(
            "straycat_sessions",
            "gauge",
            "Sessions by state: attached to a socket or detached (waiting for one).",
        );
        out.sample(
            "straycat_sessions",
            &[("state", "attached")],
            g.sessions_attached,
        );
        out.sample(
            "straycat_sessions",
            &[("state", "detached")],
            g.sessions_detached,
        );
        out.counter(
            "straycat_turns_started_total",
            "Turns handed to the agent.",
            self.turns_started,
        );
        out.head(
            "straycat_turns_finished_total",
            "counter",
            "Turns ended, by outcome: chat, or the name of the error frame that ended them.",
        );
        for (outcome, n) in Outcome::ALL.iter().zip(self.turns_finished) {
            let labels = [("outcome", outcome.label())];
            out.sample("straycat_turns_finished_total", &labels, n);
        }
        out.counter(
            "straycat_chat_tokens_relayed_total",
            "chat_token previews written to a socket.",
            self.chat_tokens,
        );
        out.gauge(
            "straycat_held_frames",
            "Frames the sessions hold for delivery and replay.",
            g.held_frames,
        );
        out.gauge(
            "straycat_held_bytes",
            "Bytes of the frames the sessions hold.",
            g.held_bytes,
        );
        out.gauge(
            "straycat_history_bytes",
            "Bytes of the conversation history the sessions keep.",
            g.history_bytes,
        );
        out.head(
            "straycat_unsent_bytes",
            "gauge",
            "Bytes of frames queued to sockets that the kernel has not taken, by stage (open ones count against --max-buffered-bytes-total).",
        );
        out.sample("straycat_unsent_bytes", &[("stage", "open")], g.unsent_open);
        out.sample(
            "straycat_unsent_bytes",
            &[("stage", "closing")],
            g.unsent_closing,
        );
        out.counter(
            "straycat_sockets_replaced_total",
            "Sockets closed with 1000 replaced: a newer socket took over their session.",
            self.replaced,
        );
        out.counter(
            "straycat_resumes_total",
            "Sockets that attached with ?since=N.",
            self.resumes,
        );
        out.counter(
            "straycat_resume_gaps_total",
            "ResumeGap error frames sent: frames a client asked for were no longer held.",
            self.resume_gaps,
        );
        out.counter(
            "straycat_rate_limited_messages_total",
            "Messages not run because their user was past --max-messages-per-minute.",
            self.rate_limited,
        );
        out.head(
            "straycat_ws_closes_total",
            "counter",
            "WebSocket closes the server started, by close code.",
        );
        for (code, n) in &self.closes.0 {
            let code = code.to_string();
            out.sample("straycat_ws_closes_total", &[("code", &code)], *n);
        }
        out.counter(
            "straycat_unsent_budget_closes_total",
            "Sockets closed with 1008 because all together held more unsent bytes than --max-buffered-bytes-total (the largest first).",
            self.unsent_budget_closes,
        );
        out.head(
            "straycat_http_refused_total",
            "counter",
            "Requests answered with an HTTP error status instead of served or upgraded.",
        );
        for (status, n) in &self.refused.0 {
            let status = status.to_string();
            out.sample("straycat_http_refused_total", &[("status", &status)], *n);
        }
        out.histogram(
            "straycat_agent_first_token_seconds",
            "Time from a turn's start to its first chat_token.",
            ("agent", self.agent),
            &self.first_token,
        );
        out.histogram(
            "straycat_agent_turn_duration_seconds",
            "Time from a turn's start to its end (chat, AgentError or Timeout).",
            ("agent", self.agent),
            &self.turn_duration,
        );
        out.histogram(
            "straycat_loop_iteration_seconds",
            "Time of one event loop iteration, from the poll's return to its end.",
            ("", ""),
            &self.loop_iteration,
        );
        if let Some(s) = &g.state {
            out.counter(
                "straycat_state_records_written_total",
                "State dir: records written to the journal.",
                s.records_written,
            );
            out.counter(
                "straycat_state_written_bytes_total",
                "State dir: bytes written to the journal.",
                s.bytes_written,
            );
            out.counter(
                "straycat_state_syncs_total",
                "State dir: fdatasync calls.",
                s.syncs,
            );
            out.counter(
                "straycat_state_write_errors_total",
                "State dir: failed writes and syncs.",
                s.write_errors,
            );
            out.gauge(
                "straycat_state_disk_bytes",
                "State dir: bytes of its segment files.",
                s.disk_bytes,
            );
            out.gauge(
                "straycat_state_unsynced_records",
                "State dir: changes handed to the journal and not yet durable.",
                s.unsynced_records,
            );
            out.gauge(
                "straycat_state_degraded",
                "State dir: 1 while its writes fail (the server serves from memory).",
                u64::from(s.degraded),
            );
        }
        out.0
    }
}

/// The exposition being written. Writing to a `String` cannot fail, hence the ignored
/// `fmt::Result`s.
struct Out(String);

impl Out {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let help = help.replace('\\', r"\\").replace('\n', r"\n");
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.0.push_str(name);
        self.labels(labels);
        let _ = writeln!(self.0, " {value}");
    }

    fn labels(&mut self, labels: &[(&str, &str)]) {
        let mut labels = labels.iter().filter(|(k, _)| !k.is_empty()).peekable();
        if labels.peek().is_none() {
            return;
        }
        self.0.push('{');
        for (i, (k, v)) in labels.enumerate() {
            if i > 0 {
                self.0.push(',');
            }
            let v = v
                .replace('\\', r"\\")
                .replace('"', "\\\"")
                .replace('\n', r"\n");
            let _ = write!(self.0, "{k}=\"{v}\"");
        }
        self.0.push('}');
    }

    fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.head(name, "counter", help);
        self.sample(name, &[], value);
    }

    fn gauge(&mut self, name: &str, help: &str, value: u64) {
        self.head(name, "gauge", help);
        self.sample(name, &[], value);
    }

    /// `label` is one `(name, value)` pair added to every sample; an empty name adds none.
    fn histogram(&mut self, name: &str, help: &str, label: (&str, &str), h: &Histogram) {
        self.head(name, "histogram", help);
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0;
        for (i, n) in h.counts.iter().enumerate() {
            cumulative += n;
            let le = match h.bounds.get(i) {
                Some(&ns) => seconds(ns),
                None => "+Inf".to_string(),
            };
            self.sample(&bucket, &[label, ("le", &le)], cumulative);
        }
        self.sample(&format!("{name}_sum"), &[label], seconds(h.sum_ns));
        self.sample(&format!("{name}_count"), &[label], cumulative);
    }
}

/// Nanoseconds as decimal seconds, exactly (no float rounding: `0.1`, not
/// `0.10000000000000001`), so bucket bounds read the same on every scrape.
fn seconds(ns: u64) -> String {
    let (whole, frac) = (ns / NANOS_PER_SEC, ns % NANOS_PER_SEC);
    if frac == 0 {
        return whole.to_string();
    }
    let frac = format!("{frac:09}");
    format!("{whole}.{}", frac.trim_end_matches('0'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ErrorName, Held, UserId, encode_held};

    fn gauges() -> Gauges {
        Gauges {
            connections: vec![("handshake".into(), 1), ("open".into(), 2)],
            sessions_attached: 2,
            sessions_detached: 3,
            held_frames: 7,
            held_bytes: 700,
            history_bytes: 300,
            unsent_open: 4096,
            unsent_closing: 61,
            state: None,
        }
    }

    /// The value of the sample written exactly `series` (name and labels).
    fn value(text: &str, series: &str) -> Option<String> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| l.rsplit_once(' ').filter(|(s, _)| *s == series))
            .map(|(_, v)| v.to_string())
    }

    #[test]
    fn seconds_are_exact_decimals() {
        assert_eq!(seconds(0), "0");
        assert_eq!(seconds(10_000), "0.00001");
        assert_eq!(seconds(100_000_000), "0.1");
        assert_eq!(seconds(2_500_000_000), "2.5");
        assert_eq!(seconds(120 * NANOS_PER_SEC), "120");
        assert_eq!(seconds(1_000_000_001), "1.000000001");
    }

    #[test]
    fn every_sample_follows_its_help_and_type() {
        let m = Metrics::new("echo");
        let mut g = gauges();
        g.state = Some(StateGauges::default());
        let text = m.render(&g);
        assert!(text.ends_with('\n'));
        let mut declared: Vec<(String, String)> = Vec::new();
        let mut lines = text.lines().peekable();
        while let Some(line) = lines.next() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap_or_default();
                let ty = lines.next().unwrap_or_default();
                let kind = ty
                    .strip_prefix(&format!("# TYPE {name} "))
                    .unwrap_or_else(|| panic!("no TYPE after HELP of {name}: {ty}"));
                assert!(declared.iter().all(|(n, _)| n != name), "{name} twice");
                declared.push((name.to_string(), kind.to_string()));
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("name value");
            let name = series.split('{').next().unwrap_or_default();
            let (family, kind) = declared.last().expect("a sample before any TYPE");
            let ok = match kind.as_str() {
                "histogram" => [
                    format!("{family}_bucket"),
                    format!("{family}_sum"),
                    format!("{family}_count"),
                ]
                .contains(&name.to_string()),
                _ => name == family,
            };
            assert!(ok, "{name} under {family}");
            assert!(value.parse::<f64>().is_ok(), "{line}");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
                "{name}"
            );
            if kind == "counter" {
                assert!(family.ends_with("_total"), "{family}");
            }
        }
        for (name, kind) in [
            ("straycat_build_info", "gauge"),
            ("straycat_connections", "gauge"),
            ("straycat_turns_finished_total", "counter"),
            ("straycat_agent_first_token_seconds", "histogram"),
            ("straycat_loop_iteration_seconds", "histogram"),
            ("straycat_state_syncs_total", "counter"),
        ] {
            assert!(
                declared.iter().any(|(n, k)| n == name && k == kind),
                "{name} {kind}"
            );
        }
    }

    #[test]
    fn gauges_and_build_info_are_shown() {
        let text = Metrics::new("openai").render(&gauges());
        assert_eq!(
            value(&text, r#"straycat_connections{stage="open"}"#).as_deref(),
            Some("2")
        );
        assert_eq!(
            value(&text, r#"straycat_sessions{state="detached"}"#).as_deref(),
            Some("3")
        );
        assert_eq!(value(&text, "straycat_held_bytes").as_deref(), Some("700"));
        assert_eq!(
            value(&text, r#"straycat_unsent_bytes{stage="closing"}"#).as_deref(),
            Some("61")
        );
        let build = text
            .lines()
            .find(|l| l.starts_with("straycat_build_info{"))
            .unwrap_or_default();
        assert!(
            build.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))),
            "{build}"
        );
        assert!(build.contains(std::env::consts::ARCH), "{build}");
        assert!(build.ends_with(" 1"), "{build}");
        // No state dir: no state metrics.
        assert!(!text.contains("straycat_state_"));
        assert!(text.contains(r#"straycat_ws_closes_total{code="1011"} 0"#));
        assert!(text.contains(r#"straycat_http_refused_total{status="401"} 0"#));
    }

    #[test]
    fn turns_count_once_with_their_times() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut m = Metrics::new("echo");
        m.turn_started(1, t0);
        m.token(1, t0 + ms(20));
        m.token(1, t0 + ms(900)); // not the first
        m.turn_ended(1, Outcome::Chat, t0 + ms(1500), 100.0);
        m.turn_ended(1, Outcome::AgentError, t0 + ms(1600), 101.0); // stale
        m.turn_started(2, t0);
        m.turn_ended(2, Outcome::Timeout, t0 + ms(120_000), 102.5);
        m.token(3, t0); // a turn never started
        assert_eq!(m.first_token.count(), 1);
        assert_eq!(m.turn_duration.count(), 2);
        let text = m.render(&gauges());
        let v = |s: &str| value(&text, s);
        assert_eq!(v("straycat_turns_started_total").as_deref(), Some("2"));
        assert_eq!(
            v(r#"straycat_turns_finished_total{outcome="chat"}"#).as_deref(),
            Some("1")
        );
        assert_eq!(
            v(r#"straycat_turns_finished_total{outcome="AgentError"}"#).as_deref(),
            Some("0")
        );
        assert_eq!(
            v(r#"straycat_turns_finished_total{outcome="Timeout"}"#).as_deref(),
            Some("1")
        );
        let first = "straycat_agent_first_token_seconds";
        assert_eq!(
            v(&format!(r#"{first}_bucket{{agent="echo",le="0.01"}}"#)).as_deref(),
            Some("0")
        );
        assert_eq!(
            v(&format!(r#"{first}_bucket{{agent="echo",le="0.025"}}"#)).as_deref(),
            Some("1")
        );
        assert_eq!(
            v(&format!(r#"{first}_sum{{agent="echo"}}"#)).as_deref(),
            Some("0.02")
        );
        let turn = "straycat_agent_turn_duration_seconds";
        // 120 s is on the last bound: `le` is inclusive.
        assert_eq!(
            v(&format!(r#"{turn}_bucket{{agent="echo",le="60"}}"#)).as_deref(),
            Some("1")
        );
        assert_eq!(
            v(&format!(r#"{turn}_bucket{{agent="echo",le="120"}}"#)).as_deref(),
            Some("2")
        );
        assert_eq!(
            v(&format!(r#"{turn}_bucket{{agent="echo",le="+Inf"}}"#)).as_deref(),
            Some("2")
        );
        assert_eq!(
            v(&format!(r#"{turn}_count{{agent="echo"}}"#)).as_deref(),
            Some("2")
        );
        assert_eq!(
            v(&format!(r#"{turn}_sum{{agent="echo"}}"#)).as_deref(),
            Some("121.5")
        );
        let health = m.agent_health();
        assert_eq!(health["kind"], "echo");
        assert_eq!(health["last_error"], "Timeout");
        assert_eq!(health["last_error_at"], 102.5);
        assert_eq!(health["running_turns"], 0);
    }

    #[test]
    fn loop_iterations_fill_their_buckets() {
        let mut m = Metrics::new("echo");
        m.iteration(Duration::from_micros(5));
        m.iteration(Duration::from_millis(300));
        let text = m.render(&gauges());
        let name = "straycat_loop_iteration_seconds";
        assert_eq!(
            value(&text, &format!(r#"{name}_bucket{{le="0.00001"}}"#)).as_deref(),
            Some("1")
        );
        assert_eq!(
            value(&text, &format!(r#"{name}_bucket{{le="0.1"}}"#)).as_deref(),
            Some("1")
        );
        assert_eq!(
            value(&text, &format!(r#"{name}_bucket{{le="+Inf"}}"#)).as_deref(),
            Some("2")
        );
        assert_eq!(value(&text, &format!("{name}_count")).as_deref(), Some("2"));
    }

    #[test]
    fn resume_gaps_are_told_by_the_frame_prefix() {
        let user = UserId::default_user();
        let gap = Held::Error(ErrorName::ResumeGap, "frames 1 to 2 are gone".into());
        let busy = Held::Error(ErrorName::Busy, "ResumeGap".into());
        let chat = Held::Chat {
            text: RESUME_GAP_PREFIX.into(),
            input: RESUME_GAP_PREFIX.into(),
        };
        let mut m = Metrics::new("echo");
        m.frame_sent(Some(3), &encode_held(&gap, &user, 3, Some("c-1"), 1.0));
        m.frame_sent(Some(4), &encode_held(&busy, &user, 4, None, 1.0));
        m.frame_sent(Some(5), &encode_held(&chat, &user, 5, None, 1.0));
        m.frame_sent(None, r#"{"type":"chat_token","content":"x"}"#);
        assert_eq!(m.resume_gaps, 1);
        assert_eq!(m.chat_tokens, 1);
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        let mut out = Out(String::new());
        out.head("x", "gauge", "a \\ b\nc");
        out.sample("x", &[("k", "q\"\\\n")], 1);
        assert_eq!(
            out.0,
            "# HELP x a \\\\ b\\nc\n# TYPE x gauge\nx{k=\"q\\\"\\\\\\n\"} 1\n"
        );
    }

    #[test]
    fn keyed_counters_start_at_zero_and_take_new_keys() {
        let mut m = Metrics::new("echo");
        m.closed(1000);
        m.closed(1000);
        m.refused(418);
        assert!(m.closes.0.contains(&(1000, 2)));
        assert!(m.closes.0.contains(&(1009, 0)));
        assert!(m.refused.0.contains(&(418, 1)));
    }

    #[test]
    fn agent_kinds() {
        assert_eq!(agent_kind(true, "echo"), "threads");
        assert_eq!(agent_kind(false, "openai"), "openai");
        assert_eq!(agent_kind(false, "my own"), "polled");
    }
}
