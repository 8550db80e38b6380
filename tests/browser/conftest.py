"""Fixtures: every test gets its own straycat processes, proxies and browsers, all torn down
at its end; a failed test prints the logs of its servers."""

import pytest

from harness import Chromium, Server
from proxy import Proxy


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item.failed_call = report.failed
    return report


@pytest.fixture
def start_server(request):
    """start_server(*args) -> a running Server with those options."""
    started = []

    def start(*args):
        server = Server(*args)
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()
        if getattr(request.node, "failed_call", False):
            print(f"---- straycat log ({' '.join(server.args)}):\n{server.log()}")


@pytest.fixture
def start_proxy():
    """start_proxy(server) -> a Proxy in front of it."""
    started = []

    def start(server):
        proxy = Proxy(server.port)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.close()


@pytest.fixture
def open_browser(request):
    """open_browser(width=1280, height=800) -> a fresh headless Chromium."""
    started = []

    def start(**size):
        browser = Chromium(**size)
        started.append(browser)
        return browser

    yield start
    for browser in started:
        if getattr(request.node, "failed_call", False):
            try:
                print("---- browser console:", *browser.get_log("browser"), sep="\n")
            except Exception as e:  # the browser may be what failed
                print("---- browser console unavailable:", e)
        browser.quit()
