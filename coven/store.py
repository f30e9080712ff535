"""SQLite store of sessions and events: schema, ordered batched writes, reads, long-poll wake-ups."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import sqlite3
import sys
import threading
import uuid
from collections import deque
from typing import Any, Callable, Iterable
from urllib.request import pathname2url

import attrs
from twisted.application.service import Service
from twisted.enterprise import adbapi
from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from coven.errors import InternalError, RuntimeUnavailable
from coven.records import Event, EventPage, RenderedEventPage, SessionRecord, utcnow

log = Logger()

SESSION_COLUMNS = (
    "id, project_root, cwd, harness, title, status, exit_code, archived_at,"
    " created_at, updated_at"
)
# An output event whose payload is only {"data": TEXT} stores TEXT unencoded in
# the data column, with an empty payload_json, and reads build the payload:
# encoding it took half of the writer thread's SQLite CPU during a burst.
EVENT_COLUMNS = "seq, id, session_id, kind, payload_json, data, created_at"
# The same columns as their stored UTF-8 bytes, for _renderEvent.
EVENT_COLUMNS_BYTES = (
    "seq, CAST(id AS BLOB), CAST(session_id AS BLOB), CAST(kind AS BLOB),"
    " CAST(payload_json AS BLOB), CAST(data AS BLOB), CAST(created_at AS BLOB)"
)
# A rendered event page ends before the event that would take it past this many
# bytes, and sets hasMore. Reading back a large burst then takes pages of a few MiB
# instead of up to 1,000 events of up to 256 KiB each. A page always contains at
# least one event, even a larger one.
MAX_PAGE_BYTES = 4 * 1024 * 1024

# Each entry upgrades the schema from its index to index + 1. PRAGMA user_version
# stores the number of entries applied.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """
        CREATE TABLE sessions (
            id TEXT PRIMARY KEY,
            project_root TEXT NOT NULL,
            cwd TEXT NOT NULL,
            harness TEXT NOT NULL,
            title TEXT NOT NULL,
            status TEXT NOT NULL,
            exit_code INTEGER,
            archived_at TEXT,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )
        """,
        "CREATE INDEX sessions_by_created ON sessions (created_at)",
        # AUTOINCREMENT keeps seq strictly increasing and never reused, even after
        # the newest events are deleted, so a persisted cursor stays meaningful.
        """
        CREATE TABLE events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
            kind TEXT NOT NULL,
            payload_json TEXT NOT NULL,
            created_at TEXT NOT NULL
        )
        """,
        "CREATE INDEX events_by_session ON events (session_id, seq)",
    ),
    # Output text stored as it is; see EVENT_COLUMNS.
    ("ALTER TABLE events ADD COLUMN data TEXT",),
)
SCHEMA_VERSION = len(MIGRATIONS)

# The largest output event the writer builds by merging reads, in characters.
MAX_OUTPUT_EVENT_CHARS = 64 * 1024
# The most output bytes one write transaction takes from the queue.
MAX_BATCH_BYTES = 4 * 1024 * 1024
# Queued but uncommitted output above HIGH_WATER pauses every registered PTY;
# reading resumes once the queue is back under LOW_WATER.
HIGH_WATER_BYTES = 16 * 1024 * 1024
LOW_WATER_BYTES = 4 * 1024 * 1024
# Seconds output waits for more output before it is written, so a burst read
# 4 KiB at a time is stored in events of tens of KiB; well under the output
# latency clients notice.
OUTPUT_FLUSH_DELAY = 0.003
# After this much output, a quiet store calls Store.onIdleAfterLoad (the daemon
# then hands freed memory back to the system).
IDLE_AFTER_LOAD_BYTES = 8 * 1024 * 1024
IDLE_AFTER_LOAD_DELAY = 2.0
# The page size of a new database. With SQLite's default 4 KiB pages, each output
# event of tens of KiB is a chain of overflow pages. Inserting 64 KiB events took
# 4.0 ms per MB with 4 KiB pages and 2.5 ms with 16 KiB pages (SQLite 3.40 on a
# 2-vCPU machine). Larger pages make every small commit write more to the WAL.
PAGE_SIZE = 16 * 1024
# The store copies the WAL into the database (a checkpoint) on a connection of
# its own once writes pause for CHECKPOINT_DELAY seconds, if at least
# CHECKPOINT_AFTER_BYTES were committed since the last one. Writes that never
# pause for that long put it off by at most CHECKPOINT_MAX_DELAY seconds.
# Before, SQLite did it in the commit that took the WAL past 16 MiB: the writer
# thread then copied 16 MiB and waited for two fsyncs, while the burst that
# filled the WAL waited behind it. A commit still does it past
# WAL_AUTOCHECKPOINT_PAGES (128 MiB). When the WAL is next reused from its
# start, the file is cut back to WAL_SIZE_LIMIT.
CHECKPOINT_DELAY = 0.25
CHECKPOINT_MAX_DELAY = 2.0
CHECKPOINT_AFTER_BYTES = 1024 * 1024
WAL_AUTOCHECKPOINT_PAGES = 8192
WAL_SIZE_LIMIT = 16 * 1024 * 1024
# The writer thread's nice value. A PTY read that finds the terminal's buffer
# empty waits for the kernel worker that fills it, 5,800 times in three 20 MB
# bursts. At nice 10 the writer leaves the CPUs to that worker, the harness and
# the PTY reader first. Two runs of thirty paired 20 MB rounds gave 86.5
# against 80.4 and 85.8 against 77.7 MB/s.
WRITER_NICE = 10
# Seconds before a failed write transaction is tried again; the delay doubles
# with each failure in a row, up to MAX_RETRY_DELAY.
RETRY_DELAY = 0.25
MAX_RETRY_DELAY = 2.0
# Seconds a stopping store goes on trying to write what is queued, such as the
# exits of the sessions the stop killed, while writes fail (a locked database,
# a full disk). It stays under the 30 s that `coven daemon stop` waits.
STOP_FLUSH_TIMEOUT = 20.0


def addWaiter(waiters: list[defer.Deferred[None]]) -> defer.Deferred[None]:
    """
    Append a new Deferred to C{waiters} and return it. Cancelling it removes
    it from the list, so it stops only that wait.
    """

    def forget(waiter: defer.Deferred[None]) -> None:
        waiters.remove(waiter)

    waiter: defer.Deferred[None] = defer.Deferred(forget)
    waiters.append(waiter)
    return waiter


async def waitAtMost(reactor: Any, waiting: defer.Deferred[Any], seconds: float) -> bool:
    """
    Wait for C{waiting}, cancelling it after C{seconds}.

    @return: whether it fired in time.
    """
    timer = reactor.callLater(seconds, waiting.cancel)
    try:
        await waiting
    except defer.CancelledError:
        return False
    if timer.active():
        timer.cancel()
    return True


class StoreSchemaError(Exception):
    """
    The database file was written by a newer Coven or is not a Coven database.
    """


def _configureConnection(connection: sqlite3.Connection) -> None:
    connection.execute("PRAGMA foreign_keys = ON")
    connection.execute("PRAGMA busy_timeout = 5000")
    connection.execute("PRAGMA synchronous = NORMAL")
    connection.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
    connection.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")


class _ConnectionPool(adbapi.ConnectionPool):
    """
    An adbapi pool that closes a failed interaction's cursor in the pool's
    thread.

    adbapi closes the cursor only when an interaction succeeds. After a
    failure the cursor stays open, held by the traceback the L{Failure}
    carries to the reactor thread, and is freed there, often by the garbage
    collector. Freeing a cursor whose statement is unfinished takes its
    connection's lock. If that connection is busy waiting for another
    process's write lock, as the writer is while an open C{sqlite3} shell
    holds one, the reactor thread waits with it, up to the 5 s busy timeout,
    and no request gets a response meanwhile.
    """

    def runInteraction(self, interaction: Callable[..., Any], *args: Any, **kw: Any) -> defer.Deferred[Any]:
        return super().runInteraction(_closeCursorOnError, interaction, *args, **kw)


def _closeCursorOnError(
    transaction: adbapi.Transaction, interaction: Callable[..., Any], *args: Any, **kw: Any
) -> Any:
    try:
        return interaction(transaction, *args, **kw)
    except BaseException:
        # The interaction's own error is the one to report. A cursor that is
        # already closed, or whose connection broke, needs no closing.
        with contextlib.suppress(Exception):
            transaction.close()
        raise


# SQLite's primary result code for damaged database pages.
_SQLITE_CORRUPT = 11
# Damaged reads logged: the first, then every this many.
_DAMAGED_READS_LOGGED_EVERY = 100


def isDamaged(error: BaseException) -> bool:
    """
    Return whether C{error} is SQLite's report of damaged database pages.
    """
    code = getattr(error, "sqlite_errorcode", None)
    return isinstance(error, sqlite3.DatabaseError) and code is not None and code & 0xFF == _SQLITE_CORRUPT


def _newEventId() -> str:
    return str(uuid.uuid4())


@attrs.define
class _Write:
    """
    One queued write; C{waiters} fire once the transaction holding it commits.
    """

    sql: str
    params: tuple[Any, ...]
    sessionId: str | None
    waiters: list[defer.Deferred[None]] = attrs.Factory(list)


@attrs.define
class _EventWrite:
    """
    One queued event; its payload is encoded as JSON in the writer thread.
    """

    id: str
    sessionId: str
    kind: str
    payload: dict[str, Any]
    createdAt: str
    waiters: list[defer.Deferred[None]] = attrs.Factory(list)


@attrs.define
class _OutputWrite:
    """
    One queued output event that later reads of the same session extend until it
    is taken by a transaction.

    C{raws} has one entry per merged read: the exact bytes where the read was not
    valid UTF-8, else C{None}.
    """

    id: str
    sessionId: str
    texts: list[str]
    raws: list[bytes | None]
    chars: int
    size: int
    createdAt: str
    waiters: list[defer.Deferred[None]] = attrs.Factory(list)

    def payload(self) -> dict[str, Any]:
        data = "".join(self.texts)
        payload: dict[str, Any] = {"data": data}
        if any(raw is not None for raw in self.raws):
            exact = b"".join(
                text.encode("utf-8") if raw is None else raw
                for text, raw in zip(self.texts, self.raws)
            )
            payload["raw"] = base64.b64encode(exact).decode("ascii")
        return payload


_Op = _Write | _EventWrite | _OutputWrite


def schemaProblem(version: int, path: str) -> str | None:
    """
    Return why this daemon cannot use a database of schema C{version}, or
    C{None} when it can, upgrading it if needed.
    """
    if version > SCHEMA_VERSION:
        return (
            f"database {path} has schema version {version}, but this Coven supports"
            f" versions up to {SCHEMA_VERSION}; upgrade Coven or use another --home"
        )
    return None


def databaseProblem(connection: sqlite3.Connection, path: str) -> tuple[int, str | None]:
    """
    Return the schema version of the database open on C{connection}, and why
    this daemon cannot use it or C{None}. A file with tables but schema
    version 0 belongs to another program: Coven sets the version in the
    transaction that creates its tables.
    """
    (version,) = connection.execute("PRAGMA user_version").fetchone()
    if version == 0:
        (entries,) = connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
        if entries:
            return version, (
                f"database {path} is not a Coven database: it has {entries} tables or indexes"
                " but no Coven schema version; move it away or use another --home"
            )
    return version, schemaProblem(version, path)


def connectReadOnly(path: str) -> sqlite3.Connection:
    """
    Open the database at C{path} for reading only, without creating it.
    """
    return sqlite3.connect("file:" + pathname2url(path) + "?mode=ro", uri=True)


def checkDatabaseSchema(path: str) -> None:
    """
    Check, without changing anything, that this daemon can use the database at
    C{path}, if there is one.

    @raise StoreSchemaError: the file has a newer schema than this daemon
        supports, or belongs to another program.
    @raise sqlite3.DatabaseError: the file cannot be read, or the pages that
        the start reads are damaged (see L{isDamaged}).
    """
    if not os.path.exists(path):
        return
    connection = connectReadOnly(path)
    try:
        version, problem = databaseProblem(connection, path)
        if problem is None and version > 0:
            # The start reads these pages too, once twistd may have detached
            # and a damaged page could only be logged.
            connection.execute(_ORPHAN_CANDIDATES).fetchall()
    finally:
        connection.close()
    if problem is not None:
        raise StoreSchemaError(problem)


def openDatabase(path: str) -> list[str]:
    """
    Create or upgrade the database at C{path} and mark sessions an earlier
    daemon left C{running}, or C{killed} without an exit, as C{orphaned}, each
    with an C{orphaned} event.

    This runs once at start, before the daemon accepts requests, so it uses a
    plain connection instead of the pool.

    @return: the ids of the sessions marked C{orphaned}.
    @raise StoreSchemaError: the file has a newer schema than this daemon supports.
    """
    if not os.path.exists(path):
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))

    connection = sqlite3.connect(path, isolation_level=None)
    try:
        # Another program's file is left as it is: checked before its mode,
        # page size or journal mode change.
        _, problem = databaseProblem(connection, path)
        if problem is not None:
            raise StoreSchemaError(problem)
        os.chmod(path, 0o600)
        # Only a database without pages yet takes a new page size.
        connection.execute(f"PRAGMA page_size = {PAGE_SIZE}")
        _configureConnection(connection)
        connection.execute("PRAGMA journal_mode = WAL")
        return prepareDatabase(connection, path)
    finally:
        connection.close()


def prepareDatabase(connection: sqlite3.Connection, name: str) -> list[str]:
    """
    Migrate the schema on C{connection} and mark orphaned sessions; see
    L{openDatabase}.
    """
    _migrate(connection, name)
    return _markOrphans(connection)


def _migrate(connection: sqlite3.Connection, path: str) -> None:
    version, problem = databaseProblem(connection, path)
    if problem is not None:
        raise StoreSchemaError(problem)
    if 0 < version < SCHEMA_VERSION:
        log.info(
            "Upgrading database {path} from schema version {version} to {target};"
            " earlier Coven versions cannot open it afterwards",
            path=path,
            version=version,
            target=SCHEMA_VERSION,
        )

    for target in range(version, SCHEMA_VERSION):
        connection.execute("BEGIN IMMEDIATE")
        try:
            for statement in MIGRATIONS[target]:
                connection.execute(statement)
            connection.execute(f"PRAGMA user_version = {target + 1}")
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise


# The sessions an earlier daemon left running. A session killed by request has
# status "killed" from the request on, but it has ended only once its exit
# event is stored. A daemon that died within the kill's grace period stored
# none, so such a session's last event, found through the (session_id, seq)
# index, is another.
_ORPHAN_CANDIDATES = (
    "SELECT id, status FROM sessions WHERE status = 'running' OR (status = 'killed'"
    " AND (SELECT kind FROM events WHERE events.session_id = sessions.id"
    " ORDER BY seq DESC LIMIT 1) IS NOT 'exit') ORDER BY created_at"
)


def _markOrphans(connection: sqlite3.Connection) -> list[str]:
    now = utcnow()
    connection.execute("BEGIN IMMEDIATE")
    try:
        rows = connection.execute(_ORPHAN_CANDIDATES).fetchall()
        reasons = {
            "running": "daemon restarted while the session was running",
            "killed": "daemon restarted while the session was being killed, before the harness exited",
        }
        ids = []
        for sessionId, status in rows:
            connection.execute(
                "UPDATE sessions SET status = 'orphaned', updated_at = ? WHERE id = ?",
                (now, sessionId),
            )
            connection.execute(
                "INSERT INTO events (id, session_id, kind, payload_json, created_at)"
                " VALUES (?, ?, 'orphaned', ?, ?)",
                (_newEventId(), sessionId, _encodePayload({"reason": reasons[status]}), now),
            )
            ids.append(sessionId)
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    return ids


def _sessionFromRow(row: Iterable[Any]) -> SessionRecord:
    return SessionRecord(*row)


class Store(Service):
    """
    The daemon's only path to the database.

    Writes go through one ordered queue served by a single-connection pool, so the
    order in which the daemon queues events is their C{seq} order. Reads use a
    second pool. In WAL mode they see every committed write and do not wait for
    the writer's transactions.
    """

    def __init__(
        self,
        path: str,
        reactor: IReactorTime,
        poolFactory: Callable[[int], Any] | None = None,
    ) -> None:
        """
        @param poolFactory: builds a connection pool with the given maximum
            number of connections; by default an C{adbapi.ConnectionPool} on
            C{path}. Tests pass one that runs interactions synchronously.
        """
        self.path = path
        self._reactor = reactor
        self._poolFactory = poolFactory or self._adbapiPool
        self._writer: adbapi.ConnectionPool | None = None
        self._reader: adbapi.ConnectionPool | None = None
        # Built at the first checkpoint, so an idle daemon has no thread for it.
        self._checkpointer: adbapi.ConnectionPool | None = None

        self._queue: deque[_Op] = deque()
        self._openOutputs: dict[str, _OutputWrite] = {}
        self._inFlight = False
        self._flushCall: Any = None
        # Queued writes other than output; while there are any, the writer
        # does not wait for more output before it starts a transaction.
        self._urgentOps = 0
        self._retryDelay = RETRY_DELAY
        self._idleWaiters: list[defer.Deferred[None]] = []
        self._lastWriteError: str | None = None
        # Seconds a stop waits for queued records to be written; see _stop.
        self.stopFlushTimeout = STOP_FLUSH_TIMEOUT

        # The writer thread's id once its priority is lowered.
        self.writerThreadId: int | None = None
        self.pendingBytes = 0
        self.outputFlushDelay = OUTPUT_FLUSH_DELAY
        self.highWater = HIGH_WATER_BYTES
        self.lowWater = LOW_WATER_BYTES
        self._producers: set[IPushProducer] = set()
        self._producersPaused = False
        # How many times the PTYs were paused because the queue was full.
        self.pauseCount = 0
        # Called once the queue has been empty for IDLE_AFTER_LOAD_DELAY
        # seconds after at least IDLE_AFTER_LOAD_BYTES of output were written.
        self.onIdleAfterLoad: Callable[[], None] | None = None
        self._bytesSinceIdle = 0
        self._idleCall: Any = None
        # About how much the WAL grew since the last checkpoint: the output
        # committed, and one page for each transaction.
        self._walBytes = 0
        self._checkpointCall: Any = None
        self._checkpointDue: float | None = None
        self._checkpointing = False
        self.checkpoints = 0

        self._eventWaiters: dict[str, list[defer.Deferred[None]]] = {}
        self.writeFailures = 0
        self.damagedReads = 0
        # Whether the last write failed on damaged database pages.
        self.damaged = False
        self._failureStreak = 0
        self.writable = True

    # Service lifecycle

    def open(self) -> list[str]:
        """
        Prepare the database file; see L{openDatabase}.
        """
        return openDatabase(self.path)

    def _adbapiPool(self, connections: int) -> adbapi.ConnectionPool:
        return _ConnectionPool(
            "sqlite3",
            self.path,
            check_same_thread=False,
            isolation_level=None,
            cp_min=1,
            cp_max=connections,
            cp_openfun=_configureConnection,
            cp_reconnect=False,
            cp_reactor=self._reactor,
        )

    def startService(self) -> None:
        super().startService()
        # One writer connection keeps the queue's order. In WAL mode the reader
        # connections do not block it.
        self._writer = self._poolFactory(1)
        self._reader = self._poolFactory(2)
        lowered = self._writer.runInteraction(_lowerThreadPriority, WRITER_NICE)
        lowered.addCallbacks(self._priorityLowered, self._priorityNotLowered)

    def _priorityLowered(self, threadId: int | None) -> None:
        self.writerThreadId = threadId

    def _priorityNotLowered(self, failure: Any) -> None:
        log.warn(
            "Lowering the writer thread's priority failed, so it runs at the daemon's: {error}",
            error=failure.getErrorMessage(),
        )

    async def _stop(self) -> None:
        for call in (self._idleCall, self._checkpointCall):
            if call is not None and call.active():
                call.cancel()
        if not await waitAtMost(self._reactor, self.flush(), self.stopFlushTimeout):
            self._reportUnstored()
            if self._flushCall is not None and self._flushCall.active():
                self._flushCall.cancel()
        self.wakeWaiters()
        for pool in (self._writer, self._reader, self._checkpointer):
            if pool is not None:
                pool.close()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())

    # Backpressure

    def registerProducer(self, producer: IPushProducer) -> None:
        """
        Have C{producer} paused while the write queue is over the high-water mark.
        """
        self._producers.add(producer)
        if self._producersPaused:
            producer.pauseProducing()

    def unregisterProducer(self, producer: IPushProducer) -> None:
        self._producers.discard(producer)

    def _updatePressure(self) -> None:
        if not self._producersPaused and self.pendingBytes > self.highWater:
            self._producersPaused = True
            self.pauseCount += 1
            log.debug(
                "Write queue has {pendingBytes} bytes; pausing {count} PTYs",
                pendingBytes=self.pendingBytes,
                count=len(self._producers),
            )
            for producer in list(self._producers):
                producer.pauseProducing()
        elif self._producersPaused and self.pendingBytes < self.lowWater:
            self._producersPaused = False
            for producer in list(self._producers):
                producer.resumeProducing()

    @property
    def producersPaused(self) -> bool:
        return self._producersPaused

    # Writes

    def _enqueue(self, op: _Op, wait: bool) -> defer.Deferred[None] | None:
        waiter: defer.Deferred[None] | None = None
        if wait:
            waiter = defer.Deferred()
            op.waiters.append(waiter)
        self._queue.append(op)
        self._urgentOps += 1
        self._scheduleFlush()
        return waiter

    def insertSession(self, record: SessionRecord) -> defer.Deferred[None]:
        """
        Queue the insert of a new session row.

        @return: a Deferred that fires once the row is committed.
        """
        self._openOutputs.pop(record.id, None)
        values = attrs.astuple(record)
        sql = f"INSERT INTO sessions ({SESSION_COLUMNS}) VALUES ({', '.join('?' * len(values))})"
        waiter = self._enqueue(_Write(sql, values, record.id), wait=True)
        assert waiter is not None
        return waiter

    def updateSession(
        self, sessionId: str, wait: bool = False, **fields: Any
    ) -> defer.Deferred[None] | None:
        """
        Queue an update of a session row's C{fields}; C{updated_at} is set too.
        """
        fields.setdefault("updated_at", utcnow())
        assignments = ", ".join(f"{name} = ?" for name in fields)
        sql = f"UPDATE sessions SET {assignments} WHERE id = ?"
        params = (*fields.values(), sessionId)
        return self._enqueue(_Write(sql, params, None), wait)

    def appendEvent(
        self, sessionId: str, kind: str, payload: dict[str, Any], wait: bool = False
    ) -> defer.Deferred[None] | None:
        """
        Queue an event after everything queued before it.
        """
        self._openOutputs.pop(sessionId, None)
        op = _EventWrite(_newEventId(), sessionId, kind, payload, utcnow())
        return self._enqueue(op, wait)

    def appendOutput(self, sessionId: str, text: str, raw: bytes | None, size: int) -> None:
        """
        Queue output read from a session's PTY, merging it into that session's
        newest output event while no transaction has taken it yet.

        @param text: the decoded text.
        @param raw: the exact bytes when they were not valid UTF-8, else C{None}.
        @param size: how many bytes were read, for backpressure accounting.
        """
        self.pendingBytes += size
        pending = self._openOutputs.get(sessionId)
        if pending is not None and pending.chars + len(text) <= MAX_OUTPUT_EVENT_CHARS:
            pending.texts.append(text)
            pending.raws.append(raw)
            pending.chars += len(text)
            pending.size += size
        else:
            pending = _OutputWrite(
                _newEventId(), sessionId, [text], [raw], len(text), size, utcnow()
            )
            self._openOutputs[sessionId] = pending
            self._queue.append(pending)
        self._updatePressure()
        self._scheduleFlush(self.outputFlushDelay)

    def _scheduleFlush(self, delay: float = 0) -> None:
        # Deferring the flush lets every read that arrives meanwhile join one
        # transaction: to the next reactor turn for session changes, a little
        # longer for output so a burst makes fewer, larger events.
        if self._inFlight or not self._queue:
            return
        if self._flushCall is None:
            self._flushCall = self._reactor.callLater(delay, self._flush)
        elif delay == 0 and self._flushCall.getTime() > self._reactor.seconds():
            self._flushCall.reset(0)

    def _takeBatch(self) -> list[_Op]:
        batch: list[_Op] = []
        size = 0
        while self._queue and (not batch or size < MAX_BATCH_BYTES):
            op = self._queue.popleft()
            if isinstance(op, _OutputWrite):
                if self._openOutputs.get(op.sessionId) is op:
                    del self._openOutputs[op.sessionId]
                size += op.size
            else:
                self._urgentOps -= 1
            batch.append(op)
        return batch

    def _flush(self) -> None:
        self._flushCall = None
        if self._inFlight or not self._queue or self._writer is None:
            return
        batch = self._takeBatch()
        self._inFlight = True
        d = self._writer.runInteraction(_writeBatch, batch)
        d.addCallbacks(
            self._batchCommitted,
            self._batchFailed,
            callbackArgs=(batch,),
            errbackArgs=(batch,),
        )

    def _batchCommitted(self, skipped: list[tuple[_Op, str]], batch: list[_Op]) -> None:
        self._inFlight = False
        for op, reason in skipped:
            sessionId = getattr(op, "sessionId", None)
            log.error(
                "Dropped a record of session {sessionId} that cannot be stored: {reason}",
                sessionId=sessionId,
                reason=reason,
            )
            for waiter in op.waiters:
                waiter.errback(InternalError("A record could not be stored.", sessionId=sessionId))
            op.waiters.clear()
        if not self.writable:
            log.info(
                "The store writes again after {tries} failed tries", tries=self._failureStreak
            )
        self.writable = True
        self.damaged = False
        self._failureStreak = 0
        self._retryDelay = RETRY_DELAY
        woken: set[str] = set()
        self._walBytes += PAGE_SIZE
        for op in batch:
            if isinstance(op, _OutputWrite):
                self.pendingBytes -= op.size
                self._bytesSinceIdle += op.size
                self._walBytes += op.size
            if isinstance(op, (_EventWrite, _OutputWrite)):
                woken.add(op.sessionId)
            for waiter in op.waiters:
                waiter.callback(None)
            op.waiters.clear()

        self._updatePressure()
        for sessionId in woken:
            for waiter in self._eventWaiters.pop(sessionId, ()):
                waiter.callback(None)

        if self._queue:
            self._scheduleFlush(0 if self._urgentOps else self.outputFlushDelay)
        else:
            idle, self._idleWaiters = self._idleWaiters, []
            for waiter in idle:
                waiter.callback(None)
            self._scheduleIdleAfterLoad()
            self._scheduleCheckpoint()

    def _scheduleCheckpoint(self) -> None:
        # A checkpoint that ends while the store stops schedules no other.
        if not self.running or self._walBytes < CHECKPOINT_AFTER_BYTES:
            return
        now = self._reactor.seconds()
        if self._checkpointDue is None:
            self._checkpointDue = now + CHECKPOINT_MAX_DELAY
        delay = max(0.0, min(CHECKPOINT_DELAY, self._checkpointDue - now))
        self._checkpointCall = self._callOrPutOff(self._checkpointCall, delay, self._checkpoint)

    def _callOrPutOff(self, call: Any, delay: float, function: Callable[[], None]) -> Any:
        """
        Move C{call} to C{delay} seconds from now if it is pending, else
        schedule C{function} then.

        @return: the pending call.
        """
        if call is not None and call.active():
            call.reset(delay)
            return call
        return self._reactor.callLater(delay, function)

    def _checkpoint(self) -> None:
        # If writes are going on, the next commit that empties the queue
        # schedules the checkpoint again. Writes during a checkpoint do not
        # wait for it: they go on appending to the WAL.
        self._checkpointCall = None
        if not self.running or self._queue or self._inFlight or self._checkpointing:
            return
        if self._checkpointer is None:
            self._checkpointer = self._poolFactory(1)
        self._walBytes = 0
        self._checkpointDue = None
        self._checkpointing = True
        self.checkpoints += 1
        d = self._checkpointer.runInteraction(_checkpointWAL)
        d.addErrback(
            lambda failure: log.warn(
                "Copying the WAL into the database failed, so it is tried again once more"
                " output is committed: {error}",
                error=failure.getErrorMessage(),
            )
        )
        d.addBoth(self._checkpointDone)

    def _checkpointDone(self, _: object) -> None:
        self._checkpointing = False
        # Output committed while the checkpoint ran is due for the next one.
        if not self._queue and not self._inFlight:
            self._scheduleCheckpoint()

    def _scheduleIdleAfterLoad(self) -> None:
        if self.onIdleAfterLoad is None or self._bytesSinceIdle < IDLE_AFTER_LOAD_BYTES:
            return
        self._idleCall = self._callOrPutOff(self._idleCall, IDLE_AFTER_LOAD_DELAY, self._idleAfterLoad)

    def _idleAfterLoad(self) -> None:
        self._idleCall = None
        if self._queue or self._inFlight or self.onIdleAfterLoad is None:
            return
        self._bytesSinceIdle = 0
        self.onIdleAfterLoad()

    def _batchFailed(self, failure: Any, batch: list[_Op]) -> None:
        self._inFlight = False
        self.writable = False
        self.writeFailures += 1
        self._failureStreak += 1

        # The first failure is logged with its cause; a streak is logged every
        # tenth try so a full disk does not flood the log.
        damaged = self.damaged = isDamaged(failure.value)
        if self._failureStreak == 1:
            log.failure(
                "Write of {count} queued records failed; retrying in {delay}s",
                failure,
                count=len(batch),
                delay=self._retryDelay,
            )
            if damaged:
                log.error(
                    "The database file {path} is damaged, so writes keep failing until it is"
                    " repaired or replaced. Stop the daemon; `coven doctor` checks the file.",
                    path=self.path,
                )
        elif self._failureStreak % 10 == 0:
            log.warn(
                "Writes still failing after {tries} tries: {error}",
                tries=self._failureStreak,
                error=failure.getErrorMessage(),
            )

        # The batch goes back to the front of the queue unchanged, so nothing is
        # lost and the order is kept. It is back, and its retry scheduled,
        # before callers waiting on it get the failure: a caller may go on to
        # stop the store, whose flush must then still find the batch.
        self._queue.extendleft(reversed(batch))
        self._urgentOps += sum(1 for op in batch if not isinstance(op, _OutputWrite))
        self._updatePressure()
        self._flushCall = self._reactor.callLater(self._retryDelay, self._flush)
        self._retryDelay = min(self._retryDelay * 2, MAX_RETRY_DELAY)
        self._lastWriteError = failure.getErrorMessage()

        for op in batch:
            waiters, op.waiters = op.waiters, []
            for waiter in waiters:
                waiter.errback(
                    RuntimeUnavailable(
                        "The session store cannot write: its database file is damaged; `coven doctor` checks it."
                        if damaged
                        else "The session store cannot write right now."
                    )
                )

    def flush(self) -> defer.Deferred[None]:
        """
        Return a Deferred that fires once everything queued so far is committed.
        Cancelling it stops only the wait.
        """
        if not self._queue and not self._inFlight:
            return defer.succeed(None)
        return addWaiter(self._idleWaiters)

    def _reportUnstored(self) -> None:
        """
        Log what the store is stopping without: records that kept failing to
        be written for L{stopFlushTimeout} seconds.
        """
        sessions = {op.sessionId for op in self._queue if isinstance(op, (_EventWrite, _OutputWrite))}
        outputBytes = sum(op.size for op in self._queue if isinstance(op, _OutputWrite))
        log.error(
            "Stopping with {count} records of {sessions} sessions ({outputBytes} bytes of output)"
            " not stored: writes kept failing for {timeout} s ({error})",
            count=len(self._queue),
            sessions=len(sessions),
            outputBytes=outputBytes,
            timeout=self.stopFlushTimeout,
            error=self._lastWriteError,
        )

    def deleteSession(self, sessionId: str) -> defer.Deferred[None]:
        """
        Queue the delete of a session row; its events go with it.
        """
        self._openOutputs.pop(sessionId, None)
        waiter = self._enqueue(_Write("DELETE FROM sessions WHERE id = ?", (sessionId,), None), wait=True)
        assert waiter is not None
        return waiter

    # Reads

    def _read(self, function: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        if self._reader is None:
            return defer.fail(RuntimeUnavailable("The session store is not open."))
        return self._reader.runInteraction(function, *args).addErrback(self._explainReadFailure)

    def _explainReadFailure(self, failure: Failure) -> Failure:
        """
        Turn a read that failed on damaged database pages into an error that
        names the damage, instead of the API's bare internal error.
        """
        error = failure.value
        if not isDamaged(error):
            return failure
        self.damagedReads += 1
        if self.damagedReads % _DAMAGED_READS_LOGGED_EVERY == 1:
            log.error(
                "Reading the database failed: {error}. The file is damaged; `coven doctor`"
                " checks it (damaged reads so far: {count}).",
                error=error,
                count=self.damagedReads,
            )
        raise InternalError(
            "The daemon's database file is damaged, so it could not be read; `coven doctor` checks the file.",
            sqliteError=str(error),
        )

    def getSession(self, sessionId: str) -> defer.Deferred[SessionRecord | None]:
        def query(cursor: sqlite3.Cursor) -> SessionRecord | None:
            cursor.execute(f"SELECT {SESSION_COLUMNS} FROM sessions WHERE id = ?", (sessionId,))
            row = cursor.fetchone()
            return None if row is None else _sessionFromRow(row)

        return self._read(query)

    def listSessions(self, archived: bool = False) -> defer.Deferred[list[SessionRecord]]:
        """
        Return non-archived sessions, or with C{archived} the archived ones,
        newest first.
        """
        condition = "archived_at IS NOT NULL" if archived else "archived_at IS NULL"

        def query(cursor: sqlite3.Cursor) -> list[SessionRecord]:
            cursor.execute(
                f"SELECT {SESSION_COLUMNS} FROM sessions WHERE {condition}"
                " ORDER BY created_at DESC, rowid DESC"
            )
            return [_sessionFromRow(row) for row in cursor.fetchall()]

        return self._read(query)

    def readEvents(
        self, sessionId: str, afterSeq: int, limit: int
    ) -> defer.Deferred[EventPage | None]:
        """
        Return the session's events with C{seq} above C{afterSeq}, at most
        C{limit} of them, or C{None} when the session does not exist.
        """

        def query(cursor: sqlite3.Cursor) -> EventPage | None:
            cursor.execute("SELECT 1 FROM sessions WHERE id = ?", (sessionId,))
            if cursor.fetchone() is None:
                return None
            cursor.execute(
                f"SELECT {EVENT_COLUMNS} FROM events WHERE session_id = ? AND seq > ?"
                " ORDER BY seq LIMIT ?",
                (sessionId, afterSeq, limit + 1),
            )
            rows = cursor.fetchall()
            events = tuple(_eventFromRow(row) for row in rows[:limit])
            return EventPage(events, hasMore=len(rows) > limit)

        return self._read(query)

    def readEventsJSON(
        self, sessionId: str, afterSeq: int, limit: int
    ) -> defer.Deferred[RenderedEventPage | None]:
        """
        Like L{readEvents}, but return the page as its JSON body, with at most
        about L{MAX_PAGE_BYTES} of events.
        """

        def query(cursor: sqlite3.Cursor) -> RenderedEventPage | None:
            cursor.execute("SELECT 1 FROM sessions WHERE id = ?", (sessionId,))
            if cursor.fetchone() is None:
                return None

            # As BLOBs, SQLite hands over the stored UTF-8 bytes, which
            # _renderEvent escapes without decoding them.
            cursor.execute(
                f"SELECT {EVENT_COLUMNS_BYTES} FROM events WHERE session_id = ? AND seq > ?"
                " ORDER BY seq LIMIT ?",
                (sessionId, afterSeq, limit + 1),
            )
            parts = [b'{"events":[']
            count = 0
            size = 0
            lastSeq = 0
            hasMore = False
            # Rows are fetched a few at a time, so a full page does not first
            # load every one of its up to 1,001 rows.
            rows = cursor.fetchmany(16)
            while rows and not hasMore:
                for row in rows:
                    if count == limit:
                        hasMore = True
                        break
                    pieces = _renderEvent(row)
                    length = sum(map(len, pieces))
                    if count and size + length > MAX_PAGE_BYTES:
                        hasMore = True
                        break
                    if count:
                        parts.append(b",")
                    parts += pieces
                    count += 1
                    size += length
                    lastSeq = row[0]
                else:
                    rows = cursor.fetchmany(16)

            nextCursor = b'{"afterSeq":%d}' % lastSeq if count else b"null"
            parts += [b'],"nextCursor":', nextCursor, b',"hasMore":', b"true" if hasMore else b"false", b"}"]
            # One join copies the page once.
            return RenderedEventPage(b"".join(parts), count)

        return self._read(query)

    def findEventSeq(self, sessionId: str, eventId: str) -> defer.Deferred[int | None]:
        """
        Return the C{seq} of the session's event C{eventId}, or C{None}.
        """

        def query(cursor: sqlite3.Cursor) -> int | None:
            cursor.execute(
                "SELECT seq FROM events WHERE session_id = ? AND id = ?", (sessionId, eventId)
            )
            row = cursor.fetchone()
            return None if row is None else row[0]

        return self._read(query)

    # Long-poll wake-ups

    def waitForEvents(self, sessionId: str) -> defer.Deferred[None]:
        """
        Return a Deferred that fires when the next transaction holding an event of
        C{sessionId} commits. Cancelling it removes the wait.
        """

        def forget(waiter: defer.Deferred[None]) -> None:
            waiters = self._eventWaiters.get(sessionId, [])
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters:
                self._eventWaiters.pop(sessionId, None)

        waiter: defer.Deferred[None] = defer.Deferred(forget)
        self._eventWaiters.setdefault(sessionId, []).append(waiter)
        return waiter

    def wakeWaiters(self) -> None:
        """
        Wake every long poll now, so that each reads what is committed.
        """
        waiters, self._eventWaiters = self._eventWaiters, {}
        for sessionWaiters in waiters.values():
            for waiter in sessionWaiters:
                waiter.callback(None)


def _lowerThreadPriority(cursor: sqlite3.Cursor, nice: int) -> int | None:
    """
    Give the calling pool thread at least the nice value C{nice}, on Linux,
    where a nice value belongs to one thread. The main thread is left alone,
    because the harnesses it forks would inherit its value.

    @return: the thread's id, or C{None} where nothing was changed.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is threading.main_thread():
        return None
    threadId = threading.get_native_id()
    current = os.getpriority(os.PRIO_PROCESS, threadId)
    # Lowering a nice value needs privileges, so a higher one is kept.
    os.setpriority(os.PRIO_PROCESS, threadId, max(current, nice))
    return threadId


