"""The SQLite store on real files: schema versions, seq, and records that cannot be written."""

from __future__ import annotations

import json
import os
import pathlib
import random
import sqlite3
import struct
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.logger import formatEvent, globalLogPublisher

from coven import store as storeModule
from coven.api import jsonBytes
from coven.errors import InternalError, RuntimeUnavailable
from coven.records import SessionRecord, utcnow
from coven.store import PAGE_SIZE, SCHEMA_VERSION, Store, StoreSchemaError, openDatabase
from tests.support import damageDatabase, pollUntil


def sessionRecord(sessionId: str) -> SessionRecord:
    now = utcnow()
    return SessionRecord(sessionId, "/p", "/p", "fake", "t", "running", None, None, now, now)


@pytest.fixture
def databasePath(home: str) -> str:
    return os.path.join(home, "coven.sqlite3")


def test_new_database_has_schema(databasePath: str) -> None:
    openDatabase(databasePath)

    with sqlite3.connect(databasePath) as connection:
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        journal = connection.execute("PRAGMA journal_mode").fetchone()[0]
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert version == SCHEMA_VERSION
    assert journal == "wal"
    assert {"sessions", "events"} <= tables
    assert os.stat(databasePath).st_mode & 0o777 == 0o600


def test_newer_schema_rejected(databasePath: str) -> None:
    with sqlite3.connect(databasePath) as connection:
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")

    with pytest.raises(StoreSchemaError) as raised:
        openDatabase(databasePath)

    assert databasePath in str(raised.value)
    assert f"schema version {SCHEMA_VERSION + 1}" in str(raised.value)


def test_reopen_keeps_data(databasePath: str) -> None:
    openDatabase(databasePath)
    with sqlite3.connect(databasePath) as connection:
        connection.execute(
            "INSERT INTO sessions VALUES ('s', '/p', '/p', 'fake', 't', 'completed', 0, NULL, 'a', 'b')"
        )

    orphans = openDatabase(databasePath)

    with sqlite3.connect(databasePath) as connection:
        count = connection.execute("SELECT COUNT(*) FROM sessions").fetchone()[0]
    assert orphans == []
    assert count == 1


@pytest_twisted.ensureDeferred
async def test_seq_not_reused_after_delete(databasePath: str) -> None:
    store = Store(databasePath, reactor)
    store.open()
    store.startService()
    try:
        await store.insertSession(sessionRecord("first"))
        await store.appendEvent("first", "input", {"data": "x"}, wait=True)
        firstPage = await store.readEvents("first", 0, 10)
        await store.deleteSession("first")
        await store.insertSession(sessionRecord("second"))
        await store.appendEvent("second", "input", {"data": "y"}, wait=True)
        secondPage = await store.readEvents("second", 0, 10)
        deleted = await store.readEvents("first", 0, 10)
    finally:
        await store.stopService()

    assert deleted is None
    assert secondPage.events[0].seq > firstPage.events[0].seq


@pytest_twisted.ensureDeferred
async def test_unstorable_record_dropped_alone(databasePath: str) -> None:
    store = Store(databasePath, reactor)
    store.open()
    store.startService()
    try:
        await store.insertSession(sessionRecord("s"))
        before = store.appendEvent("s", "input", {"data": "before"}, wait=True)
        # A lone surrogate cannot be encoded for SQLite: no retry could ever
        # store it, so it must not hold up the records around it.
        broken = store.appendEvent("s", "input", {"data": "\ud800"}, wait=True)
        after = store.appendEvent("s", "input", {"data": "after"}, wait=True)
        await before
        failure = None
        try:
            await broken
        except Exception as error:
            failure = error
        await after
        page = await store.readEvents("s", 0, 10)
    finally:
        await store.stopService()

    assert failure is not None
    assert [event.payload_json for event in page.events] == ['{"data":"before"}', '{"data":"after"}']
    assert store.writable


def test_new_database_page_size(databasePath: str, tmp_path: pathlib.Path) -> None:
    openDatabase(databasePath)
    # A database of schema version 1, made with SQLite's default page size.
    older = str(tmp_path / "older.sqlite3")
    with sqlite3.connect(older) as connection:
        for statement in storeModule.MIGRATIONS[0]:
            connection.execute(statement)
        connection.execute("PRAGMA user_version = 1")
    openDatabase(older)

    with sqlite3.connect(databasePath) as connection:
        newSize = connection.execute("PRAGMA page_size").fetchone()[0]
    with sqlite3.connect(older) as connection:
        olderSize = connection.execute("PRAGMA page_size").fetchone()[0]
        version = connection.execute("PRAGMA user_version").fetchone()[0]
    # A database that already has pages keeps its page size and still opens.
    assert (newSize, olderSize, version) == (PAGE_SIZE, 4096, SCHEMA_VERSION)


