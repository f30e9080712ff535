"""The treq client against a real daemon on its socket, and against stand-in servers."""

from __future__ import annotations

import json
import os
import socket
import sys
from typing import Any, AsyncIterator

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.error import ConnectError, ConnectionDone, ConnectionLost
from twisted.python.failure import Failure
from twisted.web._newclient import ResponseFailed
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from coven.client import (
    Accepted,
    CovenAPIError,
    CovenClient,
    DaemonNotRunning,
    DaemonUnreachable,
    Deleted,
    Health,
    IncompatibleDaemon,
    eventPayload,
    outputBytes,
)
from coven.records import Event, EventPage, SessionRecord

from .support import TESTS

CLI_HARNESS = os.path.join(TESTS, "cli_harness.py")


def addHarness(home: str, harnessId: str, command: list[str]) -> None:
    """
    Append a harness to the daemon's harnesses.toml, which it reads again at
    the next launch.
    """
    with open(os.path.join(home, "harnesses.toml"), "a") as file:
        file.write(f"\n[harnesses.{harnessId}]\ncommand = {json.dumps(command)}\n")


async def collect(events: AsyncIterator[Event], timeout: float = 15.0) -> list[Event]:
    async def drain() -> list[Event]:
        return [event async for event in events]

    return await defer.Deferred.fromCoroutine(drain()).addTimeout(timeout, reactor)


async def readUntil(events: AsyncIterator[Event], text: bytes, timeout: float = 15.0) -> bytes:
    """
    Read events until the output so far contains C{text}; return that output.
    """

    async def read() -> bytes:
        output = b""
        async for event in events:
            output += outputBytes(event)
            if text in output:
                return output
        raise AssertionError(f"events ended before {text!r}; output was {output!r}")

    return await defer.Deferred.fromCoroutine(read()).addTimeout(timeout, reactor)


@pytest.fixture
def client(daemon: Any) -> CovenClient:
    return CovenClient(daemon.home)


# Handshake and connection failures


@pytest_twisted.ensureDeferred
async def test_health_handshake(daemon, client):
    health = await client.handshake()
    assert isinstance(health, Health)
    assert health.ok is True
    assert health.apiVersion == "coven.daemon.v1"
    assert health.capabilities["eventCursor"] == "sequence"
    assert health.daemon is not None
    assert health.daemon.pid == os.getpid()
    assert health.daemon.socket == os.path.join(daemon.home, "coven.sock")


@pytest_twisted.ensureDeferred
async def test_home_from_environment(daemon, monkeypatch):
    monkeypatch.setenv("COVEN_HOME", daemon.home)
    client = CovenClient()
    assert client.socketPath == os.path.join(daemon.home, "coven.sock")
    assert (await client.handshake()).apiVersion == "coven.daemon.v1"


def test_home_defaults_to_dot_coven(monkeypatch):
    monkeypatch.delenv("COVEN_HOME", raising=False)
    monkeypatch.setenv("HOME", "/tmp/someone")
    assert CovenClient().socketPath == "/tmp/someone/.coven/coven.sock"


@pytest_twisted.ensureDeferred
async def test_missing_socket_not_running(home):
    client = CovenClient(os.path.join(home, "empty"))
    with pytest.raises(DaemonNotRunning) as raised:
        await client.listSessions()
    socketPath = os.path.join(home, "empty", "coven.sock")
    assert str(raised.value) == (
        f"Coven daemon is not running at {socketPath}; start it with `coven daemon start`"
    )


@pytest_twisted.ensureDeferred
async def test_stale_socket_not_running(home):
    # A socket file left by a daemon that died refuses connections.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(os.path.join(home, "coven.sock"))
    stale.close()
    with pytest.raises(DaemonNotRunning):
        await CovenClient(home).health()


