"""Route tests of the coven.daemon.v1 API against in-memory doubles: every route, every error code."""

from __future__ import annotations

import errno
import json
import os
import signal
import sqlite3
import uuid
from typing import Any, Callable, Iterator

import pytest
from twisted.internet import defer
from twisted.internet.error import ProcessDone
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from coven import sessions as sessionsModule
from coven import store as storeModule
from coven.records import SessionRecord
from coven.sessions import DRAIN_TIMEOUT
from coven.store import CHECKPOINT_DELAY, CHECKPOINT_MAX_DELAY, IDLE_AFTER_LOAD_DELAY

from .memory import (
    DAEMON_INFO,
    FAKE_EXECUTABLE,
    MemoryDaemon,
    Response,
    exitReason,
    payload,
    windowSize,
)

SUPPORTED_ACTION = "coven.capabilities.refresh"


@pytest.fixture
def memory(tmp_path: Any) -> Iterator[MemoryDaemon]:
    daemon = MemoryDaemon(str(tmp_path))
    yield daemon
    daemon.close()


@pytest.fixture(params=["/api/v1", ""], ids=["v1", "legacy"])
def prefix(request: Any) -> str:
    return request.param


def checkError(response: Response, status: int, code: str) -> dict[str, Any]:
    """
    Check the status and code of an error envelope and return its error object.
    """
    assert response.status == status, response.body
    assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
    assert response.body["error"]["code"] == code, response.body
    assert isinstance(response.body["error"]["message"], str)
    return response.body["error"]


def kinds(events: list[dict[str, Any]]) -> list[str]:
    return [event["kind"] for event in events]


def outputText(events: list[dict[str, Any]]) -> str:
    return "".join(payload(event)["data"] for event in events if event["kind"] == "output")


def launchRequest(memory: MemoryDaemon, **fields: Any) -> dict[str, Any]:
    return {"projectRoot": memory.project, "harness": "fake", "prompt": "fix the tests", **fields}


def finishedSession(memory: MemoryDaemon) -> str:
    """
    Launch a session whose harness then exits 0, and return its id.
    """
    record, process = memory.launch()
    process.end(exitReason(0))
    return record["id"]


def fillEvents(memory: MemoryDaemon, count: int) -> str:
    """
    Launch a session, commit C{count} output events and return its id.
    """
    record, process = memory.launch()
    for number in range(count):
        process.protocol.outReceived(f"{number}\n".encode("ascii"))
        # Each commit takes the pending output, so every read is its own event.
        memory.clock.advance(0)
    return record["id"]


# Meta routes


def test_api_version_body(memory: MemoryDaemon, prefix: str) -> None:
    response = memory.get(f"{prefix}/api-version")
    assert response.status == 200
    assert response.body == {"apiVersion": "v1", "supportedApiVersions": ["v1"]}


def test_health_contract_shape(memory: MemoryDaemon, prefix: str) -> None:
    response = memory.get(f"{prefix}/health")
    assert response.status == 200
    assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
    assert response.body["ok"] is True
    assert response.body["apiVersion"] == "coven.daemon.v1"
    assert response.body["covenVersion"] == "0.1.0"
    assert response.body["capabilities"] == {
        "sessions": True,
        "events": True,
        "eventCursor": "sequence",
        "structuredErrors": True,
    }
    assert response.body["daemon"] == DAEMON_INFO


def test_health_daemon_null(tmp_path: Any) -> None:
    memory = MemoryDaemon(str(tmp_path), daemonInfo=lambda: None)
    try:
        response = memory.get("/api/v1/health")
    finally:
        memory.close()
    assert response.status == 200
    assert "daemon" in response.body
    assert response.body["daemon"] is None


def test_capabilities_entries(memory: MemoryDaemon, prefix: str) -> None:
    response = memory.get(f"{prefix}/capabilities")
    assert response.status == 200
    assert response.body["harnessConfigError"] is None
    entries = {entry["id"]: entry for entry in response.body["capabilities"]}

    assert entries["coven.control.actions"] == {
        "id": "coven.control.actions",
        "label": "Coven control-plane action router",
        "adapter": "coven-daemon",
        "status": "available",
        "policy": "allow",
        "actions": [SUPPORTED_ACTION],
    }
    assert entries["desktop.automation"]["status"] == "planned"
    assert entries["desktop.automation"]["policy"] == "requiresApproval"
    assert entries["desktop.automation"]["actions"] == []

    # Only fake-agent is on the harnesses' PATH.
    assert entries["harness.fake"]["status"] == "available"
    assert entries["harness.fake"]["executable"] == os.path.join(memory.binFolder, FAKE_EXECUTABLE)
    for builtin in ("codex", "claude", "copilot"):
        assert entries[f"harness.{builtin}"]["status"] == "unavailable", builtin
        assert entries[f"harness.{builtin}"]["executable"] is None, builtin


# Control actions


def test_actions_refresh_shape(memory: MemoryDaemon, prefix: str) -> None:
    capabilities = memory.get("/api/v1/capabilities").body["capabilities"]
    response = memory.post(
        f"{prefix}/actions", {"action": SUPPORTED_ACTION, "origin": "coven-client", "args": {}}
    )
    assert response.status == 200
    assert response.body == {
        "ok": True,
        "accepted": True,
        "action": SUPPORTED_ACTION,
        "status": "completed",
        "event": {
            "kind": "capabilities.refreshed",
            "action": SUPPORTED_ACTION,
            "origin": "coven-client",
            "payload": {"capabilities": len(capabilities)},
        },
    }


def test_actions_refresh_without_origin(memory: MemoryDaemon) -> None:
    response = memory.post("/api/v1/actions", {"action": SUPPORTED_ACTION})
    assert response.status == 200
    assert response.body["event"]["origin"] is None


def test_actions_refresh_reads_new_harness(memory: MemoryDaemon) -> None:
    before = memory.post("/api/v1/actions", {"action": SUPPORTED_ACTION}).body
    with open(memory.configPath, "a") as file:
        file.write(f'\n[harnesses.second]\ncommand = ["{FAKE_EXECUTABLE}"]\n')

    after = memory.post("/api/v1/actions", {"action": SUPPORTED_ACTION}).body
    assert after["event"]["payload"]["capabilities"] == before["event"]["payload"]["capabilities"] + 1
    ids = [entry["id"] for entry in memory.get("/api/v1/capabilities").body["capabilities"]]
    assert "harness.second" in ids


def test_actions_refresh_config_error(memory: MemoryDaemon) -> None:
    with open(memory.configPath, "w") as file:
        file.write("[harnesses.broken\n")
    response = memory.post("/api/v1/actions", {"action": SUPPORTED_ACTION})
    assert response.status == 200
    assert memory.configPath in response.body["event"]["payload"]["harnessConfigError"]


def test_actions_unknown_action(memory: MemoryDaemon, prefix: str) -> None:
    response = memory.post(f"{prefix}/actions", {"action": "desktop.click", "args": {}})
    error = checkError(response, 400, "invalid_request")
    assert error["details"]["action"] == "desktop.click"
    assert error["details"]["supportedActions"] == [SUPPORTED_ACTION]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "action"),
        ({"action": 5}, "action"),
        ({"action": SUPPORTED_ACTION, "origin": 5}, "origin"),
        ({"action": SUPPORTED_ACTION, "args": []}, "args"),
    ],
    ids=["missing action", "action number", "origin number", "args list"],
)
def test_actions_invalid_field(memory: MemoryDaemon, body: dict[str, Any], field: str) -> None:
    error = checkError(memory.post("/api/v1/actions", body), 400, "invalid_request")
    assert error["details"]["field"] == field


# Launch and read sessions


def test_launch_record(memory: MemoryDaemon, prefix: str) -> None:
    response = memory.post(f"{prefix}/sessions", launchRequest(memory, prompt="fix it\nthen test"))
    assert response.status == 201
    record = response.body
    assert uuid.UUID(record["id"]).version == 4
    assert record["project_root"] == os.path.realpath(memory.project)
    assert record["cwd"] == os.path.realpath(memory.project)
    assert record["harness"] == "fake"
    assert record["title"] == "fix it"
    assert record["status"] == "running"
    assert record["exit_code"] is None
    assert record["archived_at"] is None
    assert record["created_at"].endswith("Z")
    assert record["updated_at"] == record["created_at"]


def test_launch_spawn_arguments(memory: MemoryDaemon) -> None:
    record, process = memory.launch("fix it\nthen test")
    assert process.executable == os.path.join(memory.binFolder, FAKE_EXECUTABLE)
    # The prompt is one argv element, newline included.
    assert process.args == [FAKE_EXECUTABLE, "--prompt", "fix it\nthen test"]
    assert process.path == record["cwd"]
    assert process.windowSize == (80, 24)


