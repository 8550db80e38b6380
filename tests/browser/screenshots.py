"""Screenshots of the kiosk page with a short conversation, at 1280x800 and 800x480 (and a
phone's 390x844), light and dark.

    tests/browser/run.sh --screenshots DIR      (or, in the venv: python screenshots.py DIR)

writes page-<W>x<H>-<light|dark>.png into DIR. The conversation comes from canned_agent.py
through straycat's process agent, so the pictures show rendered Markdown, not an echo.
"""

import pathlib
import shlex
import sys

from harness import Chromium, Server, replies, send, wait, wait_state

SIZES = [(1280, 800), (800, 480), (390, 844)]
QUESTIONS = ["What are your opening hours?", "Where can I get a coffee?"]


def main(out):
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    agent = pathlib.Path(__file__).with_name("canned_agent.py")
    server = Server("--agent", "process", "--process-cmd", f"exec {shlex.quote(sys.executable)} {shlex.quote(str(agent))}")
    try:
        for width, height in SIZES:
            browser = Chromium(width=width, height=height)
            try:
                browser.get(f"{server.origin}/?user=screenshot-{width}")
                wait_state(browser, "open")
                for i, question in enumerate(QUESTIONS):
                    send(browser, question)
                    wait(browser, lambda: len(replies(browser)) == i + 1, 10, "the answer")
                for scheme in ("light", "dark"):
                    browser.execute_cdp_cmd(
                        "Emulation.setEmulatedMedia",
                        {"features": [{"name": "prefers-color-scheme", "value": scheme}]},
                    )
                    # No focus ring on the composer in the pictures.
                    browser.execute_script("document.activeElement.blur()")
                    path = out / f"page-{width}x{height}-{scheme}.png"
                    browser.save_screenshot(str(path))
                    print(path)
            finally:
                browser.quit()
    finally:
        server.kill()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: screenshots.py OUTPUT_DIR")
    main(sys.argv[1])
