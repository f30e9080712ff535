"""Redaction of secret-shaped tokens in PTY output and input before they are stored."""

from __future__ import annotations

import ctypes
import re
from typing import Any

# Each kind of secret: its name, its gate and its pattern. The gate is a string
# every such secret contains. Looking for one byte runs at memory speed, so a
# kind whose gate is absent costs almost nothing. The two kinds that start with
# "sk-" share that search. A pattern starts with its literal part so the
# regex engine can search for it quickly, faster than a search for each marker
# of the kind would. The check that no token character comes before it is
# therefore a lookbehind placed after that literal. Secrets are ASCII, so
# matching bytes before UTF-8 decoding keeps text and raw bytes consistent.
_TOKEN_KINDS: tuple[tuple[str, bytes, bytes], ...] = (
    (
        "private-key",
        b"P",
        rb"-----BEGIN[A-Z0-9 ]{0,40} PRIVATE KEY-----.*?-----END[A-Z0-9 ]{0,40} PRIVATE KEY-----",
    ),
    ("anthropic", b"sk-", rb"sk-ant-(?<![A-Za-z0-9_-]sk-ant-)[A-Za-z0-9_-]{16,}"),
    ("openai", b"sk-", rb"sk-(?<![A-Za-z0-9_-]sk-)(?!ant-)(?:proj-)?[A-Za-z0-9_-]{20,}"),
    (
        "github",
        b"_",
        rb"g(?<![A-Za-z0-9_]g)(?:h[pousr]_[A-Za-z0-9]{30,}|ithub_pat_[A-Za-z0-9_]{30,})",
    ),
    ("aws-access-key-id", b"A", rb"A(?<![A-Z0-9]A)(?:KIA|SIA|BIA|CCA)[A-Z0-9]{16}(?![A-Z0-9])"),
    ("slack", b"-", rb"xox(?<![A-Za-z0-9-]xox)[abposre]-[A-Za-z0-9-]{10,}"),
    (
        "jwt",
        b"J",
        rb"eyJ(?<![A-Za-z0-9_-]eyJ)[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",
    ),
)
_TOKEN_PATTERNS = [
    (gate, re.compile(pattern, re.DOTALL), b"[REDACTED:" + kind.encode() + b"]")
    for kind, gate, pattern in _TOKEN_KINDS
]
# Secrets known by the label before them. The label (group "keep") stays in the
# output, and only the value becomes [REDACTED:bearer] or [REDACTED:assignment].
_BEARER_PATTERN = re.compile(
    rb"(?P<keep>(?<![A-Za-z0-9])(?i:bearer)[ \t]+)[A-Za-z0-9._~+/=-]{12,}"
)
_BEARER_LABEL = b"[REDACTED:bearer]"
_ASSIGNMENT_PATTERN = re.compile(
    rb"(?P<keep>(?<![A-Za-z0-9])(?i:(?:password|passwd|token|secret|api[_-]?key|access[_-]?key)"
    rb"[ \t]*[=:][ \t]*))(?:\"[^\"\n]{4,}\"|'[^'\n]{4,}'|[^\s\"']{4,})"
)
_ASSIGNMENT_LABEL = b"[REDACTED:assignment]"
# Offsets, before the word that finds a label, at which the label may start:
# "key" ends api_key, apikey, access_key and accesskey.
_LABEL_LEADS = {b"key": (7, 6, 4, 3)}

# The labels of an assignment, lower-cased: the words its pattern accepts
# before the "=" or ":".
_ASSIGNMENT_LABELS = (
    b"password", b"passwd", b"token", b"secret", b"api_key", b"api-key", b"apikey",
    b"access_key", b"access-key", b"accesskey",
)
_MAX_ASSIGNMENT_LABEL = max(len(word) for word in _ASSIGNMENT_LABELS)
_BLANKS = b" \t"
# The words that find a label, lower-cased (see _LABEL_LEADS).
_ASSIGNMENT_WORDS = (b"passw", b"token", b"secret", b"key")
_KEYWORDS = (b"bearer", *_ASSIGNMENT_WORDS)
# Up to this many "=" and ":" in one piece of output, assignments are looked for
# back from each of them. Past it, as in source code, the label words are
# searched for instead.
_MAX_SEPARATORS = 32


