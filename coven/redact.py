"""Redaction of secret-shaped tokens in PTY output and input before they are stored."""

from __future__ import annotations

import re
from typing import Callable

# Each kind of secret, as a bytes pattern. Groups named "keep" stay in the output
# (the "Bearer " or "password=" before a value); the rest of the match becomes
# [REDACTED:kind]. Secrets are ASCII, so matching bytes before UTF-8 decoding
# keeps the recorded text and its raw bytes consistent.
SECRET_PATTERNS: tuple[tuple[str, bytes], ...] = (
    (
        "private-key",
        rb"-----BEGIN[A-Z0-9 ]{0,40} PRIVATE KEY-----.*?-----END[A-Z0-9 ]{0,40} PRIVATE KEY-----",
    ),
    ("anthropic", rb"(?<![A-Za-z0-9_-])sk-ant-[A-Za-z0-9_-]{16,}"),
    ("openai", rb"(?<![A-Za-z0-9_-])sk-(?:proj-)?[A-Za-z0-9_-]{20,}"),
    ("github", rb"(?<![A-Za-z0-9_])(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,})"),
    ("aws-access-key-id", rb"(?<![A-Z0-9])(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}(?![A-Z0-9])"),
    ("slack", rb"(?<![A-Za-z0-9-])xox[abposre]-[A-Za-z0-9-]{10,}"),
    ("jwt", rb"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),
    ("bearer", rb"(?P<keep>(?i:\bbearer)[ \t]+)[A-Za-z0-9._~+/=-]{12,}"),
    (
        "assignment",
        rb"(?P<keep>(?i:\b(?:password|passwd|token|secret|api[_-]?key|access[_-]?key)"
        rb"[ \t]*[=:][ \t]*))(?:\"[^\"\s]{4,}\"|'[^'\s]{4,}'|[^\s\"']{4,})",
    ),
)

_COMBINED = re.compile(
    b"|".join(
        b"(?P<" + kind.replace("-", "_").encode() + b">" + pattern.replace(b"(?P<keep>", b"(?:") + b")"
        for kind, pattern in SECRET_PATTERNS
    ),
    re.DOTALL,
)
_KEEP = {kind: re.compile(pattern, re.DOTALL) for kind, pattern in SECRET_PATTERNS if b"(?P<keep>" in pattern}

# Literal parts of which every secret contains at least one: a read without any of
# them is passed on without running the full pattern.
# Fewer, shorter markers scan faster: "gh" covers every GitHub prefix, "IA" the
# AWS ones but ACCA, and "key" both api_key and access_key.
_MARKERS = (b"sk-", b"gh", b"IA", b"ACCA", b"xox", b"eyJ", b"PRIVATE KEY")
_KEYWORDS = (b"bearer", b"passw", b"token", b"secret", b"key")

# A read may end in the middle of a secret. A tail that could still grow into one
# is held back until the next read.
_TOKEN_PREFIXES = (
    b"sk-", b"ghp_", b"gho_", b"ghu_", b"ghs_", b"ghr_", b"github_pat_",
    b"AKIA", b"ASIA", b"ABIA", b"ACCA", b"xox", b"eyJ",
)
_TOKEN_BYTES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.=/+~-"
_TRAILING_CONTEXT = re.compile(
    rb"(?i:\b(?:bearer|password|passwd|token|secret|api[_-]?key|access[_-]?key))[ \t]*[=:]?[ \t]*"
    rb"[\"']?[A-Za-z0-9_.=/+~-]*\Z"
)
# How far before the trailing token run a keyword such as "password=" may start.
_CONTEXT_BYTES = 40
_PEM_BEGIN = b"-----BEGIN"
# An unfinished private key block: its BEGIN line (or part of it), then only what
# a key block contains (base64, header fields) up to the end of the output.
_PEM_BODY = re.compile(
    rb"-----BEGIN[A-Z0-9 ]{0,40}(?: PRIVATE KEY-----[A-Za-z0-9+/=:,\s-]*| PRIVATE KEY-{0,4}| PRIVATE KE?Y?| PRIVATE ?|)\Z"
)
# The longest private key block held back while waiting for its END line; a
# longer one is cut at this size and redacted whole.
MAX_HELD_KEY_BYTES = 64 * 1024


def _replacement(match: re.Match[bytes]) -> bytes:
    kind = match.lastgroup or "secret"
    label = kind.replace("_", "-")
    keep = _KEEP.get(label)
    prefix = b""
    if keep is not None:
        inner = keep.match(match.group(0))
        if inner is not None:
            prefix = inner.group("keep")
    return prefix + b"[REDACTED:" + label.encode() + b"]"


def _mayContainSecret(data: bytes) -> bool:
    if any(marker in data for marker in _MARKERS):
        return True
    lowered = data.lower()
    return any(keyword in lowered for keyword in _KEYWORDS)


def redactBytes(data: bytes) -> bytes:
    """
    Replace every complete secret in C{data}.
    """
    if not _mayContainSecret(data):
        return data
    return _COMBINED.sub(_replacement, data)


def _couldStartToken(run: bytes) -> bool:
    return any(run.startswith(prefix) or prefix.startswith(run) for prefix in _TOKEN_PREFIXES)


def _holdPoint(data: bytes) -> int:
    """
    Return where the tail that could still become a secret starts, or
    C{len(data)} when none does.
    """
    size = len(data)
    point = size

    begin = data.rfind(_PEM_BEGIN)
    if begin != -1 and data.find(b"-----END", begin) == -1 and _PEM_BODY.match(data, begin):
        point = begin
    else:
        # The end may be the first bytes of "-----BEGIN".
        for length in range(min(len(_PEM_BEGIN) - 1, size), 0, -1):
            if data.endswith(_PEM_BEGIN[:length]):
                point = size - length
                break

    runStart = len(data.rstrip(_TOKEN_BYTES))
    run = data[runStart:]
    if run and _couldStartToken(run):
        point = min(point, runStart)

    region = max(0, runStart - _CONTEXT_BYTES)
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

    def __init__(self, redact: Callable[[bytes], bytes] = redactBytes) -> None:
        self._redact = redact
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
        point = _holdPoint(data)
        if point < len(data):
            held = data[point:]
            if len(held) > MAX_HELD_KEY_BYTES and held.startswith(_PEM_BEGIN):
                # A key block this long is still a key block: redact it whole.
                return self._redact(data[:point]) + b"[REDACTED:private-key]"
            self._held = held
            data = data[:point]
        return self._redact(data)

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
        return self._redact(held)