class StandInDaemon(Resource):
    """
    A server that returns a chosen contract version from the health route,
    and misbehaves on purpose on a few paths.
    """

    isLeaf = True

    def __init__(self, apiVersion: str) -> None:
        super().__init__()
        self.apiVersion = apiVersion
        self.paths: list[bytes] = []

    def render(self, request: Any) -> Any:
        self.paths.append(request.path)
        request.setHeader(b"Content-Type", b"application/json")
        if request.path == b"/api/v1/health":
            return json.dumps({"ok": True, "apiVersion": self.apiVersion, "daemon": None}).encode()
        if request.path == b"/api/v1/sessions":
            request.setResponseCode(502)
            request.setHeader(b"Content-Type", b"text/html")
            return b"<html>bad gateway</html>"
        if request.path == b"/api/v1/sessions/teapot":
            request.setResponseCode(418)
            return b'{"message": "not an envelope"}'
        # Requests to any other path get no response.
        return NOT_DONE_YET


async def serveStandIn(home: str, apiVersion: str) -> tuple[StandInDaemon, Any]:
    resource = StandInDaemon(apiVersion)
    port = await UNIXServerEndpoint(reactor, os.path.join(home, "coven.sock")).listen(Site(resource))
    return resource, port


@pytest_twisted.ensureDeferred
async def test_other_api_version_rejected(home):
    standIn, port = await serveStandIn(home, "coven.daemon.v2")
    try:
        client = CovenClient(home)
        with pytest.raises(IncompatibleDaemon, match="'coven.daemon.v2'.*'coven.daemon.v1'"):
            await client.listSessions()
        with pytest.raises(IncompatibleDaemon):
            await client.getSession("abc")
    finally:
        await port.stopListening()
    # Nothing but the handshake reached the daemon.
    assert standIn.paths == [b"/api/v1/health", b"/api/v1/health"]


@pytest_twisted.ensureDeferred
async def test_responses_without_envelope(home):
    _, port = await serveStandIn(home, "coven.daemon.v1")
    try:
        client = CovenClient(home)
        with pytest.raises(CovenAPIError) as raised:
            await client.listSessions()
        assert raised.value.code == "invalid_response"
        assert raised.value.status == 502
        assert raised.value.content == b"<html>bad gateway</html>"

        with pytest.raises(CovenAPIError) as raised:
            await client.getSession("teapot")
        assert raised.value.code == "invalid_response"
        assert raised.value.status == 418
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_request_timeout_and_cancel(home):
    _, port = await serveStandIn(home, "coven.daemon.v1")
    try:
        client = CovenClient(home, timeout=0.3)
        with pytest.raises(DaemonUnreachable) as raised:
            await client.capabilities()
        assert str(raised.value) == (
            f"Request GET /api/v1/capabilities to the Coven daemon at {home}/coven.sock timed out"
            " without a response after 0.3 s. The daemon is busy, stopped (SIGSTOP) or hung. If"
            f" `coven daemon start` started it, {home}/coven.log may say why."
        )

        # A caller's own cancellation stays a cancellation.
        patient = CovenClient(home, timeout=30)
        await patient.handshake()
        pending = defer.Deferred.fromCoroutine(patient.capabilities())
        reactor.callLater(0.1, pending.cancel)
        with pytest.raises(defer.CancelledError):
            await pending
    finally:
        await port.stopListening()


# Routes


@pytest_twisted.ensureDeferred
async def test_meta_routes(daemon, client):
    version = await client.apiVersion()
    assert version.apiVersion == "v1"
    assert version.supportedApiVersions == ("v1",)

    capabilities = await client.capabilities()
    fake = [entry for entry in capabilities.capabilities if entry.harness == "fake"]
    assert len(fake) == 1
    assert fake[0].executable == sys.executable
    assert capabilities.harnessConfigError is None

    result = await client.action("coven.capabilities.refresh")
    assert result.status == "completed"
    assert result.event.kind == "capabilities.refreshed"
    assert result.event.origin == "coven-client"
    assert result.event.payload["capabilities"] == len(capabilities.capabilities)


@pytest_twisted.ensureDeferred
async def test_launch_and_follow_to_exit(daemon, client):
    session = await client.launch(daemon.project, "fake", "print hello client", title="greeting")
    assert isinstance(session, SessionRecord)
    assert session.status == "running"
    assert session.title == "greeting"
    assert session.project_root == os.path.realpath(daemon.project)

    events = await collect(client.followEvents(session.id))
    assert [event.kind for event in events][-1] == "exit"
    assert b"".join(outputBytes(event) for event in events) == b"hello client\r\n"
    assert eventPayload(events[-1]) == {"exitCode": 0, "signal": None, "status": "completed"}

    record = await client.getSession(session.id)
    assert record.status == "completed"
    assert record.exit_code == 0
    assert [listed.id for listed in await client.listSessions()] == [session.id]