def _checkpointWAL(cursor: sqlite3.Cursor) -> None:
    """
    Copy what the WAL contains into the database, in the checkpoint thread. A
    passive checkpoint waits neither for the writer nor for readers, and a
    later one copies what it leaves out.
    """
    cursor.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


def _rollback(cursor: sqlite3.Cursor) -> None:
    """
    Roll back the open transaction, if there still is one. SQLite ends it by
    itself on some errors, such as a full disk, and a ROLLBACK then raises
    "no transaction is active" in place of the error that matters.
    """
    if cursor.connection.in_transaction:
        cursor.execute("ROLLBACK")


def _writeBatch(cursor: sqlite3.Cursor, batch: list[_Op]) -> list[tuple[_Op, str]]:
    """
    Write C{batch} in one transaction, in queue order, in the writer thread.

    A failure of the database itself (disk full, I/O error, lock) is raised so
    the whole batch is tried again later. A record that can never be written,
    such as one SQLite cannot encode, would block the queue for ever, so the
    batch is then written one record at a time and only such records are left
    out.

    @return: the records left out, each with the reason.
    """
    cursor.execute("BEGIN IMMEDIATE")
    try:
        _writeOps(cursor, batch)
        cursor.execute("COMMIT")
        return []
    except sqlite3.OperationalError:
        _rollback(cursor)
        raise
    except Exception:
        _rollback(cursor)

    skipped: list[tuple[_Op, str]] = []
    cursor.execute("BEGIN IMMEDIATE")
    try:
        for op in batch:
            cursor.execute("SAVEPOINT record")
            try:
                _writeOps(cursor, [op])
            except sqlite3.OperationalError:
                raise
            except Exception as error:
                cursor.execute("ROLLBACK TO record")
                skipped.append((op, f"{type(error).__name__}: {error}"))
            cursor.execute("RELEASE record")
        cursor.execute("COMMIT")
    except BaseException:
        _rollback(cursor)
        raise
    return skipped


