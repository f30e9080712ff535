"""End-to-end session tests: a real daemon, a real Unix socket, real PTYs and SQLite."""

from __future__ import annotations

import gc
import os
import signal
import threading
import time
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.logger import LogLevel, globalLogPublisher

from coven.sessions import DRAIN_TIMEOUT
from coven.store import WRITER_NICE, connectReadOnly

from .conftest import startDaemon
from .fake_harness import pattern
from .support import UnixClient, outputBytes, outputText, payload, pollUntil, processExists


@pytest_twisted.ensureDeferred
async def test_output_recorded_exactly(daemon):
    size = 200_000
    session = await daemon.client.launch(daemon.project, f"burst {size}")

    events = await daemon.client.waitForExit(session["id"])

    recorded = outputBytes(events)
    assert len(recorded) == size
    assert recorded == pattern(size)


@pytest_twisted.ensureDeferred
async def test_launch_returns_running_record(daemon):
    session = await daemon.client.launch(daemon.project, "print hi", title="My title")

    assert session["status"] == "running"
    assert session["harness"] == "fake"
    assert session["title"] == "My title"
    assert session["project_root"] == os.path.realpath(daemon.project)
    assert session["exit_code"] is None
    assert session["archived_at"] is None
    assert session["created_at"].endswith("Z")


@pytest_twisted.ensureDeferred
async def test_exit_code_zero_completes(daemon):
    session = await daemon.client.launch(daemon.project, "exit 0")

    events = await daemon.client.waitForExit(session["id"])

    assert payload(events[-1]) == {"exitCode": 0, "signal": None, "status": "completed"}
    status, record = await daemon.client.get(f"/api/v1/sessions/{session['id']}")
    assert record["status"] == "completed"
    assert record["exit_code"] == 0


@pytest_twisted.ensureDeferred
async def test_exit_code_three_fails(daemon):
    session = await daemon.client.launch(daemon.project, "exit 3")

    events = await daemon.client.waitForExit(session["id"])

    assert outputText(events) == "exiting 3\r\n"
    assert payload(events[-1]) == {"exitCode": 3, "signal": None, "status": "failed"}
    status, record = await daemon.client.get(f"/api/v1/sessions/{session['id']}")
    assert record["status"] == "failed"
    assert record["exit_code"] == 3


@pytest_twisted.ensureDeferred
async def test_input_echo_follows_input_event(daemon):
    client = daemon.client
    session = await client.launch(daemon.project, "echo")
    await client.waitForOutput(session["id"], "ready")

    status, body = await client.post(f"/api/v1/sessions/{session['id']}/input", {"data": "hello\n"})
    assert status == 202
    assert body == {"ok": True, "accepted": True}
    await client.waitForOutput(session["id"], "got: hello")
    await client.post(f"/api/v1/sessions/{session['id']}/input", {"data": "quit\n"})
    events = await client.waitForExit(session["id"])

    kinds = [event["kind"] for event in events]
    inputIndex = kinds.index("input")
    assert payload(events[inputIndex]) == {"data": "hello\n"}
    assert "ready" in outputText(events[:inputIndex])
    assert "got: hello" not in outputText(events[:inputIndex])
    assert "got: hello" in outputText(events[inputIndex:])
    assert [event["seq"] for event in events] == sorted(event["seq"] for event in events)


@pytest_twisted.ensureDeferred
async def test_kill_ends_harness_ignoring_sigterm(daemon):
    client = daemon.client
    session = await client.launch(daemon.project, "ignore-term")
    await client.waitForOutput(session["id"], "ready")
    pid = daemon.service.sessions.liveSession(session["id"]).pid

    started = time.monotonic()
    status, body = await client.post(f"/api/v1/sessions/{session['id']}/kill")
    assert status == 202
    status, record = await client.get(f"/api/v1/sessions/{session['id']}")
    assert record["status"] == "killed"
    events = await client.waitForExit(session["id"])
    elapsed = time.monotonic() - started

    kill = next(event for event in events if event["kind"] == "kill")
    assert payload(kill)["signal"] == "SIGTERM"
    assert payload(events[-1]) == {"exitCode": None, "signal": "SIGKILL", "status": "killed"}
    assert not processExists(pid)
    # SIGKILL follows the 1 s grace period of the test daemon.
    assert elapsed < daemon.service.sessions.killGrace + 5
    status, record = await client.get(f"/api/v1/sessions/{session['id']}")
    assert record["status"] == "killed"


