"""The C{twistd coven} plugin: options and the service they build."""

from __future__ import annotations

from typing import Any

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer


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
        # Imported here so listing twistd plugins stays cheap.
        from coven.service import makeService

        return makeService(options)


serviceMaker = CovenServiceMaker()