# Output text goes into the data column unencoded (see EVENT_COLUMNS), and
# reads encode it: _eventFromRow with json.dumps, _renderEvent on its bytes.
_INSERT_EVENT = (
    "INSERT INTO events (id, session_id, kind, payload_json, created_at) VALUES (?, ?, ?, ?, ?)"
)
_INSERT_OUTPUT = (
    "INSERT INTO events (id, session_id, kind, payload_json, data, created_at)"
    " VALUES (?, ?, 'output', '', ?, ?)"
)


def _writeOps(cursor: sqlite3.Cursor, batch: list[_Op]) -> None:
    # Consecutive rows of one statement go to SQLite together, in queue order.
    sql: str | None = None
    rows: list[tuple[Any, ...]] = []
    for op in batch:
        if isinstance(op, _OutputWrite):
            if any(raw is not None for raw in op.raws):
                statement = _INSERT_EVENT
                row: tuple[Any, ...] = (
                    op.id, op.sessionId, "output", _encodePayload(op.payload()), op.createdAt
                )
            else:
                statement = _INSERT_OUTPUT
                row = (op.id, op.sessionId, "".join(op.texts), op.createdAt)
        elif isinstance(op, _EventWrite):
            statement = _INSERT_EVENT
            row = (op.id, op.sessionId, op.kind, _encodePayload(op.payload), op.createdAt)
        else:
            statement, row = op.sql, op.params
        if statement != sql:
            if rows:
                assert sql is not None
                cursor.executemany(sql, rows)
            sql, rows = statement, []
        rows.append(row)
    if rows:
        assert sql is not None
        cursor.executemany(sql, rows)


