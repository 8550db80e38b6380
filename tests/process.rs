//! `--agent process` over real sockets: small shell scripts, written to a fresh directory by
//! each test, stand in for the command. They stream, read the JSON line, fail, die of a
//! signal, hang, flood, write bad UTF-8, ignore stdin, leave a grandchild behind, and run
//! ten at once; every turn must end cleanly, and every process it started must be gone.
//!
//! Scripts run as `sh PATH`, not `PATH`: executing a file this multi-threaded test process
//! has just written can fail with ETXTBSY (another test's fork may still hold it open).

mod common;

use std::path::PathBuf;
use std::sync::Barrier;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::{Value, json};

/// How long a process may take to be gone after its turn ended.
const GONE_TIMEOUT: Duration = Duration::from_secs(5);

/// A directory of its own for one test, removed at the end.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(test: &str) -> Scratch {
        static N: AtomicUsize = AtomicUsize::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "straycat-process-{test}-{}-{nanos}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Writes the script `name` (with `$DIR` set to this directory) and returns the
    /// `--process-cmd` that runs it.
    fn script(&self, name: &str, body: &str) -> String {
        let path = self.path(name);
        let dir = self.dir.display();
        std::fs::write(&path, format!("DIR='{dir}'\n{body}\n")).unwrap();
        // `exec`: the script's shell is then the child straycat spawned (dash does not
        // replace itself with the last command of `-c` on its own).
        format!("exec sh '{}'", path.display())
    }

    /// Waits for file `name` to hold `lines` lines, and returns them.
    fn wait_lines(&self, name: &str, lines: usize) -> Vec<String> {
        let path = self.path(name);
        poll(
            &format!("{lines} lines in {}", path.display()),
            Duration::from_secs(10),
            || {
                let text = std::fs::read_to_string(&path).ok()?;
                let got: Vec<String> = text.lines().map(str::to_string).collect();
                (got.len() >= lines && text.ends_with('\n')).then_some(got)
            },
        )
    }

    /// Creates file `name` (what a script waits for).
    fn touch(&self, name: &str) {
        std::fs::write(self.path(name), "").unwrap();
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A shell loop that waits (at most 10 s) for file `$DIR/NAME`.
fn wait_for(name: &str) -> String {
    format!(
        "i=0; while [ ! -e \"$DIR/{name}\" ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done"
    )
}

/// The state letter and parent of process `pid`, from `/proc/PID/stat`; `None` once it
/// is gone.
fn proc_state(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ppid …": comm may hold spaces and parentheses; the last ')' ends it.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Waits until `pid`, a child of straycat, is gone: killed and reaped.
fn wait_gone(pid: u32) {
    poll(&format!("process {pid} to be gone"), GONE_TIMEOUT, || {
        proc_state(pid).is_none().then_some(())
    });
}

/// Waits until `pid`, a grandchild of straycat, no longer runs: gone, or a zombie that
/// straycat does not own. An orphan is PID 1's to reap, and some containers' PID 1 never
/// does (systemd does); either way it was killed.
fn wait_dead(pid: u32, straycat: u32) {
    poll(
        &format!("process {pid} to be dead"),
        GONE_TIMEOUT,
        || match proc_state(pid) {
            None => Some(()),
            Some(('Z', ppid)) if ppid != straycat => Some(()),
            Some(_) => None,
        },
    );
}

/// Zombies whose parent is `ppid`.
fn zombies_of(ppid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| proc_state(pid) == Some(('Z', ppid)))
        .collect()
}

/// Waits until straycat has no zombie child.
fn wait_no_zombies(straycat: u32) {
    poll("straycat to have no zombie child", GONE_TIMEOUT, || {
        zombies_of(straycat).is_empty().then_some(())
    });
}

/// Reads frames up to the turn's `error` (tokens before it are fine) and returns it.
fn recv_error(c: &mut Client) -> (Vec<String>, Value) {
    let mut tokens = Vec::new();
    loop {
        let v = c.recv_json();
        match v["type"].as_str() {
            Some("chat_token") => tokens.push(v["content"].as_str().unwrap().to_string()),
            Some("error") => return (tokens, v),
            _ => panic!("[{}] expected tokens then an error, got {v}", c.user),
        }
    }
}

/// Asserts a `chat` answers `input` with `reply`.
fn assert_reply(chat: &Value, user: &str, input: &str, reply: &str) {
    assert_eq!(chat["type"], "chat", "{chat}");
    assert_eq!(chat["user_id"], user, "{chat}");
    assert_eq!(chat["text"], reply, "{chat}");
    assert_eq!(chat["content"], reply, "{chat}");
    assert_eq!(chat["why"]["input"], input, "{chat}");
}

fn description(err: &Value) -> &str {
    err["description"].as_str().unwrap_or_default()
}

/// straycat with `--agent process --process-cmd CMD` and `extra` options.
fn start_process(cmd: &str, extra: &[&str]) -> Server {
    let mut args = vec!["--agent", "process", "--process-cmd", cmd];
    args.extend_from_slice(extra);
    Server::start(&args)
}

#[test]
fn stdout_streams_as_tokens_that_join_to_the_reply_without_its_trailing_newline() {
    let s = Scratch::new("stream");
    // Each piece waits for the test to have seen the one before: the tokens must come
    // while the command is still running, one by one.
    let cmd = s.script(
        "stream.sh",
        &format!(
            "printf 'Hello'\n{}\nprintf ', wide'\n{}\nprintf ' world\\n'",
            wait_for("go1"),
            wait_for("go2")
        ),
    );
    let server = start_process(&cmd, &[]);
    let mut c = server.connect("alice", "");
    c.say("hi", Some("m1"));
    let first = c.recv_json();
    assert_eq!(first, json!({"type": "chat_token", "content": "Hello"}));
    s.touch("go1");
    let second = c.recv_json();
    assert_eq!(second, json!({"type": "chat_token", "content": ", wide"}));
    s.touch("go2");
    let (tokens, chat) = c.recv_until_chat();
    assert_eq!(tokens, [" world"], "the trailing newline is not sent");
    assert_reply(&chat, "alice", "hi", "Hello, wide world");
    assert_eq!(chat["reply_to"], "m1");
    wait_no_zombies(server.pid());
}

#[test]
fn a_character_cut_between_two_writes_is_sent_whole() {
    let s = Scratch::new("utf8-cut");
    // "héllo 世界": the first write stops inside 世 (e4 b8 | 96).
    let cmd = s.script(
        "cut.sh",
        &format!(
            "printf 'h\\303\\251llo \\344\\270'\n{}\nprintf '\\226\\347\\225\\214\\n'",
            wait_for("go")
        ),
    );
    let server = start_process(&cmd, &[]);
    let mut c = server.connect("bob", "");
    c.say("hi", None);
    let first = c.recv_json();
    assert_eq!(first, json!({"type": "chat_token", "content": "héllo "}));
    s.touch("go");
    let (tokens, chat) = c.recv_until_chat();
    assert_eq!(tokens, ["世界"]);
    assert_reply(&chat, "bob", "hi", "héllo 世界");
}

#[test]
fn the_command_gets_one_json_line_then_end_of_file_and_its_user_in_the_environment() {
    let s = Scratch::new("stdin");
    // `cat` ends only at end of file, so the reply proves stdin was closed after the line.
    let cmd = s.script(
        "stdin.sh",
        "printf '%s %s\\n' \"$STRAYCAT_USER_ID\" \"${STRAYCAT_OPENAI_API_KEY:-unset}\"\ncat",
    );
    let server = Server::start_with_env(
        &["--agent", "process", "--process-cmd", &cmd],
        &[("STRAYCAT_OPENAI_API_KEY", "secret")],
    );
    let mut c = server.connect("carol", "");
    c.send_json(&json!({"text": "first \"one\"\nsecond line", "id": "q1", "extra": {"n": [1, 2]}}));
    let (tokens, chat) = c.recv_until_chat();
    let reply = chat["text"].as_str().unwrap().to_string();
    assert_eq!(tokens.concat(), reply);
    let (env, line) = reply.split_once('\n').expect("two lines");
    assert_eq!(
        env, "carol unset",
        "STRAYCAT_USER_ID is set; straycat's own options are not passed on"
    );
    assert!(!line.contains('\n'), "one line: {line:?}");
    let v: Value = serde_json::from_str(line).unwrap();
    assert_eq!(
        v,
        json!({
            "user_id": "carol",
            "text": "first \"one\"\nsecond line",
            "history": [],
            "message": {"text": "first \"one\"\nsecond line", "id": "q1", "extra": {"n": [1, 2]}},
        })
    );

    // The second turn carries the first in its history.
    c.say("again", None);
    let (_, chat2) = c.recv_until_chat();
    let reply2 = chat2["text"].as_str().unwrap();
    let v2: Value = serde_json::from_str(reply2.split_once('\n').unwrap().1).unwrap();
    assert_eq!(v2["text"], "again");
    assert_eq!(v2["message"], json!({"text": "again"}));
    assert_eq!(
        v2["history"],
        json!([
            {"role": "user", "content": "first \"one\"\nsecond line"},
            {"role": "assistant", "content": reply},
        ])
    );
}

#[test]
fn a_line_larger_than_the_pipe_goes_in_whole() {
    let s = Scratch::new("big-line");
    let cmd = s.script("big.sh", "cat > \"$DIR/in.json\"; echo stored");
    let server = start_process(&cmd, &["--max-message-bytes", "1000000"]);
    let mut c = server.connect("dave", "");
    // Twice in the line (`text` and `message.text`): 600 KB, ten pipe buffers.
    let text = "0123456789".repeat(30_000);
    c.say(&text, None);
    let (_, chat) = c.recv_until_chat();
    assert_eq!(chat["text"], "stored");
    let line = std::fs::read_to_string(s.path("in.json")).unwrap();
    assert!(line.ends_with('\n'));
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["text"], text.as_str());
    assert_eq!(v["message"]["text"], text.as_str());
}

