"""The C{twistd coven} plugin: options and the service they build."""

from __future__ import annotations

import sys
from typing import Any

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer


# Endpoint types whose listeners never use TLS: Twisted's own "tcp" and "unix"
# parsers and its "tcp6" and "systemd" parser plugins.
PLAIN_ENDPOINT_TYPES = frozenset({"unix", "tcp", "tcp6", "systemd"})


def blockTLSImports(listen: str | None) -> None:
    """
    Keep pyOpenSSL, and with it C{cryptography}, out of a daemon that serves no TLS.

    The reactor's TCP support imports C{twisted.internet.ssl}, which loads
    pyOpenSSL and C{cryptography}: about 12 MB of RSS (measured with
    benchmarks/idle.py) that a daemon listening on a Unix socket or plain TCP
    never uses. A C{None} entry in C{sys.modules} makes C{import OpenSSL}
    raise L{ImportError}, which C{twisted.internet.tcp}, C{posixbase} and
    C{endpoints} (Twisted 26.10) treat as "no TLS available". Any other
    endpoint type, C{ssl} or one from a plugin, may need TLS, so it leaves the
    imports alone. So does a process that has already loaded pyOpenSSL, for
    example because C{twistd --reactor} installed the reactor before this
    plugin ran.

    @param listen: the C{--listen} endpoint string; L{None} means the default
        Unix socket.
    """
    endpointType = "unix" if listen is None else listen.split(":", 1)[0].lower()
    if endpointType in PLAIN_ENDPOINT_TYPES and "OpenSSL" not in sys.modules:
        sys.modules["OpenSSL"] = None  # type: ignore[assignment]


class Options(usage.Options):
    optParameters = [
        ["home", None, None, "Coven home folder [default: $COVEN_HOME, else ~/.coven]"],
        [
            "listen",
            None,
            None,
            "Twisted server endpoint string to serve the API on"
            " [default: unix:<home>/coven.sock:mode=600]",
        ],
        ["kill-grace", None, "3", "Seconds between SIGTERM and SIGKILL when a session is killed"],
    ]

    def postOptions(self) -> None:
        try:
            grace = float(self["kill-grace"])
        except ValueError:
            raise usage.UsageError(f"--kill-grace must be a number of seconds, got {self['kill-grace']!r}")
        if not 0 <= grace <= 3600:
            raise usage.UsageError(f"--kill-grace must be from 0 to 3600 seconds, got {grace}")


@implementer(IServiceMaker, IPlugin)
class CovenServiceMaker:
    tapname = "coven"
    description = "Coven daemon: coding-agent CLIs in PTYs behind an HTTP API on a Unix socket."
    options = Options

    def makeService(self, options: Options) -> Any:
        # Runs only in the twistd process that serves the daemon, before the
        # reactor is imported, so the coven client and other twistd plugins
        # keep TLS.
        blockTLSImports(options["listen"])

        # Imported here so listing twistd plugins stays cheap.
        from coven.service import makeService

        return makeService(options)


serviceMaker = CovenServiceMaker()