def test_foreign_database_rejected(databasePath: str) -> None:
    with sqlite3.connect(databasePath) as connection:
        connection.execute("CREATE TABLE sessions (name TEXT)")
        connection.execute("INSERT INTO sessions VALUES ('theirs')")

    with pytest.raises(StoreSchemaError) as raised:
        openDatabase(databasePath)
    with sqlite3.connect(databasePath) as connection:
        tables = [row[0] for row in connection.execute("SELECT name FROM sqlite_master")]
        mode = connection.execute("PRAGMA journal_mode").fetchone()[0]

    assert str(raised.value) == (
        f"database {databasePath} is not a Coven database: it has 1 tables or indexes but no"
        " Coven schema version; move it away or use another --home"
    )
    # The other program's file is left as it was.
    assert tables == ["sessions"]
    assert mode == "delete"


# Output texts with everything JSON escapes: quotes, backslashes, every control
# character, NUL, DEL, non-ASCII, astral and line-separator characters.
AWKWARD_TEXTS = [
    "plain",
    '"quoted" and \\back\\slashed',
    "".join(chr(code) for code in range(32)) + "\x7f",
    "\x1b[38;5;245m\u2502\x1b[0m caf\u00e9 \u65e5\u672c \U0001f600 \u2028\u2029 \ufffd",
]


def test_escape_matches_json_dumps() -> None:
    # Every character below 0x80 alone, then random texts for each path of
    # _escapeJSON: short ones, long ones with few kinds of escapes and long
    # ones with many kinds.
    pieces = [chr(code) for code in range(0x80)] + ["\u00e9", "\u2028", "\U0001f600", "\ufffd", "ab"]
    escaped = [chr(code) for code in range(0x20)] + ['"', "\\"]
    generator = random.Random(4)
    texts = list(pieces)
    for _ in range(1500):
        texts.append("".join(generator.choices(pieces, k=generator.randint(0, 600))))
    for _ in range(300):
        kinds = generator.sample(escaped, generator.randint(1, 5))
        plain = generator.choices(["x", "\u65e5", "line "], k=generator.randint(100, 3000))
        mixed = plain + generator.choices(kinds, k=generator.randint(1, 400))
        generator.shuffle(mixed)
        texts.append("".join(mixed))
    texts.append("".join(escaped) * 20)
    texts.append("\x1b[0m\r\n" * 200)

    for text in texts:
        once = json.dumps(text, ensure_ascii=False)[1:-1]
        twice = json.dumps(once, ensure_ascii=False)[1:-1]
        encoded = text.encode("utf-8")
        assert storeModule._escapeJSON(encoded, storeModule._ESCAPE_ONCE) == once.encode("utf-8"), text
        assert storeModule._escapeJSON(encoded, storeModule._ESCAPE_TWICE) == twice.encode("utf-8"), text


@pytest_twisted.ensureDeferred
async def test_output_payload_json_matches_python(databasePath: str) -> None:
    store = Store(databasePath, reactor)
    store.open()
    store.startService()
    try:
        await store.insertSession(sessionRecord("s"))
        for text in AWKWARD_TEXTS:
            # Separate transactions, so each text is one output event.
            store.appendOutput("s", text, None, len(text.encode("utf-8")))
            await store.flush()
        store.appendOutput("s", "bad \ufffd", b"bad \xff", 5)
        await store.flush()
        page = await store.readEvents("s", 0, 100)
        rendered = await store.readEventsJSON("s", 0, 100)
    finally:
        await store.stopService()

    # Each text escaped on its bytes, with every control character, quotes
    # and backslashes, gives the bytes json.dumps gives.
    assert rendered.body == jsonBytes(page.toJSON())
    expected = [
        json.dumps({"data": text}, separators=(",", ":"), ensure_ascii=False) for text in AWKWARD_TEXTS
    ]
    expected.append('{"data":"bad \ufffd","raw":"YmFkIP8="}')
    assert [event.payload_json for event in page.events] == expected


