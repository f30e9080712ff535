"""The PTY reader thread, on real PTYs with the fake harness and the real reactor."""

from __future__ import annotations

import fcntl
import os
import struct
import sys
import termios
import threading

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.error import ConnectionDone
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from coven import ptyreader
from coven.ptyreader import PTYReader

from .fake_harness import pattern
from .support import FAKE_HARNESS, pollUntil


class Collector(ProcessProtocol):
    """
    Record what a harness's PTY delivers, and on which thread.
    """

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.threads: set[str] = set()
        self.ended: defer.Deferred[object] = defer.Deferred()

    @property
    def received(self) -> bytes:
        return b"".join(self.pieces)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.pieces.append(data)
        self.threads.add(threading.current_thread().name)

    def processEnded(self, reason: object) -> None:
        self.ended.callback(reason)


def spawn(prompt: str) -> tuple[Collector, object]:
    collector = Collector()
    transport = reactor.spawnProcess(
        collector,
        sys.executable,
        [sys.executable, FAKE_HARNESS, prompt],
        env=dict(os.environ),
        usePTY=True,
    )
    return collector, transport


def descriptorsTo(target: str) -> int:
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == target:
                count += 1
        except OSError:
            pass
    return count


def unreadBytes(fd: int) -> int:
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]


@pytest.fixture
def reader():
    reader = PTYReader(reactor)
    yield reader
    reader.stop()


@pytest.mark.parametrize("stdio", [True, False], ids=["fread", "os_read"])
@pytest_twisted.ensureDeferred
async def test_burst_delivered_whole_on_reactor_thread(reader, monkeypatch, stdio):
    # Where the C library's streams cannot be loaded, the thread uses os.read.
    if not stdio:
        monkeypatch.setattr(reader, "_stdio", None)
    # A small limit makes the thread stop and restart reading many times.
    monkeypatch.setattr(ptyreader, "MAX_PENDING_BYTES", 16 * 1024)
    size = 1024 * 1024
    collector, transport = spawn(f"burst {size}")
    reader.attach(transport)

    await pollUntil(lambda: collector.ended.called, timeout=30)

    assert collector.received == pattern(size)
    assert collector.threads == {threading.current_thread().name}


@pytest.mark.skipif(not os.confstr("CS_GNU_LIBC_VERSION"), reason="needs glibc")
@pytest_twisted.ensureDeferred
async def test_glibc_reads_through_stream(reader):
    collector, transport = spawn("sleep")
    reader.attach(transport)
    await pollUntil(lambda: b"ready" in collector.received, timeout=30)

    streams = [source.stream for source in list(reader._sources.values())]

    assert len(streams) == 1
    assert streams[0] is not None
    transport.loseConnection()
    await pollUntil(lambda: collector.ended.called, timeout=30)


@pytest_twisted.ensureDeferred
async def test_total_limit_keeps_bursts_whole(reader, monkeypatch):
    # Over the limit for all PTYs together, each PTY waits for the reactor.
    monkeypatch.setattr(ptyreader, "MAX_TOTAL_PENDING_BYTES", 16 * 1024)
    sizes = [1024 * 1024, 768 * 1024]
    spawned = [spawn(f"burst {size}") for size in sizes]
    for _, transport in spawned:
        reader.attach(transport)

    await pollUntil(lambda: all(collector.ended.called for collector, _ in spawned), timeout=30)

    for (collector, _), size in zip(spawned, sizes):
        assert collector.received == pattern(size)
    assert reader._pendingBytes == 0


@pytest_twisted.ensureDeferred
async def test_paused_pty_not_read_until_resumed(reader):
    size = 512 * 1024
    collector, transport = spawn(f"burst {size}")
    handle = reader.attach(transport)
    handle.pauseProducing()

    # The harness fills the PTY's read buffer (4 KiB less a byte) and then
    # blocks in its write.
    await pollUntil(lambda: unreadBytes(transport.fd) >= 4000, timeout=30)
    assert collector.pieces == []
    assert not collector.ended.called

    handle.resumeProducing()
    await pollUntil(lambda: collector.ended.called, timeout=30)
    assert collector.received == pattern(size)


@pytest_twisted.ensureDeferred
async def test_lose_connection_closes_thread_copy(reader):
    ptys = descriptorsTo("/dev/ptmx")
    collector, transport = spawn("sleep")
    reader.attach(transport)
    await pollUntil(lambda: b"ready" in collector.received, timeout=30)
    assert descriptorsTo("/dev/ptmx") == ptys + 2

    # The harness gets SIGHUP only once every copy of the master is closed.
    transport.loseConnection()

    await pollUntil(lambda: collector.ended.called, timeout=30)
    await pollUntil(lambda: descriptorsTo("/dev/ptmx") == ptys, timeout=10)


@pytest_twisted.ensureDeferred
async def test_stop_ends_thread_and_closes_descriptors():
    epolls = descriptorsTo("anon_inode:[eventpoll]")
    eventfds = descriptorsTo("anon_inode:[eventfd]")
    reader = PTYReader(reactor)
    collector, transport = spawn("print hi")
    reader.attach(transport)
    await pollUntil(lambda: collector.ended.called, timeout=30)
    thread = reader._thread
    assert thread is not None and thread.is_alive()

    reader.stop()

    assert not thread.is_alive()
    assert b"hi" in collector.received
    assert descriptorsTo("anon_inode:[eventpoll]") == epolls
    assert descriptorsTo("anon_inode:[eventfd]") == eventfds


@pytest_twisted.ensureDeferred
async def test_read_failure_ends_pty_and_logs(reader, monkeypatch):
    logged: list[dict] = []
    globalLogPublisher.addObserver(logged.append)

    def failingRead(source: object) -> None:
        raise ValueError("broken read")

    monkeypatch.setattr(reader, "_read", failingRead)
    try:
        collector, transport = spawn("sleep")
        reader.attach(transport)
        # Closing the thread's copy and the transport's master hangs up the harness.
        await pollUntil(lambda: collector.ended.called, timeout=30)
    finally:
        globalLogPublisher.removeObserver(logged.append)

    failures = [event for event in logged if event.get("log_failure") is not None]
    assert len(failures) == 1
    assert failures[0]["log_failure"].check(ValueError)
    assert "treated as closed" in failures[0]["message"]



class FakeTransport:
    """
    The parts of a PTY transport that delivery uses.
    """

    def __init__(self, proto: ProcessProtocol, fd: int) -> None:
        self.proto = proto
        self.fd = fd
        self.disconnected = False
        self.disconnecting = False
        self.lostReasons: list[object] = []

    def connectionLost(self, reason: object) -> None:
        self.lostReasons.append(reason)


class FailingCollector(Collector):
    """
    A protocol whose output handling fails.
    """

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        raise ValueError("broken protocol")


def test_protocol_error_spares_other_ptys():
    reader = PTYReader(reactor)
    failing, working = FailingCollector(), Collector()
    sources = [ptyreader._Source(-1, FakeTransport(failing, 101)), ptyreader._Source(-1, FakeTransport(working, 102))]
    for source in sources:
        reader._queue(source, [b"out", b"put"], 6)
        source.ended = Failure(ConnectionDone())
    logged: list[dict] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        # One delivery hands over both PTYs' output, the failing one first.
        reader._deliverReady()
    finally:
        globalLogPublisher.removeObserver(logged.append)

    assert working.received == b"output"
    assert len(sources[1].transport.lostReasons) == 1
    failures = [event for event in logged if event.get("log_failure") is not None]
    assert len(failures) == 1
    assert failures[0]["log_failure"].check(ValueError)
    assert failures[0]["fd"] == 101
