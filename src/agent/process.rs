//! The process agent: each turn runs `/bin/sh -c CMD` (`--process-cmd`) as a child
//! process, driven by the event loop through its pipes.
//!
//! The child gets one JSON line on stdin, then end of file:
//! `{"user_id":U,"text":T,"history":[{"role":"user"|"assistant","content":…}],"message":{…}}`
//! (`message` is the client's whole message object), and `STRAYCAT_USER_ID=U` in its
//! environment (the `STRAYCAT_*` options, which may hold keys, are taken out of it). Every
//! chunk it writes to stdout is relayed as a `chat_token`, cut at UTF-8 character
//! boundaries; the reply is all of stdout less one trailing newline (held back from the
//! tokens, so that they join to the reply). Exit status 0 gives the `chat`; any other
//! status or a signal gives an `AgentError` naming it and the last line of stderr. (Debian's
//! `sh`, dash, does not replace itself with the command it runs: a command killed by a
//! signal shows as the shell's status 128+N unless `--process-cmd` starts with `exec`.)
//!
//! Nothing blocks the loop:
//! - stdin, stdout and stderr are non-blocking pipes registered with the loop (sources 0,
//!   1 and 2); the line is written as the pipe takes it, and a child that never reads it
//!   is no problem;
//! - the child's exit is seen through a pidfd (source 3), which becomes readable when the
//!   child exits; `waitid(WNOWAIT)` then confirms the exit *without reaping*, so that the
//!   child's process group can be killed while its id still belongs to us (a reaped id may
//!   be reused), and only then is the child reaped. Kernels without `pidfd_open` (before
//!   5.3) fall back to the same `waitid` every [`EXIT_POLL`];
//! - the child runs in a process group of its own; when the turn ends, whichever way, the
//!   whole group gets SIGKILL, so a backgrounded grandchild holding the stdout pipe ends
//!   with it. A turn whose child is still running (timeout, shutdown, output too long)
//!   hands the killed child to one small reaper thread, which waits for it: a process
//!   with a large address space can take a while to die, and the loop does not wait.

use super::{AgentError, PolledAgent, Step, Task, TaskCtx, Turn, Who};
use log::{debug, info, warn};
use mio::unix::SourceFd;
use mio::unix::pipe::{Receiver, Sender};
use mio::{Interest, Registry};
use rustix::process::{
    Pid, PidfdFlags, Signal, WaitId, WaitIdOptions, kill_process_group, pidfd_open, waitid,
};
use serde_json::{Map, Value, json};
use std::ffi::OsString;
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

/// The shell that runs `--process-cmd`.
const SHELL: &str = "/bin/sh";

/// Bytes read from one pipe per call before the task gives the loop back (a child
/// flooding its stdout must not starve the other connections).
const READ_BUDGET_BYTES: usize = 64 * 1024;

/// Bytes read from one pipe once the child exited: what a pipe can hold (1 MiB is
/// Linux's default `pipe-max-size`), so nothing the child wrote is lost, and a process
/// that left the group and goes on writing does not hold the loop.
const EXIT_DRAIN_BYTES: usize = 1024 * 1024;

/// Bytes of stderr kept for the error message: its last line is all that is shown.
const STDERR_TAIL_BYTES: usize = 4 * 1024;

/// Characters of the stderr line shown in an error.
const STDERR_LINE_CHARS: usize = 300;

/// How often the exit is checked without a pidfd (kernels before 5.3), or again after a
/// pidfd said "exited" before `waitid` agreed (not seen, but cheap to survive).
const EXIT_POLL: Duration = Duration::from_millis(25);

/// Source indices of a task (`TaskCtx::register`).
const STDIN: usize = 0;
const STDOUT: usize = 1;
const STDERR: usize = 2;
const EXIT: usize = 3;

/// What `Process::new` needs.
pub struct ProcessConfig {
    /// `--process-cmd`, run by `/bin/sh -c`.
    pub cmd: String,
    /// `--max-message-bytes`: the longest reply relayed.
    pub max_output_bytes: usize,
    /// `--workers`: children running at once; further turns wait their turn (a Pi does
    /// not want a thousand processes because a thousand users asked at once).
    pub max_concurrent: usize,
}

