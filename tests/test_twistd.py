"""The real `twistd coven` plugin in a subprocess, reached over its socket."""

from __future__ import annotations

import datetime
import http.client
import json
import os
import re
import signal
import socket
import sqlite3
import ssl
import stat
import subprocess
import sys
import threading

import pytest

from coven.service import listenProblem
from coven.store import SCHEMA_VERSION, openDatabase

from .support import (
    damageDatabase,
    harnessConfig,
    processExists,
    requestBlocking,
    sessionProcesses,
    waitUntil,
)

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def writeHarnesses(home: str) -> None:
    os.makedirs(home, mode=0o700, exist_ok=True)
    with open(os.path.join(home, "harnesses.toml"), "w") as file:
        file.write(harnessConfig())


def readDaemonFile(home: str) -> dict:
    with open(os.path.join(home, "daemon.json")) as file:
        return json.load(file)


def runTwistd(home: str, *arguments: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """
    Run twistd with C{arguments} in C{home} until it exits, capturing its output.
    """
    return subprocess.run([TWISTD, *arguments], cwd=home, capture_output=True, text=True, timeout=timeout)


def launch(socketPath: str, project: str, prompt: str) -> dict:
    status, body = requestBlocking(
        socketPath,
        "POST",
        "/api/v1/sessions",
        {"projectRoot": project, "harness": "fake", "prompt": prompt},
    )
    assert status == 201, body
    return body


def outputSoFar(socketPath: str, sessionId: str) -> str:
    status, page = requestBlocking(socketPath, "GET", f"/api/v1/events?sessionId={sessionId}")
    return "".join(
        json.loads(event["payload_json"]).get("data", "")
        for event in page["events"]
        if event["kind"] == "output"
    )


@pytest.fixture
def foreground(home):
    """
    Start `twistd -n coven --home H` from a scratch folder, as a user would.
    """
    covenHome = os.path.join(home, "coven")
    writeHarnesses(covenHome)
    project = os.path.join(home, "project")
    os.makedirs(project)
    process = subprocess.Popen(
        [TWISTD, "-n", "coven", "--home", covenHome, "--kill-grace", "1"],
        cwd=home,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    socketPath = os.path.join(covenHome, "coven.sock")
    try:
        waitUntil(lambda: os.path.exists(os.path.join(covenHome, "daemon.json")) or process.poll() is not None)
        assert process.poll() is None, process.stdout.read().decode()
        yield process, covenHome, socketPath, project
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=20)
        process.stdout.close()


def test_plugin_listed_by_twistd():
    result = subprocess.run([TWISTD, "--help"], capture_output=True, text=True, timeout=60)

    assert result.returncode == 0
    assert any(line.split()[:1] == ["coven"] for line in result.stdout.splitlines())


def test_foreground_serves_and_stops_cleanly(foreground):
    process, home, socketPath, project = foreground

    status, health = requestBlocking(socketPath, "GET", "/api/v1/health")
    assert status == 200
    assert health["apiVersion"] == "coven.daemon.v1"
    assert health["daemon"]["pid"] == process.pid
    assert health["daemon"]["socket"] == socketPath
    assert readDaemonFile(home) == {**health["daemon"], "socketPath": socketPath}

    assert stat.S_IMODE(os.stat(home).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(socketPath).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.join(home, "coven.sqlite3")).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.join(home, "daemon.json")).st_mode) == 0o600

    pidFile = os.path.join(home, "pids")
    stubborn = launch(socketPath, project, "ignore-term")
    family = launch(socketPath, project, f"grandchild {pidFile}")
    waitUntil(lambda: "ready" in outputSoFar(socketPath, stubborn["id"]))
    waitUntil(lambda: "ready" in outputSoFar(socketPath, family["id"]))
    harnessPids = sessionProcesses(stubborn["id"]) + sessionProcesses(family["id"])
    assert len(harnessPids) == 3

    process.send_signal(signal.SIGTERM)
    process.wait(timeout=20)

    # twistd ends by re-raising the signal it stopped for, after a clean stop.
    assert process.returncode == -signal.SIGTERM
    assert re.search(rb"Coven daemon \d+ stopped", process.stdout.read())
    assert [pid for pid in harnessPids if processExists(pid)] == []
    assert not os.path.exists(os.path.join(home, "daemon.json"))
    assert not os.path.exists(socketPath)


def test_followers_see_exit_at_stop(foreground):
    process, home, socketPath, project = foreground
    session = launch(socketPath, project, "ignore-term")
    waitUntil(lambda: "ready" in outputSoFar(socketPath, session["id"]))
    _, page = requestBlocking(socketPath, "GET", f"/api/v1/events?sessionId={session['id']}")
    followed: list[str] = []
    failures: list[BaseException] = []

    # What `coven attach` does: long polls from the last event on, until the exit.
    def follow() -> None:
        cursor = page["events"][-1]["seq"]
        try:
            while "exit" not in followed:
                status, body = requestBlocking(
                    socketPath,
                    "GET",
                    f"/api/v1/events?sessionId={session['id']}&afterSeq={cursor}&waitMs=20000",
                    timeout=30,
                )
                assert status == 200, body
                followed.extend(event["kind"] for event in body["events"])
                cursor = body["nextCursor"]["afterSeq"] if body["nextCursor"] else cursor
        except BaseException as error:
            failures.append(error)

    follower = threading.Thread(target=follow)
    follower.start()
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=20)
    follower.join(timeout=30)

    # The harness ignores SIGTERM, so its exit comes a grace period after the
    # kill, and the follower sends another long poll in between.
    assert failures == []
    assert followed == ["kill", "exit"]


