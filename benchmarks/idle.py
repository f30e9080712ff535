"""Measure the resident memory of a freshly started, idle Coven daemon.

Starts `twistd -n --pidfile= coven` in a new temporary home, waits until
GET /api/v1/health returns 200, waits 1 s more (as benchmarks/run.py does
before it reads idle RSS), reads VmRSS, RssAnon and RssFile from
/proc/PID/status and stops the daemon with SIGTERM. Prints each start and the
median of --starts starts, in MB (2**20 bytes).

    .venv/bin/python benchmarks/idle.py --starts 3

With --session it first runs one 4 kB burst through benchmarks/codex, like the
preflight of benchmarks/run.py, so the figure matches that script's first
"idle RSS" row.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCHMARKS)

from client import getJSON, postJSON  # noqa: E402

FIELDS = ("VmRSS", "RssAnon", "RssFile")
START_TIMEOUT = 30.0


def readStatus(pid: int) -> dict[str, float]:
    """
    Return the FIELDS of /proc/PID/status in MB.
    """
    values = {}
    with open(f"/proc/{pid}/status") as file:
        for line in file:
            name, _, rest = line.partition(":")
            if name in FIELDS:
                values[name] = int(rest.split()[0]) / 1024
    return values


def waitHealthy(process: subprocess.Popen[bytes], socketPath: str, logPath: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"twistd exited with {process.returncode}; see {logPath}")
        if os.path.exists(socketPath):
            try:
                status, _ = getJSON(socketPath, "/api/v1/health", timeout=2)
                if status == 200:
                    return
            except OSError:
                pass
        time.sleep(0.05)
    raise RuntimeError(f"timed out: the daemon did not respond to GET /api/v1/health within {START_TIMEOUT} s; see {logPath}")


def runBurst(socketPath: str, project: str) -> None:
    status, body = postJSON(
        socketPath,
        "/api/v1/sessions",
        {"projectRoot": project, "harness": "codex", "prompt": "burst 4096", "title": "idle probe"},
    )
    if status not in (200, 201):
        raise RuntimeError(f"launch failed with {status}: {body}")
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        _, session = getJSON(socketPath, f"/api/v1/sessions/{body['id']}")
        if session.get("status") not in ("starting", "running"):
            return
        time.sleep(0.02)
    raise RuntimeError(f"timed out: session {body['id']} still running after {START_TIMEOUT} s")


def measureOnce(twistd: str, session: bool, keep: bool) -> dict[str, float]:
    workdir = tempfile.mkdtemp(prefix="coven-idle-")
    home = os.path.join(workdir, "home")
    project = os.path.join(workdir, "project")
    os.makedirs(project)
    logPath = os.path.join(workdir, "twistd.log")
    env = dict(os.environ, COVEN_HOME=home, PATH=BENCHMARKS + os.pathsep + os.environ.get("PATH", os.defpath))
    with open(logPath, "wb") as logFile:
        process = subprocess.Popen(
            [twistd, "-n", "--pidfile=", "coven"],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=logFile,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        socketPath = os.path.join(home, "coven.sock")
        waitHealthy(process, socketPath, logPath)
        if session:
            runBurst(socketPath, project)
        time.sleep(1.0)
        return readStatus(process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=3, help="number of daemon starts (default 3)")
    parser.add_argument("--session", action="store_true", help="run one 4 kB burst session before measuring")
    parser.add_argument("--keep", action="store_true", help="keep each temporary home and twistd.log")
    options = parser.parse_args()

    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    samples = []
    for number in range(options.starts):
        sample = measureOnce(twistd, options.session, options.keep)
        samples.append(sample)
        print(f"start {number + 1}: " + "  ".join(f"{name} {sample[name]:.1f}" for name in FIELDS), flush=True)
    medians = {name: statistics.median(sample[name] for sample in samples) for name in FIELDS}
    print("median:  " + "  ".join(f"{name} {medians[name]:.1f}" for name in FIELDS))


if __name__ == "__main__":
    main()
