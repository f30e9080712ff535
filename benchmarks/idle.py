"""Measure the resident memory of a freshly started, idle Coven daemon.

Starts `twistd -n --pidfile= coven` in a new temporary home with the helpers
of benchmarks/run.py, which wait until GET /api/v1/health returns 200. Then it
waits 1 s more, as run.py does before it reads idle RSS, reads VmRSS, RssAnon
and RssFile from /proc/PID/status and stops the daemon with SIGTERM. Prints each start and the
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
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run  # noqa: E402

FIELDS = ("VmRSS", "RssAnon", "RssFile")


def readStatus(pid: int) -> dict[str, float]:
    """
    Return the FIELDS of /proc/PID/status in MB.
    """
    values = {}
    for name in FIELDS:
        kilobytes = run.readStatusField(pid, name)
        if kilobytes is None:
            raise RuntimeError(f"/proc/{pid}/status has no {name}: is the daemon still running?")
        values[name] = kilobytes / 1024
    return values


def measureOnce(session: bool, keep: bool) -> dict[str, float]:
    workdir = tempfile.mkdtemp(prefix="coven-idle-")
    project = os.path.join(workdir, "project")
    os.makedirs(project)
    daemon = run.startOurDaemon(workdir, run.BENCHMARKS)
    try:
        if session:
            launched = run.launch(daemon, project, "burst 4096")
            run.waitExited(daemon, launched["id"], 30)
        time.sleep(1.0)
        return readStatus(daemon.pid)
    finally:
        run.stopOurDaemon(daemon)
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=3, help="number of daemon starts (default 3)")
    parser.add_argument("--session", action="store_true", help="run one 4 kB burst session before measuring")
    parser.add_argument("--keep", action="store_true", help="keep each temporary home and twistd.log")
    options = parser.parse_args()

    samples = []
    for number in range(options.starts):
        sample = measureOnce(options.session, options.keep)
        samples.append(sample)
        print(f"start {number + 1}: " + "  ".join(f"{name} {sample[name]:.1f}" for name in FIELDS), flush=True)
    medians = {name: statistics.median(sample[name] for sample in samples) for name in FIELDS}
    print("median:  " + "  ".join(f"{name} {medians[name]:.1f}" for name in FIELDS))


if __name__ == "__main__":
    main()
