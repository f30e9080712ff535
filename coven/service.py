"""Build the daemon's service from its options: home folder, lock, store, sessions, listener."""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import re
import signal
import sqlite3
import sys
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import defer, tcp, unix
from twisted.internet.address import UNIXAddress
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

from coven.api import CovenAPI
from coven.harnesses import HarnessRegistry
from coven.home import defaultHome, homeProblem, socketPathProblem
from coven.records import utcnow
from coven.sessions import DEFAULT_KILL_GRACE, SessionManager, killLeftoverProcesses
from coven.settings import SETTINGS_FILE, loadSettings
from coven.store import Store, StoreSchemaError, checkDatabaseSchema, isDamaged, waitAtMost
from coven.web import CovenSite

log = Logger()

# Seconds a stop waits for the requests that the stop itself wakes to finish,
# and then for their responses to be sent.
REQUESTS_STOP_TIMEOUT = 2.0
# Seconds without connections after which a stop closes the socket. A client
# following a session usually sends its next request within milliseconds.
STOP_QUIET_PERIOD = 0.25


class HomeInUse(Exception):
    """
    Another daemon holds the home folder's lock.
    """


class CovenService(MultiService):
    """
    The daemon: store, session manager and HTTP listener.

    Start opens the database, marks sessions left running by an earlier daemon
    as orphaned, then listens. Stop runs in the reverse order and waits for each
    step: the listener closes, live sessions are killed and their exits recorded,
    then the store writes what it still holds.
    """

    def __init__(
        self,
        home: str,
        listen: str,
        reactor: Any,
        killGrace: float = DEFAULT_KILL_GRACE,
    ) -> None:
        super().__init__()
        self.home = home
        self.listenDescription = listen
        self.socketPath = os.path.join(home, "coven.sock")
        self.daemonFile = os.path.join(home, "daemon.json")
        self._reactor = reactor
        self._lockFile: int | None = None
        self._port: Any = None
        self.startedAt: str | None = None
        self.stopQuietPeriod = STOP_QUIET_PERIOD
        # twistd sets umask 0077 when it detaches; harnesses get the umask of
        # the shell that started the daemon instead, as if run from it.
        self.harnessUmask = _currentUmask()

        self.store = Store(os.path.join(home, "coven.sqlite3"), reactor)
        self.store.onIdleAfterLoad = releaseFreeMemory
        self.store.setServiceParent(self)
        self.harnesses = HarnessRegistry(os.path.join(home, "harnesses.toml"))
        self.settings = loadSettings(os.path.join(home, SETTINGS_FILE))
        if self.settings.error is not None:
            log.error("Using default settings: {error}", error=self.settings.error)
        self.sessions = SessionManager(
            self.store, self.harnesses, reactor, killGrace=killGrace, redact=self.settings.redact
        )
        self.sessions.setServiceParent(self)
        self.api = CovenAPI(self.store, self.sessions, reactor, self.daemonInfo)
        self.site = CovenSite(self.api.resource())
        self.ready: defer.Deferred[None] = defer.Deferred()

    @property
    def listensOnHomeSocket(self) -> bool:
        return self.listenDescription == defaultListen(self.home)

    def prepareHome(self) -> None:
        """
        Create the home folder with mode 0700 and take its lock.

        @raise HomeInUse: another daemon serves this home.
        """
        os.makedirs(self.home, mode=0o700, exist_ok=True)
        mode = os.stat(self.home).st_mode & 0o7777
        if mode != 0o700:
            os.chmod(self.home, 0o700)
            log.warn(
                "Changed the mode of the home folder {home} from {old} to 0700, so that only"
                " its owner can read the sessions in it",
                home=self.home,
                old=f"{mode:04o}",
            )
        lockPath = os.path.join(self.home, "coven.lock")
        descriptor = os.open(lockPath, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise HomeInUse(
                f"Another Coven daemon is already serving {self.home}"
                f"{_describeRunningDaemon(self.daemonFile)}; stop it first or pass another --home."
            ) from None
        os.truncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()}\n".encode("ascii"))
        self._lockFile = descriptor

    def daemonInfo(self) -> dict[str, Any] | None:
        if self.startedAt is None:
            return None
        return {
            "pid": os.getpid(),
            "startedAt": self.startedAt,
            "socket": self.socketPath if self.listensOnHomeSocket else self.listenDescription,
        }

    def startService(self) -> None:
        if self._lockFile is None:
            self.prepareHome()
        os.umask(self.harnessUmask)
        orphans = self.store.open()
        for sessionId in orphans:
            log.info(
                "Session {sessionId} was running when the daemon stopped; marked orphaned",
                sessionId=sessionId,
            )
        for pid in killLeftoverProcesses(orphans):
            log.info("Killed process {pid} left over from an orphaned session", pid=pid)
        super().startService()

        # A socket file left by a daemon that crashed is stale: the lock proves
        # no daemon serves this home now.
        if self.listensOnHomeSocket and os.path.lexists(self.socketPath):
            os.unlink(self.socketPath)
        # The socket is created with no access for others before its mode is set.
        previousUmask = os.umask(0o177)
        try:
            listening = serverFromString(self._reactor, self.listenDescription).listen(self.site)
        finally:
            os.umask(previousUmask)
        listening.addCallbacks(self._listening, self._listenFailed)

    def _listening(self, port: Any) -> None:
        self._port = port
        if isinstance(port, unix.Port) and self.listenDescription.startswith("systemd:"):
            _keepInheritedSocket(port)
        self.startedAt = utcnow()
        info = dict(self.daemonInfo() or {})
        # The `coven` command connects to this path, as for --listen unix:PATH.
        address = port.getHost()
        if isinstance(address, UNIXAddress) and address.name:
            info["socketPath"] = os.path.abspath(os.fsdecode(address.name))
        temporary = self.daemonFile + ".tmp"
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as file:
            json.dump(info, file)
        os.replace(temporary, self.daemonFile)
        log.info(
            "Coven daemon {pid} listening on {listen} with home {home}",
            pid=os.getpid(),
            listen=self.listenDescription,
            home=self.home,
        )
        self.ready.callback(None)
        # Imports and start-up leave about 1 MB of freed heap pages that glibc
        # keeps (benchmarks/idle.py), so they go back before the daemon idles.
        releaseFreeMemory()

    def _listenFailed(self, failure: Any) -> None:
        log.failure("Cannot listen on {listen}", failure, listen=self.listenDescription)
        self.ready.errback(failure)
        # A daemon that serves nothing would still hold the home's lock. Under
        # twistd the listen fails before the reactor runs.
        if self._reactor.running:
            self._reactor.stop()
        else:
            self._reactor.callWhenRunning(self._reactor.stop)

    async def _stop(self) -> None:
        if os.path.exists(self.daemonFile):
            os.unlink(self.daemonFile)
        # The socket stays open while the sessions are killed, so that a client
        # following one, such as `coven attach`, can still read its exit. New
        # launches are refused from now on.
        await self.sessions.stopService()
        # Long polls return what the stop recorded, such as the kill and
        # the exit of each session, while the store can still read.
        self.store.wakeWaiters()
        # A follower whose long poll returned the kill alone comes back for
        # the exit with a new connection, so the socket stays open until
        # the connections have been quiet for a moment.
        await self.site.whenQuiet(self.stopQuietPeriod, REQUESTS_STOP_TIMEOUT)
        if self._port is not None:
            await self._port.stopListening()
            self._port = None
        await waitAtMost(self._reactor, self.site.whenIdle(), REQUESTS_STOP_TIMEOUT)
        await self.store.stopService()
        # What was written to a connection is sent before the reactor stops,
        # which would drop it.
        await waitAtMost(self._reactor, self.site.closeConnections(), REQUESTS_STOP_TIMEOUT)
        if self._lockFile is not None:
            os.close(self._lockFile)
            self._lockFile = None
        log.info("Coven daemon {pid} stopped", pid=os.getpid())

    def stopService(self) -> defer.Deferred[None]:
        # Children are stopped one after another, not all at once as
        # MultiService does, because session exits must reach the store first.
        self.running = False
        return defer.Deferred.fromCoroutine(self._stop())