@pytest_twisted.ensureDeferred
async def test_output_text_stored_unencoded(databasePath: str) -> None:
    text = AWKWARD_TEXTS[0]
    store = Store(databasePath, reactor)
    store.open()
    store.startService()
    try:
        await store.insertSession(sessionRecord("s"))
        store.appendOutput("s", text, None, len(text.encode("utf-8")))
        await store.flush()
        page = await store.readEvents("s", 0, 10)
        rendered = await store.readEventsJSON("s", 0, 10)
    finally:
        await store.stopService()

    with sqlite3.connect(databasePath) as connection:
        rows = connection.execute("SELECT payload_json, data FROM events WHERE kind = 'output'").fetchall()
    # The writer leaves the JSON encoding to reads.
    assert rows == [("", text)]
    assert [event.payload_json for event in page.events] == [
        json.dumps({"data": text}, separators=(",", ":"), ensure_ascii=False)
    ]
    assert rendered.body == jsonBytes(page.toJSON())


@pytest_twisted.ensureDeferred
async def test_version_1_database_upgraded(databasePath: str) -> None:
    with sqlite3.connect(databasePath) as connection:
        for statement in storeModule.MIGRATIONS[0]:
            connection.execute(statement)
        connection.execute(
            "INSERT INTO sessions VALUES ('s', '/p', '/p', 'fake', 't', 'completed', 0, NULL, 'a', 'b')"
        )
        connection.execute(
            "INSERT INTO events (id, session_id, kind, payload_json, created_at)"
            " VALUES ('e1', 's', 'output', '{\"data\":\"old\\n\"}', 'a')"
        )
        connection.execute("PRAGMA user_version = 1")

    store = Store(databasePath, reactor)
    store.open()
    store.startService()
    try:
        store.appendOutput("s", "new\n", None, 4)
        await store.flush()
        page = await store.readEvents("s", 0, 10)
        rendered = json.loads((await store.readEventsJSON("s", 0, 10)).body)
    finally:
        await store.stopService()

    with sqlite3.connect(databasePath) as connection:
        version = connection.execute("PRAGMA user_version").fetchone()[0]
    assert version == SCHEMA_VERSION == 2
    assert [event.payload_json for event in page.events] == ['{"data":"old\\n"}', '{"data":"new\\n"}']
    assert [event["payload_json"] for event in rendered["events"]] == [
        event.payload_json for event in page.events
    ]


async def _storeWithEvents(
    databasePath: str,
    sessionId: str,
    sizes: list[int],
    filler: str = "\x1b\"\\\né😀",
) -> Store:
    store = Store(databasePath, reactor)
    store.open()
    store.startService()
    await store.insertSession(sessionRecord(sessionId))
    for number, size in enumerate(sizes):
        text = (f"{number:06d}" + filler * size)[:size]
        store.appendOutput(sessionId, text, None, size)
        await store.flush()
    await store.appendEvent(sessionId, "exit", {"exitCode": 0, "signal": None, "status": "completed"}, wait=True)
    return store


@pytest_twisted.ensureDeferred
async def test_rendered_page_matches_event_page(databasePath: str) -> None:
    store = await _storeWithEvents(databasePath, "s", [10, 200, 3000])
    try:
        pages = [
            (await store.readEvents("s", afterSeq, limit), await store.readEventsJSON("s", afterSeq, limit))
            for afterSeq, limit in [(0, 1000), (0, 2), (2, 1), (3, 1000), (99, 10)]
        ]
        missing = await store.readEventsJSON("nope", 0, 10)
    finally:
        await store.stopService()

    for page, rendered in pages:
        assert rendered.body == jsonBytes(page.toJSON())
        assert rendered.count == len(page.events)
    assert [rendered.count for _, rendered in pages] == [4, 2, 1, 1, 0]
    assert missing is None


@pytest_twisted.ensureDeferred
async def test_rendered_pages_stop_at_size(databasePath: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storeModule, "MAX_PAGE_BYTES", 5000)
    # Two small events fit one page. The 6,000-character event goes alone on
    # its page, over the limit, because a page always contains one event.
    store = await _storeWithEvents(databasePath, "s", [1000, 1000, 6000, 1000, 4000], filler="x")
    try:
        pages = []
        cursor = 0
        while True:
            rendered = await store.readEventsJSON("s", cursor, 1000)
            page = json.loads(rendered.body)
            pages.append(page)
            if not page["hasMore"]:
                break
            cursor = page["nextCursor"]["afterSeq"]
        whole = await store.readEvents("s", 0, 1000)
    finally:
        await store.stopService()

    assert [len(page["events"]) for page in pages] == [2, 1, 1, 2]
    assert [event["seq"] for page in pages for event in page["events"]] == [
        event.seq for event in whole.events
    ]
    assert [page["hasMore"] for page in pages] == [True, True, True, False]