/// Runs `--process-cmd` per turn.
pub struct Process {
    cmd: Arc<str>,
    max_output_bytes: usize,
    max_concurrent: usize,
    /// The `STRAYCAT_*` variables of straycat's environment, taken out of the child's:
    /// they are straycat's options, and some hold keys.
    env_removed: Arc<[OsString]>,
    reaper: Arc<Reaper>,
    /// Watch the exit through a pidfd (false only in tests of the fallback).
    use_pidfd: bool,
}

impl Process {
    /// Checks the configuration.
    pub fn new(config: ProcessConfig) -> Result<Process, String> {
        if config.cmd.trim().is_empty() {
            return Err("--process-cmd is empty".into());
        }
        if !std::path::Path::new(SHELL).exists() {
            return Err(format!("--agent process needs {SHELL}, which is missing"));
        }
        let env_removed: Vec<OsString> = std::env::vars_os()
            .map(|(k, _)| k)
            .filter(|k| k.to_string_lossy().starts_with("STRAYCAT_"))
            .collect();
        info!(
            "process agent: each turn runs {SHELL} -c {:?}",
            config.cmd.as_str()
        );
        Ok(Process {
            cmd: Arc::from(config.cmd),
            max_output_bytes: config.max_output_bytes,
            max_concurrent: config.max_concurrent.max(1),
            env_removed: env_removed.into(),
            reaper: Arc::default(),
            use_pidfd: true,
        })
    }
}

impl PolledAgent for Process {
    fn name(&self) -> &str {
        "process"
    }

    fn max_concurrent(&self) -> Option<usize> {
        Some(self.max_concurrent)
    }

    fn start(&self, turn: Turn, _now: Instant) -> Box<dyn Task> {
        Box::new(ProcessTask {
            cmd: Arc::clone(&self.cmd),
            env_removed: Arc::clone(&self.env_removed),
            reaper: Arc::clone(&self.reaper),
            use_pidfd: self.use_pidfd,
            user: turn.user.to_string(),
            input: input_line(&turn),
            written: 0,
            child: None,
            stdin: None,
            stdout: None,
            stderr: None,
            pidfd: None,
            output: Output::new(self.max_output_bytes),
            stderr_tail: Tail::default(),
            again: None,
            exit_poll_at: None,
        })
    }
}

/// The line the child reads on stdin (newline included).
fn input_line(turn: &Turn) -> Vec<u8> {
    let history: Vec<Value> = turn
        .history
        .iter()
        .map(|line| {
            let role = match line.who {
                Who::Human => "user",
                Who::Ai => "assistant",
            };
            json!({"role": role, "content": &*line.text})
        })
        .collect();
    let mut message: Map<String, Value> = turn.fields.clone();
    message.insert("text".into(), Value::String(turn.text.clone()));
    let mut line = json!({
        "user_id": turn.user.as_str(),
        "text": turn.text,
        "history": history,
        "message": message,
    })
    .to_string()
    .into_bytes();
    line.push(b'\n');
    line
}

/// One turn's child process.
struct ProcessTask {
    cmd: Arc<str>,
    env_removed: Arc<[OsString]>,
    reaper: Arc<Reaper>,
    use_pidfd: bool,
    /// For log lines.
    user: String,
    /// The JSON line for stdin, and how much of it the pipe took.
    input: Vec<u8>,
    written: usize,
    /// The child, until it is reaped (here, or by the reaper). While it is here its
    /// process id, which is also its process group's, cannot be reused.
    child: Option<Child>,
    stdin: Option<Sender>,
    /// Until end of file.
    stdout: Option<Receiver>,
    stderr: Option<Receiver>,
    pidfd: Option<OwnedFd>,
    output: Output,
    stderr_tail: Tail,
    /// A read budget ran out: call again at this instant (the loop's next iteration).
    again: Option<Instant>,
    /// Check the exit at this instant (no pidfd, or it spoke early).
    exit_poll_at: Option<Instant>,
}

/// Where a call got to.
enum Progress {
    Running,
    Exited(ExitStatus),
}

