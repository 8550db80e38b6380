"""The checks of tests/llm/run.sh: a real WebSocket client (the `websockets` package) talks
to straycat, whose openai agent talks, through proxy.py's recording relay, to
llama-cpp-python's server. The proxy's captures let each check compare what the user got
with what the server really sent.

    check.py SCENARIO --ws ws://127.0.0.1:P --dir PROXY_DIR --model NAME

Scenarios (run.sh runs serial against a straycat with --openai-max-concurrent 1 and the
model that stops by itself; queue and overflow with 1, cut with 2, against a server with
the model that never stops and a context of 512 tokens, so that every answer lasts about
500 tokens; long and timeout with a context of 4096):

  serial  alice's first turn streams several chat_tokens, each exactly one non-empty
          delta.content of the server's stream, and ends with a chat whose text is their
          concatenation; her second turn sends the first as history
          ([user, assistant, user]) and works the same way.
  queue   bob's turn is streaming when carol's arrives; with one request at a time carol's
          waits (her request reaches the server after bob's stream ended) and both get
          their complete answer.
  cut     the same with two requests at once: the server cuts bob's stream when carol's
          request arrives (it sends [DONE] without a finish_reason); bob must get an
          AgentError, never a partial chat, and carol her answer.
  overflow  erin's first turn fills the server's context (finish_reason "length"); her
          second, whose history no longer fits, gets the server's 200 with an empty body;
          straycat sends it again with less history (none here), and erin gets her chat;
          her third turn works too.
  long    a turn longer than 15 s, so the stream carries the server's `: ping` comments,
          ends with its complete chat.
  timeout with --turn-timeout-secs 2 and an answer of ~30 s: fay's turn ends with Timeout,
          the server sees the request go and stops; gus's turn, queued behind it, streams.

Prints one line per check (PASS/FAIL/INFO) and exits 1 if any failed.
"""

import argparse
import json
import os
import re
import sys
import threading
import time

from websockets.sync.client import connect

FAILED = []


def say(kind, name, detail):
    print(f"  {kind:4} {name}: {detail}", flush=True)
    if kind == "FAIL":
        FAILED.append(name)


def check(name, ok, detail):
    say("PASS" if ok else "FAIL", name, detail)
    return ok


def short(s, n=60):
    s = json.dumps(s, ensure_ascii=False)
    return s if len(s) <= n else s[: n - 1] + "…\""


# ---------------------------------------------------------------------------------------
# The client side.


class Turn:
    """One message sent and the frames of its reply."""

    def __init__(self, user, text, msg_id):
        self.user, self.text, self.id = user, text, msg_id
        self.tokens = []
        self.final = None  # the chat or error frame
        self.first_token = threading.Event()
        self.sent_at = None
        self.ended_at = None

    def ok_chat(self):
        return self.final is not None and self.final.get("type") == "chat"

    def reply(self):
        return self.final.get("text") if self.ok_chat() else None

    def describe(self):
        f = self.final
        if f is None:
            return "no final frame"
        if f.get("type") == "chat":
            return f"chat of {len(f.get('text', ''))} chars after {len(self.tokens)} chat_tokens"
        return f"{f.get('type')} {f.get('name')}: {f.get('description') or f.get('content')}"


def run_turn(ws, turn, timeout):
    turn.sent_at = time.time()
    ws.send(json.dumps({"text": turn.text, "id": turn.id}))
    deadline = time.time() + timeout
    while True:
        left = deadline - time.time()
        if left <= 0:
            raise TimeoutError(f"{turn.user}: no chat or error within {timeout}s")
        frame = json.loads(ws.recv(timeout=left))
        kind = frame.get("type")
        if kind == "chat_token":
            turn.tokens.append(frame["content"])
            turn.first_token.set()
        elif kind in ("chat", "error"):
            turn.final = frame
            turn.ended_at = time.time()
            turn.first_token.set()
            return turn


