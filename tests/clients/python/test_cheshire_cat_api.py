"""straycat against the official Cheshire Cat Python client, `cheshire-cat-api` (PyPI, import
`cheshire_cat_api`), the version pinned in ../requirements.txt.

What the client does (read from its source, cat_client.py): `connect_ws()` opens
`ws://HOST:PORT/ws/{user_id}` (`wss` with `secure_connection`), adding `?token={auth_key}`
when a key is set, with websocket-client's `WebSocketApp.run_forever` on a thread of its
own, never reconnecting; `send(text, **kwargs)` sends `{"text": text, **kwargs}`; every
text message goes to `on_message(raw)` untouched (without a callback the client prints
`json.loads(raw)["content"]`); `on_close(code, reason)`, `on_error(exc)`. Its HTTP API
(OpenAPI-generated, urllib3) sends `access_token: {auth_key}` on every request (the empty
string without a key), no `user_id` header (so the Cat's default user `user`, unless a call
passes `_headers`), and calls the chat part of the API at `GET /` (status),
`GET /memory/conversation_history/` and `DELETE /memory/conversation_history/`, with the
trailing slash. It has no `POST /message`.

The HTTP tests skip while straycat answers 404/405 on `/memory/conversation_history`; where
straycat lacks something the client expects (the trailing-slash path, history entries'
`when`), they note it, carry on, and end as xfail naming it once their other checks passed.
"""

import socket
import threading
import time

import cheshire_cat_api as ccat
import pytest
from cheshire_cat_api.exceptions import ApiException, ForbiddenException

from harness import WAIT_S, Client, Server, has_chat_api

KEY = "kiosk-secret-42"
# The echo agent streams word by word: at 300 ms a word, this reply takes 2.1 s.
SLOW_TEXT = "the kiosk closes while the cat answers"


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def slow():
    """Streams slowly (a stand-in for a slow model); one turn at a time per user."""
    s = Server("--echo-delay-ms", "300", "--max-queued-turns", "0")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def keyed():
    s = Server("--api-key", KEY)
    yield s
    s.stop()


@pytest.fixture
def clients():
    """Makes clients and closes every one of them at the end of the test."""
    made = []

    def make(port, user_id="user", auth_key=""):
        c = Client(port, user_id, auth_key)
        made.append(c)
        return c

    yield make
    for c in made:
        try:
            c.close()
        except Exception:  # a failed test's client: its close is best effort
            pass


def check_chat(frame, user_id, text):
    """A `chat` frame as Cheshire Cat 1.x sends it (the echo agent answers the text)."""
    assert frame["type"] == "chat", frame
    assert frame["who"] == "AI"
    assert frame["user_id"] == user_id
    assert frame["text"] == text and frame["content"] == text
    assert frame["why"]["input"] == text
    assert isinstance(frame["why"]["intermediate_steps"], list)
    assert isinstance(frame["why"]["memory"], dict)
    assert isinstance(frame["when"], float)
    assert isinstance(frame["seq"], int)


# --- (a) chat ---------------------------------------------------------------------------


def test_chat_tokens_then_the_reply(server, clients):
    c = clients(server.port, "py-alice").connect()
    c.cat.send("hello from the python client")
    reply = c.wait_reply()
    check_chat(reply, "py-alice", "hello from the python client")
    tokens = [f for f in c.frames if f["type"] == "chat_token"]
    assert tokens and c.frames[-1] is reply, c.frames
    assert "".join(t["content"] for t in tokens) == reply["text"]
    assert all("seq" not in t for t in tokens)


def test_every_frame_has_content_for_the_default_handler(server, capsys):
    """Without on_message the client prints json.loads(raw)["content"] of every frame."""
    opened = threading.Event()
    cat = ccat.CatClient(
        ccat.Config(base_url="127.0.0.1", port=server.port, user_id="py-default"),
        on_open=opened.set,
    )
    cat.connect_ws()
    try:
        assert opened.wait(WAIT_S), "no open"
        cat.send("print me please")
        # What the client prints is the only trace: read it until the reply's line is there.
        out, deadline = "", time.monotonic() + WAIT_S
        while "print me please\n" not in out and time.monotonic() < deadline:
            out += capsys.readouterr().out
            if "print me please\n" not in out:
                time.sleep(0.05)  # a poll under the deadline
        assert out.splitlines() == ["print", " me", " please", "print me please"], out
    finally:
        cat.close()


