"""The location of the Coven home folder, shared by the daemon and its clients."""

from __future__ import annotations

import json
import os
import stat


def defaultHome() -> str:
    """
    Return C{$COVEN_HOME}, else C{~/.coven}.
    """
    return os.environ.get("COVEN_HOME") or os.path.join(os.path.expanduser("~"), ".coven")


def homeProblem(home: str) -> str | None:
    """
    Return why the absolute path C{home} cannot be a home folder because a
    file is in its place or on its path, or C{None}.
    """
    try:
        if not stat.S_ISDIR(os.stat(home).st_mode):
            return f"the home {home} is a file, not a folder; choose another with --home or COVEN_HOME"
        return None
    except NotADirectoryError:
        pass
    except OSError:
        return None
    parent = os.path.dirname(home)
    while parent != os.path.dirname(parent):
        if os.path.exists(parent) and not os.path.isdir(parent):
            return (
                f"the home {home} cannot be created: {parent} is a file, not a folder;"
                " choose another with --home or COVEN_HOME"
            )
        parent = os.path.dirname(parent)
    return None


def daemonSocketPath(home: str) -> str:
    """
    Return the Unix socket of the daemon of C{home}: the one that
    C{<home>/daemon.json} names while that daemon runs, as one started with
    C{--listen unix:PATH}, else C{<home>/coven.sock}.

    C{daemon.json} comes first because a daemon that crashed may have left
    C{<home>/coven.sock} behind, which a daemon on another socket keeps.
    """
    homeSocket = os.path.join(home, "coven.sock")
    try:
        with open(os.path.join(home, "daemon.json")) as file:
            info = json.load(file)
        pid, path = info["pid"], info["socketPath"]
    except (OSError, ValueError, KeyError, TypeError):
        return homeSocket
    if not (isinstance(pid, int) and isinstance(path, str) and os.path.isabs(path)):
        return homeSocket
    if not isCovenDaemon(pid):
        # A daemon that crashed leaves its daemon.json behind.
        return homeSocket
    return path


def _processState(pid: int) -> str:
    """
    Return the state letter of C{pid} from C{/proc/PID/stat}, such as C{R},
    C{S}, C{T} or C{Z}.

    @raise OSError: the file cannot be read, as when C{pid} does not exist.
    @raise IndexError: the file has no state field.
    """
    with open(f"/proc/{pid}/stat") as file:
        # The command name before the state is in parentheses and may
        # contain spaces.
        return file.read().rsplit(")", 1)[1].split()[0]


def processStopped(pid: int) -> bool:
    """
    Return whether C{pid} is stopped by a signal such as SIGSTOP. Until it
    gets SIGCONT, it acts on no signal but SIGKILL.
    """
    try:
        return _processState(pid) == "T"
    except (OSError, IndexError):
        return False


def processAlive(pid: int) -> bool:
    """
    Return whether C{pid} exists and has not exited; a zombie counts as exited.
    """
    try:
        return _processState(pid) not in ("Z", "X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def isCovenDaemon(pid: int) -> bool:
    """
    Return whether C{pid} runs the Coven twistd plugin, so that a pid reused
    by another program after a crash is never signalled or taken for a daemon.
    """
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            arguments = file.read().split(b"\0")
    except FileNotFoundError:
        return False
    except OSError:
        # No /proc: trust the pid, which comes from the pidfile or daemon.json.
        return processAlive(pid)
    return b"coven" in arguments and processAlive(pid)


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