def one_turn(url, user, text, msg_id, timeout):
    with connect(f"{url}/ws/{user}", open_timeout=10, max_size=None) as ws:
        return run_turn(ws, Turn(user, text, msg_id), timeout)


def in_thread(url, turn, timeout):
    """Runs turn on its own socket in a thread; returns (thread, errors list)."""
    errors = []

    def go():
        try:
            with connect(f"{url}/ws/{turn.user}", open_timeout=10, max_size=None) as ws:
                run_turn(ws, turn, timeout)
        except Exception as e:  # reported by the caller
            errors.append(f"{type(e).__name__}: {e}")
            turn.first_token.set()

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t, errors


# ---------------------------------------------------------------------------------------
# What the server sent, from the proxy's captures.


def dechunk(body):
    """The chunks of a chunked body: (list of chunk payloads, complete?)."""
    chunks = []
    i = 0
    while True:
        j = body.find(b"\r\n", i)
        if j < 0:
            return chunks, False
        size = int(body[i:j].split(b";")[0], 16)
        if size == 0:
            return chunks, True
        start = j + 2
        if len(body) < start + size:
            chunks.append(body[start:])
            return chunks, False
        chunks.append(body[start : start + size])
        i = start + size + 2


class Exchange:
    """One request straycat made and the server's answer, as the proxy saw them."""

    def __init__(self, base, rec):
        self.n = rec["n"]
        self.rec = rec
        req = open(base + ".req", "rb").read()
        head, _, body = req.partition(b"\r\n\r\n")
        self.request_head = head.decode("latin-1")
        try:
            self.request = json.loads(body)
        except ValueError:
            self.request = None
        resp = open(base + ".resp", "rb").read()
        # When the proxy got "data: [DONE]" from the server (None: never).
        self.done_at = None
        pos = resp.find(b"data: [DONE]")
        if pos >= 0:
            for t, offset in rec.get("resp_reads", []):
                if offset <= pos:
                    self.done_at = t
        head, _, body = resp.partition(b"\r\n\r\n")
        self.response_head = head.decode("latin-1")
        self.raw_body = body
        if "transfer-encoding: chunked" in self.response_head.lower():
            self.chunks, self.complete = dechunk(body)
        else:
            self.chunks, self.complete = [body], True
        text = b"".join(self.chunks).decode("utf-8", "replace")
        self.events, self.comments = [], []
        for block in text.replace("\r\n", "\n").split("\n\n"):
            data = [ln[5:].lstrip(" ") for ln in block.split("\n") if ln.startswith("data:")]
            self.comments += [ln for ln in block.split("\n") if ln.startswith(":")]
            if data:
                self.events.append("\n".join(data))
        self.deltas, self.finish_reason, self.done = [], None, False
        self.first_chunk = None
        for data in self.events:
            if data.strip() == "[DONE]":
                self.done = True
                continue
            try:
                chunk = json.loads(data)
            except ValueError:
                continue
            if self.first_chunk is None:
                self.first_chunk = chunk
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    self.deltas.append(piece)
                if choice.get("finish_reason"):
                    self.finish_reason = choice["finish_reason"]

    def messages(self):
        return (self.request or {}).get("messages")

    def last_user_text(self):
        m = self.messages() or []
        return m[-1].get("content") if m else None


def exchanges(d):
    out = []
    log = os.path.join(d, "log.jsonl")
    if not os.path.exists(log):
        return out
    for line in open(log):
        rec = json.loads(line)
        base = os.path.join(d, f"{rec['n']:03d}")
        if os.path.exists(base + ".req"):
            out.append(Exchange(base, rec))
    return sorted(out, key=lambda e: e.n)


def wait_exchanges(d, turns, timeout=10):
    """The captures, once one holds each turn's request: the proxy logs a connection when
    it ends, a moment after straycat has answered."""
    deadline = time.time() + timeout
    while True:
        ex = exchanges(d)
        if all(exchange_for(ex, t) for t in turns) or time.time() > deadline:
            return ex
        time.sleep(0.05)


