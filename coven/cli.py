# -*- test-case-name: tests.test_cli -*-
"""The `coven` command: sessions, attach and daemon control over the daemon's Unix socket."""

from __future__ import annotations

import argparse
import codecs
import datetime
import errno
import json
import os
import re
import shlex
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import termios
import time
import traceback
import tty
from typing import Any, Awaitable, Callable

from twisted.internet import defer, main as reactorMain, task
from twisted.internet.interfaces import IReadDescriptor
from twisted.python.failure import Failure
from zope.interface import implementer

from coven import __version__
from coven.client import (
    FINAL_EVENT_KINDS,
    CovenAPIError,
    CovenClient,
    CovenClientError,
    DaemonNotRunning,
    DaemonUnreachable,
    IncompatibleDaemon,
    eventPayload,
    outputBytes,
)
from coven.harnesses import HarnessRegistry, interpreterProblem
from coven.home import homeProblem, isCovenDaemon, processAlive, processStopped
from coven.records import Event, SessionRecord
from coven.settings import SETTINGS_FILE, loadSettings
from coven.store import SCHEMA_VERSION, connectReadOnly, databaseProblem

EXIT_OK = 0
EXIT_API_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3

# The byte a terminal sends for Ctrl-], telnet's escape key too.
DETACH_KEY = b"\x1d"
# An id prefix shorter than this is never shown, so table ids keep one width.
SHORT_ID_LENGTH = 8
# Seconds `coven daemon start` waits for the daemon to respond to the health check.
START_TIMEOUT = 20.0
# Seconds `coven daemon stop` waits for the process to end: the daemon first
# kills live sessions, which may take their kill grace period (3 s by default).
STOP_TIMEOUT = 30.0
POLL_INTERVAL = 0.05


class UsageError(Exception):
    """
    The command line is valid syntax but cannot be carried out as given.
    """


class CommandFailed(Exception):
    """
    A command failed outside the API, for example twistd could not start.
    """


# Output


def printJSON(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False, separators=(",", ":")))


def printReply(client: CovenClient) -> None:
    """
    Print the body of the client's latest reply exactly as the daemon sent it.
    """
    assert client.lastReply is not None
    sys.stdout.buffer.write(client.lastReply.content.rstrip(b"\n") + b"\n")
    sys.stdout.flush()


