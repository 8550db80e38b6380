"""Prints the CSP hashes of the inline <script> and <style> of src/page/index.html.

The unit test in src/page.rs checks the same thing and prints the value to put there; this
is the same computation for people who want it without compiling.
"""

import base64
import hashlib
import pathlib
import re
import sys


def inline_hashes(html: str) -> dict:
    """sha256 (base64) of the text of each inline element, as CSP hashes it."""
    out = {}
    for tag in ("script", "style"):
        bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.S)
        if len(bodies) != 1:
            sys.exit(f"expected exactly one <{tag}> in the page, found {len(bodies)}")
        digest = hashlib.sha256(bodies[0].encode("utf-8")).digest()
        out[tag] = base64.b64encode(digest).decode("ascii")
    return out


if __name__ == "__main__":
    root = pathlib.Path(__file__).resolve().parents[2]
    page = (root / "src/page/index.html").read_text(encoding="utf-8")
    for tag, value in inline_hashes(page).items():
        print(f"{tag}: sha256-{value}")
