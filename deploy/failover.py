#!/usr/bin/env python3
"""deploy/test.sh's driver: three straycat instances behind HAProxy (deploy/haproxy.cfg with
the test's addresses), 100 users chatting through it, one instance drained with SIGTERM
mid-conversation and brought back. Python's standard library only: the WebSocket client is
the small one below (RFC 6455 client side, text frames, ping/pong, close).

    python3 deploy/failover.py --straycat BIN --haproxy BIN --cfg deploy/haproxy.cfg --work DIR

Half the users behave like straycat's kiosk page (they track `seq`, reconnect with
`?since=N`, resend every message still owed a reply with its `id`), half like a plain
Cheshire Cat client (no `since`, no resend). Every wait has a deadline; exits 1 on a failed
check, after the report.
"""

import argparse
import asyncio
import base64
import csv
import io
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import time

USERS = 100
ECHO_DELAY_MS = 40  # per word: a 5-word turn takes ~200 ms, so most turns are in flight
WORDS = 5
DRAINED = "s2"
CONNECT_DEADLINE = 15.0  # a user must be back within this after losing its socket
FRAME_TIMEOUT = 10.0  # no frame for this long on an open socket with a turn owed: fail

failures = []
children = []  # every process started, killed if the run is stopped from outside


def on_term(signum, _frame):
    for p in children:
        if p.poll() is None:
            p.kill()
    print(f"deploy/test.sh: stopped by signal {signum}; children killed", flush=True)
    os._exit(124)


def fail(msg):
    failures.append(msg)
    print("FAIL:", msg, flush=True)


# ---------------------------------------------------------------- a small WebSocket client


class HandshakeError(Exception):
    pass


class WS:
    def __init__(self, reader, writer):
        self.r, self.w = reader, writer
        self.closed = None  # ("close", code) or ("eof", None) once over

    @classmethod
    async def connect(cls, port, path, timeout=5.0):
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        w.write(
            (
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        try:
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), timeout)
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError) as e:
            w.close()
            raise HandshakeError(f"no answer to the upgrade ({type(e).__name__})")
        status = head.split(b"\r\n", 1)[0].decode(errors="replace")
        if " 101 " not in status + " ":
            w.close()
            raise HandshakeError(status)
        return cls(r, w)

    def _send(self, opcode, payload):
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", n)
        body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.w.write(head + mask + body)

    def send_json(self, obj):
        self._send(0x1, json.dumps(obj).encode())

    async def recv(self):
        """The next text message (a str), or None once the socket is over (see .closed)."""
        data = b""
        while True:
            try:
                b0, b1 = await self.r.readexactly(2)
                n = b1 & 0x7F
                if n == 126:
                    (n,) = struct.unpack("!H", await self.r.readexactly(2))
                elif n == 127:
                    (n,) = struct.unpack("!Q", await self.r.readexactly(8))
                mask = await self.r.readexactly(4) if b1 & 0x80 else None
                payload = await self.r.readexactly(n)
            except (asyncio.IncompleteReadError, ConnectionError):
                self.closed = self.closed or ("eof", None)
                return None
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            op = b0 & 0x0F
            if op == 0x9:
                self._send(0xA, payload)
            elif op == 0x8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                self.closed = ("close", code)
                try:
                    self._send(0x8, payload[:2])
                    await self.w.drain()
                except ConnectionError:
                    pass
                self.w.close()
                return None
            elif op in (0x1, 0x0):
                data += payload
                if b0 & 0x80:
                    return data.decode()

    async def close(self):
        try:
            self._send(0x8, struct.pack("!H", 1000))
            await self.w.drain()
            # Wait (bounded) for the server's close frame.
            await asyncio.wait_for(self._drain_until_closed(), 3.0)
        except (ConnectionError, asyncio.TimeoutError):
            pass
        self.w.close()

    async def _drain_until_closed(self):
        while await self.recv() is not None:
            pass


