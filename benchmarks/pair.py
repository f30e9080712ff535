"""Compare two checkouts of the daemon on the same bursts, round by round.

Starts one `twistd -n coven` per checkout, each in a temporary home with the
checkout first on PYTHONPATH and benchmarks/ first on PATH. Each round runs,
for every daemon in turn: the raw PTY loop, then one burst through that
daemon, both once the daemon is idle (see run.waitQuiet). The CPU each daemon
thread used during its burst comes from /proc/PID/task/TID/schedstat.

    git worktree add /tmp/coven-before HEAD~1
    .venv/bin/python benchmarks/pair.py --tree before=/tmp/coven-before --tree after=. --rounds 20

It prints one line per daemon and round. Then, per daemon, it prints the
medians of MB/s, of the raw loop's MB/s, of their ratio and of each thread's
CPU. With two daemons it also prints the median of the second's MB/s over the
first's. Threads are named
by role where the role is known: "reactor" (the main thread), "writer" (the
thread at the writer's nice value) and "+N" for the others, N being the thread
id minus the process id. MB means 2**20 bytes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run  # noqa: E402
from coven.store import WRITER_NICE  # noqa: E402


def threadTimes(pid: int) -> dict[str, float]:
    """
    Return the CPU seconds of each thread of process C{pid}, by role.
    """
    times: dict[str, float] = {}
    for thread, seconds in (run.threadCPUSeconds(pid) or {}).items():
        try:
            with open(f"/proc/{pid}/task/{thread}/stat") as file:
                # The nice value is field 19, the 17th after the command name,
                # which is in parentheses and may contain spaces.
                nice = int(file.read().rsplit(")", 1)[1].split()[16])
        except (OSError, ValueError, IndexError):
            continue
        if thread == pid:
            role = "reactor"
        elif nice == WRITER_NICE:
            role = "writer"
        else:
            role = f"+{thread - pid}"
        times[role] = times.get(role, 0.0) + seconds
    return times


def startDaemon(name: str, tree: str, workdir: str) -> tuple[run.Daemon, str]:
    home = os.path.join(workdir, "home")
    project = os.path.join(workdir, "project")
    os.makedirs(project)
    env = dict(
        os.environ,
        PATH=run.BENCHMARKS + os.pathsep + os.environ.get("PATH", os.defpath),
        PYTHONPATH=os.path.abspath(tree),
    )
    daemon = run.startTwistd(name, ["coven", "--home", home], workdir, env, os.path.join(home, "coven.sock"))
    run.preflight(daemon, project)
    return daemon, project


def measureRound(daemon: run.Daemon, project: str, sizeMB: int) -> dict[str, Any]:
    """
    Run the raw PTY loop and then one burst through C{daemon}.
    """
    raw: dict[str, Any] = {}
    run.measureRaw(raw, sizeMB, daemon.pid)
    times: list[dict[str, float]] = []
    burst = run.measureBurst(
        daemon,
        project,
        sizeMB,
        onStart=lambda: times.append(threadTimes(daemon.pid)),
        onExit=lambda: times.append(threadTimes(daemon.pid)),
    )
    before, after = times
    mbps = burst[f"burst{sizeMB}_mbps"]
    return {
        "mbps": mbps,
        "raw_mbps": raw[f"raw{sizeMB}_mbps"],
        "ratio": mbps / raw[f"raw{sizeMB}_mbps"],
        "lost_bytes": burst[f"burst{sizeMB}_lost_bytes"],
        "cpu_ms": {role: (seconds - before.get(role, 0.0)) * 1000 for role, seconds in after.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", action="append", required=True, help="NAME=DIR of a checkout, once per daemon")
    parser.add_argument("--rounds", type=int, default=10, help="rounds to run (default 10)")
    parser.add_argument("--size", type=int, default=20, help="burst size in MB (default 20)")
    options = parser.parse_args()

    daemons = []
    try:
        for spec in options.tree:
            name, separator, tree = spec.partition("=")
            if not separator or not os.path.isdir(os.path.join(tree, "coven")):
                parser.error(f"--tree {spec!r}: expected NAME=DIR, DIR being a checkout with a coven/ folder")
            workdir = tempfile.mkdtemp(prefix=f"coven-pair-{name}-")
            daemons.append((name, *startDaemon(name, tree, workdir)))

        results: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in daemons}
        for number in range(options.rounds):
            for name, daemon, project in daemons:
                figures = measureRound(daemon, project, options.size)
                results[name].append(figures)
                cpu = " ".join(f"{role}={ms:.0f}" for role, ms in sorted(figures["cpu_ms"].items()) if ms >= 1)
                print(
                    f"round {number} {name}: {figures['mbps']:.1f} MB/s, raw loop {figures['raw_mbps']:.1f},"
                    f" ratio {figures['ratio']:.2f}, lost {figures['lost_bytes']}, CPU ms {cpu}",
                    flush=True,
                )
    finally:
        for _, daemon, _ in daemons:
            run.stopOurDaemon(daemon)

    for name, rounds in results.items():
        roles = sorted({role for figures in rounds for role in figures["cpu_ms"]})
        cpu = " ".join(
            f"{role}={statistics.median(figures['cpu_ms'].get(role, 0.0) for figures in rounds):.1f}"
            for role in roles
        )
        print(
            f"{name}: medians {statistics.median(f['mbps'] for f in rounds):.1f} MB/s,"
            f" raw loop {statistics.median(f['raw_mbps'] for f in rounds):.1f},"
            f" ratio {statistics.median(f['ratio'] for f in rounds):.3f}, CPU ms {cpu}"
        )
    if len(results) == 2:
        (first, firstRounds), (second, secondRounds) = results.items()
        ratios = [b["mbps"] / a["mbps"] for a, b in zip(firstRounds, secondRounds)]
        print(
            f"{second} / {first} MB/s per round: median {statistics.median(ratios):.3f},"
            f" higher in {sum(ratio > 1 for ratio in ratios)} of {len(ratios)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