def _eventFromRow(row: tuple[Any, ...]) -> Event:
    """
    Build an event from the columns of L{EVENT_COLUMNS}, encoding the
    payload of an output event stored as text.
    """
    seq, eventId, sessionId, kind, payloadJSON, data, createdAt = row
    if data is not None:
        payloadJSON = _encodePayload({"data": data})
    return Event(seq, eventId, sessionId, kind, payloadJSON, createdAt)


# JSON string escapes on UTF-8 bytes: json.dumps(..., ensure_ascii=False)
# changes only '"', the backslash and the control characters below 0x20, and
# never a byte of a multi-byte character. _ESCAPE_TWICE escapes the result
# again, as quoting an encoded payload does.
_ESCAPED = bytes(range(0x20)) + b'"\\'
_NOT_ESCAPED = bytes(byte for byte in range(256) if byte not in _ESCAPED)
_ESCAPE_ONCE = {byte: json.dumps(chr(byte))[1:-1].encode("ascii") for byte in _ESCAPED}
_ESCAPE_TWICE = {
    byte: json.dumps(escape.decode("ascii"))[1:-1].encode("ascii") for byte, escape in _ESCAPE_ONCE.items()
}
_BACKSLASH = ord("\\")
_SINGLE_BYTES = [bytes((byte,)) for byte in range(256)]


