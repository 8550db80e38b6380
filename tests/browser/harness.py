"""What the browser tests and the screenshot script share: the straycat binary run on a port
of 127.0.0.1, a headless Chromium driven by Selenium, and small probes into the page.

Every wait here is bounded; nothing sleeps hoping something happened.
"""

import json
import os
import pathlib
import signal
import subprocess
import tempfile
import threading
import time

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# As root on a closed network: no sandbox (it needs a user namespace root may not get), and
# nothing that would phone home or wait for a network that is not there.
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
START_TIMEOUT_S = 20
STOP_TIMEOUT_S = 10


def binary():
    """target/release/straycat, under CARGO_TARGET_DIR when that is set."""
    if os.environ.get("STRAYCAT_BIN"):
        return os.environ["STRAYCAT_BIN"]
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target")
    if not target.is_absolute():
        target = ROOT / target
    path = target / "release" / "straycat"
    if not path.exists():
        raise RuntimeError(f"{path} is missing: run `cargo build --release` first")
    return str(path)


class Server:
    """A straycat process on 127.0.0.1. The first start takes a free port (port 0, read back
    from the log); start() again after stop() reuses it."""

    def __init__(self, *args):
        self.args = [str(a) for a in args]
        self.port = 0
        self.proc = None
        self.lines = []
        self.cond = threading.Condition()
        self.start()

    @property
    def origin(self):
        return f"http://127.0.0.1:{self.port}"

    def start(self):
        assert self.proc is None or self.proc.poll() is not None, "already running"
        mark = len(self.lines)
        self.proc = subprocess.Popen(
            [binary(), "--listen", f"127.0.0.1:{self.port}", "--log-level", "debug", *self.args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        threading.Thread(target=self._read_log, args=(self.proc.stderr,), daemon=True).start()
        line = self.wait_log(lambda l: "listening on 127.0.0.1:" in l, START_TIMEOUT_S, since=mark)
        self.port = int(line.rsplit(":", 1)[1])

    def _read_log(self, stream):
        for line in stream:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()

    def wait_log(self, pred, timeout, since=0):
        """The first log line from index `since` on that satisfies pred; fails after timeout."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for line in self.lines[since:]:
                    if pred(line):
                        return line
                since = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("no such log line within %ss; log:\n%s" % (timeout, self.log()))
                self.cond.wait(left)

    def log(self):
        with self.cond:
            return "\n".join(self.lines)

    def stop(self):
        """SIGTERM and wait: straycat closes every socket with 1001 and exits 0."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(STOP_TIMEOUT_S)
        assert code == 0, f"straycat exited with {code}"

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT_S)


class Chromium(webdriver.Chrome):
    """A fresh headless Chromium with its own profile in a temporary directory, removed on
    quit(), whose browser and performance logs the tests read. The layout viewport is exactly
    width x height (a headless window's viewport is otherwise smaller than the window)."""

    def __init__(self, width=1280, height=800):
        self.profile = tempfile.TemporaryDirectory(prefix="straycat-chromium-", ignore_cleanup_errors=True)
        options = Options()
        options.binary_location = CHROMIUM
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={self.profile.name}")
        options.add_argument(f"--window-size={width},{height}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
        try:
            super().__init__(service=Service(CHROMEDRIVER), options=options)
        except BaseException:
            self.profile.cleanup()
            raise
        self.set_page_load_timeout(20)
        self.set_script_timeout(10)
        self.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )

    def quit(self):
        try:
            super().quit()
        finally:
            self.profile.cleanup()


# --- probes into the page (the selectors are the page's, src/page/index.html)


def wait(driver, cond, timeout, what):
    """Polls cond() every 50 ms until it is truthy; its value, or a failure naming `what`."""
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda _: cond(), f"waiting for {what}")


def state(driver):
    return driver.find_element(By.ID, "status").get_attribute("data-state")


def wait_state(driver, states, timeout=15):
    states = (states,) if isinstance(states, str) else tuple(states)
    wait(driver, lambda: state(driver) in states, timeout, f"connection state in {states}")


def send(driver, text):
    """Types text into the composer and presses Enter (newlines in text become Shift+Enter)."""
    box = driver.find_element(By.ID, "input")
    for i, line in enumerate(text.split("\n")):
        if i:
            box.send_keys(Keys.SHIFT, Keys.ENTER, Keys.SHIFT)
        box.send_keys(line)
    box.send_keys(Keys.ENTER)


def transcript(driver):
    """[(kind, text)] of the transcript, oldest first: kind is user, ai, error or note."""
    rows = driver.execute_script(
        "return [...document.querySelectorAll('#entries > .msg')]"
        ".map(m => [m.className.replace('msg ', ''), m.querySelector('.bubble').textContent])"
    )
    return [tuple(row) for row in rows]


def replies(driver):
    return [text for kind, text in transcript(driver) if kind == "ai"]


def streaming(driver):
    """The text of the pending (streaming) reply, or None when it is hidden."""
    return driver.execute_script(
        "const t = document.getElementById('typing'); return t.hidden ? null : t.textContent"
    )


def wait_reply(driver, text, timeout=20):
    wait(driver, lambda: text in replies(driver), timeout, f"the reply {text!r}")


def exchange(driver, text, timeout=20):
    """Sends text and waits for its echo."""
    send(driver, text)
    wait_reply(driver, text, timeout)


def stored(driver, user):
    return json.loads(driver.execute_script(f"return localStorage.getItem('straycat.conversation.{user}')") or "null")


def severe_console_entries(driver):
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def requested_urls(driver):
    """Every URL the page requested or opened a WebSocket to (Chrome's performance log)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
        elif message["method"] == "Network.webSocketCreated":
            urls.append(message["params"]["url"])
    return urls