impl ProcessTask {
    /// Spawns the child and registers its pipes and pidfd.
    fn spawn(&mut self, ctx: &mut TaskCtx<'_>) -> Result<(), AgentError> {
        let mut command = Command::new(SHELL);
        command
            .arg("-c")
            .arg(&*self.cmd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        for key in self.env_removed.iter() {
            command.env_remove(key);
        }
        command.env("STRAYCAT_USER_ID", &self.user);
        let began = Instant::now();
        let mut child = command
            .spawn()
            .map_err(|e| AgentError::Failed(format!("cannot start {SHELL}: {e}")))?;
        let spawn_us = began.elapsed().as_micros();
        let pid = Pid::from_child(&child);
        debug!(
            "user={} process agent: pid {} started ({spawn_us} µs to spawn)",
            self.user,
            pid.as_raw_nonzero()
        );
        // A failure from here on is released by `start`: the group killed, the child reaped.
        let stdin = child.stdin.take().map(Sender::from);
        let stdout = child.stdout.take().map(Receiver::from);
        let stderr = child.stderr.take().map(Receiver::from);
        self.child = Some(child);
        let setup = |e: io::Error| AgentError::Failed(format!("cannot watch the command: {e}"));
        if let Some(mut p) = stdin {
            p.set_nonblocking(true).map_err(setup)?;
            ctx.register(&mut p, STDIN, Interest::WRITABLE)
                .map_err(setup)?;
            self.stdin = Some(p);
        }
        if let Some(mut p) = stdout {
            p.set_nonblocking(true).map_err(setup)?;
            ctx.register(&mut p, STDOUT, Interest::READABLE)
                .map_err(setup)?;
            self.stdout = Some(p);
        }
        if let Some(mut p) = stderr {
            p.set_nonblocking(true).map_err(setup)?;
            ctx.register(&mut p, STDERR, Interest::READABLE)
                .map_err(setup)?;
            self.stderr = Some(p);
        }
        match self.use_pidfd.then(|| pidfd_open(pid, PidfdFlags::empty())) {
            Some(Ok(fd)) => {
                ctx.register(&mut SourceFd(&fd.as_raw_fd()), EXIT, Interest::READABLE)
                    .map_err(setup)?;
                self.pidfd = Some(fd);
            }
            Some(Err(e)) => {
                debug!("no pidfd ({e}): the exit is checked every {EXIT_POLL:?}");
                self.exit_poll_at = Some(ctx.now() + EXIT_POLL);
            }
            None => self.exit_poll_at = Some(ctx.now() + EXIT_POLL),
        }
        Ok(())
    }

    /// Moves the line in, the output out, and sees whether the child exited.
    fn drive(&mut self, ctx: &mut TaskCtx<'_>, exit_said: bool) -> Result<Progress, AgentError> {
        self.write_stdin(ctx.registry());
        let exited = self.reap_if_exited()?;
        if exited.is_none()
            && exit_said
            && let Some(fd) = self.pidfd.take()
        {
            // A pidfd speaks once, and this one spoke before the exit could be seen:
            // poll from now on.
            let _ = ctx.registry().deregister(&mut SourceFd(&fd.as_raw_fd()));
        }
        self.exit_poll_at =
            (exited.is_none() && self.pidfd.is_none()).then(|| ctx.now() + EXIT_POLL);
        // After the exit, read what is left: the child wrote it before it exited, and its
        // group is dead, so it is what the pipe holds (a process that left the group may
        // still write: hence a bound).
        let budget = if exited.is_some() {
            EXIT_DRAIN_BYTES
        } else {
            READ_BUDGET_BYTES
        };
        let mut more = false;
        more |= self.read_stdout(ctx, budget)?;
        more |= self.read_stderr(ctx.registry(), budget);
        if more {
            // More may be waiting, and edge-triggered readiness will not say so again.
            self.again = Some(ctx.now());
        }
        Ok(match exited {
            Some(status) => Progress::Exited(status),
            None => Progress::Running,
        })
    }

    /// Writes what the stdin pipe takes; closes it once the line is in, or when the child
    /// will not take it (closed its end, exited).
    fn write_stdin(&mut self, registry: &Registry) {
        let Some(pipe) = self.stdin.as_mut() else {
            return;
        };
        let done = loop {
            if self.written == self.input.len() {
                break true;
            }
            match pipe.write(&self.input[self.written..]) {
                Ok(0) => break true,
                Ok(n) => self.written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break false,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    debug!(
                        "user={} process agent: stdin closed after {} of {} bytes ({e})",
                        self.user,
                        self.written,
                        self.input.len()
                    );
                    break true;
                }
            }
        };
        if done && let Some(mut pipe) = self.stdin.take() {
            let _ = registry.deregister(&mut pipe);
            self.input = Vec::new();
        }
    }