# Below this many bytes, or past this many different byte values to escape,
# Python's JSON encoder on the decoded text costs less than bytes.replace
# calls: 0.31 against 0.88 microseconds for a 19-byte line with colour codes.
_SHORT_TEXT = 256
_MAX_REPLACED_VALUES = 16
# From about this many bytes to escape on (an estimate, not a measured
# crossover), one scan per escapable value finds the values present faster
# than building a set of the bytes.
_SET_MAX_BYTES = 256
_encodeString = json.encoder.encode_basestring  # type: ignore[attr-defined]


def _escapeJSON(text: bytes, escapes: dict[int, bytes]) -> bytes:
    """
    Escape the UTF-8 C{text} for the inside of a JSON string, once with
    L{_ESCAPE_ONCE} or twice with L{_ESCAPE_TWICE}. Longer output takes one
    C{bytes.replace} for each byte value that needs it: most has a few, such
    as the newline and the escape character.
    """
    if len(text) >= _SHORT_TEXT:
        found = text.translate(None, _NOT_ESCAPED)
        if not found:
            return text
        if len(found) < _SET_MAX_BYTES:
            values = set(found)
        else:
            values = {byte for byte in _ESCAPED if _SINGLE_BYTES[byte] in found}
        if len(values) <= _MAX_REPLACED_VALUES:
            # The backslash goes first, since the other escapes add backslashes.
            if _BACKSLASH in values:
                values.remove(_BACKSLASH)
                text = text.replace(b"\\", escapes[_BACKSLASH])
            for byte in values:
                text = text.replace(_SINGLE_BYTES[byte], escapes[byte])
            return text
    # surrogateescape passes bytes that are not UTF-8 through unchanged, as
    # the replacements do. The daemon itself stores only valid UTF-8.
    escaped = _encodeString(text.decode("utf-8", "surrogateescape"))[1:-1]
    if escapes is _ESCAPE_TWICE:
        escaped = _encodeString(escaped)[1:-1]
    return escaped.encode("utf-8", "surrogateescape")


