"""The location of the Coven home folder, shared by the daemon and its clients."""

from __future__ import annotations

import os


def defaultHome() -> str:
    """
    Return C{$COVEN_HOME}, else C{~/.coven}.
    """
    return os.environ.get("COVEN_HOME") or os.path.join(os.path.expanduser("~"), ".coven")


# The longest Unix socket path Linux accepts with its terminating NUL: the
# 108 bytes of sockaddr_un.sun_path, less one.
MAX_SOCKET_PATH_BYTES = 107


def socketPathProblem(path: str) -> str | None:
    """
    Return why C{path} cannot be a Unix socket, or C{None} when it can.
    """
    size = len(os.fsencode(path))
    if size <= MAX_SOCKET_PATH_BYTES:
        return None
    return (
        f"The socket path {path} is {size} bytes long, and a Unix socket path can have"
        f" at most {MAX_SOCKET_PATH_BYTES}; use a home folder with a shorter path"
        " (--home or COVEN_HOME)."
    )
