"""Relate a burst's speed to the CPUs the scheduler runs the harness and the PTY reader on.

    .venv/bin/python benchmarks/placement.py [--size 100] [--bursts 3] [--interval 2]

Starts our daemon like benchmarks/run.py does and runs --bursts bursts of
--size MB through it, each once the daemon is idle. During each burst a thread
samples, every --interval ms, the bytes each daemon thread has read (rchar in
/proc/PID/task/TID/io) and the CPU that each daemon thread and the harness
last ran on (field 39 of their stat files). The PTY reader is the thread
other than the main one that waits in epoll while the daemon is idle.

A gap between two samples counts as "together" when the harness and the
reader were on the same CPU at both samples. It counts as "apart" when they
were on different CPUs at both, and other gaps are left out. For each kind
the script prints the MB the reader read, the seconds, the MB/s, and how
often the reactor and the writer were on the harness's CPU. The sampling
thread uses some CPU of its own, so bursts run a little slower than in
run.py. MB means 2**20 bytes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run  # noqa: E402
from coven.store import WRITER_NICE  # noqa: E402

KINDS = ("together", "apart")


def readStat(path: str) -> tuple[int, int] | None:
    """
    Return the nice value and the last CPU from a stat file of /proc.
    """
    try:
        with open(path) as file:
            fields = file.read().rsplit(")", 1)[1].split()
        return int(fields[16]), int(fields[36])
    except (OSError, ValueError, IndexError):
        return None


def readChar(pid: int, tid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/task/{tid}/io") as file:
            for line in file:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def findReader(daemonPid: int) -> int | None:
    """
    Return the id of the PTY reader thread: the thread, other than the main
    one, that waits in epoll. The database threads wait on a futex.
    """
    for tid in os.listdir(f"/proc/{daemonPid}/task"):
        if int(tid) == daemonPid:
            continue
        try:
            with open(f"/proc/{daemonPid}/task/{tid}/wchan") as file:
                if "epoll" in file.read():
                    return int(tid)
        except OSError:
            continue
    return None


def findHarness(daemonPid: int, timeout: float = 5.0) -> int | None:
    """
    Return the pid of the daemon's newest child process, waiting for one.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{daemonPid}/task/{daemonPid}/children") as file:
                children = [int(pid) for pid in file.read().split()]
        except (OSError, ValueError):
            return None
        if children:
            return max(children)
        time.sleep(0.001)
    return None


class Sampler(threading.Thread):
    """
    Sample the daemon's threads and the harness until stopped.
    """

    def __init__(self, daemonPid: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.daemonPid = daemonPid
        self.interval = interval
        self.stopped = threading.Event()
        self.harness: int | None = None
        self.samples: list[tuple[float, int | None, dict[int, tuple[int, int, int]]]] = []

    def run(self) -> None:
        pid = self.daemonPid
        self.harness = findHarness(pid)
        tids = [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
        while not self.stopped.is_set():
            now = time.monotonic()
            harness = readStat(f"/proc/{self.harness}/stat") if self.harness else None
            threads = {}
            for tid in tids:
                stat = readStat(f"/proc/{pid}/task/{tid}/stat")
                read = readChar(pid, tid)
                if stat is not None and read is not None:
                    threads[tid] = (stat[0], stat[1], read)
            self.samples.append((now, harness[1] if harness else None, threads))
            self.stopped.wait(self.interval)


def classify(pid: int, reader: int, samples: list[Any]) -> dict[str, dict[str, float]]:
    """
    Sum the reader's bytes and the seconds of each kind of gap.
    """
    last = samples[-1][2]
    writer = next((tid for tid, values in last.items() if values[0] == WRITER_NICE), None)
    totals = {kind: {"bytes": 0.0, "seconds": 0.0, "reactor": 0.0, "writer": 0.0} for kind in KINDS}
    for (before, harnessBefore, threadsBefore), (after, harnessAfter, threadsAfter) in zip(samples, samples[1:]):
        if harnessBefore is None or harnessAfter is None:
            continue
        if reader not in threadsBefore or reader not in threadsAfter:
            continue
        together = [threads[reader][1] == harness for threads, harness in
                    ((threadsBefore, harnessBefore), (threadsAfter, harnessAfter))]
        if all(together):
            kind = "together"
        elif not any(together):
            kind = "apart"
        else:
            continue
        seconds = after - before
        entry = totals[kind]
        entry["bytes"] += threadsAfter[reader][2] - threadsBefore[reader][2]
        entry["seconds"] += seconds
        for role, tid in (("reactor", pid), ("writer", writer)):
            if tid in threadsAfter and threadsAfter[tid][1] == harnessAfter:
                entry[role] += seconds
    return totals


def describe(totals: dict[str, dict[str, float]]) -> list[str]:
    lines = []
    for kind in KINDS:
        entry = totals[kind]
        seconds = entry["seconds"]
        if not seconds:
            lines.append(f"  {kind:8}: no gaps")
            continue
        megabytes = entry["bytes"] / run.MB
        lines.append(
            f"  {kind:8}: {megabytes:6.1f} MB in {seconds:5.3f} s, {megabytes / seconds:6.1f} MB/s;"
            f" on the harness's CPU: reactor {entry['reactor'] / seconds:4.0%},"
            f" writer {entry['writer'] / seconds:4.0%}"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=100, help="burst size in MB (default 100)")
    parser.add_argument("--bursts", type=int, default=3, help="bursts to run (default 3)")
    parser.add_argument("--interval", type=float, default=2.0, help="ms between samples (default 2)")
    options = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix="coven-placement-")
    project = os.path.join(workdir, "project")
    os.makedirs(project)
    daemon = run.startOurDaemon(workdir, run.BENCHMARKS)
    overall = {kind: {"bytes": 0.0, "seconds": 0.0, "reactor": 0.0, "writer": 0.0} for kind in KINDS}
    try:
        run.preflight(daemon, project)
        for number in range(options.bursts):
            run.waitQuiet(daemon.pid)
            reader = findReader(daemon.pid)
            if reader is None:
                raise RuntimeError("no thread of the idle daemon waits in epoll besides the main one")
            sampler = Sampler(daemon.pid, options.interval / 1000)
            started = time.monotonic()
            session = run.launch(daemon, project, f"burst {options.size * run.MB}")
            sampler.start()
            _, exited = run.waitExited(daemon, session["id"], 60 + 3 * options.size)
            sampler.stopped.set()
            sampler.join()
            seconds = exited - started
            print(f"burst {number}: {options.size} MB in {seconds:.3f} s, {options.size / seconds:.1f} MB/s")
            if sampler.harness is None or len(sampler.samples) < 2:
                print("  the harness was not found; no samples")
                continue
            totals = classify(daemon.pid, reader, sampler.samples)
            for line in describe(totals):
                print(line)
            for kind in KINDS:
                for key, value in totals[kind].items():
                    overall[kind][key] += value
    finally:
        run.stopOurDaemon(daemon)
    print(f"all {options.bursts} bursts:")
    for line in describe(overall):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