def test_several_users_at_once(server, clients):
    users = [clients(server.port, f"py-user-{i}").connect() for i in range(4)]
    for c in users:
        c.cat.send(f"I am {c.user_id}")
    for c in users:
        check_chat(c.wait_reply(), c.user_id, f"I am {c.user_id}")


def test_extra_fields_and_the_id_extension(server, clients):
    """send(text, **kwargs) adds fields: straycat's `id` comes back as `reply_to`, and a
    resend of the same id after a reconnect gives the same reply, not a second turn."""
    c = clients(server.port, "py-ids").connect()
    c.cat.send("once only", id="py-1", lang="en")
    first = c.wait_reply()
    check_chat(first, "py-ids", "once only")
    assert first["reply_to"] == "py-1"
    c.close()
    again = clients(server.port, "py-ids").connect()
    again.cat.send("once only", id="py-1")
    second = again.wait_reply()
    assert second["reply_to"] == "py-1" and second["seq"] == first["seq"], second
    assert not [f for f in again.frames if f["type"] == "chat_token"], "the turn ran again"


def test_a_second_client_of_the_same_user_replaces_the_first(server, clients):
    """The replaced client is closed with 1000 `replaced`; this client never reconnects."""
    a = clients(server.port, "py-twice").connect()
    b = clients(server.port, "py-twice").connect()
    assert a.wait_closed()[1:] == (1000, "replaced")
    b.cat.send("still here")
    check_chat(b.wait_reply(), "py-twice", "still here")
    assert len(a.has("open")) == 1


def test_an_error_frame_reaches_on_message(slow, clients):
    """`error` frames come through on_message like every other frame (Busy: no queue)."""
    c = clients(slow.port, "py-busy").connect()
    c.cat.send("one two")
    c.cat.send("three")
    err = c.wait_frame(lambda f: f["type"] == "error", "error")
    assert err["name"] == "Busy" and err["content"] and err["description"], err
    check_chat(c.wait_frame(lambda f: f["type"] == "chat", "chat"), "py-busy", "one two")


# --- (b) closing mid-answer -------------------------------------------------------------


@pytest.mark.parametrize("how", ["close", "drop"])
def test_closed_mid_answer_the_next_client_gets_the_held_reply(slow, clients, how):
    """close: CatClient.close() (a close handshake) after the first token; drop: the TCP
    connection shut without one (a kiosk that loses its network). The turn runs to its
    end; a new client of the same user gets the `chat` on connect (held: no tokens)."""
    user = f"py-held-{how}"
    a = clients(slow.port, user).connect()
    mark = slow.mark()
    a.cat.send(SLOW_TEXT)
    a.wait_frame(lambda f: f["type"] == "chat_token", "first token")
    if how == "close":
        a.close()
    else:
        a.cat._ws.sock.sock.shutdown(socket.SHUT_RDWR)
        a.wait_closed()
    assert not [f for f in a.frames if f["type"] == "chat"], "the reply came before the close"
    # The server says when the reply is done with nobody connected: wait for that, so the
    # next client tests delivery of held frames on connect, not a live stream.
    slow.wait_log(lambda l: f"user={user} reply ready while away" in l, since=mark)
    b = clients(slow.port, user).connect()
    reply = b.wait_reply()
    check_chat(reply, user, SLOW_TEXT)
    assert b.frames[0] is reply, f"expected the held reply first, got {b.frames}"


# --- (c) --api-key ----------------------------------------------------------------------


def test_api_key_the_clients_token_is_accepted(keyed, clients):
    c = clients(keyed.port, "py-keyed", auth_key=KEY).connect()
    c.cat.send("with the key")
    check_chat(c.wait_reply(), "py-keyed", "with the key")


@pytest.mark.parametrize("key", ["not-the-key", ""])
def test_api_key_a_wrong_or_missing_token_is_refused(keyed, clients, key):
    c = clients(keyed.port, "py-intruder", auth_key=key)
    c.cat.connect_ws()
    c.wait_closed()
    errors = c.has("error")
    assert errors and getattr(errors[0][1], "status_code", None) == 403, c.events
    assert not c.has("open") and not c.frames


# --- (d) the HTTP API (skipped until straycat serves it) --------------------------------


def require_chat_api(port, headers=None):
    if not has_chat_api(port, headers):
        pytest.skip("straycat has no GET /memory/conversation_history yet (404/405)")


class Gaps:
    """What straycat's HTTP API lacks that the client expects (per the Cat's shapes). A test
    notes each gap and goes on; at its end, if every hard check passed, it is an xfail whose
    reason lists the gaps (and a pass once they are closed)."""

    def __init__(self):
        self.found = []

    def note(self, ok, what):
        if not ok and what not in self.found:
            self.found.append(what)

    def settle(self):
        if self.found:
            pytest.xfail("straycat's HTTP API: " + "; ".join(self.found))


