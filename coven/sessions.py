"""Session manager: launch harnesses in PTYs, forward input, kill, and record how sessions end."""

from __future__ import annotations

import fcntl
import os
import signal
import struct
import termios
import uuid
from typing import Any, Callable, Mapping

import attrs
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.error import ProcessTerminated
from twisted.logger import Logger
from twisted.python.failure import Failure

from coven.errors import (
    InvalidRequest,
    ProjectRootViolation,
    PtySpawnFailed,
    RuntimeUnavailable,
    SessionNotFound,
    SessionNotLive,
)
from coven.harnesses import HarnessRegistry, HarnessSpec, interpreterProblem
from coven.pty import HarnessProtocol
from coven.ptyreader import PTYReader
from coven.records import SessionRecord, utcnow
from coven.redact import redactText
from coven.store import Store

log = Logger()

DEFAULT_COLS = 80
DEFAULT_ROWS = 24
MAX_TERMINAL_SIZE = 1000
TITLE_LENGTH = 80
# Seconds between SIGTERM and SIGKILL when a session is killed.
DEFAULT_KILL_GRACE = 3.0
# Seconds the daemon keeps reading a PTY after its harness exited, for output a
# background process still writes. The PTY stays open as long as such a process
# has it open, which may be for ever.
DRAIN_TIMEOUT = 1.0
# Variables that tell a harness it runs inside another agent session.
NESTING_VARIABLES = ("CLAUDECODE", "CLAUDE_CODE_ENTRYPOINT")
# Variables that describe the daemon's sockets inherited from systemd, which a
# harness does not get.
SOCKET_ACTIVATION_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


@attrs.frozen
class LaunchRequest:
    """
    The validated fields of a launch request, before paths are resolved.
    """

    projectRoot: str
    harness: str
    prompt: str
    cwd: str | None = None
    title: str | None = None
    cols: int = DEFAULT_COLS
    rows: int = DEFAULT_ROWS


@attrs.define(eq=False)
class LiveSession:
    """
    A session whose harness this daemon spawned and has not finished recording.
    """

    record: SessionRecord
    protocol: HarnessProtocol
    transport: Any
    pid: int
    killed: bool = False
    exitReason: Failure | None = None
    finalized: bool = False
    drainCall: Any = None
    forceKillCall: Any = None
    ended: defer.Deferred[None] = attrs.Factory(defer.Deferred)
    # When the harness started, in clock ticks since boot (see
    # processStartTicks), or None where /proc could not be read.
    startTicks: int | None = None
    # The Deferreds of waitForEnd, fired once the kill or the exit is committed.
    endWaiters: list[defer.Deferred[None]] = attrs.Factory(list)

    @property
    def acceptsInput(self) -> bool:
        return not self.killed and self.exitReason is None


def resolveProjectPaths(projectRoot: str, cwd: str | None) -> tuple[str, str]:
    """
    Return the canonical project root and working directory of a launch.

    Both are resolved with symlinks followed, and the resolved paths are the ones
    the harness is spawned in, so a link cannot point the check one way and the
    spawn another.

    @raise InvalidRequest: the root is not an absolute path of an existing folder,
        is C{/}, or the working directory does not exist.
    @raise ProjectRootViolation: the working directory resolves outside the root.
    """
    if not os.path.isabs(projectRoot):
        raise InvalidRequest(
            f"projectRoot must be an absolute path, got {projectRoot!r}.",
            field="projectRoot",
            projectRoot=projectRoot,
        )
    root = os.path.realpath(projectRoot)
    if not os.path.isdir(root):
        raise InvalidRequest(
            f"projectRoot {projectRoot} is not an existing folder.",
            field="projectRoot",
            projectRoot=projectRoot,
        )
    if root == os.path.sep:
        raise InvalidRequest(
            "projectRoot must not be / because a session confined to the whole"
            " filesystem is not confined; pass the project's folder.",
            field="projectRoot",
            projectRoot=projectRoot,
        )

    requested = root if cwd is None else os.path.join(root, cwd)
    resolved = os.path.realpath(requested)
    if os.path.commonpath([root, resolved]) != root:
        raise ProjectRootViolation(
            f"cwd {cwd} resolves to {resolved}, outside project root {root}.",
            cwd=cwd,
            resolvedCwd=resolved,
            projectRoot=root,
        )
    if not os.path.isdir(resolved):
        raise InvalidRequest(
            f"cwd {cwd} is not an existing folder inside project root {root}.",
            field="cwd",
            cwd=cwd,
        )
    return root, resolved


