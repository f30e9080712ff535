"""Hostile and malformed input over the real socket.

Every case must get the JSON error envelope with the documented status and
code, never a 500, a traceback or a plain-text body, and the daemon must keep
serving afterwards. Requests go over raw sockets because most cases cannot be
sent through an HTTP client library.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import threads

from coven.api import MAX_BODY_BYTES, MAX_JSON_DEPTH

from .support import outputText, payload

# Seconds a raw socket waits for the daemon to send or accept data.
IO_TIMEOUT = 10.0
# Marks a case whose error details are not checked.
UNCHECKED = object()


@attrs.frozen
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    # Bytes the daemon sent after the end of the first response.
    trailing: bytes


def httpRequest(
    method: bytes,
    target: bytes,
    body: bytes | None = None,
    contentType: bytes | None = b"application/json",
    headers: bytes = b"",
) -> bytes:
    """
    Build one HTTP/1.1 request with C{Connection: close}, so the daemon closes
    the connection after its response. C{headers} are extra raw header lines,
    each ending in CRLF.
    """
    head = method + b" " + target + b" HTTP/1.1\r\nHost: coven\r\nConnection: close\r\n"
    if body is not None:
        if contentType is not None:
            head += b"Content-Type: " + contentType + b"\r\n"
        head += b"Content-Length: " + str(len(body)).encode("ascii") + b"\r\n"
    return head + headers + b"\r\n" + (body or b"")


def readUntilClosed(connection: socket.socket) -> bytes:
    received = b""
    while True:
        try:
            data = connection.recv(65536)
        except ConnectionResetError:
            return received
        except socket.timeout:
            raise AssertionError(
                f"daemon neither finished its response nor closed within {IO_TIMEOUT}s;"
                f" received {received[:200]!r}"
            ) from None
        if not data:
            return received
        received += data


def exchange(socketPath: str, data: bytes) -> bytes:
    """
    Send C{data} on a new connection and return all the daemon sends back
    until it closes the connection.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(IO_TIMEOUT)
        connection.connect(socketPath)
        try:
            connection.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            # The daemon rejected the request before reading all of it.
            pass
        return readUntilClosed(connection)


