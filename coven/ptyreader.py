"""Read every harness PTY in one background thread and hand the output to the reactor thread."""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import select
import threading
from typing import Any

from twisted.internet import error
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

# Maximum bytes the thread reads from one PTY before it turns to the others. A
# PTY master returns at most about 4 KiB per read call, so this is many reads.
MAX_READ_BYTES = 256 * 1024
# Output read but not yet taken by the reactor thread, per PTY. Above this the
# thread stops reading that PTY until the reactor thread catches up, so a busy
# reactor makes the harness wait instead of filling memory.
MAX_PENDING_BYTES = 1024 * 1024
# The same limit for all PTYs together. Above it, each PTY the thread reads waits
# until the reactor thread has taken that PTY's output.
MAX_TOTAL_PENDING_BYTES = 16 * 1024 * 1024
# Seconds stop() waits for the thread to end.
STOP_TIMEOUT = 5.0
# setvbuf's mode for a stream without a buffer of its own.
_IONBF = 2


class _Stdio:
    """
    The C library's stream functions that read a PTY, called through ctypes.

    ctypes releases the GIL for each call. An unbuffered C{fread} calls
    C{read} until it has the requested size or the PTY is empty or closed.
    A 20 MB burst then took 96 calls, 213 KiB each on average, instead of
    some 4,500 calls of C{os.read}. After each of those the thread had to
    take the GIL again, often from the reactor or database thread. Through
    the daemon, 12 paired rounds of 20 MB gave 81.4 MB/s against 72.0 with
    C{os.read}.
    """

    def __init__(self, library: ctypes.CDLL) -> None:
        pointer, size, integer = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
        self.fdopen = library.fdopen
        self.fdopen.argtypes, self.fdopen.restype = [integer, ctypes.c_char_p], pointer
        self.setvbuf = library.setvbuf
        self.setvbuf.argtypes, self.setvbuf.restype = [pointer, pointer, integer, size], integer
        self.fread = library.fread
        self.fread.argtypes, self.fread.restype = [pointer, size, size, pointer], size
        self.feof = library.feof
        self.ferror = library.ferror
        self.clearerr = library.clearerr
        self.fclose = library.fclose
        for function in (self.feof, self.ferror, self.clearerr, self.fclose):
            function.argtypes, function.restype = [pointer], integer

    def open(self, fd: int) -> int | None:
        """
        Return an unbuffered stream that owns C{fd}, or C{None} when the C
        library cannot make one. C{fd} then stays the caller's.
        """
        stream = self.fdopen(fd, b"rb")
        if not stream:
            return None
        if self.setvbuf(stream, None, _IONBF, 0) != 0:
            # The stream is left open, a small leak, because closing it would
            # close fd, which stays the caller's.
            return None
        return int(stream)

    def read(self, stream: int, buffer: Any) -> tuple[bytes, Failure | None]:
        """
        Read until C{buffer} is full or the PTY is empty or closed.

        @return: the bytes read, and the reason the PTY closed if it did.
        """
        count = self.fread(buffer, 1, len(buffer), stream)
        ended = None
        if count < len(buffer):
            if self.feof(stream):
                ended = Failure(error.ConnectionDone())
            elif self.ferror(stream) and ctypes.get_errno() not in (errno.EAGAIN, errno.EINTR):
                # A master whose harness side is closed reports EIO.
                ended = Failure(error.ConnectionLost())
            self.clearerr(stream)
        return ctypes.string_at(buffer, count), ended


@functools.cache
def _loadStdio() -> _Stdio | None:
    """
    Return the C library's stream functions, or C{None} where they cannot be
    loaded. The thread then reads with C{os.read}.
    """
    try:
        return _Stdio(ctypes.CDLL(None, use_errno=True))
    except (OSError, AttributeError):
        return None


class _Source:
    """
    One attached PTY. C{fd} is the thread's own duplicate of the master, so the
    thread never reads a descriptor number the transport has closed and reused.

    Fields marked "lock" are shared and guarded by the lock of L{PTYReader}.
    Fields marked "thread" are used by the reader thread only, and those marked
    "reactor" by the reactor thread only.
    """

    def __init__(self, fd: int, transport: Any) -> None:
        self.fd = fd
        self.transport = transport
        self.pending: list[bytes] = []  # lock
        self.pendingBytes = 0  # lock
        self.ended: Failure | None = None  # lock: the reason the PTY closed
        self.full = False  # lock: over a pending limit, not read
        self.ready = False  # lock: in the list of sources to deliver
        self.paused = False  # set by the reactor thread, read by both
        self.registered = False  # thread
        self.closed = False  # thread: fd closed
        self.stream: int | None = None  # thread: the C stream that owns fd, if any
        self.detached = False  # reactor: the transport has lost its connection


