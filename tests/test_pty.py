"""Reading a real PTY: how much one wake-up of the reactor takes."""

from __future__ import annotations

import os
import termios
from typing import Any

import pytest

from coven.pty import MAX_READ_BYTES, MIN_READ_BYTES, HarnessProtocol, drainPTY


class CountingStore:
    """
    The part of the store a HarnessProtocol uses before any output.
    """

    def __init__(self, producerCount: int) -> None:
        self.producerCount = producerCount


class Receiver:
    """
    A protocol that records what drainPTY delivers.
    """

    def __init__(self, readLimit: int) -> None:
        self.readLimit = readLimit
        self.pieces: list[bytes] = []

    def childDataReceived(self, fd: int, data: bytes) -> None:
        self.pieces.append(data)


class Transport:
    def __init__(self, fd: int, proto: Any) -> None:
        self.fd = fd
        self.proto = proto


@pytest.mark.parametrize(
    "live, expected",
    [(0, MAX_READ_BYTES), (1, MAX_READ_BYTES), (4, MAX_READ_BYTES // 4), (100, MIN_READ_BYTES)],
)
def test_read_limit_shared(live: int, expected: int) -> None:
    protocol = HarnessProtocol("s", CountingStore(live), reactor=None)  # type: ignore[arg-type]

    assert protocol.readLimit == expected


def test_drain_stops_at_limit() -> None:
    master, slave = os.openpty()
    try:
        attributes = termios.tcgetattr(slave)
        attributes[1] &= ~termios.OPOST
        termios.tcsetattr(slave, termios.TCSANOW, attributes)
        os.set_blocking(master, False)
        # A PTY takes about 20 KiB that nobody reads before a write blocks, and
        # less in one write, so 16 KiB go in pieces of 1 KiB.
        os.set_blocking(slave, False)
        written = bytes(range(32, 96)) * 256
        for start in range(0, len(written), 1024):
            os.write(slave, written[start : start + 1024])
        receiver = Receiver(readLimit=8 * 1024)
        transport = Transport(master, receiver)

        first = drainPTY(transport)
        second = drainPTY(transport)
        third = drainPTY(transport)
    finally:
        os.close(master)
        os.close(slave)

    # One read returns at most what the PTY buffers (about 4 KiB), so the first
    # wake-up ends after the read that reaches the limit.
    assert (first, second, third) == (None, None, None)
    assert 8 * 1024 <= len(receiver.pieces[0]) < len(written)
    assert b"".join(receiver.pieces) == written
    assert len(receiver.pieces) == 2