def exchange_for(exs, turn):
    found = [e for e in exs if e.last_user_text() == turn.text]
    return found[-1] if found else None


def check_reply(name, turn, ex, min_tokens=2):
    """A turn that must have ended with its complete chat."""
    if not check(f"{name}: ends with a chat", turn.ok_chat(), turn.describe()):
        return False
    text = turn.reply()
    check(f"{name}: several chat_tokens", len(turn.tokens) >= min_tokens, f"{len(turn.tokens)} chat_tokens")
    check(f"{name}: chat text is the tokens' concatenation, non-empty",
          text == "".join(turn.tokens) and text != "",
          f"{len(text)} chars, {short(text)}")
    check(f"{name}: chat frame's content and reply_to", turn.final.get("content") == text
          and turn.final.get("reply_to") == turn.id, f"reply_to={turn.final.get('reply_to')!r}")
    if ex is None:
        return check(f"{name}: the server's stream was captured", False, "no request with this text")
    check(f"{name}: each chat_token is one delta.content the server sent",
          turn.tokens == ex.deltas, f"{len(ex.deltas)} non-empty deltas in the server's stream")
    check(f"{name}: the server finished that stream", ex.finish_reason is not None,
          f"finish_reason={ex.finish_reason!r}, [DONE]={ex.done}")
    nonascii = sum(1 for c in text if ord(c) > 127)
    astral = sum(1 for c in text if ord(c) > 0xFFFF)
    escaped = len(re.findall(rb"\\u[0-9a-fA-F]{4}", ex.raw_body))
    pairs = len(re.findall(rb"\\ud[89ab][0-9a-f]{2}\\ud[c-f][0-9a-f]{2}", ex.raw_body, re.I))
    say("INFO", name, f"{nonascii} non-ASCII characters in the reply ({astral} past U+FFFF); the "
        f"server's stream had {escaped} \\u escapes ({pairs} surrogate pairs), {len(ex.chunks)} "
        f"HTTP chunks for {len(ex.events)} events, {len(ex.comments)} comment lines")
    return True


# ---------------------------------------------------------------------------------------
# The scenarios.


def serial(a):
    t1 = one_turn(a.ws, "alice", "Hello, who are you?", "a-1", a.timeout)
    exs = wait_exchanges(a.dir, [t1])
    ex1 = exchange_for(exs, t1)
    check_reply("turn 1", t1, ex1)
    if ex1 is not None:
        req = ex1.request or {}
        check("turn 1: request is streamed, for the model, with one user message",
              req.get("stream") is True and req.get("model") == a.model
              and ex1.messages() == [{"role": "user", "content": t1.text}],
              f"model={req.get('model')!r} stream={req.get('stream')!r} messages={short(ex1.messages(), 90)}")
    t2 = one_turn(a.ws, "alice", "Tell me more about that.", "a-2", a.timeout)
    exs = wait_exchanges(a.dir, [t2])
    ex2 = exchange_for(exs, t2)
    check_reply("turn 2", t2, ex2)
    if ex2 is not None:
        want = [{"role": "user", "content": t1.text},
                {"role": "assistant", "content": t1.reply()},
                {"role": "user", "content": t2.text}]
        check("turn 2: the history was sent (user, assistant = turn 1's chat, user)",
              ex2.messages() == want,
              f"{len(ex2.messages() or [])} messages, roles {[m.get('role') for m in ex2.messages() or []]}")


