"""A stand-in coding-agent CLI for tests; the prompt selects its behaviour.

The prompt is one argument of the form "MODE ARG...":

    print TEXT          print TEXT and exit 0
    exit CODE           print "exiting CODE" and exit with CODE
    echo                print "ready", then echo each input line as "got: LINE"
                        until the line "quit"
    sleep               print "ready" and wait until killed
    ignore-term         ignore SIGTERM, print "ready" and wait
    grandchild FILE     start a child that ignores SIGTERM and SIGHUP, write both
                        pids to FILE,
                        print "ready" and wait
    leave-behind FILE   start a child that ignores SIGHUP and keeps the PTY open,
                        write its pid to FILE, print "started" and exit 0
    split-utf8          print "before" and the first byte of "é", wait for an
                        input line, then print its second byte and " after"
    bytes HEX           write the bytes HEX and exit 0
    burst SIZE          write SIZE bytes of a known pattern and exit 0
    wait-burst SIZE     print "ready", wait for an input line, then write SIZE bytes
                        of the pattern and exit 0; no echo, no output processing
    pieces HEX...       write each piece of bytes, waiting for an input line
                        before every piece after the first; no echo
    lengths             print "ready", then the length of each input line, until
                        the line "quit"
    env NAME...         print NAME=value for each variable, then the window size
    query               send a cursor position query, print the reply, exit 0
    nice                print "nice=N", N being this process's nice value
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import termios
import time
import tty


def pattern(size: int) -> bytes:
    """
    Return SIZE bytes of numbered lines, the same for the harness and the tests.
    """
    chunks = []
    total = 0
    number = 0
    while total < size:
        line = f"line {number:08d} abcdefghijklmnopqrstuvwxyz0123456789\n".encode("ascii")
        chunks.append(line)
        total += len(line)
        number += 1
    return b"".join(chunks)[:size]


def write(data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(1, view)
        view = view[written:]


def rawOutput() -> None:
    # Turn off output processing (newline to CRLF) so bytes arrive unchanged.
    attributes = termios.tcgetattr(1)
    attributes[1] &= ~termios.OPOST
    termios.tcsetattr(1, termios.TCSANOW, attributes)


def noEcho() -> None:
    attributes = termios.tcgetattr(0)
    attributes[3] &= ~termios.ECHO
    termios.tcsetattr(0, termios.TCSANOW, attributes)


def waitForever() -> None:
    while True:
        signal.pause()


def main(prompt: str) -> int:
    mode, _, argument = prompt.partition(" ")

    if mode == "print":
        write(argument.encode("utf-8") + b"\n")
        return 0

    if mode == "exit":
        write(f"exiting {argument}\n".encode("ascii"))
        return int(argument)

    if mode == "echo":
        write(b"ready\n")
        for line in sys.stdin:
            line = line.rstrip("\r\n")
            if line == "quit":
                write(b"bye\n")
                return 0
            write(f"got: {line}\n".encode("utf-8"))
        return 0

    if mode == "sleep":
        write(b"ready\n")
        waitForever()

    if mode == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        write(b"ready\n")
        waitForever()

    if mode == "grandchild":
        # "ready" is printed only once the child ignores the signals, so a
        # kill sent after it cannot reach the child first.
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import signal, sys\n"
                "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                "signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
                "print('child ready', flush=True, file=sys.stderr)\n"
                "sys.stderr.close()\n"
                "signal.pause()",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        assert child.stderr is not None
        child.stderr.readline()
        with open(argument + ".tmp", "w") as file:
            file.write(f"{os.getpid()} {child.pid}\n")
        os.replace(argument + ".tmp", argument)
        write(b"ready\n")
        waitForever()

    if mode == "leave-behind":
        # The child writes to a pipe once it ignores SIGHUP, and the harness
        # exits only after reading that, so the hang-up cannot reach it first.
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import signal, sys\n"
                "signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
                "sys.stdin.close()\n"
                "print('child ready', flush=True, file=sys.stderr)\n"
                "signal.pause()",
            ],
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        assert child.stderr is not None
        child.stderr.readline()
        with open(argument + ".tmp", "w") as file:
            file.write(f"{child.pid}\n")
        os.replace(argument + ".tmp", argument)
        write(b"started\n")
        return 0

    if mode == "split-utf8":
        noEcho()
        encoded = "é".encode("utf-8")
        write(b"before " + encoded[:1])
        sys.stdin.readline()
        write(encoded[1:] + b" after\n")
        return 0

    if mode == "bytes":
        rawOutput()
        write(bytes.fromhex(argument))
        return 0

    if mode == "burst":
        rawOutput()
        write(pattern(int(argument)))
        return 0

    if mode == "wait-burst":
        noEcho()
        rawOutput()
        write(b"ready\n")
        sys.stdin.readline()
        write(pattern(int(argument)))
        return 0

    if mode == "pieces":
        noEcho()
        rawOutput()
        for index, piece in enumerate(argument.split()):
            if index:
                sys.stdin.readline()
            write(bytes.fromhex(piece))
        return 0

    if mode == "lengths":
        write(b"ready\n")
        for line in sys.stdin:
            line = line.rstrip("\r\n")
            if line == "quit":
                return 0
            write(f"length {len(line)}\n".encode("ascii"))
        return 0

    if mode == "env":
        for name in argument.split():
            write(f"{name}={os.environ.get(name, '<unset>')}\n".encode("utf-8"))
        rows, columns = os.get_terminal_size(1).lines, os.get_terminal_size(1).columns
        write(f"size={columns}x{rows}\n".encode("ascii"))
        write(f"cwd={os.getcwd()}\n".encode("utf-8"))
        return 0

    if mode == "query":
        tty.setraw(0)
        write(b"\x1b[6n")
        reply = b""
        deadline = time.monotonic() + 10
        while not reply.endswith(b"R") and time.monotonic() < deadline:
            reply += os.read(0, 64)
        rawOutput()
        write(b"reply: " + reply.replace(b"\x1b", b"ESC") + b"\n")
        return 0

    if mode == "nice":
        write(f"nice={os.getpriority(os.PRIO_PROCESS, 0)}\n".encode("ascii"))
        return 0

    write(f"unknown mode {mode!r}\n".encode("utf-8"))
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ""))