def _keepInheritedSocket(port: unix.Port) -> None:
    """
    Leave a UNIX socket inherited from systemd as systemd made it.

    Twisted 26.10 treats an adopted UNIX socket like one it bound itself. It
    sets the file's mode to 0666 when it starts listening. When it stops, it
    shuts the socket down for every process that has it and deletes the file.
    systemd owns the socket and listens on after the daemon exits, so the mode
    goes back to 0600, and stopping only closes this process's copy.
    """
    # NOTE: _bindPath and _shouldShutdown are private to Twisted's Port classes.
    path = port._bindPath
    if path[:1] not in (b"\0", "\0"):
        os.chmod(path, 0o600)
    port._shouldShutdown = False
    port.connectionLost = lambda reason: tcp.Port.connectionLost(port, reason)


def _glibcFunction(name: str) -> Any:
    """
    Return glibc's function C{name}, or C{None} on another C library.
    """
    try:
        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def releaseFreeMemory() -> None:
    """
    Hand memory that the allocator keeps after a burst back to the system.

    Large output strings come from glibc's heap, which keeps freed pages; after
    100 sessions of 1 MB this returned about 18 MB of RSS, and after start-up
    about 1 MB. Elsewhere than glibc this does nothing.
    """
    mallocTrim = _glibcFunction("malloc_trim")
    if mallocTrim is not None:
        mallocTrim(0)


# The mallopt parameter that caps how many malloc arenas glibc creates.
M_ARENA_MAX = -8


def limitMallocArenas() -> bool:
    """
    Make every thread allocate from glibc's main arena.

    By default glibc gives threads arenas of their own, and the freed memory
    the PTY reader and database threads kept there was not returned by
    L{releaseFreeMemory}. After two rounds of 20 MB and 100 MB bursts and 100
    sessions of 1 MB, the daemon's RSS was 62 MB with one arena per thread and
    50 MB with one arena for all, at the same burst throughput. Elsewhere than
    glibc this does nothing.

    @return: whether the limit was set.
    """
    mallopt = _glibcFunction("mallopt")
    return mallopt is not None and bool(mallopt(M_ARENA_MAX, 1))


