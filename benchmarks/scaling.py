"""Split a burst's time into a fixed part and a cost per MB, for our daemon and the raw PTY loop.

    .venv/bin/python benchmarks/scaling.py [--sizes 1,5,10,20,40] [--repeats 4]

Starts our daemon like benchmarks/run.py does. For each size it runs the raw
PTY loop and then a burst through the daemon, `--repeats` times, and prints
the medians. The cost per MB is the slope between the smallest and the largest
size above 1 MB. The daemon's burst time is measured the way run.py measures
it, with a status poll every 5 ms. A last line gives the time to exit recorded
of a 1-byte burst with status polled back to back, which leaves out the poll
interval.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run  # noqa: E402


def burstSeconds(daemon: run.Daemon, project: str, size: int) -> float:
    started = time.monotonic()
    session = run.launch(daemon, project, f"burst {size}")
    _, exited = run.waitExited(daemon, session["id"], 60 + 3 * size / run.MB)
    return exited - started


def tightExitSeconds(daemon: run.Daemon, project: str) -> float:
    started = time.monotonic()
    session = run.launch(daemon, project, "burst 1")
    deadline = started + 30
    while run.sessionStatus(daemon, session["id"]) == "running":
        if time.monotonic() > deadline:
            raise TimeoutError(f"session {session['id']} still running after 30 s")
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,5,10,20,40", help="burst sizes in MB, comma-separated (default 1,5,10,20,40)")
    parser.add_argument("--repeats", type=int, default=4, help="runs per size (default 4)")
    options = parser.parse_args()
    sizes = sorted(int(size) for size in options.sizes.split(","))

    workdir = tempfile.mkdtemp(prefix="coven-scaling-")
    project = os.path.join(workdir, "project")
    os.makedirs(project)
    daemon = run.startOurDaemon(workdir, run.BENCHMARKS)
    try:
        run.preflight(daemon, project)
        ours: dict[int, float] = {}
        raw: dict[int, float] = {}
        for sizeMB in sizes:
            daemonTimes, rawTimes = [], []
            for _ in range(options.repeats):
                rawTimes.append(run.rawPtyLoop(run.BENCHMARKS, sizeMB)[f"raw{sizeMB}_seconds"])
                daemonTimes.append(burstSeconds(daemon, project, sizeMB * run.MB))
            ours[sizeMB] = statistics.median(daemonTimes)
            raw[sizeMB] = statistics.median(rawTimes)
            print(f"{sizeMB:4d} MB: daemon {ours[sizeMB] * 1000:7.1f} ms, raw loop {raw[sizeMB] * 1000:7.1f} ms", flush=True)

        large = [size for size in sizes if size > 1]
        if len(large) >= 2:
            low, high = large[0], large[-1]
            oursPerMB = (ours[high] - ours[low]) / (high - low)
            rawPerMB = (raw[high] - raw[low]) / (high - low)
            print(
                f"per MB from {low} to {high} MB: daemon {oursPerMB * 1000:.1f} ms, raw loop"
                f" {rawPerMB * 1000:.1f} ms (ratio of rates {rawPerMB / oursPerMB:.2f})"
            )
            print(
                f"fixed part: daemon {(ours[low] - low * oursPerMB) * 1000:.0f} ms,"
                f" raw loop {(raw[low] - low * rawPerMB) * 1000:.0f} ms"
            )
        tight = statistics.median(tightExitSeconds(daemon, project) for _ in range(8))
        print(f"1-byte burst, status polled back to back: {tight * 1000:.1f} ms to exit recorded")
    finally:
        run.stopOurDaemon(daemon)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
