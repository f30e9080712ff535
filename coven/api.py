"""Klein routes of the coven.daemon.v1 API and the error envelope every failure uses."""

from __future__ import annotations

import json
import math
import re
from typing import Any, Callable
from urllib.parse import unquote_to_bytes

from klein import Klein
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from werkzeug.exceptions import HTTPException

from coven import __version__
from coven.errors import (
    CovenError,
    InvalidRequest,
    RouteNotFound,
    SessionNotFound,
    UnsupportedAPIVersion,
)
from coven.harnesses import interpreterProblem
from coven.sessions import MAX_TERMINAL_SIZE, LaunchRequest, SessionManager
from coven.store import Store

log = Logger()

API_VERSION = "v1"
CONTRACT_VERSION = "coven.daemon.v1"
SUPPORTED_API_VERSIONS = ["v1"]
REFRESH_ACTION = "coven.capabilities.refresh"
# Request bodies above this many bytes are rejected; see coven.service.CovenRequest.
MAX_BODY_BYTES = 1024 * 1024
DEFAULT_EVENT_LIMIT = 1000
MAX_EVENT_LIMIT = 1000
MAX_WAIT_MS = 60_000
MAX_JSON_DEPTH = 64
# Query integers are decimal digits only; more digits than this are not parsed,
# so a huge value costs nothing (Python refuses over 4300 digits anyway).
NON_NEGATIVE_INTEGER = re.compile(r"^[0-9]{1,1000}$")
# The largest seq SQLite can store; a larger afterSeq finds nothing after it.
MAX_SEQ = 2**63 - 1