def writeAll(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            # A terminal shared with another program may have been left
            # non-blocking; wait until it takes more.
            time.sleep(0.01)
            continue
        view = view[written:]


def describeAPIError(error: CovenAPIError) -> str:
    # Messages and details quote request values, such as a --cwd, which may
    # hold control characters.
    text = f"{error.message} [{error.code}"
    if error.details:
        text += "; " + ", ".join(
            f"{name}={value if isinstance(value, str) else json.dumps(value)}"
            for name, value in error.details.items()
        )
    return printable(text + "]")


def nonNegativeInteger(value: str) -> int:
    """
    Parse an option value that must be a whole number of 0 or more.
    """
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer: {value!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {number}")
    return number


def parseTimestamp(value: str) -> datetime.datetime | None:
    try:
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def formatAge(timestamp: str, now: datetime.datetime | None = None) -> str:
    """
    Return how long ago C{timestamp} was, in the largest whole unit: C{42s},
    C{5m}, C{3h} or C{2d}.
    """
    moment = parseTimestamp(timestamp)
    if moment is None:
        return "?"
    now = now or datetime.datetime.now(datetime.timezone.utc)
    seconds = max(0, int((now - moment).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def shortIds(ids: list[str]) -> dict[str, str]:
    """
    Map each id to its shortest prefix of at least L{SHORT_ID_LENGTH}
    characters that no other id in C{ids} shares.
    """
    shortest: dict[str, str] = {}
    for sessionId in ids:
        length = SHORT_ID_LENGTH
        while length < len(sessionId) and any(
            other != sessionId and other.startswith(sessionId[:length]) for other in ids
        ):
            length += 1
        shortest[sessionId] = sessionId[:length]
    return shortest


def describeStatus(session: SessionRecord) -> str:
    status = session.status
    if session.exit_code is not None and status != "running":
        status += f" ({session.exit_code})"
    if session.archived_at is not None:
        status += ", archived"
    return status


# C0 and C1 control characters and DEL, which a terminal acts on.
_CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """
    Return C{text} with control characters written as C{\\xNN} escapes, so a
    title or path printed in a listing cannot move the cursor or recolour the
    terminal.
    """
    return _CONTROL_CHARACTERS.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def oneLine(text: str) -> str:
    return printable(" ".join(text.split()))


def printTable(rows: list[list[str]]) -> None:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths)]
        print("  ".join([*cells, row[-1]]).rstrip())


# Sessions


async def allSessions(client: CovenClient) -> list[SessionRecord]:
    """
    List every session, archived ones included, newest first.
    """
    active = await client.listSessions()
    archived = await client.listSessions(archived=True)
    return sorted(active + archived, key=lambda session: session.created_at, reverse=True)


async def resolveSessionId(client: CovenClient, prefix: str) -> str:
    """
    Return the one session id that starts with C{prefix}.

    A prefix that matches nothing is returned as given, so the daemon reports
    it as C{session_not_found}.

    @raise UsageError: the prefix is empty or matches more than one session.
    """
    if not prefix:
        raise UsageError("The session id is empty; pass an id or a unique prefix of one.")
    sessions = await allSessions(client)
    matches = [session.id for session in sessions if session.id.startswith(prefix)]
    if prefix in matches or not matches:
        return prefix
    if len(matches) > 1:
        raise UsageError(
            f"Session id prefix {prefix!r} matches {len(matches)} sessions ({', '.join(matches)});"
            " type more of the id."
        )
    return matches[0]


def projectRoot(folder: str) -> str:
    """
    Return the top level of the git work tree containing C{folder}, else C{folder}.
    """
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return folder
    top = result.stdout.strip()
    if result.returncode == 0 and top:
        return top
    return folder


def terminalFD() -> int | None:
    for fd in (0, 1):
        if os.isatty(fd):
            return fd
    return None


def terminalSize() -> tuple[int, int] | None:
    """
    Return the controlling terminal's size as C{(cols, rows)}, or C{None}
    when neither stdin nor stdout is a terminal.
    """
    fd = terminalFD()
    if fd is None:
        return None
    size = os.get_terminal_size(fd)
    if size.columns <= 0 or size.lines <= 0:
        return None
    return size.columns, size.lines


async def runCommand(reactor: Any, client: CovenClient, args: argparse.Namespace) -> int:
    if args.json and not args.detach:
        raise UsageError("--json prints the launched session and needs --detach.")
    try:
        currentFolder = os.getcwd()
    except FileNotFoundError:
        raise UsageError(
            "The current folder no longer exists; change to a project folder and run again."
        ) from None
    size = terminalSize()
    session = await client.launch(
        projectRoot(currentFolder),
        args.harness,
        args.prompt,
        cwd=os.path.abspath(args.cwd) if args.cwd else currentFolder,
        title=args.title,
        cols=size[0] if size else None,
        rows=size[1] if size else None,
    )
    if args.json:
        printReply(client)
        return EXIT_OK
    if args.detach:
        print(session.id)
        return EXIT_OK
    return await attachSession(reactor, client, session)


async def sessionsCommand(reactor: Any, client: CovenClient, args: argparse.Namespace) -> int:
    active = await client.listSessions()
    activeBody = client.lastReply.body if client.lastReply else []
    archived = await client.listSessions(archived=True)
    archivedBody = client.lastReply.body if client.lastReply else []

    if args.json:
        if args.all:
            printJSON(activeBody + archivedBody)
        else:
            printJSON(activeBody)
        return EXIT_OK

    everything = sorted(active + archived, key=lambda session: session.created_at, reverse=True)
    listed = everything if args.all else active
    if not listed:
        print("No sessions." if args.all else "No sessions; `coven sessions --all` includes archived ones.")
        return EXIT_OK
    ids = shortIds([session.id for session in everything])
    rows = [["ID", "HARNESS", "STATUS", "AGE", "TITLE"]]
    for session in listed:
        rows.append(
            [
                ids[session.id],
                session.harness,
                describeStatus(session),
                formatAge(session.created_at),
                oneLine(session.title),
            ]
        )
    printTable(rows)
    return EXIT_OK


async def showCommand(reactor: Any, client: CovenClient, args: argparse.Namespace) -> int:
    session = await client.getSession(await resolveSessionId(client, args.id))
    if args.json:
        printReply(client)
        return EXIT_OK
    fields = [
        ("id", session.id),
        ("title", session.title),
        ("harness", session.harness),
        ("status", session.status),
        ("exit code", "-" if session.exit_code is None else str(session.exit_code)),
        ("project", session.project_root),
        ("cwd", session.cwd),
        ("created", f"{session.created_at} ({formatAge(session.created_at)} ago)"),
        ("updated", session.updated_at),
        ("archived", session.archived_at or "-"),
    ]
    for name, value in fields:
        print(f"{name + ':':<11}{printable(value)}")
    return EXIT_OK


async def eventsCommand(reactor: Any, client: CovenClient, args: argparse.Namespace) -> int:
    sessionId = await resolveSessionId(client, args.id)
    cursor = args.after
    while True:
        page = await client.events(sessionId, afterSeq=cursor)
        assert client.lastReply is not None
        if args.json:
            printReply(client)
        else:
            for event in client.lastReply.body["events"]:
                printJSON(event)
        if not page.hasMore or not page.events:
            return EXIT_OK
        cursor = page.events[-1].seq


async def logCommand(reactor: Any, client: CovenClient, args: argparse.Namespace) -> int:
    sessionId = await resolveSessionId(client, args.id)
    cursor = 0
    while True:
        page = await client.events(sessionId, afterSeq=cursor)
        for event in page.events:
            writeAll(1, outputBytes(event))
        if not page.hasMore or not page.events:
            return EXIT_OK
        cursor = page.events[-1].seq


async def sendCommand(reactor: Any, client: CovenClient, args: argparse.Namespace) -> int:
    sessionId = await resolveSessionId(client, args.id)
    # A terminal's Enter key sends a carriage return; the PTY turns it into a
    # newline for programs that read lines.
    data = args.text if args.no_enter else args.text + "\r"
    if not data:
        raise UsageError("There is nothing to send: TEXT is empty and --no-enter was given.")
    await client.sendInput(sessionId, data)
    if args.json:
        printReply(client)
    return EXIT_OK


def recordCommand(
    call: Callable[[CovenClient, str], Awaitable[Any]], done: str
) -> Callable[[Any, CovenClient, argparse.Namespace], Awaitable[int]]:
    """
    Build the handler of a command that applies one request to one session.
    """

    async def handler(reactor: Any, client: CovenClient, args: argparse.Namespace) -> int:
        sessionId = await resolveSessionId(client, args.id)
        await call(client, sessionId)
        if args.json:
            printReply(client)
        else:
            print(done.format(sessionId=sessionId))
        return EXIT_OK

    return handler


killCommand = recordCommand(CovenClient.kill, "Killed session {sessionId}.")
archiveCommand = recordCommand(CovenClient.archive, "Archived session {sessionId}.")
summonCommand = recordCommand(CovenClient.summon, "Summoned session {sessionId}.")
_deleteSession = recordCommand(CovenClient.delete, "Deleted session {sessionId} and its events.")


async def sacrificeCommand(reactor: Any, client: CovenClient, args: argparse.Namespace) -> int:
    if not args.yes:
        # Check the session first, so the confirmation names what would go.
        session = await client.getSession(await resolveSessionId(client, args.id))
        if session.status == "running":
            raise UsageError(
                f"Session {session.id} is still running; kill it before coven sacrifice."
            )
        raise UsageError(
            f"coven sacrifice deletes session {session.id} ({oneLine(session.title)}) and all its"
            " events for good; add --yes to confirm."
        )
    return await _deleteSession(reactor, client, args)


# Attach


@implementer(IReadDescriptor)
class _TerminalReader:
    """
    Reads the bytes typed into a terminal and hands them to a callback.
    """

    def __init__(self, fd: int, received: Callable[[bytes], None], closed: Callable[[], None]) -> None:
        self._fd = fd
        self._received = received
        self._closed = closed

    def fileno(self) -> int:
        return self._fd

    def doRead(self) -> object:
        try:
            data = os.read(self._fd, 4096)
        except OSError as error:
            if error.errno in (errno.EAGAIN, errno.EINTR):
                return None
            # EIO: the terminal was hung up.
            return reactorMain.CONNECTION_LOST
        if not data:
            return reactorMain.CONNECTION_DONE
        self._received(data)
        return None

    def connectionLost(self, reason: Failure) -> None:
        self._closed()

    def logPrefix(self) -> str:
        return "terminal"


class Attachment:
    """
    Shows a session's output from its first event, then follows it.

    When stdin is a terminal and the session is running, the terminal is put
    in raw mode, every byte typed goes to the session, Ctrl-] detaches, and the
    terminal's size is sent at the start and on every SIGWINCH.

    @ivar finalEvent: the session's C{exit} or C{orphaned} event, once seen.
    """

    def __init__(self, reactor: Any, client: CovenClient, session: SessionRecord) -> None:
        self._reactor = reactor
        self._client = client
        self.session = session
        self.finalEvent: Event | None = None
        # Whether the output written so far ends with a newline.
        self.outputEndsLine = True
        self._done: defer.Deferred[str] = defer.Deferred()
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._pendingInput = ""
        self._sending = False
        self._detaching = False
        self._resizing = False
        self._resizeAgain = False
        self._savedMode: list[Any] | None = None
        self._stopping = False

    async def run(self) -> str:
        """
        Attach until the session ends or the user detaches.

        @return: C{"ended"}, C{"detached"}, or C{"stopped"} when a signal
            stopped this command first.
        """
        interactive = self.session.status == "running" and os.isatty(0)
        copying = None
        reader = None
        previousHandler = None
        # A SIGTERM or Ctrl-C stops the reactor while this coroutine waits, and
        # its finally clause would then run only when garbage collection closes
        # it at exit, so the terminal is restored before shutdown too.
        shutdownTrigger = self._reactor.addSystemEventTrigger(
            "before", "shutdown", self._beforeShutdown
        )
        try:
            if interactive:
                self._savedMode = termios.tcgetattr(0)
                tty.setraw(0)
                previousHandler = signal.signal(signal.SIGWINCH, self._windowChanged)
                reader = _TerminalReader(0, self._typed, self._terminalClosed)
                self._reactor.addReader(reader)
                self._sendSize()

            copying = defer.Deferred.fromCoroutine(self._copyOutput())
            copying.addBoth(self._finish)
            try:
                return await self._done
            except Exception:
                # Shutting down closes the connection to the daemon.
                if self._stopping:
                    return "stopped"
                raise
        finally:
            if copying is not None and not copying.called:
                copying.cancel()
            if reader is not None:
                self._reactor.removeReader(reader)
            if previousHandler is not None:
                signal.signal(signal.SIGWINCH, previousHandler)
            self._restoreTerminal()
            # The reactor removes a trigger once it has fired.
            if not self._stopping:
                self._reactor.removeSystemEventTrigger(shutdownTrigger)

    def _beforeShutdown(self) -> None:
        self._stopping = True
        self._restoreTerminal()

    def _restoreTerminal(self) -> None:
        if self._savedMode is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, self._savedMode)
            self._savedMode = None

    async def _copyOutput(self) -> str:
        async for event in self._client.followEvents(self.session.id):
            data = outputBytes(event)
            if data:
                writeAll(1, data)
                self.outputEndsLine = data.endswith(b"\n")
            if event.kind in FINAL_EVENT_KINDS:
                self.finalEvent = event
        return "ended"

    def _finish(self, result: str | Failure) -> None:
        if self._done.called:
            return
        if isinstance(result, Failure):
            self._done.errback(result)
        else:
            self._done.callback(result)

    # Input

    def _typed(self, data: bytes) -> None:
        if self._detaching:
            return
        index = data.find(DETACH_KEY)
        if index >= 0:
            data = data[:index]
            self._detaching = True
        self._pendingInput += self._decoder.decode(data)
        self._sendInput()

    def _terminalClosed(self) -> None:
        self._detaching = True
        self._sendInput()

    def _sendInput(self) -> None:
        # Only one request is in flight at a time, so typed bytes stay in
        # order. Bytes typed meanwhile go out with the next request.
        if self._sending:
            return
        if not self._pendingInput:
            if self._detaching:
                self._finish("detached")
            return
        data, self._pendingInput = self._pendingInput, ""
        self._sending = True
        sent = defer.Deferred.fromCoroutine(self._client.sendInput(self.session.id, data))
        sent.addCallbacks(self._inputSent, self._inputFailed)

    def _inputSent(self, _: object) -> None:
        self._sending = False
        self._sendInput()

    def _inputFailed(self, failure: Failure) -> None:
        self._sending = False
        if failure.check(CovenAPIError) and failure.value.code == "session_not_live":
            # The session has ended, and its exit event ends the attachment.
            self._pendingInput = ""
            self._sendInput()
            return
        self._finish(failure)

    # Window size

    def _windowChanged(self, signalNumber: int, frame: Any) -> None:
        self._reactor.callFromThread(self._sendSize)

    def _sendSize(self) -> None:
        if self._resizing:
            self._resizeAgain = True
            return
        size = terminalSize()
        if size is None:
            return
        self._resizing = True
        resized = defer.Deferred.fromCoroutine(self._client.resize(self.session.id, *size))
        resized.addErrback(self._resizeFailed)
        resized.addBoth(self._resized)

    def _resizeFailed(self, failure: Failure) -> None:
        if failure.check(CovenAPIError) and failure.value.code == "session_not_live":
            return
        self._finish(failure)

    def _resized(self, _: object) -> None:
        self._resizing = False
        if self._resizeAgain:
            self._resizeAgain = False
            self._sendSize()


async def attachSession(reactor: Any, client: CovenClient, session: SessionRecord) -> int:
    attachment = Attachment(reactor, client, session)
    outcome = await attachment.run()
    if outcome == "stopped":
        sys.stderr.write(
            f"\r\nStopped following session {session.id}; it keeps running."
            f" Reattach with `coven attach {session.id[:SHORT_ID_LENGTH]}`.\n"
        )
        return EXIT_OK
    if outcome == "detached":
        # The harness's last line may not end with a newline.
        sys.stderr.write(
            f"\r\nDetached from session {session.id}; it keeps running."
            f" Reattach with `coven attach {session.id[:SHORT_ID_LENGTH]}`.\n"
        )
        return EXIT_OK

    final = attachment.finalEvent
    # The harness's last line, such as "^C" echoed before a SIGINT, may not
    # end with a newline.
    start = "" if attachment.outputEndsLine else "\r\n"
    if final is None:
        current = await client.getSession(session.id)
        sys.stderr.write(f"{start}Session {session.id} is {describeStatus(current)}.\n")
    elif final.kind == "exit":
        payload = eventPayload(final)
        if payload.get("signal"):
            cause = f"signal {payload['signal']}"
        elif payload.get("exitCode") is not None:
            cause = f"exit code {payload['exitCode']}"
        else:
            cause = payload.get("reason") or "no exit code"
        sys.stderr.write(f"{start}Session {session.id} ended: {payload.get('status')}, {printable(str(cause))}.\n")
    else:
        reason = eventPayload(final).get("reason", "the daemon restarted")
        sys.stderr.write(f"{start}Session {session.id} was orphaned: {printable(str(reason))}.\n")
    return EXIT_OK


async def attachCommand(reactor: Any, client: CovenClient, args: argparse.Namespace) -> int:
    session = await client.getSession(await resolveSessionId(client, args.id))
    return await attachSession(reactor, client, session)


# Daemon control


def pidfilePath(home: str) -> str:
    return os.path.join(home, "coven.pid")


def readPid(path: str) -> int | None:
    try:
        with open(path) as file:
            return int(file.read().strip())
    except (OSError, ValueError):
        return None


def twistdCommand(home: str) -> list[str]:
    """
    Build the argv that runs the daemon under twistd with its pidfile and log in C{home}.

    C{python -m twisted} runs C{twist}, which neither daemonizes nor writes a
    pidfile, so twistd's entry point is called directly.
    """
    return [
        sys.executable,
        "-c",
        "from twisted.scripts.twistd import run; run()",
        "--pidfile",
        pidfilePath(home),
        "--logfile",
        os.path.join(home, "coven.log"),
        "coven",
        "--home",
        home,
    ]


async def sleep(reactor: Any, seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


async def daemonHealth(client: CovenClient) -> Any:
    """
    Return the daemon's health, or C{None} when it is not running.
    """
    try:
        return await client.handshake()
    except DaemonNotRunning:
        return None


def logPointer(logPath: str, sizeBefore: int) -> str:
    """
    Return "; see LOGPATH" when the log has grown past C{sizeBefore} bytes,
    else "". A start refused before twistd opens its log, such as for a home
    in use, has nothing in the log to point to.
    """
    try:
        written = os.path.getsize(logPath) > sizeBefore
    except OSError:
        written = False
    return f"; see {logPath}" if written else ""


async def startDaemon(reactor: Any, client: CovenClient) -> int:
    health = await daemonHealth(client)
    if health is not None:
        pid = health.daemon.pid if health.daemon else "unknown"
        print(f"Coven daemon is already running (pid {pid}) at {client.socketPath}.")
        return EXIT_OK

    home = client.home
    os.makedirs(home, mode=0o700, exist_ok=True)
    pidfile = pidfilePath(home)
    stalePid = readPid(pidfile)
    if stalePid is not None and not isCovenDaemon(stalePid):
        # A daemon that crashed left it, and after a reboot its pid may belong
        # to another process, which twistd would take for a running daemon.
        os.unlink(pidfile)
    logPath = os.path.join(home, "coven.log")
    # The log names the sessions' working folders. twistd would create it
    # with the shell's umask, before it sets its own, and the daemon's umask
    # is the shell's again for its harnesses. twistd gives the files of its
    # log rotations the mode of the log it found.
    try:
        os.close(os.open(logPath, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        os.chmod(logPath, 0o600)
        logSize = os.path.getsize(logPath)
    except OSError as error:
        raise CommandFailed(
            f"Cannot use the log file {logPath}: {error.strerror or error}; move it away and start again."
        ) from None
    with tempfile.TemporaryFile() as output:
        # twistd's first process exits once the daemonized one has started its
        # service, with a non-zero code and a message when that failed.
        process = subprocess.Popen(
            twistdCommand(home), stdin=subprocess.DEVNULL, stdout=output, stderr=output
        )
        deadline = time.monotonic() + START_TIMEOUT
        while process.poll() is None:
            if time.monotonic() > deadline:
                process.kill()
                process.wait()
                raise CommandFailed(
                    f"twistd did not finish starting the daemon within {START_TIMEOUT:.0f} s;"
                    f" see {logPath}."
                )
            await sleep(reactor, POLL_INTERVAL)
        output.seek(0)
        message = output.read().decode("utf-8", "replace").strip().removeprefix("coven: ")
    if process.returncode != 0:
        raise CommandFailed(
            f"twistd could not start the daemon (exit code {process.returncode}):"
            f" {message.rstrip('.') or 'no message'}{logPointer(logPath, logSize)}."
        )

    while True:
        health = await daemonHealth(client)
        if health is not None:
            break
        if time.monotonic() > deadline:
            raise CommandFailed(
                f"The daemon started but did not respond on {client.socketPath} within"
                f" {START_TIMEOUT:.0f} s; see {logPath}."
            )
        await sleep(reactor, POLL_INTERVAL)

    pid = health.daemon.pid if health.daemon else readPid(pidfilePath(home))
    print(f"Coven daemon started (pid {pid}) at {client.socketPath}; log: {logPath}")
    warnIgnoredFiles(home)
    return EXIT_OK


def warnIgnoredFiles(home: str) -> None:
    """
    Print a warning for each file of C{home} that the daemon reads at start
    and ignores because it is invalid, as the daemon only logs it.
    """
    settings = loadSettings(os.path.join(home, SETTINGS_FILE))
    if settings.error:
        sys.stderr.write(
            "coven: warning: settings ignored, so the daemon uses the defaults (redaction on):"
            f" {printable(settings.error)}\n"
        )
    harnesses = HarnessRegistry(os.path.join(home, "harnesses.toml"))
    if harnesses.configError:
        sys.stderr.write(
            "coven: warning: harness configuration ignored, so the daemon offers only the built-in"
            f" harnesses: {printable(harnesses.configError)}\n"
        )


async def stopDaemon(reactor: Any, client: CovenClient) -> int:
    pidfile = pidfilePath(client.home)
    pid = readPid(pidfile)
    if pid is None or not isCovenDaemon(pid):
        if pid is not None and os.path.exists(pidfile):
            # twistd removes its pidfile on a clean stop, so this one was left
            # by a daemon that crashed.
            os.unlink(pidfile)
        health = await daemonHealth(client)
        if health is not None:
            running = f" (pid {health.daemon.pid})" if health.daemon else ""
            raise CommandFailed(
                f"The Coven daemon at {client.socketPath}{running} was not started by"
                f" `coven daemon start`: {pidfile} is missing. Stop it the way it was started:"
                " Ctrl-C in the terminal of `twistd -n coven`, `kill` with its pid, or"
                " `systemctl --user stop coven`."
            )
        raise DaemonNotRunning(client.socketPath, advice="there is nothing to stop")

    # The daemon kills its running sessions as it stops, so the user hears of them.
    listError: CovenClientError | None = None
    try:
        runningIds = [session.id for session in await client.listSessions() if session.status == "running"]
    except CovenClientError as error:
        runningIds = []
        listError = error
    running = len(runningIds)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while processAlive(pid):
        if time.monotonic() > deadline:
            if processStopped(pid):
                raise CommandFailed(
                    f"The Coven daemon (pid {pid}) is stopped, as by SIGSTOP or Ctrl-Z, so it"
                    f" cannot act on SIGTERM; `kill -CONT {pid}` lets it finish stopping."
                )
            raise CommandFailed(
                f"The Coven daemon (pid {pid}) did not stop within {STOP_TIMEOUT:.0f} s of"
                f" SIGTERM; see {os.path.join(client.home, 'coven.log')}."
            )
        await sleep(reactor, POLL_INTERVAL)
    killed = ""
    logPath = os.path.join(client.home, "coven.log")
    if listError is not None:
        print(
            f"Coven daemon stopped (pid {pid}). Its sessions could not be listed before the stop"
            f" ({listError}), so whether the ends of those it killed are in the database is"
            f" unknown; see {logPath}.",
            file=sys.stderr,
        )
        return EXIT_API_ERROR
    unrecorded = unrecordedExits(client.home, runningIds) if running else []
    sessions = "1 running session" if running == 1 else f"{running} running sessions"
    if unrecorded is None:
        print(
            f"Coven daemon stopped (pid {pid}). It killed {sessions}, but the database could not"
            f" be read to check that their ends are in it; `coven doctor` checks it, and {logPath}"
            " may say more.",
            file=sys.stderr,
        )
        return EXIT_API_ERROR
    elif unrecorded:
        print(
            f"Coven daemon stopped (pid {pid}). It killed {sessions}, but the end of"
            f" {len(unrecorded)} of them is not in the database: {', '.join(unrecorded)};"
            f" see {logPath}.",
            file=sys.stderr,
        )
        return EXIT_API_ERROR
    elif running == 1:
        killed = " It killed 1 running session and recorded how it ended."
    elif running:
        killed = f" It killed {sessions} and recorded how they ended."
    print(f"Coven daemon stopped (pid {pid}).{killed}")
    return EXIT_OK


def unrecordedExits(home: str, sessionIds: list[str]) -> list[str] | None:
    """
    Return the sessions of C{sessionIds} whose last stored event is not their
    exit, or C{None} when the database cannot be read.
    """
    try:
        connection = connectReadOnly(os.path.join(home, "coven.sqlite3"))
        try:
            unrecorded = []
            for sessionId in sessionIds:
                row = connection.execute(
                    "SELECT kind FROM events WHERE session_id = ? ORDER BY seq DESC LIMIT 1", (sessionId,)
                ).fetchone()
                if row is None or row[0] != "exit":
                    unrecorded.append(sessionId)
        finally:
            connection.close()
    except sqlite3.Error:
        return None
    return unrecorded


async def daemonStartCommand(reactor: Any, client: CovenClient, args: argparse.Namespace) -> int:
    return await startDaemon(reactor, client)


async def daemonStopCommand(reactor: Any, client: CovenClient, args: argparse.Namespace) -> int:
    return await stopDaemon(reactor, client)


async def daemonRestartCommand(reactor: Any, client: CovenClient, args: argparse.Namespace) -> int:
    if await daemonHealth(client) is not None:
        await stopDaemon(reactor, client)
    # A new client: the old one's handshake belongs to the stopped daemon.
    return await startDaemon(reactor, CovenClient(client.home, reactor))


async def daemonStatusCommand(reactor: Any, client: CovenClient, args: argparse.Namespace) -> int:
    health = await client.handshake()
    if args.json:
        printReply(client)
        return EXIT_OK
    print(f"Coven daemon is running at {client.socketPath}")
    if health.daemon is not None:
        print(f"pid:         {health.daemon.pid}")
        print(f"started:     {health.daemon.startedAt}")
        print(f"listening:   {health.daemon.socket}")
    print(f"API:         {health.apiVersion}")
    print(f"version:     {health.covenVersion}")
    pid = readPid(pidfilePath(client.home))
    print(f"pidfile:     {pidfilePath(client.home) if pid is not None else '- (not started by coven daemon start)'}")
    return EXIT_OK


# Doctor


class _Report:
    """
    Lines of `coven doctor`, each marked ok, warn or FAIL.
    """

    def __init__(self) -> None:
        self.failures = 0

    def ok(self, text: str) -> None:
        print(f"ok    {text}")

    def warn(self, text: str) -> None:
        print(f"warn  {text}")

    def fail(self, text: str) -> None:
        self.failures += 1
        print(f"FAIL  {text}")


def checkPrivate(report: _Report, what: str, path: str, expectedMode: int, isKind: Callable[[int], bool]) -> bool:
    """
    Report whether C{path} exists, is of the expected kind, belongs to this
    user and gives others no access.

    @return: whether C{path} exists.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    mode = stat.S_IMODE(info.st_mode)
    if not isKind(info.st_mode):
        report.fail(f"{what} {path} has the wrong file type")
    elif info.st_uid != os.getuid():
        report.fail(f"{what} {path} belongs to uid {info.st_uid}, not to you (uid {os.getuid()})")
    elif mode & 0o077:
        report.fail(f"{what} {path} has mode {mode:04o}, open to others; run `chmod {expectedMode:o} {path}`")
    else:
        report.ok(f"{what} {path} (mode {mode:04o})")
    return True


def checkDatabase(report: _Report, path: str) -> None:
    try:
        connection = connectReadOnly(path)
        try:
            (result,) = connection.execute("PRAGMA integrity_check").fetchone()
            version, problem = databaseProblem(connection, path)
        finally:
            connection.close()
    except sqlite3.Error as error:
        report.fail(f"database {path} cannot be read: {error}")
        return
    if result != "ok":
        report.fail(f"database {path}: integrity check failed: {result}")
    elif problem is not None:
        report.fail(problem)
    elif version < SCHEMA_VERSION:
        report.ok(
            f"database {path}: integrity check ok, schema version {version}"
            f" (the daemon upgrades it to {SCHEMA_VERSION} when it starts)"
        )
    else:
        report.ok(f"database {path}: integrity check ok, schema version {version}")


def checkSettings(report: _Report, path: str, daemonStartedAt: str | None) -> None:
    """
    Report whether the settings file can be used, and whether the running
    daemon, which started at C{daemonStartedAt} if one runs, read it as it is.
    """
    settings = loadSettings(path)
    if settings.error:
        report.fail(f"settings ignored, so the daemon starts with the defaults (redaction on): {printable(settings.error)}")
    if not os.path.exists(path):
        return
    # The daemon reads the file only when it starts.
    started = parseTimestamp(daemonStartedAt) if daemonStartedAt else None
    try:
        changed = started is not None and os.stat(path).st_mtime > started.timestamp()
    except OSError:
        changed = False
    if settings.error:
        # The failure above names the settings that the next start uses.
        return
    redaction = "on" if settings.redact else "off"
    if changed:
        report.warn(
            f"settings {path} (redaction {redaction}) changed after the running daemon started,"
            " which still uses the settings from before; restart the daemon to apply them"
            " (`coven daemon restart` if `coven daemon start` started it)"
        )
    else:
        report.ok(f"settings {path}: redaction {redaction} (read when the daemon starts)")


async def doctorCommand(reactor: Any, client: CovenClient, args: argparse.Namespace) -> int:
    report = _Report()
    home = client.home

    problem = homeProblem(home)
    if problem is not None:
        # Nothing in the home can be checked.
        report.fail(problem)
        return EXIT_API_ERROR
    if not checkPrivate(report, "home", home, 0o700, stat.S_ISDIR):
        report.warn(f"home {home} does not exist yet; `{client.startCommand}` creates it")
    if not checkPrivate(report, "socket", client.socketPath, 0o600, stat.S_ISSOCK):
        report.warn(f"socket {client.socketPath} does not exist")

    reachable = False
    notRunning = False
    try:
        health = await client.handshake()
    except DaemonNotRunning as error:
        notRunning = True
        report.fail(str(error))
    except (DaemonUnreachable, IncompatibleDaemon, CovenAPIError) as error:
        report.fail(str(error))
    else:
        reachable = True
        pid = health.daemon.pid if health.daemon else "unknown"
        report.ok(f"daemon pid {pid} answers on {client.socketPath}, API {health.apiVersion}, version {health.covenVersion}")

    if reachable:
        capabilities = await client.capabilities()
        if capabilities.harnessConfigError:
            report.fail(f"harness configuration ignored: {printable(capabilities.harnessConfigError)}")
        harnesses = [entry for entry in capabilities.capabilities if entry.harness]
        for entry in harnesses:
            if entry.status == "available":
                report.ok(f"harness {entry.harness}: {entry.executable}")
            else:
                reason = entry.reason or "executable not found on the daemon's PATH"
                report.warn(f"harness {entry.harness}: {reason}")
        # With harnesses.toml ignored, the failure above names the cause.
        usable = any(entry.status == "available" for entry in harnesses)
        if harnesses and not usable and not capabilities.harnessConfigError:
            report.fail(
                "no harness can be launched from the daemon's PATH; install one, such as codex or"
                f" claude, or add one to {os.path.join(home, 'harnesses.toml')} (the README's"
                " Harnesses section has a cat harness to try Coven with)"
            )
    else:
        registry = HarnessRegistry(os.path.join(home, "harnesses.toml"))
        if registry.configError:
            report.fail(f"harness configuration ignored: {printable(registry.configError)}")
        for spec in registry.all():
            executable = spec.resolveExecutable(os.environ.get("PATH"))
            problem = interpreterProblem(executable) if executable else None
            if problem is not None:
                report.warn(f"harness {spec.id}: {problem[0]}. {problem[1]}")
            elif executable and os.sep in spec.command[0]:
                report.ok(f"harness {spec.id}: {executable}")
            elif executable:
                report.ok(f"harness {spec.id}: {executable} (on this shell's PATH)")
            else:
                reason = spec.missingReason(where="this shell's PATH")
                report.warn(f"harness {spec.id}: {reason}")

    startedAt = health.daemon.startedAt if reachable and health.daemon else None
    checkSettings(report, os.path.join(home, SETTINGS_FILE), startedAt)

    database = os.path.join(home, "coven.sqlite3")
    if checkPrivate(report, "database", database, 0o600, stat.S_ISREG):
        checkDatabase(report, database)
    else:
        report.warn(f"database {database} does not exist yet; the daemon creates it")

    if notRunning:
        return EXIT_NOT_RUNNING
    return EXIT_API_ERROR if report.failures else EXIT_OK


# Command line


def buildParser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coven",
        description="Run coding-agent CLIs in the Coven daemon and attach to them.",
        epilog="Exit codes: 0 success, 1 API or command error, 2 usage error, 3 daemon not running.",
    )
    parser.add_argument("--version", action="version", version=f"coven {__version__}")
    parser.add_argument(
        "--home",
        metavar="DIR",
        help="Coven home folder holding coven.sock [default: $COVEN_HOME, else ~/.coven]",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Any, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(handler=handler)
        return sub

    def sessionArgument(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("id", metavar="ID", help="session id, or any unique prefix of one")

    def jsonOption(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--json", action="store_true", help="print the daemon's JSON response as returned")

    run = command("run", runCommand, "launch a harness in the current project and attach to it")
    run.add_argument("harness", metavar="HARNESS", help="harness id, such as codex or claude")
    run.add_argument("prompt", metavar="PROMPT", help="the prompt, passed to the harness as one argument")
    run.add_argument(
        "--cwd", metavar="DIR", help="working folder inside the project [default: the current folder]"
    )
    run.add_argument("--title", metavar="T", help="session title [default: the prompt's first line]")
    run.add_argument("--detach", action="store_true", help="print the session id instead of attaching")
    run.add_argument(
        "--json", action="store_true", help="with --detach, print the session record as returned"
    )

    sessions = command("sessions", sessionsCommand, "list sessions, newest first")
    sessions.add_argument("--all", action="store_true", help="include archived sessions")
    jsonOption(sessions)

    show = command("show", showCommand, "show one session")
    sessionArgument(show)
    jsonOption(show)

    events = command("events", eventsCommand, "print a session's events as JSON lines")
    sessionArgument(events)
    events.add_argument("--after", type=nonNegativeInteger, default=0, metavar="N", help="only events with seq above N")
    events.add_argument("--json", action="store_true", help="print each event page as returned, one per line")

    log = command("log", logCommand, "print a session's output as recorded")
    sessionArgument(log)

    attach = command(
        "attach", attachCommand, "replay a session's output, then follow it; Ctrl-] detaches"
    )
    sessionArgument(attach)

    send = command("send", sendCommand, "send text to a running session, followed by Enter")
    sessionArgument(send)
    send.add_argument(
        "text",
        metavar="TEXT",
        help="the text to type into the session; put -- before a TEXT that starts with -, as in `coven send ID -- -n`",
    )
    send.add_argument("--no-enter", action="store_true", help="send TEXT without a trailing Enter")
    jsonOption(send)
    # argparse takes a TEXT that starts with "-" for an option, and its usage
    # line is the only hint it prints with that error.
    send.usage = send.format_usage().removeprefix("usage: ").rstrip("\n").replace(" ID TEXT", " ID [--] TEXT")

    for name, handler, help in (
        ("kill", killCommand, "kill a running session"),
        ("archive", archiveCommand, "hide a finished session from `coven sessions`"),
        ("summon", summonCommand, "bring an archived session back"),
    ):
        sub = command(name, handler, help)
        sessionArgument(sub)
        jsonOption(sub)

    sacrifice = command("sacrifice", sacrificeCommand, "delete a finished session and its events")
    sessionArgument(sacrifice)
    sacrifice.add_argument("--yes", action="store_true", help="confirm the deletion")
    jsonOption(sacrifice)

    daemon = commands.add_parser("daemon", help="start, stop or check the daemon", description="Control the Coven daemon.")
    actions = daemon.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, handler, help in (
        ("start", daemonStartCommand, "start the daemon under twistd with <home>/coven.pid and <home>/coven.log"),
        ("stop", daemonStopCommand, "stop the daemon named in <home>/coven.pid and wait for it to exit"),
        ("restart", daemonRestartCommand, "stop the daemon if it runs, then start it"),
        ("status", daemonStatusCommand, "show whether the daemon answers, with its pid and socket"),
    ):
        sub = actions.add_parser(name, help=help, description=help)
        sub.set_defaults(handler=handler)
        if name == "status":
            jsonOption(sub)

    command("doctor", doctorCommand, "check the home folder, socket, daemon, harnesses and database")
    return parser


def startCommand(home: str | None) -> str:
    """
    Return the command that starts the daemon of C{home}, with C{--home}
    when the user gave one.
    """
    if home is None:
        return "coven daemon start"
    return f"coven --home {shlex.quote(home)} daemon start"


async def dispatch(reactor: Any, args: argparse.Namespace) -> int:
    """
    Run the chosen command and turn its errors into a message and an exit code.
    """
    client = CovenClient(args.home, reactor, startCommand=startCommand(args.home))
    try:
        return await args.handler(reactor, client, args)
    except UsageError as error:
        sys.stderr.write(f"coven: {error}\n")
        return EXIT_USAGE
    except DaemonNotRunning as error:
        sys.stderr.write(f"coven: {error}\n")
        return EXIT_NOT_RUNNING
    except CovenAPIError as error:
        if getattr(args, "json", False) and error.content:
            sys.stdout.buffer.write(error.content.rstrip(b"\n") + b"\n")
            sys.stdout.flush()
        sys.stderr.write(f"coven: {describeAPIError(error)}\n")
        if error.code == "session_not_found":
            sys.stderr.write("coven: `coven sessions --all` lists every session, archived ones included.\n")
        elif args.handler is runCommand and error.details.get("field") == "projectRoot":
            sys.stderr.write(
                "coven: `coven run` takes the git work tree around the current folder as the"
                " project, else the folder itself; change to the project's folder and run again.\n"
            )
        return EXIT_API_ERROR
    except (DaemonUnreachable, IncompatibleDaemon, CommandFailed) as error:
        sys.stderr.write(f"coven: {error}\n")
        return EXIT_API_ERROR
    except BrokenPipeError:
        # The reader of stdout went away, as with `coven log ID | head`.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        return EXIT_API_ERROR
    except Exception:
        traceback.print_exc()
        return EXIT_API_ERROR


async def _main(reactor: Any, args: argparse.Namespace) -> None:
    code = await dispatch(reactor, args)
    if code:
        raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    """
    Run the `coven` command; argparse exits with code 2 on a usage error.
    """
    parser = buildParser()
    args = parser.parse_args(argv)
    # An empty --home, as from --home "$DIR" with DIR unset, would
    # otherwise fall back to $COVEN_HOME or ~/.coven without a word.
    if args.home == "":
        parser.error("--home is empty; give a folder, or leave it out for $COVEN_HOME or ~/.coven")
    task.react(_main, (args,))
