# -*- test-case-name: tests.test_client -*-
"""A treq client for the coven.daemon.v1 API on the daemon's Unix socket."""

from __future__ import annotations

import base64
import errno
import json
import os
from typing import Any, AsyncIterator
from urllib.parse import quote

import attrs
import treq
from twisted.internet import defer
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.error import ConnectError, ConnectingCancelledError, ConnectionDone
from twisted.web.client import Agent, ResponseFailed, ResponseNeverReceived
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from coven.records import Event, EventPage, SessionRecord
from coven.home import daemonSocketPath, defaultHome, homeProblem, socketPathProblem

CONTRACT_VERSION = "coven.daemon.v1"
API_PREFIX = "/api/v1"
# Seconds a request may take, on top of a long poll's own wait.
DEFAULT_TIMEOUT = 30.0
# How long one long poll of followEvents waits for new events, in milliseconds.
FOLLOW_WAIT_MS = 25_000
# Kinds after which a session writes no more events: a harness that ended, or
# a session that an earlier daemon left running.
FINAL_EVENT_KINDS = frozenset({"exit", "orphaned"})


class CovenClientError(Exception):
    """
    Base of every error this client raises.
    """


class CovenAPIError(CovenClientError):
    """
    The daemon returned an error envelope, or a response this client cannot read.

    @ivar code: the envelope's C{error.code}, such as C{session_not_found};
        C{invalid_response} when the response was not a valid envelope.
    @ivar message: the envelope's sentence for people.
    @ivar details: the envelope's C{error.details}, or an empty dict.
    @ivar status: the HTTP status code.
    @ivar content: the response body exactly as the daemon sent it.
    """

    def __init__(
        self, code: str, message: str, details: dict[str, Any], status: int, content: bytes = b""
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details
        self.status = status
        self.content = content

    def __repr__(self) -> str:
        return f"CovenAPIError({self.code!r}, {self.message!r}, {self.details!r}, {self.status})"


class DaemonNotRunning(CovenClientError):
    """
    Nothing listens on the daemon's socket: the file is missing or refuses connections.
    """

    def __init__(self, socketPath: str, advice: str = "start it with `coven daemon start`") -> None:
        """
        @param advice: what the user can do, after the socket path.
        """
        super().__init__(f"Coven daemon is not running at {socketPath}; {advice}")
        self.socketPath = socketPath


class DaemonUnreachable(CovenClientError):
    """
    The socket exists but the daemon could not be reached: permission denied,
    the connection was lost, or the request timed out.
    """


class IncompatibleDaemon(CovenClientError):
    """
    The daemon's health handshake names an API contract other than coven.daemon.v1.
    """


# Records of the responses that coven.records does not already define.


@attrs.frozen
class DaemonInfo:
    """
    The C{daemon} object of the health response.

    @ivar pid: the daemon's process id.
    @ivar startedAt: RFC 3339 UTC time the daemon started listening.
    @ivar socket: the socket path, or the endpoint string it listens on.
    """

    pid: int
    startedAt: str
    socket: str


@attrs.frozen
class Health:
    """
    The response of C{GET /api/v1/health}, the compatibility handshake.

    @ivar ok: whether the daemon reports itself healthy.
    @ivar apiVersion: the named contract, C{coven.daemon.v1}.
    @ivar covenVersion: the daemon's package version, for diagnostics only.
    @ivar capabilities: feature flags such as C{sessions} and C{eventCursor}.
    @ivar daemon: process metadata, or C{None} when the daemon has none.
    """

    ok: bool
    apiVersion: str
    covenVersion: str
    capabilities: dict[str, Any]
    daemon: DaemonInfo | None


@attrs.frozen
class APIVersion:
    """
    The response of C{GET /api/v1/api-version}: route prefix versions.
    """

    apiVersion: str
    supportedApiVersions: tuple[str, ...]


@attrs.frozen
class Capability:
    """
    One entry of C{GET /api/v1/capabilities}.

    @ivar harness: the harness id for harness entries, else C{None}.
    @ivar executable: the harness executable the daemon found on its C{PATH},
        or C{None} when it found none or the entry is not a harness.
    @ivar reason: why a harness is unavailable, such as no executable found, else C{None}.
    """

    id: str
    label: str
    adapter: str
    status: str
    policy: str
    actions: tuple[str, ...]
    harness: str | None = None
    executable: str | None = None
    reason: str | None = None


@attrs.frozen
class Capabilities:
    """
    The response of C{GET /api/v1/capabilities}.

    @ivar harnessConfigError: why the daemon ignored C{harnesses.toml}, or C{None}.
    """

    capabilities: tuple[Capability, ...]
    harnessConfigError: str | None


@attrs.frozen
class ActionEvent:
    """
    The event-shaped payload of a completed control-plane action.
    """

    kind: str
    action: str
    origin: str | None
    payload: dict[str, Any]


@attrs.frozen
class ActionResult:
    """
    The response of C{POST /api/v1/actions}.
    """

    ok: bool
    accepted: bool
    action: str
    status: str
    event: ActionEvent


@attrs.frozen
class Accepted:
    """
    The 202 response of input, kill and resize.
    """

    ok: bool
    accepted: bool


@attrs.frozen
class Deleted:
    """
    The response of C{DELETE /api/v1/sessions/:id}.
    """

    ok: bool
    deleted: bool
    sessionId: str


@attrs.frozen
class Reply:
    """
    One successful HTTP exchange with the daemon.

    @ivar status: the HTTP status code.
    @ivar content: the response body exactly as the daemon sent it.
    @ivar body: C{content} decoded from JSON.
    """

    status: int
    content: bytes
    body: Any


def sessionPath(sessionId: str, action: str | None = None) -> str:
    """
    Return the API path of a session, or of one of its actions such as C{kill}.
    """
    path = f"{API_PREFIX}/sessions/{quote(sessionId, safe='')}"
    return f"{path}/{action}" if action else path


def eventPayload(event: Event) -> dict[str, Any]:
    """
    Decode an event's C{payload_json}.
    """
    payload = json.loads(event.payload_json)
    return payload if isinstance(payload, dict) else {}


def outputBytes(event: Event) -> bytes:
    """
    Return the exact bytes of an C{output} event, or C{b""} for other kinds.

    The payload's C{raw} field, when present, is the base64 of bytes that were
    not valid UTF-8, and C{data} then contains a lossy copy.
    """
    if event.kind != "output":
        return b""
    payload = eventPayload(event)
    if "raw" in payload:
        return base64.b64decode(payload["raw"])
    return str(payload.get("data", "")).encode("utf-8")


@implementer(IAgentEndpointFactory)
class _SocketEndpoints:
    """
    Connects every request, whatever its URL's host, to one Unix socket.
    """

    def __init__(self, reactor: Any, socketPath: str) -> None:
        self._reactor = reactor
        self._socketPath = socketPath

    def endpointForURI(self, uri: Any) -> UNIXClientEndpoint:
        return UNIXClientEndpoint(self._reactor, self._socketPath)


def _invalidResponse(status: int, message: str, content: bytes = b"") -> CovenAPIError:
    return CovenAPIError("invalid_response", message, {}, status, content)


def _record(cls: type, body: Any, status: int, **defaults: Any) -> Any:
    """
    Build an attrs record from a JSON object, ignoring fields the record lacks
    so that additive fields of a newer daemon do no harm.
    """
    if not isinstance(body, dict):
        raise _invalidResponse(
            status, f"Expected a JSON object for {cls.__name__}, got {type(body).__name__}."
        )
    values = dict(defaults)
    for field in attrs.fields(cls):
        if field.name in body:
            values[field.name] = body[field.name]
    try:
        return cls(**values)
    except TypeError as error:
        raise _invalidResponse(status, f"The daemon's {cls.__name__} is incomplete: {error}.") from None


def _sessionRecord(body: Any, status: int) -> SessionRecord:
    # cwd is an additive field. A daemon without it runs sessions in the project root.
    projectRoot = body.get("project_root") if isinstance(body, dict) else None
    return _record(SessionRecord, body, status, cwd=projectRoot)


def _eventPage(body: Any, status: int) -> EventPage:
    if not isinstance(body, dict) or not isinstance(body.get("events"), list):
        raise _invalidResponse(status, "Expected an event page with an events list.")
    events = tuple(_record(Event, event, status) for event in body["events"])
    return EventPage(events=events, hasMore=bool(body.get("hasMore")))


def _health(body: Any, status: int) -> Health:
    daemon = body.get("daemon") if isinstance(body, dict) else None
    info = _record(DaemonInfo, daemon, status) if daemon is not None else None
    health = _record(Health, body, status, covenVersion="", capabilities={}, daemon=None)
    return attrs.evolve(health, daemon=info)


def _isCancellation(error: Exception) -> bool:
    if isinstance(error, (defer.CancelledError, ConnectingCancelledError)):
        return True
    reasons = getattr(error, "reasons", None) or []
    return any(reason.check(defer.CancelledError) for reason in reasons)


class CovenClient:
    """
    A client of one Coven daemon, reached at C{<home>/coven.sock}.

    Every request but the health check itself waits for the health handshake,
    which runs once and rejects a daemon that does not speak coven.daemon.v1.
    Each request uses a new connection, so a client may issue requests
    concurrently, for example input while a long poll is waiting.

    @ivar lastReply: the most recent successful reply, so that a caller can
        show the daemon's response exactly as sent. With concurrent requests it
        is whichever finished last.
    @ivar startCommand: the command that starts this daemon, which
        L{DaemonNotRunning} advises.
    """

    def __init__(
        self,
        home: str | None = None,
        reactor: Any = None,
        timeout: float = DEFAULT_TIMEOUT,
        startCommand: str = "coven daemon start",
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as globalReactor

            reactor = globalReactor
        self.home = os.path.abspath(os.path.expanduser(home or defaultHome()))
        self.socketPath = daemonSocketPath(self.home)
        self.timeout = timeout
        self.startCommand = startCommand
        self._reactor = reactor
        self._http = treq.client.HTTPClient(
            Agent.usingEndpointFactory(reactor, _SocketEndpoints(reactor, self.socketPath))
        )
        self._health: Health | None = None
        self.lastReply: Reply | None = None

    # Transport

    async def request(
        self,
        method: str,
        path: str,
        query: dict[str, Any] | None = None,
        body: Any = None,
        timeout: float | None = None,
        handshake: bool = True,
    ) -> Reply:
        """
        Send one request and decode its JSON response.

        @param path: the path under the socket's HTTP root, such as
            C{/api/v1/sessions}.
        @param query: query parameters; C{None} values are left out.
        @param body: a JSON-serializable request body, or C{None} for none.
        @param timeout: seconds before the request is abandoned, by default
            L{timeout}.
        @param handshake: whether to run the health handshake first.
        @raise CovenAPIError: the daemon returned an error envelope.
        @raise DaemonNotRunning: nothing listens on the socket.
        @raise DaemonUnreachable: the connection failed otherwise or timed out.
        @raise IncompatibleDaemon: the handshake found another API contract.
        """
        problem = homeProblem(self.home) or socketPathProblem(self.socketPath)
        if problem is not None:
            raise DaemonUnreachable(problem)
        if handshake:
            await self.handshake()

        params = {name: str(value) for name, value in (query or {}).items() if value is not None}
        data = None if body is None else json.dumps(body).encode("utf-8")
        headers = {b"Content-Type": [b"application/json"]} if data is not None else None
        exchange = defer.Deferred.fromCoroutine(
            self._exchange(method, "http://coven" + path, params or None, data, headers)
        )

        # treq's own timeout covers only the response headers and reports
        # expiry as a cancellation, so the whole exchange is timed here and a
        # cancellation by the caller stays a CancelledError.
        timedOut = False

        def expire() -> None:
            nonlocal timedOut
            timedOut = True
            exchange.cancel()

        limit = self.timeout if timeout is None else timeout
        timer = self._reactor.callLater(limit, expire)
        try:
            status, content = await exchange
        except Exception as error:
            if _isCancellation(error):
                if timedOut:
                    raise DaemonUnreachable(
                        f"Request {method} {path} to the Coven daemon at {self.socketPath}"
                        f" timed out without a response after {limit:g} s. The daemon is busy,"
                        " stopped (SIGSTOP) or hung. If `coven daemon start` started it,"
                        f" {os.path.join(self.home, 'coven.log')} may say why."
                    ) from None
                raise defer.CancelledError() from None
            raise self._transportError(error) from None
        finally:
            if timer.active():
                timer.cancel()

        reply = self._decode(status, content)
        self.lastReply = reply
        return reply

    async def _exchange(
        self, method: str, url: str, params: Any, data: bytes | None, headers: Any
    ) -> tuple[int, bytes]:
        response = await self._http.request(method, url, params=params, data=data, headers=headers)
        return response.code, await response.content()

    def _transportError(self, error: Exception) -> Exception:
        if isinstance(error, ConnectError):
            if error.osError in (errno.ENOENT, errno.ECONNREFUSED):
                return DaemonNotRunning(self.socketPath, advice=f"start it with `{self.startCommand}`")
            reason = str(error).rstrip(".")
            return DaemonUnreachable(f"Cannot connect to the Coven daemon at {self.socketPath}: {reason}.")
        if isinstance(error, (ResponseNeverReceived, ResponseFailed)):
            # A daemon that stopped or crashed leaves a clean close, and
            # Twisted's words for it add nothing.
            reasons = [reason for reason in error.reasons if not reason.check(ConnectionDone)]
            # Twisted's messages end with a period of their own.
            detail = "; ".join(reason.getErrorMessage().rstrip(".") for reason in reasons)
            return DaemonUnreachable(
                f"The Coven daemon at {self.socketPath} closed the connection before its response"
                f" was complete{f' ({detail})' if detail else ''}; `coven daemon status` shows"
                " whether it still runs."
            )
        return error

    @staticmethod
    def _decode(status: int, content: bytes) -> Reply:
        try:
            body = json.loads(content)
        except ValueError:
            raise _invalidResponse(
                status,
                f"The daemon returned HTTP {status} without a JSON body: {content[:200]!r}.",
                content,
            ) from None

        if status < 400:
            return Reply(status, content, body)

        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict) or not isinstance(error.get("code"), str):
            raise _invalidResponse(
                status,
                f"The daemon returned HTTP {status} without an error envelope: {content[:200]!r}.",
                content,
            )
        details = error.get("details")
        raise CovenAPIError(
            error["code"],
            str(error.get("message", "")),
            details if isinstance(details, dict) else {},
            status,
            content,
        )

    # Meta

    async def health(self) -> Health:
        """
        Fetch C{GET /api/v1/health}, without the handshake check.
        """
        reply = await self.request("GET", f"{API_PREFIX}/health", handshake=False)
        return _health(reply.body, reply.status)

    async def handshake(self) -> Health:
        """
        Check once that the daemon speaks coven.daemon.v1, and return its health.

        @raise IncompatibleDaemon: it names another contract.
        """
        if self._health is not None:
            return self._health
        health = await self.health()
        if health.apiVersion != CONTRACT_VERSION:
            raise IncompatibleDaemon(
                f"The daemon at {self.socketPath} speaks API {health.apiVersion!r}, but this"
                f" client needs {CONTRACT_VERSION!r}; install matching versions of the"
                " daemon and the client."
            )
        self._health = health
        return health

    async def apiVersion(self) -> APIVersion:
        reply = await self.request("GET", f"{API_PREFIX}/api-version")
        record = _record(APIVersion, reply.body, reply.status)
        return attrs.evolve(record, supportedApiVersions=tuple(record.supportedApiVersions))

    async def capabilities(self) -> Capabilities:
        reply = await self.request("GET", f"{API_PREFIX}/capabilities")
        entries = reply.body.get("capabilities") if isinstance(reply.body, dict) else None
        if not isinstance(entries, list):
            raise _invalidResponse(reply.status, "Expected a capabilities list.")
        capabilities = tuple(
            attrs.evolve(capability, actions=tuple(capability.actions))
            for capability in (_record(Capability, entry, reply.status) for entry in entries)
        )
        return Capabilities(capabilities, reply.body.get("harnessConfigError"))

    async def action(
        self, action: str, origin: str = "coven-client", args: dict[str, Any] | None = None
    ) -> ActionResult:
        """
        Route a control-plane action, such as C{coven.capabilities.refresh}.
        """
        reply = await self.request(
            "POST", f"{API_PREFIX}/actions", body={"action": action, "origin": origin, "args": args or {}}
        )
        event = _record(ActionEvent, reply.body.get("event"), reply.status, origin=None, payload={})
        body = {**reply.body, "event": None}
        return attrs.evolve(_record(ActionResult, body, reply.status), event=event)

    # Sessions

    async def listSessions(self, archived: bool = False) -> list[SessionRecord]:
        """
        List non-archived sessions, or with C{archived} the archived ones, newest first.
        """
        reply = await self.request(
            "GET", f"{API_PREFIX}/sessions", query={"archived": "true" if archived else None}
        )
        if not isinstance(reply.body, list):
            raise _invalidResponse(reply.status, "Expected a list of sessions.")
        return [_sessionRecord(session, reply.status) for session in reply.body]

    async def launch(
        self,
        projectRoot: str,
        harness: str,
        prompt: str,
        cwd: str | None = None,
        title: str | None = None,
        cols: int | None = None,
        rows: int | None = None,
    ) -> SessionRecord:
        """
        Launch C{harness} with C{prompt} in a new PTY confined to C{projectRoot}.

        @param cols: the PTY's width in columns; the daemon defaults to 80.
        @param rows: the PTY's height in rows; the daemon defaults to 24.
        """
        body: dict[str, Any] = {"projectRoot": projectRoot, "harness": harness, "prompt": prompt}
        optional = {"cwd": cwd, "title": title, "cols": cols, "rows": rows}
        body.update({name: value for name, value in optional.items() if value is not None})
        reply = await self.request("POST", f"{API_PREFIX}/sessions", body=body)
        return _sessionRecord(reply.body, reply.status)

    async def getSession(self, sessionId: str) -> SessionRecord:
        reply = await self.request("GET", sessionPath(sessionId))
        return _sessionRecord(reply.body, reply.status)

    async def sendInput(self, sessionId: str, data: str) -> Accepted:
        """
        Write C{data} to a live session's PTY, as if typed.
        """
        reply = await self.request("POST", sessionPath(sessionId, "input"), body={"data": data})
        return _record(Accepted, reply.body, reply.status)

    async def kill(self, sessionId: str) -> Accepted:
        reply = await self.request("POST", sessionPath(sessionId, "kill"))
        return _record(Accepted, reply.body, reply.status)

    async def resize(self, sessionId: str, cols: int, rows: int) -> Accepted:
        """
        Set a live session's PTY window size; the harness gets SIGWINCH.
        """
        reply = await self.request(
            "POST", sessionPath(sessionId, "resize"), body={"cols": cols, "rows": rows}
        )
        return _record(Accepted, reply.body, reply.status)

    async def archive(self, sessionId: str) -> SessionRecord:
        """
        Hide a finished session from the default session list.
        """
        reply = await self.request("POST", sessionPath(sessionId, "archive"))
        return _sessionRecord(reply.body, reply.status)

    async def summon(self, sessionId: str) -> SessionRecord:
        """
        Bring an archived session back into the default session list.
        """
        reply = await self.request("POST", sessionPath(sessionId, "summon"))
        return _sessionRecord(reply.body, reply.status)

    async def delete(self, sessionId: str) -> Deleted:
        """
        Delete a finished session and all its events.
        """
        reply = await self.request("DELETE", sessionPath(sessionId))
        return _record(Deleted, reply.body, reply.status)

    # Events

    async def events(
        self,
        sessionId: str,
        afterSeq: int | None = None,
        limit: int | None = None,
        waitMs: int | None = None,
        afterEventId: str | None = None,
    ) -> EventPage:
        """
        Read one page of a session's events after a cursor.

        @param waitMs: with no event past the cursor, hold the request up to
            this many milliseconds until one is stored (at most 60000).
        """
        query = {
            "sessionId": sessionId,
            "afterSeq": afterSeq,
            "afterEventId": afterEventId,
            "limit": limit,
            "waitMs": waitMs,
        }
        timeout = self.timeout + (waitMs or 0) / 1000
        reply = await self.request("GET", f"{API_PREFIX}/events", query=query, timeout=timeout)
        return _eventPage(reply.body, reply.status)

    async def followEvents(
        self, sessionId: str, afterSeq: int = 0, waitMs: int = FOLLOW_WAIT_MS
    ) -> AsyncIterator[Event]:
        """
        Yield a session's events after C{afterSeq}, then new ones as they are
        stored, until the session's last event.

        The last event is C{exit}, or C{orphaned} for a session that an earlier
        daemon left running. Without either, the iteration also ends after the
        stored events of a session that is not running: at once when it was not
        running at the start, else when a long poll returns nothing new.

        @param waitMs: how long each long poll waits, in milliseconds.
        """
        if waitMs <= 0:
            raise ValueError(f"waitMs must be a positive number of milliseconds, got {waitMs}")

        # A session that is not running is only replayed. A running one is
        # followed with long polls and checked again whenever a wait ends with
        # nothing new.
        live = (await self.getSession(sessionId)).status == "running"
        cursor = afterSeq
        while True:
            page = await self.events(sessionId, afterSeq=cursor, waitMs=waitMs if live else None)
            for event in page.events:
                yield event
                if event.kind in FINAL_EVENT_KINDS:
                    return
                cursor = event.seq
            if page.hasMore:
                continue
            if not live:
                return
            if not page.events:
                live = (await self.getSession(sessionId)).status == "running"