def pair(a, prefix):
    """bob's turn, and carol's sent once bob's first chat_token arrived."""
    bob = Turn(f"{prefix}bob", f"{prefix}bob: tell me a long story, please.", "b-1")
    carol = Turn(f"{prefix}carol", f"{prefix}carol: and what about me?", "c-1")
    tb, eb = in_thread(a.ws, bob, a.timeout)
    if not bob.first_token.wait(a.timeout):
        check("bob's turn started streaming", False, "no chat_token")
    bob_then = len(bob.tokens)
    tc, ec = in_thread(a.ws, carol, a.timeout)
    tb.join(a.timeout + 5)
    tc.join(a.timeout + 5)
    for who, errs in (("bob", eb), ("carol", ec)):
        for e in errs:
            check(f"{who}'s socket", False, e)
    overlapped = bob.ended_at is not None and carol.sent_at is not None and carol.sent_at < bob.ended_at
    say("INFO", prefix + "timing", f"carol sent {1000 * (carol.sent_at - bob.sent_at):.0f} ms after bob, "
        f"while bob's turn was {'still running' if overlapped else 'already over'} "
        f"(bob had {bob_then} chat_tokens when carol's thread started)")
    return bob, carol, overlapped


def queue(a):
    bob, carol, overlapped = pair(a, "q")
    check("queue: carol's turn arrived while bob's was streaming", overlapped,
          "else this run proves nothing about waiting")
    exs = wait_exchanges(a.dir, [bob, carol])
    eb, ec = exchange_for(exs, bob), exchange_for(exs, carol)
    check_reply("queue: bob", bob, eb)
    check_reply("queue: carol", carol, ec)
    if eb and ec:
        first, second = sorted((eb, ec), key=lambda e: e.rec.get("req_first", 0))
        ok = first.done_at is not None and second.rec.get("req_first", 0) >= first.done_at
        gap = second.rec.get("req_first", 0) - (first.done_at or 0)
        check("queue: the second request reached the server only after the first stream's [DONE]",
              ok, f"{1000 * gap:.1f} ms after" if first.done_at else "the first had no [DONE]")


def cut(a):
    bob, carol, overlapped = pair(a, "x")
    exs = wait_exchanges(a.dir, [bob, carol])
    eb, ec = exchange_for(exs, bob), exchange_for(exs, carol)
    for who, turn, ex in (("bob", bob, eb), ("carol", carol, ec)):
        srv = "no request captured" if ex is None else (
            f"server sent {len(ex.deltas)} deltas, finish_reason={ex.finish_reason!r}, [DONE]={ex.done}")
        say("INFO", f"cut: {who}", f"{turn.describe()}; {srv}")
    if eb and ec:
        a_ = (eb.rec.get("req_first", 0), eb.rec.get("resp_last", 0))
        b_ = (ec.rec.get("req_first", 0), ec.rec.get("resp_last", 0))
        say("INFO", "cut: requests at the server", "overlapping" if b_[0] < a_[1] else "one after the other")
    # Whatever the timing: a chat only for a finished stream, with all of it; an
    # unfinished stream only ever an AgentError.
    for who, turn, ex in (("bob", bob, eb), ("carol", carol, ec)):
        if ex is None or turn.final is None:
            check(f"cut: {who} got an answer", False, turn.describe())
            continue
        if ex.finish_reason is None:
            check(f"cut: {who}'s stream was cut, so an AgentError (never a partial chat)",
                  turn.final.get("type") == "error" and turn.final.get("name") == "AgentError",
                  turn.describe())
        else:
            check_reply(f"cut: {who} (stream finished)", turn, ex)
    cut_one = [w for w, ex in (("bob", eb), ("carol", ec)) if ex is not None and ex.finish_reason is None]
    if overlapped:
        check("cut: the server cut bob's stream when carol's request came", cut_one == ["bob"],
              f"cut: {cut_one or 'none'}")
    else:
        say("INFO", "cut", "bob's turn was over before carol's came: nothing to cut this time")