@pytest_twisted.ensureDeferred
async def test_kill_twice_is_not_live(daemon):
    client = daemon.client
    session = await client.launch(daemon.project, "sleep")
    await client.waitForOutput(session["id"], "ready")

    first, _ = await client.post(f"/api/v1/sessions/{session['id']}/kill")
    second, body = await client.post(f"/api/v1/sessions/{session['id']}/kill")

    assert first == 202
    assert second == 409
    assert body["error"]["code"] == "session_not_live"


@pytest_twisted.ensureDeferred
async def test_kill_ends_grandchild(daemon):
    client = daemon.client
    pidFile = os.path.join(daemon.home, "pids")
    session = await client.launch(daemon.project, f"grandchild {pidFile}")
    await client.waitForOutput(session["id"], "ready")
    with open(pidFile) as file:
        harnessPid, grandchildPid = (int(value) for value in file.read().split())
    assert processExists(grandchildPid)

    status, _ = await client.post(f"/api/v1/sessions/{session['id']}/kill")
    assert status == 202
    await client.waitForExit(session["id"])

    await pollUntil(lambda: not processExists(grandchildPid), timeout=10)
    assert not processExists(harnessPid)
    assert not processExists(grandchildPid)


@pytest_twisted.ensureDeferred
async def test_missing_executable_fails_spawn(daemon):
    with open(os.path.join(daemon.home, "harnesses.toml"), "a") as file:
        file.write('\n[harnesses.ghost]\ncommand = ["coven-test-no-such-executable"]\n')

    status, body = await daemon.client.post(
        "/api/v1/sessions", {"projectRoot": daemon.project, "harness": "ghost", "prompt": "hi"}
    )

    assert status == 500
    assert body["error"]["code"] == "pty_spawn_failed"
    assert body["error"]["details"]["harness"] == "ghost"
    assert " Install it in a folder on that PATH (" in body["error"]["message"]
    assert body["error"]["message"].endswith(
        f"), or set its command in {daemon.home}/harnesses.toml."
        " A different PATH takes a restart of the daemon."
    )
    sessionId = body["error"]["details"]["sessionId"]
    status, record = await daemon.client.get(f"/api/v1/sessions/{sessionId}")
    assert record["status"] == "failed"
    events = await daemon.client.allEvents(sessionId)
    assert [event["kind"] for event in events] == ["exit"]
    assert "coven-test-no-such-executable" in payload(events[0])["reason"]


def addScriptHarness(daemon: Any, harness: str, text: str, mode: int) -> str:
    """
    Write the script C{text} with C{mode} into the home, add it to
    harnesses.toml as C{harness}, and return its path.
    """
    agent = os.path.join(daemon.home, "agent.sh")
    with open(agent, "w") as file:
        file.write(text)
    os.chmod(agent, mode)
    with open(os.path.join(daemon.home, "harnesses.toml"), "a") as file:
        file.write(f'\n[harnesses.{harness}]\ncommand = ["{agent}"]\n')
    return agent


async def launchHarness(daemon: Any, harness: str) -> tuple[int, Any]:
    return await daemon.client.post(
        "/api/v1/sessions", {"projectRoot": daemon.project, "harness": harness, "prompt": "hi"}
    )


@pytest_twisted.ensureDeferred
async def test_missing_interpreter_fails_spawn(daemon):
    agent = addScriptHarness(daemon, "script", "#!/nonexistent/interpreter\necho hi\n", 0o755)

    status, body = await launchHarness(daemon, "script")
    _, capabilities = await daemon.client.get("/api/v1/capabilities")

    reason = (
        f"script '{agent}' names the interpreter '/nonexistent/interpreter' on its first line,"
        " which does not exist"
    )
    assert status == 500
    assert body["error"]["code"] == "pty_spawn_failed"
    assert body["error"]["message"] == (
        f"Harness script could not be launched: {reason}. Install that interpreter, or change"
        " the script's first line."
    )
    sessionId = body["error"]["details"]["sessionId"]
    status, record = await daemon.client.get(f"/api/v1/sessions/{sessionId}")
    assert record["status"] == "failed"
    events = await daemon.client.allEvents(sessionId)
    assert [event["kind"] for event in events] == ["exit"]
    assert payload(events[0])["reason"] == reason
    entry = [item for item in capabilities["capabilities"] if item.get("harness") == "script"][0]
    assert (entry["status"], entry["executable"], entry["reason"]) == ("unavailable", agent, reason)


