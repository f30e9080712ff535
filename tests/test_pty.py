"""Reading a real PTY: how much one wake-up of the reactor takes."""

from __future__ import annotations

import os
import termios

import pytest

from coven import pty
from coven.pty import drainPTY


class Receiver:
    """
    A protocol that records what drainPTY delivers.
    """

    def __init__(self) -> None:
        self.pieces: list[bytes] = []

    def childDataReceived(self, fd: int, data: bytes) -> None:
        self.pieces.append(data)


class Transport:
    def __init__(self, fd: int, proto: Receiver) -> None:
        self.fd = fd
        self.proto = proto


def test_drain_stops_at_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pty, "MAX_READ_BYTES", 8 * 1024)
    master, slave = os.openpty()
    try:
        attributes = termios.tcgetattr(slave)
        attributes[1] &= ~termios.OPOST
        termios.tcsetattr(slave, termios.TCSANOW, attributes)
        os.set_blocking(master, False)
        # A PTY buffers about 20 KiB of unread output before a write blocks,
        # and less in one write, so 16 KiB go in pieces of 1 KiB.
        os.set_blocking(slave, False)
        written = bytes(range(32, 96)) * 256
        for start in range(0, len(written), 1024):
            os.write(slave, written[start : start + 1024])
        receiver = Receiver()
        transport = Transport(master, receiver)

        results = [drainPTY(transport) for _ in range(3)]
    finally:
        os.close(master)
        os.close(slave)

    # One read returns at most what the PTY buffers (about 4 KiB), so the first
    # wake-up ends after the read that reaches the limit.
    assert results == [None, None, None]
    assert 8 * 1024 <= len(receiver.pieces[0]) < len(written)
    assert b"".join(receiver.pieces) == written
    assert len(receiver.pieces) == 2