@pytest_twisted.ensureDeferred
async def test_event_pages(daemon, client):
    session = await client.launch(daemon.project, "fake", "print paged")
    everything = await collect(client.followEvents(session.id))
    assert len(everything) >= 2

    first = await client.events(session.id, limit=1)
    assert isinstance(first, EventPage)
    assert first.events == tuple(everything[:1])
    assert first.hasMore is True

    rest = await client.events(session.id, afterSeq=first.events[0].seq)
    assert rest.events == tuple(everything[1:])
    assert rest.hasMore is False

    byId = await client.events(session.id, afterEventId=first.events[0].id)
    assert byId.events == rest.events

    # Following from a cursor skips what came before it.
    assert await collect(client.followEvents(session.id, afterSeq=everything[0].seq)) == everything[1:]


@pytest_twisted.ensureDeferred
async def test_follow_live_input_and_kill(daemon, client):
    session = await client.launch(daemon.project, "fake", "echo")
    events = client.followEvents(session.id, waitMs=5000)
    await readUntil(events, b"ready")

    assert await client.sendInput(session.id, "first line\n") == Accepted(ok=True, accepted=True)
    await readUntil(events, b"got: first line")

    assert await client.kill(session.id) == Accepted(ok=True, accepted=True)
    rest = await collect(events)
    assert rest[-1].kind == "exit"
    assert eventPayload(rest[-1])["status"] == "killed"
    assert (await client.getSession(session.id)).status == "killed"


@pytest_twisted.ensureDeferred
async def test_resize_reaches_harness(daemon, client):
    addHarness(daemon.home, "sized", [sys.executable, CLI_HARNESS])
    session = await client.launch(daemon.project, "sized", "resize me", cols=90, rows=20)
    events = client.followEvents(session.id, waitMs=5000)
    await readUntil(events, b"size 20 90")

    await client.resize(session.id, cols=132, rows=43)
    await readUntil(events, b"winch 43 132")
    await client.kill(session.id)
    await collect(events)


@pytest_twisted.ensureDeferred
async def test_archive_summon_delete(daemon, client):
    session = await client.launch(daemon.project, "fake", "print lifecycle")
    await collect(client.followEvents(session.id))

    archived = await client.archive(session.id)
    assert archived.archived_at is not None
    assert await client.listSessions() == []
    assert [listed.id for listed in await client.listSessions(archived=True)] == [session.id]

    summoned = await client.summon(session.id)
    assert summoned.archived_at is None
    assert [listed.id for listed in await client.listSessions()] == [session.id]

    assert await client.delete(session.id) == Deleted(ok=True, deleted=True, sessionId=session.id)
    with pytest.raises(CovenAPIError) as raised:
        await client.getSession(session.id)
    assert raised.value.code == "session_not_found"


@pytest_twisted.ensureDeferred
async def test_last_reply_is_exact_body(daemon, client):
    session = await client.launch(daemon.project, "fake", "print exact")
    await client.getSession(session.id)
    assert client.lastReply is not None
    assert client.lastReply.status == 200
    assert json.loads(client.lastReply.content) == client.lastReply.body
    assert client.lastReply.body["id"] == session.id
    await collect(client.followEvents(session.id))


# Every error code a client can provoke. internal_error and runtime_unavailable
# are left out: the first needs a daemon bug, and the daemon returns the second
# only for launches while it stops, after it has closed its socket.


async def apiError(call: Any) -> CovenAPIError:
    with pytest.raises(CovenAPIError) as raised:
        await call
    return raised.value


@pytest_twisted.ensureDeferred
async def test_not_found_route(daemon, client):
    error = await apiError(client.request("GET", "/api/v1/nowhere"))
    assert error.code == "not_found"
    assert error.status == 404
    assert error.details == {"method": "GET", "path": "/api/v1/nowhere"}
    assert json.loads(error.content)["error"]["code"] == "not_found"


