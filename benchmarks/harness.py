"""A stand-in coding-agent CLI for benchmarks. Its one argument selects the behaviour.

The argument has the form "MODE ARG...":

    exit                    exit 0 at once (the codex wrapper also handles this)
    burst SIZE [GOFILE]     write SIZE bytes of pattern() and exit 0; with GOFILE,
                            first create GOFILE.ready.PID, then wait until GOFILE
                            exists (at most 120 s)
    lines COUNT INTERVAL_MS write COUNT lines "tick N MONOTONIC_NS", one every
                            INTERVAL_MS milliseconds, then exit 0
    stamped SIZE            write "start MONOTONIC_NS\n", SIZE bytes of pattern(),
                            then "end MONOTONIC_NS\n" once the last write returned,
                            and exit 0

Output processing is turned off on the PTY (OPOST cleared), so "\\n" is not turned
into "\\r\\n" and the bytes a daemon records are the bytes written here.
"""

from __future__ import annotations

import os
import sys
import termios
import time

BLOCK = 4096
# One 4 KiB block is a 10-digit block number, a space and this filler. The
# numbers make lost, repeated or reordered blocks change the checksum.
FILLER = (b"abcdefghijklmnopqrstuvwxyz0123456789" * 114)[: BLOCK - 12] + b"\n"
GO_FILE_TIMEOUT = 120.0


def patternChunks(size: int, chunkBlocks: int = 16):
    """
    Yield pattern(size) in pieces of at most chunkBlocks blocks.
    """
    number = 0
    remaining = size
    while remaining > 0:
        blocks = []
        for _ in range(chunkBlocks):
            blocks.append(b"%010d " % number + FILLER)
            number += 1
        chunk = b"".join(blocks)[:remaining]
        remaining -= len(chunk)
        yield chunk


def pattern(size: int) -> bytes:
    """
    Return the SIZE bytes that "burst SIZE" writes.
    """
    return b"".join(patternChunks(size))


def rawOutput() -> None:
    attributes = termios.tcgetattr(1)
    attributes[1] &= ~termios.OPOST
    termios.tcsetattr(1, termios.TCSANOW, attributes)


def writeAll(data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(1, view)
        view = view[written:]


def waitForFile(path: str) -> bool:
    deadline = time.monotonic() + GO_FILE_TIMEOUT
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return True
        time.sleep(0.005)
    return False


def burst(size: int, goFile: str | None) -> int:
    if goFile is not None:
        with open(f"{goFile}.ready.{os.getpid()}", "wb"):
            pass
    if goFile is not None and not waitForFile(goFile):
        sys.stderr.write(f"harness: {goFile} did not appear within {GO_FILE_TIMEOUT} s\n")
        return 3
    for chunk in patternChunks(size):
        writeAll(chunk)
    return 0


def stamped(size: int) -> int:
    writeAll(b"start %d\n" % time.monotonic_ns())
    for chunk in patternChunks(size):
        writeAll(chunk)
    writeAll(b"end %d\n" % time.monotonic_ns())
    return 0


def lines(count: int, intervalMs: float) -> int:
    start = time.monotonic()
    for number in range(count):
        due = start + number * intervalMs / 1000
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        writeAll(b"tick %d %d\n" % (number, time.monotonic_ns()))
    return 0


def main(argv: list[str]) -> int:
    words = " ".join(argv[1:]).split()
    if not words:
        sys.stderr.write("harness: missing mode; expected exit, burst, lines or stamped\n")
        return 2
    mode, args = words[0], words[1:]
    if mode == "exit":
        return 0
    if os.isatty(1):
        rawOutput()
    if mode == "burst":
        return burst(int(args[0]), args[1] if len(args) > 1 else None)
    if mode == "lines":
        return lines(int(args[0]), float(args[1]))
    if mode == "stamped":
        return stamped(int(args[0]))
    sys.stderr.write(f"harness: unknown mode {mode!r}; expected exit, burst, lines or stamped\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