def jsonBytes(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _dropWakeUp(wakeUp: defer.Deferred[None] | None) -> None:
    """
    Cancel a long poll's wake-up that did not fire, and drop its cancellation.
    """
    if wakeUp is not None:
        wakeUp.cancel()
        wakeUp.addErrback(lambda failure: failure.trap(defer.CancelledError))


def _rejectConstant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _rejectDuplicateKeys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _depth(text: str) -> int:
    # An upper bound of the nesting depth that ignores brackets inside strings,
    # checked before parsing so a deeply nested body cannot exhaust the stack.
    deepest = depth = 0
    inString = escaped = False
    for character in text:
        if inString:
            if escaped:
                escaped = False
            elif character == "\\":
                escaped = True
            elif character == '"':
                inString = False
        elif character == '"':
            inString = True
        elif character in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif character in "]}":
            depth -= 1
    return deepest


def _parseInteger(text: str) -> int:
    # Python rejects more than 4300 digits with advice about its own settings,
    # so the limit is reported here in API terms.
    if len(text.lstrip("-")) > 4300:
        raise ValueError(f"integer of {len(text)} digits is out of range")
    return int(text)


def _parseFloat(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def parseJSONObject(body: bytes) -> dict[str, Any]:
    """
    Parse a request body that must be one JSON object.

    @raise InvalidRequest: the body is not UTF-8, not JSON, nested deeper than
        L{MAX_JSON_DEPTH}, has duplicate keys, C{NaN} or C{Infinity}, or is
        another JSON type.
    """
    if len(body) > MAX_BODY_BYTES:
        raise InvalidRequest(
            f"Request body is larger than {MAX_BODY_BYTES} bytes.", maxBytes=MAX_BODY_BYTES
        )
    if not body.strip():
        raise InvalidRequest("Request body must be a JSON object; it is empty.")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidRequest(f"Request body is not valid UTF-8 (byte {error.start}).") from None
    if _depth(text) > MAX_JSON_DEPTH:
        raise InvalidRequest(
            f"Request body is nested deeper than {MAX_JSON_DEPTH} levels.", maxDepth=MAX_JSON_DEPTH
        )
    try:
        value = json.loads(
            text,
            object_pairs_hook=_rejectDuplicateKeys,
            parse_constant=_rejectConstant,
            parse_int=_parseInteger,
            parse_float=_parseFloat,
        )
    except (ValueError, RecursionError) as error:
        raise InvalidRequest(f"Request body is not valid JSON: {error}.") from None
    if not isinstance(value, dict):
        raise InvalidRequest(
            f"Request body must be a JSON object, got {_describeJSON(value)}."
        )
    try:
        # An escape such as "\ud800" is valid JSON but no character, so it can
        # be neither written to a PTY nor stored.
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidRequest(
            "Request body contains an unpaired surrogate escape"
            f" ({error.object[error.start]!r}); send whole characters."
        ) from None
    return value


def isJSONContentType(value: bytes) -> bool:
    """
    Return whether a Content-Type header names JSON: C{application/json} or a
    C{+json} type, with any parameters.
    """
    mediaType = value.split(b";", 1)[0].strip().lower()
    return mediaType == b"application/json" or (
        mediaType.startswith(b"application/") and mediaType.endswith(b"+json")
    )


def _field(
    body: dict[str, Any], name: str, kind: type | tuple[type, ...], required: bool, what: str
) -> Any:
    if name not in body or (body[name] is None and not required):
        if required:
            raise InvalidRequest(f"Field {name} is required: {what}.", field=name)
        return None
    value = body[name]
    # JSON has one number type, and JSON Schema counts 24.0 as the integer 24.
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    # bool is an int in Python, never a valid integer field here.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise InvalidRequest(f"Field {name} must be {what}, got {_describeJSON(value)}.", field=name)
    return value


def _brief(text: str, limit: int = 40) -> str:
    """
    Return C{text} cut to about C{limit} characters, for a value quoted in an
    error message: a number of thousands of digits made messages of kilobytes.
    """
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _describeJSON(value: Any) -> str:
    """
    Return how an error message names a JSON value: literals and numbers as
    they are, other values by their type.
    """
    if value is None or isinstance(value, (bool, int, float)):
        return _brief(json.dumps(value))
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _terminalSize(body: dict[str, Any], name: str, default: int | None) -> int | None:
    value = _field(body, name, int, default is None, f"an integer from 1 to {MAX_TERMINAL_SIZE}")
    if value is None:
        return default
    if not 1 <= value <= MAX_TERMINAL_SIZE:
        raise InvalidRequest(
            f"Field {name} must be an integer from 1 to {MAX_TERMINAL_SIZE}, got {_brief(str(value))}.",
            field=name,
            value=value,
        )
    return value


def _rejectNul(value: str, name: str) -> None:
    if "\x00" in value:
        raise InvalidRequest(
            f"Field {name} contains a NUL character, which Coven does not pass to a harness.",
            field=name,
        )


def _queryArgument(request: IRequest, name: str) -> str | None:
    values = request.args.get(name.encode("ascii"))
    if not values:
        return None
    # Like a duplicate key in a body, a repeated parameter has no one meaning.
    if len(values) > 1:
        raise InvalidRequest(
            f"Query parameter {name} is given {len(values)} times. Give it once.",
            field=name,
            count=len(values),
        )
    try:
        return values[-1].decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(f"Query parameter {name} is not valid UTF-8.", field=name) from None


def _integerArgument(request: IRequest, name: str, minimum: int, maximum: int | None) -> int | None:
    raw = _queryArgument(request, name)
    if raw is None:
        return None
    limits = f"from {minimum} to {maximum}" if maximum is not None else f"of at least {minimum}"
    if not NON_NEGATIVE_INTEGER.match(raw) or int(raw) < minimum:
        raise InvalidRequest(
            f"Query parameter {name} must be an integer {limits}, got {_brief(repr(raw))}.",
            field=name,
            value=raw,
        )
    value = int(raw)
    if maximum is not None and value > maximum:
        raise InvalidRequest(
            f"Query parameter {name} must be an integer {limits}, got {_brief(repr(raw))}.",
            field=name,
            value=raw,
        )
    return value


class _UTF8PathResource(Resource):
    """
    Reject a path that is not UTF-8 once percent-decoded with the error
    envelope, because Klein responds to it with a text/html 400 before any
    error handler runs.
    """

    isLeaf = True

    def __init__(self, routes: Any) -> None:
        super().__init__()
        self._routes = routes

    def render(self, request: IRequest) -> Any:
        try:
            unquote_to_bytes(request.path).decode("utf-8")
        except UnicodeDecodeError:
            error = InvalidRequest(
                "Request path is not valid UTF-8 after percent-decoding.",
                path=request.path.decode("latin-1"),
            )
            request.setResponseCode(error.status)
            request.setHeader(b"Content-Type", b"application/json")
            return jsonBytes(error.envelope())
        return self._routes.render(request)


class CovenAPI:
    """
    The HTTP face of the daemon: each route turns a request into a call on the
    session manager or the store and the result into JSON, nothing more.
    """

    app = Klein()

    def __init__(
        self,
        store: Store,
        sessions: SessionManager,
        reactor: Any,
        daemonInfo: Callable[[], dict[str, Any] | None] = lambda: None,
    ) -> None:
        self.store = store
        self.sessions = sessions
        self._reactor = reactor
        self._daemonInfo = daemonInfo

    def resource(self) -> Any:
        return _UTF8PathResource(self.app.resource())

    # Responses

    @staticmethod
    def _json(request: IRequest, value: Any, status: int = 200) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json")
        return jsonBytes(value)

    @app.handle_errors(CovenError)
    def _covenError(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        return self._json(request, error.envelope(), error.status)

    @app.handle_errors(HTTPException)
    def _routingError(self, request: IRequest, failure: Failure) -> bytes:
        # Unknown paths and known paths with a method they do not serve.
        error = RouteNotFound(
            method=request.method.decode("latin-1"),
            path=request.path.decode("utf-8", "replace"),
        )
        return self._json(request, error.envelope(), error.status)

    @app.handle_errors(Exception)
    def _unexpectedError(self, request: IRequest, failure: Failure) -> bytes:
        log.failure(
            "Unexpected error serving {method} {path}",
            failure,
            method=request.method.decode("latin-1"),
            path=request.path.decode("utf-8", "replace"),
        )
        return self._json(request, CovenError().envelope(), 500)

    def _body(self, request: IRequest) -> dict[str, Any]:
        contentType = request.getHeader(b"content-type")
        if contentType is not None and not isJSONContentType(contentType):
            shown = contentType.decode("latin-1")
            raise InvalidRequest(
                f"Content-Type must be application/json, got {shown}; with curl -d, pass"
                " -H 'Content-Type: application/json'.",
                contentType=shown,
            )
        request.content.seek(0)
        return parseJSONObject(request.content.read(MAX_BODY_BYTES + 1))

    # Meta

    @app.route("/api/v1/api-version", methods=["GET"])
    @app.route("/api-version", methods=["GET"], endpoint="legacy_apiVersion")
    def apiVersion(self, request: IRequest) -> bytes:
        return self._json(
            request, {"apiVersion": API_VERSION, "supportedApiVersions": SUPPORTED_API_VERSIONS}
        )

    @app.route("/api/v1/health", methods=["GET"])
    @app.route("/health", methods=["GET"], endpoint="legacy_health")
    def health(self, request: IRequest) -> bytes:
        return self._json(
            request,
            {
                "ok": True,
                "apiVersion": CONTRACT_VERSION,
                "covenVersion": __version__,
                "capabilities": {
                    "sessions": True,
                    "events": True,
                    "eventCursor": "sequence",
                    "structuredErrors": True,
                },
                "daemon": self._daemonInfo(),
            },
        )

    def _capabilities(self) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = [
            {
                "id": "coven.control.actions",
                "label": "Coven control-plane action router",
                "adapter": "coven-daemon",
                "status": "available",
                "policy": "allow",
                "actions": [REFRESH_ACTION],
            },
            {
                "id": "coven.sessions",
                "label": "Harness sessions in pseudo-terminals",
                "adapter": "coven-daemon",
                "status": "available",
                "policy": "allow",
                "actions": [],
            },
        ]
        path = self.sessions.harnessEnvironment("").get("PATH")
        for spec in self.sessions.harnesses.all():
            executable = spec.resolveExecutable(path)
            if executable is None:
                reason: str | None = spec.missingReason()
            else:
                problem = interpreterProblem(executable)
                reason = None if problem is None else problem[0]
            entry = {
                "id": f"harness.{spec.id}",
                "label": spec.label,
                "adapter": "pty",
                "status": "available" if reason is None else "unavailable",
                "policy": "allow",
                "actions": [],
                "harness": spec.id,
                "executable": executable,
            }
            if reason is not None:
                entry["reason"] = reason
            entries.append(entry)
        entries.append(
            {
                "id": "desktop.automation",
                "label": "Desktop automation adapters",
                "adapter": "desktop-use",
                "status": "planned",
                "policy": "requiresApproval",
                "actions": [],
            }
        )
        return entries

    @app.route("/api/v1/capabilities", methods=["GET"])
    @app.route("/capabilities", methods=["GET"], endpoint="legacy_capabilities")
    def capabilities(self, request: IRequest) -> bytes:
        return self._json(
            request,
            {
                "capabilities": self._capabilities(),
                "harnessConfigError": self.sessions.harnesses.configError,
            },
        )

    @app.route("/api/v1/actions", methods=["POST"])
    @app.route("/actions", methods=["POST"], endpoint="legacy_actions")
    def actions(self, request: IRequest) -> bytes:
        body = self._body(request)
        action = _field(body, "action", str, True, "a string naming a control action")
        origin = _field(body, "origin", str, False, "a string")
        _field(body, "args", dict, False, "a JSON object")
        if action != REFRESH_ACTION:
            raise InvalidRequest(
                f"Unknown control action {action!r}; supported actions: {REFRESH_ACTION}.",
                action=action,
                supportedActions=[REFRESH_ACTION],
            )

        self.sessions.harnesses.reload()
        capabilities = self._capabilities()
        payload: dict[str, Any] = {"capabilities": len(capabilities)}
        if self.sessions.harnesses.configError is not None:
            payload["harnessConfigError"] = self.sessions.harnesses.configError
        return self._json(
            request,
            {
                "ok": True,
                "accepted": True,
                "action": action,
                "status": "completed",
                "event": {
                    "kind": "capabilities.refreshed",
                    "action": action,
                    "origin": origin,
                    "payload": payload,
                },
            },
        )

    # Sessions

    @app.route("/api/v1/sessions", methods=["GET"])
    @app.route("/sessions", methods=["GET"], endpoint="legacy_listSessions")
    async def listSessions(self, request: IRequest) -> bytes:
        archived = _queryArgument(request, "archived")
        if archived not in (None, "true", "false"):
            raise InvalidRequest(
                f"Query parameter archived must be true or false, got {archived!r}.",
                field="archived",
            )
        sessions = await self.store.listSessions(archived=archived == "true")
        return self._json(request, [session.toJSON() for session in sessions])

    @app.route("/api/v1/sessions", methods=["POST"])
    @app.route("/sessions", methods=["POST"], endpoint="legacy_launchSession")
    async def launchSession(self, request: IRequest) -> bytes:
        body = self._body(request)
        launch = LaunchRequest(
            projectRoot=_field(body, "projectRoot", str, True, "an absolute folder path"),
            harness=_field(body, "harness", str, True, "a harness id string"),
            prompt=_field(body, "prompt", str, True, "a string"),
            cwd=_field(body, "cwd", str, False, "a folder path string"),
            title=_field(body, "title", str, False, "a string"),
            cols=_terminalSize(body, "cols", 80),
            rows=_terminalSize(body, "rows", 24),
        )
        _rejectNul(launch.prompt, "prompt")
        for name in ("projectRoot", "cwd", "title"):
            value = getattr(launch, name)
            if value is not None:
                _rejectNul(value, name)
        record = await self.sessions.launch(launch)
        return self._json(request, record.toJSON(), 201)

    @app.route("/api/v1/sessions/<sessionId>", methods=["GET"])
    @app.route("/sessions/<sessionId>", methods=["GET"], endpoint="legacy_getSession")
    async def getSession(self, request: IRequest, sessionId: str) -> bytes:
        waitMs = _integerArgument(request, "waitMs", 0, MAX_WAIT_MS) or 0
        # As for events, the wake-up is registered before the read, so an end
        # committed between the read and the wait still wakes this request. A
        # session that exited but whose exit is not stored yet is no longer
        # live, and the exit event's commit ends its wait.
        wakeUp = None
        if waitMs:
            wakeUp = self.sessions.waitForEnd(sessionId) or self.store.waitForEvents(sessionId)
        try:
            record = await self.store.getSession(sessionId)
            if record is not None and record.status == "running" and wakeUp is not None:
                await self._waitFor(wakeUp, waitMs / 1000)
                wakeUp = None
                record = await self.store.getSession(sessionId)
        finally:
            _dropWakeUp(wakeUp)
        if record is None:
            raise SessionNotFound(sessionId=sessionId)
        return self._json(request, record.toJSON())

    @app.route("/api/v1/sessions/<sessionId>/input", methods=["POST"])
    @app.route("/sessions/<sessionId>/input", methods=["POST"], endpoint="legacy_sendInput")
    async def sendInput(self, request: IRequest, sessionId: str) -> bytes:
        body = self._body(request)
        data = _field(body, "data", str, True, "a non-empty string")
        if not data:
            raise InvalidRequest("Field data must be a non-empty string.", field="data")
        _rejectNul(data, "data")
        await self.sessions.sendInput(sessionId, data)
        return self._json(request, {"ok": True, "accepted": True}, 202)

    @app.route("/api/v1/sessions/<sessionId>/kill", methods=["POST"])
    @app.route("/sessions/<sessionId>/kill", methods=["POST"], endpoint="legacy_killSession")
    async def killSession(self, request: IRequest, sessionId: str) -> bytes:
        await self.sessions.kill(sessionId)
        return self._json(request, {"ok": True, "accepted": True}, 202)

    @app.route("/api/v1/sessions/<sessionId>/resize", methods=["POST"])
    @app.route("/sessions/<sessionId>/resize", methods=["POST"], endpoint="legacy_resizeSession")
    async def resizeSession(self, request: IRequest, sessionId: str) -> bytes:
        body = self._body(request)
        cols = _terminalSize(body, "cols", None)
        rows = _terminalSize(body, "rows", None)
        assert cols is not None and rows is not None
        await self.sessions.resize(sessionId, cols, rows)
        return self._json(request, {"ok": True, "accepted": True}, 202)

    @app.route("/api/v1/sessions/<sessionId>/archive", methods=["POST"])
    @app.route("/sessions/<sessionId>/archive", methods=["POST"], endpoint="legacy_archiveSession")
    async def archiveSession(self, request: IRequest, sessionId: str) -> bytes:
        record = await self.sessions.archive(sessionId)
        return self._json(request, record.toJSON())

    @app.route("/api/v1/sessions/<sessionId>/summon", methods=["POST"])
    @app.route("/sessions/<sessionId>/summon", methods=["POST"], endpoint="legacy_summonSession")
    async def summonSession(self, request: IRequest, sessionId: str) -> bytes:
        record = await self.sessions.summon(sessionId)
        return self._json(request, record.toJSON())

    @app.route("/api/v1/sessions/<sessionId>", methods=["DELETE"])
    @app.route("/sessions/<sessionId>", methods=["DELETE"], endpoint="legacy_deleteSession")
    async def deleteSession(self, request: IRequest, sessionId: str) -> bytes:
        await self.sessions.delete(sessionId)
        return self._json(request, {"ok": True, "deleted": True, "sessionId": sessionId})

    # Events

    @app.route("/api/v1/events", methods=["GET"])
    @app.route("/events", methods=["GET"], endpoint="legacy_events")
    async def events(self, request: IRequest) -> bytes:
        sessionId = _queryArgument(request, "sessionId")
        if not sessionId:
            raise InvalidRequest("Query parameter sessionId is required.", field="sessionId")
        afterSeq = _integerArgument(request, "afterSeq", 0, None)
        if afterSeq is not None:
            afterSeq = min(afterSeq, MAX_SEQ)
        limit = _integerArgument(request, "limit", 1, None)
        limit = DEFAULT_EVENT_LIMIT if limit is None else min(limit, MAX_EVENT_LIMIT)
        waitMs = _integerArgument(request, "waitMs", 0, MAX_WAIT_MS) or 0
        afterEventId = _queryArgument(request, "afterEventId")

        if afterSeq is None and afterEventId is not None:
            afterSeq = await self.store.findEventSeq(sessionId, afterEventId)
            if afterSeq is None:
                if await self.store.getSession(sessionId) is None:
                    raise SessionNotFound(sessionId=sessionId)
                raise InvalidRequest(
                    f"afterEventId {afterEventId} is not an event of session {sessionId}.",
                    field="afterEventId",
                    sessionId=sessionId,
                    afterEventId=afterEventId,
                )
        cursor = afterSeq or 0

        # The wake-up is registered before the read, so an event committed
        # between the read and the wait still wakes this request.
        wakeUp = self.store.waitForEvents(sessionId) if waitMs else None
        try:
            page = await self.store.readEventsJSON(sessionId, cursor, limit)
            if page is None:
                raise SessionNotFound(sessionId=sessionId)
            if not page.count and wakeUp is not None:
                await self._waitFor(wakeUp, waitMs / 1000)
                wakeUp = None
                page = await self.store.readEventsJSON(sessionId, cursor, limit)
                if page is None:
                    raise SessionNotFound(sessionId=sessionId)
        finally:
            _dropWakeUp(wakeUp)
        request.setHeader(b"Content-Type", b"application/json")
        return page.body

    async def _waitFor(self, wakeUp: defer.Deferred[None], seconds: float) -> None:
        timer = self._reactor.callLater(seconds, wakeUp.cancel)
        try:
            await wakeUp
        except defer.CancelledError:
            if timer.active():
                # The request itself was cancelled, not the wait timed out.
                raise
        finally:
            if timer.active():
                timer.cancel()

    # Fail-closed fallbacks

    @app.route("/api/<version>", methods=None, endpoint="otherVersion")
    @app.route("/api/<version>/<path:rest>", methods=None, endpoint="otherVersionPath")
    def otherVersion(self, request: IRequest, version: str, rest: str = "") -> bytes:
        if version == API_VERSION:
            raise RouteNotFound(
                method=request.method.decode("latin-1"),
                path=request.path.decode("utf-8", "replace"),
            )
        raise UnsupportedAPIVersion(apiVersion=version, supportedApiVersions=SUPPORTED_API_VERSIONS)