@pytest_twisted.ensureDeferred
async def test_invalid_request_errors(daemon, client):
    unknownHarness = await apiError(client.launch(daemon.project, "nonesuch", "hi"))
    assert unknownHarness.code == "invalid_request"
    assert unknownHarness.status == 400
    assert unknownHarness.details["field"] == "harness"
    assert "fake" in unknownHarness.details["harnesses"]

    badLimit = await apiError(client.events("anything", limit=0))
    assert badLimit.code == "invalid_request"
    assert badLimit.details["field"] == "limit"

    badSize = await apiError(client.launch(daemon.project, "fake", "hi", cols=0, rows=24))
    assert badSize.code == "invalid_request"
    assert badSize.details["field"] == "cols"

    otherVersion = await apiError(client.request("GET", "/api/v2/health"))
    assert otherVersion.code == "invalid_request"
    assert otherVersion.status == 404
    assert otherVersion.details["supportedApiVersions"] == ["v1"]

    unknownAction = await apiError(client.action("coven.nothing"))
    assert unknownAction.code == "invalid_request"
    assert unknownAction.status == 400


@pytest_twisted.ensureDeferred
async def test_session_not_found_errors(daemon, client):
    for call in (
        client.getSession("missing"),
        client.events("missing"),
        client.sendInput("missing", "x"),
        client.kill("missing"),
        client.resize("missing", 80, 24),
        client.archive("missing"),
        client.summon("missing"),
        client.delete("missing"),
    ):
        error = await apiError(call)
        assert error.code == "session_not_found"
        assert error.status == 404
        assert error.details == {"sessionId": "missing"}


@pytest_twisted.ensureDeferred
async def test_session_not_live_errors(daemon, client):
    finished = await client.launch(daemon.project, "fake", "print done")
    await collect(client.followEvents(finished.id))
    for call in (
        client.sendInput(finished.id, "x"),
        client.kill(finished.id),
        client.resize(finished.id, 80, 24),
    ):
        error = await apiError(call)
        assert error.code == "session_not_live"
        assert error.status == 409
        assert error.details["sessionId"] == finished.id

    running = await client.launch(daemon.project, "fake", "sleep")
    for call in (client.archive(running.id), client.delete(running.id)):
        error = await apiError(call)
        assert error.code == "session_not_live"
        assert error.status == 409
        assert error.details["status"] == "running"
    await client.kill(running.id)
    await collect(client.followEvents(running.id))


@pytest_twisted.ensureDeferred
async def test_project_root_violation(daemon, client):
    error = await apiError(client.launch(daemon.project, "fake", "hi", cwd="/tmp"))
    assert error.code == "project_root_violation"
    assert error.status == 400


@pytest_twisted.ensureDeferred
async def test_pty_spawn_failed(daemon, client):
    addHarness(daemon.home, "missing", [os.path.join(daemon.home, "no-such-executable")])
    error = await apiError(client.launch(daemon.project, "missing", "hi"))
    assert error.code == "pty_spawn_failed"
    assert error.status == 500
    assert error.details["harness"] == "missing"

    # The failed session is recorded, and following it ends with its exit event.
    events = await collect(client.followEvents(error.details["sessionId"]))
    assert [event.kind for event in events] == ["exit"]
    assert eventPayload(events[0])["status"] == "failed"



def test_transport_error_messages_end_once():
    client = CovenClient("/tmp/coven-test-messages", reactor)
    lost = client._transportError(ResponseFailed([Failure(ConnectionDone())]))
    reset = client._transportError(ResponseFailed([Failure(ConnectionLost())]))
    connectFailure = client._transportError(ConnectError(string="User timeout caused connection failure."))

    assert str(lost) == (
        "The Coven daemon at /tmp/coven-test-messages/coven.sock closed the connection before its"
        " response was complete; `coven daemon status` shows whether it still runs."
    )
    assert str(reset) == (
        "The Coven daemon at /tmp/coven-test-messages/coven.sock closed the connection before its"
        " response was complete (Connection to the other side was lost in a non-clean fashion);"
        " `coven daemon status` shows whether it still runs."
    )
    assert str(connectFailure).endswith(": An error occurred while connecting: User timeout caused connection failure.")
    assert not str(connectFailure).endswith("..")
