"""The README's example harness, run as the README gives it."""

from __future__ import annotations

import os
import re

import pytest_twisted

from .support import outputText

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def readmeCatHarness() -> str:
    with open(README) as file:
        text = file.read()
    match = re.search(r"```toml\n(\[harnesses\.cat\]\n.*?)```", text, re.DOTALL)
    assert match is not None, "README.md has no [harnesses.cat] block"
    return match.group(1)


@pytest_twisted.ensureDeferred
async def test_cat_harness_prints_prompt_then_echoes(daemon):
    with open(os.path.join(daemon.home, "harnesses.toml"), "a") as file:
        file.write("\n" + readmeCatHarness())
    prompt = 'Explain this repository; echo "$HOME" `id`'
    session = await daemon.client.launch(daemon.project, prompt, harness="cat")

    await daemon.client.waitForOutput(session["id"], f"prompt: {prompt}\r\n")
    await daemon.client.post(f"/api/v1/sessions/{session['id']}/input", {"data": "y\n"})
    events = await daemon.client.waitForOutput(session["id"], "y\r\ny\r\n")

    assert outputText(events).startswith(f"prompt: {prompt}\r\n")
    await daemon.client.post(f"/api/v1/sessions/{session['id']}/kill")