def test_launch_environment(memory: MemoryDaemon) -> None:
    record, process = memory.launch()
    assert process.env["TERM"] == "xterm-256color"
    assert process.env["COVEN_SESSION_ID"] == record["id"]
    assert process.env["PATH"] == memory.binFolder
    assert "CLAUDECODE" not in process.env
    assert "CLAUDE_CODE_ENTRYPOINT" not in process.env


def test_launch_window_size(memory: MemoryDaemon) -> None:
    _, process = memory.launch(cols=132, rows=43)
    assert process.windowSize == (132, 43)


def test_launch_title_default_cut(memory: MemoryDaemon) -> None:
    record, _ = memory.launch("x" * 100 + "\nsecond line")
    assert record["title"] == "x" * 80


def test_launch_title_given(memory: MemoryDaemon) -> None:
    record, _ = memory.launch("fix it", title="Nightly cleanup")
    assert record["title"] == "Nightly cleanup"


def test_launch_relative_cwd(memory: MemoryDaemon) -> None:
    os.makedirs(os.path.join(memory.project, "src", "app"))
    record, process = memory.launch(cwd="src/app")
    expected = os.path.join(os.path.realpath(memory.project), "src", "app")
    assert record["cwd"] == expected
    assert process.path == expected


def test_launch_symlinked_root(memory: MemoryDaemon, tmp_path: Any) -> None:
    link = str(tmp_path / "project-link")
    os.symlink(memory.project, link)
    record, _ = memory.launch(projectRoot=link)
    assert record["project_root"] == os.path.realpath(memory.project)


def test_sessions_list_newest_first(memory: MemoryDaemon, prefix: str) -> None:
    ids = [memory.launch(f"task {number}")[0]["id"] for number in range(3)]
    response = memory.get(f"{prefix}/sessions")
    assert response.status == 200
    assert [record["id"] for record in response.body] == list(reversed(ids))


def test_sessions_list_empty(memory: MemoryDaemon) -> None:
    response = memory.get("/api/v1/sessions")
    assert response.status == 200
    assert response.body == []


def test_sessions_list_archived_invalid(memory: MemoryDaemon) -> None:
    error = checkError(memory.get("/api/v1/sessions", archived="yes"), 400, "invalid_request")
    assert error["details"]["field"] == "archived"


def test_session_get(memory: MemoryDaemon, prefix: str) -> None:
    record, _ = memory.launch()
    response = memory.get(f"{prefix}/sessions/{record['id']}")
    assert response.status == 200
    assert response.body == record


def test_session_get_unknown(memory: MemoryDaemon, prefix: str) -> None:
    unknown = str(uuid.uuid4())
    error = checkError(memory.get(f"{prefix}/sessions/{unknown}"), 404, "session_not_found")
    assert error["message"] == f"No session has the id {unknown!r}."
    assert error["details"] == {"sessionId": unknown}


# Launch validation


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b'{"prompt": ', "not valid JSON"),
        (b"[]", "must be a JSON object, got an array."),
        (b'"fix the tests"', "must be a JSON object, got a string."),
        (b"12", "must be a JSON object, got 12."),
        (b"", "it is empty"),
        (b'{"prompt": "a", "prompt": "b"}', "duplicate key 'prompt'"),
        (b'{"cols": NaN}', "NaN is not valid JSON"),
        (b'{"cols": -Infinity}', "-Infinity is not valid JSON"),
        (b'{"prompt": "caf\xe9"}', "not valid UTF-8 (byte 15)"),
    ],
    ids=["malformed", "array", "string", "number", "empty", "duplicate key", "NaN", "Infinity", "latin-1"],
)
def test_launch_body_invalid(memory: MemoryDaemon, data: bytes, message: str) -> None:
    error = checkError(memory.post("/api/v1/sessions", data=data), 400, "invalid_request")
    assert message in error["message"]
    assert memory.clock.spawned == []


def test_launch_body_too_deep(memory: MemoryDaemon) -> None:
    data = b'{"title": ' + b"[" * 65 + b"]" * 65 + b"}"
    error = checkError(memory.post("/api/v1/sessions", data=data), 400, "invalid_request")
    assert error["details"] == {"maxDepth": 64}


def test_launch_body_too_large(memory: MemoryDaemon) -> None:
    body = launchRequest(memory, prompt="x" * (1024 * 1024))
    error = checkError(memory.post("/api/v1/sessions", body), 400, "invalid_request")
    assert error["details"] == {"maxBytes": 1024 * 1024}
    assert memory.clock.spawned == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("projectRoot", 5),
        ("harness", ["fake"]),
        ("prompt", None),
        ("prompt", 7),
        ("cwd", 1),
        ("title", False),
        ("cols", "80"),
        ("cols", True),
        ("rows", 2.5),
    ],
)
def test_launch_field_wrong_type(memory: MemoryDaemon, field: str, value: Any) -> None:
    error = checkError(
        memory.post("/api/v1/sessions", launchRequest(memory, **{field: value})), 400, "invalid_request"
    )
    assert error["details"]["field"] == field
    assert memory.clock.spawned == []


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("cols", True, "Field cols must be an integer from 1 to 1000, got true."),
        ("cols", 2.5, "Field cols must be an integer from 1 to 1000, got 2.5."),
        ("cols", "80", "Field cols must be an integer from 1 to 1000, got a string."),
        ("prompt", None, "Field prompt must be a string, got null."),
        ("harness", ["fake"], "Field harness must be a harness id string, got an array."),
        ("title", {}, "Field title must be a string, got an object."),
        # A huge number is cut in the message, not echoed in full.
        ("cols", 10**400, "Field cols must be an integer from 1 to 1000, got " + "1" + "0" * 36 + "...."),
        ("prompt", 10**400, "Field prompt must be a string, got " + "1" + "0" * 36 + "...."),
    ],
)
def test_wrong_type_message_names_value(memory: MemoryDaemon, field: str, value: Any, message: str) -> None:
    error = checkError(
        memory.post("/api/v1/sessions", launchRequest(memory, **{field: value})), 400, "invalid_request"
    )
    assert error["message"] == message


@pytest.mark.parametrize("field", ["projectRoot", "harness", "prompt"])
def test_launch_field_missing(memory: MemoryDaemon, field: str) -> None:
    body = launchRequest(memory)
    del body[field]
    error = checkError(memory.post("/api/v1/sessions", body), 400, "invalid_request")
    assert error["message"].startswith(f"Field {field} is required")
    assert error["details"]["field"] == field


@pytest.mark.parametrize(("field", "value"), [("cols", 0), ("cols", 1001), ("rows", -1)])
def test_launch_size_out_of_range(memory: MemoryDaemon, field: str, value: int) -> None:
    error = checkError(
        memory.post("/api/v1/sessions", launchRequest(memory, **{field: value})), 400, "invalid_request"
    )
    assert error["details"] == {"field": field, "value": value}


def test_launch_unknown_harness(memory: MemoryDaemon) -> None:
    response = memory.post("/api/v1/sessions", launchRequest(memory, harness="aider"))
    error = checkError(response, 400, "invalid_request")
    assert error["message"] == (
        "Unknown harness 'aider'; configured harnesses: claude, codex, copilot, fake."
        f" Add harnesses in {memory.configPath}."
    )
    assert error["details"]["harnesses"] == ["claude", "codex", "copilot", "fake"]
    assert error["details"]["field"] == "harness"


def test_launch_relative_root(memory: MemoryDaemon) -> None:
    response = memory.post("/api/v1/sessions", launchRequest(memory, projectRoot="project"))
    error = checkError(response, 400, "invalid_request")
    assert error["details"] == {"field": "projectRoot", "projectRoot": "project"}


def test_launch_root_is_file(memory: MemoryDaemon) -> None:
    path = os.path.join(memory.project, "README.md")
    with open(path, "w") as file:
        file.write("hello\n")
    response = memory.post("/api/v1/sessions", launchRequest(memory, projectRoot=path))
    error = checkError(response, 400, "invalid_request")
    assert error["message"] == f"projectRoot {path} is not an existing folder."
    assert error["details"]["field"] == "projectRoot"


def test_launch_root_missing(memory: MemoryDaemon) -> None:
    path = os.path.join(memory.home, "no-such-project")
    response = memory.post("/api/v1/sessions", launchRequest(memory, projectRoot=path))
    error = checkError(response, 400, "invalid_request")
    assert error["details"]["field"] == "projectRoot"


def test_launch_root_filesystem(memory: MemoryDaemon) -> None:
    response = memory.post("/api/v1/sessions", launchRequest(memory, projectRoot="/"))
    error = checkError(response, 400, "invalid_request")
    assert error["details"] == {"field": "projectRoot", "projectRoot": "/"}
    assert memory.clock.spawned == []