# ---------------------------------------------------------------- processes


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port, path, headers=None, timeout=2.0):
    """(status, body) of a plain GET, or (None, why)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n".encode())
            buf = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        return int(head.split()[1]), body.decode(errors="replace")
    except (OSError, ValueError, IndexError) as e:
        return None, str(e)


def wait_until(what, pred, deadline_s, every=0.05):
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(every)
    fail(f"timed out after {deadline_s:.0f} s waiting for {what}")
    return False


async def await_until(what, pred, deadline_s, every=0.05):
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if pred():
            return True
        await asyncio.sleep(every)
    fail(f"timed out after {deadline_s:.0f} s waiting for {what}")
    return False


class Instance:
    def __init__(self, name, binary, work):
        self.name, self.binary = name, binary
        self.state = os.path.join(work, f"state-{name}")
        self.log = os.path.join(work, f"{name}.log")
        self.port = free_port()
        self.proc = None

    def start(self):
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [self.binary, "--listen", f"127.0.0.1:{self.port}", "--state-dir", self.state,
             "--log-level", "info", "--agent", "echo", "--echo-delay-ms", str(ECHO_DELAY_MS)],
            # As straycat@.service sets them: behind HAProxy every client has its address.
            env={**os.environ, "STRAYCAT_MAX_CONNECTIONS_PER_IP": "0",
                 "STRAYCAT_MAX_CONNECTS_PER_MINUTE_PER_IP": "0"},
            stdout=logf, stderr=logf, stdin=subprocess.DEVNULL)
        children.append(self.proc)
        logf.close()
        wait_until(f"{self.name}'s /health on port {self.port}",
                   lambda: self.proc.poll() is None and http_get(self.port, "/health")[0] == 200, 10)

    def log_size(self):
        return os.path.getsize(self.log)

    def connects_since(self, offset):
        """[(user, since or None)] of the `connected` lines written after byte offset."""
        with open(self.log, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        return [(m.group(1), m.group(2)) for m in
                re.finditer(r"user=(\S+) peer=\S+ connected(?: \(since=(\d+)\))?;", text)]

    def stop(self, deadline=10.0):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(deadline)
            except subprocess.TimeoutExpired:
                fail(f"{self.name} still running {deadline:.0f} s after SIGTERM: killed")
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode if self.proc else None


def make_haproxy_cfg(template, port, sock, servers):
    """deploy/haproxy.cfg with the test's global section, addresses and a faster check."""
    text = open(template).read()
    head, sep, rest = text.partition("\ndefaults")
    assert sep, "haproxy.cfg: no defaults section"
    glob = (f"global\n    stats socket {sock} mode 600 level admin\n"
            "    log stderr format short local0 info\n")
    rest = "\ndefaults" + rest

    def sub(pattern, repl, count_expected):
        nonlocal rest
        rest, n = re.subn(pattern, repl, rest, flags=re.M)
        assert n == count_expected, f"haproxy.cfg: {pattern!r} matched {n} times, not {count_expected}"

    sub(r"^(\s*bind )\S+", rf"\g<1>127.0.0.1:{port}", 1)
    sub(r"^(\s*default-server )inter \S+ fall \S+ rise \S+", r"\g<1>inter 500ms fall 2 rise 1", 1)
    names = [s.name for s in servers]
    for s in servers:
        sub(rf"^(\s*server {s.name} )\S+", rf"\g<1>127.0.0.1:{s.port}", 1)
    found = re.findall(r"^\s*server (\S+)", rest, flags=re.M)
    assert found == names, f"haproxy.cfg: servers {found}, the test runs {names}"
    return glob + rest


def haproxy_cmd(sock, cmd):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(2)
        s.connect(sock)
        s.sendall(cmd.encode() + b"\n")
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out.decode()
            out += chunk