    /// Reads stdout up to `budget` bytes; true if the budget ran out first.
    fn read_stdout(&mut self, ctx: &mut TaskCtx<'_>, budget: usize) -> Result<bool, AgentError> {
        let Some(pipe) = self.stdout.as_mut() else {
            return Ok(false);
        };
        let mut buf = [0u8; 16 * 1024];
        let mut got = 0;
        loop {
            if got >= budget {
                return Ok(true);
            }
            match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    got += n;
                    if let Some(token) = self.output.feed(&buf[..n])? {
                        ctx.token_text(token);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(AgentError::Failed(format!("reading the command: {e}"))),
            }
        }
        if let Some(mut pipe) = self.stdout.take() {
            let _ = ctx.registry().deregister(&mut pipe);
        }
        Ok(false)
    }

    /// Reads stderr up to `budget` bytes into the tail; true if the budget ran out first.
    fn read_stderr(&mut self, registry: &Registry, budget: usize) -> bool {
        let Some(pipe) = self.stderr.as_mut() else {
            return false;
        };
        let mut buf = [0u8; 4 * 1024];
        let mut got = 0;
        loop {
            if got >= budget {
                return true;
            }
            match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    got += n;
                    self.stderr_tail.push(&buf[..n]);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // Stderr is only for the error message: losing it fails nothing.
                Err(_) => break,
            }
        }
        if let Some(mut pipe) = self.stderr.take() {
            let _ = registry.deregister(&mut pipe);
        }
        false
    }

    /// If the child has exited: kills what is left of its process group (a backgrounded
    /// grandchild holding a pipe), then reaps it, in that order, so that the group's id
    /// cannot have been reused by the time it is killed.
    fn reap_if_exited(&mut self) -> Result<Option<ExitStatus>, AgentError> {
        let Some(child) = self.child.as_mut() else {
            return Ok(None);
        };
        let pid = Pid::from_child(child);
        let options = WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT;
        match waitid(WaitId::Pid(pid), options) {
            Ok(Some(_)) => {}
            Ok(None) => return Ok(None),
            Err(rustix::io::Errno::INTR) => return Ok(None),
            Err(e) => {
                return Err(AgentError::Failed(format!(
                    "cannot learn how the command ended: {e}"
                )));
            }
        }
        let _ = kill_process_group(pid, Signal::KILL);
        match child.try_wait() {
            Ok(Some(status)) => {
                self.child = None;
                debug!(
                    "user={} process agent: pid {} ended: {}",
                    self.user,
                    pid.as_raw_nonzero(),
                    describe_status(status)
                );
                Ok(Some(status))
            }
            // waitid said it exited: the next poll reaps it.
            Ok(None) => Ok(None),
            Err(e) => Err(AgentError::Failed(format!(
                "cannot learn how the command ended: {e}"
            ))),
        }
    }

    /// The turn's outcome once the child exited with `status`.
    fn outcome(&mut self, status: ExitStatus) -> Result<String, AgentError> {
        if status.success() {
            return self.output.finish();
        }
        let why = describe_status(status);
        Err(AgentError::Failed(match self.stderr_tail.last_line() {
            Some(line) => format!("the command {why}: {line}"),
            None => format!("the command {why} (nothing on stderr)"),
        }))
    }

    fn step(&mut self, ctx: &mut TaskCtx<'_>, exit_said: bool) -> Step {
        self.again = None;
        match self.drive(ctx, exit_said) {
            Ok(Progress::Running) => Step::Pending,
            Ok(Progress::Exited(status)) => {
                let outcome = self.outcome(status);
                self.release(Some(ctx.registry()));
                Step::Done(outcome)
            }
            Err(e) => {
                self.release(Some(ctx.registry()));
                Step::Done(Err(e))
            }
        }
    }

    /// Deregisters and closes every source, and kills the process group if the child was
    /// not reaped yet (then the reaper thread reaps it).
    fn release(&mut self, registry: Option<&Registry>) {
        if let Some(mut p) = self.stdin.take()
            && let Some(r) = registry
        {
            let _ = r.deregister(&mut p);
        }
        if let Some(mut p) = self.stdout.take()
            && let Some(r) = registry
        {
            let _ = r.deregister(&mut p);
        }
        if let Some(mut p) = self.stderr.take()
            && let Some(r) = registry
        {
            let _ = r.deregister(&mut p);
        }
        if let Some(fd) = self.pidfd.take()
            && let Some(r) = registry
        {
            let _ = r.deregister(&mut SourceFd(&fd.as_raw_fd()));
        }
        self.again = None;
        self.exit_poll_at = None;
        if let Some(child) = self.child.take() {
            // Not reaped, so the group's id is still ours.
            let pid = Pid::from_child(&child);
            if let Err(e) = kill_process_group(pid, Signal::KILL) {
                warn!(
                    "user={} process agent: cannot kill process group {}: {e}",
                    self.user,
                    pid.as_raw_nonzero()
                );
            }
            self.reaper.reap(child);
        }
    }
}