def defaultTitle(prompt: str, harness: HarnessSpec, redact: bool = False) -> str:
    """
    Return the prompt's first line, cut to L{TITLE_LENGTH} characters, or the
    harness's label for an empty prompt.

    With C{redact}, secrets in the whole prompt are replaced before the line
    is taken and cut. So no part of a secret reaches the title, even one that
    spans lines or contains a line break that only C{str.splitlines} splits at.
    """
    text = prompt.strip()
    if redact:
        text = redactText(text)
    lines = text.splitlines()
    if not lines:
        return harness.label
    return lines[0][:TITLE_LENGTH]


def signalName(number: int | None) -> str | None:
    if number is None:
        return None
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def _otherProcesses() -> list[str]:
    """
    Return the pids in C{/proc} other than the daemon's own, as strings; empty
    where C{/proc} is missing.
    """
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    ownPid = str(os.getpid())
    return [entry for entry in entries if entry.isdigit() and entry != ownPid]


def _readProc(pid: str, name: str) -> bytes | None:
    # os.open and os.read, not open(): a file object per read made a search
    # of 568 processes half again as long (15 against 10 ms).
    try:
        fd = os.open(f"/proc/{pid}/{name}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def _statFields(stat: bytes) -> list[bytes]:
    # The fields after the parenthesised command, from field 3 (state) on:
    # state ppid pgrp session ..., with starttime at index 19.
    return stat[stat.rfind(b")") + 2 :].split()


def processStartTicks(pid: int) -> int | None:
    """
    Return when process C{pid} started, in clock ticks since boot, from
    C{/proc/PID/stat}; C{None} where that cannot be read.
    """
    stat = _readProc(str(pid), "stat")
    fields = _statFields(stat) if stat is not None else []
    return int(fields[19]) if len(fields) > 19 else None


def sessionMembers(
    sessionLeader: int, sessionId: str, notBefore: int | None = None, byGroup: bool = True
) -> list[int]:
    """
    Return the processes that belong to a session but left its process group,
    found through C{/proc}: those of the harness's terminal session, and those
    started from it that carry its C{COVEN_SESSION_ID} in their environment
    even after starting a terminal session of their own. Empty where C{/proc}
    is missing.

    @param notBefore: when the harness started (see L{processStartTicks}). A
        process started before it cannot have been started from it, so its
        environment is not read. With 568 processes, mostly older ones, that
        took the search from 10 to 6 ms.
    @param byGroup: also count the processes of the terminal session whose
        id is C{sessionLeader}, and leave out those of its process group.
    """
    marker = f"COVEN_SESSION_ID={sessionId}".encode()
    members = []
    for entry in _otherProcesses():
        stat = _readProc(entry, "stat")
        if stat is None:
            continue
        fields = _statFields(stat)
        if len(fields) < 20 or (byGroup and int(fields[2]) == sessionLeader):
            continue
        if byGroup and int(fields[3]) == sessionLeader:
            members.append(int(entry))
            continue
        if notBefore is not None and int(fields[19]) < notBefore:
            continue
        environ = _readProc(entry, "environ")
        if environ is not None and marker in environ.split(b"\0"):
            members.append(int(entry))
    return members


def killLeftoverProcesses(sessionIds: list[str]) -> list[int]:
    """
    Send SIGKILL to every process that carries one of C{sessionIds} in its
    C{COVEN_SESSION_ID}: what is left of sessions whose daemon died.

    The environment variable, not a stored pid, identifies them, so a pid
    reused by an unrelated process is never hit.

    @return: the pids signalled.
    """
    markers = {f"COVEN_SESSION_ID={sessionId}".encode() for sessionId in sessionIds}
    if not markers:
        return []
    killed = []
    for entry in _otherProcesses():
        environ = _readProc(entry, "environ")
        if environ is None or markers.isdisjoint(environ.split(b"\0")):
            continue
        try:
            os.kill(int(entry), signal.SIGKILL)
            killed.append(int(entry))
        except (ProcessLookupError, PermissionError):
            pass
    return killed


def signalSession(
    sessionLeader: int, sessionId: str, signalNumber: int, notBefore: int | None = None
) -> bool:
    """
    Send C{signalNumber} to the harness's process group and to the session's
    processes outside it (see L{sessionMembers}, which takes C{notBefore}).

    Once the harness is reaped and no process is left in its group or its
    terminal session, its pid can be reused, for example before the SIGKILL
    that follows a SIGTERM a few seconds later. A process with that pid but
    another start time than C{notBefore} is then not the harness, so neither
    its group nor its terminal session is signalled, only processes that
    carry the session's marker.

    @return: whether any process was still there to receive it.
    """
    leaderStart = processStartTicks(sessionLeader) if notBefore is not None else None
    reused = leaderStart is not None and leaderStart != notBefore
    reached = False
    try:
        if not reused:
            os.killpg(sessionLeader, signalNumber)
            reached = True
    except ProcessLookupError:
        pass
    except PermissionError:
        reached = True
    for pid in sessionMembers(sessionLeader, sessionId, notBefore, byGroup=not reused):
        try:
            os.kill(pid, signalNumber)
            reached = True
        except (ProcessLookupError, PermissionError):
            pass
    return reached


class SessionManager(Service):
    """
    Launch, feed, kill and finish harness sessions.

    @ivar killGrace: seconds between SIGTERM and SIGKILL.
    """

    def __init__(
        self,
        store: Store,
        harnesses: HarnessRegistry,
        reactor: Any,
        killGrace: float = DEFAULT_KILL_GRACE,
        environ: Mapping[str, str] | None = None,
        signaller: Callable[[int, str, int, int | None], bool] = signalSession,
        redact: bool = True,
    ) -> None:
        """
        @param signaller: sends a signal to a session's processes; see
            L{signalSession}, which is the default.
        @param redact: replace secret-shaped tokens in output and input events.
        """
        self.redact = redact
        self._store = store
        self._signal = signaller
        self.harnesses = harnesses
        self._reactor = reactor
        self.killGrace = killGrace
        self._environ = dict(os.environ if environ is None else environ)
        self._live: dict[str, LiveSession] = {}
        self._stopping = False
        self._ptyReader = PTYReader(reactor)

    # Queries

    def liveSession(self, sessionId: str) -> LiveSession | None:
        return self._live.get(sessionId)

    @property
    def liveCount(self) -> int:
        return len(self._live)

    def harnessEnvironment(self, sessionId: str) -> dict[str, str]:
        environment = {
            name: value
            for name, value in self._environ.items()
            if name not in NESTING_VARIABLES and name not in SOCKET_ACTIVATION_VARIABLES
        }
        environment["TERM"] = "xterm-256color"
        environment["COVEN_SESSION_ID"] = sessionId
        return environment

    # Launch

    async def launch(self, request: LaunchRequest) -> SessionRecord:
        """
        Validate C{request}, record the session and spawn its harness in a PTY.

        @return: the new session, committed, with status C{running}.
        @raise PtySpawnFailed: the executable is missing or could not start; the
            session is then recorded as C{failed} with an C{exit} event whose
            C{reason} names the cause.
        """
        if self._stopping or not self.running:
            raise RuntimeUnavailable("The daemon is stopping and launches no new sessions.")
        if not self._store.writable and self._store.damaged:
            raise RuntimeUnavailable(
                "The session store cannot write: its database file is damaged; `coven doctor`"
                " checks it. No session is launched until the store can write."
            )
        if not self._store.writable:
            raise RuntimeUnavailable(
                "The session store cannot write right now (is the disk full?); no session"
                " is launched until it can. Reads and live sessions go on."
            )

        harness = self.harnesses.get(request.harness)
        if harness is None:
            ids = ", ".join(spec.id for spec in self.harnesses.all())
            ignored = self.harnesses.configError
            if ignored:
                note = f" The harness file was ignored: {ignored}"
            else:
                note = f" Add harnesses in {self.harnesses.configPath}."
            raise InvalidRequest(
                f"Unknown harness {request.harness!r}; configured harnesses: {ids}.{note}",
                field="harness",
                harness=request.harness,
                harnesses=[spec.id for spec in self.harnesses.all()],
            )
        root, cwd = resolveProjectPaths(request.projectRoot, request.cwd)

        sessionId = str(uuid.uuid4())
        now = utcnow()
        # The title is stored and listed like an event, so it is redacted like one.
        if request.title is None:
            title = defaultTitle(request.prompt, harness, redact=self.redact)
        elif self.redact:
            title = redactText(request.title)
        else:
            title = request.title
        record = SessionRecord(
            id=sessionId,
            project_root=root,
            cwd=cwd,
            harness=harness.id,
            title=title,
            status="running",
            exit_code=None,
            archived_at=None,
            created_at=now,
            updated_at=now,
        )
        environment = self.harnessEnvironment(sessionId)
        executable = harness.resolveExecutable(environment.get("PATH", os.defpath))
        if executable is None:
            reason = harness.missingReason()
            await self._recordSpawnFailure(record, reason)
            advice = harness.missingAdvice(self.harnesses.configPath, environment.get("PATH", os.defpath))
            raise PtySpawnFailed(
                f"Harness {harness.id} could not be launched: {reason}. {advice}",
                sessionId=sessionId,
                harness=harness.id,
            )

        problem = interpreterProblem(executable)
        if problem is not None:
            reason, advice = problem
            await self._recordSpawnFailure(record, reason)
            raise PtySpawnFailed(
                f"Harness {harness.id} could not be launched: {reason}. {advice}",
                sessionId=sessionId,
                harness=harness.id,
            )

        inserted = self._store.insertSession(record)
        try:
            live = self._spawn(record, harness, executable, request, environment)
        except OSError as error:
            # The insert is queued before the failure is recorded, so the
            # failure's update and event follow it.
            reason = f"spawning {executable} failed: {error.strerror or error}"
            self._store.updateSession(sessionId, status="failed")
            self._store.appendEvent(
                sessionId, "exit", {"exitCode": None, "signal": None, "status": "failed", "reason": reason}
            )
            await inserted
            log.error(
                "Launch of session {sessionId} ({harness}) failed: {reason}",
                sessionId=sessionId,
                harness=harness.id,
                reason=reason,
            )
            raise PtySpawnFailed(
                f"Harness {harness.id} could not be launched: {reason}.",
                sessionId=sessionId,
                harness=harness.id,
            )

        self._live[sessionId] = live
        log.info(
            "Launched session {sessionId} ({harness}) as pid {pid} in {cwd}",
            sessionId=sessionId,
            harness=harness.id,
            pid=live.pid,
            cwd=cwd,
        )
        # Only now, with the session registered, may its end be handled.
        live.protocol.attach(
            onExited=lambda reason: self._processExited(live, reason),
            onEnded=lambda: self._processEnded(live),
        )
        try:
            await inserted
        except RuntimeUnavailable:
            # The row stays queued and is written once the store can write, but
            # the client hears of a failure, so no harness may go on running
            # that a retry of the launch would start a second time.
            self._kill(live, "the session store could not record the launch").addErrback(lambda _: None)
            cause = "its database file is damaged" if self._store.damaged else "is the disk full?"
            raise RuntimeUnavailable(
                f"The session store could not record session {sessionId} ({cause}),"
                " so its harness was killed; launch again once the store can write.",
                sessionId=sessionId,
            ) from None
        return record

    async def _recordSpawnFailure(self, record: SessionRecord, reason: str) -> None:
        failed = attrs.evolve(record, status="failed")
        inserted = self._store.insertSession(failed)
        self._store.appendEvent(
            record.id, "exit", {"exitCode": None, "signal": None, "status": "failed", "reason": reason}
        )
        log.error(
            "Launch of session {sessionId} ({harness}) failed: {reason}",
            sessionId=record.id,
            harness=record.harness,
            reason=reason,
        )
        await inserted

    def _spawn(
        self,
        record: SessionRecord,
        harness: HarnessSpec,
        executable: str,
        request: LaunchRequest,
        environment: dict[str, str],
    ) -> LiveSession:
        # The window size is set on the PTY before the fork, so the harness starts
        # with it and never reads a 0x0 terminal size.
        master, slave = os.openpty()
        try:
            setWindowSize(master, request.cols, request.rows)
            ttyName = os.ttyname(slave)
        except OSError:
            os.close(master)
            os.close(slave)
            raise

        protocol = HarnessProtocol(record.id, self._store, self._reactor, redact=self.redact)
        try:
            transport = self._reactor.spawnProcess(
                protocol,
                executable,
                harness.argv(request.prompt),
                env=environment,
                path=record.cwd,
                usePTY=(master, slave, ttyName),
            )
        except BaseException:
            # Twisted closes the slave end only after a successful fork.
            for fd in (master, slave):
                try:
                    os.close(fd)
                except OSError:
                    pass
            raise
        # A fake reactor's transport has no master to read.
        if hasattr(transport, "fd"):
            protocol.useProducer(self._ptyReader.attach(transport))
        assert protocol.pid is not None
        startTicks = processStartTicks(protocol.pid)
        return LiveSession(record, protocol, transport, protocol.pid, startTicks=startTicks)

    @staticmethod
    def _deliverRead(live: LiveSession) -> None:
        """
        Hand the output read from C{live}'s PTY so far to its protocol, which
        queues it before anything the caller records next.
        """
        deliverPending = getattr(live.protocol.producer, "deliverPending", None)
        if deliverPending is not None:
            deliverPending()

    # Input and resize

    def _requireLive(
        self, sessionId: str, existing: SessionRecord | None, killing: bool = False
    ) -> LiveSession:
        live = self._live.get(sessionId)
        if live is not None and live.acceptsInput:
            return live
        if existing is None and live is None:
            raise SessionNotFound(sessionId=sessionId)
        if existing is None:
            raise SessionNotLive(
                f"Session {sessionId} is ending and takes no more requests.", sessionId=sessionId
            )
        if live is not None or existing.status == "running":
            message = f"Session {sessionId} is ending ({existing.status}) and takes no more requests."
        elif killing:
            message = (
                f"Session {sessionId} has already ended ({existing.status}), so there is"
                " nothing to kill."
            )
        else:
            message = (
                f"Session {sessionId} has already ended ({existing.status}). Start a new"
                " session to go on."
            )
        raise SessionNotLive(message, sessionId=sessionId, status=existing.status)

    async def _lookup(self, sessionId: str, killing: bool = False) -> LiveSession:
        live = self._live.get(sessionId)
        if live is not None and live.acceptsInput:
            return live
        existing = await self._store.getSession(sessionId)
        return self._requireLive(sessionId, existing, killing)

    async def sendInput(self, sessionId: str, data: str) -> None:
        """
        Write C{data} to a live session's PTY and record an C{input} event.

        Output read before this call was queued as it arrived, so the C{input}
        event follows it and the harness's echo follows the event.
        """
        live = await self._lookup(sessionId)
        if not live.acceptsInput:
            raise SessionNotLive(sessionId=sessionId)
        encoded = data.encode("utf-8")
        # The harness gets the input as it is; only the stored event is redacted.
        recorded = redactText(data) if self.redact else data
        self._deliverRead(live)
        self._store.appendEvent(sessionId, "input", {"data": recorded})
        live.transport.write(encoded)

    async def resize(self, sessionId: str, cols: int, rows: int) -> None:
        """
        Set a live session's PTY window size; the harness gets SIGWINCH.
        """
        live = await self._lookup(sessionId)
        setWindowSize(live.transport.fileno(), cols, rows)

    # Record management

    async def _finishedSession(self, sessionId: str) -> SessionRecord:
        record = await self._store.getSession(sessionId)
        if record is None:
            raise SessionNotFound(sessionId=sessionId)
        live = self._live.get(sessionId)
        if live is not None and live.killed:
            # The kill was sent, and the harness has not exited within the grace yet.
            raise SessionNotLive(
                f"Session {sessionId} is being killed but has not exited yet (SIGKILL follows"
                f" {self.killGrace:g} s after SIGTERM); try again once it has exited.",
                sessionId=sessionId,
                status=record.status,
            )
        if live is not None or record.status == "running":
            raise SessionNotLive(
                f"Session {sessionId} is still running; kill it or wait for it to exit first.",
                sessionId=sessionId,
                status=record.status,
            )
        return record

    async def archive(self, sessionId: str) -> SessionRecord:
        """
        Hide a finished session from the default session list.
        """
        record = await self._finishedSession(sessionId)
        if record.archived_at is None:
            now = utcnow()
            await self._store.updateSession(sessionId, wait=True, archived_at=now, updated_at=now)
            record = attrs.evolve(record, archived_at=now, updated_at=now)
        return record

    async def summon(self, sessionId: str) -> SessionRecord:
        """
        Bring an archived session back into the default session list.
        """
        record = await self._finishedSession(sessionId)
        if record.archived_at is not None:
            now = utcnow()
            await self._store.updateSession(sessionId, wait=True, archived_at=None, updated_at=now)
            record = attrs.evolve(record, archived_at=None, updated_at=now)
        return record

    async def delete(self, sessionId: str) -> None:
        """
        Delete a finished session and all its events.
        """
        await self._finishedSession(sessionId)
        await self._store.deleteSession(sessionId)
        log.info("Deleted session {sessionId} and its events", sessionId=sessionId)

    # Kill

    async def kill(self, sessionId: str, reason: str = "requested") -> None:
        """
        Mark a live session C{killed}, record a C{kill} event and send SIGTERM to
        its process group; SIGKILL follows after L{killGrace} seconds.
        """
        live = await self._lookup(sessionId, killing=True)
        try:
            await self._kill(live, reason)
        except RuntimeUnavailable:
            # The signal is sent, and the kill event stays queued until the
            # store can write it, so the kill itself did not fail.
            log.warn(
                "Killed session {sessionId}, whose kill event waits for the store to write again",
                sessionId=sessionId,
            )

    def waitForEnd(self, sessionId: str) -> defer.Deferred[None] | None:
        """
        Return a Deferred that fires once the live session C{sessionId} is
        committed as no longer running, by its kill or its exit, or C{None}
        when no live session has that id. Cancelling it drops the wait.

        NOTE: it also fires when that write fails, and the session is then
        still C{running} in the store, so callers read the status again.
        """
        live = self._live.get(sessionId)
        if live is None:
            return None

        def forget(waiter: defer.Deferred[None]) -> None:
            if waiter in live.endWaiters:
                live.endWaiters.remove(waiter)

        waiter: defer.Deferred[None] = defer.Deferred(forget)
        live.endWaiters.append(waiter)
        return waiter

    @staticmethod
    def _notifyEnd(live: LiveSession) -> None:
        waiters, live.endWaiters = live.endWaiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _kill(self, live: LiveSession, reason: str) -> defer.Deferred[None]:
        live.killed = True
        sessionId = live.record.id
        self._store.updateSession(sessionId, status="killed")
        committed = self._store.appendEvent(
            sessionId,
            "kill",
            {"status": "killed", "signal": "SIGTERM", "reason": reason},
            wait=True,
        )
        log.info(
            "Killing session {sessionId} (pid {pid}): {reason}",
            sessionId=sessionId,
            pid=live.pid,
            reason=reason,
        )
        self._signal(live.pid, live.record.id, signal.SIGTERM, live.startTicks)
        live.forceKillCall = self._reactor.callLater(self.killGrace, self._forceKill, live)
        assert committed is not None

        def killCommitted(result: object) -> object:
            self._notifyEnd(live)
            return result

        return committed.addBoth(killCommitted)

    def _forceKill(self, live: LiveSession) -> None:
        live.forceKillCall = None
        if self._signal(live.pid, live.record.id, signal.SIGKILL, live.startTicks):
            log.info(
                "Session {sessionId} (pid {pid}) outlived SIGTERM by {grace}s; sent SIGKILL",
                sessionId=live.record.id,
                pid=live.pid,
                grace=self.killGrace,
            )

    # How a session ends

    def _processExited(self, live: LiveSession, reason: Failure) -> None:
        live.exitReason = reason
        if live.protocol.ptyClosed:
            self._finalize(live)
        else:
            live.drainCall = self._reactor.callLater(DRAIN_TIMEOUT, self._drainTimedOut, live)

    def _processEnded(self, live: LiveSession) -> None:
        if live.exitReason is not None and not live.finalized:
            if live.drainCall is not None and live.drainCall.active():
                live.drainCall.cancel()
            self._finalize(live)

    def _drainTimedOut(self, live: LiveSession) -> None:
        live.drainCall = None
        if live.finalized:
            return
        if self._store.producersPaused:
            # The PTY is paused because the store is behind. Its buffer
            # contains output the harness wrote before exiting, so wait.
            live.drainCall = self._reactor.callLater(DRAIN_TIMEOUT / 10, self._drainTimedOut, live)
            return
        self._finalize(live)

    def _finalize(self, live: LiveSession) -> None:
        live.finalized = True
        sessionId = live.record.id
        self._deliverRead(live)
        live.protocol.finishOutput()

        assert live.exitReason is not None
        exitCode, signalNumber = exitStatus(live.exitReason)
        if live.killed:
            status = "killed"
        elif exitCode == 0:
            status = "completed"
        else:
            status = "failed"
        self._store.updateSession(sessionId, status=status, exit_code=exitCode)
        committed = self._store.appendEvent(
            sessionId,
            "exit",
            {"exitCode": exitCode, "signal": signalName(signalNumber), "status": status},
            wait=True,
        )
        del self._live[sessionId]
        ending = f"exit code {exitCode}" if signalNumber is None else f"signal {signalName(signalNumber)}"
        log.info(
            "Session {sessionId} ended: {status}, {ending}",
            sessionId=sessionId,
            status=status,
            ending=ending,
            exitCode=exitCode,
            signal=signalName(signalNumber),
        )

        # The search for leftovers reads /proc, which took about 2 ms in the
        # benchmark and takes longer with many processes. It runs after the
        # store's flush of the exit, which was scheduled first.
        self._reactor.callLater(0, self._endLeftovers, live)
        assert committed is not None

        def exitCommitted(_: object) -> None:
            self._notifyEnd(live)
            live.ended.callback(None)

        committed.addBoth(exitCommitted)

    def _endLeftovers(self, live: LiveSession) -> None:
        # A background process of the harness may still hold the PTY. End the
        # rest of the process group; a kill in progress already has its SIGKILL
        # timer.
        if not live.killed and self._signal(live.pid, live.record.id, signal.SIGTERM, live.startTicks):
            live.forceKillCall = self._reactor.callLater(self.killGrace, self._forceKill, live)
        live.transport.loseConnection()

    # Service

    def stopService(self) -> defer.Deferred[None]:
        """
        Kill every live session and wait until each one's exit is recorded.
        """
        super().stopService()
        self._stopping = True
        lives = list(self._live.values())
        waits = []
        for live in lives:
            if live.exitReason is None and not live.killed:
                self._kill(live, "daemon stopping").addErrback(lambda _: None)
            waits.append(live.ended)

        def finishKills(_: object) -> defer.Deferred[object]:
            return defer.DeferredList([self._finishKill(live) for live in lives])

        def stopReader(_: object) -> None:
            self._ptyReader.stop()

        return defer.DeferredList(waits).addCallback(finishKills).addCallback(stopReader)

    def _finishKill(self, live: LiveSession) -> defer.Deferred[None]:
        """
        Send the SIGKILL that ends C{live}'s grace period when it is due, if
        any of its processes is still there, and return when it is sent.

        A session ends once its harness exits, which can be before processes
        it left behind that ignore SIGTERM get their SIGKILL. A stop waits for
        it, so that none of them outlives the daemon.
        """
        call, live.forceKillCall = live.forceKillCall, None
        if call is None or not call.active():
            return defer.succeed(None)
        delay = max(0.0, call.getTime() - self._reactor.seconds())
        call.cancel()
        if not self._signal(live.pid, live.record.id, 0, live.startTicks):
            return defer.succeed(None)
        return task.deferLater(self._reactor, delay, self._forceKill, live)


def exitStatus(reason: Failure) -> tuple[int | None, int | None]:
    """
    Return the exit code and signal number of a process end.
    """
    value = reason.value
    if isinstance(value, ProcessTerminated):
        return value.exitCode, value.signal
    return getattr(value, "exitCode", 0), None


def setWindowSize(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