def test_hangup_stops_cleanly(foreground):
    process, home, socketPath, project = foreground
    session = launch(socketPath, project, "ignore-term")
    waitUntil(lambda: "ready" in outputSoFar(socketPath, session["id"]))
    harnessPids = sessionProcesses(session["id"])

    # What a closing terminal sends to the `twistd -n coven` running in it.
    process.send_signal(signal.SIGHUP)
    process.wait(timeout=20)
    output = process.stdout.read()
    database = sqlite3.connect(os.path.join(home, "coven.sqlite3"))
    try:
        (status,) = database.execute("SELECT status FROM sessions WHERE id = ?", (session["id"],)).fetchone()
        (lastKind,) = database.execute(
            "SELECT kind FROM events WHERE session_id = ? ORDER BY seq DESC LIMIT 1", (session["id"],)
        ).fetchone()
    finally:
        database.close()

    assert process.returncode == 0, output
    assert b"Received SIGHUP" in output
    assert (status, lastKind) == ("killed", "exit")
    assert [pid for pid in harnessPids if processExists(pid)] == []
    assert not os.path.exists(os.path.join(home, "daemon.json"))
    assert not os.path.exists(socketPath)


def test_second_daemon_refused(foreground, home):
    process, covenHome, socketPath, project = foreground

    second = runTwistd(home, "-n", "--pidfile", os.path.join(home, "second.pid"), "coven", "--home", covenHome)

    assert second.returncode == 1
    assert f"Another Coven daemon is already serving {covenHome}" in second.stderr
    assert f"pid {process.pid}" in second.stderr
    status, health = requestBlocking(socketPath, "GET", "/api/v1/health")
    assert status == 200
    assert health["daemon"]["pid"] == process.pid


def test_newer_database_refused_in_one_line(home):
    covenHome = os.path.join(home, "coven")
    os.makedirs(covenHome, mode=0o700)
    path = os.path.join(covenHome, "coven.sqlite3")
    with sqlite3.connect(path) as connection:
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")

    result = runTwistd(home, "-n", "--pidfile=", "coven", "--home", covenHome)

    assert result.returncode == 1
    assert result.stderr == (
        f"coven: database {path} has schema version {SCHEMA_VERSION + 1}, but this Coven"
        f" supports versions up to {SCHEMA_VERSION}; upgrade Coven or use another --home\n"
    )
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1


def test_damaged_database_refused_in_one_line(home):
    covenHome = os.path.join(home, "coven")
    os.makedirs(covenHome, mode=0o700)
    path = os.path.join(covenHome, "coven.sqlite3")
    openDatabase(path)
    damageDatabase(path)

    result = runTwistd(home, "-n", "--pidfile=", "coven", "--home", covenHome)

    assert result.returncode == 1
    assert result.stderr == (
        f"coven: database {path} is damaged: database disk image is malformed;"
        " `coven doctor` checks it, or use another --home\n"
    )


def test_detached_with_pidfile(home):
    covenHome = os.path.join(home, "coven")
    writeHarnesses(covenHome)
    pidFile = os.path.join(home, "coven.pid")
    socketPath = os.path.join(covenHome, "coven.sock")

    started = runTwistd(
        home, "--pidfile", pidFile, "--logfile", os.path.join(home, "coven.log"), "coven", "--home", covenHome
    )
    assert started.returncode == 0, started.stderr
    waitUntil(lambda: os.path.exists(os.path.join(covenHome, "daemon.json")))
    with open(pidFile) as file:
        pid = int(file.read())
    try:
        status, health = requestBlocking(socketPath, "GET", "/api/v1/health")
        assert status == 200
        assert health["daemon"]["pid"] == pid
    finally:
        os.kill(pid, signal.SIGTERM)
        waitUntil(lambda: not processExists(pid), timeout=20)

    assert not os.path.exists(pidFile)
    assert not os.path.exists(os.path.join(covenHome, "daemon.json"))


def test_stale_socket_replaced(home):
    covenHome = os.path.join(home, "coven")
    writeHarnesses(covenHome)
    socketPath = os.path.join(covenHome, "coven.sock")
    # A socket file left behind by a daemon that died without cleaning up.
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(socketPath)
    leftover.close()

    process = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "coven", "--home", covenHome],
        cwd=home,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        waitUntil(lambda: os.path.exists(os.path.join(covenHome, "daemon.json")) or process.poll() is not None)
        status, health = requestBlocking(socketPath, "GET", "/api/v1/health")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)

    assert status == 200
    assert health["daemon"]["pid"] == process.pid