#[test]
fn a_command_that_does_not_read_stdin_is_answered() {
    let s = Scratch::new("no-stdin");
    // The line is larger than the pipe: its writing waits, then the pipe breaks.
    let cmd = s.script("ignore.sh", "sleep 0.3; echo 'not read'");
    let server = start_process(&cmd, &["--max-message-bytes", "300000"]);
    let mut c = server.connect("erin", "");
    let text = "x".repeat(200_000);
    c.say(&text, None);
    let (_, chat) = c.recv_until_chat();
    assert_eq!(chat["text"], "not read");
    c.say("short", None);
    let (_, chat) = c.recv_until_chat();
    assert_reply(&chat, "erin", "short", "not read");
    wait_no_zombies(server.pid());
}

#[test]
fn a_failing_command_gives_an_agent_error_with_its_status_and_last_stderr_line() {
    let s = Scratch::new("fail");
    let cmd = s.script(
        "fail.sh",
        "echo 'loading' >&2; echo 'partial answer'; echo 'model file missing: /m.gguf' >&2; exit 3",
    );
    let server = start_process(&cmd, &[]);
    let mut c = server.connect("frank", "");
    c.say("hi", Some("f1"));
    let (tokens, err) = recv_error(&mut c);
    assert_eq!(tokens, ["partial answer"]);
    assert_error(&err, "AgentError");
    assert_eq!(err["reply_to"], "f1");
    assert_eq!(
        description(&err),
        "the command exited with status 3: model file missing: /m.gguf"
    );
    assert!(server.wait_log("status 3", READ_TIMEOUT));
    wait_no_zombies(server.pid());
}