def _renderEvent(row: tuple[Any, ...]) -> list[bytes]:
    """
    Render a row of L{EVENT_COLUMNS_BYTES} as the pieces of the event's API
    object: the bytes of
    C{json.dumps(event.toJSON(), separators=(",", ":"), ensure_ascii=False)}.
    An output event's text, stored unencoded, is escaped twice, since the
    payload is JSON in a JSON string.

    This runs in the reader thread and holds the GIL, which SQLite's
    json_object, used before, did not. Against json_object, escaping took a
    quarter of the CPU for plain lines, two thirds for terminal output with
    colour codes, and 1.4 to 1.7 times as much for output dense with control
    characters of many kinds. A page of 1,000 events of 10 bytes took 2.8
    against 1.35 ms, since each row comes to Python as seven objects.
    """
    seq, eventId, sessionId, kind, payloadJSON, data, createdAt = row
    head = b'{"seq":%d,"id":"%s","session_id":"%s","kind":"%s","payload_json":"'
    tail = b'","created_at":"%s"}'
    # Ids, kinds and times the daemon writes need no escapes: one check for
    # all four saves three per event, which counts in pages of short events.
    if (eventId + sessionId + kind + createdAt).translate(None, _NOT_ESCAPED):
        eventId = _escapeJSON(eventId, _ESCAPE_ONCE)
        sessionId = _escapeJSON(sessionId, _ESCAPE_ONCE)
        kind = _escapeJSON(kind, _ESCAPE_ONCE)
        createdAt = _escapeJSON(createdAt, _ESCAPE_ONCE)
    head = head % (seq, eventId, sessionId, kind)
    tail = tail % createdAt
    if data is None:
        return [head, _escapeJSON(payloadJSON, _ESCAPE_ONCE), tail]
    return [head + b'{\\"data\\":\\"', _escapeJSON(data, _ESCAPE_TWICE), b'\\"}' + tail]


def _encodePayload(payload: dict[str, Any]) -> str:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