def server_status(sock):
    try:
        text = haproxy_cmd(sock, "show stat").lstrip("# ")
    except OSError:
        return {}
    return {r["svname"]: r["status"] for r in csv.DictReader(io.StringIO(text))
            if r.get("pxname") == "straycat" and r["svname"] not in ("FRONTEND", "BACKEND")}


# ---------------------------------------------------------------- the users


class Phase:
    def __init__(self):
        self.name = "warmup"
        self.chatting = True  # users send new messages
        self.done = False


class User:
    def __init__(self, i, hport, phase):
        self.name = f"u{i:03d}"
        self.page = i % 2 == 0  # kiosk-page-like client, else plain Cheshire Cat client
        self.hport, self.ph = hport, phase
        self.last_seq = None  # highest seq seen
        self.seqs = []  # (phase, seq) in arrival order
        self.pending = {}  # id -> text: sent, reply owed
        self.n = 0
        self.turns = {}  # phase -> replies received
        self.closes = []  # (phase, how)
        self.gaps = []  # (phase, description)
        self.handshake_retries = 0
        self.reconnect_s = []  # time from losing a socket to the next open one
        self.lost_at_drain = set()  # plain: ids owed when the drained instance closed
        self.late = []  # (phase, reply_to) replies to ids from an earlier connection
        self.conn_phase_ids = {}
        self.resent = 0
        self.owed_drain = 0  # replies owed when the drained instance closed the socket
        self.reconnect_asked = False  # close and reconnect at the next quiet moment
        self.ws = None
        self.conn_phase = None  # the phase in which the open socket was opened
        self.sent_at = {}  # id -> time.monotonic() it was sent first

    def path(self):
        p = f"/ws/{self.name}"
        if self.page and self.last_seq is not None:
            p += f"?since={self.last_seq}"
        return p

    async def open(self):
        lost = time.monotonic()
        delay = 0.05
        while True:
            try:
                self.ws = await WS.connect(self.hport, self.path())
                break
            except (HandshakeError, OSError, asyncio.TimeoutError) as e:
                self.handshake_retries += 1
                if time.monotonic() - lost > CONNECT_DEADLINE:
                    raise RuntimeError(f"{self.name}: no connection within {CONNECT_DEADLINE:.0f} s: {e}")
                await asyncio.sleep(delay * (0.5 + random.random() / 2))
                delay = min(delay * 2, 1.0)
        self.reconnect_s.append(time.monotonic() - lost)
        self.opened_at = time.monotonic()
        self.conn_phase = self.ph.name
        self.conn_ids = set()
        if self.page:  # the page resends every message still owed a reply, same id
            for mid, text in self.pending.items():
                self.ws.send_json({"text": text, "id": mid})
                self.resent += 1

    def send_new(self):
        self.n += 1
        mid = f"{self.name}-m{self.n}"
        text = " ".join(f"{self.name}w{self.n}.{k}" for k in range(WORDS))
        self.pending[mid] = text
        self.sent_at[mid] = time.monotonic()
        self.conn_ids.add(mid)
        self.ws.send_json({"text": text, "id": mid})

    def on_frame(self, raw):
        f = json.loads(raw)
        if f.get("type") == "chat_token":
            return
        seq = f.get("seq")
        if isinstance(seq, int):
            if self.page and self.last_seq is not None and seq <= self.last_seq:
                return  # a replay of something seen (the page ignores these too)
            self.seqs.append((self.conn_phase, seq))
            self.last_seq = seq if self.last_seq is None else max(self.last_seq, seq)
        rt = f.get("reply_to")
        if f.get("type") == "error" and f.get("name") == "ResumeGap" and rt is None:
            self.gaps.append((self.ph.name, f.get("description")))
            return
        if f.get("type") in ("chat", "error") and rt is not None:
            if f.get("type") == "error":
                fail(f"{self.name}: error {f.get('name')} for {rt}: {f.get('description')}")
            if rt in self.pending:
                del self.pending[rt]
                self.turns[self.ph.name] = self.turns.get(self.ph.name, 0) + 1
                if rt not in self.conn_ids:
                    self.late.append((self.ph.name, rt))
            elif rt in self.lost_at_drain:
                self.lost_at_drain.discard(rt)
                self.late.append((self.ph.name, rt))

    async def run(self):
        await self.open()
        warm = 0
        while not self.ph.done:
            if self.reconnect_asked and not self.pending:
                self.reconnect_asked = False
                await self.ws.close()
                self.closes.append((self.ph.name, "client"))
                await self.open()
            if not self.pending and self.ph.chatting:
                await asyncio.sleep(random.random() * 0.1)  # think time
                if self.ph.chatting and not self.ph.done:
                    self.send_new()
            elif not self.pending and not self.ph.chatting:
                # quiet: nothing owed, nothing to send; still read (pings, a kick)
                pass
            raw = None
            try:
                raw = await asyncio.wait_for(self.ws.recv(), 0.2 if not self.pending else FRAME_TIMEOUT)
            except asyncio.TimeoutError:
                if self.pending:
                    fail(f"{self.name}: no frame for {FRAME_TIMEOUT:.0f} s with a reply owed")
                    return
                continue
            if raw is not None:
                self.on_frame(raw)
                if self.ph.name == "warmup" and not self.pending:
                    warm += 1
                    if warm == 3:  # a client-side reconnect: must land on the same instance
                        await self.ws.close()
                        self.closes.append((self.ph.name, "client"))
                        await self.open()
                continue
            how = self.ws.closed
            self.closes.append((self.ph.name, how))
            if self.ph.name == "drain":
                self.owed_drain += len(self.pending)
                self.closed_at = time.monotonic()
            if not self.page and self.pending:
                # A plain client does not resend: what it was owed waits (or is lost).
                self.lost_at_drain |= set(self.pending)
                self.pending.clear()
            if self.ph.done:
                return
            await self.open()
        if self.ws and not self.ws.closed:
            await self.ws.close()


