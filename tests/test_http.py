"""HTTP-level behaviour over the real socket: body limits and response headers."""

from __future__ import annotations

import json
import socket

import pytest_twisted
from twisted.internet import threads

from coven.api import MAX_BODY_BYTES


def exchange(socketPath: str, head: bytes, chunks: list[bytes]) -> bytes:
    """
    Send C{head}, then each chunk while the daemon keeps the connection open,
    and return everything the daemon sent back.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(10)
        connection.connect(socketPath)
        connection.sendall(head)
        for chunk in chunks:
            try:
                connection.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
        received = b""
        while True:
            try:
                data = connection.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            received += data
        return received


def parseResponse(raw: bytes) -> tuple[int, dict[str, str], dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, json.loads(body)


@pytest_twisted.ensureDeferred
async def test_declared_large_body_rejected_unread(daemon):
    head = (
        b"POST /api/v1/sessions HTTP/1.1\r\nHost: coven\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(4 * MAX_BODY_BYTES).encode() + b"\r\n\r\n"
    )

    # No body is sent at all: the daemon rejects the declared length.
    raw = await threads.deferToThread(exchange, daemon.service.socketPath, head, [])

    status, headers, body = parseResponse(raw)
    assert status == 400
    assert headers["content-type"] == "application/json"
    assert body["error"]["code"] == "invalid_request"
    assert body["error"]["details"] == {"maxBytes": MAX_BODY_BYTES}


@pytest_twisted.ensureDeferred
async def test_chunked_large_body_rejected(daemon):
    head = (
        b"POST /api/v1/sessions HTTP/1.1\r\nHost: coven\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    piece = b"x" * 65536
    chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"

    raw = await threads.deferToThread(
        exchange, daemon.service.socketPath, head, [chunk] * (MAX_BODY_BYTES // len(piece) + 8)
    )

    status, headers, body = parseResponse(raw)
    assert status == 400
    assert body["error"]["details"] == {"maxBytes": MAX_BODY_BYTES}


@pytest_twisted.ensureDeferred
async def test_body_at_limit_parsed(daemon):
    # A body of exactly the limit is read and judged on its content.
    padding = " " * (MAX_BODY_BYTES - len(b'{"action":"x"}'))
    payload = ('{"action":"x"}' + padding).encode()
    assert len(payload) == MAX_BODY_BYTES

    status, body = await daemon.client.post("/api/v1/actions", raw=payload)

    assert status == 400
    assert body["error"]["details"]["action"] == "x"


@pytest_twisted.ensureDeferred
async def test_daemon_serves_after_rejected_body(daemon):
    head = b"POST /api/v1/actions HTTP/1.1\r\nHost: coven\r\nContent-Length: 99999999\r\n\r\n"
    await threads.deferToThread(exchange, daemon.service.socketPath, head, [])

    status, body = await daemon.client.get("/api/v1/health")

    assert status == 200
    assert body["ok"] is True


@pytest_twisted.ensureDeferred
async def test_legacy_alias_over_socket(daemon):
    status, versioned = await daemon.client.get("/api/v1/sessions")
    legacyStatus, legacy = await daemon.client.get("/sessions")

    assert status == legacyStatus == 200
    assert legacy == versioned
