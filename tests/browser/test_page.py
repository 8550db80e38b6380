"""The kiosk page (GET /) in a real browser: headless Chromium against the real straycat
binary, with a TCP proxy of ours in between wherever a test cuts the connection.

Run with tests/browser/run.sh. Each test starts its own servers, proxies and browsers.
"""

import time
import urllib.request
from urllib.parse import parse_qs, urlsplit

import pytest
from selenium.webdriver.common.by import By

from harness import (
    exchange,
    replies,
    requested_urls,
    send,
    severe_console_entries,
    state,
    stored,
    streaming,
    transcript,
    wait,
    wait_reply,
    wait_state,
)
from page_hashes import inline_hashes

LONG = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"


def test_page_loads_cleanly_with_strict_headers(start_server, open_browser):
    server = start_server()
    with urllib.request.urlopen(server.origin + "/", timeout=10) as r:
        headers, body = r.headers, r.read().decode("utf-8")
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["Cache-Control"] == "no-cache"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Referrer-Policy"] == "no-referrer"
    assert len(body.encode()) < 64 * 1024
    csp = dict(d.split(" ", 1) for d in headers["Content-Security-Policy"].split("; "))
    hashes = inline_hashes(body)
    assert csp["default-src"] == "'none'"
    assert csp["script-src"] == f"'sha256-{hashes['script']}'"
    assert csp["style-src"] == f"'sha256-{hashes['style']}'"
    assert csp["connect-src"] == "'self'"
    assert csp["img-src"] == "'self' data:"
    for directive in ("base-uri", "form-action", "frame-ancestors"):
        assert csp[directive] == "'none'"

    browser = open_browser()
    requested_urls(browser)  # drains what the browser did before it was asked to load the page
    browser.get(server.origin + "/?user=clean")
    # Connected under that CSP: Chromium takes connect-src 'self' for the same-origin ws:.
    wait_state(browser, "open")
    exchange(browser, "hello there")
    assert browser.find_element(By.TAG_NAME, "html").get_attribute("lang") == "en"
    assert severe_console_entries(browser) == []
    urls = requested_urls(browser)
    assert any(u.startswith("ws://") for u in urls), urls
    for url in urls:
        parts = urlsplit(url)
        assert parts.scheme == "data" or parts.netloc == f"127.0.0.1:{server.port}", url
    # Trusted Types are enforced: no HTML can be parsed from a string in this page at all
    # (after the console check: the refusal is itself a console error).
    assert browser.execute_script(
        "try { document.createElement('div').innerHTML = '<b>x</b>'; return 'parsed' }"
        " catch (e) { return e.name }"
    ) == "TypeError"


def test_reply_streams_word_by_word(start_server, open_browser):
    server = start_server("--echo-delay-ms", 150)
    browser = open_browser()
    browser.get(server.origin + "/?user=stream")
    wait_state(browser, "open")
    send(browser, LONG)
    seen = []

    def grew():
        text = streaming(browser)
        if text and (not seen or seen[-1] != text):
            seen.append(text)
        return len(seen) >= 4

    wait(browser, grew, 10, "the pending reply to grow")
    # Each snapshot extends the previous one, word by word, before the reply is complete.
    for shorter, longer in zip(seen, seen[1:]):
        assert longer.startswith(shorter) and len(longer) > len(shorter), seen
    assert LONG.startswith(seen[-1]) and seen[-1] != LONG, seen
    wait_reply(browser, LONG)
    assert replies(browser) == [LONG]
    wait(browser, lambda: streaming(browser) is None, 5, "the pending bubble to go")


def test_cut_mid_answer_the_reply_appears_once(start_server, start_proxy, open_browser):
    server = start_server("--echo-delay-ms", 150)
    proxy = start_proxy(server)
    browser = open_browser()
    browser.get(f"http://127.0.0.1:{proxy.port}/?user=cut")
    wait_state(browser, "open")
    exchange(browser, "warm up")
    send(browser, LONG)
    wait(browser, lambda: len((streaming(browser) or "").split()) >= 3, 10, "streaming")
    proxy.drop_all()
    wait_reply(browser, LONG)
    # A second exchange after another cut: anything replayed twice would show by now.
    proxy.drop_all()
    exchange(browser, "barrier")
    assert replies(browser) == ["warm up", LONG, "barrier"]
    upgrades = proxy.upgrades()
    assert len(upgrades) >= 3
    sinces = [parse_qs(urlsplit(u.target).query).get("since", [None])[0] for u in upgrades]
    assert sinces[:2] == [None, "1"], upgrades
    assert [k for k, _ in transcript(browser)] == ["user", "ai", "user", "ai", "user", "ai"]


