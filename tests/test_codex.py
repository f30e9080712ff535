"""The real Codex CLI as a session, when the npm package @openai/codex is on PATH."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import pytest_twisted

from .support import outputText, payload, pollUntil, sessionProcesses


def findCodex() -> str | None:
    executable = shutil.which("codex")
    if executable is None:
        return None
    try:
        version = subprocess.run(
            [executable, "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return executable if version.startswith("codex-cli") else None


CODEX = findCodex()
pytestmark = pytest.mark.skipif(
    CODEX is None, reason="no codex executable from the npm package @openai/codex on PATH"
)


@pytest.fixture
def codexEnvironment(home, monkeypatch):
    # Codex keeps its state under HOME and CODEX_HOME. Empty ones keep the test
    # away from a real login, and they are set before the daemon copies its
    # environment for harnesses.
    codexHome = os.path.join(home, "codex-home")
    os.makedirs(codexHome)
    monkeypatch.setenv("HOME", codexHome)
    monkeypatch.setenv("CODEX_HOME", codexHome)


@pytest.fixture
def codexDaemon(codexEnvironment, daemon):
    return daemon


@pytest_twisted.ensureDeferred
async def test_codex_session_recorded_and_killed(codexDaemon):
    client = codexDaemon.client
    session = await client.launch(codexDaemon.project, "say hello", harness="codex")
    assert session["harness"] == "codex"

    # The TUI draws its first screen (a sign-in screen without a login) within
    # seconds. By then it has started its background helpers.
    await client.waitForOutput(session["id"], "Codex", timeout=60)
    helpers = sessionProcesses(session["id"])
    status, _ = await client.post(f"/api/v1/sessions/{session['id']}/kill")
    assert status == 202
    events = await client.waitForExit(session["id"], timeout=30)

    text = outputText(events)
    assert len(text) > 0
    assert "\x1b[6n" not in text
    assert payload(events[-1])["status"] == "killed"
    status, record = await client.get(f"/api/v1/sessions/{session['id']}")
    assert record["status"] == "killed"
    # Codex starts helper processes in sessions of their own. They carry the
    # session id in their environment, so they are ended with the session.
    assert helpers
    await pollUntil(lambda: sessionProcesses(session["id"]) == [], timeout=30)
