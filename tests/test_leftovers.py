"""Tests for finding a session's processes through /proc, with real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest

from coven.home import processStopped
from coven.sessions import processStartTicks, sessionMembers, signalSession

# A process that waits on its stdin, which stays open until the test kills it.
WAITER = [sys.executable, "-c", "import sys; sys.stdin.read()"]


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        process.kill()
        process.wait()


def startMarked(processes: list[subprocess.Popen[bytes]], sessionId: str) -> subprocess.Popen[bytes]:
    """
    Start a process in a terminal session of its own, with the session's
    marker in its environment, as a harness's child that called setsid would.
    """
    environment = dict(os.environ, COVEN_SESSION_ID=sessionId)
    process = subprocess.Popen(WAITER, stdin=subprocess.PIPE, env=environment, start_new_session=True)
    processes.append(process)
    return process


def bootTicks() -> int:
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * os.sysconf("SC_CLK_TCK"))


def test_start_ticks_of_process() -> None:
    ticks = processStartTicks(os.getpid())

    assert ticks is not None
    assert 0 < ticks <= bootTicks()
    assert processStartTicks(2**22 + 1) is None


def test_members_started_before_harness_skipped(processes: list[subprocess.Popen[bytes]]) -> None:
    sessionId = str(uuid.uuid4())
    older = startMarked(processes, sessionId)
    olderTicks = processStartTicks(older.pid)
    assert olderTicks is not None
    # The harness must start at a later clock tick than the older process.
    deadline = time.monotonic() + 5
    while bootTicks() <= olderTicks:
        assert time.monotonic() < deadline, "the clock tick did not advance"
        time.sleep(0.001)
    harness = subprocess.Popen(WAITER, stdin=subprocess.PIPE, start_new_session=True)
    processes.append(harness)
    harnessTicks = processStartTicks(harness.pid)
    newer = startMarked(processes, sessionId)

    # Without a start time both marked processes count. With the harness's,
    # the one started before it cannot have been started from it.
    assert sorted(sessionMembers(harness.pid, sessionId)) == sorted([older.pid, newer.pid])
    assert sessionMembers(harness.pid, sessionId, harnessTicks) == [newer.pid]


def test_reused_harness_pid_not_signalled(processes: list[subprocess.Popen[bytes]]) -> None:
    # This process leads its own group and session, like a new process that
    # got the pid of a reaped harness.
    other = subprocess.Popen(WAITER, stdin=subprocess.PIPE, start_new_session=True)
    processes.append(other)
    otherTicks = processStartTicks(other.pid)
    assert otherTicks is not None

    reachedOther = signalSession(other.pid, str(uuid.uuid4()), signal.SIGTERM, otherTicks - 1)
    stillRunning = other.poll() is None
    reachedHarness = signalSession(other.pid, str(uuid.uuid4()), signal.SIGTERM, otherTicks)

    assert reachedOther is False
    assert stillRunning
    assert reachedHarness is True
    assert other.wait(10) == -signal.SIGTERM


def test_stopped_process_recognized(processes: list[subprocess.Popen[bytes]]) -> None:
    process = startMarked(processes, str(uuid.uuid4()))
    running = processStopped(process.pid)
    os.kill(process.pid, signal.SIGSTOP)
    # The kernel sets the state once the signal is delivered.
    deadline = time.monotonic() + 10
    while not processStopped(process.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    stopped = processStopped(process.pid)
    os.kill(process.pid, signal.SIGCONT)

    assert not running
    assert stopped

