"""A stand-in harness for `coven attach` tests: it reports its terminal size and echoes input.

It prints "prompt: PROMPT" and "size ROWS COLS" (from `stty size`) at start,
"winch ROWS COLS" on every SIGWINCH, "got: LINE" for every input line, and exits
0 after the line "quit".
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def terminalSize() -> str:
    # stty reads the size of the terminal on its stdin, the session's PTY.
    result = subprocess.run(["stty", "size"], stdin=0, capture_output=True, text=True, check=True)
    return result.stdout.strip()


def write(text: str) -> None:
    os.write(1, text.encode("utf-8"))


def windowChanged(signalNumber: int, frame: object) -> None:
    write(f"winch {terminalSize()}\n")


def main(prompt: str) -> int:
    signal.signal(signal.SIGWINCH, windowChanged)
    write(f"prompt: {prompt}\n")
    write(f"size {terminalSize()}\n")
    for line in sys.stdin:
        line = line.rstrip("\r\n")
        if line == "quit":
            write("bye\n")
            return 0
        write(f"got: {line}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ""))
