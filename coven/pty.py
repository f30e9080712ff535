"""Per-session ProcessProtocol: reply to terminal queries, redact, decode UTF-8, queue output events."""

from __future__ import annotations

import codecs
import re
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from coven.redact import StreamRedactor

if TYPE_CHECKING:
    from coven.store import Store

# Queries a TUI sends to its terminal at start, and what a terminal replies. No
# terminal is attached to the PTY, so the daemon replies instead.
QUERY_REPLIES = {
    b"\x1b[6n": b"\x1b[1;1R",  # cursor position report
    b"\x1b[5n": b"\x1b[0n",  # device status: OK
    b"\x1b[c": b"\x1b[?62;c",  # primary device attributes: VT220
    b"\x1b[0c": b"\x1b[?62;c",
}
QUERY = re.compile(rb"\x1b\[(?:6n|5n|0?c)")
# Proper prefixes of a query, held back at the end of a read until the next read
# shows whether they start a query.
QUERY_PREFIXES = frozenset({b"\x1b", b"\x1b[", b"\x1b[0", b"\x1b[5", b"\x1b[6"})
# Seconds a held-back tail (a partial query, or a partial secret for the
# redactor) waits for the next read before it is recorded as it is.
TAIL_TIMEOUT = 0.02


class TerminalQueryFilter:
    """
    Remove answerable terminal queries from PTY output and collect the replies,
    also when a query is split across two reads.
    """

    def __init__(self) -> None:
        self._tail = b""

    @property
    def holding(self) -> bool:
        return bool(self._tail)

    def feed(self, data: bytes) -> tuple[bytes, list[bytes]]:
        """
        Return the output with queries removed and the replies to send.
        """
        if self._tail:
            data = self._tail + data
            self._tail = b""
        if b"\x1b" not in data:
            return data, []

        replies: list[bytes] = []
        pieces: list[bytes] = []
        position = 0
        for match in QUERY.finditer(data):
            pieces.append(data[position : match.start()])
            replies.append(QUERY_REPLIES[match.group()])
            position = match.end()

        rest = data[position:]
        escape = rest.rfind(b"\x1b", max(0, len(rest) - 3))
        if escape != -1 and rest[escape:] in QUERY_PREFIXES:
            self._tail = rest[escape:]
            rest = rest[:escape]
        pieces.append(rest)
        return b"".join(pieces), replies

    def flush(self) -> bytes:
        """
        Return and forget a held-back prefix.
        """
        tail, self._tail = self._tail, b""
        return tail


class OutputDecoder:
    """
    Incremental UTF-8 decoder that keeps a character split across reads whole
    and reports the exact bytes of any read that was not valid UTF-8.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def decode(self, data: bytes, final: bool = False) -> tuple[str, bytes | None]:
        """
        Return the text completed by C{data} and, where it held invalid bytes,
        the exact bytes it was decoded from; else C{None}.
        """
        before = self._decoder.getstate()[0]
        text = self._decoder.decode(data, final)
        # Without a replacement character every byte was valid UTF-8.
        if "\ufffd" not in text:
            return text, None
        after = self._decoder.getstate()[0]
        combined = before + data
        consumed = combined[: len(combined) - len(after)]
        if text.encode("utf-8") == consumed:
            return text, None
        return text, consumed


class HarnessProtocol(ProcessProtocol):
    """
    Turn one harness's PTY output into output events.

    Output is queued in the store synchronously as it is delivered, and the
    session manager delivers what was read before it records an input, so
    output read before an input is queued before that input's event. The store pauses this
    transport when its write queue is full, which makes the harness block on
    write instead of losing bytes.
    """

    def __init__(
        self,
        sessionId: str,
        store: Store,
        reactor: IReactorTime,
        redact: bool = True,
    ) -> None:
        """
        @param redact: replace secret-shaped tokens before output is queued.
        """
        self.sessionId = sessionId
        self._store = store
        self._reactor = reactor
        self._onExited: Callable[[Failure], None] | None = None
        self._onEnded: Callable[[], None] | None = None
        self.exitReason: Failure | None = None
        self._queries = TerminalQueryFilter()
        self._decoder = OutputDecoder()
        self._redactor = StreamRedactor() if redact else None
        self._tailCall: Any = None
        self.finished = False
        self.ptyClosed = False
        self.bytesRead = 0
        self.pid: int | None = None
        self.producer: Any = None

    def connectionMade(self) -> None:
        # Twisted clears transport.pid once the process is reaped, which for a
        # harness that exits at once may be before spawnProcess returns.
        self.pid = self.transport.pid
        self.producer = self.transport
        self._store.registerProducer(self.producer)

    def useProducer(self, producer: Any) -> None:
        """
        Have the store pause and resume C{producer} instead of the transport,
        once something else reads the PTY.
        """
        self._store.unregisterProducer(self.producer)
        self.producer = producer
        self._store.registerProducer(producer)

    def outReceived(self, data: bytes) -> None:
        if self.finished:
            return
        self.bytesRead += len(data)
        output, replies = self._queries.feed(data)
        for reply in replies:
            self.transport.write(reply)
        if output and self._redactor is not None:
            output = self._redactor.feed(output)
        if output:
            self._record(output)
        self._scheduleTailFlush()

    def _record(self, output: bytes, final: bool = False) -> None:
        text, raw = self._decoder.decode(output, final)
        if text:
            self._store.appendOutput(self.sessionId, text, raw, len(output))

    def _scheduleTailFlush(self) -> None:
        if self._tailCall is not None and self._tailCall.active():
            self._tailCall.cancel()
        self._tailCall = None
        if self._queries.holding or (self._redactor is not None and self._redactor.holding):
            self._tailCall = self._reactor.callLater(TAIL_TIMEOUT, self._flushTail)

    def _drainFilters(self, final: bool) -> bytes:
        tail = self._queries.flush()
        if self._redactor is not None:
            tail = self._redactor.feed(tail) + self._redactor.flush(final)
        return tail

    def _flushTail(self) -> None:
        self._tailCall = None
        if self.finished:
            return
        tail = self._drainFilters(final=False)
        if tail:
            self._record(tail)

    def finishOutput(self) -> None:
        """
        Record what the query filter and the decoder still hold, and ignore any
        later output, so the exit event is the session's last.
        """
        if self.finished:
            return
        if self._tailCall is not None and self._tailCall.active():
            self._tailCall.cancel()
        self._record(self._drainFilters(final=True), final=True)
        self.finished = True
        self._store.unregisterProducer(self.producer)

    def attach(self, onExited: Callable[[Failure], None], onEnded: Callable[[], None]) -> None:
        """
        Set who hears of the harness's exit and of the PTY's end, and tell them
        at once of what already happened: a harness that exits immediately can
        be reaped while C{spawnProcess} is still running.
        """
        self._onExited = onExited
        self._onEnded = onEnded
        if self.exitReason is not None:
            onExited(self.exitReason)
        if self.ptyClosed:
            onEnded()

    def processExited(self, reason: Failure) -> None:
        self.exitReason = reason
        if self._onExited is not None:
            self._onExited(reason)

    def processEnded(self, reason: Failure) -> None:
        self.ptyClosed = True
        self._store.unregisterProducer(self.producer)
        if self._onEnded is not None:
            self._onEnded()