def test_launch_cwd_missing(memory: MemoryDaemon) -> None:
    response = memory.post("/api/v1/sessions", launchRequest(memory, cwd="no-such-folder"))
    error = checkError(response, 400, "invalid_request")
    assert error["details"] == {"field": "cwd", "cwd": "no-such-folder"}


@pytest.mark.parametrize("field", ["prompt", "title", "cwd", "projectRoot"])
def test_launch_nul_rejected(memory: MemoryDaemon, field: str) -> None:
    body = launchRequest(memory)
    body[field] = body.get(field, "src") + "\x00--yolo"
    error = checkError(memory.post("/api/v1/sessions", body), 400, "invalid_request")
    assert error["details"] == {"field": field}
    assert memory.clock.spawned == []


# project_root_violation


def test_cwd_dotdot_violation(memory: MemoryDaemon) -> None:
    outside = os.path.join(memory.home, "outside")
    os.makedirs(outside)
    response = memory.post("/api/v1/sessions", launchRequest(memory, cwd="../outside"))
    error = checkError(response, 400, "project_root_violation")
    assert error["details"] == {
        "cwd": "../outside",
        "resolvedCwd": os.path.realpath(outside),
        "projectRoot": os.path.realpath(memory.project),
    }
    assert memory.clock.spawned == []


def test_cwd_symlink_violation(memory: MemoryDaemon) -> None:
    outside = os.path.join(memory.home, "outside")
    os.makedirs(outside)
    os.symlink(outside, os.path.join(memory.project, "escape"))
    response = memory.post("/api/v1/sessions", launchRequest(memory, cwd="escape"))
    error = checkError(response, 400, "project_root_violation")
    assert error["details"]["resolvedCwd"] == os.path.realpath(outside)
    assert memory.clock.spawned == []
    assert memory.get("/api/v1/sessions").body == []


def test_cwd_absolute_violation(memory: MemoryDaemon) -> None:
    outside = os.path.join(memory.home, "outside")
    os.makedirs(outside)
    response = memory.post("/api/v1/sessions", launchRequest(memory, cwd=outside))
    error = checkError(response, 400, "project_root_violation")
    assert error["details"]["resolvedCwd"] == os.path.realpath(outside)


def test_cwd_sibling_prefix_violation(memory: MemoryDaemon) -> None:
    # "project-old" starts with the root's name but is not below it.
    sibling = memory.project + "-old"
    os.makedirs(sibling)
    response = memory.post("/api/v1/sessions", launchRequest(memory, cwd=sibling))
    checkError(response, 400, "project_root_violation")


# pty_spawn_failed and runtime_unavailable


def test_spawn_missing_executable(memory: MemoryDaemon) -> None:
    response = memory.post("/api/v1/sessions", launchRequest(memory, harness="codex"))
    error = checkError(response, 500, "pty_spawn_failed")
    sessionId = error["details"]["sessionId"]
    assert error["details"] == {"sessionId": sessionId, "harness": "codex"}
    assert memory.clock.spawned == []

    record = memory.get(f"/api/v1/sessions/{sessionId}").body
    assert record["status"] == "failed"
    assert record["harness"] == "codex"
    assert record["exit_code"] is None

    events = memory.events(sessionId)
    assert kinds(events) == ["exit"]
    assert payload(events[0]) == {
        "exitCode": None,
        "signal": None,
        "status": "failed",
        "reason": "executable 'codex' was not found on the daemon's PATH",
    }


def test_spawn_oserror(memory: MemoryDaemon) -> None:
    memory.clock.spawnError = OSError(errno.EACCES, "Permission denied")
    response = memory.post("/api/v1/sessions", launchRequest(memory))
    error = checkError(response, 500, "pty_spawn_failed")
    sessionId = error["details"]["sessionId"]
    assert error["details"] == {"sessionId": sessionId, "harness": "fake"}

    assert memory.get(f"/api/v1/sessions/{sessionId}").body["status"] == "failed"
    events = memory.events(sessionId)
    assert kinds(events) == ["exit"]
    executable = os.path.join(memory.binFolder, FAKE_EXECUTABLE)
    assert payload(events[0])["reason"] == f"spawning {executable} failed: Permission denied"
    assert payload(events[0])["status"] == "failed"

    # spawnProcess raised after receiving the PTY pair, so closing both
    # descriptors is the daemon's job.
    [(master, slave)] = memory.clock.rejectedPTYs
    for descriptor in (master, slave):
        with pytest.raises(OSError) as raised:
            os.fstat(descriptor)
        assert raised.value.errno == errno.EBADF
    assert memory.sessions.liveCount == 0


def damagedPagesError() -> sqlite3.DatabaseError:
    """
    Return the error SQLite raises on damaged database pages.
    """
    error = sqlite3.DatabaseError("database disk image is malformed")
    error.sqlite_errorcode = 11  # type: ignore[attr-defined]
    return error


def failNextWrites(
    monkeypatch: pytest.MonkeyPatch,
    count: int,
    error: Callable[[], Exception] = lambda: sqlite3.OperationalError("database or disk is full"),
) -> None:
    """
    Make the store's next C{count} write transactions fail with C{error()},
    by default as on a full disk.
    """
    write = storeModule._writeBatch
    failures = [count]

    def failing(cursor: sqlite3.Cursor, batch: Any) -> Any:
        if failures[0]:
            failures[0] -= 1
            raise error()
        return write(cursor, batch)

    monkeypatch.setattr(storeModule, "_writeBatch", failing)


def test_unrecorded_launch_kills_harness(memory: MemoryDaemon, monkeypatch: pytest.MonkeyPatch) -> None:
    failNextWrites(monkeypatch, 1)
    error = checkError(memory.post("/api/v1/sessions", launchRequest(memory)), 503, "runtime_unavailable")
    sessionId = error["details"]["sessionId"]
    [process] = memory.clock.spawned

    # A client that retries must not get a second harness beside this one.
    assert memory.signals.calls == [(process.transport.pid, sessionId, signal.SIGTERM)]
    assert error["message"] == (
        f"The session store could not record session {sessionId} (is the disk full?), so its"
        " harness was killed; launch again once the store can write."
    )
    # The record is written once the store can write again.
    process.end(exitReason(signal=signal.SIGTERM))
    memory.clock.advance(storeModule.RETRY_DELAY)
    events = memory.events(sessionId)
    assert kinds(events) == ["kill", "exit"]
    assert payload(events[0])["reason"] == "the session store could not record the launch"
    assert memory.get(f"/api/v1/sessions/{sessionId}").body["status"] == "killed"


def test_launch_on_damaged_database_explained(memory: MemoryDaemon, monkeypatch: pytest.MonkeyPatch) -> None:
    failNextWrites(monkeypatch, 2, damagedPagesError)
    first = checkError(memory.post("/api/v1/sessions", launchRequest(memory)), 503, "runtime_unavailable")
    second = checkError(memory.post("/api/v1/sessions", launchRequest(memory)), 503, "runtime_unavailable")

    assert first["message"] == (
        f"The session store could not record session {first['details']['sessionId']} (its database"
        " file is damaged), so its harness was killed; launch again once the store can write."
    )
    assert second["message"] == (
        "The session store cannot write: its database file is damaged; `coven doctor` checks it."
        " No session is launched until the store can write."
    )
    assert len(memory.clock.spawned) == 1


def test_unrecorded_kill_still_accepted(memory: MemoryDaemon, monkeypatch: pytest.MonkeyPatch) -> None:
    record, process = memory.launch()
    failNextWrites(monkeypatch, 1)
    response = memory.post(f"/api/v1/sessions/{record['id']}/kill")

    # The signal went out, so the kill is not reported as failed.
    assert response.status == 202, response.body
    assert memory.signals.calls == [(process.transport.pid, record["id"], signal.SIGTERM)]
    memory.clock.advance(storeModule.RETRY_DELAY)
    assert kinds(memory.events(record["id"])) == ["kill"]


def test_launch_after_stop(memory: MemoryDaemon) -> None:
    stopped = memory.sessions.stopService()
    assert stopped.called
    error = checkError(memory.post("/api/v1/sessions", launchRequest(memory)), 503, "runtime_unavailable")
    assert error["message"] == "The daemon is stopping and launches no new sessions."
    assert memory.clock.spawned == []
    assert memory.get("/api/v1/sessions").body == []


def test_stop_kills_live_sessions(memory: MemoryDaemon) -> None:
    record, process = memory.launch()
    stopped = memory.sessions.stopService()
    memory.clock.advance(0)
    assert not stopped.called
    assert memory.signals.calls == [(process.transport.pid, record["id"], signal.SIGTERM)]

    process.end(exitReason(signal=signal.SIGTERM))
    memory.clock.advance(0)
    assert stopped.called
    events = memory.events(record["id"])
    assert kinds(events) == ["kill", "exit"]
    assert payload(events[0])["reason"] == "daemon stopping"
    assert payload(events[1])["status"] == "killed"