@pytest_twisted.ensureDeferred
async def test_harness_file_not_executable_explained(daemon):
    agent = addScriptHarness(daemon, "plain", "#!/bin/sh\necho hi\n", 0o644)

    status, body = await launchHarness(daemon, "plain")
    _, capabilities = await daemon.client.get("/api/v1/capabilities")

    reason = f"'{agent}' is not executable by the daemon's user"
    assert status == 500
    assert body["error"]["code"] == "pty_spawn_failed"
    # A command with a slash is never looked up on PATH, so the advice is
    # about the file.
    assert body["error"]["message"] == (
        f"Harness plain could not be launched: {reason}. Make that file executable, or set"
        f" the harness's command in {daemon.home}/harnesses.toml to one that is."
    )
    entry = [item for item in capabilities["capabilities"] if item.get("harness") == "plain"][0]
    assert entry["executable"] is None
    assert entry["reason"] == reason

    # A missing file takes other advice: there is nothing to make executable.
    os.remove(agent)
    status, body = await launchHarness(daemon, "plain")
    assert status == 500
    assert body["error"]["message"] == (
        f"Harness plain could not be launched: executable '{agent}' does not exist. Set the"
        f" harness's command in {daemon.home}/harnesses.toml to an executable file."
    )


@pytest_twisted.ensureDeferred
async def test_cwd_dotdot_escape_rejected(daemon):
    status, body = await daemon.client.post(
        "/api/v1/sessions",
        {"projectRoot": daemon.project, "cwd": "../", "harness": "fake", "prompt": "print x"},
    )

    assert status == 400
    assert body["error"]["code"] == "project_root_violation"


@pytest_twisted.ensureDeferred
async def test_cwd_symlink_escape_rejected(daemon):
    outside = os.path.join(daemon.home, "outside")
    os.makedirs(outside)
    os.symlink(outside, os.path.join(daemon.project, "link"))

    status, body = await daemon.client.post(
        "/api/v1/sessions",
        {"projectRoot": daemon.project, "cwd": "link", "harness": "fake", "prompt": "print x"},
    )

    assert status == 400
    assert body["error"]["code"] == "project_root_violation"
    assert body["error"]["details"]["resolvedCwd"] == os.path.realpath(outside)


@pytest_twisted.ensureDeferred
async def test_cwd_inside_project_used(daemon):
    inner = os.path.join(daemon.project, "src")
    os.makedirs(inner)
    session = await daemon.client.launch(daemon.project, "env TERM", cwd="src")

    events = await daemon.client.waitForExit(session["id"])

    assert session["cwd"] == os.path.realpath(inner)
    assert f"cwd={os.path.realpath(inner)}" in outputText(events)


@pytest_twisted.ensureDeferred
async def test_environment_and_window_size(daemon):
    os.environ["CLAUDECODE"] = "1"
    try:
        session = await daemon.client.launch(
            daemon.project, "env TERM COVEN_SESSION_ID CLAUDECODE", cols=132, rows=40
        )
    finally:
        del os.environ["CLAUDECODE"]

    text = outputText(await daemon.client.waitForExit(session["id"]))

    assert "TERM=xterm-256color" in text
    assert f"COVEN_SESSION_ID={session['id']}" in text
    assert "CLAUDECODE=<unset>" in text
    assert "size=132x40" in text


def threadNice(threadId: int) -> int:
    with open(f"/proc/self/task/{threadId}/stat") as file:
        fields = file.read().rsplit(")", 1)[1].split()
    # After the command name: state is field 3 of stat(5) and nice field 19.
    return int(fields[19 - 3])


@pytest_twisted.ensureDeferred
async def test_writer_thread_niced_harness_not(daemon):
    before = threadNice(threading.get_native_id())
    session = await daemon.client.launch(daemon.project, "nice")
    text = outputText(await daemon.client.waitForExit(session["id"]))
    writer = daemon.service.store.writerThreadId

    assert writer is not None
    assert writer != threading.get_native_id()
    assert threadNice(writer) == max(before, WRITER_NICE)
    assert threadNice(threading.get_native_id()) == before
    assert f"nice={before}" in text


@pytest_twisted.ensureDeferred
async def test_split_utf8_character_kept_whole(daemon):
    client = daemon.client
    session = await client.launch(daemon.project, "split-utf8")
    await client.waitForOutput(session["id"], "before ")

    await client.post(f"/api/v1/sessions/{session['id']}/input", {"data": "go\n"})
    events = await client.waitForExit(session["id"])

    outputs = [payload(event) for event in events if event["kind"] == "output"]
    assert "".join(output["data"] for output in outputs) == "before é after\r\n"
    assert all("raw" not in output for output in outputs)
    assert all("\ufffd" not in output["data"] for output in outputs)