#[test]
fn a_command_killed_by_a_signal_gives_an_agent_error_naming_it() {
    let s = Scratch::new("signal");
    let cmd = s.script("signal.sh", "echo 'going down' >&2; kill -TERM $$; sleep 5");
    let server = start_process(&cmd, &[]);
    let mut c = server.connect("grace", "");
    c.say("hi", None);
    let (_, err) = recv_error(&mut c);
    assert_error(&err, "AgentError");
    let why = description(&err);
    assert!(
        why.starts_with("the command was killed by signal ") && why.contains("(SIGTERM)"),
        "{why}"
    );
    assert!(why.ends_with(": going down"), "{why}");
}

#[test]
fn a_hanging_command_times_out_and_its_whole_process_group_is_killed_and_reaped() {
    let s = Scratch::new("hang");
    // The shell, and a grandchild in the background; the shell waits for it.
    let cmd = s.script(
        "hang.sh",
        "sleep 30 &\necho $$ > \"$DIR/pids.tmp\"; echo $! >> \"$DIR/pids.tmp\"\n\
         mv \"$DIR/pids.tmp\" \"$DIR/pids\"\nprintf 'thinking'\nwait",
    );
    let server = start_process(&cmd, &["--turn-timeout-secs", "1"]);
    let mut c = server.connect("heidi", "");
    c.say("hi", None);
    let pids = s.wait_lines("pids", 2);
    let (shell, grandchild): (u32, u32) = (pids[0].parse().unwrap(), pids[1].parse().unwrap());
    assert_eq!(proc_state(shell).map(|s| s.1), Some(server.pid()));
    let (tokens, err) = recv_error(&mut c);
    assert_eq!(tokens, ["thinking"]);
    assert_error(&err, "Timeout");
    wait_gone(shell);
    wait_dead(grandchild, server.pid());
    wait_no_zombies(server.pid());
    assert!(server.wait_log("killing process group", READ_TIMEOUT));
}