impl Task for ProcessTask {
    fn start(&mut self, ctx: &mut TaskCtx<'_>) -> Step {
        if let Err(e) = self.spawn(ctx) {
            self.release(Some(ctx.registry()));
            return Step::Done(Err(e));
        }
        self.step(ctx, false)
    }

    fn ready(&mut self, source: usize, _: bool, _: bool, ctx: &mut TaskCtx<'_>) -> Step {
        self.step(ctx, source == EXIT)
    }

    fn timeout(&mut self, ctx: &mut TaskCtx<'_>) -> Step {
        self.step(ctx, false)
    }

    fn poll_at(&self) -> Option<Instant> {
        [self.again, self.exit_poll_at].into_iter().flatten().min()
    }

    fn abort(&mut self, registry: &Registry) {
        if let Some(child) = &self.child {
            info!(
                "user={} process agent: killing process group {}",
                self.user,
                child.id()
            );
        }
        self.release(Some(registry));
    }
}

impl Drop for ProcessTask {
    /// A task dropped with its child running (it should not happen: `Done` and `abort`
    /// release it) still kills and reaps it.
    fn drop(&mut self) {
        self.release(None);
    }
}

/// "exited with status 3", "was killed by signal 9 (SIGKILL)".
fn describe_status(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exited with status {code}");
    }
    match status.signal() {
        Some(sig) => {
            let core = if status.core_dumped() {
                ", core dumped"
            } else {
                ""
            };
            match signal_name(sig) {
                Some(name) => format!("was killed by signal {sig} ({name}{core})"),
                None => format!("was killed by signal {sig}{core}"),
            }
        }
        None => format!("ended with {status}"),
    }
}

/// The name of a common signal (numbers differ between architectures: ask rustix).
fn signal_name(raw: i32) -> Option<&'static str> {
    const NAMES: [(Signal, &str); 15] = [
        (Signal::HUP, "SIGHUP"),
        (Signal::INT, "SIGINT"),
        (Signal::QUIT, "SIGQUIT"),
        (Signal::ILL, "SIGILL"),
        (Signal::TRAP, "SIGTRAP"),
        (Signal::ABORT, "SIGABRT"),
        (Signal::BUS, "SIGBUS"),
        (Signal::FPE, "SIGFPE"),
        (Signal::KILL, "SIGKILL"),
        (Signal::USR1, "SIGUSR1"),
        (Signal::SEGV, "SIGSEGV"),
        (Signal::USR2, "SIGUSR2"),
        (Signal::PIPE, "SIGPIPE"),
        (Signal::ALARM, "SIGALRM"),
        (Signal::TERM, "SIGTERM"),
    ];
    NAMES
        .iter()
        .find(|(s, _)| s.as_raw() == raw)
        .map(|(_, name)| *name)
}

/// The child's stdout, turned into tokens and the reply.
pub(crate) struct Output {
    /// The end of the last chunk when it stopped inside a UTF-8 character (≤ 3 bytes).
    partial: Vec<u8>,
    /// A newline that ended the last chunk: sent with the next token, dropped at the end.
    newline_held: bool,
    /// Every token sent so far, joined.
    reply: String,
    /// Bytes of stdout so far, for the error message.
    seen_bytes: usize,
    max_bytes: usize,
}

impl Output {
    pub(crate) fn new(max_bytes: usize) -> Output {
        Output {
            partial: Vec::new(),
            newline_held: false,
            reply: String::new(),
            seen_bytes: 0,
            max_bytes,
        }
    }

