"""Summarize a py-spy "raw" profile (collapsed stacks) by thread and by function.

    .venv/bin/python benchmarks/hotspots.py STACKS [--top 25]

Each input line is "frame;frame;...;frame COUNT", outermost frame first, as
`py-spy record --format raw` writes it. With --threads, the first frame names
the thread. Self time is charged to the innermost frame, inclusive time to
every distinct function on the stack. Line numbers are dropped so that one
function is one row.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys

FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^():]+)(?::\d+)?\)$")


def functionName(frame: str) -> str:
    match = FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    path = match.group("file")
    for marker in ("site-packages/", "/lib/python3", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{match.group('function')} ({path})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stacks", help="file written by py-spy record --format raw")
    parser.add_argument("--top", type=int, default=25, help="rows per table (default 25)")
    options = parser.parse_args()

    threads: collections.Counter[str] = collections.Counter()
    selfTime: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    with open(options.stacks) as file:
        for line in file:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            samples = int(count)
            frames = stack.split(";")
            labels = []
            while frames and frames[0].startswith(("process ", "thread ")):
                labels.append(frames.pop(0))
            thread = " ".join(labels) or "(all)"
            total += samples
            threads[thread] += samples
            if not frames:
                continue
            names = [functionName(frame) for frame in frames]
            selfTime[names[-1]] += samples
            for name in set(names):
                inclusive[name] += samples

    if total == 0:
        sys.stderr.write(f"{options.stacks}: no samples found\n")
        return 1
    print(f"{total} samples")
    print("\nBy thread")
    for name, samples in threads.most_common():
        print(f"  {100 * samples / total:5.1f}%  {name}")
    print(f"\nSelf time, top {options.top}")
    for name, samples in selfTime.most_common(options.top):
        print(f"  {100 * samples / total:5.1f}%  {name}")
    print(f"\nInclusive time, top {options.top}")
    for name, samples in inclusive.most_common(options.top):
        print(f"  {100 * samples / total:5.1f}%  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
