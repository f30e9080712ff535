"""Daemon settings from <home>/coven.toml, read when the daemon starts."""

from __future__ import annotations

import difflib
import tomllib
from typing import Any

import attrs

SETTINGS_FILE = "coven.toml"
# The tables of coven.toml and the keys each may contain.
KNOWN_KEYS = {"redaction": ("enabled",)}


@attrs.frozen
class Settings:
    """
    Daemon settings from C{<home>/coven.toml}.

    @ivar redact: replace secret-shaped tokens in output and input before they
        are stored; on unless C{[redaction] enabled = false}.
    @ivar error: why the file could not be used, if it could not.
    """

    redact: bool = True
    error: str | None = None


def _unknownKey(table: dict[str, Any], known: tuple[str, ...], expected: str) -> str | None:
    """
    Describe the first key of C{table} not in C{known}, with the closest known
    key or else C{expected}; return C{None} when every key is known.
    """
    for key in table:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            advice = f"did you mean {close[0]!r}?" if close else expected
            return f"unknown key {key!r}; {advice}"
    return None


def loadSettings(path: str) -> Settings:
    """
    Read C{coven.toml}; a missing file gives the defaults, and an invalid one
    the defaults with L{Settings.error} set. A misspelled key makes the file
    invalid rather than being ignored, so C{enable = false} does not leave
    redaction on unnoticed.
    """
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except FileNotFoundError:
        return Settings()
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        return Settings(error=f"{path}: cannot be used: {error}")

    problem = _unknownKey(document, tuple(KNOWN_KEYS), "the only table is [redaction]")
    if problem is not None:
        return Settings(error=f"{path}: {problem}")
    redaction = document.get("redaction", {})
    if not isinstance(redaction, dict):
        return Settings(error=f"{path}: redaction must be a table, [redaction]")
    problem = _unknownKey(redaction, KNOWN_KEYS["redaction"], "the only key is enabled")
    if problem is not None:
        return Settings(error=f"{path}: [redaction] {problem}")
    enabled = redaction.get("enabled", True)
    if not isinstance(enabled, bool):
        return Settings(error=f"{path}: [redaction] enabled must be true or false")
    return Settings(redact=enabled)