@pytest_twisted.ensureDeferred
async def test_invalid_utf8_keeps_raw_bytes(daemon):
    data = b"ok \xff\xfe end \xc3\x28"
    session = await daemon.client.launch(daemon.project, f"bytes {data.hex()}")

    events = await daemon.client.waitForExit(session["id"])

    outputs = [payload(event) for event in events if event["kind"] == "output"]
    assert any("raw" in output for output in outputs)
    assert "\ufffd" in "".join(output["data"] for output in outputs)
    assert outputBytes(events) == data


@pytest_twisted.ensureDeferred
async def test_five_megabytes_nothing_lost(daemon):
    size = 5 * 1024 * 1024
    session = await daemon.client.launch(daemon.project, f"burst {size}")

    await daemon.client.waitForExit(session["id"], timeout=60)
    events = await daemon.client.allEvents(session["id"])

    recorded = outputBytes(events)
    assert len(recorded) == size
    assert recorded == pattern(size)
    assert events[-1]["kind"] == "exit"
    seqs = [event["seq"] for event in events]
    assert seqs == sorted(set(seqs))


@pytest_twisted.ensureDeferred
async def test_long_poll_woken_by_output(daemon):
    client = daemon.client
    session = await client.launch(daemon.project, "echo")
    events = await client.waitForOutput(session["id"], "ready")
    cursor = events[-1]["seq"]

    started = time.monotonic()
    poll = client.events(session["id"], cursor, waitMs=30_000)
    await deferLater(reactor, 0.05, lambda: None)
    await client.post(f"/api/v1/sessions/{session['id']}/input", {"data": "wake\n"})
    page = await poll
    elapsed = time.monotonic() - started

    assert page["events"]
    assert page["events"][0]["seq"] > cursor
    assert elapsed < 10
    await client.post(f"/api/v1/sessions/{session['id']}/kill")


@pytest_twisted.ensureDeferred
async def test_session_wait_returns_at_exit(daemon):
    client = daemon.client
    session = await client.launch(daemon.project, "echo")
    await client.waitForOutput(session["id"], "ready")

    started = time.monotonic()
    wait = client.get(f"/api/v1/sessions/{session['id']}?waitMs=30000")
    await client.post(f"/api/v1/sessions/{session['id']}/input", {"data": "quit\n"})
    status, record = await wait
    elapsed = time.monotonic() - started

    assert status == 200
    assert record["status"] == "completed"
    assert record["exit_code"] == 0
    assert elapsed < 10


@pytest_twisted.ensureDeferred
async def test_long_poll_times_out_empty(daemon):
    client = daemon.client
    session = await client.launch(daemon.project, "sleep")
    events = await client.waitForOutput(session["id"], "ready")

    started = time.monotonic()
    page = await client.events(session["id"], events[-1]["seq"], waitMs=200)
    elapsed = time.monotonic() - started

    assert page == {"events": [], "nextCursor": None, "hasMore": False}
    assert elapsed >= 0.19
    await client.post(f"/api/v1/sessions/{session['id']}/kill")


@pytest_twisted.ensureDeferred
async def test_terminal_query_answered(daemon):
    session = await daemon.client.launch(daemon.project, "query")

    events = await daemon.client.waitForExit(session["id"])

    text = outputText(events)
    assert "reply: ESC[1;1R" in text
    assert "\x1b[6n" not in text
    assert "input" not in [event["kind"] for event in events]


@pytest_twisted.ensureDeferred
async def test_restart_marks_running_orphaned(home):
    project = os.path.join(home, "project")
    os.makedirs(project)
    covenHome = os.path.join(home, "coven")
    service = await startDaemon(covenHome)
    client = UnixClient(service.socketPath)
    session = await client.launch(project, "sleep")
    await client.waitForOutput(session["id"], "ready")
    live = service.sessions.liveSession(session["id"])

    # Simulate a crash: the daemon goes away without recording the end of its
    # session, then a new daemon starts on the same home.
    await service._port.stopListening()
    service.store._writer.close()
    service.store._reader.close()
    os.close(service._lockFile)
    service._lockFile = None
    live.protocol.finished = True
    os.killpg(live.pid, signal.SIGKILL)

    restarted = await startDaemon(covenHome)
    try:
        client = UnixClient(restarted.socketPath)
        status, record = await client.get(f"/api/v1/sessions/{session['id']}")
        events = await client.allEvents(session["id"])
        other = await client.launch(project, "print after")
    finally:
        await restarted.stopService()

    assert record["status"] == "orphaned"
    assert events[-1]["kind"] == "orphaned"
    assert "restarted" in payload(events[-1])["reason"]
    assert "ready" in outputText(events)
    assert other["status"] == "running"