#[test]
fn a_command_that_closes_stdout_but_keeps_running_ends_at_the_turn_timeout() {
    let s = Scratch::new("close-stdout");
    let cmd = s.script(
        "closed.sh",
        "echo $$ > \"$DIR/pid.tmp\"; mv \"$DIR/pid.tmp\" \"$DIR/pid\"\n\
         echo 'all I have'; exec >&- ; sleep 30",
    );
    let server = start_process(&cmd, &["--turn-timeout-secs", "1"]);
    let mut c = server.connect("ivan", "");
    c.say("hi", None);
    let pid: u32 = s.wait_lines("pid", 1)[0].parse().unwrap();
    let (tokens, err) = recv_error(&mut c);
    assert_eq!(tokens, ["all I have"]);
    assert_error(&err, "Timeout");
    wait_gone(pid);
    wait_no_zombies(server.pid());
}

#[test]
fn an_exit_ends_the_turn_though_a_backgrounded_grandchild_holds_stdout() {
    let s = Scratch::new("grandchild");
    // The shell exits at once; `sleep` keeps the stdout pipe open for 30 s.
    let cmd = s.script(
        "bg.sh",
        "sleep 30 &\necho $! > \"$DIR/pid.tmp\"; mv \"$DIR/pid.tmp\" \"$DIR/pid\"\necho done",
    );
    let server = start_process(&cmd, &["--turn-timeout-secs", "60"]);
    let mut c = server.connect("judy", "");
    let began = Instant::now();
    c.say("hi", None);
    // Within the client's read timeout, far below the turn timeout.
    let (_, chat) = c.recv_until_chat();
    assert_reply(&chat, "judy", "hi", "done");
    assert!(began.elapsed() < Duration::from_secs(30));
    let grandchild: u32 = s.wait_lines("pid", 1)[0].parse().unwrap();
    wait_dead(grandchild, server.pid());
    wait_no_zombies(server.pid());
}

