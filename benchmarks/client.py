"""A small HTTP/1.1 client for a daemon's Unix socket, cheap enough to benchmark with.

Every request opens a new connection and sends "Connection: close", like curl.
Responses are read by Content-Length (or chunked encoding, or until the server
closes), so the client does not depend on how fast the server closes.
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

DEFAULT_TIMEOUT = 30.0


class ProtocolError(Exception):
    """
    The server's response was not valid HTTP/1.1.
    """


def _requestBytes(method: str, target: str, body: Any) -> bytes:
    data = b"" if body is None else json.dumps(body).encode("utf-8")
    lines = [f"{method} {target} HTTP/1.1", "Host: coven", "Connection: close"]
    if body is not None or method != "GET":
        lines.append("Content-Type: application/json")
        lines.append(f"Content-Length: {len(data)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + data


def _parseHead(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise ProtocolError(f"invalid status line {lines[0]!r}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


def _dechunk(data: bytes) -> bytes:
    body = bytearray()
    position = 0
    while True:
        end = data.index(b"\r\n", position)
        size = int(data[position:end].split(b";")[0], 16)
        if size == 0:
            return bytes(body)
        start = end + 2
        body += data[start : start + size]
        position = start + size + 2


def _receiveExactly(sock: socket.socket, buffer: bytearray, start: int) -> None:
    view = memoryview(buffer)
    position = start
    while position < len(buffer):
        received = sock.recv_into(view[position:])
        if received == 0:
            raise ProtocolError(f"connection closed after {position} of {len(buffer)} body bytes")
        position += received


def _receiveAll(sock: socket.socket, data: bytearray) -> None:
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            return
        data += chunk


def request(
    socketPath: str,
    method: str,
    target: str,
    body: Any = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> tuple[int, bytes]:
    """
    Send one request on a new connection and return the status and body.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(socketPath)
        sock.sendall(_requestBytes(method, target, body))
        received = bytearray()
        while (end := received.find(b"\r\n\r\n")) == -1:
            chunk = sock.recv(65536)
            if not chunk:
                raise ProtocolError("connection closed before the response head ended")
            received += chunk
        status, headers = _parseHead(bytes(received[:end]))
        rest = received[end + 4 :]
        if "content-length" in headers:
            length = int(headers["content-length"])
            content = bytearray(length)
            content[: len(rest)] = rest[:length]
            _receiveExactly(sock, content, min(len(rest), length))
            return status, bytes(content)
        _receiveAll(sock, rest)
        if headers.get("transfer-encoding", "").lower() == "chunked":
            return status, _dechunk(bytes(rest))
        return status, bytes(rest)
    finally:
        sock.close()


def getJSON(socketPath: str, target: str, timeout: float = DEFAULT_TIMEOUT) -> tuple[int, Any]:
    status, content = request(socketPath, "GET", target, timeout=timeout)
    return status, json.loads(content) if content else None


def postJSON(
    socketPath: str, target: str, body: Any, timeout: float = DEFAULT_TIMEOUT
) -> tuple[int, Any]:
    status, content = request(socketPath, "POST", target, body, timeout=timeout)
    return status, json.loads(content) if content else None


async def requestAsync(
    socketPath: str, method: str, target: str, timeout: float = DEFAULT_TIMEOUT
) -> int:
    """
    Send one request on a new asyncio connection and return the status. The
    body is read and dropped.
    """

    async def exchange() -> int:
        reader, writer = await asyncio.open_unix_connection(socketPath)
        try:
            writer.write(_requestBytes(method, target, None))
            head = await reader.readuntil(b"\r\n\r\n")
            status, headers = _parseHead(head[:-4])
            if "content-length" in headers:
                await reader.readexactly(int(headers["content-length"]))
            else:
                await reader.read()
            return status
        finally:
            writer.close()

    return await asyncio.wait_for(exchange(), timeout)