class PTYReader:
    """
    Read attached PTY masters in a background thread.

    A PTY master returns at most about 4 KiB per read, and a read that finds it
    empty waits in the kernel for the PTY to refill it. In the reactor thread
    that wait and the work on what was read (terminal queries, redaction,
    queueing for the store) take turns; here they overlap. Everything but the
    C{read} calls stays in the reactor thread: the protocol gets
    C{childDataReceived} and C{connectionLost} there, in the order the bytes
    were read.

    The thread starts with the first attached PTY.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._lock = threading.Lock()
        self._requests: list[tuple[str, _Source | None]] = []  # (kind, source)
        self._ready: list[_Source] = []
        self._deliveryScheduled = False
        self._pendingBytes = 0  # lock: of all sources
        self._thread: threading.Thread | None = None
        self._epoll: Any = None
        self._wake = -1
        self._sources: dict[int, _Source] = {}
        self._stdio = _loadStdio()
        self._buffer: Any = None

    # Reactor thread

    def attach(self, transport: Any) -> PTYReadHandle:
        """
        Take over reading the master of C{transport}, a Twisted PTY process
        transport that has not read anything yet.

        @return: the producer that pauses and resumes reading this PTY.
        """
        if self._thread is None:
            self._start()
        fd = os.dup(transport.fd)
        os.set_inheritable(fd, False)
        # Reads must return at an empty PTY instead of waiting. Twisted sets
        # this on the master too.
        os.set_blocking(fd, False)
        source = _Source(fd, transport)
        handle = PTYReadHandle(self, source)

        # NOTE: these replace methods of Twisted's PTYProcess instance. The
        # reactor must not read the master too, and the thread's duplicate of
        # the master is closed when the transport closes its own.
        transport.stopReading()
        transport.startReading = lambda: None
        connectionLost = transport.connectionLost

        def closeAndLoseConnection(reason: Failure) -> None:
            source.detached = True
            self._request("close", source)
            connectionLost(reason)

        transport.connectionLost = closeAndLoseConnection
        self._request("add", source)
        return handle

    def stop(self) -> None:
        """
        End the thread and close what it still holds. Blocks until the thread
        has ended, at most L{STOP_TIMEOUT} seconds.
        """
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._request("stop", None)
        thread.join(STOP_TIMEOUT)
        if thread.is_alive():
            log.error(
                "Stopping the PTY reader thread timed out after {timeout} s. Its copies of"
                " the PTY masters stay open until the daemon exits.",
                timeout=STOP_TIMEOUT,
            )
            return
        os.close(self._wake)

    def _start(self) -> None:
        if self._stdio is not None:
            self._buffer = ctypes.create_string_buffer(MAX_READ_BYTES)
        self._epoll = select.epoll()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake, select.EPOLLIN)
        self._thread = threading.Thread(target=self._run, name="coven-pty-reader", daemon=True)
        self._thread.start()

    def _request(self, kind: str, source: _Source | None) -> None:
        with self._lock:
            self._requests.append((kind, source))
        os.eventfd_write(self._wake, 1)

    def _deliverReady(self) -> None:
        with self._lock:
            ready, self._ready = self._ready, []
            self._deliveryScheduled = False
            for source in ready:
                source.ready = False
            deliveries = [(source, *self._take(source)) for source in ready]
        for source, data, ended, refill in deliveries:
            if refill:
                self._request("refill", source)
            # One protocol's error must not cost the other PTYs their output.
            try:
                self._deliver(source, data, ended)
            except Exception:
                log.failure(
                    "Handling {size} bytes read from PTY {fd} failed",
                    size=len(data),
                    fd=source.transport.fd,
                )

    def deliverPending(self, source: _Source) -> None:
        """
        Hand C{source}'s output read so far to its protocol now. The end of
        the PTY, if read, is left for the next regular delivery, so a caller
        that records something after this call records it before the session
        can end.
        """
        with self._lock:
            data, ended, refill = self._take(source, keepEnd=True)
        if refill:
            self._request("refill", source)
        self._deliver(source, data, None)

    def _take(self, source: _Source, keepEnd: bool = False) -> tuple[bytes, Failure | None, bool]:
        # Called with the lock held.
        data = b"".join(source.pending)
        source.pending = []
        self._pendingBytes -= source.pendingBytes
        source.pendingBytes = 0
        ended = None
        if not keepEnd:
            ended, source.ended = source.ended, None
        refill, source.full = source.full, False
        return data, ended, refill

    def _deliver(self, source: _Source, data: bytes, ended: Failure | None) -> None:
        if source.detached:
            return
        transport = source.transport
        if data:
            transport.proto.childDataReceived(1, data)
        if ended is not None and not (transport.disconnected or transport.disconnecting):
            transport.connectionLost(ended)

    # Reader thread

    def _run(self) -> None:
        while True:
            for fd, _ in self._epoll.poll():
                if fd == self._wake:
                    try:
                        os.eventfd_read(self._wake)
                    except BlockingIOError:
                        pass
                    try:
                        if self._handleRequests():
                            return
                    except Exception:
                        self._logFailure("Handling a request of the PTY reader thread failed")
                    continue
                source = self._sources.get(fd)
                if source is not None:
                    try:
                        self._read(source)
                    except Exception:
                        self._logFailure(f"Reading PTY {source.transport.fd} failed; it is treated as closed")
                        self._end(source, Failure(error.ConnectionLost()))

    def _logFailure(self, message: str) -> None:
        failure = Failure()
        self._reactor.callFromThread(log.failure, "{message}", failure, message=message)

    def _handleRequests(self) -> bool:
        with self._lock:
            requests, self._requests = self._requests, []
        stop = False
        for kind, source in requests:
            if kind == "stop":
                stop = True
                continue
            assert source is not None
            if kind == "add":
                self._sources[source.fd] = source
                if self._stdio is not None:
                    source.stream = self._stdio.open(source.fd)
                self._register(source)
            elif kind == "pause":
                self._unregister(source)
            elif kind in ("resume", "refill"):
                with self._lock:
                    readable = not source.full and not source.paused
                if readable:
                    self._register(source)
            elif kind == "close":
                self._close(source)
        if stop:
            for source in list(self._sources.values()):
                self._close(source)
            self._epoll.close()
        return stop

    def _register(self, source: _Source) -> None:
        if not source.closed and not source.registered:
            self._epoll.register(source.fd, select.EPOLLIN)
            source.registered = True

    def _unregister(self, source: _Source) -> None:
        # The fd is unregistered, not modified to no events, because epoll still
        # reports a hung-up PTY, so a paused PTY would wake the thread for ever.
        if source.registered:
            self._epoll.unregister(source.fd)
            source.registered = False

    def _close(self, source: _Source) -> None:
        if source.closed:
            return
        self._unregister(source)
        source.closed = True
        del self._sources[source.fd]
        if source.stream is not None and self._stdio is not None:
            self._stdio.fclose(source.stream)
            source.stream = None
        else:
            os.close(source.fd)

    def _read(self, source: _Source) -> None:
        if source.stream is not None and self._stdio is not None:
            data, ended = self._stdio.read(source.stream, self._buffer)
            chunks = [data] if data else []
            total = len(data)
        else:
            chunks, total, ended = self._readWithOS(source)
        self._queue(source, chunks, total)
        if ended is not None:
            self._end(source, ended)

    def _readWithOS(self, source: _Source) -> tuple[list[bytes], int, Failure | None]:
        """
        Read C{source} with C{os.read} until the PTY is empty or closed, or
        L{MAX_READ_BYTES} are in.

        @return: the chunks read, their total size, and the reason the PTY
            closed if it did.
        """
        chunks: list[bytes] = []
        total = 0
        ended = None
        while total < MAX_READ_BYTES:
            try:
                data = os.read(source.fd, MAX_READ_BYTES)
            except OSError as readError:
                if readError.errno not in (errno.EAGAIN, errno.EINTR):
                    # A master whose harness side is closed reports EIO.
                    ended = Failure(error.ConnectionLost())
                break
            if not data:
                ended = Failure(error.ConnectionDone())
                break
            chunks.append(data)
            total += len(data)
        return chunks, total, ended

    def _end(self, source: _Source, reason: Failure) -> None:
        self._close(source)
        with self._lock:
            source.ended = reason
        self._queue(source, [], 0)

    def _queue(self, source: _Source, chunks: list[bytes], size: int) -> None:
        schedule = False
        with self._lock:
            if chunks:
                source.pending.extend(chunks)
                source.pendingBytes += size
                self._pendingBytes += size
                if (
                    source.pendingBytes >= MAX_PENDING_BYTES
                    or self._pendingBytes >= MAX_TOTAL_PENDING_BYTES
                ):
                    source.full = True
            if (chunks or source.ended is not None) and not source.ready:
                source.ready = True
                self._ready.append(source)
            if self._ready and not self._deliveryScheduled:
                self._deliveryScheduled = True
                schedule = True
            full = source.full
        if full:
            self._unregister(source)
        if schedule:
            self._reactor.callFromThread(self._deliverReady)


class PTYReadHandle:
    """
    The producer of one attached PTY. Pausing it stops the thread reading that
    PTY, so a harness that writes more blocks in its write.
    """

    def __init__(self, reader: PTYReader, source: _Source) -> None:
        self._reader = reader
        self._source = source

    def pauseProducing(self) -> None:
        self._source.paused = True
        self._reader._request("pause", self._source)

    def resumeProducing(self) -> None:
        self._source.paused = False
        self._reader._request("resume", self._source)

    def stopProducing(self) -> None:
        self._source.transport.loseConnection()

    def deliverPending(self) -> None:
        """
        Hand the output read so far to the protocol now; see
        L{PTYReader.deliverPending}.
        """
        self._reader.deliverPending(self._source)