# ---------------------------------------------------------------- the run


async def main_async(args):
    t0 = time.monotonic()
    work = args.work
    inst = [Instance(n, args.straycat, work) for n in ("s1", "s2", "s3")]
    by_name = {i.name: i for i in inst}
    for i in inst:
        i.start()
    hport = free_port()
    sock = os.path.join(work, "haproxy.sock")
    cfg = os.path.join(work, "haproxy.cfg")
    with open(cfg, "w") as f:
        f.write(make_haproxy_cfg(args.cfg, hport, sock, inst))
    chk = subprocess.run([args.haproxy, "-c", "-f", cfg], capture_output=True, text=True)
    if chk.returncode != 0:
        fail(f"haproxy -c rejects the generated config: {chk.stdout}{chk.stderr}".strip())
        return inst, None
    hlog = open(os.path.join(work, "haproxy.log"), "ab")
    hap = subprocess.Popen([args.haproxy, "-db", "-f", cfg], stdout=hlog, stderr=hlog,
                           stdin=subprocess.DEVNULL)
    children.append(hap)
    try:
        await run_users(args, inst, by_name, hport, sock, hap, t0)
    finally:
        for i in inst:
            i.stop()
        if hap.poll() is None:
            hap.send_signal(signal.SIGTERM)
            try:
                hap.wait(5)
            except subprocess.TimeoutExpired:
                hap.kill()
    return inst, hap


