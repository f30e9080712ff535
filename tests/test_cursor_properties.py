"""Hypothesis properties of the event cursor: pages never skip or repeat an event."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
from typing import Any, Callable
from urllib.parse import urlencode

import attrs
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.task import Clock

from coven.api import CovenAPI
from coven.harnesses import HarnessRegistry
from coven.records import SessionRecord, utcnow
from coven.sessions import SessionManager
from coven.store import Store, _configureConnection, openDatabase

SESSIONS = 3
# The contract's maximum page size: larger limits return at most this many.
MAX_EVENT_LIMIT = 1000
# Steps (commits, delayed calls or StubTreq flushes) that one request or one
# settle may take before the test gives up.
MAX_ROUNDS = 50
# A limit far above MAX_EVENT_LIMIT, which the daemon lowers to it.
HUGE = 10**25
# One queued write: session index, what to write, and the output text or the
# new title.
WRITES = st.tuples(
    st.integers(0, SESSIONS - 1),
    st.sampled_from(["output", "output", "input", "kill", "exit", "update"]),
    st.text(max_size=8),
)


class SQLitePool:
    """
    A stand-in for C{adbapi.ConnectionPool} on one connection to the database
    file, which runs each interaction in the calling thread.

    With C{hold}, interactions wait in L{pending} until L{runNext}, so a test
    can read while a write transaction is taken from the queue but not yet
    committed, as the daemon's writer thread does.
    """

    def __init__(self, path: str, hold: bool) -> None:
        self.connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        _configureConnection(self.connection)
        self.hold = hold
        self.pending: list[tuple[Callable[..., Any], tuple[Any, ...], defer.Deferred[Any]]] = []

    def runInteraction(self, interaction: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        result: defer.Deferred[Any] = defer.Deferred()
        self.pending.append((interaction, args, result))
        if not self.hold:
            self.runNext()
        return result

    def runNext(self) -> None:
        interaction, args, result = self.pending.pop(0)
        cursor = self.connection.cursor()
        try:
            value = interaction(cursor, *args)
        except Exception:
            # adbapi rolls back a failed interaction too.
            if self.connection.in_transaction:
                self.connection.rollback()
            result.errback()
        else:
            result.callback(value)
        finally:
            cursor.close()

    def close(self) -> None:
        self.connection.close()


@attrs.define
class Reader:
    """
    A client that follows one session's events page by page, as a client that
    stores C{nextCursor.afterSeq} does.
    """

    sessionId: str
    cursor: int = 0
    seen: list[dict[str, Any]] = attrs.Factory(list)


def transcript(items: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """
    Join consecutive output texts, because the store merges output reads into
    events at boundaries that depend on when transactions run.
    """
    joined: list[tuple[str, Any]] = []
    for kind, value in items:
        if kind == "output" and joined and joined[-1][0] == "output":
            joined[-1] = ("output", joined[-1][1] + value)
        else:
            joined.append((kind, value))
    return joined


class EventCursorMachine(RuleBasedStateMachine):
    """
    Events appended to several sessions through a real L{Store} on a
    temporary SQLite file, interleaved with transactions that start and commit
    and with reads through the events route.

    Each read is compared with what is committed in the file at that moment,
    read on a connection of its own: a page must be exactly the first events
    after its cursor, so nothing is skipped, and C{hasMore} and C{nextCursor}
    must agree with it. Readers that follow C{nextCursor} must never see an
    event twice, and once everything is committed they must have seen every
    event of their session in the order it was appended.
    """

    def __init__(self) -> None:
        super().__init__()
        self.folder = tempfile.mkdtemp(prefix="coven-cursor-")
        path = os.path.join(self.folder, "coven.sqlite3")
        openDatabase(path)
        self.oracle = sqlite3.connect(path, isolation_level=None)
        self.pools: list[SQLitePool] = []

        def poolFactory(connections: int) -> SQLitePool:
            # The store builds its writer first. Only the writer's
            # interactions wait for runNext; checkpoints run at once.
            pool = SQLitePool(path, hold=not self.pools)
            self.pools.append(pool)
            return pool

        self.clock = Clock()
        self.store = Store(path, self.clock, poolFactory=poolFactory)
        self.store.startService()
        self.writer = self.pools[0]
        sessions = SessionManager(
            self.store, HarnessRegistry(os.path.join(self.folder, "harnesses.toml")), self.clock
        )
        self.client = StubTreq(CovenAPI(self.store, sessions, self.clock).resource())

        self.sessionIds: list[str] = []
        self.deleted: set[str] = set()
        self.appended: dict[str, list[tuple[str, Any]]] = {}
        self.readers: list[Reader] = []
        self.knownIds: set[str] = set()
        self.maxSeq = 0
        self.counter = 0

    # Plumbing

    def runNextCall(self) -> None:
        """
        Advance the clock to the store's next delayed call, such as a flush,
        which may be scheduled a little later than the current turn.
        """
        calls = self.clock.getDelayedCalls()
        if calls:
            self.clock.advance(max(0.0, min(call.getTime() for call in calls) - self.clock.seconds()))

    def settle(self) -> None:
        """
        Run queued flushes and commit every transaction until the store's
        queue is empty.
        """
        idle: list[object] = []
        self.store.flush().addBoth(idle.append)
        for _ in range(MAX_ROUNDS):
            if idle:
                return
            if self.writer.pending:
                self.commit()
            else:
                self.runNextCall()
        raise AssertionError(f"store did not settle in {MAX_ROUNDS} rounds")

    def readEvents(self, **query: Any) -> tuple[int, Any]:
        pending = self.client.get("http://coven/api/v1/events?" + urlencode(query))
        results: list[Any] = []
        pending.addBoth(results.append)
        for _ in range(MAX_ROUNDS):
            if results:
                break
            self.client.flush()
        assert results, f"GET /api/v1/events?{urlencode(query)} did not finish"
        response = results[0]
        if not hasattr(response, "code"):
            response.raiseException()
        body: list[Any] = []
        self.client.json_content(response).addBoth(body.append)
        self.client.flush()
        assert body, "response body did not arrive"
        return response.code, body[0]

    def committed(self, sessionId: str, afterSeq: int = 0) -> list[tuple[int, str]]:
        rows = self.oracle.execute(
            "SELECT seq, id FROM events WHERE session_id = ? AND seq > ? ORDER BY seq",
            (sessionId, min(afterSeq, 2**63 - 1)),
        )
        return [(seq, eventId) for seq, eventId in rows]

    def sessionExists(self, sessionId: str) -> bool:
        # A delete is visible once its transaction commits, not when it is queued.
        row = self.oracle.execute("SELECT 1 FROM sessions WHERE id = ?", (sessionId,)).fetchone()
        return row is not None

    def checkPage(self, sessionId: str, afterSeq: int, limit: int, page: dict[str, Any]) -> None:
        expected = self.committed(sessionId, afterSeq)
        effectiveLimit = min(limit, MAX_EVENT_LIMIT)
        events = page["events"]

        assert [(event["seq"], event["id"]) for event in events] == expected[:effectiveLimit]
        assert all(event["session_id"] == sessionId for event in events)
        assert page["hasMore"] == (len(expected) > effectiveLimit)
        if events:
            assert page["nextCursor"] == {"afterSeq": events[-1]["seq"]}
        else:
            assert page["nextCursor"] is None

    # Setup

    @initialize(history=st.lists(WRITES, max_size=30))
    def createSessions(self, history: list[tuple[int, str, str]]) -> None:
        """
        Insert the sessions, then append and commit C{history}, so reads start
        with events to page through.
        """
        for index in range(SESSIONS):
            now = utcnow()
            record = SessionRecord(
                id=f"session-{index}",
                project_root="/project",
                cwd="/project",
                harness="fake",
                title=f"session {index}",
                status="running",
                exit_code=None,
                archived_at=None,
                created_at=now,
                updated_at=now,
            )
            self.store.insertSession(record)
            self.sessionIds.append(record.id)
            self.appended[record.id] = []
            self.readers.append(Reader(record.id))
        self.write(history)
        self.settle()

    # Writes

    @rule(writes=st.lists(WRITES, min_size=1, max_size=6))
    def write(self, writes: list[tuple[int, str, str]]) -> None:
        """
        Queue writes: output that may merge into the session's last output
        event, other events, and session row updates, which keep their place
        in the queue between events.
        """
        for index, kind, text in writes:
            sessionId = self.sessionIds[index]
            if sessionId in self.deleted:
                # The daemon deletes only finished sessions, which get no more writes.
                continue
            if kind == "output":
                self.store.appendOutput(sessionId, text, None, len(text.encode("utf-8")))
                self.appended[sessionId].append(("output", text))
            elif kind == "update":
                self.store.updateSession(sessionId, title=text)
            else:
                self.counter += 1
                self.store.appendEvent(sessionId, kind, {"n": self.counter})
                self.appended[sessionId].append((kind, {"n": self.counter}))

    @precondition(lambda self: len(self.deleted) < SESSIONS - 1)
    @rule(index=st.integers(0, SESSIONS - 1))
    def deleteSession(self, index: int) -> None:
        sessionId = self.sessionIds[index]
        if sessionId in self.deleted:
            return
        self.store.deleteSession(sessionId)
        self.deleted.add(sessionId)

    @rule()
    def startTransaction(self) -> None:
        # The store's flush hands the writer pool one batch, which stays
        # uncommitted until commit().
        self.runNextCall()

    @rule()
    def settleAll(self) -> None:
        self.settle()

    @precondition(lambda self: bool(self.writer.pending))
    @rule()
    def commit(self) -> None:
        self.writer.runNext()
        newIds = set()
        for seq, eventId in self.oracle.execute("SELECT seq, id FROM events"):
            if eventId not in self.knownIds:
                # seq is never reused, even after the newest events are deleted.
                assert seq > self.maxSeq, (seq, self.maxSeq)
                newIds.add((seq, eventId))
        for seq, eventId in newIds:
            self.knownIds.add(eventId)
        self.maxSeq = max([self.maxSeq, *(seq for seq, _ in newIds)])

    # Reads

    @rule(
        index=st.integers(0, SESSIONS - 1),
        limit=st.one_of(st.integers(1, 4), st.integers(1, 1500), st.just(HUGE)),
        cursorForm=st.sampled_from(["afterSeq", "afterEventId", "both"]),
    )
    def follow(self, index: int, limit: int, cursorForm: str) -> None:
        """
        Read the next page of a reader, giving its cursor as C{afterSeq}, as
        the id of the last event it saw, or as both with another event id
        (then C{afterSeq} wins).
        """
        reader = self.readers[index]
        query: dict[str, Any] = {"sessionId": reader.sessionId, "limit": limit}
        if cursorForm in ("afterSeq", "both"):
            query["afterSeq"] = reader.cursor
        if cursorForm == "afterEventId" and reader.seen:
            query["afterEventId"] = reader.seen[-1]["id"]
        if cursorForm == "both" and reader.seen:
            query["afterEventId"] = reader.seen[0]["id"]

        status, page = self.readEvents(**query)

        if not self.sessionExists(reader.sessionId):
            assert status == 404, page
            assert page["error"]["code"] == "session_not_found"
            return
        assert status == 200, page
        self.checkPage(reader.sessionId, reader.cursor, limit, page)
        seenIds = {event["id"] for event in reader.seen}
        for event in page["events"]:
            assert event["id"] not in seenIds, f"event {event['seq']} returned twice"
        reader.seen.extend(page["events"])
        if page["nextCursor"] is not None:
            reader.cursor = page["nextCursor"]["afterSeq"]

    @rule(
        index=st.integers(0, SESSIONS - 1),
        afterSeq=st.one_of(st.integers(0, 80), st.integers(0, 2**70)),
        limit=st.one_of(st.integers(1, 4), st.integers(1, 1500), st.just(HUGE)),
    )
    def probe(self, index: int, afterSeq: int, limit: int) -> None:
        """
        Read one page at any cursor, without following it.
        """
        sessionId = self.sessionIds[index]
        status, page = self.readEvents(sessionId=sessionId, afterSeq=afterSeq, limit=limit)

        if not self.sessionExists(sessionId):
            assert status == 404, page
            assert page["error"]["code"] == "session_not_found"
            return
        assert status == 200, page
        self.checkPage(sessionId, afterSeq, limit, page)

    @invariant()
    def readersInSeqOrder(self) -> None:
        for reader in self.readers:
            seqs = [event["seq"] for event in reader.seen]
            assert seqs == sorted(set(seqs))

    def teardown(self) -> None:
        try:
            self.settle()
            self.drainAndCompare()
        finally:
            self.store.stopService()
            self.oracle.close()
            for pool in self.pools:
                pool.close()
            shutil.rmtree(self.folder, ignore_errors=True)

    def drainAndCompare(self) -> None:
        """
        Follow every reader to the end and check that it saw each event of its
        session once, in the order the events were appended.
        """
        for reader in self.readers:
            if reader.sessionId in self.deleted:
                continue
            for _ in range(len(self.committed(reader.sessionId)) + 1):
                status, page = self.readEvents(sessionId=reader.sessionId, afterSeq=reader.cursor, limit=3)
                assert status == 200, page
                reader.seen.extend(page["events"])
                if page["nextCursor"] is not None:
                    reader.cursor = page["nextCursor"]["afterSeq"]
                if not page["hasMore"]:
                    break

            assert [(event["seq"], event["id"]) for event in reader.seen] == self.committed(reader.sessionId)
            observed = [
                (event["kind"], payload["data"] if event["kind"] == "output" else payload)
                for event in reader.seen
                for payload in [json.loads(event["payload_json"])]
            ]
            assert transcript(observed) == transcript(self.appended[reader.sessionId])


# About 5 s on the 2-core development machine.
CURSOR_SETTINGS = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_cursor_pages_never_skip_or_repeat() -> None:
    run_state_machine_as_test(EventCursorMachine, settings=CURSOR_SETTINGS)


@pytest.mark.parametrize("limit", [1, 7, 999, MAX_EVENT_LIMIT, MAX_EVENT_LIMIT + 1, HUGE])
def test_cursor_follows_long_history(limit: int) -> None:
    # A history longer than the largest page, with other sessions' events
    # between this session's ones, is read in full with every page size.
    machine = EventCursorMachine()
    try:
        machine.createSessions([])
        for step in range(525):
            machine.write([(0, "output", f"chunk {step}\n"), (0, "input", ""), (1 + step % 2, "input", "")])
        machine.settle()
        lastSeq = machine.committed("session-0")[-1][0]
        pages = 0
        while machine.readers[0].cursor < lastSeq:
            machine.follow(0, limit, "afterSeq")
            pages += 1
            assert pages <= 1050, "the reader stopped advancing"
        assert len(machine.readers[0].seen) == 1050
        assert pages == -(-1050 // min(limit, MAX_EVENT_LIMIT))
    finally:
        machine.teardown()