class Memory:
    """The client's memory API (`cat.memory`) as the client calls it, with its trailing slash.
    When straycat answers that with 404, the gap is noted and the call is made again without
    the slash (only the path changes, through the client's own ApiClient), so that the rest
    of the test still checks the answers."""

    PATH = "/memory/conversation_history/"

    def __init__(self, cat, gaps):
        self.cat = cat
        self.gaps = gaps

    def call(self, name, user_id=None):
        headers = {"user_id": user_id} if user_id else None
        method = getattr(self.cat.memory, name)
        try:
            return method(_headers=headers, _request_timeout=WAIT_S)
        except ApiException as e:
            if e.status not in (404, 405):
                raise
            verb = "GET" if name.startswith("get") else "DELETE"
            self.gaps.note(
                False,
                f"{verb} {self.PATH} (with the trailing slash this client sends) answers "
                f"{e.status}; the Cat redirects it to the slash-less path (307, which urllib3 "
                "follows)",
            )
        api = self.cat.memory.api_client
        serialize = api.param_serialize

        def slashless(*args, **kwargs):
            if kwargs.get("resource_path") == self.PATH:
                kwargs["resource_path"] = self.PATH.rstrip("/")
            return serialize(*args, **kwargs)

        api.param_serialize = slashless
        try:
            return method(_headers=headers, _request_timeout=WAIT_S)
        finally:
            del api.param_serialize

    def history(self, user_id=None):
        return self.call("get_conversation_history", user_id)

    def wipe(self, user_id=None):
        return self.call("wipe_conversation_history", user_id)


def check_history(entries, said, answered, gaps):
    """History entries as the Cat has them: who, message, why, when (and 1.8's role, content)."""
    assert [e["who"] for e in entries] == ["Human", "AI"], entries
    human, ai = entries
    assert human["message"] == said and ai["message"] == answered
    for e in entries:
        assert e["role"] == e["who"] and e["content"] == e["message"], e
        assert isinstance(e.get("why", {}), dict), e
        gaps.note(
            isinstance(e.get("when"), (int, float)),
            "history entries have no `when` (the Cat's Unix time; ccat-api's "
            "ConversationMessage type requires it)",
        )


def test_http_history_of_a_websocket_chat(server, clients):
    """The history of the user of the `user_id` header (this client sends none: then the
    Cat's default `user`, which the test covers too), then wiped."""
    require_chat_api(server.port)
    gaps = Gaps()
    for user_id in ["py-history", "user"]:
        c = clients(server.port, user_id).connect()
        memory = Memory(c.cat, gaps)
        said = f"remember me, {user_id}"
        c.cat.send(said)
        c.wait_reply()
        header = None if user_id == "user" else user_id
        check_history(memory.history(header)["history"], said, said, gaps)
        assert memory.wipe(header) == {"deleted": True}
        assert memory.history(header) == {"history": []}
        # The session goes on after the wipe.
        mark = len(c.frames)
        c.cat.send("after the wipe")
        check_chat(c.wait_reply(start=mark), user_id, "after the wipe")
        check_history(memory.history(header)["history"], "after the wipe", "after the wipe", gaps)
    gaps.settle()


def test_http_history_with_the_api_key(keyed, clients):
    """The client's `access_token` header carries the key; a wrong or empty one gets 403."""
    require_chat_api(keyed.port, {"access_token": KEY})
    gaps = Gaps()
    c = clients(keyed.port, "user", auth_key=KEY).connect()
    c.cat.send("keyed history")
    c.wait_reply()
    got = Memory(c.cat, gaps).history()["history"]
    assert [e["message"] for e in got] == ["keyed history"] * 2
    for wrong_key in ["nope", ""]:
        wrong = ccat.CatClient(
            ccat.Config(base_url="127.0.0.1", port=keyed.port, auth_key=wrong_key)
        )
        with pytest.raises(ForbiddenException):
            Memory(wrong, gaps).history()
    gaps.settle()


def test_http_status_home(server):
    """status.home() (GET / with Accept: application/json) gets the Cat's status object."""
    cat = ccat.CatClient(ccat.Config(base_url="127.0.0.1", port=server.port))
    try:
        got = cat.status.home(_request_timeout=WAIT_S)
    except ApiException as e:
        pytest.fail(f"GET / answered {e.status}")
    assert isinstance(got, dict) and "status" in got and "version" in got, repr(got)[:120]