def streamUntilClosed(
    socketPath: str, head: bytes, chunk: bytes, maxBytes: int
) -> tuple[int, int, bytes]:
    """
    Send C{head}, then C{chunk} again and again until the daemon closes the
    connection or C{maxBytes} of chunks are sent.

    @return: the number of chunk bytes the socket accepted, the socket's send
        buffer size in bytes, and the response.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(IO_TIMEOUT)
        connection.connect(socketPath)
        sendBuffer = connection.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        connection.sendall(head)
        sent = 0
        while sent < maxBytes:
            try:
                sent += connection.send(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            except socket.timeout:
                raise AssertionError(
                    f"daemon stopped reading but kept the connection open after {sent} body bytes"
                ) from None
        return sent, sendBuffer, readUntilClosed(connection)


def dechunk(data: bytes) -> tuple[bytes, bytes]:
    """
    Return the body of a chunked message and the bytes after its end.
    """
    body = b""
    while True:
        sizeLine, separator, data = data.partition(b"\r\n")
        assert separator, f"truncated chunked body: {data[:200]!r}"
        size = int(sizeLine.split(b";")[0], 16)
        if size == 0:
            # No trailer fields: the message ends with an empty line.
            assert data.startswith(b"\r\n"), f"chunked body without its final CRLF: {data[:200]!r}"
            return body, data[2:]
        body += data[:size]
        assert data[size : size + 2] == b"\r\n", f"chunk of {size} bytes not followed by CRLF"
        data = data[size + 2 :]


def parseResponse(raw: bytes) -> Response:
    assert raw, "daemon closed the connection without sending a response"
    head, separator, rest = raw.partition(b"\r\n\r\n")
    assert separator, f"response without the end of its header: {raw[:300]!r}"
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 "), f"not an HTTP/1.1 status line: {lines[0]!r}"
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body, trailing = dechunk(rest)
    else:
        length = int(headers["content-length"])
        body, trailing = rest[:length], rest[length:]
    return Response(status, headers, body, trailing)


async def send(daemon: Any, data: bytes) -> Response:
    raw = await threads.deferToThread(exchange, daemon.service.socketPath, data)
    return parseResponse(raw)


def checkError(response: Response, status: int, code: str, details: Any = UNCHECKED) -> dict[str, Any]:
    """
    Check that C{response} is exactly one error envelope with C{status},
    C{code} and, unless they are L{UNCHECKED}, C{details}. Return the error object.
    """
    assert response.status == status, response
    assert response.headers.get("content-type") == "application/json", response
    assert b"Traceback" not in response.body
    assert response.trailing == b"", f"bytes after the response: {response.trailing[:200]!r}"
    envelope = json.loads(response.body)
    assert list(envelope) == ["error"], envelope
    error = envelope["error"]
    assert set(error) <= {"code", "message", "details"}, error
    assert error["code"] == code, error
    assert isinstance(error["message"], str)
    assert error["message"]
    if details is not UNCHECKED:
        assert error.get("details") == details, error
    return error


async def checkServing(daemon: Any) -> None:
    status, body = await daemon.client.get("/api/v1/health")
    assert status == 200, body
    assert body["ok"] is True


async def sessionCount(daemon: Any) -> int:
    status, sessions = await daemon.client.get("/api/v1/sessions")
    assert status == 200, sessions
    return len(sessions)


def launchBody(project: str, prompt: str = "print hello", fragment: str = "") -> bytes:
    """
    Return a launch body for the C{fake} harness. C{fragment} is raw JSON text
    such as C{"cols":1e400}, added as the last member, because some of the
    values sent here cannot be written with C{json.dumps}.
    """
    text = json.dumps({"projectRoot": project, "harness": "fake", "prompt": prompt})
    if fragment:
        text = text[:-1] + "," + fragment + "}"
    return text.encode("utf-8")


async def launchLive(daemon: Any) -> str:
    """
    Launch an C{echo} session and wait until it reads input.
    """
    record = await daemon.client.launch(daemon.project, "echo")
    await daemon.client.waitForOutput(record["id"], "ready")
    return record["id"]


# Request bodies


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_oversized_body_stops_reading(daemon: Any, framing: str) -> None:
    declared = 64 * MAX_BODY_BYTES
    piece = b" " * 65536
    if framing == "content-length":
        framingHeader = b"Content-Length: " + str(declared).encode("ascii")
        chunk = piece
        # The declared length is rejected before any body byte is read.
        readable = 0
    else:
        framingHeader = b"Transfer-Encoding: chunked"
        chunk = f"{len(piece):x}\r\n".encode("ascii") + piece + b"\r\n"
        # The daemon reads until the body passes the limit, one read at a time.
        readable = MAX_BODY_BYTES + 2 * len(chunk)
    head = (
        b"POST /api/v1/sessions HTTP/1.1\r\nHost: coven\r\nContent-Type: application/json\r\n"
        + framingHeader
        + b"\r\n\r\n"
    )

    sent, sendBuffer, raw = await threads.deferToThread(
        streamUntilClosed, daemon.service.socketPath, head, chunk, declared
    )

    checkError(parseResponse(raw), 400, "invalid_request", {"maxBytes": MAX_BODY_BYTES})
    # Past what the daemon read, the client can only fill the socket's buffers
    # before the daemon closes the connection. On Linux, bytes of a Unix socket
    # that the peer has not read count against the sender's SO_SNDBUF.
    assert sent <= readable + 2 * sendBuffer, (sent, sendBuffer)
    assert await sessionCount(daemon) == 0
    await checkServing(daemon)


@pytest_twisted.ensureDeferred
async def test_oversized_body_expect_continue(daemon: Any) -> None:
    # curl sends "Expect: 100-continue" with a POST body over one megabyte
    # (everything.curl.dev, "Expect 100-continue"). A rejected body must get
    # the 400 alone, not a "100 Continue" after it.
    request = (
        b"POST /api/v1/actions HTTP/1.1\r\nHost: coven\r\nContent-Type: application/json\r\n"
        b"Expect: 100-continue\r\nContent-Length: " + str(4 * MAX_BODY_BYTES).encode("ascii") + b"\r\n\r\n"
    )

    response = await send(daemon, request)

    checkError(response, 400, "invalid_request", {"maxBytes": MAX_BODY_BYTES})
    await checkServing(daemon)


DEPTH_DETAILS = {"maxDepth": MAX_JSON_DEPTH}

MALFORMED_BODIES = {
    "nested-arrays": (b"[" * 100_000, DEPTH_DETAILS),
    "nested-objects": (b'{"a":' * 100_000, DEPTH_DETAILS),
    "nested-closed": (b'{"action":' + b"[" * 100_000 + b"]" * 100_000 + b"}", DEPTH_DETAILS),
    "huge-integer": (b'{"action":1' + b"0" * 5000 + b"}", UNCHECKED),
    "nan": (b'{"action":NaN}', UNCHECKED),
    "infinity": (b'{"action":Infinity}', UNCHECKED),
    "negative-infinity": (b'{"action":-Infinity}', UNCHECKED),
    "duplicate-keys": (b'{"action":"coven.capabilities.refresh","action":"x"}', UNCHECKED),
    "invalid-utf8": (b'{"action":"\xff"}', UNCHECKED),
    "overlong-utf8": (b'{"action":"\xc0\xaf"}', UNCHECKED),
    "encoded-surrogate": (b'{"action":"\xed\xa0\x80"}', UNCHECKED),
    "escaped-surrogate": (b'{"action":"\\ud800"}', UNCHECKED),
    "empty": (b"", UNCHECKED),
    "whitespace": (b" \r\n\t ", UNCHECKED),
    "array": (b'["coven.capabilities.refresh"]', UNCHECKED),
    "string": (b'"coven.capabilities.refresh"', UNCHECKED),
    "null": (b"null", UNCHECKED),
    "truncated": (b'{"action":', UNCHECKED),
    "trailing-data": (b'{"action":"coven.capabilities.refresh"} {}', UNCHECKED),
    "nul-byte": (b'{"action":"coven.capabilities.refresh"}\x00', UNCHECKED),
}


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("name", list(MALFORMED_BODIES))
async def test_action_body_malformed(daemon: Any, name: str) -> None:
    body, details = MALFORMED_BODIES[name]

    response = await send(daemon, httpRequest(b"POST", b"/api/v1/actions", body))

    checkError(response, 400, "invalid_request", details)
    await checkServing(daemon)


# The prompt and a raw JSON fragment of each launch body. json.dumps writes
# an unpaired surrogate as an escape such as "\ud800".
LAUNCH_BODIES = {
    "duplicate-prompt": ("print hello", '"prompt":"print other"'),
    "nan-cols": ("print hello", '"cols":NaN'),
    "huge-integer-rows": ("print hello", '"rows":1' + "0" * 5000),
    "escaped-surrogate-prompt": ("print \ud800", ""),
    "escaped-surrogate-title": ("print hello", '"title":"\\udc80"'),
    "escaped-surrogate-cwd": ("print hello", '"cwd":"\\udbff"'),
}


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("name", list(LAUNCH_BODIES))
async def test_launch_body_malformed(daemon: Any, name: str) -> None:
    prompt, fragment = LAUNCH_BODIES[name]
    body = launchBody(daemon.project, prompt, fragment)

    response = await send(daemon, httpRequest(b"POST", b"/api/v1/sessions", body))

    checkError(response, 400, "invalid_request")
    assert await sessionCount(daemon) == 0
    await checkServing(daemon)


MULTIPART = b'--x\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nprint hello\r\n--x--\r\n'

CONTENT_TYPES = {
    "text-plain": (b"text/plain", None),
    "text-plain-charset": (b"text/plain; charset=utf-8", None),
    "multipart": (b"multipart/form-data; boundary=x", MULTIPART),
    "multipart-json-body": (b"multipart/form-data; boundary=x", None),
    "multipart-no-boundary": (b"multipart/form-data", None),
    "form-urlencoded": (b"application/x-www-form-urlencoded", b"projectRoot=/&harness=fake"),
    "json-lookalike": (b"application/jsonx", None),
}


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("name", list(CONTENT_TYPES))
async def test_launch_content_type_wrong(daemon: Any, name: str) -> None:
    contentType, body = CONTENT_TYPES[name]
    # Without a given body, the body is a valid launch that must still not run.
    if body is None:
        body = launchBody(daemon.project)

    response = await send(
        daemon, httpRequest(b"POST", b"/api/v1/sessions", body, contentType=contentType)
    )

    checkError(response, 400, "invalid_request", {"contentType": contentType.decode("ascii")})
    assert await sessionCount(daemon) == 0
    await checkServing(daemon)


# Session ids in paths and queries

# Each id as sent in the URL, and as the daemon decodes it: None when the
# decoded bytes are not UTF-8, and "/" when it contains a slash, which no
# session route matches.
SESSION_IDS = {
    "slash-encoded": (b"a%2Fb", "/"),
    "slash-raw": (b"a/b", "/"),
    "dot-dot": (b"..", ".."),
    "dot-dot-encoded": (b"%2E%2E", ".."),
    "nul": (b"%00", "\x00"),
    "long": (b"s" * 4000, "s" * 4000),
    "non-ascii": ("%C3%A9t%C3%A9-%E2%9C%93".encode("ascii"), "été-✓"),
    "invalid-percent-ff": (b"%FF", None),
    "invalid-percent-truncated": (b"%C3", None),
}

ROUTES = ["get", "input", "kill", "events"]


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("name", list(SESSION_IDS))
async def test_session_id_hostile(daemon: Any, name: str, route: str) -> None:
    sent, decoded = SESSION_IDS[name]
    # A live session, so a path that escaped its id would reach something.
    await launchLive(daemon)
    if route == "get":
        target = b"/api/v1/sessions/" + sent
        request = httpRequest(b"GET", target)
    elif route == "input":
        target = b"/api/v1/sessions/" + sent + b"/input"
        request = httpRequest(b"POST", target, b'{"data":"hello\\n"}')
    elif route == "kill":
        target = b"/api/v1/sessions/" + sent + b"/kill"
        request = httpRequest(b"POST", target)
    else:
        target = b"/api/v1/events?sessionId=" + sent
        request = httpRequest(b"GET", target)

    response = await send(daemon, request)

    if route == "events":
        if decoded is None:
            checkError(response, 400, "invalid_request", {"field": "sessionId"})
        else:
            expected = "a/b" if decoded == "/" else decoded
            checkError(response, 404, "session_not_found", {"sessionId": expected})
    elif decoded is None:
        checkError(response, 400, "invalid_request", {"path": target.decode("ascii")})
    elif decoded == "/":
        method = "GET" if route == "get" else "POST"
        checkError(response, 404, "not_found", {"method": method, "path": target.decode("ascii")})
    else:
        checkError(response, 404, "session_not_found", {"sessionId": decoded})
    status, sessions = await daemon.client.get("/api/v1/sessions")
    assert [session["status"] for session in sessions] == ["running"]
    await checkServing(daemon)


# NUL bytes and unpaired surrogates in text that reaches argv or a PTY


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("field", ["prompt", "title", "cwd", "projectRoot"])
async def test_launch_nul_rejected(daemon: Any, field: str) -> None:
    body = json.loads(launchBody(daemon.project))
    body[field] = (body.get(field) or "print") + "\x00after"

    response = await send(daemon, httpRequest(b"POST", b"/api/v1/sessions", json.dumps(body).encode()))

    checkError(response, 400, "invalid_request", {"field": field})
    assert await sessionCount(daemon) == 0
    await checkServing(daemon)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "data, details",
    [
        (b'{"data":"line\\u0000end\\n"}', {"field": "data"}),
        (b'{"data":"\\ud800\\n"}', UNCHECKED),
    ],
    ids=["nul", "escaped-surrogate"],
)
async def test_input_unwritable_rejected(daemon: Any, data: bytes, details: Any) -> None:
    sessionId = await launchLive(daemon)
    target = f"/api/v1/sessions/{sessionId}/input".encode("ascii")

    response = await send(daemon, httpRequest(b"POST", target, data))

    checkError(response, 400, "invalid_request", details)
    events = await daemon.client.allEvents(sessionId)
    assert [event for event in events if event["kind"] == "input"] == []
    # The session still takes well-formed input.
    status, body = await daemon.client.post(target.decode("ascii"), {"data": "after\n"})
    assert status == 202, body
    await daemon.client.waitForOutput(sessionId, "got: after")
    await checkServing(daemon)


# Terminal size


TERMINAL_SIZES = {
    "zero": ("0", 0),
    "over-max": ("1001", 1001),
    "negative": ("-1", -1),
    "string": ('"80"', None),
    "boolean": ("true", None),
    "fraction": ("1.5", None),
    # Rejected while parsing the body, before any field is looked at.
    "overflowing-float": ("1e400", "unparsed"),
    "huge-integer": ("1" + "0" * 30, 10**30),
}


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("field", ["cols", "rows"])
@pytest.mark.parametrize("name", list(TERMINAL_SIZES))
async def test_launch_size_invalid(daemon: Any, name: str, field: str) -> None:
    text, value = TERMINAL_SIZES[name]
    body = launchBody(daemon.project, fragment=f'"{field}":{text}')

    response = await send(daemon, httpRequest(b"POST", b"/api/v1/sessions", body))

    if value == "unparsed":
        error = checkError(response, 400, "invalid_request")
        assert "out of range" in error["message"]
    else:
        details = {"field": field} if value is None else {"field": field, "value": value}
        checkError(response, 400, "invalid_request", details)
    assert await sessionCount(daemon) == 0
    await checkServing(daemon)


# Project root


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("kind", ["file", "socket", "filesystem-root", "relative", "missing"])
async def test_launch_project_root_invalid(daemon: Any, kind: str) -> None:
    if kind == "file":
        projectRoot = os.path.join(daemon.project, "README")
        with open(projectRoot, "w") as file:
            file.write("a file, not a folder\n")
    elif kind == "socket":
        projectRoot = os.path.join(daemon.project, "listening.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(projectRoot)
        listener.close()
    elif kind == "filesystem-root":
        projectRoot = "/"
    elif kind == "relative":
        projectRoot = os.path.basename(daemon.project)
    else:
        projectRoot = os.path.join(daemon.project, "missing")
    body = json.dumps({"projectRoot": projectRoot, "harness": "fake", "prompt": "print hello"})

    response = await send(daemon, httpRequest(b"POST", b"/api/v1/sessions", body.encode()))

    checkError(
        response, 400, "invalid_request", {"field": "projectRoot", "projectRoot": projectRoot}
    )
    assert await sessionCount(daemon) == 0
    await checkServing(daemon)


def flipSymlink(link: str, targets: tuple[str, str], stop: threading.Event) -> int:
    """
    Point C{link} at each of C{targets} in turn until C{stop} is set or 10
    seconds have passed, and return the number of flips. Each flip is an atomic
    rename, so C{link} always exists.
    """
    staging = link + ".next"
    deadline = time.monotonic() + 10
    flips = 0
    while not stop.is_set() and time.monotonic() < deadline:
        os.symlink(targets[flips % 2], staging)
        os.replace(staging, link)
        flips += 1
    return flips


@pytest_twisted.ensureDeferred
async def test_cwd_symlink_flipping_confined(daemon: Any) -> None:
    projectRoot = os.path.realpath(daemon.project)
    inside = os.path.join(projectRoot, "inside")
    outside = os.path.join(os.path.dirname(projectRoot), "outside")
    os.mkdir(inside)
    os.mkdir(outside)
    link = os.path.join(projectRoot, "link")
    os.symlink(inside, link)
    stop = threading.Event()
    flipper = threads.deferToThread(flipSymlink, link, (outside, inside), stop)

    launched = []
    violations = 0
    try:
        for _ in range(30):
            body = launchBody(daemon.project, prompt="env COVEN_SESSION_ID", fragment='"cwd":"link"')
            response = await send(daemon, httpRequest(b"POST", b"/api/v1/sessions", body))
            if response.status == 201:
                record = json.loads(response.body)
                assert record["cwd"] == inside, record
                launched.append(record)
            else:
                checkError(
                    response,
                    400,
                    "project_root_violation",
                    {"cwd": "link", "resolvedCwd": outside, "projectRoot": projectRoot},
                )
                violations += 1
    finally:
        stop.set()
        flips = await flipper

    # Both outcomes show that launches met the link pointing either way.
    assert flips > 30, flips
    assert launched, f"no launch succeeded in 30 tries while the link flipped {flips} times"
    assert violations, f"no launch was rejected in 30 tries while the link flipped {flips} times"
    for record in launched:
        events = await daemon.client.waitForExit(record["id"])
        assert payload(events[-1])["status"] == "completed", events
        text = outputText(events)
        printed = re.findall(r"cwd=(.*?)\r?\n", text)
        assert printed == [record["cwd"]], text
    assert await sessionCount(daemon) == len(launched)
    await checkServing(daemon)


# Request line and headers


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "requestBytes",
    [
        httpRequest(b"GET", b"/api/v1/sessions/" + b"p" * 100_000),
        httpRequest(b"GET", b"/api/v1/events?sessionId=" + b"q" * 100_000),
        httpRequest(
            b"GET",
            b"/api/v1/health",
            headers=b"".join(b"X-Flood-%d: 1\r\n" % index for index in range(1000)),
        ),
        httpRequest(b"GET", b"/api/v1/health", headers=b"X-Large: " + b"h" * 100_000 + b"\r\n"),
    ],
    ids=["long-path", "long-query", "header-flood", "large-header"],
)
async def test_request_head_oversized(daemon: Any, requestBytes: bytes) -> None:
    response = await send(daemon, requestBytes)

    checkError(response, 400, "invalid_request")
    await checkServing(daemon)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "requestBytes",
    [
        b"hello daemon, this is not HTTP\r\n\r\n",
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n",
        b"GET /api/v1/health\r\n\r\n",
        b"GET /api/v1/health HTTP/1.1 extra\r\nHost: coven\r\n\r\n",
        b"POST /api/v1/actions HTTP/1.1\r\nHost: coven\r\nContent-Length: -1\r\n\r\n{}",
        b"POST /api/v1/actions HTTP/1.1\r\nHost: coven\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        b"POST /api/v1/actions HTTP/1.1\r\nHost: coven\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
    ids=[
        "text-line",
        "tls-hello",
        "no-version",
        "four-fields",
        "negative-length",
        "conflicting-lengths",
        "bad-chunk-size",
    ],
)
async def test_request_not_http(daemon: Any, requestBytes: bytes) -> None:
    response = await send(daemon, requestBytes)

    checkError(response, 400, "invalid_request")
    await checkServing(daemon)


def sendAndClose(socketPath: str, data: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(IO_TIMEOUT)
        connection.connect(socketPath)
        connection.sendall(data)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("cut", ["request-line", "headers", "body"])
async def test_connection_closed_mid_request(daemon: Any, cut: str) -> None:
    full = httpRequest(b"POST", b"/api/v1/sessions", launchBody(daemon.project))
    headEnd = full.index(b"\r\n\r\n") + 4
    cutAt = {"request-line": 10, "headers": headEnd - 20, "body": headEnd + 20}[cut]

    await threads.deferToThread(sendAndClose, daemon.service.socketPath, full[:cutAt])

    # A new connection gets served, and the cut launch never ran.
    await checkServing(daemon)
    assert await sessionCount(daemon) == 0