#[test]
fn a_process_that_left_the_group_cannot_hold_the_turn() {
    let s = Scratch::new("escaped");
    // `setsid` takes `yes` out of the process group, out of reach of the group kill; it
    // floods stderr while the shell exits.
    let cmd = s.script(
        "escape.sh",
        "setsid yes escaped >&2 &\necho $! > \"$DIR/pid.tmp\"; mv \"$DIR/pid.tmp\" \"$DIR/pid\"\n\
         sleep 0.2; echo done",
    );
    let server = start_process(&cmd, &[]);
    let mut c = server.connect("olga", "");
    c.say("hi", None);
    let pid: u32 = s.wait_lines("pid", 1)[0].parse().unwrap();
    let _kill = KillOnDrop(pid);
    let (_, chat) = c.recv_until_chat();
    assert_reply(&chat, "olga", "hi", "done");
    // Once straycat closed its end, the flood dies of SIGPIPE.
    wait_dead(pid, server.pid());
    wait_no_zombies(server.pid());
}

/// Kills a process that a test let out of straycat's reach, should the test fail.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if proc_state(self.0).is_some_and(|(state, _)| state != 'Z') {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &self.0.to_string()])
                .status();
        }
    }
}

#[test]
fn a_flood_past_the_message_limit_is_an_agent_error_and_the_command_is_killed() {
    let s = Scratch::new("flood");
    let cmd = s.script(
        "flood.sh",
        "echo $$ > \"$DIR/pid.tmp\"; mv \"$DIR/pid.tmp\" \"$DIR/pid\"; exec yes",
    );
    let server = start_process(&cmd, &["--max-message-bytes", "4096"]);
    let mut c = server.connect("kim", "");
    c.say("hi", None);
    let (tokens, err) = recv_error(&mut c);
    assert_error(&err, "AgentError");
    assert!(
        description(&err).contains("longer than 4096 bytes"),
        "{err}"
    );
    let relayed = tokens.concat();
    assert!(relayed.len() <= 4096);
    assert!(
        relayed.chars().all(|c| c == 'y' || c == '\n'),
        "{relayed:?}"
    );
    let pid: u32 = s.wait_lines("pid", 1)[0].parse().unwrap();
    wait_gone(pid);
    wait_no_zombies(server.pid());
    // The server goes on serving.
    let mut other = server.connect("lee", "");
    other.say("again", None);
    let (_, err) = recv_error(&mut other);
    assert_error(&err, "AgentError");
}

#[test]
fn output_that_is_not_utf8_is_an_agent_error() {
    let s = Scratch::new("bad-utf8");
    let cmd = s.script("bad.sh", "printf 'fine \\377\\376 then\\n'");
    let server = start_process(&cmd, &[]);
    let mut c = server.connect("mia", "");
    c.say("hi", None);
    let (tokens, err) = recv_error(&mut c);
    assert!("fine ".starts_with(&tokens.concat()), "{tokens:?}");
    assert_error(&err, "AgentError");
    assert_eq!(
        description(&err),
        "the command's output is not valid UTF-8 (at byte 5)"
    );
    // Cut in the middle of a character at the end.
    let s2 = Scratch::new("cut-end");
    let cmd = s2.script("cut.sh", "printf 'ok \\344\\270'");
    let server = start_process(&cmd, &[]);
    let mut c = server.connect("mia", "");
    c.say("hi", None);
    let (tokens, err) = recv_error(&mut c);
    assert_eq!(tokens, ["ok "]);
    assert_error(&err, "AgentError");
    assert!(
        description(&err).contains("middle of a UTF-8 character"),
        "{err}"
    );
}

