"""Measure the idle RSS of minimal twistd daemons on the stack Coven must use.

Writes a throwaway twistd plugin, `covenfloor`, into a temporary folder and
starts `twistd -n --pidfile= covenfloor` with that folder on PYTHONPATH, once
per stage and start. Like the coven plugin, it blocks pyOpenSSL, serves
GET /api/v1/health on a Unix socket and calls `malloc_trim(0)` once it listens.
The stages add one layer each:

    web     twisted.web Site with one Resource
    klein   the same route served by a Klein app
    sqlite  plus a one-connection adbapi pool that has run a query

When the health request returns 200 the script waits 1 s, as benchmarks/idle.py
does, reads VmRSS, RssAnon and RssFile from /proc/PID/status and stops the
daemon with SIGTERM. It prints the median of --starts starts per stage in MB
(2**20 bytes). Compare the last stage with benchmarks/idle.py to see what
Coven's own code adds to what twistd, Klein and SQLite take anyway.

    .venv/bin/python benchmarks/floor.py --starts 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import idle  # noqa: E402
import run  # noqa: E402

STAGES = ("web", "klein", "sqlite")

PLUGIN = '''
import ctypes
import sys

from twisted.application.service import IServiceMaker, Service
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer


class Options(usage.Options):
    optParameters = [
        ["socket", None, None, "Unix socket to serve on"],
        ["stage", None, "sqlite", "web, klein or sqlite"],
    ]


class FloorService(Service):
    def __init__(self, socketPath, stage):
        self.socketPath = socketPath
        self.stage = stage
        self.pool = None

    def startService(self):
        from twisted.internet import reactor
        from twisted.internet.endpoints import UNIXServerEndpoint
        from twisted.web.resource import Resource
        from twisted.web.server import Site

        if self.stage == "web":

            class Health(Resource):
                isLeaf = True

                def render_GET(self, request):
                    return b"{}"

            root = Resource()
            api = Resource()
            version = Resource()
            root.putChild(b"api", api)
            api.putChild(b"v1", version)
            version.putChild(b"health", Health())
        else:
            from klein import Klein

            app = Klein()

            @app.route("/api/v1/health")
            def health(request):
                return b"{}"

            root = app.resource()
        listening = UNIXServerEndpoint(reactor, self.socketPath).listen(Site(root))
        if self.stage == "sqlite":
            from twisted.enterprise import adbapi

            self.pool = adbapi.ConnectionPool(
                "sqlite3", self.socketPath + ".sqlite3", check_same_thread=False, cp_min=1, cp_max=1
            )
            listening.addCallback(lambda port: self.pool.runQuery("SELECT 1"))
        listening.addCallback(lambda result: ctypes.CDLL("libc.so.6").malloc_trim(0))


@implementer(IServiceMaker, IPlugin)
class FloorServiceMaker:
    tapname = "covenfloor"
    description = "Minimal daemon for benchmarks/floor.py."
    options = Options

    def makeService(self, options):
        sys.modules["OpenSSL"] = None
        return FloorService(options["socket"], options["stage"])


serviceMaker = FloorServiceMaker()
'''


def startFloorDaemon(pluginRoot: str, workdir: str, stage: str) -> run.Daemon:
    socketPath = os.path.join(workdir, "floor.sock")
    env = dict(os.environ, PYTHONPATH=pluginRoot)
    return run.startTwistd(
        f"floor-{stage}", ["covenfloor", "--socket", socketPath, "--stage", stage], workdir, env, socketPath
    )


def measureOnce(pluginRoot: str, stage: str) -> dict[str, float]:
    workdir = tempfile.mkdtemp(prefix="coven-floor-")
    daemon = startFloorDaemon(pluginRoot, workdir, stage)
    try:
        time.sleep(1.0)
        return idle.readStatus(daemon.pid)
    finally:
        run.stopOurDaemon(daemon)
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=3, help="daemon starts per stage (default 3)")
    parser.add_argument("--stage", choices=STAGES, action="append", help="stage to measure (default: all)")
    options = parser.parse_args()

    pluginRoot = tempfile.mkdtemp(prefix="coven-floor-plugin-")
    try:
        pluginFolder = os.path.join(pluginRoot, "twisted", "plugins")
        os.makedirs(pluginFolder)
        with open(os.path.join(pluginFolder, "coven_floor.py"), "w") as file:
            file.write(PLUGIN)
        for stage in options.stage or STAGES:
            samples = [measureOnce(pluginRoot, stage) for _ in range(options.starts)]
            medians = {name: statistics.median(sample[name] for sample in samples) for name in idle.FIELDS}
            print(f"{stage:7s} " + "  ".join(f"{name} {medians[name]:.1f}" for name in idle.FIELDS), flush=True)
    finally:
        shutil.rmtree(pluginRoot, ignore_errors=True)


if __name__ == "__main__":
    main()
