"""Faults the daemon must survive: its own crash, a full store, many clients, stubborn harnesses."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import time

import pytest
import pytest_twisted
from twisted.internet import defer, threads

from coven.ptyreader import MAX_PENDING_BYTES

from .conftest import startDaemon
from .fake_harness import pattern
from .support import (
    UnixClient,
    outputBytes,
    outputText,
    payload,
    pollUntil,
    processExists,
    requestBlocking,
    sessionProcesses,
    waitUntil,
)
from .test_twistd import TWISTD, launch, writeHarnesses


def startTwistd(home: str, covenHome: str, logPath: str) -> subprocess.Popen:
    process = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "--logfile", logPath, "coven", "--home", covenHome],
        cwd=home,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    daemonFile = os.path.join(covenHome, "daemon.json")

    def listening() -> bool:
        if process.poll() is not None:
            return True
        try:
            with open(daemonFile) as file:
                return json.load(file)["pid"] == process.pid
        except (OSError, ValueError, KeyError):
            return False

    waitUntil(listening, timeout=30)
    assert process.poll() is None, open(logPath).read()
    return process


def stopTwistd(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def test_sigkill_during_burst_recovers(home):
    covenHome = os.path.join(home, "coven")
    writeHarnesses(covenHome)
    project = os.path.join(home, "project")
    os.makedirs(project)
    socketPath = os.path.join(covenHome, "coven.sock")
    database = os.path.join(covenHome, "coven.sqlite3")

    process = startTwistd(home, covenHome, os.path.join(home, "first.log"))
    try:
        session = launch(socketPath, project, f"burst {50 * 1024 * 1024}")

        def someOutputStored() -> bool:
            # A full first page (about 4 MiB) means a good part of the burst
            # is stored and more is on its way.
            status, page = requestBlocking(socketPath, "GET", f"/api/v1/events?sessionId={session['id']}")
            return page["hasMore"] or len(page["events"]) >= 20

        waitUntil(someOutputStored, timeout=60)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        stopTwistd(process)

    # What the crashed daemon committed, read before any daemon opens the file.
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        committed = connection.execute(
            "SELECT seq, id FROM events WHERE session_id = ? ORDER BY seq", (session["id"],)
        ).fetchall()
        highest = connection.execute("SELECT MAX(seq) FROM events").fetchone()[0]
    assert committed

    restarted = startTwistd(home, covenHome, os.path.join(home, "second.log"))
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
            integrity = connection.execute("PRAGMA integrity_check").fetchone()[0]
        status, record = requestBlocking(socketPath, "GET", f"/api/v1/sessions/{session['id']}")
        events = []
        cursor = 0
        while True:
            status, page = requestBlocking(
                socketPath, "GET", f"/api/v1/events?sessionId={session['id']}&afterSeq={cursor}"
            )
            events.extend(page["events"])
            if not page["hasMore"]:
                break
            cursor = page["nextCursor"]["afterSeq"]
        after = launch(socketPath, project, "print after")
        waitUntil(lambda: requestBlocking(socketPath, "GET", f"/api/v1/sessions/{after['id']}")[1]["status"] == "completed")
        status, afterPage = requestBlocking(socketPath, "GET", f"/api/v1/events?sessionId={after['id']}")
    finally:
        stopTwistd(restarted)

    assert integrity == "ok"
    assert record["status"] == "orphaned"
    assert events[-1]["kind"] == "orphaned"
    assert [(event["seq"], event["id"]) for event in events[: len(committed)]] == committed
    assert events[-1]["seq"] > highest
    assert min(event["seq"] for event in afterPage["events"]) > events[-1]["seq"]
    # The burst harness lost its PTY with the daemon; nothing of it is left.
    assert sessionProcesses(session["id"]) == []


@pytest_twisted.ensureDeferred
async def test_sigterm_ignored_sigkill_in_time(daemon):
    client = daemon.client
    pidFile = os.path.join(daemon.home, "pids")
    session = await client.launch(daemon.project, f"grandchild {pidFile}")
    await client.waitForOutput(session["id"], "ready")
    with open(pidFile) as file:
        pids = [int(value) for value in file.read().split()]
    grace = daemon.service.sessions.killGrace

    started = time.monotonic()
    await client.post(f"/api/v1/sessions/{session['id']}/kill")
    await pollUntil(lambda: not any(processExists(pid) for pid in pids), timeout=grace + 5)
    elapsed = time.monotonic() - started
    events = await client.waitForExit(session["id"])

    # The child ignores SIGTERM, so only the SIGKILL after the grace period ends it.
    assert elapsed <= grace + 1
    assert elapsed >= grace * 0.9
    assert payload(events[-1])["status"] == "killed"
    status, record = await client.get(f"/api/v1/sessions/{session['id']}")
    assert record["status"] == "killed"


@pytest_twisted.ensureDeferred
async def test_store_full_holds_output(daemon):
    client = daemon.client
    store = daemon.service.store
    store.highWater = 64 * 1024
    store.lowWater = 16 * 1024
    # More than the PTY reader thread holds for one PTY (MAX_PENDING_BYTES) and
    # the store's queue together, so the harness must block. With 1 MiB, a
    # reactor slowed by a busy machine let the reader take all of it, and the
    # harness exited.
    size = 4 * MAX_PENDING_BYTES
    session = await client.launch(daemon.project, f"wait-burst {size}")
    await client.waitForOutput(session["id"], "ready")
    pid = daemon.service.sessions.liveSession(session["id"]).pid

    def pageCount(cursor):
        return cursor.execute("PRAGMA page_count").fetchone()[0]

    # The database may not grow from here on, as on a full disk.
    pages = await store._writer.runInteraction(pageCount)
    await store._writer.runInteraction(lambda cursor: cursor.execute(f"PRAGMA max_page_count = {pages}"))
    try:
        await client.post(f"/api/v1/sessions/{session['id']}/input", {"data": "go\n"})
        await pollUntil(lambda: store.producersPaused and not store.writable, timeout=20)

        health, _ = await client.get("/api/v1/health")
        listed, sessions = await client.get("/api/v1/sessions")
        page = await client.events(session["id"])
        launchStatus, refused = await client.post(
            "/api/v1/sessions", {"projectRoot": daemon.project, "harness": "fake", "prompt": "print x"}
        )
        harnessAlive = processExists(pid)
    finally:
        await store._writer.runInteraction(
            lambda cursor: cursor.execute("PRAGMA max_page_count = 1073741823")
        )

    assert health == 200
    assert listed == 200
    assert session["id"] in [record["id"] for record in sessions]
    assert "ready" in outputText(page["events"])
    assert launchStatus == 503
    assert refused["error"]["code"] == "runtime_unavailable"
    # The harness is blocked on a paused PTY, not finished and not dropped.
    assert harnessAlive
    events = await client.waitForExit(session["id"], timeout=60)
    assert outputBytes(events) == b"ready\n" + pattern(size)
    assert store.writable
    assert store.writeFailures > 0


@pytest_twisted.ensureDeferred
async def test_idle_connections_health_fast(daemon):
    idle: list[socket.socket] = []

    def connectAll() -> None:
        # A blocking connect waits while the listen backlog is full, so it runs
        # in a thread while the reactor accepts.
        for _ in range(200):
            connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            connection.connect(daemon.service.socketPath)
            idle.append(connection)

    try:
        await threads.deferToThread(connectAll)

        timings = []
        for _ in range(10):
            started = time.monotonic()
            status, body = await daemon.client.get("/api/v1/health")
            timings.append(time.monotonic() - started)
            assert status == 200
    finally:
        for connection in idle:
            connection.close()

    timings.sort()
    assert timings[len(timings) // 2] < 0.1


@pytest_twisted.ensureDeferred
async def test_fifty_concurrent_launches(daemon):
    client = daemon.client

    launches = [client.launch(daemon.project, f"print session {index}") for index in range(50)]
    sessions = await defer.gatherResults([defer.ensureDeferred(launch) for launch in launches])
    histories = await defer.gatherResults(
        [defer.ensureDeferred(client.waitForExit(session["id"], timeout=60)) for session in sessions]
    )

    assert len({session["id"] for session in sessions}) == 50
    for index, events in enumerate(histories):
        assert outputText(events) == f"session {index}\r\n"
        assert payload(events[-1])["status"] == "completed"
    seqs = [event["seq"] for events in histories for event in events]
    assert len(seqs) == len(set(seqs))


def test_invalid_harness_file_reported(home):
    covenHome = os.path.join(home, "coven")
    os.makedirs(covenHome, mode=0o700)
    harnessFile = os.path.join(covenHome, "harnesses.toml")
    with open(harnessFile, "w") as file:
        file.write('[harnesses.broken]\ncommand = ["x"\nlabel = 3\n')
    logPath = os.path.join(home, "coven.log")
    socketPath = os.path.join(covenHome, "coven.sock")

    process = startTwistd(home, covenHome, logPath)
    try:
        status, capabilities = requestBlocking(socketPath, "GET", "/api/v1/capabilities")
        refreshStatus, refreshed = requestBlocking(
            socketPath, "POST", "/api/v1/actions", {"action": "coven.capabilities.refresh"}
        )
    finally:
        stopTwistd(process)
    with open(logPath) as file:
        log = file.read()

    ids = {entry.get("harness") for entry in capabilities["capabilities"]}
    assert {"codex", "claude", "copilot"} <= ids
    assert harnessFile in capabilities["harnessConfigError"]
    assert refreshStatus == 200
    reported = refreshed["event"]["payload"]["harnessConfigError"]
    assert harnessFile in reported
    # The unclosed array is noticed where the next line starts.
    assert "line 3" in reported
    assert harnessFile in log
    assert "line 3" in log


def test_open_home_mode_changed_and_logged(home):
    covenHome = os.path.join(home, "coven")
    writeHarnesses(covenHome)
    os.chmod(covenHome, 0o755)
    logPath = os.path.join(home, "coven.log")
    process = startTwistd(home, covenHome, logPath)
    try:
        mode = os.stat(covenHome).st_mode & 0o777
    finally:
        stopTwistd(process)
    with open(logPath) as file:
        log = file.read()

    assert mode == 0o700
    assert f"Changed the mode of the home folder {covenHome} from 0755 to 0700" in log


def test_permissive_umask_keeps_modes(home):
    covenHome = os.path.join(home, "coven")
    writeHarnesses(covenHome)
    os.chmod(covenHome, 0o777)
    process = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "coven", "--home", covenHome],
        cwd=home,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=lambda: os.umask(0),
    )
    try:
        waitUntil(lambda: os.path.exists(os.path.join(covenHome, "daemon.json")) or process.poll() is not None)
        project = os.path.join(home, "project")
        os.makedirs(project)
        session = launch(os.path.join(covenHome, "coven.sock"), project, "print x")
        waitUntil(lambda: os.path.exists(os.path.join(covenHome, "coven.sqlite3-wal")))
        modes = {
            name: os.stat(os.path.join(covenHome, name)).st_mode & 0o777
            for name in os.listdir(covenHome)
            if name != "harnesses.toml"
        }
        homeMode = os.stat(covenHome).st_mode & 0o777
    finally:
        stopTwistd(process)

    assert session["status"] == "running"
    assert homeMode == 0o700
    assert modes["coven.sock"] == 0o600
    for name, mode in modes.items():
        assert mode & 0o077 == 0, f"{name} has mode {mode:o}"


@pytest.mark.skipif(os.getuid() != 0, reason="connecting as another uid needs root")
def test_other_uid_connection_closed(home):
    covenHome = os.path.join(home, "coven")
    writeHarnesses(covenHome)
    process = startTwistd(home, covenHome, os.path.join(home, "coven.log"))
    socketPath = os.path.join(covenHome, "coven.sock")
    try:
        # Loosen the modes, as a user might by mistake; the uid check still holds.
        os.chmod(home, 0o755)
        os.chmod(covenHome, 0o755)
        os.chmod(socketPath, 0o666)
        other = subprocess.run(
            [
                "python3",
                "-c",
                "import socket, sys\n"
                "s = socket.socket(socket.AF_UNIX)\n"
                "s.settimeout(10)\n"
                "s.connect(sys.argv[1])\n"
                "try:\n"
                "    s.sendall(b'GET /api/v1/health HTTP/1.1\\r\\nHost: coven\\r\\n\\r\\n')\n"
                "    received = s.recv(65536)\n"
                "except (ConnectionResetError, BrokenPipeError):\n"
                "    received = b''\n"
                "sys.stdout.write(repr(received))\n",
                socketPath,
            ],
            capture_output=True,
            text=True,
            timeout=30,
            user=65534,
            group=65534,
        )
        status, health = requestBlocking(socketPath, "GET", "/api/v1/health")
    finally:
        stopTwistd(process)

    assert other.returncode == 0, other.stderr
    assert other.stdout == "b''"
    assert status == 200
    with open(os.path.join(home, "coven.log")) as file:
        assert "from uid 65534" in file.read()


@pytest_twisted.ensureDeferred
async def test_many_sessions_burst_lossless(daemon):
    # A CI-sized version of the benchmark's 100 sessions printing 1 MB at once.
    client = daemon.client
    size = 256 * 1024
    count = 20

    sessions = await defer.gatherResults(
        [defer.ensureDeferred(client.launch(daemon.project, f"burst {size}")) for _ in range(count)]
    )
    await defer.gatherResults(
        [defer.ensureDeferred(client.waitForExit(session["id"], timeout=120)) for session in sessions]
    )
    recorded = [outputBytes(await client.allEvents(session["id"])) for session in sessions]

    expected = pattern(size)
    assert [len(output) for output in recorded] == [size] * count
    assert all(output == expected for output in recorded)


@pytest_twisted.ensureDeferred
async def test_twenty_megabyte_burst_lossless(daemon):
    # A CI-sized version of the benchmark's 20 MB burst, through a store whose
    # high-water mark is low enough to pause the PTY many times on the way.
    daemon.service.store.highWater = 256 * 1024
    daemon.service.store.lowWater = 64 * 1024
    size = 20 * 1024 * 1024
    session = await daemon.client.launch(daemon.project, f"burst {size}")

    await daemon.client.waitForExit(session["id"], timeout=120)
    events = await daemon.client.allEvents(session["id"])

    recorded = outputBytes(events)
    assert len(recorded) == size
    assert recorded == pattern(size)
    assert sum(1 for event in events if event["kind"] == "output") <= 2000
    assert daemon.service.store.pauseCount > 0