    /// Takes one chunk of stdout; the token to send, if it completed any character.
    pub(crate) fn feed(&mut self, chunk: &[u8]) -> Result<Option<String>, AgentError> {
        let start = self.seen_bytes - self.partial.len();
        self.seen_bytes += chunk.len();
        let mut bytes = std::mem::take(&mut self.partial);
        bytes.extend_from_slice(chunk);
        let text = match std::str::from_utf8(&bytes) {
            Ok(text) => text,
            Err(e) if e.error_len().is_none() => {
                // The chunk ends inside a character: keep its start for the next one.
                let valid = e.valid_up_to();
                self.partial = bytes[valid..].to_vec();
                std::str::from_utf8(&bytes[..valid]).unwrap_or_default()
            }
            Err(e) => {
                return Err(AgentError::Failed(format!(
                    "the command's output is not valid UTF-8 (at byte {})",
                    start + e.valid_up_to()
                )));
            }
        };
        if text.is_empty() {
            return Ok(None);
        }
        let (body, ends_in_newline) = match text.strip_suffix('\n') {
            Some(body) => (body, true),
            None => (text, false),
        };
        let mut token = String::with_capacity(body.len() + 1);
        if self.newline_held {
            token.push('\n');
        }
        token.push_str(body);
        self.newline_held = ends_in_newline;
        if self.reply.len() + token.len() > self.max_bytes {
            return Err(AgentError::Failed(format!(
                "the command's output is longer than {} bytes (--max-message-bytes); it was stopped",
                self.max_bytes
            )));
        }
        if token.is_empty() {
            return Ok(None);
        }
        self.reply.push_str(&token);
        Ok(Some(token))
    }

    /// The reply, once stdout is over.
    pub(crate) fn finish(&mut self) -> Result<String, AgentError> {
        if !self.partial.is_empty() {
            return Err(AgentError::Failed(
                "the command's output ends in the middle of a UTF-8 character".into(),
            ));
        }
        if self.reply.is_empty() {
            // As for the openai agent: an empty chat is no answer.
            return Err(AgentError::Failed(
                "the command exited 0 but wrote nothing on stdout".into(),
            ));
        }
        Ok(std::mem::take(&mut self.reply))
    }
}

/// The last few KiB of stderr.
#[derive(Default)]
pub(crate) struct Tail {
    bytes: Vec<u8>,
}

impl Tail {
    pub(crate) fn push(&mut self, chunk: &[u8]) {
        self.bytes.extend_from_slice(chunk);
        // Trimmed in steps, so that a flood is not copied at every chunk.
        if self.bytes.len() > 2 * STDERR_TAIL_BYTES {
            let cut = self.bytes.len() - STDERR_TAIL_BYTES;
            self.bytes.drain(..cut);
        }
    }

    /// The last line that is not blank, shortened.
    pub(crate) fn last_line(&self) -> Option<String> {
        let from = self.bytes.len().saturating_sub(STDERR_TAIL_BYTES);
        let text = String::from_utf8_lossy(&self.bytes[from..]);
        let line = text.lines().map(str::trim).rfind(|l| !l.is_empty())?;
        Some(match line.char_indices().nth(STDERR_LINE_CHARS) {
            Some((i, _)) => format!("{}…", &line[..i]),
            None => line.to_string(),
        })
    }
}

/// Waits, on a thread of its own, for the children killed while still running: one that
/// had much memory can take a while to die, and the loop must not wait for it. Started on
/// the first such child; 64 KiB of stack.
#[derive(Default)]
struct Reaper {
    queue: Mutex<Option<mpsc::Sender<Child>>>,
}