def test_stop_waits_for_leftovers_sigkill(memory: MemoryDaemon) -> None:
    record, process = memory.launch()
    stopped: list[object] = []
    memory.sessions.stopService().addBoth(stopped.append)
    memory.clock.advance(0)
    # The harness exits at SIGTERM, but a process it started ignores it.
    memory.signals.reached = True
    process.end(exitReason(signal=signal.SIGTERM))
    memory.clock.advance(0)
    waited = stopped == []
    memory.clock.advance(memory.sessions.killGrace)

    term, check, kill = (
        (process.transport.pid, record["id"], number) for number in (signal.SIGTERM, 0, signal.SIGKILL)
    )
    assert waited
    assert stopped == [None]
    assert memory.signals.calls == [term, check, kill]


# internal_error


def test_unexpected_error_envelope(memory: MemoryDaemon, monkeypatch: Any) -> None:
    def listSessions(archived: bool = False) -> Any:
        raise RuntimeError("disk image at /secret/path is malformed")

    monkeypatch.setattr(memory.store, "listSessions", listSessions)
    response = memory.get("/api/v1/sessions")
    error = checkError(response, 500, "internal_error")
    # Exactly the generic envelope: no exception text, no traceback.
    assert response.body == {
        "error": {"code": "internal_error", "message": "Unexpected internal daemon error."}
    }
    assert "details" not in error


def test_unexpected_failed_deferred(memory: MemoryDaemon, monkeypatch: Any) -> None:
    record, _ = memory.launch()

    def getSession(sessionId: str) -> Any:
        return defer.fail(RuntimeError("cursor closed"))

    monkeypatch.setattr(memory.store, "getSession", getSession)
    response = memory.get(f"/api/v1/sessions/{record['id']}")
    checkError(response, 500, "internal_error")
    assert "cursor closed" not in json.dumps(response.body)


# Routing: not_found and unsupported versions


@pytest.mark.parametrize("path", ["/nope", "/api/v1/nope", "/api/v1/sessions/a/b/c", "/"])
def test_unknown_path_not_found(memory: MemoryDaemon, path: str) -> None:
    error = checkError(memory.get(path), 404, "not_found")
    assert error["message"] == "Route not found."
    assert error["details"] == {"method": "GET", "path": path}


@pytest.mark.parametrize(
    ("method", "route"),
    [
        ("POST", "/health"),
        ("DELETE", "/api-version"),
        ("PUT", "/capabilities"),
        ("GET", "/actions"),
        ("PATCH", "/sessions"),
        ("POST", "/events"),
        ("GET", "/sessions/SESSION/input"),
        ("GET", "/sessions/SESSION/kill"),
        ("PUT", "/sessions/SESSION/resize"),
        ("GET", "/sessions/SESSION/archive"),
        ("DELETE", "/sessions/SESSION/summon"),
        ("POST", "/sessions/SESSION"),
        ("OPTIONS", "/sessions/SESSION/kill"),
    ],
)
def test_wrong_method_not_found(memory: MemoryDaemon, prefix: str, method: str, route: str) -> None:
    record, _ = memory.launch()
    path = prefix + route.replace("SESSION", record["id"])
    error = checkError(memory.request(method, path), 404, "not_found")
    assert error["details"] == {"method": method, "path": path}
    # A request with the wrong method must not act on the session.
    assert memory.signals.calls == []
    assert memory.get(f"/api/v1/sessions/{record['id']}").body["status"] == "running"


@pytest.mark.parametrize("path", ["/api/v2/health", "/api/v2", "/api/latest/sessions"])
def test_unsupported_api_version(memory: MemoryDaemon, path: str) -> None:
    error = checkError(memory.get(path), 404, "invalid_request")
    version = path.split("/")[2]
    assert error["message"] == "Unsupported API version."
    assert error["details"] == {"apiVersion": version, "supportedApiVersions": ["v1"]}


def test_unsupported_version_post(memory: MemoryDaemon) -> None:
    response = memory.post("/api/v0/sessions", launchRequest(memory))
    error = checkError(response, 404, "invalid_request")
    assert error["details"]["apiVersion"] == "v0"
    assert memory.clock.spawned == []


def test_non_utf8_path_envelope(memory: MemoryDaemon) -> None:
    response = memory.get("/api/v1/sessions/%FF")
    checkError(response, 400, "invalid_request")


@pytest.mark.parametrize(
    "route", ["/actions", "/sessions", "/sessions/SESSION/input", "/sessions/SESSION/resize"]
)
def test_json_routes_reject_array(memory: MemoryDaemon, route: str) -> None:
    record, process = memory.launch()
    path = "/api/v1" + route.replace("SESSION", record["id"])
    error = checkError(memory.post(path, data=b'["data"]'), 400, "invalid_request")
    assert "must be a JSON object, got an array." in error["message"]
    assert process.transport.written == []


# Events


def test_events_page(memory: MemoryDaemon, prefix: str) -> None:
    record, process = memory.launch()
    process.protocol.outReceived(b"hello\n")
    memory.clock.advance(0)
    response = memory.get(f"{prefix}/events", sessionId=record["id"])
    assert response.status == 200
    [event] = response.body["events"]
    assert event["kind"] == "output"
    assert event["session_id"] == record["id"]
    assert json.loads(event["payload_json"]) == {"data": "hello\n"}
    assert uuid.UUID(event["id"]).version == 4
    assert event["created_at"].endswith("Z")
    assert response.body["nextCursor"] == {"afterSeq": event["seq"]}
    assert response.body["hasMore"] is False


def test_events_empty_page(memory: MemoryDaemon) -> None:
    record, _ = memory.launch()
    response = memory.get("/api/v1/events", sessionId=record["id"])
    assert response.status == 200
    assert response.body == {"events": [], "nextCursor": None, "hasMore": False}


def test_events_after_seq(memory: MemoryDaemon) -> None:
    sessionId = fillEvents(memory, 3)
    seqs = [event["seq"] for event in memory.events(sessionId)]
    events = memory.events(sessionId, afterSeq=seqs[0])
    assert [event["seq"] for event in events] == seqs[1:]


def test_events_after_event_id(memory: MemoryDaemon) -> None:
    sessionId = fillEvents(memory, 3)
    first, second, third = memory.events(sessionId)
    events = memory.events(sessionId, afterEventId=first["id"])
    assert [event["id"] for event in events] == [second["id"], third["id"]]


def test_events_after_seq_wins(memory: MemoryDaemon) -> None:
    sessionId = fillEvents(memory, 3)
    first, second, third = memory.events(sessionId)
    events = memory.events(sessionId, afterSeq=second["seq"], afterEventId=first["id"])
    assert [event["id"] for event in events] == [third["id"]]


def test_events_unknown_event_id(memory: MemoryDaemon) -> None:
    sessionId = fillEvents(memory, 1)
    unknown = str(uuid.uuid4())
    response = memory.get("/api/v1/events", sessionId=sessionId, afterEventId=unknown)
    error = checkError(response, 400, "invalid_request")
    assert error["details"] == {"field": "afterEventId", "sessionId": sessionId, "afterEventId": unknown}


def test_events_event_id_other_session(memory: MemoryDaemon) -> None:
    # An event id resolves only within its own session.
    first = fillEvents(memory, 1)
    second = fillEvents(memory, 1)
    [event] = memory.events(first)
    response = memory.get("/api/v1/events", sessionId=second, afterEventId=event["id"])
    error = checkError(response, 400, "invalid_request")
    assert error["details"]["field"] == "afterEventId"


def test_events_event_id_unknown_session(memory: MemoryDaemon) -> None:
    unknown = str(uuid.uuid4())
    response = memory.get("/api/v1/events", sessionId=unknown, afterEventId=str(uuid.uuid4()))
    error = checkError(response, 404, "session_not_found")
    assert error["details"] == {"sessionId": unknown}


def test_events_limit_has_more(memory: MemoryDaemon) -> None:
    sessionId = fillEvents(memory, 3)
    seqs = [event["seq"] for event in memory.events(sessionId)]

    page = memory.get("/api/v1/events", sessionId=sessionId, limit=2).body
    assert [event["seq"] for event in page["events"]] == seqs[:2]
    assert page["hasMore"] is True
    assert page["nextCursor"] == {"afterSeq": seqs[1]}

    rest = memory.get("/api/v1/events", sessionId=sessionId, afterSeq=seqs[1], limit=2).body
    assert [event["seq"] for event in rest["events"]] == seqs[2:]
    assert rest["hasMore"] is False

    # A page that ends exactly at the last event has nothing more.
    exact = memory.get("/api/v1/events", sessionId=sessionId, limit=3).body
    assert exact["hasMore"] is False


def test_events_limit_default(memory: MemoryDaemon) -> None:
    sessionId = fillEvents(memory, 1001)
    page = memory.get("/api/v1/events", sessionId=sessionId).body
    assert len(page["events"]) == 1000
    assert page["hasMore"] is True


