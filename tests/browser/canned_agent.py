"""A stand-in help desk for the screenshots, run by straycat's process agent: one JSON line
on stdin, the answer on stdout (see README, "process: a local program per turn")."""

import json
import sys

ANSWERS = {
    "hours": (
        "We are open **every day**:\n\n"
        "- Monday to Friday: 9:00 to 18:00\n"
        "- Saturday and Sunday: 10:00 to 16:00\n\n"
        "Holidays are on [our website](https://example.org/hours)."
    ),
    "coffee": "The café is on the *ground floor*, next to the main entrance. Show the code `KIOSK` at the till.",
}

text = json.loads(sys.stdin.readline())["text"].lower()
print(next((a for k, a in ANSWERS.items() if k in text), "I can tell you about our opening hours and the café."))
