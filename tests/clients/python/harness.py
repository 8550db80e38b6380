"""What the Python client tests share: the straycat binary on a port of 127.0.0.1, the real
`cheshire_cat_api.CatClient` wired to callbacks that record what it gets, and a probe for
the Cheshire Cat HTTP endpoints (so their tests can skip until the server has them).

Every wait is bounded and waits for a condition (a frame, a close, a log line) under a
deadline; nothing sleeps hoping something happened.
"""

import ctypes
import http.client
import json
import os
import pathlib
import signal
import subprocess
import threading
import time

import cheshire_cat_api as ccat
import cheshire_cat_api.cat_client as cat_client
import websocket

ROOT = pathlib.Path(__file__).resolve().parents[3]
START_TIMEOUT_S = 20
STOP_TIMEOUT_S = 10
# A reply of the echo agent takes a few milliseconds (or words × --echo-delay-ms); this is
# the most any single wait in these tests may take before it fails.
WAIT_S = 15
PR_SET_PDEATHSIG = 1

# websocket-client's sockets get a timeout, so that no connect, read or close of the client
# can hang past it (the client's own default is none). No test keeps a socket idle this long.
websocket.setdefaulttimeout(30)


class _WebSocketApp(websocket.WebSocketApp):
    """CatClient.connect_ws() runs `WebSocketApp.run_forever()` with no arguments, so its
    read loop looks at its stop flag only every 10 s while nothing arrives (websocket-client
    waits `ping_timeout or 10` s per poll), and CatClient.close(), which joins that thread,
    can take 10 s after a close handshake that went fine. `ping_timeout=0.5` makes the loop
    look every 0.5 s; without a `ping_interval` no ping is sent, so nothing else changes."""

    def run_forever(self, *args, **kwargs):
        kwargs.setdefault("ping_timeout", 0.5)
        return super().run_forever(*args, **kwargs)


cat_client.WebSocketApp = _WebSocketApp


def binary():
    """target/release/straycat (under CARGO_TARGET_DIR when set), or $STRAYCAT_BIN."""
    if os.environ.get("STRAYCAT_BIN"):
        return os.environ["STRAYCAT_BIN"]
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target")
    if not target.is_absolute():
        target = ROOT / target
    path = target / "release" / "straycat"
    if not path.exists():
        raise RuntimeError(f"{path} is missing: run `cargo build --release` first")
    return str(path)


def _die_with_parent():
    """In the child before exec: SIGKILL when the test process dies, however it dies, so no
    server outlives a killed run (SIGKILL, which needs nothing of the server, not even a
    log pipe that is still open)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Server:
    """A straycat process on 127.0.0.1:0 (the port read back from its log)."""

    def __init__(self, *args):
        self.args = [str(a) for a in args]
        self.port = 0
        self.lines = []
        self.cond = threading.Condition()
        self.proc = subprocess.Popen(
            [binary(), "--listen", "127.0.0.1:0", "--log-level", "debug", *self.args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_die_with_parent,
        )
        threading.Thread(target=self._read_log, daemon=True).start()
        line = self.wait_log(lambda l: "listening on 127.0.0.1:" in l, START_TIMEOUT_S)
        self.port = int(line.rsplit(":", 1)[1])

    def _read_log(self):
        for line in self.proc.stderr:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()

    def mark(self):
        """An index into the log: wait_log(since=mark) looks only at later lines."""
        with self.cond:
            return len(self.lines)

    def wait_log(self, pred, timeout=WAIT_S, since=0):
        """The first log line from index `since` on that satisfies pred; fails after timeout."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for line in self.lines[since:]:
                    if pred(line):
                        return line
                since = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(
                        f"no such straycat log line within {timeout} s; log:\n{self.log()}"
                    )
                self.cond.wait(min(left, 0.5))

    def log(self):
        with self.cond:
            return "\n".join(self.lines[-80:])

    def stop(self):
        """SIGTERM: straycat closes every socket with 1001 and exits 0."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT_S)
                raise AssertionError("straycat did not stop within %s s of SIGTERM" % STOP_TIMEOUT_S)
        assert self.proc.returncode == 0, f"straycat exited with {self.proc.returncode}"


class Client:
    """One official `cheshire_cat_api.CatClient`, its callbacks recording into `frames`
    (parsed JSON of every text message) and `events` (open, close, error)."""

    def __init__(self, port, user_id="user", auth_key=""):
        self.user_id = user_id
        self.cond = threading.Condition()
        self.frames = []
        self.events = []
        config = ccat.Config(base_url="127.0.0.1", port=port, user_id=user_id, auth_key=auth_key)
        self.cat = ccat.CatClient(
            config,
            on_open=lambda: self._event("open"),
            on_close=lambda code, msg: self._event("close", code, msg),
            on_message=self._message,
            on_error=lambda err: self._event("error", err),
        )

    def _event(self, *what):
        with self.cond:
            self.events.append(what)
            self.cond.notify_all()

    def _message(self, raw):
        with self.cond:
            self.frames.append(json.loads(raw))
            self.cond.notify_all()

    def wait(self, pred, what, timeout=WAIT_S):
        """Waits until pred() (called under the lock) is true; fails after timeout."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"{self.user_id}: no {what} within {timeout} s; "
                        f"frames {self.frames}, events {self.events}"
                    )
                self.cond.wait(left)

    def has(self, kind):
        return [e for e in self.events if e[0] == kind]

    def connect(self):
        """connect_ws() and wait for on_open."""
        self.cat.connect_ws()
        self.wait(lambda: self.has("open") or self.has("close"), "open")
        assert self.has("open"), f"{self.user_id}: closed before opening: {self.events}"
        return self

    def wait_frame(self, pred, what, start=0, timeout=WAIT_S):
        """The first frame from index `start` on that satisfies pred."""
        found = []

        def ready():
            found[:] = [f for f in self.frames[start:] if pred(f)][:1]
            return bool(found)

        self.wait(ready, what, timeout)
        return found[0]

    def wait_reply(self, start=0, timeout=WAIT_S):
        """The first `chat` or `error` frame from index `start` on."""
        return self.wait_frame(lambda f: f.get("type") in ("chat", "error"), "chat", start, timeout)

    def wait_closed(self, timeout=WAIT_S):
        self.wait(lambda: self.has("close"), "close", timeout)
        return self.has("close")[0]

    def close(self):
        """CatClient.close() (a close handshake, then the client's thread is joined), once."""
        if getattr(self.cat, "_ws", None) is not None and not self.has("close"):
            self.cat.close()
        self.wait_closed()


def http_status(port, method, path, headers=None, body=None):
    """The status of one raw HTTP request (to find out whether an endpoint exists)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        return conn.getresponse().status
    finally:
        conn.close()


def has_chat_api(port, headers=None):
    """Whether straycat serves Cheshire Cat's `GET /memory/conversation_history` (it answers
    404 while the endpoint is not there: no side effect, so it is the probe)."""
    return http_status(port, "GET", "/memory/conversation_history", headers) not in (404, 405)
