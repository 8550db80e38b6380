//! The state dir (`--state-dir`) over real sockets: the binary is killed with SIGKILL (or
//! stopped with SIGTERM), started again on the same dir, and a WebSocket client checks
//! what came back: sessions, history (seen by the agent), held frames byte for byte, seqs
//! that never go back, ids that run once, turns cut by the crash that run again once.
//! Damaged state files, a dir that cannot be made, a full disk, and the write budgets.

mod common;
#[path = "common/mock_openai.rs"]
mod mock_openai;

use common::*;
use mock_openai::*;
use serde_json::{Value, json};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(20);

/// A fresh, empty dir for one test.
fn fresh_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("state-{name}"));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir.join("state")
}

fn start(dir: &Path, extra: &[&str]) -> Server {
    let mut args = vec!["--state-dir", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// Waits until every change so far is durable (`/health` says none is unsynced).
fn wait_synced(server: &Server) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let h = server.health();
        if h["state"]["unsynced_records"] == 0 && h["state"]["compacting"] == false {
            return h;
        }
        assert!(Instant::now() < deadline, "state never synced: {h}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kill9(mut server: Server) {
    server.signal("KILL");
    server
        .wait_exit(WAIT)
        .expect("straycat did not die on SIGKILL");
}

fn stop(mut server: Server) {
    server.signal("TERM");
    let status = server
        .wait_exit(WAIT)
        .expect("straycat did not stop on SIGTERM");
    assert!(status.success(), "{status:?}");
}

/// Every frame up to and including the `chat` or `error` answering `id`.
fn until_reply(c: &mut Client, id: &str) -> Vec<Value> {
    let mut frames = Vec::new();
    loop {
        let v = c.recv_json();
        let done = v["reply_to"] == id && (v["type"] == "chat" || v["type"] == "error");
        frames.push(v);
        if done {
            return frames;
        }
    }
}

/// The frames with a seq, as sent.
fn held(frames: &[Value]) -> Vec<Value> {
    frames
        .iter()
        .filter(|v| v.get("seq").is_some())
        .cloned()
        .collect()
}

fn mock_upstream() -> Mock {
    Mock::start(seed(40), |req| {
        let mut s = Sse::new().role();
        for w in req.last_text().split(' ') {
            s = s.token(&format!("{w} "));
        }
        Reply::stream(Framing::Chunked, s.finish("stop").done().segs())
    })
}

fn openai_args(mock: &Mock) -> Vec<String> {
    [
        "--agent",
        "openai",
        "--openai-url",
        &mock.url(),
        "--openai-model",
        "m",
    ]
    .map(String::from)
    .to_vec()
}

/// After SIGKILL: the session, its held frames (the same bytes and seqs), its history
/// (the agent's next request carries it), its answered ids (a resend runs nothing), and a
/// seq counter that goes on above everything sent.
#[test]
fn sigkill_loses_nothing_that_was_synced() {
    let dir = fresh_dir("sigkill");
    let mock = mock_upstream();
    let args = openai_args(&mock);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = start(&dir, &args);
    let mut c = server.connect("alice", "");
    c.say("one fish", Some("a1"));
    let first = held(&until_reply(&mut c, "a1"));
    c.say("two fish", Some("a2"));
    let second = held(&until_reply(&mut c, "a2"));
    let before: Vec<Value> = first.iter().chain(&second).cloned().collect();
    assert_eq!(before.len(), 2, "{before:?}");
    wait_synced(&server);
    kill9(server);

    let server = start(&dir, &args);
    assert_eq!(server.health()["sessions"], 1);
    let mut c = server.connect("alice", "?since=0");
    assert_eq!(
        [c.recv_json(), c.recv_json()].to_vec(),
        before,
        "replayed as sent"
    );
    // A resend of an answered id gets its reply again and runs nothing.
    c.say("one fish", Some("a1"));
    assert_eq!(c.recv_json(), before[0]);
    c.say("red fish", Some("a3"));
    let third = held(&until_reply(&mut c, "a3"));
    let reqs = mock.wait_requests(3, WAIT);
    assert_eq!(reqs.len(), 3, "the resend ran nothing");
    assert_eq!(
        reqs[2].body["messages"],
        json!([
            {"role": "user", "content": "one fish"},
            {"role": "assistant", "content": "one fish "},
            {"role": "user", "content": "two fish"},
            {"role": "assistant", "content": "two fish "},
            {"role": "user", "content": "red fish"},
        ]),
        "the history came back"
    );
    assert!(seq(&third[0]) > seq(&before[1]), "{third:?}");
}

/// A turn that was running when the server was killed runs again, once, after the
/// restart, and its reply waits for the user; a reply that finished while its user was
/// away is held across the crash.
#[test]
fn a_turn_cut_by_a_crash_runs_again_once() {
    let dir = fresh_dir("cut");
    // Three words at 2 s each: the kill comes in the middle.
    let server = start(&dir, &["--echo-delay-ms", "2000"]);
    let mut c = server.connect("bob", "");
    c.say("slow three words", Some("s1"));
    let first = c.recv_json();
    assert_eq!(first["type"], "chat_token", "{first}");
    wait_synced(&server);
    kill9(server);

    let server = start(&dir, &["--echo-delay-ms", "300"]);
    assert!(
        server.wait_log("1 turns that were not answered run again", WAIT),
        "no rerun in the log"
    );
    assert!(server.wait_log("reply ready while away", WAIT));
    let mut c = server.connect("bob", "");
    c.say("after", Some("s2"));
    let frames = until_reply(&mut c, "s2");
    let answers: Vec<&Value> = frames
        .iter()
        .filter(|v| v["type"] == "chat" && v["reply_to"] == "s1")
        .collect();
    assert_eq!(answers.len(), 1, "{frames:?}");
    assert_chat(answers[0], "bob", "slow three words", Some("s1"));

    // Carol leaves while her turn runs; it ends while she is away; then the crash.
    c.close();
    let mut carol = server.connect("carol", "");
    carol.say("away", Some("c1"));
    carol.drop_tcp();
    assert!(
        server
            .wait_log_all(&["user=carol", "reply ready while away"], WAIT)
            .is_some()
    );
    wait_synced(&server);
    kill9(server);
    let server = start(&dir, &[]);
    let mut carol = server.connect("carol", "");
    let v = carol.recv_json();
    assert_chat(&v, "carol", "away", Some("c1"));
}

/// Killed right after a reply, before it may have been written: whatever the journal
/// lost, a client resuming from the last seq it saw gets every later frame, with seqs
/// above it (never a seq it already has).
#[test]
fn seqs_never_go_back_after_a_crash() {
    let dir = fresh_dir("seq");
    let server = start(&dir, &[]);
    let mut c = server.connect("dan", "");
    let mut last = 0;
    for i in 0..20 {
        c.say("x", Some(&format!("d{i}")));
        last = seq(held(&until_reply(&mut c, &format!("d{i}"))).last().unwrap());
    }
    kill9(server);
    let server = start(&dir, &[]);
    let mut c = server.connect("dan", &format!("?since={last}"));
    c.say("y", Some("after"));
    let frames = held(&until_reply(&mut c, "after"));
    assert_eq!(frames.len(), 1, "no replay, no gap: {frames:?}");
    assert!(seq(&frames[0]) > last, "{frames:?} after seq {last}");
}

/// Fifty users, a SIGKILL, and every one of them finds their conversation.
#[test]
fn many_users_come_back() {
    let dir = fresh_dir("many");
    let server = start(&dir, &[]);
    let mut want = Vec::new();
    for u in 0..50 {
        let user = format!("u{u}");
        let mut c = server.connect(&user, "");
        c.say(&format!("hello from {user}"), Some("m"));
        want.push(held(&until_reply(&mut c, "m")));
        c.drop_tcp();
    }
    wait_synced(&server);
    kill9(server);
    let server = start(&dir, &[]);
    assert_eq!(server.health()["sessions"], 50);
    for (u, frames) in want.iter().enumerate() {
        let mut c = server.connect(&format!("u{u}"), "?since=0");
        assert_eq!(&vec![c.recv_json()], frames);
    }
}

/// The newest segment file with data, and its bytes.
fn newest_segment(dir: &Path) -> (PathBuf, Vec<u8>) {
    let mut logs: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .filter(|p| fs::metadata(p).unwrap().len() > 0)
        .collect();
    logs.sort();
    let path = logs.pop().expect("a segment with data");
    let data = fs::read(&path).unwrap();
    (path, data)
}

/// A torn tail, garbage appended, an empty file and a file of garbage never stop the
/// server: every whole record is kept, the rest dropped with one warning.
#[test]
fn damaged_state_files_are_survived() {
    let dir = fresh_dir("damage");
    let server = start(&dir, &[]);
    let mut c = server.connect("eve", "");
    c.say("keep me", Some("e1"));
    let frames = held(&until_reply(&mut c, "e1"));
    c.close();
    stop(server);

    let check = |what: &str, expect_warning: bool| {
        let server = start(&dir, &[]);
        let mut c = server.connect("eve", "?since=0");
        assert_eq!(vec![c.recv_json()], frames, "after {what}");
        let warnings = server
            .logs()
            .iter()
            .filter(|l| l.contains("not whole records"))
            .count();
        assert_eq!(warnings, usize::from(expect_warning), "after {what}");
        c.close();
        stop(server);
    };
    // The clean stop's last record, cut in half.
    let (path, data) = newest_segment(&dir);
    fs::write(&path, &data[..data.len() - 5]).unwrap();
    check("a torn tail", true);
    let (path, mut data) = newest_segment(&dir);
    data.extend_from_slice(&[0xA5; 300]);
    fs::write(&path, &data).unwrap();
    check("garbage appended", true);
    fs::write(dir.join("00000000000000009000.log"), b"").unwrap();
    check("an empty segment", false);
    fs::write(dir.join("00000000000000000001.log"), [7u8; 4096]).unwrap();
    check("a segment of garbage", true);
}

/// A state dir that cannot be made, or is in use by another straycat: one line on
/// stderr and exit code 2.
#[test]
fn a_state_dir_that_cannot_be_used_stops_the_start_with_code_2() {
    let run_to_exit = |dir: &Path| {
        Command::new(env!("CARGO_BIN_EXE_straycat"))
            .args(["--listen", "127.0.0.1:0", "--state-dir"])
            .arg(dir)
            .output()
            .unwrap()
    };
    let file = fresh_dir("notadir");
    fs::write(&file, b"a file, not a dir").unwrap();
    for dir in [file.join("sub"), PathBuf::from("/proc/straycat-state")] {
        let out = run_to_exit(&dir);
        assert_eq!(out.status.code(), Some(2), "{dir:?}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("state dir")).collect();
        assert_eq!(lines.len(), 1, "{stderr}");
    }
    let dir = fresh_dir("locked");
    let first = start(&dir, &[]);
    let out = run_to_exit(&dir);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use by another straycat"));
    drop(first);
}

/// Restored sessions count toward the cap and expire as they would have.
#[test]
fn restored_sessions_keep_to_the_bounds() {
    let dir = fresh_dir("bounds");
    let server = start(&dir, &[]);
    for user in ["f1", "f2", "f3"] {
        let mut c = server.connect(user, "");
        c.say("hi", Some("x"));
        until_reply(&mut c, "x");
        c.close();
    }
    stop(server);
    let server = start(&dir, &["--max-sessions", "2"]);
    assert!(server.has_log("1 restored sessions dropped to fit --max-sessions 2"));
    assert_eq!(server.health()["sessions"], 2);
    stop(server);
    let server = start(&dir, &["--session-ttl-secs", "1"]);
    let deadline = Instant::now() + WAIT;
    while server.health()["sessions"] != 0 {
        assert!(Instant::now() < deadline, "restored sessions never expired");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(server.has_log("session expired"));
}

/// No write at all while idle (with a socket open and heartbeats going), and no more
/// than one sync per 100 ms under load (`/proc/PID/io` and the server's own counters).
#[test]
fn idle_writes_nothing_and_syncs_are_grouped() {
    let dir = fresh_dir("budget");
    let server = start(&dir, &["--ping-interval-secs", "1"]);
    let io = |what: &str| -> u64 {
        let text = fs::read_to_string(format!("/proc/{}/io", server.pid())).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{what}: ")))
            .unwrap()
            .parse()
            .unwrap()
    };
    let mut clients: Vec<Client> = (0..4)
        .map(|i| server.connect(&format!("g{i}"), ""))
        .collect();
    let started = Instant::now();
    let syncs_before = wait_synced(&server)["state"]["syncs"].as_u64().unwrap();
    for round in 0..50 {
        for c in &mut clients {
            c.say("load", Some(&format!("r{round}")));
        }
        for c in &mut clients {
            until_reply(c, &format!("r{round}"));
        }
    }
    let h = wait_synced(&server);
    let elapsed = started.elapsed();
    let syncs = h["state"]["syncs"].as_u64().unwrap() - syncs_before;
    let allowed = (elapsed.as_millis() / 100) as u64 + 2;
    assert!(syncs <= allowed, "{syncs} syncs in {elapsed:?}");
    assert!(syncs >= 1, "{h}");

    let (bytes, storage) = (h["state"]["bytes_written"].clone(), io("write_bytes"));
    // Three heartbeats go by: pings out, pongs in.
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        for c in &mut clients {
            c.ws.get_mut()
                .set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let _ = c.ws.read();
        }
    }
    let h = server.health();
    assert_eq!(h["state"]["bytes_written"], bytes, "{h}");
    assert_eq!(
        io("write_bytes"),
        storage,
        "the process wrote to storage while idle"
    );
}

/// Mounts a small tmpfs at `dir` (root only); `None` with a message when not allowed.
fn small_tmpfs(dir: &Path) -> Option<Mount> {
    fs::create_dir_all(dir).unwrap();
    let ok = Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=2m",
            "tmpfs",
            dir.to_str().unwrap(),
        ])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!(
            "SKIPPED: cannot mount a tmpfs here (needs root); the disk-full test did not run"
        );
        return None;
    }
    Some(Mount(dir.to_path_buf()))
}

struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the file system of `dir` with one file, until it is full.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = fs::File::create(&path).unwrap();
    let block = vec![0u8; 64 * 1024];
    while f.write_all(&block).is_ok() {}
    let _ = f.write_all(&[0; 512]);
    let _ = f.sync_all();
    path
}

/// The disk fills up: the server serves from memory, logs one error, `/health` says
/// `degraded`; freed, the state dir catches up by itself, and what was said while the
/// disk was full survives the next crash. Frames lost while full still never have their
/// seqs given again.
#[test]
fn a_full_disk_degrades_and_recovers() {
    let mnt = fresh_dir("full");
    let Some(_mount) = small_tmpfs(&mnt) else {
        return;
    };
    let dir = mnt.join("state");
    let server = start(&dir, &[]);
    let mut c = server.connect("hal", "");
    c.say("before", Some("h0"));
    until_reply(&mut c, "h0");
    wait_synced(&server);
    let filler = fill(&mnt);
    let mut last = 0;
    for i in 1..=5 {
        let id = format!("h{i}");
        c.say(&"full disk ".repeat(50), Some(&id));
        last = seq(held(&until_reply(&mut c, &id)).last().unwrap());
    }
    let deadline = Instant::now() + WAIT;
    while server.health()["status"] != "degraded" {
        assert!(
            Instant::now() < deadline,
            "never degraded: {}",
            server.health()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(server.health()["state"]["status"], "degraded");
    let errors = |s: &Server| {
        s.logs()
            .iter()
            .filter(|l| l.contains("serving from memory"))
            .count()
    };
    assert_eq!(errors(&server), 1);
    fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while server.health()["status"] != "ok" {
        assert!(
            Instant::now() < deadline,
            "never recovered: {}",
            server.health()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(errors(&server), 1, "one error, not one per write");
    wait_synced(&server);
    kill9(server);
    let server = start(&dir, &[]);
    let mut c = server.connect("hal", "?since=0");
    let replayed: Vec<Value> = (0..6).map(|_| c.recv_json()).collect();
    assert_eq!(seq(&replayed[5]), last, "what was said while full survived");

    stop(server);

    // A turn is running (and journaled) when the disk fills up; the frames that follow
    // are lost, and the server is killed. After the restart the turn runs again: its
    // reply must not take a seq the client already saw, or a resume would skip it.
    let server = start(&dir, &["--echo-delay-ms", "1000"]);
    let mut c = server.connect("hal", "?since=0");
    for _ in 0..6 {
        c.recv_json();
    }
    c.say("cut by the crash", Some("k1"));
    assert_eq!(c.recv_json()["type"], "chat_token");
    wait_synced(&server);
    let filler = fill(&mnt);
    let mut seen = 0;
    for _ in 0..200 {
        c.send_text("not json");
        loop {
            let v = c.recv_json();
            if v["type"] == "error" {
                seen = seq(&v);
                break;
            }
        }
        if server.health()["status"] == "degraded" {
            break;
        }
    }
    assert_eq!(server.health()["status"], "degraded");
    kill9(server);
    fs::remove_file(&filler).unwrap();
    let server = start(&dir, &[]);
    assert!(server.wait_log("reply ready while away", WAIT));
    let mut c = server.connect("hal", &format!("?since={seen}"));
    let v = c.recv_json();
    assert_chat(&v, "hal", "cut by the crash", Some("k1"));
    assert!(seq(&v) > seen, "{v} after seq {seen}");
}

/// Bytes of the segment files in `dir`.
fn segments_bytes(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .map(|p| fs::metadata(p).unwrap().len())
        .sum()
}

/// Compaction keeps the state dir bounded by the live data: with little kept per session,
/// megabytes of turns leave a dir of about one snapshot, and what it kept still replays.
#[test]
fn compaction_keeps_the_dir_bounded() {
    let dir = fresh_dir("compact");
    let server = start(
        &dir,
        &[
            "--max-held-frames",
            "4",
            "--history-turns",
            "2",
            "--max-messages-per-minute",
            "0",
        ],
    );
    let mut c = server.connect("kim", "");
    let text = "many words ".repeat(400);
    let mut last = Vec::new();
    for i in 0..600 {
        let id = format!("k{i}");
        c.say(&text, Some(&id));
        last = held(&until_reply(&mut c, &id));
    }
    let h = wait_synced(&server);
    assert!(server.has_log("state: compacting"), "never compacted");
    let written = h["state"]["bytes_written"].as_u64().unwrap();
    let on_disk = segments_bytes(&dir);
    assert!(written > 8 << 20, "{h}");
    // Twice the live data (a few frames and lines of 4 KiB) plus the 4 MiB slack.
    assert!(
        on_disk < 5 << 20,
        "{on_disk} bytes on disk after writing {written}"
    );
    assert_eq!(h["state"]["disk_bytes"], on_disk, "{h}");
    kill9(server);
    let server = start(&dir, &[]);
    let mut c = server.connect("kim", &format!("?since={}", seq(&last[0]) - 1));
    assert_eq!(vec![c.recv_json()], last);
}