@pytest.mark.parametrize("durable", [False, True], ids=["in-memory", "state-dir"])
def test_server_restart_recovers_by_itself(durable, tmp_path, start_server, open_browser):
    state = ["--state-dir", tmp_path / "state"] if durable else []
    server = start_server("--echo-delay-ms", 150, *state)
    browser = open_browser()
    browser.get(server.origin + "/?user=restart")
    wait_state(browser, "open")
    exchange(browser, "before the restart")
    # Stopped mid-answer. In memory the turn dies with the server and the page's resend runs
    # it on the new one; with a state dir the server runs it again itself, and the resent id
    # makes sure it runs once.
    send(browser, LONG)
    wait(browser, lambda: streaming(browser), 10, "streaming")
    server.stop()
    wait_state(browser, ("reconnecting", "cannot"), 5)
    mark = len(server.lines)
    server.start()
    wait_state(browser, "open", 15)
    server.wait_log(lambda l: "user=restart" in l and "(since=1)" in l, 5, since=mark)
    wait_reply(browser, LONG)
    exchange(browser, "after the restart")
    assert transcript(browser) == [
        ("user", "before the restart"),
        ("ai", "before the restart"),
        ("user", LONG),
        ("ai", LONG),
        ("user", "after the restart"),
        ("ai", "after the restart"),
    ]
    # In memory, the session is gone: the server says so with a ResumeGap, which the page
    # keeps out of the transcript (it is in the console). With a state dir there is no gap.
    gaps = [l for l in server.lines[mark:] if "resume gap" in l]
    assert bool(gaps) != durable, gaps


def test_message_typed_while_disconnected_is_answered_once(start_server, start_proxy, open_browser):
    server = start_server()
    proxy = start_proxy(server)
    browser = open_browser()
    browser.get(f"http://127.0.0.1:{proxy.port}/?user=offline")
    wait_state(browser, "open")
    proxy.refuse()
    proxy.drop_all()
    wait_state(browser, ("reconnecting", "cannot"), 5)
    send(browser, "sent while away")
    meta = browser.find_element(By.CSS_SELECTOR, "#entries .msg.user .meta")
    assert meta.text == "Waiting to send…"
    refused = proxy.refused
    wait(browser, lambda: proxy.refused > refused, 10, "a refused reconnect with the message owed")
    assert replies(browser) == []
    proxy.refuse(False)
    wait_reply(browser, "sent while away", 20)
    assert meta.text == ""
    exchange(browser, "barrier")
    assert replies(browser) == ["sent while away", "barrier"]


def test_reload_keeps_the_transcript_and_what_is_owed(start_server, start_proxy, open_browser):
    server = start_server()
    proxy = start_proxy(server)
    browser = open_browser()
    page = f"http://127.0.0.1:{proxy.port}/?user=reload"
    browser.get(page)
    wait_state(browser, "open")
    exchange(browser, "first")
    proxy.refuse()
    proxy.drop_all()
    wait_state(browser, ("reconnecting", "cannot"), 5)
    send(browser, "typed before the reload")
    assert [m["text"] for m in stored(browser, "reload")["pending"]] == ["typed before the reload"]
    browser.get(page)
    wait(browser, lambda: len(transcript(browser)) == 3, 5, "the stored transcript")
    proxy.refuse(False)
    wait_reply(browser, "typed before the reload")
    browser.refresh()
    wait_state(browser, "open")
    exchange(browser, "barrier")
    assert replies(browser) == ["first", "typed before the reload", "barrier"]
    # Each connection resumed from the last seq the page had seen, across the reloads (the
    # attempts refused meanwhile are not in the list).
    sinces = [parse_qs(urlsplit(u.target).query).get("since", [None])[0] for u in proxy.upgrades()]
    assert sinces == [None, "1", "2"], proxy.upgrades()


def test_wrong_token_says_cannot_connect_and_backs_off(start_server, start_proxy, open_browser):
    server = start_server("--api-key", "right")
    proxy = start_proxy(server)
    browser = open_browser()
    browser.get(f"http://127.0.0.1:{proxy.port}/?user=tok&token=wrong")
    wait_state(browser, "cannot", 10)
    assert browser.find_element(By.ID, "status").text == "Cannot connect, retrying"
    server.wait_log(lambda l: "refused with 403" in l, 5)
    # Watch the attempts for 8 s from the first one.
    first = proxy.upgrades()[0].at
    wait(browser, lambda: time.monotonic() >= first + 8, 10, "the end of the window")
    times = [u.at for u in proxy.upgrades() if u.at <= first + 8]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert 3 <= len(times) <= 6, gaps
    assert min(gaps) >= 0.2, gaps
    # Below the 5 s cap each delay is at least the previous one (jitter stays within a
    # doubling); allow for scheduling noise.
    for shorter, longer in zip(gaps, gaps[1:3]):
        assert longer >= shorter * 0.8, gaps
    assert gaps[-1] > gaps[0] * 2, gaps
    assert all("token=wrong" in u.target for u in proxy.upgrades())
    assert state(browser) == "cannot"


