"""Split a burst's time into start, stream and tail, for our daemon and the raw PTY loop.

    .venv/bin/python benchmarks/timeline.py [--size 20] [--rounds 8]

Starts our daemon like benchmarks/run.py does. The harness runs in its
"stamped" mode: it prints its monotonic clock before the burst and again after
its last write returned. For the raw PTY loop and for the daemon, each round
then gives three parts:

- start: from subprocess.Popen, or from the launch request, to the harness's
  first stamp. It is the fork, the exec and the interpreter's start.
- stream: from the first stamp to the second. The harness writes as fast as
  the other side reads.
- tail: from the second stamp to the end, which is the raw loop's end of
  file, or the daemon's exit as run.waitExited detects it.

The stamps add two short lines to the burst. Both clocks are CLOCK_MONOTONIC
on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run  # noqa: E402

PARTS = ("start", "stream", "tail")


def stamps(data: bytes) -> tuple[int, int]:
    """
    Return the two stamps of a "stamped" harness's output.
    """
    first, _, rest = data.partition(b"\n")
    last = rest.rstrip(b"\n").rpartition(b"\n")[2]
    if not (first.startswith(b"start ") and last.startswith(b"end ")):
        raise RuntimeError(
            f"harness output does not start with a start stamp and end with an end stamp:"
            f" {first[:40]!r} ... {last[-40:]!r}; is benchmarks/ first on the daemon's PATH?"
        )
    return int(first.split()[1]), int(last.split()[1])


def parts(began: int, data: bytes, ended: int) -> dict[str, float]:
    started, finished = stamps(data)
    return {
        "start": (started - began) / 1e6,
        "stream": (finished - started) / 1e6,
        "tail": (ended - finished) / 1e6,
    }


def rawRound(size: int) -> dict[str, float]:
    chunks: list[bytes] = []
    began, ended = run.readRawPty(run.BENCHMARKS, f"stamped {size}", chunks.append)
    return parts(began, b"".join(chunks), ended)


def sessionOutput(daemon: run.Daemon, sessionId: str) -> bytes:
    chunks = []
    cursor = 0
    while True:
        status, page = run.getJSON(
            daemon.socketPath, f"/api/v1/events?sessionId={sessionId}&afterSeq={cursor}&limit=1000"
        )
        if status != 200:
            raise RuntimeError(f"events of {sessionId} returned {status}: {page}")
        chunks += [
            run.outputBytes(json.loads(event["payload_json"]))
            for event in page["events"]
            if event["kind"] == "output"
        ]
        if not page["hasMore"] or not page["events"]:
            return b"".join(chunks)
        cursor = page["nextCursor"]["afterSeq"]


def daemonRound(daemon: run.Daemon, project: str, size: int) -> dict[str, float]:
    began = time.monotonic_ns()
    session = run.launch(daemon, project, f"stamped {size}")
    _, exited = run.waitExited(daemon, session["id"], 60 + 3 * size / run.MB)
    ended = int(exited * 1e9)
    return parts(began, sessionOutput(daemon, session["id"]), ended)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=20, help="burst size in MB (default 20)")
    parser.add_argument("--rounds", type=int, default=8, help="rounds to run (default 8)")
    options = parser.parse_args()
    size = options.size * run.MB

    workdir = tempfile.mkdtemp(prefix="coven-timeline-")
    project = os.path.join(workdir, "project")
    os.makedirs(project)
    daemon = run.startOurDaemon(workdir, run.BENCHMARKS)
    results: dict[str, list[dict[str, float]]] = {"raw loop": [], "daemon": []}
    try:
        run.preflight(daemon, project)
        for number in range(options.rounds):
            run.waitQuiet(daemon.pid)
            results["raw loop"].append(rawRound(size))
            run.waitQuiet(daemon.pid)
            results["daemon"].append(daemonRound(daemon, project, size))
            print(
                f"round {number}: "
                + "; ".join(
                    f"{name} " + " ".join(f"{part} {rounds[-1][part]:.1f}" for part in PARTS)
                    for name, rounds in results.items()
                ),
                flush=True,
            )
    finally:
        run.stopOurDaemon(daemon)

    print(f"{options.size} MB, medians of {options.rounds} rounds, ms:")
    for name, rounds in results.items():
        medians = {part: statistics.median(figures[part] for figures in rounds) for part in PARTS}
        total = statistics.median(sum(figures.values()) for figures in rounds)
        print(f"  {name:9} " + "  ".join(f"{part} {medians[part]:6.1f}" for part in PARTS) + f"  total {total:6.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