def test_events_limit_clamped(memory: MemoryDaemon) -> None:
    sessionId = fillEvents(memory, 1001)
    page = memory.get("/api/v1/events", sessionId=sessionId, limit=5000).body
    assert len(page["events"]) == 1000
    assert page["hasMore"] is True
    rest = memory.get("/api/v1/events", sessionId=sessionId, afterSeq=page["nextCursor"]["afterSeq"]).body
    assert [payload(event)["data"] for event in rest["events"]] == ["1000\n"]


def test_events_limit_huge_clamped(memory: MemoryDaemon) -> None:
    # 10**20 does not fit in 64 bits, but it is still an integer above 1000.
    sessionId = fillEvents(memory, 2)
    response = memory.get("/api/v1/events", sessionId=sessionId, limit="1" + "0" * 20)
    assert response.status == 200, response.body
    assert len(response.body["events"]) == 2


def test_events_after_seq_huge(memory: MemoryDaemon) -> None:
    # No seq is above SQLite's largest integer, so the page is empty, not an error.
    sessionId = fillEvents(memory, 1)
    response = memory.get("/api/v1/events", sessionId=sessionId, afterSeq="9" * 30)
    assert response.status == 200, response.body
    assert response.body == {"events": [], "nextCursor": None, "hasMore": False}


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("limit", "0"),
        ("limit", "-1"),
        ("limit", "ten"),
        ("limit", "2.5"),
        ("afterSeq", "-1"),
        ("afterSeq", "1e3"),
        ("waitMs", "60001"),
        ("waitMs", "-5"),
    ],
)
def test_events_bad_integer(memory: MemoryDaemon, name: str, value: str) -> None:
    record, _ = memory.launch()
    response = memory.get("/api/v1/events", sessionId=record["id"], **{name: value})
    error = checkError(response, 400, "invalid_request")
    assert error["details"] == {"field": name, "value": value}


def test_events_repeated_parameter_rejected(memory: MemoryDaemon) -> None:
    record, _ = memory.launch()
    response = memory.request("GET", f"/api/v1/events?sessionId={record['id']}&afterSeq=1&afterSeq=2")
    error = checkError(response, 400, "invalid_request")
    assert error["message"] == "Query parameter afterSeq is given 2 times. Give it once."
    assert error["details"] == {"field": "afterSeq", "count": 2}


def test_events_session_required(memory: MemoryDaemon) -> None:
    error = checkError(memory.get("/api/v1/events"), 400, "invalid_request")
    assert error["details"] == {"field": "sessionId"}


def test_events_unknown_session(memory: MemoryDaemon) -> None:
    unknown = str(uuid.uuid4())
    error = checkError(memory.get("/api/v1/events", sessionId=unknown), 404, "session_not_found")
    assert error["details"] == {"sessionId": unknown}


def test_events_seq_global_order(memory: MemoryDaemon) -> None:
    first, firstProcess = memory.launch()
    second, secondProcess = memory.launch()
    # Whole lines, which the redactor never holds back as a possible secret.
    firstProcess.protocol.outReceived(b"a\n")
    secondProcess.protocol.outReceived(b"b\n")
    memory.clock.advance(0)
    firstProcess.protocol.outReceived(b"c\n")
    memory.clock.advance(0)

    firstEvents = memory.events(first["id"])
    secondEvents = memory.events(second["id"])
    assert [payload(event)["data"] for event in firstEvents] == ["a\n", "c\n"]
    assert [payload(event)["data"] for event in secondEvents] == ["b\n"]
    assert firstEvents[0]["seq"] < secondEvents[0]["seq"] < firstEvents[1]["seq"]


def test_long_poll_woken_by_output(memory: MemoryDaemon) -> None:
    record, process = memory.launch()
    pending = memory.send("GET", f"/api/v1/events?sessionId={record['id']}&waitMs=5000")
    assert not memory.isSettled(pending)

    process.protocol.outReceived(b"working\n")
    response = memory.settle(pending)
    assert response.status == 200
    assert [payload(event)["data"] for event in response.body["events"]] == ["working\n"]
    # Woken by the commit, before any time passed, and the wait's timer is gone.
    assert memory.clock.seconds() == 0
    assert memory.clock.getDelayedCalls() == []


def test_long_poll_after_cursor(memory: MemoryDaemon) -> None:
    record, process = memory.launch()
    process.protocol.outReceived(b"first\n")
    [first] = memory.events(record["id"])

    path = f"/api/v1/events?sessionId={record['id']}&afterSeq={first['seq']}&waitMs=5000"
    pending = memory.send("GET", path)
    assert not memory.isSettled(pending)
    process.protocol.outReceived(b"second\n")
    response = memory.settle(pending)
    assert [payload(event)["data"] for event in response.body["events"]] == ["second\n"]


def settleAfterWaitMs(memory: MemoryDaemon, path: str) -> Response:
    """
    Send a GET of C{path}, which has waitMs=2000, check that it is still open
    after 1.5 s, and return its response once the 2 s have passed.
    """
    pending = memory.send("GET", path)
    memory.clock.advance(1.5)
    assert not memory.isSettled(pending)

    memory.clock.advance(0.5)
    return memory.settle(pending)


def test_long_poll_times_out(memory: MemoryDaemon) -> None:
    record, _ = memory.launch()
    response = settleAfterWaitMs(memory, f"/api/v1/events?sessionId={record['id']}&waitMs=2000")
    assert response.status == 200
    assert response.body == {"events": [], "nextCursor": None, "hasMore": False}


def test_long_poll_ignores_other_session(memory: MemoryDaemon) -> None:
    watched, _ = memory.launch()
    _, otherProcess = memory.launch()
    pending = memory.send("GET", f"/api/v1/events?sessionId={watched['id']}&waitMs=1000")
    otherProcess.protocol.outReceived(b"elsewhere\n")
    assert not memory.isSettled(pending)

    memory.clock.advance(1)
    response = memory.settle(pending)
    assert response.body["events"] == []


def test_long_poll_returns_at_once(memory: MemoryDaemon) -> None:
    # With events past the cursor there is nothing to wait for.
    sessionId = fillEvents(memory, 1)
    pending = memory.send("GET", f"/api/v1/events?sessionId={sessionId}&waitMs=60000")
    assert memory.isSettled(pending)
    assert len(memory.settle(pending).body["events"]) == 1
    assert memory.clock.getDelayedCalls() == []


def hangUpWhileWaiting(memory: MemoryDaemon, path: str) -> None:
    """
    Send a waiting GET of C{path}, check that it waits, then close the
    client's connection.
    """
    pending = memory.send("GET", path)
    assert not memory.isSettled(pending)
    pending.deferred.cancel()
    memory.client.flush()


def test_long_poll_client_gone(memory: MemoryDaemon) -> None:
    record, _ = memory.launch()
    hangUpWhileWaiting(memory, f"/api/v1/events?sessionId={record['id']}&waitMs=5000")
    # The daemon saw the connection close and dropped the wait's timer.
    assert memory.clock.getDelayedCalls() == []


def test_long_poll_unknown_session(memory: MemoryDaemon) -> None:
    unknown = str(uuid.uuid4())
    pending = memory.send("GET", f"/api/v1/events?sessionId={unknown}&waitMs=5000")
    checkError(memory.settle(pending), 404, "session_not_found")
    assert memory.clock.getDelayedCalls() == []


# Waiting for a session's end


def test_session_wait_until_exit(memory: MemoryDaemon) -> None:
    record, process = memory.launch()
    pending = memory.send("GET", f"/api/v1/sessions/{record['id']}?waitMs=5000")
    assert not memory.isSettled(pending)

    process.protocol.outReceived(b"bye\n")
    assert not memory.isSettled(pending)
    process.end(exitReason(0))
    response = memory.settle(pending)
    assert response.status == 200
    assert response.body["status"] == "completed"
    assert response.body["exit_code"] == 0
    # Woken by the exit's commit, before any time passed.
    assert memory.clock.seconds() == 0


def test_session_wait_until_kill(memory: MemoryDaemon) -> None:
    record, _ = memory.launch()
    pending = memory.send("GET", f"/api/v1/sessions/{record['id']}?waitMs=5000")
    memory.post(f"/api/v1/sessions/{record['id']}/kill")

    response = memory.settle(pending)
    assert response.body["status"] == "killed"
    assert memory.clock.seconds() == 0


def test_session_wait_times_out(memory: MemoryDaemon) -> None:
    record, _ = memory.launch()
    response = settleAfterWaitMs(memory, f"/sessions/{record['id']}?waitMs=2000")
    assert response.status == 200
    assert response.body == record
    assert memory.clock.getDelayedCalls() == []