def _currentUmask() -> int:
    umask = os.umask(0o077)
    os.umask(umask)
    return umask


def _describeRunningDaemon(daemonFile: str) -> str:
    try:
        with open(daemonFile) as file:
            info = json.load(file)
        return f" (pid {info['pid']}, socket {info['socket']})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def defaultListen(home: str) -> str:
    """
    Return the endpoint string of C{<home>/coven.sock} with mode 0600.
    """
    path = os.path.join(home, "coven.sock").replace("\\", "\\\\").replace(":", "\\:")
    # The home lock already keeps a second daemon away, so Twisted's own
    # socket lock file is not needed. Clients that connect without blocking
    # fail at once when the backlog is full, so it is larger than Twisted's 50.
    return f"unix:{path}:mode=600:lockfile=0:backlog=1024"


def listenProblem(reactor: Any, listen: str) -> str | None:
    """
    Return why C{listen} is not a server endpoint string Twisted can parse, or
    C{None}. Parsing opens no socket. A C{systemd:} endpoint also needs the
    sockets systemd passes in C{LISTEN_FDS}.
    """
    try:
        serverFromString(reactor, listen)
    # Each endpoint type's parser raises its own errors: ValueError for an
    # unknown type or a bad number, TypeError for a repeated argument,
    # IndexError for a systemd socket that was not passed.
    except Exception as error:
        message = f"--listen {listen!r} is not a valid endpoint: {error}"
        if listen.split(":", 1)[0].lower() == "systemd":
            message += "; a systemd: endpoint needs the daemon started by a socket unit, see docs/systemd.md"
        return message
    return None


def privateUnixListen(listen: str) -> str:
    """
    Return C{listen} with C{mode=600} added when it is a C{unix:} endpoint
    without a mode, whose socket Twisted would otherwise make 0666.
    """
    if listen.split(":", 1)[0].lower() != "unix" or re.search(r"(?<!\\):mode=", listen):
        return listen
    return listen + ":mode=600"


def makeService(options: dict[str, Any], reactor: Any = None) -> CovenService:
    """
    Build the daemon from C{twistd coven} options, taking the home's lock now so
    a second daemon fails before twistd detaches.
    """
    # Threads start with the reactor, after this.
    limitMallocArenas()
    if reactor is None:
        from twisted.internet import reactor as globalReactor

        reactor = globalReactor
    if options.get("home") == "":
        sys.stderr.write("coven: --home is empty; give a folder, or leave it out for $COVEN_HOME or ~/.coven\n")
        raise SystemExit(2)
    home = os.path.abspath(os.path.expanduser(options.get("home") or defaultHome()))
    if options.get("listen"):
        problem = listenProblem(reactor, options["listen"])
        if problem is not None:
            sys.stderr.write(f"coven: {problem}\n")
            raise SystemExit(2)
    listen = privateUnixListen(options.get("listen") or defaultListen(home))
    service = CovenService(home, listen, reactor, killGrace=float(options.get("kill-grace") or DEFAULT_KILL_GRACE))
    problem = homeProblem(home)
    if problem is None and service.listensOnHomeSocket:
        problem = socketPathProblem(service.socketPath)
    if problem is not None:
        sys.stderr.write(f"coven: {problem}\n")
        raise SystemExit(1)
    try:
        service.prepareHome()
        # This runs before twistd detaches, so the whole message reaches the terminal.
        checkDatabaseSchema(service.store.path)
    except (HomeInUse, StoreSchemaError) as error:
        sys.stderr.write(f"coven: {error}\n")
        raise SystemExit(1) from None
    except OSError as error:
        # Such as a home on a read-only file system, or under a file.
        sys.stderr.write(f"coven: cannot use the home folder {home}: {error}\n")
        raise SystemExit(1) from None
    except sqlite3.Error as error:
        state = "is damaged" if isDamaged(error) else "cannot be read"
        sys.stderr.write(
            f"coven: database {service.store.path} {state}: {error};"
            " `coven doctor` checks it, or use another --home\n"
        )
        raise SystemExit(1) from None
    stopOnHangUp(reactor)
    return service


def stopOnHangUp(reactor: Any) -> None:
    """
    Stop the daemon cleanly on SIGHUP, as on SIGTERM, where SIGHUP would
    otherwise end the process at once. A terminal that closes sends it to a
    `twistd -n coven` running in it, which then left its sessions orphaned.
    A SIGHUP that is ignored, as under nohup, stays ignored.
    """
    if signal.getsignal(signal.SIGHUP) != signal.SIG_DFL:
        return

    def hangUp(number: int, frame: Any) -> None:
        log.info("Received SIGHUP, as when the daemon's terminal closes; stopping")
        reactor.callFromThread(reactor.stop)

    signal.signal(signal.SIGHUP, hangUp)


__all__ = ["CovenService", "StoreSchemaError", "defaultHome", "makeService"]