def test_reply_is_text_never_html(start_server, open_browser):
    server = start_server()
    browser = open_browser()
    browser.get(server.origin + "/?user=html")
    wait_state(browser, "open")
    attack = "<img src=x onerror=alert(1)>"
    exchange(browser, attack)
    assert browser.find_elements(By.CSS_SELECTOR, "#log img") == []
    assert browser.find_elements(By.CSS_SELECTOR, "#entries .msg.ai .bubble")[-1].text == attack

    markdown = "**bold** and *it* and `x<b>` [site](https://example.com/a) [bad](javascript:alert(1))"
    send(browser, markdown + "\n- one\n- two\n\n```\n<i>raw</i>\n```")
    wait(browser, lambda: len(replies(browser)) == 2, 10, "the second reply")
    bubble = browser.find_elements(By.CSS_SELECTOR, "#entries .msg.ai .bubble")[-1]
    assert bubble.find_element(By.TAG_NAME, "strong").text == "bold"
    assert bubble.find_element(By.TAG_NAME, "em").text == "it"
    assert bubble.find_element(By.CSS_SELECTOR, "p code").text == "x<b>"
    links = bubble.find_elements(By.TAG_NAME, "a")
    assert len(links) == 1
    assert links[0].get_attribute("href") == "https://example.com/a"
    assert links[0].get_attribute("rel") == "noopener noreferrer"
    assert links[0].get_attribute("target") == "_blank"
    assert "[bad](javascript:alert(1))" in bubble.text
    assert [li.text for li in bubble.find_elements(By.CSS_SELECTOR, "ul li")] == ["one", "two"]
    assert bubble.find_element(By.CSS_SELECTOR, "pre code").text == "<i>raw</i>"
    assert bubble.find_elements(By.CSS_SELECTOR, "b, i, img") == []
    assert severe_console_entries(browser) == []


def test_replaced_does_not_reconnect_until_asked(start_server, start_proxy, open_browser):
    server = start_server()
    proxy = start_proxy(server)
    first = open_browser()
    first.get(f"http://127.0.0.1:{proxy.port}/?user=shared")
    wait_state(first, "open")
    exchange(first, "from the first window")
    second = open_browser()
    second.get(server.origin + "/?user=shared")
    wait_state(second, "open")
    wait_state(first, "replaced", 5)
    banner = first.find_element(By.ID, "banner")
    assert banner.is_displayed()
    assert "This conversation was opened elsewhere" in banner.text
    attempts = len(proxy.upgrades())
    # It stays put: no new connection from it for 4 s.
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        assert len(proxy.upgrades()) == attempts
        assert state(first) == "replaced"
        time.sleep(0.1)
    first.find_element(By.ID, "resume").click()
    wait_state(first, "open")
    assert len(proxy.upgrades()) == attempts + 1
    assert not banner.is_displayed()
    wait_state(second, "replaced", 5)
    exchange(first, "back in the first window")
    assert replies(first) == ["from the first window", "back in the first window"]


def test_new_conversation_forgets_and_shows_nothing_old(start_server, start_proxy, open_browser):
    server = start_server("--echo-delay-ms", 100)
    proxy = start_proxy(server)
    browser = open_browser()
    page = f"http://127.0.0.1:{proxy.port}/?user=kiosk-1&token=t0"
    browser.get(page)
    wait_state(browser, "open")
    exchange(browser, "visitor one asks")
    # Left owed a reply when the next visitor starts: that reply must not show up.
    send(browser, "still streaming for visitor one")
    wait(browser, lambda: streaming(browser), 5, "streaming")
    browser.find_element(By.ID, "new").click()
    assert transcript(browser) == []
    wait(browser, lambda: proxy.seen("DELETE", "/memory/conversation_history"), 5, "the DELETE")
    delete = proxy.seen("DELETE", "/memory/conversation_history")[0]
    assert delete.headers["user_id"] == "kiosk-1"
    assert delete.headers["authorization"] == "Bearer t0"
    exchange(browser, "visitor two asks")
    # The old turn has ended by now (the new one ran after it, in order) and was not shown.
    assert transcript(browser) == [("user", "visitor two asks"), ("ai", "visitor two asks")]
    browser.refresh()
    wait_state(browser, "open")
    exchange(browser, "barrier")
    assert replies(browser) == ["visitor two asks", "barrier"]


def test_idle_reset_starts_over_as_a_new_user(start_server, open_browser):
    server = start_server()
    browser = open_browser()
    browser.get(server.origin + "/?reset_after_idle_secs=2")
    wait_state(browser, "open")
    old = browser.execute_script("return JSON.parse(localStorage.getItem('straycat.user'))")
    assert old.startswith("kiosk-") and len(old) == len("kiosk-") + 12
    exchange(browser, "anyone there")
    wait(browser, lambda: transcript(browser) == [], 10, "the idle reset")
    new = browser.execute_script("return JSON.parse(localStorage.getItem('straycat.user'))")
    assert new != old and new.startswith("kiosk-")
    assert stored(browser, old) is None
    wait_state(browser, "open")
    exchange(browser, "a new visitor")
    server.wait_log(lambda l: f"user={new} " in l and "connected" in l, 5)