def test_session_wait_ended_at_once(memory: MemoryDaemon) -> None:
    record, process = memory.launch()
    process.end(exitReason(3))
    memory.clock.advance(0)

    pending = memory.send("GET", f"/api/v1/sessions/{record['id']}?waitMs=60000")
    assert memory.isSettled(pending)
    assert memory.settle(pending).body["status"] == "failed"


def test_session_wait_client_gone(memory: MemoryDaemon) -> None:
    record, process = memory.launch()
    hangUpWhileWaiting(memory, f"/api/v1/sessions/{record['id']}?waitMs=5000")
    # The daemon dropped the wait and its timer.
    assert memory.clock.getDelayedCalls() == []
    assert memory.sessions._live[record["id"]].endWaiters == []
    process.end(exitReason(0))
    assert memory.get(f"/api/v1/sessions/{record['id']}").body["status"] == "completed"


def test_session_wait_between_exit_and_commit(memory: MemoryDaemon) -> None:
    record, process = memory.launch()
    # The harness exited; its exit is queued but not committed.
    process.end(exitReason(0))
    assert record["id"] not in memory.sessions._live

    pending = memory.send("GET", f"/api/v1/sessions/{record['id']}?waitMs=5000")

    # Returned once the exit was committed, not at once as still running.
    response = memory.settle(pending)
    assert response.body["status"] == "completed"
    assert memory.clock.seconds() == 0


def test_session_wait_while_store_cannot_write(memory: MemoryDaemon, monkeypatch: pytest.MonkeyPatch) -> None:
    record, process = memory.launch()
    original = storeModule._writeBatch

    def diskFull(cursor: Any, batch: Any) -> Any:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(storeModule, "_writeBatch", diskFull)
    process.end(exitReason(0))
    memory.clock.advance(0)
    pending = memory.send("GET", f"/api/v1/sessions/{record['id']}?waitMs=5000")
    settledWhileFull = memory.isSettled(pending)
    monkeypatch.setattr(storeModule, "_writeBatch", original)
    memory.clock.advance(1)

    assert not settledWhileFull
    assert memory.settle(pending).body["status"] == "completed"


def test_session_wait_unknown_session(memory: MemoryDaemon) -> None:
    unknown = str(uuid.uuid4())
    pending = memory.send("GET", f"/api/v1/sessions/{unknown}?waitMs=5000")
    checkError(memory.settle(pending), 404, "session_not_found")
    assert memory.clock.getDelayedCalls() == []


@pytest.mark.parametrize("value", ["60001", "-5", "soon"])
def test_session_wait_bad_integer(memory: MemoryDaemon, value: str) -> None:
    record, _ = memory.launch()
    response = memory.get(f"/api/v1/sessions/{record['id']}", waitMs=value)
    error = checkError(response, 400, "invalid_request")
    assert error["details"] == {"field": "waitMs", "value": value}


# Input


def test_input_accepted(memory: MemoryDaemon, prefix: str) -> None:
    record, process = memory.launch()
    response = memory.post(f"{prefix}/sessions/{record['id']}/input", {"data": "héllo ✓\n"})
    assert response.status == 202
    assert response.body == {"ok": True, "accepted": True}
    assert process.transport.written == ["héllo ✓\n".encode("utf-8")]
    [event] = memory.events(record["id"])
    assert event["kind"] == "input"
    assert payload(event) == {"data": "héllo ✓\n"}


def test_input_after_earlier_output(memory: MemoryDaemon) -> None:
    record, process = memory.launch()
    # The input arrives in the same reactor turn as the output, so the output
    # is queued but not yet committed.
    process.protocol.outReceived(b"ready\n")
    memory.settle(memory.send("POST", f"/api/v1/sessions/{record['id']}/input", {"data": "continue\n"}))
    process.protocol.outReceived(b"continue\r\n")

    events = memory.events(record["id"])
    assert kinds(events) == ["output", "input", "output"]
    assert [payload(event)["data"] for event in events] == ["ready\n", "continue\n", "continue\r\n"]


@pytest.mark.parametrize(
    "body", [{"data": ""}, {}, {"data": 5}, {"data": None}, {"data": ["a"]}],
    ids=["empty", "missing", "number", "null", "list"],
)
def test_input_data_invalid(memory: MemoryDaemon, body: dict[str, Any]) -> None:
    record, process = memory.launch()
    response = memory.post(f"/api/v1/sessions/{record['id']}/input", body)
    error = checkError(response, 400, "invalid_request")
    assert error["details"] == {"field": "data"}
    assert process.transport.written == []
    assert memory.events(record["id"]) == []


def test_input_not_live(memory: MemoryDaemon) -> None:
    sessionId = finishedSession(memory)
    response = memory.post(f"/api/v1/sessions/{sessionId}/input", {"data": "more\n"})
    error = checkError(response, 409, "session_not_live")
    assert error["message"] == (
        f"Session {sessionId} has already ended (completed). Start a new session to go on."
    )
    assert error["details"] == {"sessionId": sessionId, "status": "completed"}


def test_input_unknown_session(memory: MemoryDaemon) -> None:
    unknown = str(uuid.uuid4())
    response = memory.post(f"/api/v1/sessions/{unknown}/input", {"data": "more\n"})
    error = checkError(response, 404, "session_not_found")
    assert error["details"] == {"sessionId": unknown}


def test_input_row_from_other_daemon(memory: MemoryDaemon) -> None:
    # A row left running by another daemon is not a process this daemon can feed.
    record = SessionRecord(
        id=str(uuid.uuid4()),
        project_root=memory.project,
        cwd=memory.project,
        harness="fake",
        title="old",
        status="running",
        exit_code=None,
        archived_at=None,
        created_at="2026-05-09T06:43:00.000Z",
        updated_at="2026-05-09T06:43:00.000Z",
    )
    memory.store.insertSession(record)
    memory.clock.advance(0)

    response = memory.post(f"/api/v1/sessions/{record.id}/input", {"data": "more\n"})
    checkError(response, 409, "session_not_live")
    checkError(memory.post(f"/api/v1/sessions/{record.id}/kill"), 409, "session_not_live")


def test_input_unpaired_surrogate(memory: MemoryDaemon) -> None:
    record, process = memory.launch()
    response = memory.post(f"/api/v1/sessions/{record['id']}/input", data=b'{"data": "\\ud800"}')
    checkError(response, 400, "invalid_request")

    # Later writes must still commit.
    process.protocol.outReceived(b"still here\n")
    assert outputText(memory.events(record["id"])) == "still here\n"


def test_launch_unpaired_surrogate(memory: MemoryDaemon) -> None:
    data = json.dumps(launchRequest(memory)).encode("ascii")[:-1] + b', "title": "\\ud83d"}'
    response = memory.post("/api/v1/sessions", data=data)
    checkError(response, 400, "invalid_request")
    assert memory.clock.spawned == []


# Kill


def test_kill_accepted(memory: MemoryDaemon, prefix: str) -> None:
    record, process = memory.launch()
    response = memory.post(f"{prefix}/sessions/{record['id']}/kill")
    assert response.status == 202
    assert response.body == {"ok": True, "accepted": True}

    # Status and event change at once, before the harness has exited.
    assert memory.get(f"/api/v1/sessions/{record['id']}").body["status"] == "killed"
    [event] = memory.events(record["id"])
    assert event["kind"] == "kill"
    assert payload(event) == {"status": "killed", "signal": "SIGTERM", "reason": "requested"}
    assert memory.signals.calls == [(process.transport.pid, record["id"], signal.SIGTERM)]