def walFrames(databasePath: str) -> tuple[int, int]:
    """
    Return how many frames the WAL contains and how many of them are copied
    into the database. The wal-index header in the -shm file has them as
    mxFrame at byte 16 and nBackfill at byte 96, in native byte order.
    """
    with open(databasePath + "-shm", "rb") as file:
        header = file.read(100)
    (frames,) = struct.unpack_from("=I", header, 16)
    (copied,) = struct.unpack_from("=I", header, 96)
    return frames, copied


@pytest_twisted.ensureDeferred
async def test_wal_copied_after_writes_pause(databasePath: str) -> None:
    store = Store(databasePath, reactor)
    store.open()
    store.startService()
    text = ("x" * 1023 + "\n") * 1024
    try:
        await store.insertSession(sessionRecord("s"))
        # 20 MiB: past the 16 MiB at which SQLite used to copy the WAL in a
        # commit, while the writer thread held up the output behind it.
        for _ in range(20):
            store.appendOutput("s", text, None, len(text))
        await store.flush()
        # No reactor turn has passed since the last commit, so no timer ran.
        afterWrites = walFrames(databasePath)
        await pollUntil(lambda: store.checkpoints == 1 and not store._checkpointing)
        afterPause = walFrames(databasePath)
        page = await store.readEvents("s", 0, 1000)
    finally:
        await store.stopService()

    assert afterWrites[0] > 16 * 1024 * 1024 // PAGE_SIZE
    assert afterWrites[1] == 0
    assert afterPause[1] == afterPause[0] >= afterWrites[0]
    assert sum(len(json.loads(event.payload_json)["data"]) for event in page.events) == 20 * len(text)


async def limitPages(store: Store, pages: int | None) -> None:
    """
    Keep the database from growing past C{pages} pages, as on a full disk,
    or lift the limit with C{None}. The limit belongs to the writer's connection.
    """

    def limit(cursor: sqlite3.Cursor) -> None:
        if pages is None:
            cursor.execute("PRAGMA max_page_count = 1073741823")
        else:
            cursor.execute(f"PRAGMA max_page_count = {pages}")

    assert store._writer is not None
    await store._writer.runInteraction(limit)


async def fullStore(databasePath: str) -> Store:
    """
    Start a store with one session "s" stored, whose database cannot grow.
    """
    store = Store(databasePath, reactor)
    store.open()
    store.startService()
    await store.insertSession(sessionRecord("s"))
    assert store._writer is not None
    (pages,) = await store._writer.runQuery("PRAGMA page_count")
    await limitPages(store, pages[0])
    return store


@pytest_twisted.ensureDeferred
async def test_stop_after_failed_write_keeps_record(databasePath: str) -> None:
    store = await fullStore(databasePath)
    store.appendOutput("s", "x" * 100_000, None, 100_000)
    exitWritten = store.appendEvent("s", "exit", {"status": "killed"}, wait=True)
    stops = []

    # As the session manager does: once the exit's write is over, the daemon
    # goes on stopping, here even though that write failed.
    def stop(failure: object) -> None:
        stops.append(store.stopService())

    assert exitWritten is not None
    exitWritten.addErrback(stop)
    await pollUntil(lambda: len(stops) == 1)
    # The disk has room again while the stop waits. A stop that did not wait
    # has closed the writer, so the time limits make this fail, not hang.
    await defer.ensureDeferred(limitPages(store, None)).addTimeout(10, reactor)
    await stops[0].addTimeout(30, reactor)

    connection = sqlite3.connect(databasePath)
    try:
        kinds = [row[0] for row in connection.execute("SELECT kind FROM events ORDER BY seq")]
    finally:
        connection.close()
    assert kinds == ["output", "exit"]


@pytest_twisted.ensureDeferred
async def test_stop_reports_records_never_stored(databasePath: str) -> None:
    store = await fullStore(databasePath)
    store.stopFlushTimeout = 0.5
    store.appendOutput("s", "x" * 100_000, None, 100_000)
    store.appendEvent("s", "exit", {"status": "killed"})
    logged: list[dict] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        await pollUntil(lambda: store.writeFailures > 0)
        await store.stopService()
    finally:
        globalLogPublisher.removeObserver(logged.append)

    lines = [formatEvent(event) for event in logged]
    assert any(
        line.startswith("Stopping with 2 records of 1 sessions (100000 bytes of output) not stored:"
                        " writes kept failing for 0.5 s")
        for line in lines
    ), lines