def overflow(a):
    t1 = one_turn(a.ws, "erin", "Fill your context, please.", "e-1", a.timeout)
    exs = wait_exchanges(a.dir, [t1])
    check_reply("overflow: turn 1", t1, exchange_for(exs, t1))
    t2 = one_turn(a.ws, "erin", "And now?", "e-2", a.timeout)
    exs = wait_exchanges(a.dir, [t2])
    mine = [e for e in exs if e.last_user_text() == t2.text]
    sizes = [len(e.messages() or []) for e in mine]
    empty = [e for e in mine if e.raw_body.strip() in (b"", b"0")]
    check("overflow: turn 2's first request, with the history, got the server's empty 200",
          len(mine) >= 2 and len(empty) >= 1, f"{len(mine)} requests, messages {sizes}")
    check("overflow: turn 2 was sent again with less history and ends with its chat",
          t2.ok_chat() and len(sizes) >= 2 and sizes[-1] < sizes[0], t2.describe())
    t3 = one_turn(a.ws, "erin", "Hi?", "e-3", a.timeout)
    exs = wait_exchanges(a.dir, [t3])
    check("overflow: turn 3 works too (the user is not locked out)", t3.ok_chat(), t3.describe())


def long(a):
    t = one_turn(a.ws, "dora", "Please talk for a long time.", "d-1", a.timeout)
    exs = wait_exchanges(a.dir, [t])
    ex = exchange_for(exs, t)
    took = (t.ended_at or time.time()) - t.sent_at
    say("INFO", "long", f"the turn took {took:.1f} s")
    check_reply("long", t, ex)
    if ex is not None:
        pings = [c for c in ex.comments if c.startswith(": ping")]
        check("long: the stream carried ': ping' comments (else it was shorter than 15 s: "
              "raise its --n_ctx in run.sh)", len(pings) > 0,
              f"{len(pings)} pings, e.g. {pings[0]!r}" if pings else f"{len(ex.comments)} comment lines")


def server_disconnects(path, at_least, wait=5):
    """'Disconnected from client' lines in the llama server's log (it prints one when it sees
    the client gone and stops generating), waiting up to `wait` s for `at_least`."""
    deadline = time.time() + wait
    while True:
        n = open(path, errors="replace").read().count("Disconnected from client")
        if n >= at_least or time.time() > deadline:
            return n
        time.sleep(0.1)


def timeout(a):
    """straycat runs with --turn-timeout-secs 2 against the long server (answers of ~30 s)."""
    before = server_disconnects(a.server_log, 0, 0)
    fay = one_turn(a.ws, "fay", "Talk forever, please.", "f-1", a.timeout)
    check("timeout: a turn past --turn-timeout-secs ends with Timeout (after its tokens)",
          fay.final is not None and fay.final.get("name") == "Timeout" and len(fay.tokens) > 0,
          f"{len(fay.tokens)} chat_tokens, then {fay.describe()}, "
          f"{fay.ended_at - fay.sent_at:.1f} s after the message")
    n = server_disconnects(a.server_log, before + 1)
    check("timeout: the server saw straycat close the request and stopped generating",
          n > before, f"{n - before} new 'Disconnected from client' line(s) in its log")
    gus = one_turn(a.ws, "gus", "And me?", "g-1", a.timeout)
    check("timeout: the next turn (one request at a time) gets the server and streams",
          len(gus.tokens) > 0 and gus.final is not None and gus.final.get("name") == "Timeout",
          f"{len(gus.tokens)} chat_tokens, then {gus.describe()}")
    exs = wait_exchanges(a.dir, [fay, gus])
    ef = exchange_for(exs, fay)
    if ef is not None:
        say("INFO", "timeout: fay's stream", f"the server sent {len(ef.deltas)} deltas in "
            f"{ef.rec.get('resp_last', 0) - ef.rec.get('req_first', 0):.1f} s, no finish_reason: "
            f"{ef.finish_reason is None}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("scenario", choices=["serial", "queue", "cut", "overflow", "long", "timeout"])
    ap.add_argument("--server-log", help="timeout: the llama server's log")
    ap.add_argument("--ws", required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--timeout", type=float, default=60)
    a = ap.parse_args()
    try:
        globals()[a.scenario](a)
    except Exception as e:
        check(a.scenario, False, f"{type(e).__name__}: {e}")
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