def test_kill_sigkill_after_grace(memory: MemoryDaemon, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each signal carries the harness's start time read at the spawn, which
    # signalSession compares with the pid's current one to detect a reuse.
    monkeypatch.setattr(sessionsModule, "processStartTicks", lambda pid: pid + 7)
    record, process = memory.launch()
    memory.post(f"/api/v1/sessions/{record['id']}/kill")
    term = (process.transport.pid, record["id"], signal.SIGTERM)
    kill = (process.transport.pid, record["id"], signal.SIGKILL)

    memory.clock.advance(memory.sessions.killGrace - 0.1)
    assert memory.signals.calls == [term]
    memory.clock.advance(0.1)
    assert memory.signals.calls == [term, kill]
    assert memory.signals.startTimes == [process.transport.pid + 7] * 2


def test_kill_twice_not_live(memory: MemoryDaemon) -> None:
    record, _ = memory.launch()
    memory.post(f"/api/v1/sessions/{record['id']}/kill")
    error = checkError(memory.post(f"/api/v1/sessions/{record['id']}/kill"), 409, "session_not_live")
    # The harness has not exited yet.
    assert error["message"] == f"Session {record['id']} is ending (killed) and takes no more requests."
    assert error["details"] == {"sessionId": record["id"], "status": "killed"}
    assert len(memory.signals.calls) == 1


def test_kill_finished_not_live(memory: MemoryDaemon) -> None:
    sessionId = finishedSession(memory)
    error = checkError(memory.post(f"/api/v1/sessions/{sessionId}/kill"), 409, "session_not_live")
    assert error["message"] == (
        f"Session {sessionId} has already ended (completed), so there is nothing to kill."
    )


def test_archive_while_killing_not_live(memory: MemoryDaemon) -> None:
    record, _ = memory.launch()
    running = checkError(memory.post(f"/api/v1/sessions/{record['id']}/archive"), 409, "session_not_live")
    memory.post(f"/api/v1/sessions/{record['id']}/kill")
    killing = checkError(memory.post(f"/api/v1/sessions/{record['id']}/archive"), 409, "session_not_live")

    assert running["message"] == (
        f"Session {record['id']} is still running; kill it or wait for it to exit first."
    )
    # The kill was requested, so the advice is to wait for the exit, not to kill.
    assert killing["message"] == (
        f"Session {record['id']} is being killed but has not exited yet (SIGKILL follows"
        f" {memory.sessions.killGrace:g} s after SIGTERM); try again once it has exited."
    )
    assert killing["details"] == {"sessionId": record["id"], "status": "killed"}


def test_end_logged_with_code_or_signal(memory: MemoryDaemon) -> None:
    logged: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        exited, exitedProcess = memory.launch()
        exitedProcess.end(exitReason(3))
        killed, killedProcess = memory.launch()
        killedProcess.end(exitReason(signal=signal.SIGKILL))
    finally:
        globalLogPublisher.removeObserver(logged.append)

    lines = [formatEvent(event) for event in logged]
    assert f"Session {exited['id']} ended: failed, exit code 3" in lines
    # A harness ended by a signal has no exit code to show.
    assert f"Session {killed['id']} ended: failed, signal SIGKILL" in lines


def test_kill_unknown_session(memory: MemoryDaemon) -> None:
    unknown = str(uuid.uuid4())
    error = checkError(memory.post(f"/api/v1/sessions/{unknown}/kill"), 404, "session_not_found")
    assert error["details"] == {"sessionId": unknown}


def test_killed_rejects_input(memory: MemoryDaemon) -> None:
    record, process = memory.launch()
    memory.post(f"/api/v1/sessions/{record['id']}/kill")
    response = memory.post(f"/api/v1/sessions/{record['id']}/input", {"data": "more\n"})
    checkError(response, 409, "session_not_live")
    assert process.transport.written == []


# Resize


def test_resize_accepted(memory: MemoryDaemon, prefix: str) -> None:
    record, process = memory.launch()
    response = memory.post(f"{prefix}/sessions/{record['id']}/resize", {"cols": 120, "rows": 40})
    assert response.status == 202
    assert response.body == {"ok": True, "accepted": True}
    assert windowSize(process.transport.fileno()) == (120, 40)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"cols": 0, "rows": 40}, "cols"),
        ({"cols": 1001, "rows": 40}, "cols"),
        ({"cols": 120, "rows": 0}, "rows"),
        ({"cols": 120, "rows": 5000}, "rows"),
        ({"rows": 40}, "cols"),
        ({"cols": 120}, "rows"),
        ({"cols": "120", "rows": 40}, "cols"),
        ({"cols": 120, "rows": 40.5}, "rows"),
    ],
)
def test_resize_invalid_size(memory: MemoryDaemon, body: dict[str, Any], field: str) -> None:
    record, process = memory.launch()
    response = memory.post(f"/api/v1/sessions/{record['id']}/resize", body)
    error = checkError(response, 400, "invalid_request")
    assert error["details"]["field"] == field
    assert windowSize(process.transport.fileno()) == (80, 24)


def test_resize_not_live(memory: MemoryDaemon) -> None:
    sessionId = finishedSession(memory)
    response = memory.post(f"/api/v1/sessions/{sessionId}/resize", {"cols": 120, "rows": 40})
    error = checkError(response, 409, "session_not_live")
    assert error["details"] == {"sessionId": sessionId, "status": "completed"}


def test_resize_unknown_session(memory: MemoryDaemon) -> None:
    unknown = str(uuid.uuid4())
    response = memory.post(f"/api/v1/sessions/{unknown}/resize", {"cols": 120, "rows": 40})
    checkError(response, 404, "session_not_found")


# Archive, summon, delete


def test_archive_hides_session(memory: MemoryDaemon, prefix: str) -> None:
    sessionId = finishedSession(memory)
    response = memory.post(f"{prefix}/sessions/{sessionId}/archive")
    assert response.status == 200
    assert response.body["id"] == sessionId
    assert response.body["archived_at"].endswith("Z")
    assert response.body["status"] == "completed"

    assert memory.get("/api/v1/sessions").body == []
    archived = memory.get("/api/v1/sessions", archived="true").body
    assert [record["id"] for record in archived] == [sessionId]
    assert archived[0]["archived_at"] == response.body["archived_at"]


def test_archive_twice_keeps_time(memory: MemoryDaemon) -> None:
    sessionId = finishedSession(memory)
    first = memory.post(f"/api/v1/sessions/{sessionId}/archive").body
    second = memory.post(f"/api/v1/sessions/{sessionId}/archive")
    assert second.status == 200
    assert second.body["archived_at"] == first["archived_at"]


def test_archive_running_not_live(memory: MemoryDaemon) -> None:
    record, _ = memory.launch()
    error = checkError(memory.post(f"/api/v1/sessions/{record['id']}/archive"), 409, "session_not_live")
    assert error["details"] == {"sessionId": record["id"], "status": "running"}


def test_archive_unknown_session(memory: MemoryDaemon) -> None:
    unknown = str(uuid.uuid4())
    error = checkError(memory.post(f"/api/v1/sessions/{unknown}/archive"), 404, "session_not_found")
    assert error["details"] == {"sessionId": unknown}


def test_summon_restores_session(memory: MemoryDaemon, prefix: str) -> None:
    sessionId = finishedSession(memory)
    memory.post(f"/api/v1/sessions/{sessionId}/archive")
    response = memory.post(f"{prefix}/sessions/{sessionId}/summon")
    assert response.status == 200
    assert response.body["archived_at"] is None
    assert [record["id"] for record in memory.get("/api/v1/sessions").body] == [sessionId]
    assert memory.get("/api/v1/sessions", archived="true").body == []


def test_summon_running_not_live(memory: MemoryDaemon) -> None:
    record, _ = memory.launch()
    checkError(memory.post(f"/api/v1/sessions/{record['id']}/summon"), 409, "session_not_live")


def test_summon_unknown_session(memory: MemoryDaemon) -> None:
    checkError(memory.post(f"/api/v1/sessions/{uuid.uuid4()}/summon"), 404, "session_not_found")


def test_delete_removes_events(memory: MemoryDaemon, prefix: str) -> None:
    record, process = memory.launch()
    process.protocol.outReceived(b"output\n")
    process.end(exitReason(0))
    countEvents = "SELECT COUNT(*) FROM events WHERE session_id = ?"
    memory.clock.advance(0)
    assert memory.database.count(countEvents, record["id"]) == 2

    response = memory.request("DELETE", f"{prefix}/sessions/{record['id']}")
    assert response.status == 200
    assert response.body == {"ok": True, "deleted": True, "sessionId": record["id"]}
    assert memory.database.count(countEvents, record["id"]) == 0
    checkError(memory.get(f"/api/v1/sessions/{record['id']}"), 404, "session_not_found")
    checkError(memory.get("/api/v1/events", sessionId=record["id"]), 404, "session_not_found")


def test_delete_running_not_live(memory: MemoryDaemon) -> None:
    record, _ = memory.launch()
    response = memory.request("DELETE", f"/api/v1/sessions/{record['id']}")
    error = checkError(response, 409, "session_not_live")
    assert error["details"]["status"] == "running"
    assert memory.get(f"/api/v1/sessions/{record['id']}").status == 200


def test_delete_archived_session(memory: MemoryDaemon) -> None:
    sessionId = finishedSession(memory)
    memory.post(f"/api/v1/sessions/{sessionId}/archive")
    response = memory.request("DELETE", f"/api/v1/sessions/{sessionId}")
    assert response.status == 200
    assert memory.get("/api/v1/sessions", archived="true").body == []


def test_delete_unknown_session(memory: MemoryDaemon) -> None:
    response = memory.request("DELETE", f"/api/v1/sessions/{uuid.uuid4()}")
    checkError(response, 404, "session_not_found")


# How a session ends