async def run_users(args, inst, by_name, hport, sock, hap, t0):
    if not await await_until("HAProxy to see all three instances UP",
                             lambda: hap.poll() is None and
                             all(v == "UP" for v in server_status(sock).values()) and
                             len(server_status(sock)) == 3, 10):
        return
    ph = Phase()
    users = [User(i, hport, ph) for i in range(USERS)]
    off0 = {i.name: i.log_size() for i in inst}
    tasks = [asyncio.ensure_future(u.run()) for u in users]

    def crashed():
        for t in tasks:
            if t.done() and t.exception():
                fail(f"a user stopped: {t.exception()}")
                return True
        return False

    async def phase_until(what, pred, deadline):
        ok = await await_until(what, lambda: pred() or crashed(), deadline)
        return ok and not crashed()

    # 1. warm-up: every user connects, 3 turns, closes and reconnects, chats on.
    if not await phase_until("100 users to chat 5 turns each",
                             lambda: all(u.turns.get("warmup", 0) >= 5 for u in users), 30):
        return await finish(tasks, ph)
    t_warm = time.monotonic() - t0
    home = {}
    for i in inst:
        for user, _ in i.connects_since(off0[i.name]):
            home.setdefault(user, set()).add(i.name)
    split = [u for u, s in home.items() if len(s) != 1]
    if len(home) != USERS:
        fail(f"connections of {len(home)} users in the logs, not {USERS}")
    if split:
        fail(f"{len(split)} users reached more than one instance before any drain: {split[:5]}")
    home = {u: min(s) for u, s in home.items()}
    spread = {i.name: sum(1 for h in home.values() if h == i.name) for i in inst}
    print(f"== sticky routing: {USERS} users, 2 connections each, every user on one instance: "
          f"s1 {spread['s1']}, s2 {spread['s2']}, s3 {spread['s3']}", flush=True)
    if min(spread.values()) < 10:
        fail(f"uneven spread {spread}: an instance has fewer than 10 of 100 users")
    drained = [u for u in users if home.get(u.name) == DRAINED]
    others = [u for u in users if home.get(u.name) != DRAINED]

    # 2. drain: SIGTERM mid-conversation; its users must reconnect to the others and chat on.
    ph.name = "drain"
    off1 = {i.name: i.log_size() for i in inst}
    owed_at_drain = sum(1 for u in drained if u.pending)
    t_sig = ph.t_sig = time.monotonic()
    # In a thread: the users go on reading (and answering the close handshake) meanwhile.
    rc = await asyncio.get_running_loop().run_in_executor(None, by_name[DRAINED].stop)
    t_stop = time.monotonic() - t_sig
    if rc != 0:
        fail(f"{DRAINED} exited {rc} after SIGTERM, not 0")
    print(f"== drained {DRAINED} (SIGTERM, exit {rc} after {t_stop:.2f} s): {len(drained)} users, "
          f"{owed_at_drain} of them with a reply owed", flush=True)
    if not await phase_until(f"{DRAINED}'s users to chat 3 turns on the others",
                             lambda: all(u.turns.get("drain", 0) >= 3 for u in drained), 30):
        return await finish(tasks, ph)
    await await_until(f"HAProxy to mark {DRAINED} DOWN",
                      lambda: server_status(sock).get(DRAINED, "").startswith("DOWN"), 10)
    # Once it is down, each moved user reconnects once more: it must reach the same fallback
    # (the new session it started there), not a third instance.
    ph.name = "drain2"
    for u in drained:
        u.reconnect_asked = True
    if not await phase_until(f"{DRAINED}'s users to reconnect once more and chat a turn",
                             lambda: all(u.turns.get("drain2", 0) >= 1 for u in drained), 20):
        return await finish(tasks, ph)
    fallback = {}
    for i in inst:
        if i.name == DRAINED:
            continue
        for user, _ in i.connects_since(off1[i.name]):
            fallback.setdefault(user, set()).add(i.name)
    moved_wrong = [u.name for u in others if u.name in fallback]
    if moved_wrong:
        fail(f"{len(moved_wrong)} users of other instances reconnected during the drain: {moved_wrong[:5]}")
    missing = [u.name for u in drained if u.name not in fallback]
    if missing:
        fail(f"{len(missing)} drained users have no connection on another instance: {missing[:5]}")
    split = [u for u in fallback if len(fallback[u]) != 1]
    if split:
        fail(f"{len(split)} drained users reached two fallback instances: {split[:5]}")
    fb_spread = {}
    for u in drained:
        for f in fallback.get(u.name, ()):
            fb_spread[f] = fb_spread.get(f, 0) + 1
    others_closed = [u.name for u in others if any(p == "drain" for p, _ in u.closes)]
    if others_closed:
        fail(f"{len(others_closed)} users of the other instances lost their socket: {others_closed[:5]}")
    how = {}
    for u in drained:
        for p, h in u.closes:
            if p == "drain":
                how[str(h)] = how.get(str(h), 0) + 1
    reconn = [u.opened_at - t_sig for u in drained]
    told = [u.closed_at - t_sig for u in drained if hasattr(u, "closed_at")]
    print(f"== 1001 received {min(told):.3f}..{max(told):.3f} s after the SIGTERM, "
          f"open again {min(reconn):.3f}..{max(reconn):.3f} s after it", flush=True)
    print(f"== {len(drained)} users reconnected through HAProxy to {fb_spread} and chatted on "
          f"(closes seen: {how}; reconnect max {max(reconn):.2f} s, "
          f"upgrade retries by clients {sum(u.handshake_retries for u in drained)})", flush=True)

    # 3. the drained instance comes back; HAProxy's check sees it; users are sent home.
    ph.name = "return"
    ph.chatting = False  # a quiet moment for the kick (see deploy/README.md)
    await phase_until("every turn owed to be answered", lambda: all(not u.pending for u in users), 15)
    off2 = {i.name: i.log_size() for i in inst}
    t_ret = time.monotonic()
    await asyncio.get_running_loop().run_in_executor(None, by_name[DRAINED].start)
    if not await phase_until(f"HAProxy to mark {DRAINED} UP again",
                             lambda: server_status(sock).get(DRAINED) == "UP", 10):
        return await finish(tasks, ph)
    t_up = time.monotonic() - t_ret
    # HAProxy never moves an open tunnel; cut those of the instances that took the moved users.
    for name in sorted(fb_spread):
        haproxy_cmd(sock, f"shutdown sessions server straycat/{name}")
    ph.name = "home"
    ph.chatting = True
    if not await phase_until("every user to chat 2 turns after going home",
                             lambda: all(u.turns.get("home", 0) >= 2 for u in users), 30):
        return await finish(tasks, ph)
    ph.done = True
    await finish(tasks, ph)
    back = {}
    for i in inst:
        for user, _ in i.connects_since(off2[i.name]):
            back.setdefault(user, set()).add(i.name)
    not_home = [u.name for u in users if back.get(u.name, {home[u.name]}) != {home[u.name]}]
    if not_home:
        fail(f"{len(not_home)} users did not land home after the return: {not_home[:5]}")
    went_home = sum(1 for u in drained if back.get(u.name) == {DRAINED})
    if went_home != len(drained):
        fail(f"only {went_home} of {len(drained)} drained users connected to {DRAINED} again")

    # What the drained users lost and got back.
    page = [u for u in drained if u.page]
    plain = [u for u in drained if not u.page]
    gaps_fb = sum(1 for u in page for p, _ in u.gaps if p == "drain")
    gaps_home = sum(1 for u in page for p, _ in u.gaps if p in ("return", "home"))
    resent = sum(u.resent for u in page)
    plain_owed = sum(u.owed_drain for u in plain)
    page_owed = sum(u.owed_drain for u in page)
    plain_late = sum(1 for u in plain for p, _ in u.late if p in ("return", "home"))
    plain_never = sum(len(u.lost_at_drain) for u in plain)
    # seq: a page client's seqs only ever grow; a plain client's first seq at home is above
    # what it had from that instance before the drain (the old session, not a new one).
    for u in page:
        s = [q for _, q in u.seqs]
        if s != sorted(set(s)):
            fail(f"{u.name}: seqs went back or repeated: {s}")
    seq_home_ok = 0
    for u in plain:
        before = [q for p, q in u.seqs if p == "warmup"]
        at_home = [q for p, q in u.seqs if p == "home"]
        if before and at_home and at_home[0] > max(before):
            seq_home_ok += 1
        else:
            fail(f"{u.name}: seq at home {at_home[:1]} does not continue {max(before, default=None)}")
    # The conversation: the history the agent sees, asked through HAProxy with the user_id
    # header (the HTTP API routes by the same key), holds the turns from before the drain.
    hist_ok = fb_left = 0
    for u in drained:
        st, body = http_get(hport, "/memory/conversation_history", {"user_id": u.name})
        texts = [h.get("content") for h in json.loads(body)["history"]] if st == 200 else []
        if any(t and f"{u.name}w1.0" in t for t in texts):
            hist_ok += 1
        else:
            fail(f"{u.name}: history at home lacks the first turn ({st}, {len(texts)} lines)")
        for f in fallback.get(u.name, ()):
            st, body = http_get(by_name[f].port, "/memory/conversation_history", {"user_id": u.name})
            if st == 200 and json.loads(body)["history"]:
                fb_left += 1
    # A message the client sent after the SIGTERM reached the instance was never accepted
    # (it stopped reading): nothing can hold its reply. One sent before must come back.
    never_after = never_before = 0
    for u in plain:
        for mid in u.lost_at_drain:
            if u.sent_at[mid] >= ph.t_sig:
                never_after += 1
            else:
                never_before += 1
                fail(f"{u.name}: the reply to {mid}, sent {ph.t_sig - u.sent_at[mid]:.3f} s "
                     f"before the SIGTERM, never arrived")
    total = time.monotonic() - t0
    print("== report", flush=True)
    print(f"   routing: {USERS} users {spread}; drained {DRAINED}: {len(drained)} users "
          f"({len(page)} page-like, {len(plain)} plain clients)")
    print(f"   drain: exit {rc} in {t_stop:.2f} s; every user back within {max(reconn):.2f} s on "
          f"{fb_spread}; no other user lost a socket: {not others_closed}")
    print(f"   page-like clients: ResumeGap on the fallback {gaps_fb}, at home {gaps_home}; "
          f"replies owed at the drain {page_owed}, resent (same id) {resent}, lost 0 (answered on the fallback)")
    print(f"   plain clients: replies owed at the drain {plain_owed}, lost meanwhile {plain_owed}, "
          f"delivered late at home (held, re-run after restart) {plain_late}, never {plain_never} "
          f"(sent after the SIGTERM, never accepted: {never_after}); "
          f"seq continues the old session at home {seq_home_ok}/{len(plain)}")
    print(f"   return: {DRAINED} UP in HAProxy {t_up:.2f} s after start; home again "
          f"{went_home}/{len(drained)}; history from before the drain there {hist_ok}/{len(drained)}; "
          f"fallback conversations left on the fallback {fb_left}/{len(drained)}")
    print(f"   timing: warm-up {t_warm:.1f} s, whole run {total:.1f} s")


async def finish(tasks, ph):
    ph.done = True
    ph.chatting = False
    done, pend = await asyncio.wait(tasks, timeout=10)
    for t in pend:
        t.cancel()
    if pend:
        fail(f"{len(pend)} users did not finish within 10 s")
    for t in done:
        if not t.cancelled() and t.exception():
            fail(f"a user stopped: {t.exception()}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--straycat", required=True)
    ap.add_argument("--haproxy", required=True)
    ap.add_argument("--cfg", required=True)
    ap.add_argument("--work", required=True)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    asyncio.run(main_async(args))
    if failures:
        print(f"deploy/test.sh: FAILED ({len(failures)} checks); logs in {args.work}")
        sys.exit(1)
    print("deploy/test.sh: passed")


if __name__ == "__main__":
    main()