def freeLoopbackPort() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def writeSelfSignedCertificate(path: str) -> None:
    """
    Write a PEM file with a new key and a self-signed certificate for 127.0.0.1.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    with open(path, "wb") as file:
        file.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        file.write(certificate.public_bytes(serialization.Encoding.PEM))


def mapsCryptography(pid: int) -> bool:
    """
    Return whether the process has a file of the cryptography package mapped,
    which pyOpenSSL loads.
    """
    with open(f"/proc/{pid}/maps") as file:
        return any(f"{os.sep}cryptography{os.sep}" in line for line in file)


@pytest.mark.parametrize("kind", ["unix", "tcp", "ssl"])
def test_listen_endpoint_option(home, kind):
    covenHome = os.path.join(home, "coven")
    writeHarnesses(covenHome)
    if kind == "unix":
        otherSocket = os.path.join(home, "other.sock")
        listen = f"unix:{otherSocket}:mode=600"
    elif kind == "tcp":
        port = freeLoopbackPort()
        listen = f"tcp:{port}:interface=127.0.0.1"
    else:
        port = freeLoopbackPort()
        certificatePath = os.path.join(home, "server.pem")
        writeSelfSignedCertificate(certificatePath)
        listen = f"ssl:{port}:interface=127.0.0.1:privateKey={certificatePath}"

    process = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "coven", "--home", covenHome, "--listen", listen],
        cwd=home,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        waitUntil(lambda: os.path.exists(os.path.join(covenHome, "daemon.json")) or process.poll() is not None)
        loadedTLS = mapsCryptography(process.pid)
        if kind == "unix":
            status, health = requestBlocking(otherSocket, "GET", "/api/v1/health")
        else:
            if kind == "tcp":
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            else:
                context = ssl.create_default_context(cafile=certificatePath)
                context.check_hostname = False
                connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
            connection.request("GET", "/api/v1/health")
            response = connection.getresponse()
            status, health = response.status, json.loads(response.read())
            connection.close()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)

    assert status == 200
    assert health["daemon"]["socket"] == listen
    assert not os.path.exists(os.path.join(covenHome, "coven.sock"))
    # Only a TLS listener needs pyOpenSSL, which costs about 12 MB of RSS.
    assert loadedTLS == (kind == "ssl")


def test_listen_failure_stops_daemon(home):
    covenHome = os.path.join(home, "coven")
    listen = f"unix:{os.path.join(home, 'missing', 'other.sock')}"
    result = runTwistd(home, "-n", "--pidfile=", "coven", "--home", covenHome, "--listen", listen, timeout=30)

    assert "Cannot listen on" in result.stdout
    assert not os.path.exists(os.path.join(covenHome, "daemon.json"))


@pytest.mark.parametrize(
    ("listen", "reason"),
    [
        ("bogus:thing", "Unknown endpoint type: 'bogus'"),
        ("tcp:notaport", "invalid literal for int() with base 10: 'notaport'"),
        ("tcp:80:interface=::1:interface=x", "_parseTCP() got multiple values for argument 'interface'"),
        (
            "systemd:domain=UNIX:index=0",
            "list index out of range; a systemd: endpoint needs the daemon started by a"
            " socket unit, see docs/systemd.md",
        ),
    ],
)
def test_invalid_listen_explained(listen, reason, monkeypatch):
    # As outside a socket unit: no sockets passed.
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    from twisted.internet import reactor

    assert listenProblem(reactor, listen) == f"--listen {listen!r} is not a valid endpoint: {reason}"


def test_invalid_listen_rejected(home):
    covenHome = os.path.join(home, "coven")
    listen = "bogus:thing"
    result = runTwistd(home, "-n", "--pidfile=", "coven", "--home", covenHome, "--listen", listen, timeout=30)

    assert result.returncode == 2
    assert result.stderr == f"coven: --listen {listen!r} is not a valid endpoint: Unknown endpoint type: 'bogus'\n"
    assert not os.path.exists(covenHome)


def test_unusable_home_rejected_in_one_line(home):
    blocker = os.path.join(home, "file")
    with open(blocker, "w"):
        pass
    covenHome = os.path.join(blocker, "coven")

    result = runTwistd(home, "-n", "--pidfile=", "coven", "--home", covenHome, timeout=30)

    assert result.returncode == 1
    assert result.stderr == (
        f"coven: the home {covenHome} cannot be created: {blocker} is a file, not a folder;"
        " choose another with --home or COVEN_HOME\n"
    )
    asFile = runTwistd(home, "-n", "--pidfile=", "coven", "--home", blocker, timeout=30)
    assert asFile.returncode == 1
    assert asFile.stderr == f"coven: the home {blocker} is a file, not a folder; choose another with --home or COVEN_HOME\n"


def test_empty_home_rejected(home):
    result = runTwistd(home, "-n", "--pidfile=", "coven", "--home", "", timeout=30)

    assert result.returncode == 2
    assert result.stderr == "coven: --home is empty; give a folder, or leave it out for $COVEN_HOME or ~/.coven\n"
