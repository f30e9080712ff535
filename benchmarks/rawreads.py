"""Run the raw PTY loop alone and beside a CPU-bound process, in turns.

    .venv/bin/python benchmarks/rawreads.py [--size 20] [--rounds 5]

The raw PTY loop of benchmarks/run.py is the ceiling a burst through the daemon
is compared to. Its speed depends on what else runs. A PTY master hands over at
most a few KiB per read. A read that finds the PTY's buffer empty waits for the
kernel worker that moves the harness's next bytes into it, so the time an idle
CPU takes to wake up counts. Each round runs the loop once alone and once while
a busy loop (`while True: pass`, at nice 19) keeps a CPU busy. The script
prints the medians of both.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run  # noqa: E402


def rawFigures(sizeMB: int) -> dict[str, float]:
    result: dict[str, Any] = run.rawPtyLoop(run.BENCHMARKS, sizeMB)
    reads = result[f"raw{sizeMB}_reads"]
    if not result[f"raw{sizeMB}_intact"]:
        raise RuntimeError("Raw PTY loop output differs from what the harness wrote (checksum mismatch)")
    return {
        "MB/s": result[f"raw{sizeMB}_mbps"],
        "reads": reads,
        "us per read": result[f"raw{sizeMB}_seconds"] * 1e6 / reads,
        "bytes per read": result[f"raw{sizeMB}_bytes"] / reads,
    }


def withBusyProcess(sizeMB: int) -> dict[str, float]:
    busy = subprocess.Popen(["nice", "-n", "19", sys.executable, "-c", "while True: pass"])
    try:
        return rawFigures(sizeMB)
    finally:
        busy.kill()
        busy.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=20, help="burst size in MB (default 20)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of each (default 5)")
    options = parser.parse_args()

    runs: dict[str, list[dict[str, float]]] = {"alone": [], "beside a busy loop": []}
    for number in range(options.rounds):
        runs["alone"].append(rawFigures(options.size))
        runs["beside a busy loop"].append(withBusyProcess(options.size))
        print(
            f"round {number + 1}: "
            + ", ".join(f"{label} {figures[-1]['MB/s']:.0f} MB/s" for label, figures in runs.items()),
            flush=True,
        )

    print(f"\nraw PTY loop, {options.size} MB, medians of {options.rounds} rounds")
    columns = ("MB/s", "reads", "us per read", "bytes per read")
    print("".ljust(20) + "".join(column.rjust(16) for column in columns))
    for label, figures in runs.items():
        cells = [statistics.median(figure[column] for figure in figures) for column in columns]
        print(label.ljust(20) + "".join(f"{cell:16.1f}" for cell in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