impl Reaper {
    /// Reaps `child`, which was sent SIGKILL: at once if it is gone already, else on the
    /// reaper thread.
    fn reap(&self, mut child: Child) {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        let Ok(mut queue) = self.queue.lock() else {
            return;
        };
        if let Some(tx) = queue.as_ref() {
            match tx.send(child) {
                Ok(()) => return,
                // The thread is gone (it cannot panic, but should it): start another.
                Err(mpsc::SendError(back)) => child = back,
            }
        }
        let (tx, rx) = mpsc::channel::<Child>();
        let spawned = std::thread::Builder::new()
            .name("straycat-reaper".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                for mut child in rx {
                    let _ = child.wait();
                }
            });
        match spawned {
            Ok(_) => {
                let _ = tx.send(child);
                *queue = Some(tx);
            }
            Err(e) => warn!(
                "process agent: cannot start the reaper thread ({e}); pid {} stays a zombie",
                child.id()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{HistoryEntry, Stream};
    use super::*;
    use crate::protocol::UserId;
    use mio::{Events, Poll, Token};

    fn tokens(out: &mut Output, chunks: &[&[u8]]) -> Result<Vec<String>, AgentError> {
        let mut got = Vec::new();
        for chunk in chunks {
            got.extend(out.feed(chunk)?);
        }
        Ok(got)
    }

    #[test]
    fn tokens_are_cut_at_character_boundaries_and_join_to_the_reply() {
        let text = "héllo 世界 🐈\n".as_bytes();
        // Every split point, through the middle of every multi-byte character.
        for cut in 0..=text.len() {
            let mut out = Output::new(1024);
            let got = tokens(&mut out, &[&text[..cut], &text[cut..]]).unwrap();
            assert!(got.iter().all(|t| !t.is_empty()), "{got:?}");
            assert_eq!(got.concat(), "héllo 世界 🐈", "cut at {cut}");
            assert_eq!(out.finish().unwrap(), "héllo 世界 🐈");
        }
        // One byte at a time.
        let mut out = Output::new(1024);
        let chunks: Vec<&[u8]> = text.chunks(1).collect();
        let got = tokens(&mut out, &chunks).unwrap();
        assert_eq!(got.concat(), "héllo 世界 🐈");
    }

    #[test]
    fn only_one_trailing_newline_is_dropped_and_inner_ones_travel_with_the_next_token() {
        let mut out = Output::new(1024);
        let got = tokens(&mut out, &[b"one\n", b"\n", b"two\n\n"]).unwrap();
        assert_eq!(got, ["one", "\n", "\ntwo\n"]);
        assert_eq!(out.finish().unwrap(), "one\n\ntwo\n");
        let mut out = Output::new(1024);
        assert_eq!(tokens(&mut out, &[b"\n"]).unwrap(), Vec::<String>::new());
        assert!(out.finish().is_err(), "an empty reply is no answer");
    }

    #[test]
    fn invalid_utf8_and_a_cut_character_at_the_end_are_errors() {
        let mut out = Output::new(1024);
        let err = tokens(&mut out, &[b"ok ", b"\xff"]).unwrap_err();
        assert_eq!(
            err,
            AgentError::Failed("the command's output is not valid UTF-8 (at byte 3)".into())
        );
        let mut out = Output::new(1024);
        assert_eq!(tokens(&mut out, &[b"ok \xe4\xb8"]).unwrap(), ["ok "]);
        assert!(out.finish().is_err());
    }

    #[test]
    fn output_past_the_limit_is_an_error_but_a_trailing_newline_does_not_count() {
        let mut out = Output::new(5);
        assert_eq!(tokens(&mut out, &[b"12345\n"]).unwrap(), ["12345"]);
        assert_eq!(out.finish().unwrap(), "12345");
        let mut out = Output::new(5);
        assert!(tokens(&mut out, &[b"123", b"456"]).is_err());
    }

    #[test]
    fn the_stderr_tail_keeps_the_last_line() {
        let mut tail = Tail::default();
        assert_eq!(tail.last_line(), None);
        tail.push(b"first\nsecond line  \n\n");
        assert_eq!(tail.last_line().as_deref(), Some("second line"));
        for _ in 0..1000 {
            tail.push(b"noise noise noise\n");
        }
        tail.push(b"the end\n");
        assert!(tail.bytes.len() <= 2 * STDERR_TAIL_BYTES);
        assert_eq!(tail.last_line().as_deref(), Some("the end"));
    }

    #[test]
    fn statuses_are_named() {
        assert_eq!(
            describe_status(ExitStatus::from_raw(3 << 8)),
            "exited with status 3"
        );
        assert_eq!(
            describe_status(ExitStatus::from_raw(Signal::KILL.as_raw())),
            format!("was killed by signal {} (SIGKILL)", Signal::KILL.as_raw())
        );
    }

    #[test]
    fn the_input_line_carries_the_turn() {
        let mut fields = Map::new();
        fields.insert("id".into(), "c-1".into());
        fields.insert("extra".into(), json!({"a": [1, 2]}));
        let turn = Turn {
            user: UserId::parse("alice").unwrap(),
            text: "two\nlines".into(),
            fields,
            history: vec![
                HistoryEntry {
                    who: Who::Human,
                    text: Arc::from("hi"),
                },
                HistoryEntry {
                    who: Who::Ai,
                    text: Arc::from("hello"),
                },
            ],
        };
        let line = input_line(&turn);
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        assert_eq!(line.last(), Some(&b'\n'));
        let v: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(
            v,
            json!({
                "user_id": "alice",
                "text": "two\nlines",
                "history": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"},
                ],
                "message": {"text": "two\nlines", "id": "c-1", "extra": {"a": [1, 2]}},
            })
        );
    }

    /// Runs one task the way the loop does, up to its end or `limit`.
    fn run(agent: &Process, text: &str, limit: Duration) -> (Vec<String>, Option<Step>) {
        let mut poll = Poll::new().unwrap();
        let mut events = Events::with_capacity(16);
        let turn = Turn {
            user: UserId::default_user(),
            text: text.into(),
            fields: Map::new(),
            history: vec![],
        };
        let t0 = Instant::now();
        let mut task = agent.start(turn, t0);
        let mut out = Vec::new();
        let mut step = task.start(&mut TaskCtx::new(poll.registry(), 0, t0, &mut out));
        while step == Step::Pending && t0.elapsed() < limit {
            let wait = task
                .poll_at()
                .map(|at| at.saturating_duration_since(Instant::now()))
                .unwrap_or(limit)
                .min(limit.saturating_sub(t0.elapsed()));
            poll.poll(&mut events, Some(wait)).unwrap();
            let now = Instant::now();
            let ready: Vec<Token> = events.iter().map(|e| e.token()).collect();
            for token in ready {
                if step == Step::Pending {
                    let mut ctx = TaskCtx::new(poll.registry(), 0, now, &mut out);
                    step = task.ready(token.0, true, true, &mut ctx);
                }
            }
            if step == Step::Pending && task.poll_at().is_some_and(|at| at <= now) {
                step = task.timeout(&mut TaskCtx::new(poll.registry(), 0, now, &mut out));
            }
        }
        if step == Step::Pending {
            task.abort(poll.registry());
            return (texts(out), None);
        }
        (texts(out), Some(step))
    }

    fn texts(out: Vec<Stream>) -> Vec<String> {
        out.into_iter()
            .map(|s| match s {
                Stream::Token(t) => t,
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    fn agent(cmd: &str, use_pidfd: bool) -> Process {
        let mut p = Process::new(ProcessConfig {
            cmd: cmd.into(),
            max_output_bytes: 1024,
            max_concurrent: 4,
        })
        .unwrap();
        p.use_pidfd = use_pidfd;
        p
    }

    #[test]
    fn a_turn_runs_with_a_pidfd_and_without_one() {
        for use_pidfd in [true, false] {
            let p = agent(
                r#"read -r line; printf 'got: %s\n' "$STRAYCAT_USER_ID""#,
                use_pidfd,
            );
            let (tokens, step) = run(&p, "hi", Duration::from_secs(10));
            assert_eq!(
                step,
                Some(Step::Done(Ok("got: user".into()))),
                "{use_pidfd}"
            );
            assert_eq!(tokens.concat(), "got: user");
            let p = agent("echo oops >&2; exit 7", use_pidfd);
            let (_, step) = run(&p, "hi", Duration::from_secs(10));
            assert_eq!(
                step,
                Some(Step::Done(Err(AgentError::Failed(
                    "the command exited with status 7: oops".into()
                ))))
            );
        }
    }

    #[test]
    fn an_exit_ends_the_turn_though_a_grandchild_holds_stdout() {
        for use_pidfd in [true, false] {
            let p = agent("echo done; sleep 30 &", use_pidfd);
            let (_, step) = run(&p, "hi", Duration::from_secs(10));
            assert_eq!(step, Some(Step::Done(Ok("done".into()))), "{use_pidfd}");
        }
    }

    #[test]
    fn an_empty_command_is_refused() {
        assert!(
            Process::new(ProcessConfig {
                cmd: "  ".into(),
                max_output_bytes: 10,
                max_concurrent: 1,
            })
            .is_err()
        );
    }
}