@pytest_twisted.ensureDeferred
async def test_failed_interaction_cursor_closed(databasePath: str) -> None:
    """
    A failed interaction's cursor is closed in the pool's thread, before the
    failure reaches the reactor thread. Left open, it would be freed in the
    reactor thread with the failure's traceback, which takes the
    connection's lock while its statement is unfinished: while the writer
    waited for another process's write lock, the reactor thread waited too.
    """
    store = Store(databasePath, reactor)
    store.open()
    store.startService()
    cursors: list[sqlite3.Cursor] = []

    def fail(cursor: Any) -> None:
        cursor.execute("BEGIN IMMEDIATE")
        # Rows are left, so the statement is unfinished.
        cursors.append(cursor.execute("SELECT 1 UNION ALL SELECT 2"))
        cursors[0].fetchone()
        raise RuntimeError("the interaction failed")

    try:
        assert store._writer is not None
        with pytest.raises(RuntimeError, match="the interaction failed"):
            await store._writer.runInteraction(fail)
        with pytest.raises(sqlite3.ProgrammingError, match="closed cursor"):
            cursors[0].fetchone()
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_damaged_database_explained(databasePath: str) -> None:
    openDatabase(databasePath)
    damageDatabase(databasePath)

    store = Store(databasePath, reactor)
    store.stopFlushTimeout = 0.5
    store.startService()
    logged: list[dict] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        with pytest.raises(InternalError) as read:
            await store.listSessions()
        with pytest.raises(InternalError):
            await store.listSessions()
        with pytest.raises(RuntimeUnavailable) as written:
            await store.insertSession(sessionRecord("s"))
    finally:
        globalLogPublisher.removeObserver(logged.append)
        await store.stopService()

    assert read.value.message == (
        "The daemon's database file is damaged, so it could not be read; `coven doctor` checks the file."
    )
    assert read.value.details == {"sqliteError": "database disk image is malformed"}
    assert written.value.message == (
        "The session store cannot write: its database file is damaged; `coven doctor` checks it."
    )
    lines = [formatEvent(event) for event in logged]
    # The second damaged read is counted, not logged.
    assert [line for line in lines if line.startswith("Reading the database failed")] == [
        "Reading the database failed: database disk image is malformed. The file is damaged;"
        " `coven doctor` checks it (damaged reads so far: 1)."
    ]
    assert store.damagedReads == 2
    assert store.damaged
    assert (
        f"The database file {databasePath} is damaged, so writes keep failing until it is repaired"
        " or replaced. Stop the daemon; `coven doctor` checks the file."
    ) in lines


def test_killed_without_exit_orphaned(databasePath: str) -> None:
    openDatabase(databasePath)
    now = utcnow()
    sessions = {
        "running": ("running", ["output"]),
        "killing": ("killed", ["output", "kill"]),
        "killed": ("killed", ["output", "kill", "exit"]),
        "done": ("completed", ["output", "exit"]),
    }
    with sqlite3.connect(databasePath) as connection:
        for sessionId, (status, kinds) in sessions.items():
            record = sessionRecord(sessionId)
            connection.execute(
                "INSERT INTO sessions (id, project_root, cwd, harness, title, status, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (sessionId, record.project_root, record.cwd, record.harness, record.title, status, now, now),
            )
            for number, kind in enumerate(kinds):
                connection.execute(
                    "INSERT INTO events (id, session_id, kind, payload_json, created_at) VALUES (?, ?, ?, '{}', ?)",
                    (f"{sessionId}-{number}", sessionId, kind, now),
                )

    # The daemon that killed "killing" died within the kill's grace period.
    orphaned = openDatabase(databasePath)

    with sqlite3.connect(databasePath) as connection:
        statuses = dict(connection.execute("SELECT id, status FROM sessions"))
        last = {
            sessionId: connection.execute(
                "SELECT kind, payload_json FROM events WHERE session_id = ? ORDER BY seq DESC LIMIT 1",
                (sessionId,),
            ).fetchone()
            for sessionId in sessions
        }
    assert sorted(orphaned) == ["killing", "running"]
    assert statuses == {"running": "orphaned", "killing": "orphaned", "killed": "killed", "done": "completed"}
    assert last["killing"][0] == "orphaned"
    assert json.loads(last["killing"][1]) == {
        "reason": "daemon restarted while the session was being killed, before the harness exited"
    }
    assert last["killed"][0] == "exit"


@pytest_twisted.ensureDeferred
async def test_full_disk_error_reported(databasePath: str) -> None:
    store = await fullStore(databasePath)
    try:
        store.appendOutput("s", "x" * 100_000, None, 100_000)
        await pollUntil(lambda: store.writeFailures > 0)
        error = store._lastWriteError
    finally:
        await limitPages(store, None)
        await store.stopService()

    # Not "cannot rollback - no transaction is active", which a ROLLBACK after
    # SQLite ended the transaction itself raised in its place.
    assert error == "database or disk is full"