#[test]
fn ten_users_are_answered_by_commands_running_at_the_same_time() {
    let s = Scratch::new("concurrent");
    // Each run records when it started and ended (nanoseconds since the epoch).
    let cmd = s.script(
        "slow.sh",
        "start=$(date +%s%N); sleep 0.5; end=$(date +%s%N)\n\
         echo \"$start $end\" > \"$DIR/$STRAYCAT_USER_ID.tmp\"\n\
         mv \"$DIR/$STRAYCAT_USER_ID.tmp\" \"$DIR/$STRAYCAT_USER_ID.times\"\n\
         echo \"done $STRAYCAT_USER_ID\"",
    );
    let server = start_process(&cmd, &[]);
    const USERS: usize = 10;
    let barrier = Barrier::new(USERS);
    std::thread::scope(|scope| {
        for i in 0..USERS {
            let (server, barrier) = (&server, &barrier);
            scope.spawn(move || {
                let user = format!("user{i}");
                let mut c = server.connect(&user, "");
                barrier.wait();
                c.say("go", None);
                let (_, chat) = c.recv_until_chat();
                assert_reply(&chat, &user, "go", &format!("done {user}"));
            });
        }
    });
    let mut spans: Vec<(u128, u128)> = (0..USERS)
        .map(|i| {
            let line = &s.wait_lines(&format!("user{i}.times"), 1)[0];
            let (a, b) = line.split_once(' ').unwrap();
            (a.parse().unwrap(), b.parse().unwrap())
        })
        .collect();
    spans.sort();
    let overlapping = spans.windows(2).filter(|w| w[1].0 < w[0].1).count();
    assert!(
        overlapping >= 1,
        "no two runs overlapped: the commands ran one after the other: {spans:?}"
    );
    wait_no_zombies(server.pid());
}

#[test]
fn shutdown_kills_the_running_commands() {
    let s = Scratch::new("shutdown");
    let cmd = s.script(
        "long.sh",
        "sleep 30 &\necho $$ > \"$DIR/pids.tmp\"; echo $! >> \"$DIR/pids.tmp\"\n\
         mv \"$DIR/pids.tmp\" \"$DIR/pids\"\nwait",
    );
    let mut server = start_process(&cmd, &[]);
    let mut c = server.connect("nia", "");
    c.say("hi", None);
    let pids = s.wait_lines("pids", 2);
    server.signal("TERM");
    let (_, close) = c.expect_close();
    assert_eq!(close.map(|c| c.0), Some(1001));
    let status = server.wait_exit(Duration::from_secs(10)).expect("exited");
    assert!(status.success(), "{status:?}");
    // straycat is gone, so whatever it did not reap yet is PID 1's.
    for pid in pids {
        wait_dead(pid.parse().unwrap(), 0);
    }
}

#[test]
fn an_empty_command_stops_the_server_at_start() {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_straycat"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--agent",
            "process",
            "--process-cmd",
            " ",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = poll("straycat to exit", Duration::from_secs(10), || {
        child.try_wait().unwrap()
    });
    assert!(!status.success());
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(err.contains("--process-cmd"), "{err}");
}

/// What `Command::spawn` costs the loop, as the process agent calls it: 200 spawns of
/// `/bin/sh -c true` with three pipes and a process group of its own, each timed alone
/// (the child is reaped outside the timing). Run it with
/// `cargo test --release --test process -- --ignored --nocapture spawn_cost`.
#[test]
#[ignore]
fn spawn_cost() {
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    const RUNS: usize = 200;
    let mut took = Vec::with_capacity(RUNS);
    for i in 0..RUNS + 10 {
        let mut command = Command::new("/bin/sh");
        command
            .args(["-c", "true"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .env("STRAYCAT_USER_ID", "user");
        let began = Instant::now();
        let mut child = command.spawn().unwrap();
        let spent = began.elapsed();
        child.wait().unwrap();
        if i >= 10 {
            took.push(spent);
        }
    }
    took.sort();
    let at = |q: f64| took[((RUNS as f64 - 1.0) * q).round() as usize].as_micros();
    println!(
        "Command::spawn of /bin/sh -c true, {RUNS} runs: median {} µs, p99 {} µs, min {} µs, max {} µs",
        at(0.5),
        at(0.99),
        took[0].as_micros(),
        took[RUNS - 1].as_micros()
    );
}