@pytest.mark.parametrize(
    ("exitCode", "signalNumber", "status", "signalName"),
    [
        (0, None, "completed", None),
        (3, None, "failed", None),
        (0, signal.SIGSEGV, "failed", "SIGSEGV"),
    ],
    ids=["exit 0", "exit 3", "SIGSEGV"],
)
def test_exit_status_mapping(
    memory: MemoryDaemon, exitCode: int, signalNumber: int | None, status: str, signalName: str | None
) -> None:
    record, process = memory.launch()
    process.protocol.outReceived(b"bye\n")
    process.end(exitReason(exitCode, signalNumber))

    session = memory.get(f"/api/v1/sessions/{record['id']}").body
    expectedCode = None if signalNumber is not None else exitCode
    assert session["status"] == status
    assert session["exit_code"] == expectedCode

    events = memory.events(record["id"])
    assert kinds(events) == ["output", "exit"]
    assert payload(events[-1]) == {"exitCode": expectedCode, "signal": signalName, "status": status}


@pytest.mark.parametrize(
    ("exitCode", "signalNumber", "signalName"),
    [(None, signal.SIGTERM, "SIGTERM"), (0, None, None)],
    ids=["SIGTERM", "exit 0"],
)
def test_kill_then_exit_killed(
    memory: MemoryDaemon, exitCode: int | None, signalNumber: int | None, signalName: str | None
) -> None:
    # A harness that catches SIGTERM and exits 0 was still killed.
    record, process = memory.launch()
    memory.post(f"/api/v1/sessions/{record['id']}/kill")
    process.end(exitReason(exitCode or 0, signalNumber))

    session = memory.get(f"/api/v1/sessions/{record['id']}").body
    assert session["status"] == "killed"
    assert session["exit_code"] == exitCode
    events = memory.events(record["id"])
    assert kinds(events) == ["kill", "exit"]
    assert payload(events[-1]) == {"exitCode": exitCode, "signal": signalName, "status": "killed"}


def test_exit_event_is_last(memory: MemoryDaemon) -> None:
    record, process = memory.launch()
    process.end(exitReason(0))
    process.protocol.outReceived(b"too late\n")
    events = memory.events(record["id"])
    assert kinds(events) == ["exit"]


def test_exit_drains_pty(memory: MemoryDaemon) -> None:
    # The harness exited but the PTY stays open, as when a background child
    # keeps it open. Output read during the drain precedes the exit event.
    record, process = memory.launch()
    process.protocol.outReceived(b"one ")
    process.protocol.processExited(exitReason(0))
    process.protocol.outReceived(b"two\n")
    memory.clock.advance(0)
    assert memory.get(f"/api/v1/sessions/{record['id']}").body["status"] == "running"
    assert "exit" not in kinds(memory.events(record["id"]))

    memory.clock.advance(DRAIN_TIMEOUT)
    events = memory.events(record["id"])
    assert kinds(events)[-1] == "exit"
    assert outputText(events) == "one two\n"
    assert memory.get(f"/api/v1/sessions/{record['id']}").body["status"] == "completed"
    assert process.transport.lostConnection is True


def test_draining_rejects_input(memory: MemoryDaemon) -> None:
    record, process = memory.launch()
    process.protocol.processExited(exitReason(0))
    response = memory.post(f"/api/v1/sessions/{record['id']}/input", {"data": "more\n"})
    checkError(response, 409, "session_not_live")


def test_exit_closes_pty(memory: MemoryDaemon) -> None:
    _, process = memory.launch()
    process.end(exitReason(0))
    memory.clock.advance(0)
    assert process.transport.lostConnection is True
    assert process.transport.master is None


def test_exit_ends_process_group(memory: MemoryDaemon) -> None:
    # Whatever is left of the harness's process group gets SIGTERM, then SIGKILL.
    memory.signals.reached = True
    record, process = memory.launch()
    process.end(exitReason(0))
    # The search for leftovers waits a turn, for the exit's commit to start.
    assert memory.signals.calls == []
    memory.clock.advance(0)
    term = (process.transport.pid, record["id"], signal.SIGTERM)
    assert memory.signals.calls == [term]

    memory.clock.advance(memory.sessions.killGrace)
    assert memory.signals.calls == [term, (process.transport.pid, record["id"], signal.SIGKILL)]


def test_exit_empty_group_no_sigkill(memory: MemoryDaemon) -> None:
    record, process = memory.launch()
    process.end(exitReason(0))
    memory.clock.advance(memory.sessions.killGrace)
    assert memory.signals.calls == [(process.transport.pid, record["id"], signal.SIGTERM)]


def test_exit_during_spawn_recorded(memory: MemoryDaemon) -> None:
    memory.clock.exitDuringSpawn = Failure(ProcessDone(0))

    record, process = memory.launch()
    events = memory.events(record["id"])

    assert record["status"] == "running"
    assert [event["kind"] for event in events] == ["exit"]
    assert payload(events[-1])["status"] == "completed"
    assert memory.get(f"/api/v1/sessions/{record['id']}").body["status"] == "completed"
    assert memory.sessions.liveSession(record["id"]) is None


def test_output_waits_for_more(memory: MemoryDaemon) -> None:
    memory.store.outputFlushDelay = 0.003
    record, process = memory.launch()

    process.protocol.outReceived(b"first\n")
    memory.clock.advance(0)
    process.protocol.outReceived(b"second\n")
    memory.clock.advance(0.003)
    memory.store.outputFlushDelay = 0

    events = memory.events(record["id"])
    assert [payload(event)["data"] for event in events] == ["first\nsecond\n"]


def test_session_change_skips_output_wait(memory: MemoryDaemon) -> None:
    memory.store.outputFlushDelay = 10.0
    record, process = memory.launch()
    process.protocol.outReceived(b"printed\n")

    response = memory.post(f"/api/v1/sessions/{record['id']}/kill")

    # The kill's writes are not held back by the output delay, and the output
    # queued before them goes first.
    assert response.status == 202
    kinds = [event["kind"] for event in memory.events(record["id"])]
    assert kinds == ["output", "kill"]


def test_resize_whole_float_accepted(memory: MemoryDaemon) -> None:
    # JSON has one number type: 40.0 is the integer 40, as JSON Schema has it.
    record, process = memory.launch()

    response = memory.post(f"/api/v1/sessions/{record['id']}/resize", {"cols": 120.0, "rows": 40.0})

    assert response.status == 202
    assert windowSize(process.transport.fileno()) == (120, 40)


def test_checkpoint_waits_for_writes_to_pause(memory: MemoryDaemon) -> None:
    record, process = memory.launch()
    line = b"x" * 1023 + b"\n"

    process.protocol.outReceived(line * 512)
    memory.clock.advance(0)
    memory.clock.advance(CHECKPOINT_DELAY)
    afterHalfMiB = memory.store.checkpoints
    process.protocol.outReceived(line * 1024)
    memory.clock.advance(0)
    memory.clock.advance(CHECKPOINT_DELAY * 0.8)
    process.protocol.outReceived(line)
    memory.clock.advance(0)
    memory.clock.advance(CHECKPOINT_DELAY * 0.8)
    # The last commit put the checkpoint off again.
    whileWriting = memory.store.checkpoints
    memory.clock.advance(CHECKPOINT_DELAY * 0.2)

    assert afterHalfMiB == 0
    assert whileWriting == 0
    assert memory.store.checkpoints == 1


def test_checkpoint_put_off_for_at_most_max_delay(memory: MemoryDaemon) -> None:
    record, process = memory.launch()
    line = b"x" * 1023 + b"\n"
    process.protocol.outReceived(line * 2048)
    memory.clock.advance(0)
    started = memory.clock.seconds()

    # A line every half delay never lets the writes pause for a whole delay.
    while memory.store.checkpoints == 0 and memory.clock.seconds() - started < 3 * CHECKPOINT_MAX_DELAY:
        process.protocol.outReceived(line)
        memory.clock.advance(0)
        memory.clock.advance(CHECKPOINT_DELAY / 2)

    assert memory.store.checkpoints == 1
    assert CHECKPOINT_MAX_DELAY <= memory.clock.seconds() - started <= CHECKPOINT_MAX_DELAY + CHECKPOINT_DELAY


def test_idle_after_load_called_once(memory: MemoryDaemon) -> None:
    calls: list[None] = []
    memory.store.onIdleAfterLoad = lambda: calls.append(None)
    record, process = memory.launch()
    line = b"x" * 1023 + b"\n"

    process.protocol.outReceived(line * 1024)
    memory.clock.advance(0)
    memory.clock.advance(IDLE_AFTER_LOAD_DELAY)
    quietAfterSmallOutput = len(calls)
    for _ in range(8):
        process.protocol.outReceived(line * 1024)
        memory.clock.advance(0)
    memory.clock.advance(IDLE_AFTER_LOAD_DELAY / 2)
    stillBusy = len(calls)
    memory.clock.advance(IDLE_AFTER_LOAD_DELAY)

    # 1 MiB is below the threshold; 9 MiB in all is above it.
    assert quietAfterSmallOutput == 0
    assert stillBusy == 0
    assert len(calls) == 1
