"""Read a burst through Twisted alone, with no store and no daemon, against the raw PTY loop.

    .venv/bin/python benchmarks/readers.py [--size 20] [--rounds 6]

Each round runs the raw PTY loop of benchmarks/run.py, then spawns the same
harness with `reactor.spawnProcess(..., usePTY=True)` twice: once read by the
reactor thread, as Twisted does by default, and once by coven's PTY reader
thread, as the daemon does. The protocol only counts bytes. The figures show
what the reading costs before the daemon does anything with the output.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run  # noqa: E402

sys.path.insert(0, run.REPO)

from twisted.internet import defer, protocol, reactor  # noqa: E402
from twisted.python.failure import Failure  # noqa: E402

from coven.ptyreader import PTYReader  # noqa: E402

MB = 1024 * 1024


class CountingProtocol(protocol.ProcessProtocol):
    """
    A harness protocol that counts output bytes and fires C{ended} with the count.
    """

    def __init__(self) -> None:
        self.received = 0
        self.ended: defer.Deferred[int] = defer.Deferred()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.received += len(data)

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(self.received)


async def readBurst(reader: PTYReader | None, sizeMB: int) -> float:
    """
    Spawn a burst harness in a PTY and return MB/s from spawn to the end of
    the process, read by C{reader} or, without one, by the reactor.
    """
    counter = CountingProtocol()
    started = time.monotonic()
    transport = reactor.spawnProcess(
        counter,
        os.path.join(run.BENCHMARKS, "codex"),
        ["codex", "--", f"burst {sizeMB * MB}"],
        env=dict(os.environ),
        usePTY=True,
    )
    if reader is not None:
        reader.attach(transport)
    received = await counter.ended
    seconds = time.monotonic() - started
    if received != sizeMB * MB:
        raise RuntimeError(f"Burst read incomplete: {received} of {sizeMB * MB} bytes")
    return sizeMB / seconds


async def measure(sizeMB: int, rounds: int) -> None:
    reader = PTYReader(reactor)
    ratios: dict[str, list[float]] = {"reactor thread": [], "PTY reader thread": []}
    try:
        for number in range(rounds):
            raw = run.rawPtyLoop(run.BENCHMARKS, sizeMB)[f"raw{sizeMB}_mbps"]
            inReactor = await readBurst(None, sizeMB)
            inThread = await readBurst(reader, sizeMB)
            ratios["reactor thread"].append(inReactor / raw)
            ratios["PTY reader thread"].append(inThread / raw)
            print(
                f"round {number + 1}: raw loop {raw:.0f} MB/s, reactor thread {inReactor:.0f},"
                f" PTY reader thread {inThread:.0f}",
                flush=True,
            )
    finally:
        reader.stop()
    print(f"\n{sizeMB} MB, median of {rounds} rounds, MB/s against the raw loop of the same round:")
    for label, values in ratios.items():
        print(f"  {label:20} {statistics.median(values):.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=20, help="burst size in MB (default 20)")
    parser.add_argument("--rounds", type=int, default=6, help="rounds (default 6)")
    options = parser.parse_args()
    failures: list[Failure] = []

    def done(result: object) -> None:
        if isinstance(result, Failure):
            failures.append(result)
            print(result.getTraceback(), file=sys.stderr)
        reactor.stop()

    def start() -> None:
        defer.ensureDeferred(measure(options.size, options.rounds)).addBoth(done)

    reactor.callWhenRunning(start)
    reactor.run()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
