"""The location of the Coven home folder, shared by the daemon and its clients."""

from __future__ import annotations

import os


def defaultHome() -> str:
    """
    Return C{$COVEN_HOME}, else C{~/.coven}.
    """
    return os.environ.get("COVEN_HOME") or os.path.join(os.path.expanduser("~"), ".coven")
