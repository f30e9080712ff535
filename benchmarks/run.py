"""Benchmark the Coven daemon, and optionally a second daemon, side by side.

Starts our daemon (`twistd -n coven`) in a temporary home with benchmarks/ first
on its PATH, so the built-in `codex` harness runs benchmarks/codex. With
`--compare SOCKET` it also measures a daemon that is already running there,
such as the upstream Rust daemon, which must have benchmarks/ first on its PATH
too. Runs are paired (ours, theirs, ours, theirs, ...) for `--rounds N`, and the
summary gives the median of the per-round ratios. The raw PTY loop, the ceiling,
runs just before each of our bursts of the same size.

    .venv/bin/python benchmarks/run.py --quick
    .venv/bin/python benchmarks/run.py --compare /tmp/coven-ref/coven.sock --rounds 5

MB means 2**20 bytes throughout. Times are wall-clock, measured by this client
on the same machine, so client and daemon share its CPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import glob
import hashlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCHMARKS)
sys.path.insert(0, BENCHMARKS)

from client import getJSON, postJSON, request, requestAsync  # noqa: E402
from harness import patternChunks  # noqa: E402

MB = 1 << 20
FINISHED_STATUSES = {"completed", "failed", "killed", "orphaned"}
# Seconds between session status polls while waiting for an exit, where the
# daemon cannot wait for it (see Daemon.sessionWait). A poll costs our daemon
# about 0.4 ms of CPU, and the interval adds half of itself to a measured burst
# on average.
EXIT_POLL_INTERVAL = 0.005
# A long poll held at least this long (of the requested 400 ms) counts as supported.
LONG_POLL_PROBE_MS = 400
# The maximum waitMs of one request that waits for a session's end.
EXIT_WAIT_MS = 30000
LONG_POLL_MIN_SECONDS = 0.3


@dataclass(frozen=True)
class Sizes:
    """
    How much work one round does.
    """

    healthRequests: int
    concurrentSeconds: float
    concurrentClients: int
    launches: int
    burstsMB: tuple[int, ...]
    lines: int
    lineIntervalMs: int
    manySessions: int
    manySessionBytes: int


FULL = Sizes(2000, 3.0, 16, 50, (20, 100), 200, 20, 100, MB)
QUICK = Sizes(200, 1.0, 16, 10, (4, 16), 50, 20, 10, MB)


@dataclass
class Daemon:
    """
    A daemon under test.

    @ivar longPoll: whether GET /api/v1/events honours waitMs. Without it, the
        output latency test polls back to back.
    @ivar sessionWait: whether GET /api/v1/sessions/ID honours waitMs, which
        then waits for the session's end. Without it, waitExited polls the
        status every EXIT_POLL_INTERVAL seconds.
    """

    name: str
    socketPath: str
    pid: int
    process: subprocess.Popen[bytes] | None = None
    longPoll: bool = False
    sessionWait: bool = False
    notes: list[str] = field(default_factory=list)


# Helpers


def percentile(values: list[float], percent: float) -> float:
    """
    Return the nearest-rank percentile of C{values}.
    """
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(percent / 100 * len(ordered)))
    return ordered[rank - 1]


def log(message: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


def readStatusField(pid: int, name: str) -> int | None:
    """
    Return a kB field such as VmRSS or VmHWM of /proc/PID/status, in kB.
    """
    try:
        with open(f"/proc/{pid}/status") as file:
            for line in file:
                if line.startswith(name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rssMB(pid: int) -> float:
    value = readStatusField(pid, "VmRSS")
    return math.nan if value is None else value / 1024


def threadCPUSeconds(pid: int) -> dict[int, float] | None:
    """
    Return the CPU time each thread of process C{pid} has used, in seconds,
    by thread id, or C{None} when the process is gone.
    """
    seconds: dict[int, float] = {}
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/schedstat") as file:
                    seconds[int(task)] = int(file.read().split()[0]) / 1e9
            except (OSError, ValueError, IndexError):
                continue
    except OSError:
        return None
    return seconds


def cpuSeconds(pid: int) -> float | None:
    """
    Return the CPU time all threads of process C{pid} have used, in seconds.
    """
    seconds = threadCPUSeconds(pid)
    return None if seconds is None else sum(seconds.values())


def waitQuiet(pid: int | None, window: float = 0.2, timeout: float = 5.0) -> float:
    """
    Wait until process C{pid} has used less than 2 ms of CPU in the last
    C{window} seconds, at most C{timeout} seconds.

    Our daemon copies its WAL into the database about 0.25 s after writes
    pause. A raw PTY loop or a burst measured meanwhile would share the CPUs
    with that copy, so each one waits for the daemon to be idle first.

    @return: the seconds waited.
    """
    started = time.monotonic()
    if pid is None or cpuSeconds(pid) is None:
        return 0.0
    samples: list[tuple[float, float]] = []  # (time, CPU seconds)
    while time.monotonic() - started < timeout:
        used = cpuSeconds(pid)
        if used is None:
            break
        now = time.monotonic()
        samples.append((now, used))
        old = [sample for sample in samples if now - sample[0] >= window]
        if old:
            if used - old[-1][1] < 0.002:
                break
            samples = samples[len(old) - 1 :]
        time.sleep(0.02)
    return time.monotonic() - started


_expectedDigests: dict[int, str] = {}


def expectedDigest(size: int) -> str:
    if size not in _expectedDigests:
        digest = hashlib.sha256()
        for chunk in patternChunks(size):
            digest.update(chunk)
        _expectedDigests[size] = digest.hexdigest()
    return _expectedDigests[size]


def launch(daemon: Daemon, project: str, prompt: str) -> dict[str, Any]:
    status, body = postJSON(
        daemon.socketPath,
        "/api/v1/sessions",
        {"projectRoot": project, "harness": "codex", "prompt": prompt, "title": f"bench {prompt}"},
    )
    if status not in (200, 201):
        raise RuntimeError(f"{daemon.name}: launch of {prompt!r} failed with {status}: {body}")
    return body


def sessionStatus(daemon: Daemon, sessionId: str, waitMs: int = 0) -> str:
    wait = f"?waitMs={waitMs}" if waitMs else ""
    status, body = getJSON(daemon.socketPath, f"/api/v1/sessions/{sessionId}{wait}")
    if status != 200:
        raise RuntimeError(f"{daemon.name}: GET session {sessionId} returned {status}: {body}")
    return body["status"]


def waitExited(daemon: Daemon, sessionId: str, timeout: float) -> tuple[str, float]:
    """
    Wait until the session is recorded as finished: with requests that wait
    for its end where the daemon has them, else by polling its status. Return
    its status and the monotonic time it was first seen finished.
    """
    deadline = time.monotonic() + timeout
    while True:
        if daemon.sessionWait:
            waitMs = max(1, min(EXIT_WAIT_MS, int((deadline - time.monotonic()) * 1000)))
            status = sessionStatus(daemon, sessionId, waitMs)
        else:
            status = sessionStatus(daemon, sessionId)
        now = time.monotonic()
        if status in FINISHED_STATUSES:
            return status, now
        if now > deadline:
            raise TimeoutError(f"{daemon.name}: session {sessionId} still {status} after {timeout} s")
        if not daemon.sessionWait:
            time.sleep(EXIT_POLL_INTERVAL)


def waitAllExited(
    daemon: Daemon, ids: list[str], timeout: float
) -> tuple[collections.Counter[str], list[str]]:
    """
    Poll the session list until every session in C{ids} is recorded as
    finished or C{timeout} seconds pass. Return the final statuses and the ids
    still running.
    """
    remaining = set(ids)
    statuses: collections.Counter[str] = collections.Counter()
    deadline = time.monotonic() + timeout
    while remaining and time.monotonic() < deadline:
        status, sessions = getJSON(daemon.socketPath, "/api/v1/sessions")
        listed = {session["id"]: session["status"] for session in sessions} if status == 200 else {}
        for sessionId in list(remaining):
            state = listed.get(sessionId) or sessionStatus(daemon, sessionId)
            if state in FINISHED_STATUSES:
                remaining.discard(sessionId)
                statuses[state] += 1
        if remaining:
            time.sleep(0.1)
    return statuses, sorted(remaining)


def outputBytes(payload: dict[str, Any]) -> bytes:
    raw = payload.get("raw")
    if isinstance(raw, str):
        return base64.b64decode(raw)
    return payload.get("data", "").encode("utf-8")


@dataclass
class ReadBack:
    """
    One session's events, read back through /api/v1/events pages of 1,000.
    """

    seconds: float
    pages: int
    outputBytes: int
    outputEvents: int
    digest: str
    kinds: dict[str, int]
    reportedDroppedBytes: int
    lastSeq: int


def readBack(daemon: Daemon, sessionId: str, timeout: float = 600.0) -> ReadBack:
    started = time.monotonic()
    digest = hashlib.sha256()
    kinds: collections.Counter[str] = collections.Counter()
    cursor = 0
    pages = total = events = dropped = 0
    while True:
        status, page = getJSON(
            daemon.socketPath,
            f"/api/v1/events?sessionId={sessionId}&afterSeq={cursor}&limit=1000",
            timeout=timeout,
        )
        if status != 200:
            raise RuntimeError(f"{daemon.name}: events of {sessionId} returned {status}: {page}")
        pages += 1
        for event in page["events"]:
            kinds[event["kind"]] += 1
            payload = json.loads(event["payload_json"])
            if event["kind"] == "output":
                data = outputBytes(payload)
                digest.update(data)
                total += len(data)
                events += 1
            elif event["kind"] == "output_truncated":
                dropped += int(payload.get("droppedBytes", 0))
        if page["nextCursor"] is not None:
            cursor = page["nextCursor"]["afterSeq"]
        if not page["hasMore"] or not page["events"]:
            break
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{daemon.name}: reading back {sessionId} took over {timeout} s")
    return ReadBack(
        time.monotonic() - started, pages, total, events, digest.hexdigest(), dict(kinds), dropped, cursor
    )


# Daemons


def startOurDaemon(workdir: str, binDir: str, redaction: bool = True) -> Daemon:
    home = os.path.join(workdir, "home")
    if not redaction:
        os.makedirs(home, mode=0o700, exist_ok=True)
        with open(os.path.join(home, "coven.toml"), "w") as file:
            file.write("[redaction]\nenabled = false\n")
    env = dict(os.environ, PATH=binDir + os.pathsep + os.environ.get("PATH", os.defpath))
    return startTwistd("coven-py", ["coven", "--home", home], workdir, env, os.path.join(home, "coven.sock"))


def startTwistd(name: str, plugin: list[str], workdir: str, env: dict[str, str], socketPath: str) -> Daemon:
    """
    Start C{twistd -n} with the plugin and its options in C{plugin}, logging
    to C{workdir}/twistd.log, and wait until it answers a health request on
    C{socketPath}.
    """
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    logFile = open(os.path.join(workdir, "twistd.log"), "wb")
    process = subprocess.Popen(
        [twistd, "-n", "--pidfile=", *plugin],
        cwd=workdir,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=logFile,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    logFile.close()
    daemon = Daemon(name, socketPath, process.pid, process)

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"twistd exited with {process.returncode}; see {workdir}/twistd.log")
        if os.path.exists(socketPath):
            try:
                status, _ = getJSON(socketPath, "/api/v1/health", timeout=2)
                if status == 200:
                    return daemon
            except OSError:
                pass
        time.sleep(0.05)
    stopOurDaemon(daemon)
    raise RuntimeError(f"{name} did not respond to a health request within 30 s; see {workdir}/twistd.log")


def stopOurDaemon(daemon: Daemon) -> None:
    process = daemon.process
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        log(f"{daemon.name} (pid {process.pid}) ignored SIGTERM for 30 s; sending SIGKILL")
        process.kill()
        process.wait(10)


def daemonPid(socketPath: str) -> int | None:
    """
    Return the pid from the daemon's health response, or else the pid of the
    process that has the listening socket open, found through /proc.
    """
    status, body = getJSON(socketPath, "/api/v1/health")
    if status == 200 and isinstance(body.get("daemon"), dict) and body["daemon"].get("pid"):
        return int(body["daemon"]["pid"])
    inodes = set()
    with open("/proc/net/unix") as file:
        for line in file.readlines()[1:]:
            parts = line.split()
            if len(parts) >= 8 and parts[7] == socketPath:
                inodes.add(f"socket:[{parts[6]}]")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{entry}/fd"):
                if os.readlink(f"/proc/{entry}/fd/{fd}") in inodes:
                    return int(entry)
        except OSError:
            continue
    return None


def preflight(daemon: Daemon, project: str) -> None:
    """
    Check that the daemon runs benchmarks/codex, and find out whether it
    supports long polls.
    """
    size = 4096
    session = launch(daemon, project, f"burst {size}")
    status, _ = waitExited(daemon, session["id"], 30)
    back = readBack(daemon, session["id"])
    if status != "completed" or back.digest != expectedDigest(size):
        raise RuntimeError(
            f"{daemon.name}: a 4096-byte test burst ended {status} with {back.outputBytes}"
            f" bytes recorded; start that daemon with {BENCHMARKS} first on its PATH so"
            " its codex harness is benchmarks/codex"
        )
    started = time.monotonic()
    getJSON(
        daemon.socketPath,
        f"/api/v1/events?sessionId={session['id']}&afterSeq={back.lastSeq}&waitMs={LONG_POLL_PROBE_MS}",
    )
    daemon.longPoll = time.monotonic() - started >= LONG_POLL_MIN_SECONDS
    if not daemon.longPoll:
        daemon.notes.append("waitMs ignored: output latency measured by back-to-back polling")

    # A session that runs for about LONG_POLL_PROBE_MS: a daemon that waits
    # for its end returns it finished.
    session = launch(daemon, project, f"lines 2 {LONG_POLL_PROBE_MS}")
    daemon.sessionWait = sessionStatus(daemon, session["id"], 5 * LONG_POLL_PROBE_MS) in FINISHED_STATUSES
    waitExited(daemon, session["id"], 30)
    if not daemon.sessionWait:
        daemon.notes.append(
            f"waitMs ignored on sessions: exits seen by polling every {EXIT_POLL_INTERVAL * 1000:.0f} ms"
        )


# Measurements


def measureIdle(daemon: Daemon) -> dict[str, Any]:
    time.sleep(1.0)
    return {"idle_rss_mb": rssMB(daemon.pid)}


def measureHealthSequential(daemon: Daemon, count: int) -> dict[str, Any]:
    latencies = []
    errors = 0
    for _ in range(count):
        started = time.perf_counter()
        status, _ = request(daemon.socketPath, "GET", "/api/v1/health")
        latencies.append((time.perf_counter() - started) * 1000)
        errors += status != 200
    return {
        "health_p50_ms": percentile(latencies, 50),
        "health_p99_ms": percentile(latencies, 99),
        "health_n": count,
        "health_errors": errors,
    }


def measureHealthConcurrent(daemon: Daemon, clients: int, seconds: float) -> dict[str, Any]:
    async def client(deadline: float, counts: list[int]) -> None:
        # At most 100,000 requests per client, however fast the daemon is.
        for _ in range(100_000):
            if time.monotonic() >= deadline:
                return
            status = await requestAsync(daemon.socketPath, "GET", "/api/v1/health")
            counts[0 if status == 200 else 1] += 1

    async def run() -> tuple[int, int, float]:
        counts = [0, 0]
        started = time.monotonic()
        await asyncio.gather(*(client(started + seconds, counts) for _ in range(clients)))
        return counts[0], counts[1], time.monotonic() - started

    ok, errors, elapsed = asyncio.run(run())
    return {"health_rps": ok / elapsed, "health_rps_errors": errors, "health_rps_clients": clients}


def measureLaunch(daemon: Daemon, project: str, count: int) -> dict[str, Any]:
    latencies = []
    ids = []
    for _ in range(count):
        started = time.perf_counter()
        session = launch(daemon, project, "exit")
        latencies.append((time.perf_counter() - started) * 1000)
        ids.append(session["id"])
    statuses, stuck = waitAllExited(daemon, ids, 30)
    if stuck:
        daemon.notes.append(
            f"{len(stuck)} of {count} sessions of a harness that exits at once were still"
            f" running 30 s after launch: {', '.join(stuck)}"
        )
    return {
        "launch_p50_ms": percentile(latencies, 50),
        "launch_p99_ms": percentile(latencies, 99),
        "launch_n": count,
        "launch_not_completed": count - statuses["completed"],
        "launch_stuck_running": len(stuck),
    }


def measureBurst(
    daemon: Daemon,
    project: str,
    sizeMB: int,
    onStart: Callable[[], None] | None = None,
    onExit: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """
    Run one burst of C{sizeMB} through C{daemon} once it is idle, and read it back.

    @param onStart: called just before the launch request.
    @param onExit: called as soon as the session is seen finished, before the
        read back.
    """
    size = sizeMB * MB
    key = f"burst{sizeMB}"
    waitQuiet(daemon.pid)
    if onStart is not None:
        onStart()
    started = time.monotonic()
    session = launch(daemon, project, f"burst {size}")
    status, exited = waitExited(daemon, session["id"], 60 + 3 * sizeMB)
    if onExit is not None:
        onExit()
    seconds = exited - started
    back = readBack(daemon, session["id"])
    return {
        f"{key}_status": status,
        f"{key}_exit_seen_by": "waiting request" if daemon.sessionWait else "poll",
        f"{key}_seconds": seconds,
        f"{key}_mbps": size / MB / seconds,
        f"{key}_recorded_mbps": back.outputBytes / MB / seconds,
        f"{key}_expected_bytes": size,
        f"{key}_recorded_bytes": back.outputBytes,
        f"{key}_lost_bytes": size - back.outputBytes,
        f"{key}_intact": int(back.digest == expectedDigest(size)),
        f"{key}_output_events": back.outputEvents,
        f"{key}_truncated_events": back.kinds.get("output_truncated", 0),
        f"{key}_reported_dropped_bytes": back.reportedDroppedBytes,
        f"{key}_readback_seconds": back.seconds,
        f"{key}_readback_mbps": back.outputBytes / MB / back.seconds,
        f"{key}_readback_pages": back.pages,
    }


def measureOutputLatency(daemon: Daemon, project: str, count: int, intervalMs: int) -> dict[str, Any]:
    """
    Time from the harness writing "tick N MONOTONIC_NS" to this client holding
    the response that contains the whole line.
    """
    session = launch(daemon, project, f"lines {count} {intervalMs}")
    sessionId = session["id"]
    latencies: list[float] = []
    pending = b""
    cursor = 0
    finished = False
    requests = 0

    deadline = time.monotonic() + count * intervalMs / 1000 + 30
    while not finished and len(latencies) < count and time.monotonic() < deadline:
        wait = "&waitMs=5000" if daemon.longPoll else ""
        status, content = request(
            daemon.socketPath,
            "GET",
            f"/api/v1/events?sessionId={sessionId}&afterSeq={cursor}&limit=1000{wait}",
        )
        received = time.monotonic_ns()
        requests += 1
        if status != 200:
            raise RuntimeError(f"{daemon.name}: events returned {status}: {content[:200]!r}")

        page = json.loads(content)
        for event in page["events"]:
            if event["kind"] == "output":
                pending += outputBytes(json.loads(event["payload_json"]))
            elif event["kind"] == "exit":
                finished = True
        if page["nextCursor"] is not None:
            cursor = page["nextCursor"]["afterSeq"]

        *lines, pending = pending.split(b"\n")
        for line in lines:
            words = line.strip().split()
            if len(words) == 3 and words[0] == b"tick":
                latencies.append((received - int(words[2])) / 1e6)
    waitExited(daemon, sessionId, 30)

    return {
        "latency_p50_ms": percentile(latencies, 50),
        "latency_p99_ms": percentile(latencies, 99),
        "latency_lines": len(latencies),
        "latency_requests": requests,
        "latency_mode": "long-poll" if daemon.longPoll else "poll",
    }


class RssSampler(threading.Thread):
    """
    Sample a process's VmRSS every 20 ms and keep the maximum.
    """

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peakKB = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(0.02):
            value = readStatusField(self.pid, "VmRSS")
            if value is not None:
                self.peakKB = max(self.peakKB, value)


class HealthProbe(threading.Thread):
    """
    Send sequential health requests, a new connection each, until stopped.
    """

    def __init__(self, socketPath: str) -> None:
        super().__init__(daemon=True)
        self.socketPath = socketPath
        self.latencies: list[float] = []
        self.errors = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        # Bounded: at most 200,000 requests.
        for _ in range(200_000):
            if self.stopping.is_set():
                return
            started = time.perf_counter()
            try:
                status, _ = request(self.socketPath, "GET", "/api/v1/health", timeout=10)
            except OSError:
                status = 0
            self.latencies.append((time.perf_counter() - started) * 1000)
            self.errors += status != 200


def resetPeakRss(pid: int) -> bool:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux 4.0+).
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as file:
            file.write("5")
        return True
    except OSError:
        return False


def measureManySessions(
    daemon: Daemon, project: str, workdir: str, count: int, size: int
) -> dict[str, Any]:
    """
    Launch C{count} sessions that each wait for a go file, then write C{size}
    bytes all at once.
    """
    goFile = os.path.join(workdir, f"go-{daemon.name}-{time.monotonic_ns()}")
    ids = [launch(daemon, project, f"burst {size} {goFile}")["id"] for _ in range(count)]
    deadline = time.monotonic() + 120
    while len(glob.glob(goFile + ".ready.*")) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{daemon.name}: not all {count} harnesses started within 120 s")
        time.sleep(0.02)

    resetPeakRss(daemon.pid)
    sampler = RssSampler(daemon.pid)
    probe = HealthProbe(daemon.socketPath)
    sampler.start()
    probe.start()
    started = time.monotonic()
    with open(goFile, "wb"):
        pass

    statuses, stuck = waitAllExited(daemon, ids, 120 + count * size / MB)
    seconds = time.monotonic() - started
    probe.stopping.set()
    sampler.stopping.set()
    probe.join(30)
    sampler.join(5)
    peakKB = max(sampler.peakKB, readStatusField(daemon.pid, "VmHWM") or 0)

    recorded = intact = events = 0
    for sessionId in ids:
        back = readBack(daemon, sessionId)
        recorded += back.outputBytes
        events += back.outputEvents
        intact += back.digest == expectedDigest(size)
    return {
        "many_sessions": count,
        "many_seconds": seconds,
        "many_expected_bytes": count * size,
        "many_recorded_bytes": recorded,
        "many_lost_bytes": count * size - recorded,
        "many_intact_sessions": intact,
        "many_completed": statuses["completed"],
        "many_stuck_running": len(stuck),
        "many_output_events": events,
        "many_peak_rss_mb": peakKB / 1024,
        "many_health_p50_ms": percentile(probe.latencies, 50),
        "many_health_p99_ms": percentile(probe.latencies, 99),
        "many_health_n": len(probe.latencies),
        "many_health_errors": probe.errors,
    }


def readRawPty(binDir: str, prompt: str, onData: Callable[[bytes], None]) -> tuple[int, int]:
    """
    Run the codex harness of C{binDir} with C{prompt} on a new PTY, with no
    daemon, and hand each read of the PTY master to C{onData}.

    @return: the monotonic clock in ns just before the harness was started
        and once its PTY ended.
    """
    master, slave = os.openpty()
    started = time.monotonic_ns()
    process = subprocess.Popen(
        [os.path.join(binDir, "codex"), "--", prompt],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    try:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            onData(data)
    finally:
        os.close(master)
    ended = time.monotonic_ns()
    process.wait(30)
    return started, ended


def rawPtyLoop(binDir: str, sizeMB: int) -> dict[str, Any]:
    """
    Read the same burst straight from a PTY master, with no daemon: the ceiling.
    """
    size = sizeMB * MB
    digest = hashlib.sha256()
    sizes: list[int] = []

    def onData(data: bytes) -> None:
        digest.update(data)
        sizes.append(len(data))

    started, ended = readRawPty(binDir, f"burst {size}", onData)
    seconds = (ended - started) / 1e9
    total, reads = sum(sizes), len(sizes)

    return {
        f"raw{sizeMB}_seconds": seconds,
        f"raw{sizeMB}_mbps": total / MB / seconds,
        f"raw{sizeMB}_bytes": total,
        f"raw{sizeMB}_intact": int(digest.hexdigest() == expectedDigest(size)),
        f"raw{sizeMB}_reads": reads,
    }


def measureRaw(figures: dict[str, Any], sizeMB: int, daemonPid: int | None) -> dict[str, Any]:
    """
    Run the raw PTY loop, once the daemon C{daemonPid} is idle, and add its
    figures to C{figures}, kept apart from the daemon's.
    """
    waitQuiet(daemonPid)
    figures.update(rawPtyLoop(BENCHMARKS, sizeMB))
    return {}


def runSuite(
    daemon: Daemon,
    project: str,
    workdir: str,
    sizes: Sizes,
    raw: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """
    Run every step once on C{daemon}.

    @param raw: where to put the raw PTY loop's figures, measured just before
        each burst of the same size. The raw loop reads faster while something
        else keeps the CPUs busy, so it is paired with the burst it is compared
        to rather than measured once at the start of a round.
    """
    result: dict[str, Any] = {}
    steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("idle RSS", lambda: measureIdle(daemon)),
        ("health, sequential", lambda: measureHealthSequential(daemon, sizes.healthRequests)),
        (
            "health, concurrent",
            lambda: measureHealthConcurrent(daemon, sizes.concurrentClients, sizes.concurrentSeconds),
        ),
        ("launch", lambda: measureLaunch(daemon, project, sizes.launches)),
    ]
    for sizeMB in sizes.burstsMB:
        if raw is not None:
            steps.append((f"raw PTY loop {sizeMB} MB", lambda sizeMB=sizeMB: measureRaw(raw, sizeMB, daemon.pid)))
        steps.append((f"burst {sizeMB} MB", lambda sizeMB=sizeMB: measureBurst(daemon, project, sizeMB)))
    steps.append(
        ("output latency", lambda: measureOutputLatency(daemon, project, sizes.lines, sizes.lineIntervalMs))
    )
    steps.append(
        (
            f"{sizes.manySessions} sessions",
            lambda: measureManySessions(
                daemon, project, workdir, sizes.manySessions, sizes.manySessionBytes
            ),
        )
    )
    for label, step in steps:
        log(f"{daemon.name}: {label}")
        try:
            result.update(step())
        except (OSError, RuntimeError, ValueError, KeyError) as error:
            # TimeoutError is an OSError. One failed step leaves its figures
            # out of this round, and the run goes on.
            log(f"{daemon.name}: {label} failed: {error!r}")
            daemon.notes.append(f"{label} failed: {error}")
            result.setdefault("failed_steps", []).append(label)
    return result


def profileBurst(daemon: Daemon, project: str, sizeMB: int, output: str) -> None:
    """
    Record our daemon with py-spy (raw collapsed stacks) during one burst.
    """
    pySpy = shutil.which("py-spy", path=os.path.dirname(sys.executable)) or shutil.which("py-spy")
    if pySpy is None:
        raise RuntimeError("py-spy is not installed; run .venv/bin/pip install py-spy")
    recorder = subprocess.Popen(
        [pySpy, "record", "--pid", str(daemon.pid), "--rate", "250", "--nonblocking",
         "--threads", "--format", "raw", "--output", output],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(1.5)
    try:
        result = measureBurst(daemon, project, sizeMB)
    finally:
        recorder.send_signal(signal.SIGINT)
        try:
            _, errors = recorder.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            recorder.kill()
            _, errors = recorder.communicate()
    log(f"profiled burst: {result[f'burst{sizeMB}_mbps']:.1f} MB/s under py-spy; stacks in {output}")
    if recorder.returncode not in (0, -signal.SIGINT):
        log(f"py-spy exited {recorder.returncode}: {errors.decode(errors='replace')[-500:]}")


# Summary


ROWS: list[tuple[str, str, str]] = [
    ("idle RSS (MB)", "idle_rss_mb", "{:.1f}"),
    ("health p50 (ms, sequential)", "health_p50_ms", "{:.2f}"),
    ("health p99 (ms, sequential)", "health_p99_ms", "{:.2f}"),
    ("health req/s (16 clients)", "health_rps", "{:.0f}"),
    ("launch p50 (ms)", "launch_p50_ms", "{:.1f}"),
    ("launches not completed", "launch_not_completed", "{:.0f}"),
    ("launches still running after 30 s", "launch_stuck_running", "{:.0f}"),
]
BURST_ROWS: list[tuple[str, str, str]] = [
    ("burst {n} MB: status", "burst{n}_status", "{}"),
    ("burst {n} MB: exit seen by", "burst{n}_exit_seen_by", "{}"),
    ("burst {n} MB: s to exit recorded", "burst{n}_seconds", "{:.2f}"),
    ("burst {n} MB: MB/s (bytes written)", "burst{n}_mbps", "{:.1f}"),
    ("burst {n} MB: MB/s (bytes recorded)", "burst{n}_recorded_mbps", "{:.1f}"),
    ("burst {n} MB: bytes expected", "burst{n}_expected_bytes", "{:.0f}"),
    ("burst {n} MB: bytes recorded", "burst{n}_recorded_bytes", "{:.0f}"),
    ("burst {n} MB: content intact", "burst{n}_intact", "{:.0f}"),
    ("burst {n} MB: output events", "burst{n}_output_events", "{:.0f}"),
    ("burst {n} MB: output_truncated events", "burst{n}_truncated_events", "{:.0f}"),
    ("burst {n} MB: read back s", "burst{n}_readback_seconds", "{:.2f}"),
    ("burst {n} MB: read back MB/s", "burst{n}_readback_mbps", "{:.1f}"),
]
TAIL_ROWS: list[tuple[str, str, str]] = [
    ("output latency mode", "latency_mode", "{}"),
    ("output latency p50 (ms)", "latency_p50_ms", "{:.1f}"),
    ("output latency p99 (ms)", "latency_p99_ms", "{:.1f}"),
    ("output latency lines received", "latency_lines", "{:.0f}"),
    ("N sessions x 1 MB: sessions", "many_sessions", "{:.0f}"),
    ("N sessions: s until all exited", "many_seconds", "{:.2f}"),
    ("N sessions: bytes expected", "many_expected_bytes", "{:.0f}"),
    ("N sessions: bytes recorded", "many_recorded_bytes", "{:.0f}"),
    ("N sessions: sessions intact", "many_intact_sessions", "{:.0f}"),
    ("N sessions: still running at timeout", "many_stuck_running", "{:.0f}"),
    ("N sessions: daemon peak RSS (MB)", "many_peak_rss_mb", "{:.1f}"),
    ("N sessions: health p99 (ms)", "many_health_p99_ms", "{:.1f}"),
    ("N sessions: health requests", "many_health_n", "{:.0f}"),
]


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """
    Combine rounds: the median of numbers, except lost bytes, whose maximum is
    kept, and intact counts, whose minimum is kept.
    """
    summary: dict[str, Any] = {}
    keys = dict.fromkeys(key for result in rounds for key in result)
    for key in keys:
        values = [result[key] for result in rounds if key in result]
        if all(isinstance(value, (int, float)) for value in values):
            if key.endswith("_lost_bytes"):
                summary[key] = max(values)
            elif key.endswith("_intact") or key.endswith("_intact_sessions") or key.endswith("_recorded_bytes"):
                summary[key] = min(values)
            else:
                summary[key] = statistics.median(values)
        else:
            summary[key] = ", ".join(sorted(set(map(str, values))))
    return summary


def formatValue(value: Any, template: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    try:
        return template.format(value)
    except (ValueError, TypeError):
        return str(value)


def targets(
    sizes: Sizes,
    ours: list[dict[str, Any]],
    theirs: list[dict[str, Any]] | None,
    raw: list[dict[str, Any]],
) -> list[tuple[str, str, list[float], Callable[[float], bool | None]]]:
    """
    Return (goal, target text, per-round values, check) for each target. A
    check that returns C{None} marks a figure shown without a target.
    """
    rows: list[tuple[str, str, list[float], Callable[[float], bool | None]]] = []
    small, large = sizes.burstsMB[0], sizes.burstsMB[-1]

    def perRound(function: Callable[[int], float]) -> list[float]:
        values = []
        for index in range(len(ours)):
            try:
                values.append(function(index))
            except (KeyError, ZeroDivisionError):
                values.append(math.nan)
        return values

    lost = perRound(
        lambda i: sum(ours[i][f"burst{n}_lost_bytes"] for n in sizes.burstsMB) + ours[i]["many_lost_bytes"]
    )
    rows.append(("bytes lost (all bursts, N sessions)", "== 0", lost, lambda v: v == 0))
    for n in sizes.burstsMB:
        rows.append(
            (
                f"burst {n} MB MB/s / raw PTY loop",
                ">= 0.7",
                perRound(lambda i, n=n: ours[i][f"burst{n}_mbps"] / raw[i][f"raw{n}_mbps"]),
                lambda v: v >= 0.7,
            )
        )
    rows.append(
        (
            f"burst {small} MB output events",
            "<= 2000" if small == 20 else f"<= {2000 * small // 20} (2000 per 20 MB)",
            perRound(lambda i: ours[i][f"burst{small}_output_events"]),
            lambda v: v <= 2000 * small / 20,
        )
    )
    rows.append(("output latency p99 (ms)", "< 50", perRound(lambda i: ours[i]["latency_p99_ms"]), lambda v: v < 50))
    rows.append(
        (
            "health p99 during N sessions (ms)",
            "< 50",
            perRound(lambda i: ours[i]["many_health_p99_ms"]),
            lambda v: v < 50,
        )
    )
    if theirs is None:
        return rows
    # Throughput counts the bytes a daemon recorded: a daemon that drops output
    # would otherwise gain speed from each byte it loses. The ratio of bytes
    # written per second is shown too, without a target.
    for n in sizes.burstsMB:
        rows.append(
            (
                f"burst {n} MB recorded MB/s, ours / theirs",
                ">= 1.5",
                perRound(
                    lambda i, n=n: ours[i][f"burst{n}_recorded_mbps"] / theirs[i][f"burst{n}_recorded_mbps"]
                ),
                lambda v: v >= 1.5,
            )
        )
        rows.append(
            (
                f"burst {n} MB written MB/s, ours / theirs",
                "none",
                perRound(lambda i, n=n: ours[i][f"burst{n}_mbps"] / theirs[i][f"burst{n}_mbps"]),
                lambda v: None,
            )
        )
    rows.append(
        (
            "health p50, ours / theirs",
            "<= 0.2",
            perRound(lambda i: ours[i]["health_p50_ms"] / theirs[i]["health_p50_ms"]),
            lambda v: v <= 0.2,
        )
    )
    rows.append(
        (
            "launch p50, ours / theirs",
            "<= 1.0",
            perRound(lambda i: ours[i]["launch_p50_ms"] / theirs[i]["launch_p50_ms"]),
            lambda v: v <= 1.0,
        )
    )
    for n in (small, large):
        rows.append(
            (
                f"read back {n} MB MB/s, ours / theirs",
                ">= 1.0",
                perRound(
                    lambda i, n=n: ours[i][f"burst{n}_readback_mbps"] / theirs[i][f"burst{n}_readback_mbps"]
                ),
                lambda v: v >= 1.0,
            )
        )
    rows.append(
        (
            "idle RSS, ours / theirs (first round)",
            "<= 1.2",
            [ours[0]["idle_rss_mb"] / theirs[0]["idle_rss_mb"]],
            lambda v: v <= 1.2,
        )
    )
    return rows


def checkoutState() -> dict[str, Any]:
    """
    Return the commit and the uncommitted changes of coven/ that our daemon ran.
    """

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    changed = git("status", "--porcelain", "--", "coven")
    return {"commit": git("rev-parse", "--short", "HEAD"), "uncommittedCovenFiles": changed.splitlines()}


def printReport(
    sizes: Sizes,
    daemons: list[Daemon],
    results: dict[str, list[dict[str, Any]]],
    raw: list[dict[str, Any]],
    checkout: dict[str, Any],
) -> None:
    summaries = {daemon.name: summarize(results[daemon.name]) for daemon in daemons}
    rawSummary = summarize(raw)
    rounds = len(raw)
    rows = list(ROWS)
    for n in sizes.burstsMB:
        rows += [(label.format(n=n), key.format(n=n), template) for label, key, template in BURST_ROWS]
    rows += [(label.replace("N ", f"{sizes.manySessions} "), key, template) for label, key, template in TAIL_ROWS]

    names = [daemon.name for daemon in daemons]
    width = max(len(label) for label, _, _ in rows) + 2
    uncommitted = ", ".join(checkout["uncommittedCovenFiles"]) or "none"
    print(f"\nOur daemon: commit {checkout['commit']}, uncommitted changes in coven/: {uncommitted}")
    print(f"Median of {rounds} round(s); bytes recorded and intact counts are the worst round.")
    print("metric".ljust(width) + "".join(name.rjust(16) for name in names))
    print("-" * (width + 16 * len(names)))
    for label, key, template in rows:
        cells = [formatValue(summaries[name].get(key), template).rjust(16) for name in names]
        print(label.ljust(width) + "".join(cells))
    for n in sizes.burstsMB:
        label = f"raw PTY loop {n} MB: MB/s (no daemon)"
        print(label.ljust(width) + formatValue(rawSummary[f"raw{n}_mbps"], "{:.1f}").rjust(16))
    for daemon in daemons:
        for note in daemon.notes:
            print(f"note: {daemon.name}: {note}")

    theirs = results[daemons[1].name] if len(daemons) > 1 else None
    print(f"\nTargets (median over {rounds} round(s) of the per-round value or ratio)")
    ratios = {}
    for goal, target, values, check in targets(sizes, results[daemons[0].name], theirs, raw):
        measured = [value for value in values if not math.isnan(value)]
        median = statistics.median(measured) if measured else math.nan
        met = check(median)
        ratios[goal] = {"median": median, "rounds": values, "target": target, "met": met}
        shown = ", ".join(f"{value:.3g}" for value in values)
        verdict = {True: "met", False: "NOT met", None: ""}[met]
        print(f"  {goal:<44} {median:>10.3g}  target {target:<10} {verdict:<8} [{shown}]")

    print()
    for daemon in daemons:
        record = {
            "daemon": daemon.name,
            "checkout": checkout if daemon is daemons[0] else None,
            "socket": daemon.socketPath,
            "pid": daemon.pid,
            "longPoll": daemon.longPoll,
            "sessionWait": daemon.sessionWait,
            "rounds": len(results[daemon.name]),
            "median": summaries[daemon.name],
            "perRound": results[daemon.name],
        }
        print(json.dumps(record, sort_keys=True))
    print(json.dumps({"rawPtyLoop": rawSummary, "rawPerRound": raw, "targets": ratios}, sort_keys=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", metavar="SOCKET", help="also measure the daemon already serving SOCKET")
    parser.add_argument("--compare-name", default="upstream", help="label of the --compare daemon")
    parser.add_argument("--compare-pid", type=int, help="pid of the --compare daemon, for RSS (default: from its health response)")
    parser.add_argument("--rounds", type=int, default=1, help="paired rounds to run (default 1)")
    parser.add_argument("--quick", action="store_true", help="small sizes: 200 health requests, 4 and 16 MB bursts, 10 sessions")
    parser.add_argument("--profile", metavar="FILE", help="after the rounds, record our daemon with py-spy during one burst of the smaller size and write collapsed stacks to FILE")
    parser.add_argument("--no-redaction", action="store_true", help="start our daemon with [redaction] enabled = false in coven.toml")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder with our daemon's home and log (kept anyway when the run fails)")
    options = parser.parse_args()
    sizes = QUICK if options.quick else FULL

    workdir = tempfile.mkdtemp(prefix="coven-bench-")
    project = os.path.join(workdir, "project")
    os.makedirs(project)
    log(f"working in {workdir}")
    checkout = checkoutState()
    ours = startOurDaemon(workdir, BENCHMARKS, redaction=not options.no_redaction)
    if options.no_redaction:
        ours.notes.append("secret redaction turned off in coven.toml")
    daemons = [ours]
    keep = options.keep
    try:
        if options.compare:
            pid = options.compare_pid or daemonPid(options.compare)
            if pid is None:
                raise RuntimeError(f"cannot find the pid of the daemon at {options.compare}; pass --compare-pid")
            daemons.append(Daemon(options.compare_name, options.compare, pid))
        for daemon in daemons:
            preflight(daemon, project)
            log(f"{daemon.name}: pid {daemon.pid}, long poll {'supported' if daemon.longPoll else 'not supported'}")

        results: dict[str, list[dict[str, Any]]] = {daemon.name: [] for daemon in daemons}
        raw: list[dict[str, Any]] = []
        for number in range(options.rounds):
            log(f"round {number + 1} of {options.rounds}")
            rawResult: dict[str, Any] = {}
            raw.append(rawResult)
            for daemon in daemons:
                rawFigures = rawResult if daemon is ours else None
                results[daemon.name].append(runSuite(daemon, project, workdir, sizes, rawFigures))
                log(f"{daemon.name}: {json.dumps(results[daemon.name][-1], sort_keys=True)}")
        printReport(sizes, daemons, results, raw, checkout)

        if options.profile:
            profileBurst(ours, project, sizes.burstsMB[0], options.profile)
    except BaseException:
        keep = True
        raise
    finally:
        stopOurDaemon(ours)
        if keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
