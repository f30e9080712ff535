"""Socket activation: the daemon serves a listening socket it inherits the way systemd passes one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from typing import Any, Iterator

import attrs
import pytest

from .support import harnessConfig, requestBlocking, waitUntil

LISTEN = "systemd:domain=UNIX:index=0"

# Runs in the child: put the inherited socket at fd 3, the first of the
# sd_listen_fds(3) protocol, set LISTEN_PID to this process (exec keeps the
# pid), LISTEN_FDS to one and LISTEN_FDNAMES to the socket unit's name, then
# exec the daemon. systemd 227 and newer always set LISTEN_FDNAMES, and
# Twisted 26 ignores inherited sockets without it.
ACTIVATE = """
import os, sys
inherited = int(sys.argv[1])
os.dup2(inherited, 3)
os.close(inherited)
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_FDNAMES"] = "coven.socket"
os.execv(sys.argv[2], sys.argv[2:])
"""


@attrs.frozen
class SocketUnit:
    """
    A listening socket set up as a socket unit would, and the home it serves.
    """

    listener: socket.socket
    home: str
    socketPath: str
    project: str


@pytest.fixture
def socketUnit() -> Iterator[SocketUnit]:
    root = tempfile.mkdtemp(prefix="coven-sd-", dir="/tmp")
    home = os.path.join(root, "h")
    os.makedirs(home, mode=0o700)
    with open(os.path.join(home, "harnesses.toml"), "w") as file:
        file.write(harnessConfig())
    project = os.path.join(root, "project")
    os.makedirs(project)
    socketPath = os.path.join(home, "coven.sock")

    # What a socket unit with ListenStream=%h/.coven/coven.sock and
    # SocketMode=0600 sets up before the service starts; like systemd, the
    # test keeps listening after a daemon exits.
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socketPath)
    os.chmod(socketPath, 0o600)
    listener.listen()
    try:
        yield SocketUnit(listener, home, socketPath, project)
    finally:
        listener.close()
        shutil.rmtree(root, ignore_errors=True)


def activate(unit: SocketUnit) -> subprocess.Popen[bytes]:
    """
    Start `twistd -n coven --listen systemd:domain=UNIX:index=0` with the unit's socket.
    """
    twistd = [
        sys.executable,
        "-c",
        "from twisted.scripts.twistd import run; run()",
        "-n",
        "--pidfile=",
        "coven",
        "--home",
        unit.home,
        "--listen",
        LISTEN,
    ]
    environment = {name: value for name, value in os.environ.items() if not name.startswith("LISTEN_")}
    return subprocess.Popen(
        [sys.executable, "-c", ACTIVATE, str(unit.listener.fileno()), *twistd],
        pass_fds=[unit.listener.fileno()],
        env=environment,
        cwd=unit.project,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def stop(process: subprocess.Popen[bytes]) -> str:
    """
    Stop the daemon with SIGTERM, as systemctl stop does, and return its output.
    """
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    return process.communicate(timeout=20)[0].decode("utf-8", "replace")


def health(unit: SocketUnit, process: subprocess.Popen[bytes]) -> dict[str, Any]:
    # The socket accepts connections before the daemon starts; the request
    # waits in the backlog until the daemon serves it.
    status, body = requestBlocking(unit.socketPath, "GET", "/api/v1/health", timeout=15)
    assert status == 200, body
    assert body["daemon"]["pid"] == process.pid
    return body


def test_daemon_serves_inherited_socket(socketUnit):
    process = activate(socketUnit)
    try:
        body = health(socketUnit, process)
        assert body["apiVersion"] == "coven.daemon.v1"
        assert body["daemon"]["socket"] == LISTEN

        status, session = requestBlocking(
            socketUnit.socketPath,
            "POST",
            "/api/v1/sessions",
            {"projectRoot": socketUnit.project, "harness": "fake", "prompt": "print activated"},
        )
        assert status == 201, session

        def printed() -> bool:
            _, page = requestBlocking(socketUnit.socketPath, "GET", f"/api/v1/events?sessionId={session['id']}")
            return any(
                "activated" in json.loads(event["payload_json"]).get("data", "")
                for event in page["events"]
            )

        waitUntil(printed, timeout=15)
    finally:
        output = stop(process)
    assert "Traceback" not in output, output


def test_socket_unit_outlives_daemon(socketUnit):
    process = activate(socketUnit)
    try:
        health(socketUnit, process)
        mode = stat.S_IMODE(os.stat(socketUnit.socketPath).st_mode)
    finally:
        stop(process)
    assert mode == 0o600
    assert os.path.exists(socketUnit.socketPath)

    # systemd starts the service again on the next connection, with the same socket.
    again = activate(socketUnit)
    try:
        health(socketUnit, again)
    finally:
        stop(again)
