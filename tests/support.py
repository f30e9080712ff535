"""Helpers for tests that talk to a real daemon over its Unix socket."""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import sqlite3
import sys
import time
from typing import Any, Awaitable, Callable

import treq
from twisted.internet import reactor
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.task import deferLater
from twisted.web.client import Agent
from zope.interface import implementer
from twisted.web.iweb import IAgentEndpointFactory

from coven.store import PAGE_SIZE

TESTS = os.path.dirname(os.path.abspath(__file__))
FAKE_HARNESS = os.path.join(TESTS, "fake_harness.py")


def damageDatabase(path: str) -> None:
    """
    Overwrite every page of the database at C{path} but the first, which
    has the header and the schema, as a disk that lost them would.
    """
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        (pages,) = connection.execute("PRAGMA page_count").fetchone()
    finally:
        connection.close()
    with open(path, "r+b") as file:
        file.seek(PAGE_SIZE)
        file.write(b"\xa5" * PAGE_SIZE * (pages - 1))


def harnessConfig() -> str:
    """
    Return a harnesses.toml that adds the C{fake} harness running fake_harness.py.
    """
    command = json.dumps([sys.executable, FAKE_HARNESS])
    return f'[harnesses.fake]\nlabel = "Fake harness"\ncommand = {command}\nprompt_args = ["{{prompt}}"]\n'


@implementer(IAgentEndpointFactory)
class _UnixEndpoints:
    def __init__(self, path: str) -> None:
        self.path = path

    def endpointForURI(self, uri: Any) -> UNIXClientEndpoint:
        return UNIXClientEndpoint(reactor, self.path)


class UnixClient:
    """
    A small JSON client for the daemon's socket, with a new connection per
    request like curl.
    """

    def __init__(self, socketPath: str) -> None:
        self.socketPath = socketPath
        self._http = treq.client.HTTPClient(
            Agent.usingEndpointFactory(reactor, _UnixEndpoints(socketPath))
        )

    async def request(
        self, method: str, path: str, body: Any = None, raw: bytes | None = None
    ) -> tuple[int, Any]:
        data = raw
        if data is None and body is not None:
            data = json.dumps(body).encode()
        headers = {b"Content-Type": [b"application/json"]} if data is not None else None
        response = await self._http.request(
            method, "http://coven" + path, data=data, headers=headers
        )
        content = await response.content()
        if response.headers.getRawHeaders(b"content-type") == [b"application/json"]:
            return response.code, json.loads(content)
        return response.code, content

    async def get(self, path: str) -> tuple[int, Any]:
        return await self.request("GET", path)

    async def post(self, path: str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
        return await self.request("POST", path, body, raw)

    async def launch(self, project: str, prompt: str, harness: str = "fake", **fields: Any) -> dict[str, Any]:
        status, body = await self.post(
            "/api/v1/sessions", {"projectRoot": project, "harness": harness, "prompt": prompt, **fields}
        )
        assert status == 201, body
        return body

    async def events(self, sessionId: str, afterSeq: int = 0, limit: int = 1000, waitMs: int = 0) -> dict[str, Any]:
        status, body = await self.get(
            f"/api/v1/events?sessionId={sessionId}&afterSeq={afterSeq}&limit={limit}&waitMs={waitMs}"
        )
        assert status == 200, body
        return body

    async def allEvents(self, sessionId: str) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        cursor = 0
        while True:
            page = await self.events(sessionId, cursor)
            events.extend(page["events"])
            if not page["hasMore"]:
                return events
            cursor = page["nextCursor"]["afterSeq"]

    async def waitForEvent(
        self, sessionId: str, match: Callable[[dict[str, Any]], bool], timeout: float = 15.0
    ) -> list[dict[str, Any]]:
        """
        Follow the session's events with long polls until one satisfies
        C{match}; return every event up to and including it.
        """
        deadline = time.monotonic() + timeout
        seen: list[dict[str, Any]] = []
        cursor = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no matching event within {timeout}s; saw {seen}")
            page = await self.events(sessionId, cursor, waitMs=int(min(remaining, 5) * 1000))
            for event in page["events"]:
                seen.append(event)
                if match(event):
                    return seen
            if page["nextCursor"]:
                cursor = page["nextCursor"]["afterSeq"]

    async def waitForExit(self, sessionId: str, timeout: float = 15.0) -> list[dict[str, Any]]:
        return await self.waitForEvent(sessionId, lambda event: event["kind"] == "exit", timeout)

    async def waitForOutput(self, sessionId: str, text: str, timeout: float = 15.0) -> list[dict[str, Any]]:
        collected: list[str] = []

        def match(event: dict[str, Any]) -> bool:
            if event["kind"] == "output":
                collected.append(payload(event)["data"])
            return text in "".join(collected)

        return await self.waitForEvent(sessionId, match, timeout)


def payload(event: dict[str, Any]) -> dict[str, Any]:
    return json.loads(event["payload_json"])


def outputBytes(events: list[dict[str, Any]]) -> bytes:
    """
    Return the exact output bytes of C{events}: C{raw} where present, else the
    UTF-8 text.
    """
    chunks = []
    for event in events:
        if event["kind"] != "output":
            continue
        body = payload(event)
        chunks.append(base64.b64decode(body["raw"]) if "raw" in body else body["data"].encode("utf-8"))
    return b"".join(chunks)


def outputText(events: list[dict[str, Any]]) -> str:
    return "".join(payload(event)["data"] for event in events if event["kind"] == "output")


async def pollUntil(
    check: Callable[[], Awaitable[bool] | bool], timeout: float = 10.0, interval: float = 0.02
) -> None:
    """
    Call C{check} until it returns true, failing after C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await deferLater(reactor, interval, lambda: None)


def sessionProcesses(sessionId: str) -> list[int]:
    """
    Return the live processes whose environment carries C{COVEN_SESSION_ID}.
    """
    return markedProcesses(f"COVEN_SESSION_ID={sessionId}")


def markedProcesses(variable: str) -> list[int]:
    """
    Return the live processes whose environment contains C{variable}, a
    C{NAME=value} entry.
    """
    marker = variable.encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as file:
                environ = file.read().split(b"\0")
        except OSError:
            continue
        if marker in environ and processExists(int(entry)):
            found.append(int(entry))
    return found


def processExists(pid: int) -> bool:
    """
    Return whether C{pid} is a process that has not exited (zombies count as
    exited).
    """
    try:
        with open(f"/proc/{pid}/stat") as file:
            state = file.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, socketPath: str, timeout: float) -> None:
        super().__init__("coven", timeout=timeout)
        self.socketPath = socketPath

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socketPath)


def requestBlocking(
    socketPath: str, method: str, path: str, body: Any = None, timeout: float = 10.0
) -> tuple[int, Any]:
    """
    Send one request without the reactor, for tests that drive a daemon in
    another process.
    """
    connection = _UnixHTTPConnection(socketPath, timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        connection.request(method, path, body=data, headers=headers)
        response = connection.getresponse()
        content = response.read()
        if response.getheader("Content-Type") == "application/json":
            return response.status, json.loads(content)
        return response.status, content
    finally:
        connection.close()


def waitUntil(check: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> None:
    """
    Block until C{check} returns true, failing after C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)