@pytest_twisted.ensureDeferred
async def test_stop_kills_and_records_live_sessions(daemon):
    client = daemon.client
    session = await client.launch(daemon.project, "ignore-term")
    await client.waitForOutput(session["id"], "ready")
    pid = daemon.service.sessions.liveSession(session["id"]).pid

    await daemon.service.stopService()

    assert not processExists(pid)
    assert not os.path.exists(daemon.service.daemonFile)
    assert not os.path.exists(daemon.service.socketPath)
    restarted = await startDaemon(daemon.home)
    try:
        client = UnixClient(restarted.socketPath)
        status, record = await client.get(f"/api/v1/sessions/{session['id']}")
        events = await client.allEvents(session["id"])
    finally:
        await restarted.stopService()
    assert record["status"] == "killed"
    assert [event["kind"] for event in events][-2:] == ["kill", "exit"]
    assert payload(events[-2])["reason"] == "daemon stopping"


@pytest_twisted.ensureDeferred
async def test_stop_serves_followers_after_exits(daemon):
    # A follower whose long poll returned the kill alone comes back for the
    # exit with a new connection, after the stop has stored it.
    daemon.service.stopQuietPeriod = 1.0
    session = await daemon.client.launch(daemon.project, "echo")
    await daemon.client.waitForOutput(session["id"], "ready")

    def exitStored() -> bool:
        # Read from the file: the store of a stop that closed the socket
        # at once would be closing too.
        connection = connectReadOnly(daemon.service.store.path)
        try:
            row = connection.execute(
                "SELECT 1 FROM events WHERE session_id = ? AND kind = 'exit'", (session["id"],)
            ).fetchone()
        finally:
            connection.close()
        return row is not None

    stopping = daemon.service.stopService()
    await pollUntil(exitStored)
    status, record = await daemon.client.get(f"/api/v1/sessions/{session['id']}")
    await stopping

    assert status == 200
    assert record["status"] == "killed"
    assert not os.path.exists(daemon.service.socketPath)


@pytest_twisted.ensureDeferred
async def test_exit_while_background_holds_pty(daemon):
    # The harness exits at once but leaves a process with the PTY open. The
    # session must still end, and the daemon must end the leftover process.
    pidFile = os.path.join(daemon.home, "bg")
    session = await daemon.client.launch(daemon.project, f"leave-behind {pidFile}")

    started = time.monotonic()
    events = await daemon.client.waitForExit(session["id"], timeout=15)
    drained = time.monotonic() - started

    assert "started" in outputText(events)
    assert payload(events[-1])["status"] == "completed"
    # The exit waited for the PTY drain, which the child's open PTY cut short.
    assert drained >= DRAIN_TIMEOUT * 0.9
    with open(pidFile) as file:
        background = int(file.read())
    await pollUntil(lambda: not processExists(background), timeout=10)


@pytest_twisted.ensureDeferred
async def test_sequence_continues_across_sessions(daemon):
    first = await daemon.client.launch(daemon.project, "print one")
    firstEvents = await daemon.client.waitForExit(first["id"])
    second = await daemon.client.launch(daemon.project, "print two")
    secondEvents = await daemon.client.waitForExit(second["id"])

    assert secondEvents[0]["seq"] > firstEvents[-1]["seq"]


@pytest_twisted.ensureDeferred
async def test_long_poll_with_events_ready(daemon):
    # A long poll that finds events at once returns at once, and its unused
    # wake-up leaves no unhandled error behind.
    events = []
    observer = events.append
    globalLogPublisher.addObserver(observer)
    try:
        session = await daemon.client.launch(daemon.project, "print ready")
        await daemon.client.waitForExit(session["id"])
        page = await daemon.client.events(session["id"], 0, waitMs=30_000)
        status, missing = await daemon.client.get("/api/v1/events?sessionId=nope&waitMs=5000")
        # Unhandled Deferred failures are reported when they are collected.
        gc.collect()
    finally:
        globalLogPublisher.removeObserver(observer)

    assert [event["kind"] for event in page["events"]] == ["output", "exit"]
    assert status == 404
    assert missing["error"]["code"] == "session_not_found"
    critical = [event for event in events if event.get("log_level") == LogLevel.critical]
    assert critical == []


@pytest_twisted.ensureDeferred
async def test_huge_limit_clamped(daemon):
    session = await daemon.client.launch(daemon.project, "print x")
    await daemon.client.waitForExit(session["id"])

    status, page = await daemon.client.get(
        f"/api/v1/events?sessionId={session['id']}&limit=99999999999999999999999&afterSeq=0"
    )
    farStatus, far = await daemon.client.get(
        f"/api/v1/events?sessionId={session['id']}&afterSeq=99999999999999999999999"
    )

    assert status == 200
    assert len(page["events"]) == 2
    assert farStatus == 200
    assert far["events"] == []