# A table that maps each byte as bytes.lower() does. translate() with it makes
# the same copy about a quarter faster (0.58 against 0.77 ms per MB of
# benchmark output).
_LOWER = bytes(range(256)).lower()


def _loadMemmem() -> Any:
    """
    Return the C library's C{memmem}, or C{None} where it cannot be loaded.

    A search for a label word in 200 KiB of output took 2 to 3 times less
    CPU with C{memmem} than with C{bytes.find}, and ctypes releases the GIL
    for the call.
    """
    try:
        function = ctypes.CDLL(None).memmem
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t]
    function.restype = ctypes.c_void_p
    return function


_memmem = _loadMemmem()


def _loadStrcasestr() -> Any:
    """
    Return the C library's C{strcasestr}, or C{None} where it cannot be
    loaded.

    Output with few "=" and ":" needs a case-insensitive search for "bearer"
    only. C{strcasestr} does it on the output itself, at 0.47 ms per MB of
    benchmark output, where a lower-cased copy took 0.58 ms per MB before
    C{memmem} searched it.
    """
    try:
        function = ctypes.CDLL(None).strcasestr
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    function.restype = ctypes.c_void_p
    return function


_strcasestr = _loadStrcasestr()


class _Searchable:
    """
    Bytes searched for several words, with C{memmem} where it is available.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        # The pointer refers to the buffer of data itself, so nothing is copied.
        self._pointer = ctypes.c_char_p(data)
        self._address = ctypes.cast(self._pointer, ctypes.c_void_p).value or 0

    def find(self, word: bytes, start: int = 0) -> int:
        data = self.data
        if _memmem is None or not self._address or not word:
            return data.find(word, start)
        if start >= len(data):
            return -1
        hit = _memmem(self._address + start, len(data) - start, word, len(word))
        return -1 if hit is None else hit - self._address

    def findFolded(self, word: bytes, start: int = 0) -> int:
        """
        Find C{word}, lower-case ASCII letters other than "i", in any mix of
        cases, as C{data.lower().find(word, start)} does. C{data} must have no
        NUL byte, where C{strcasestr} would stop.

        C{strcasestr} folds case with the C locale's C{tolower}, which for
        these letters is the ASCII one in every locale ("I" is the exception,
        in Turkish).
        """
        data = self.data
        if _strcasestr is None or not self._address:
            return data.lower().find(word, start)
        if start > len(data) - len(word):
            return -1
        hit = _strcasestr(self._address + start, word)
        return -1 if hit is None else hit - self._address


def _findSecrets(data: bytes) -> list[tuple[int, int, bytes]]:
    """
    Return the spans of the secrets in C{data} with their replacements, in
    order and not overlapping.
    """
    found: list[tuple[int, int, bytes]] = []
    hasSk = b"-" in data and b"sk-" in data
    for gate, pattern, label in _TOKEN_PATTERNS:
        if not (hasSk if gate == b"sk-" else gate in data):
            continue
        for match in pattern.finditer(data):
            found.append((match.start(), match.end(), label))

    separators = _separators(data)
    if separators is not None and _strcasestr is not None and b"\0" not in data:
        # Only "bearer" needs a search of the whole output: no lower-cased copy.
        find = _Searchable(data).findFolded
        _findAssignmentsBefore(data, separators, found)
    else:
        lowered = _Searchable(data.translate(_LOWER))
        find = lowered.find
        if separators is None:
            _findLabelledAssignments(data, lowered, found)
        else:
            _findAssignmentsBefore(data, separators, found)

    position = find(b"bearer")
    while position != -1:
        match = _BEARER_PATTERN.match(data, position)
        if match is not None:
            found.append((match.end("keep"), match.end(), _BEARER_LABEL))
        position = find(b"bearer", position + 1)

    if not found:
        return found
    found.sort()
    spans: list[tuple[int, int, bytes]] = []
    for start, end, label in found:
        if spans and start < spans[-1][1]:
            continue
        spans.append((start, end, label))
    return spans


def _separators(data: bytes) -> list[int] | None:
    """
    Return the positions of "=" and ":" in C{data}, or C{None} when there are
    more than L{_MAX_SEPARATORS}.
    """
    positions: list[int] = []
    for separator in (b"=", b":"):
        position = data.find(separator)
        while position != -1:
            if len(positions) == _MAX_SEPARATORS:
                return None
            positions.append(position)
            position = data.find(separator, position + 1)
    return positions


def _findLabelledAssignments(
    data: bytes, lowered: _Searchable, found: list[tuple[int, int, bytes]]
) -> None:
    """
    Find assignments from each label word in C{lowered}, C{data} lower-cased.
    """
    pattern, label = _ASSIGNMENT_PATTERN, _ASSIGNMENT_LABEL
    for word in _ASSIGNMENT_WORDS:
        leads = _LABEL_LEADS.get(word, (0,))
        position = lowered.find(word)
        while position != -1:
            for lead in leads:
                match = pattern.match(data, position - lead) if position >= lead else None
                if match is not None:
                    found.append((match.end("keep"), match.end(), label))
                    break
            position = lowered.find(word, position + 1)


def _findAssignmentsBefore(
    data: bytes, separators: list[int], found: list[tuple[int, int, bytes]]
) -> None:
    """
    Find assignments from the label before each "=" and ":" in C{separators}.
    """
    pattern, label = _ASSIGNMENT_PATTERN, _ASSIGNMENT_LABEL
    for separator in separators:
        # The label ends where the blanks before the separator start.
        end = separator
        while end and data[end - 1] in _BLANKS:
            end -= 1
        before = data[max(0, end - _MAX_ASSIGNMENT_LABEL) : end].lower()
        for word in _ASSIGNMENT_LABELS:
            if before.endswith(word):
                match = pattern.match(data, end - len(word))
                if match is not None:
                    found.append((match.end("keep"), match.end(), label))
                break


def redactBytes(data: bytes) -> bytes:
    """
    Replace every complete secret in C{data}.
    """
    return _replaceSpans(data, _findSecrets(data))


def redactText(text: str) -> str:
    """
    Replace every complete secret in C{text}, matching its UTF-8 bytes as
    L{redactBytes} does. Each match starts and ends at an ASCII byte, so the
    result is valid UTF-8 again.
    """
    return redactBytes(text.encode("utf-8")).decode("utf-8")


def _replaceSpans(data: bytes, spans: list[tuple[int, int, bytes]]) -> bytes:
    if not spans:
        return data
    pieces = []
    position = 0
    for start, end, label in spans:
        pieces.append(data[position:start])
        pieces.append(label)
        position = end
    pieces.append(data[position:])
    return b"".join(pieces)


# A read may end in the middle of a secret. A tail that could still grow into one
# is held back until the next read.
_TOKEN_PREFIXES = (
    b"sk-", b"ghp_", b"gho_", b"ghu_", b"ghs_", b"ghr_", b"github_pat_",
    b"AKIA", b"ASIA", b"ABIA", b"ACCA", b"xox", b"eyJ",
)
_TOKEN_BYTES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.=/+~-"
_TOKEN_BYTE_SET = frozenset(_TOKEN_BYTES)
_TRAILING_CONTEXT = re.compile(
    rb"(?i:(?:bearer|password|passwd|token|secret|api[_-]?key|access[_-]?key))[ \t]*[=:]?[ \t]*"
    rb"(?:\"[^\"\n]*|'[^'\n]*|[A-Za-z0-9_.=/+~-]*)\Z"
)
# The words that start a labelled secret; an end of output that is the start of
# one of them is held back too.
_LABELS = (
    b"bearer", b"password", b"passwd", b"token", b"secret",
    b"api_key", b"api-key", b"apikey", b"access_key", b"access-key", b"accesskey",
)
_MAX_LABEL_LENGTH = max(len(label) for label in _LABELS)
# How far back from the end of output a label such as "password=" is looked for.
_CONTEXT_BYTES = 256
_PEM_BEGIN = b"-----BEGIN"
_PEM_BLOCK = _TOKEN_PATTERNS[0][1]
# An unfinished private key block: its BEGIN line (or part of it), then only what
# a key block contains (base64, header fields) up to the end of the output.
_PEM_BODY = re.compile(
    rb"-----BEGIN[A-Z0-9 ]{0,40}(?: PRIVATE KEY-----[A-Za-z0-9+/=:,\s-]*| PRIVATE KEY-{0,4}| PRIVATE KE?Y?| PRIVATE ?|)\Z"
)
# The maximum size of a private key block held back while its END line has not
# arrived. A longer one is cut at this size and redacted whole.
MAX_HELD_KEY_BYTES = 64 * 1024


def _couldStartToken(run: bytes) -> bool:
    return any(run.startswith(prefix) or prefix.startswith(run) for prefix in _TOKEN_PREFIXES)


def _couldStartLabel(run: bytes) -> bool:
    """
    Return whether C{run} ends with the start of a label, as in C{pass} or, in
    a longer name, C{DB_PASS}.
    """
    # Only the last bytes can begin a label prefix, so a long run costs no more.
    tail = run[-_MAX_LABEL_LENGTH:].lower()
    starts = [0] if len(run) <= _MAX_LABEL_LENGTH else []
    starts.extend(index + 1 for index, byte in enumerate(tail) if byte in b"_-.")
    for start in starts:
        piece = tail[start:]
        if piece and any(label.startswith(piece) for label in _LABELS):
            return True
    return False


def _holdPoint(data: bytes) -> int:
    """
    Return where the tail that could still become a secret starts, or
    C{len(data)} when none does.
    """
    size = len(data)
    point = size

    # Output without a "-" has no part of "-----BEGIN", and looking for that
    # byte costs far less than the search back for the whole line.
    begin = data.rfind(_PEM_BEGIN) if b"-" in data else -1
    if begin != -1 and _PEM_BLOCK.match(data, begin) is None and _PEM_BODY.match(data, begin):
        point = begin
    else:
        # The end may be the first bytes of "-----BEGIN".
        for length in range(min(len(_PEM_BEGIN) - 1, size), 0, -1):
            if data.endswith(_PEM_BEGIN[:length]):
                point = size - length
                break

    runStart = len(data.rstrip(_TOKEN_BYTES)) if data[-1:] and data[-1] in _TOKEN_BYTE_SET else size
    run = data[runStart:]
    if run and (_couldStartToken(run) or _couldStartLabel(run)):
        point = min(point, runStart)

    region = max(0, size - _CONTEXT_BYTES)
    lowered = data[region:].lower()
    if any(keyword in lowered for keyword in _KEYWORDS):
        context = _TRAILING_CONTEXT.search(data, region)
        if context is not None:
            point = min(point, context.start())
    return point


class StreamRedactor:
    """
    Redact secrets in a stream of reads, holding back a tail that could be the
    start of a secret split across two reads.
    """

    def __init__(self) -> None:
        self._held = b""

    @property
    def holding(self) -> bool:
        return bool(self._held)

    def feed(self, data: bytes) -> bytes:
        """
        Return the redacted output that is safe to record now.
        """
        if self._held:
            data = self._held + data
            self._held = b""
        spans = _findSecrets(data)
        point = _holdPoint(data)
        # A complete secret is never cut by the hold point: it goes out whole.
        for start, end, _ in spans:
            if start < point < end:
                point = end
        if point < len(data):
            held = data[point:]
            if len(held) > MAX_HELD_KEY_BYTES and held.startswith(_PEM_BEGIN):
                # A key block this long is still a key block: redact it whole.
                return _replaceSpans(data[:point], spans) + b"[REDACTED:private-key]"
            self._held = held
            data = data[:point]
            spans = [span for span in spans if span[1] <= point]
        return _replaceSpans(data, spans)

    def flush(self, final: bool) -> bytes:
        """
        Return the held-back tail, redacted, because output paused or ended.

        An unfinished private key block stays held while output only paused;
        at the end of output it is redacted whole.
        """
        if not self._held:
            return b""
        if self._held.startswith(_PEM_BEGIN):
            if not final:
                return b""
            self._held = b""
            return b"[REDACTED:private-key]"
        held, self._held = self._held, b""
        return redactBytes(held)
