"""In-memory doubles for route tests: a synchronous SQLite pool, a fake process reactor and a StubTreq client."""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import struct
import termios
from typing import Any, Callable, NamedTuple
from urllib.parse import urlencode

import attrs
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from coven.api import CovenAPI
from coven.harnesses import HarnessRegistry
from coven.sessions import SessionManager
from coven.store import Store, _configureConnection, prepareDatabase

# Pids of fake processes. No signal ever reaches them, because the session
# manager gets a SignalRecorder in place of the function that calls kill().
FIRST_FAKE_PID = 3_000_001
# Rounds of clock.advance(0) and flush() a request may take before the helper
# gives up. A request waits on at most a few commits, each one round.
MAX_SETTLE_ROUNDS = 20
FAKE_EXECUTABLE = "fake-agent"
DAEMON_INFO = {
    "pid": 4242,
    "startedAt": "2026-05-09T12:00:00.000Z",
    "socket": "/home/example/.coven/coven.sock",
}


class SynchronousPool:
    """
    A stand-in for C{adbapi.ConnectionPool} that runs each interaction at once,
    in the calling thread, on one shared connection.
    """

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection
        self.closed = False

    def runInteraction(self, interaction: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        if self.closed:
            return defer.fail(RuntimeError("runInteraction called on a closed connection pool"))
        cursor = self._connection.cursor()
        try:
            result = interaction(cursor, *args, **kwargs)
        except Exception:
            # adbapi rolls back a failed interaction, and so does this pool, so
            # the next interaction starts outside a transaction.
            if self._connection.in_transaction:
                self._connection.rollback()
            return defer.fail()
        finally:
            cursor.close()
        return defer.succeed(result)

    def close(self) -> None:
        self.closed = True


class MemoryDatabase:
    """
    One in-memory SQLite database with the Coven schema, shared by every pool
    the store builds, because a C{:memory:} database exists only on its own
    connection.
    """

    def __init__(self) -> None:
        self.connection = sqlite3.connect(":memory:", isolation_level=None)
        # These are the pragmas the daemon's adbapi pool sets on each connection.
        # Foreign keys make deleting a session delete its events.
        _configureConnection(self.connection)
        prepareDatabase(self.connection, ":memory:")
        self.pools: list[SynchronousPool] = []

    def pool(self, connections: int) -> SynchronousPool:
        """
        Build a pool. C{connections} is ignored because all pools share one
        connection.
        """
        pool = SynchronousPool(self.connection)
        self.pools.append(pool)
        return pool

    def count(self, sql: str, *params: Any) -> int:
        (value,) = self.connection.execute(sql, params).fetchone()
        return value

    def close(self) -> None:
        self.connection.close()


def windowSize(fd: int) -> tuple[int, int]:
    """
    Return the (cols, rows) window size of the terminal C{fd}.
    """
    rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    return cols, rows


class FakeProcessTransport:
    """
    The transport of a fake process. It owns the PTY master and records what
    the daemon writes and how it drives the process.
    """

    def __init__(self, pid: int, master: int) -> None:
        self.pid = pid
        self.master: int | None = master
        self.written: list[bytes] = []
        self.paused = False
        self.lostConnection = False

    def fileno(self) -> int:
        if self.master is None:
            raise OSError("fileno() of a fake PTY transport whose master is closed")
        return self.master

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def loseConnection(self) -> None:
        self.lostConnection = True
        self.closeMaster()

    def closeMaster(self) -> None:
        if self.master is not None:
            os.close(self.master)
            self.master = None

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.loseConnection()


def exitReason(exitCode: int = 0, signal: int | None = None) -> Failure:
    """
    Build the failure Twisted passes to C{processExited} and C{processEnded}.
    """
    if signal is None and exitCode == 0:
        return Failure(ProcessDone(0))
    return Failure(ProcessTerminated(exitCode=None if signal is not None else exitCode, signal=signal))


@attrs.define(eq=False)
class SpawnedProcess:
    """
    One recorded C{spawnProcess} call.

    @ivar windowSize: (cols, rows) of the PTY at spawn time.
    """

    protocol: Any
    executable: str
    args: list[str]
    env: dict[str, str]
    path: str | None
    ttyName: str
    windowSize: tuple[int, int]
    transport: FakeProcessTransport

    def end(self, reason: Failure) -> None:
        """
        Report the harness's exit and the PTY's close, in the order Twisted does.
        """
        self.protocol.processExited(reason)
        self.protocol.processEnded(reason)


class FakeProcessReactor(Clock):
    """
    A clock with a fake C{spawnProcess}, which connects the protocol to a
    L{FakeProcessTransport} and runs nothing.

    @ivar spawnError: when set, the next C{spawnProcess} raises it instead.
    @ivar rejectedPTYs: the (master, slave) descriptors of each call that
        raised, which the caller must close.
    @ivar exitDuringSpawn: when set, the next process exits with this reason
        and is reaped before C{spawnProcess} returns.
    """

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[SpawnedProcess] = []
        self.spawnError: OSError | None = None
        self.exitDuringSpawn: Failure | None = None
        self.rejectedPTYs: list[tuple[int, int]] = []
        self._nextPid = FIRST_FAKE_PID

    def spawnProcess(
        self,
        protocol: Any,
        executable: str,
        args: list[str],
        env: dict[str, str] | None = None,
        path: str | None = None,
        usePTY: Any = None,
    ) -> FakeProcessTransport:
        if not isinstance(usePTY, tuple):
            raise AssertionError(f"spawnProcess expected usePTY=(master, slave, ttyname), got {usePTY!r}")
        if self.spawnError is not None:
            error, self.spawnError = self.spawnError, None
            self.rejectedPTYs.append((usePTY[0], usePTY[1]))
            raise error

        # Twisted's PTYProcess closes the slave in the parent after the fork
        # and keeps the master as the transport's file descriptor.
        master, slave, ttyName = usePTY
        os.close(slave)
        transport = FakeProcessTransport(self._nextPid, master)
        self._nextPid += 1
        self.spawned.append(
            SpawnedProcess(
                protocol, executable, list(args), dict(env or {}), path, ttyName, windowSize(master), transport
            )
        )
        protocol.makeConnection(transport)
        if self.exitDuringSpawn is not None:
            # Twisted can reap a child that exits at once before spawnProcess
            # returns; the pid is gone from the transport by then.
            reason, self.exitDuringSpawn = self.exitDuringSpawn, None
            protocol.processExited(reason)
            transport.pid = None
            protocol.processEnded(reason)
        return transport

    def closeAll(self) -> None:
        """
        Close the PTY masters of processes the test left running.
        """
        for process in self.spawned:
            process.transport.closeMaster()


class SignalRecorder:
    """
    A signaller for L{SessionManager} that records each call instead of
    sending a signal.

    @ivar reached: the return value of each call, which the manager reads as
        whether any process was still there to receive the signal.
    @ivar startTimes: the harness start time passed with each call.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[int, str, int]] = []
        self.startTimes: list[int | None] = []
        self.reached = False

    def __call__(self, pid: int, sessionId: str, signalNumber: int, notBefore: int | None = None) -> bool:
        self.calls.append((pid, sessionId, signalNumber))
        self.startTimes.append(notBefore)
        return self.reached


class PendingRequest:
    """
    The outcome of a Deferred, kept aside so that checking it does not change
    the Deferred's result.
    """

    def __init__(self, deferred: defer.Deferred[Any]) -> None:
        self.deferred = deferred
        self._outcome: list[Any] = []
        deferred.addBoth(self._outcome.append)

    @property
    def done(self) -> bool:
        return bool(self._outcome)

    def result(self) -> Any:
        """
        Return the result, or raise the failure.
        """
        outcome = self._outcome[0]
        if isinstance(outcome, Failure):
            outcome.raiseException()
        return outcome


class Response(NamedTuple):
    """
    A complete response. C{body} is the parsed JSON when the Content-Type is
    C{application/json}, else the raw bytes.
    """

    status: int
    headers: Headers
    body: Any


def writeHarnessConfig(home: str, binFolder: str) -> str:
    """
    Create an executable C{fake-agent} in C{binFolder} and a harnesses.toml in
    C{home} whose C{fake} harness runs it, and return the path of the TOML file.
    """
    os.makedirs(binFolder, exist_ok=True)
    executable = os.path.join(binFolder, FAKE_EXECUTABLE)
    with open(executable, "w") as file:
        file.write("#!/bin/sh\nexit 0\n")
    os.chmod(executable, 0o755)

    configPath = os.path.join(home, "harnesses.toml")
    with open(configPath, "w") as file:
        file.write(
            "[harnesses.fake]\n"
            'label = "Fake agent"\n'
            f'command = ["{FAKE_EXECUTABLE}"]\n'
            'prompt_args = ["--prompt", "{prompt}"]\n'
        )
    return configPath


class MemoryDaemon:
    """
    A store, session manager and API wired to in-memory doubles, with a
    StubTreq client for the API.

    Only C{fake-agent} is on the harnesses' C{PATH}, so the built-in
    C{codex}, C{claude} and C{copilot} harnesses have no executable. The
    default kill grace differs from the daemon's 3 seconds, so a test can tell
    the configured value is the one used.
    """

    def __init__(
        self,
        home: str,
        killGrace: float = 2.5,
        daemonInfo: Callable[[], dict[str, Any] | None] = lambda: dict(DAEMON_INFO),
    ) -> None:
        self.home = home
        self.project = os.path.join(home, "project")
        os.makedirs(self.project, exist_ok=True)
        self.binFolder = os.path.join(home, "bin")
        self.configPath = writeHarnessConfig(home, self.binFolder)

        self.clock = FakeProcessReactor()
        self.database = MemoryDatabase()
        self.store = Store(":memory:", self.clock, poolFactory=self.database.pool)
        # Output is written on the next clock.advance(0), like every other
        # write; tests of the output delay set it back.
        self.store.outputFlushDelay = 0
        self.store.startService()

        self.signals = SignalRecorder()
        self.environ = {
            "PATH": self.binFolder,
            "HOME": home,
            "LANG": "C.UTF-8",
            "CLAUDECODE": "1",
            "CLAUDE_CODE_ENTRYPOINT": "cli",
        }
        self.harnesses = HarnessRegistry(self.configPath)
        self.sessions = SessionManager(
            self.store,
            self.harnesses,
            self.clock,
            killGrace=killGrace,
            environ=self.environ,
            signaller=self.signals,
        )
        self.sessions.startService()

        self.api = CovenAPI(self.store, self.sessions, self.clock, daemonInfo=daemonInfo)
        self.client = StubTreq(self.api.resource())

    def close(self) -> None:
        self.clock.closeAll()
        self.database.close()

    # Requests

    def send(self, method: str, path: str, body: Any = None, data: bytes | None = None) -> PendingRequest:
        """
        Issue a request in the current reactor turn without driving it. Pass
        the result to L{settle}.

        @param body: a value sent as JSON.
        @param data: raw body bytes, sent as they are.
        """
        if body is not None:
            data = json.dumps(body).encode("utf-8")
        headers = {b"Content-Type": [b"application/json"]} if data is not None else None
        return PendingRequest(self.client.request(method, "http://coven" + path, data=data, headers=headers))

    def _drive(self, pending: PendingRequest, what: str) -> Any:
        # Store writes run on clock.advance(0) and StubTreq moves bytes on
        # flush(), so a response needs both, possibly several times.
        for _ in range(MAX_SETTLE_ROUNDS):
            if pending.done:
                return pending.result()
            self.clock.advance(0)
            self.client.flush()
        if pending.done:
            return pending.result()
        pendingCalls = [str(call) for call in self.clock.getDelayedCalls()]
        raise AssertionError(
            f"{what} did not finish after {MAX_SETTLE_ROUNDS} rounds of clock.advance(0)"
            f" and flush(); pending delayed calls: {pendingCalls}"
        )

    def settle(self, pending: PendingRequest) -> Response:
        """
        Drive a request from L{send} until its response is complete.
        """
        response = self._drive(pending, "request")
        content = self._drive(PendingRequest(self.client.content(response)), "response body")
        if response.headers.getRawHeaders(b"content-type") == [b"application/json"]:
            return Response(response.code, response.headers, json.loads(content))
        return Response(response.code, response.headers, content)

    def isSettled(self, pending: PendingRequest) -> bool:
        """
        Drive a request from L{send} as far as it goes without time passing and
        return whether its response has arrived.
        """
        self.clock.advance(0)
        self.client.flush()
        return pending.done

    def request(self, method: str, path: str, body: Any = None, data: bytes | None = None) -> Response:
        """
        Send a request and return its complete response.

        What the reactor has due now runs first, such as the commit of the exit
        a test just reported, because a client's request arrives in a later
        reactor turn than the events before it.
        """
        self.clock.advance(0)
        return self.settle(self.send(method, path, body, data))

    def get(self, path: str, **query: Any) -> Response:
        if query:
            path = f"{path}?{urlencode(query)}"
        return self.request("GET", path)

    def post(self, path: str, body: Any = None, data: bytes | None = None) -> Response:
        return self.request("POST", path, body, data)

    # Sessions

    def launch(self, prompt: str = "fix the tests", **fields: Any) -> tuple[dict[str, Any], SpawnedProcess]:
        """
        Launch a C{fake} session in the project and return its record and process.
        """
        request = {"projectRoot": self.project, "harness": "fake", "prompt": prompt, **fields}
        response = self.post("/api/v1/sessions", request)
        assert response.status == 201, response.body
        return response.body, self.clock.spawned[-1]

    def events(self, sessionId: str, **query: Any) -> list[dict[str, Any]]:
        """
        Return every event of a session, committing what is queued first.
        """
        self.clock.advance(0)
        response = self.get("/api/v1/events", sessionId=sessionId, **query)
        assert response.status == 200, response.body
        return response.body["events"]


def payload(event: dict[str, Any]) -> dict[str, Any]:
    return json.loads(event["payload_json"])
