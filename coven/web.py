"""HTTP plumbing under the routes: body and URL limits, bad-request envelopes, peer checks."""

from __future__ import annotations

import io
import os
import socket
import struct
from typing import Any

from twisted.internet import defer
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from coven.api import MAX_BODY_BYTES, jsonBytes
from coven.errors import CovenError, InvalidRequest
from coven.store import addWaiter

log = Logger()


def _rawResponse(status: bytes, error: CovenError) -> bytes:
    """
    Build a complete HTTP response carrying C{error}'s envelope, for responses
    sent before a request object exists or while its body is still arriving.
    """
    body = jsonBytes(error.envelope())
    return (
        b"HTTP/1.1 " + status + b"\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode("ascii") + b"\r\n"
        b"Connection: close\r\n\r\n" + body
    )


class CovenRequest(Request):
    """
    A request that stops taking its body once it passes L{MAX_BODY_BYTES}: it
    responds 400 at once and closes the connection instead of reading the rest.
    """

    _bodyBytes = 0
    _rejected = False

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > MAX_BODY_BYTES:
            self._rejectBody()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._rejected:
            return
        self._bodyBytes += len(data)
        if self._bodyBytes > MAX_BODY_BYTES:
            self._rejectBody()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._rejected:
            return
        site = self.channel.site
        site.requestStarted(self)
        self.notifyFinish().addBoth(lambda _: site.requestEnded(self))
        super().requestReceived(command, path, version)

    def _rejectBody(self) -> None:
        self._rejected = True
        self.content = io.BytesIO()
        error = InvalidRequest(
            f"Request body is larger than {MAX_BODY_BYTES} bytes.", maxBytes=MAX_BODY_BYTES
        )
        transport = self.channel.transport
        transport.write(_rawResponse(b"400 Bad Request", error))
        transport.loseConnection()


class CovenChannel(HTTPChannel):
    """
    An HTTP/1.1 connection that serves only the daemon's own user and rejects
    malformed requests (request lines or headers over Twisted's limits, bad
    framing) with the error envelope.
    """

    def connectionMade(self) -> None:
        peerUid = _peerUid(self.transport)
        if peerUid is not None and peerUid != os.getuid():
            log.warn(
                "Closed a connection from uid {peerUid}; only uid {uid} may use this daemon",
                peerUid=peerUid,
                uid=os.getuid(),
            )
            self.transport.abortConnection()
            return
        self.site.channels.add(self)
        self.site.noteActivity()
        super().connectionMade()

    # Fired by connectionLost; set by CovenSite.closeConnections.
    notifyClosed: defer.Deferred[None] | None = None

    def connectionLost(self, reason: Any) -> None:
        self.site.channels.discard(self)
        self.site.noteActivity()
        super().connectionLost(reason)
        if self.notifyClosed is not None:
            closed, self.notifyClosed = self.notifyClosed, None
            closed.callback(None)

    def lineLengthExceeded(self, line: bytes) -> None:
        # A request line or header line over MAX_LENGTH (16 KiB); LineReceiver
        # would close the connection without a response.
        self._respondToBadRequestAndDisconnect()

    def _send100Continue(self) -> None:
        # A body rejected by its declared length already has its 400 response,
        # and a "100 Continue" after it would start a second one.
        if not self.transport.disconnecting:
            super()._send100Continue()

    def _respondToBadRequestAndDisconnect(self) -> None:
        error = InvalidRequest(
            "Malformed HTTP request: the request line or headers are invalid or too large."
        )
        self.transport.write(_rawResponse(b"400 Bad Request", error))
        self.loseConnection()


def _peerUid(transport: Any) -> int | None:
    """
    Return the uid of the process at the other end of a Unix socket, or C{None}
    for other transports.
    """
    try:
        handle = transport.getHandle()
    except AttributeError:
        return None
    if not isinstance(handle, socket.socket) or handle.family != socket.AF_UNIX:
        return None
    credentials = handle.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", credentials)
    return uid


class CovenSite(Site):
    """
    The HTTP site, without an access log: request lines carry session ids at a
    rate that would drown the daemon's own log.
    """

    protocol = CovenChannel
    requestFactory = CovenRequest
    displayTracebacks = False

    def __init__(self, resource: Resource, **kwargs: Any) -> None:
        # Bodies are JSON. Twisted's own form parsing would reject a malformed
        # multipart body with a generic 400 before the Content-Type check runs.
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(resource, **kwargs)
        self.channels: set[CovenChannel] = set()
        self.activeRequests: set[Request] = set()
        self._idleWaiters: list[defer.Deferred[None]] = []
        # The reactor time of the last connection or request start or end.
        self.lastActivity = 0.0

    def log(self, request: Request) -> None:
        pass

    def noteActivity(self) -> None:
        self.lastActivity = self.reactor.seconds()

    def requestStarted(self, request: Request) -> None:
        self.activeRequests.add(request)
        self.noteActivity()

    def requestEnded(self, request: Request) -> None:
        self.activeRequests.discard(request)
        self.noteActivity()
        if not self.activeRequests:
            waiters, self._idleWaiters = self._idleWaiters, []
            for waiter in waiters:
                waiter.callback(None)

    async def whenQuiet(self, quiet: float, limit: float) -> None:
        """
        Return once, for C{quiet} seconds, no connection has been open and no
        request has started or ended, or after C{limit} seconds at the latest.
        """
        deadline = self.reactor.seconds() + limit
        while True:
            now = self.reactor.seconds()
            if now >= deadline:
                return
            idleFor = now - self.lastActivity
            if not self.channels and idleFor >= quiet:
                return
            wait = quiet - idleFor if not self.channels else quiet
            await deferLater(self.reactor, max(0.0, min(wait, deadline - now)), lambda: None)

    def whenIdle(self) -> defer.Deferred[None]:
        """
        Return a Deferred that fires once no request is being handled.
        Cancelling it stops only the wait.
        """
        if not self.activeRequests:
            return defer.succeed(None)
        return addWaiter(self._idleWaiters)

    def closeConnections(self) -> defer.Deferred[None]:
        """
        Close every open connection once what was written to it is sent, and
        return a Deferred that fires when all are closed.
        """
        closed = []
        for channel in list(self.channels):
            lost: defer.Deferred[None] = defer.Deferred()
            channel.notifyClosed = lost
            closed.append(lost)
            channel.loseConnection()
        return defer.DeferredList(closed).addCallback(lambda _: None)
