"""Records that cross layers: sessions, events and event pages, with their wire form."""

from __future__ import annotations

import datetime
from typing import Any

import attrs


def utcnow() -> str:
    """
    Return the current time as RFC 3339 UTC with milliseconds and a C{Z} suffix.
    """
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


@attrs.frozen
class SessionRecord:
    """
    One harness session as stored and as the API returns it.

    @ivar id: UUID4 string.
    @ivar project_root: canonical absolute path the session is confined to.
    @ivar cwd: canonical working directory, the project root or below it.
    @ivar harness: harness id, such as C{codex}.
    @ivar title: short label, by default the prompt's first line.
    @ivar status: C{running}, C{completed}, C{failed}, C{killed} or C{orphaned}.
    @ivar exit_code: the harness's exit code, or C{None} while running or after
        death by a signal.
    @ivar archived_at: when the session was archived, or C{None}.
    @ivar created_at: RFC 3339 UTC time of the launch.
    @ivar updated_at: RFC 3339 UTC time of the last status change.
    """

    id: str
    project_root: str
    cwd: str
    harness: str
    title: str
    status: str
    exit_code: int | None
    archived_at: str | None
    created_at: str
    updated_at: str

    def toJSON(self) -> dict[str, Any]:
        """
        Build the snake_case SessionRecord object of the API.
        """
        return attrs.asdict(self)


@attrs.frozen
class Event:
    """
    One stored session event.

    @ivar seq: position in the global event order, unique across sessions.
    @ivar id: UUID4 string.
    @ivar session_id: the session the event belongs to.
    @ivar kind: C{output}, C{input}, C{kill}, C{exit} or C{orphaned}.
    @ivar payload_json: the payload as JSON text.
    @ivar created_at: RFC 3339 UTC time the daemon produced the event.
    """

    seq: int
    id: str
    session_id: str
    kind: str
    payload_json: str
    created_at: str

    def toJSON(self) -> dict[str, Any]:
        """
        Build the event object of the API.
        """
        return attrs.asdict(self)


@attrs.frozen
class EventPage:
    """
    A page of one session's events in C{seq} order.

    @ivar events: the events of this page.
    @ivar hasMore: whether events exist past the last one of this page.
    """

    events: tuple[Event, ...]
    hasMore: bool

    def toJSON(self) -> dict[str, Any]:
        """
        Build the event page object of the API; C{nextCursor} is C{None} when
        the page is empty.
        """
        nextCursor = {"afterSeq": self.events[-1].seq} if self.events else None
        return {
            "events": [event.toJSON() for event in self.events],
            "nextCursor": nextCursor,
            "hasMore": self.hasMore,
        }


@attrs.frozen
class RenderedEventPage:
    """
    An event page already encoded as the JSON body of C{GET /api/v1/events}:
    the bytes that encoding L{EventPage.toJSON} gives for the same events,
    built in the reader thread.

    @ivar body: the UTF-8 JSON body.
    @ivar count: how many events it contains.
    """

    body: bytes
    count: int
