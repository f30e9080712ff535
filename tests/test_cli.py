"""The installed `coven` script in subprocesses, against a daemon in another process."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import socket
import stat
import sqlite3
import subprocess
import sys
import tempfile
import termios
import time
from typing import Any, Iterator

import attrs
import ptyprocess
import pytest

from coven import __version__
from coven.cli import logPointer, unrecordedExits
from coven.store import SCHEMA_VERSION, openDatabase

from .support import TESTS, harnessConfig, processExists, requestBlocking, waitUntil

BIN = os.path.dirname(sys.executable)
COVEN = os.path.join(BIN, "coven")
TWISTD = os.path.join(BIN, "twistd")
CLI_HARNESS = os.path.join(TESTS, "cli_harness.py")
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


@attrs.frozen
class CLIDaemon:
    home: str
    socketPath: str
    project: str


def makeShortHome() -> str:
    # Unix socket paths are limited to about 100 bytes.
    return tempfile.mkdtemp(prefix="coven-cli-", dir="/tmp")


def covenEnvironment(home: str) -> dict[str, str]:
    environment = dict(os.environ)
    environment["COVEN_HOME"] = home
    return environment


def coven(home: str, *args: str, cwd: str | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    if not os.path.exists(COVEN):
        pytest.fail(f"{COVEN} is missing; run pip install -e '.[test]' to create the console script")
    return subprocess.run(
        [COVEN, *args],
        env=covenEnvironment(home),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def rawGet(socketPath: str, path: str) -> bytes:
    """
    Return a response body byte for byte, as the daemon sent it.
    """
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.settimeout(10)
    connection.connect(socketPath)
    try:
        # HTTP/1.0 keeps the body unchunked, so it arrives exactly as written.
        connection.sendall(f"GET {path} HTTP/1.0\r\nHost: coven\r\n\r\n".encode())
        response = b""
        while chunk := connection.recv(65536):
            response += chunk
    finally:
        connection.close()
    head, _, body = response.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" not in head
    return body


def api(daemon: CLIDaemon, method: str, path: str, body: Any = None) -> Any:
    status, answer = requestBlocking(daemon.socketPath, method, path, body)
    assert status < 400, answer
    return answer


def launch(daemon: CLIDaemon, prompt: str, harness: str = "fake") -> str:
    session = api(
        daemon, "POST", "/api/v1/sessions", {"projectRoot": daemon.project, "harness": harness, "prompt": prompt}
    )
    return session["id"]


def events(daemon: CLIDaemon, sessionId: str) -> list[dict[str, Any]]:
    return api(daemon, "GET", f"/api/v1/events?sessionId={sessionId}")["events"]


def output(daemon: CLIDaemon, sessionId: str) -> str:
    return "".join(
        json.loads(event["payload_json"])["data"] for event in events(daemon, sessionId) if event["kind"] == "output"
    )


def waitForOutput(daemon: CLIDaemon, sessionId: str, text: str) -> None:
    waitUntil(lambda: text in output(daemon, sessionId), timeout=15)


def waitForExit(daemon: CLIDaemon, sessionId: str) -> None:
    waitUntil(lambda: any(event["kind"] == "exit" for event in events(daemon, sessionId)), timeout=15)


def startForeground(home: str, *options: str) -> subprocess.Popen[bytes]:
    """
    Start `twistd -n coven` for C{home} and wait until it has written daemon.json,
    which it does once its socket listens.
    """
    process = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "coven", "--home", home, "--kill-grace", "1", *options],
        cwd=home,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    waitUntil(lambda: os.path.exists(os.path.join(home, "daemon.json")) or process.poll() is not None, timeout=15)
    assert process.poll() is None, f"twistd exited with {process.returncode}; see {home}"
    return process


def stopProcess(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)


@pytest.fixture(scope="module")
def cliDaemon() -> Iterator[CLIDaemon]:
    """
    A daemon in a child process, so a blocking `coven` subprocess never waits
    on this process's reactor. Its harnesses.toml adds the fake harness and the
    `cli` harness.
    """
    root = makeShortHome()
    home = os.path.join(root, "h")
    os.makedirs(home, mode=0o700)
    with open(os.path.join(home, "harnesses.toml"), "w") as file:
        file.write(harnessConfig())
        file.write(f"\n[harnesses.cli]\ncommand = {json.dumps([sys.executable, CLI_HARNESS])}\n")
    project = os.path.join(root, "project")
    os.makedirs(project)
    process = startForeground(home)
    try:
        yield CLIDaemon(home, os.path.join(home, "coven.sock"), os.path.realpath(project))
    finally:
        stopProcess(process)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def emptyHome() -> Iterator[str]:
    root = makeShortHome()
    yield root
    shutil.rmtree(root, ignore_errors=True)


# Exit codes without a daemon


def test_no_daemon_exit_code_3(emptyHome):
    socketPath = os.path.join(emptyHome, "coven.sock")
    for args in (["show", "abc"], ["run", "fake", "hi", "--detach"]):
        result = coven(emptyHome, *args)
        assert result.returncode == 3, (args, result.stderr)
        assert result.stderr == (
            f"coven: Coven daemon is not running at {socketPath}; start it with `coven daemon start`\n"
        )
        assert result.stdout == ""


def test_no_daemon_advice_names_home_option(emptyHome):
    socketPath = os.path.join(emptyHome, "coven.sock")
    otherHome = makeShortHome()
    try:
        result = coven(otherHome, "--home", emptyHome, "sessions")
    finally:
        shutil.rmtree(otherHome, ignore_errors=True)

    assert result.returncode == 3
    assert result.stderr == (
        f"coven: Coven daemon is not running at {socketPath};"
        f" start it with `coven --home {emptyHome} daemon start`\n"
    )


def test_stop_without_daemon_nothing_to_stop(emptyHome):
    socketPath = os.path.join(emptyHome, "coven.sock")

    result = coven(emptyHome, "daemon", "stop")

    assert result.returncode == 3
    assert result.stderr == f"coven: Coven daemon is not running at {socketPath}; there is nothing to stop\n"
    assert result.stdout == ""


def test_usage_errors_exit_code_2(emptyHome):
    for args in ([], ["events", "abc", "--after", "x"], ["events", "abc", "--after", "-1"]):
        result = coven(emptyHome, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert "usage: coven" in result.stderr
    # The last of them: a negative --after is the command line's error, not the API's.
    assert result.stderr.endswith("coven events: error: argument --after: must be 0 or more, got -1\n")
    version = coven(emptyHome, "--version")
    assert (version.returncode, version.stdout) == (0, f"coven {__version__}\n")

    noJSON = coven(emptyHome, "run", "fake", "hi", "--json")
    assert noJSON.returncode == 2
    assert "--json" in noJSON.stderr

    # A TEXT that starts with "-" needs "--" before it, which the usage line shows.
    dash = coven(emptyHome, "send", "abc", "-n")
    assert dash.returncode == 2
    assert dash.stderr.startswith("usage: coven send [-h] [--no-enter] [--json] ID [--] TEXT\n")


# Sessions


def test_run_from_deleted_folder(cliDaemon):
    script = (
        'mkdir gone && cd gone && rmdir "$PWD" && exec "$0" run fake "print x" --detach'
    )
    result = subprocess.run(
        ["sh", "-c", script, COVEN],
        env=covenEnvironment(cliDaemon.home),
        cwd=cliDaemon.project,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode == 2
    assert result.stderr == (
        "coven: The current folder no longer exists; change to a project folder and run again.\n"
    )


def test_run_detach_in_git_project(cliDaemon):
    repository = os.path.join(cliDaemon.project, "repo")
    folder = os.path.join(repository, "src")
    os.makedirs(folder)
    subprocess.run(["git", "init", "-q", repository], check=True)

    result = coven(cliDaemon.home, "run", "fake", "print from git", "--detach", "--title", "git run", cwd=folder)
    assert result.returncode == 0, result.stderr
    sessionId = result.stdout.strip()
    assert UUID.match(sessionId)

    session = api(cliDaemon, "GET", f"/api/v1/sessions/{sessionId}")
    assert session["project_root"] == repository
    assert session["cwd"] == folder
    assert session["title"] == "git run"
    waitForOutput(cliDaemon, sessionId, "from git")

    # Outside a git work tree the current folder is the project.
    plain = coven(cliDaemon.home, "run", "fake", "print plain", "--detach", "--json", cwd=cliDaemon.project)
    assert plain.returncode == 0, plain.stderr
    assert json.loads(plain.stdout)["project_root"] == cliDaemon.project


def test_show_by_prefix_and_json(cliDaemon):
    sessionId = launch(cliDaemon, "print shown")
    waitForExit(cliDaemon, sessionId)

    shown = coven(cliDaemon.home, "show", sessionId[:6])
    assert shown.returncode == 0, shown.stderr
    assert f"id:        {sessionId}\n" in shown.stdout
    assert "status:    completed\n" in shown.stdout
    assert "exit code: 0\n" in shown.stdout

    asJSON = coven(cliDaemon.home, "show", sessionId[:6], "--json")
    assert asJSON.returncode == 0, asJSON.stderr
    assert asJSON.stdout.encode() == rawGet(cliDaemon.socketPath, f"/api/v1/sessions/{sessionId}") + b"\n"


def test_control_characters_in_title_escaped(cliDaemon):
    title = "\x1b[31mred\x1b[0m\tand\x07bell\x9b"
    started = coven(cliDaemon.home, "run", "fake", "print hi", "--detach", "--json", "--title", title)
    assert started.returncode == 0, started.stderr
    sessionId = json.loads(started.stdout)["id"]

    table = coven(cliDaemon.home, "sessions")
    showOutput = coven(cliDaemon.home, "show", sessionId)

    # The title is stored as given, and only the printed text is escaped.
    assert api(cliDaemon, "GET", f"/api/v1/sessions/{sessionId}")["title"] == title
    assert "\\x1b[31mred\\x1b[0m and\\x07bell\\x9b\n" in table.stdout
    assert "title:     \\x1b[31mred\\x1b[0m\\x09and\\x07bell\\x9b\n" in showOutput.stdout
    for output in (table.stdout, showOutput.stdout):
        assert not any(character in output for character in "\x1b\x07\x9b\t")


def test_control_characters_in_errors_escaped(cliDaemon):
    result = coven(cliDaemon.home, "run", "fake", "hi", "--detach", "--cwd", "missing\x1b[7m", cwd=cliDaemon.project)

    assert result.returncode == 1
    assert "missing\\x1b[7m" in result.stderr
    assert "\x1b" not in result.stderr


def test_command_runs_without_tls(cliDaemon):
    # The console script's own code, with a check of what it loaded at exit.
    script = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('TLS loaded:', sys.modules.get('OpenSSL') is not None))\n"
        "sys.argv = ['coven', 'sessions', '--json']\n"
        "from coven.command import main\n"
        "main()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=covenEnvironment(cliDaemon.home),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode == 0, result.stderr
    sessions, loaded = result.stdout.splitlines()
    assert isinstance(json.loads(sessions), list)
    assert loaded == "TLS loaded: False"


def test_sessions_table_and_all(cliDaemon):
    kept = launch(cliDaemon, "print kept")
    hidden = launch(cliDaemon, "print hidden")
    waitForExit(cliDaemon, kept)
    waitForExit(cliDaemon, hidden)
    assert coven(cliDaemon.home, "archive", hidden[:8]).returncode == 0

    table = coven(cliDaemon.home, "sessions")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["ID", "HARNESS", "STATUS", "AGE", "TITLE"]
    keptRows = [line for line in lines if line.startswith(kept[:8])]
    assert len(keptRows) == 1
    assert keptRows[0].split()[1:4] == ["fake", "completed", "(0)"]
    assert keptRows[0].endswith("print kept")
    assert not any(line.startswith(hidden[:8]) for line in lines)

    everything = coven(cliDaemon.home, "sessions", "--all")
    assert any(line.startswith(hidden[:8]) and "archived" in line for line in everything.stdout.splitlines())

    asJSON = coven(cliDaemon.home, "sessions", "--json")
    assert asJSON.stdout.encode() == rawGet(cliDaemon.socketPath, "/api/v1/sessions") + b"\n"

    allJSON = json.loads(coven(cliDaemon.home, "sessions", "--all", "--json").stdout)
    archived = api(cliDaemon, "GET", "/api/v1/sessions?archived=true")
    assert allJSON == api(cliDaemon, "GET", "/api/v1/sessions") + archived


def test_events_and_log(cliDaemon):
    sessionId = launch(cliDaemon, "bytes 68690a80ff0a")
    waitForExit(cliDaemon, sessionId)
    stored = events(cliDaemon, sessionId)

    lines = coven(cliDaemon.home, "events", sessionId[:8])
    assert lines.returncode == 0, lines.stderr
    assert [json.loads(line) for line in lines.stdout.splitlines()] == stored

    after = coven(cliDaemon.home, "events", sessionId[:8], "--after", str(stored[0]["seq"]))
    assert [json.loads(line) for line in after.stdout.splitlines()] == stored[1:]

    page = coven(cliDaemon.home, "events", sessionId[:8], "--json")
    assert page.stdout.encode() == rawGet(cliDaemon.socketPath, f"/api/v1/events?sessionId={sessionId}") + b"\n"

    # The log is the exact output bytes, including ones that are not UTF-8.
    log = subprocess.run([COVEN, "log", sessionId[:8]], env=covenEnvironment(cliDaemon.home), capture_output=True, timeout=30)
    assert log.returncode == 0, log.stderr
    assert log.stdout == b"hi\n\x80\xff\n"


def test_send_kill_and_api_errors(cliDaemon):
    sessionId = launch(cliDaemon, "echo")
    waitForOutput(cliDaemon, sessionId, "ready")

    sent = coven(cliDaemon.home, "send", sessionId[:8], "hello from send")
    assert sent.returncode == 0, sent.stderr
    waitForOutput(cliDaemon, sessionId, "got: hello from send")

    killed = coven(cliDaemon.home, "kill", sessionId[:8])
    assert killed.returncode == 0, killed.stderr
    assert killed.stdout == f"Killed session {sessionId}.\n"
    waitForExit(cliDaemon, sessionId)

    again = coven(cliDaemon.home, "kill", sessionId[:8], "--json")
    assert again.returncode == 1
    assert json.loads(again.stdout)["error"]["code"] == "session_not_live"
    assert again.stderr == (
        f"coven: Session {sessionId} has already ended (killed), so there is nothing to kill."
        f" [session_not_live; sessionId={sessionId}, status=killed]\n"
    )

    unknown = coven(cliDaemon.home, "show", "ffffffff-no-such-session")
    assert unknown.returncode == 1
    assert unknown.stderr == (
        "coven: No session has the id 'ffffffff-no-such-session'."
        " [session_not_found; sessionId=ffffffff-no-such-session]\n"
        "coven: `coven sessions --all` lists every session, archived ones included.\n"
    )

    badHarness = coven(cliDaemon.home, "run", "nonesuch", "hi", "--detach", cwd=cliDaemon.project)
    assert badHarness.returncode == 1
    assert "Unknown harness 'nonesuch'" in badHarness.stderr
    assert "[invalid_request" in badHarness.stderr
    assert "Traceback" not in badHarness.stderr


def test_archive_summon_sacrifice(cliDaemon):
    running = launch(cliDaemon, "sleep")
    waitForOutput(cliDaemon, running, "ready")
    busy = coven(cliDaemon.home, "sacrifice", running[:8], "--yes")
    assert busy.returncode == 1
    assert "[session_not_live" in busy.stderr
    unconfirmedBusy = coven(cliDaemon.home, "sacrifice", running[:8])
    assert unconfirmedBusy.returncode == 2
    assert f"Session {running} is still running" in unconfirmedBusy.stderr
    api(cliDaemon, "POST", f"/api/v1/sessions/{running}/kill")
    waitForExit(cliDaemon, running)

    archived = coven(cliDaemon.home, "archive", running[:8])
    assert archived.returncode == 0, archived.stderr
    assert api(cliDaemon, "GET", f"/api/v1/sessions/{running}")["archived_at"] is not None
    summoned = coven(cliDaemon.home, "summon", running[:8], "--json")
    assert summoned.returncode == 0, summoned.stderr
    assert json.loads(summoned.stdout)["archived_at"] is None

    unconfirmed = coven(cliDaemon.home, "sacrifice", running[:8])
    assert unconfirmed.returncode == 2
    assert f"deletes session {running} (sleep)" in unconfirmed.stderr
    assert "add --yes to confirm" in unconfirmed.stderr
    unknown = coven(cliDaemon.home, "sacrifice", "zzzz")
    assert unknown.returncode == 1
    assert "session_not_found" in unknown.stderr

    gone = coven(cliDaemon.home, "sacrifice", running[:8], "--yes")
    assert gone.returncode == 0, gone.stderr
    assert gone.stdout == f"Deleted session {running} and its events.\n"
    status, body = requestBlocking(cliDaemon.socketPath, "GET", f"/api/v1/sessions/{running}")
    assert status == 404


def test_ambiguous_prefix(cliDaemon):
    # Among 17 ids two must share their first hex digit.
    byFirst: dict[str, list[str]] = {}
    for _ in range(17):
        sessionId = launch(cliDaemon, "print x")
        byFirst.setdefault(sessionId[0], []).append(sessionId)
        if len(byFirst[sessionId[0]]) == 2:
            break
    shared = next(first for first, ids in byFirst.items() if len(ids) == 2)
    result = coven(cliDaemon.home, "show", shared)
    assert result.returncode == 2
    assert "matches" in result.stderr
    for sessionId in byFirst[shared]:
        assert sessionId in result.stderr
        waitForExit(cliDaemon, sessionId)


def test_doctor(cliDaemon, emptyHome):
    report = coven(cliDaemon.home, "doctor")
    assert report.returncode == 0, report.stdout + report.stderr
    assert f"ok    home {cliDaemon.home} (mode 0700)" in report.stdout
    assert f"ok    socket {cliDaemon.socketPath} (mode 0600)" in report.stdout
    assert "ok    daemon pid " in report.stdout
    assert f"ok    harness fake: {sys.executable}" in report.stdout
    assert "integrity check ok" in report.stdout
    assert "FAIL" not in report.stdout

    os.chmod(emptyHome, 0o755)
    missing = coven(emptyHome, "doctor")
    assert missing.returncode == 3
    assert f"FAIL  home {emptyHome} has mode 0755" in missing.stdout
    assert "FAIL  Coven daemon is not running at" in missing.stdout


def test_doctor_settings_changed_after_start(cliDaemon):
    path = os.path.join(cliDaemon.home, "coven.toml")
    before = coven(cliDaemon.home, "doctor")
    with open(path, "w") as file:
        file.write("[redaction]\nenabled = false\n")
    try:
        after = coven(cliDaemon.home, "doctor")
    finally:
        os.remove(path)

    warning = (
        f"warn  settings {path} (redaction off) changed after the running daemon started, which"
        " still uses the settings from before; restart the daemon to apply them (`coven daemon"
        " restart` if `coven daemon start` started it)\n"
    )
    assert "settings" not in before.stdout
    assert warning in after.stdout
    assert "ok    settings" not in after.stdout
    assert after.returncode == 0


def test_run_at_filesystem_root_explained(cliDaemon):
    result = coven(cliDaemon.home, "run", "fake", "print hi", "--detach", cwd="/")

    assert result.returncode == 1
    assert "[invalid_request; field=projectRoot" in result.stderr
    assert result.stderr.endswith(
        "coven: `coven run` takes the git work tree around the current folder as the project,"
        " else the folder itself; change to the project's folder and run again.\n"
    )


def writeSchemaVersion(home: str, version: int) -> str:
    os.makedirs(home, mode=0o700, exist_ok=True)
    path = os.path.join(home, "coven.sqlite3")
    with sqlite3.connect(path) as connection:
        connection.execute(f"PRAGMA user_version = {version}")
    os.chmod(path, 0o600)
    return path


def test_newer_database_reported(emptyHome):
    home = os.path.join(emptyHome, "h")
    path = writeSchemaVersion(home, SCHEMA_VERSION + 1)
    problem = (
        f"database {path} has schema version {SCHEMA_VERSION + 1}, but this Coven supports"
        f" versions up to {SCHEMA_VERSION}; upgrade Coven or use another --home"
    )

    report = coven(home, "doctor")
    started = coven(home, "daemon", "start")

    assert report.returncode == 3
    assert f"FAIL  {problem}\n" in report.stdout
    assert started.returncode == 1
    # Refused before twistd wrote to its log, so no log is named.
    assert f"(exit code 1): {problem}.\n" in started.stderr
    assert os.path.getsize(os.path.join(home, "coven.log")) == 0
    assert "Traceback" not in started.stderr


def test_unrecorded_exits_found(tmp_path):
    home = str(tmp_path)
    path = os.path.join(home, "coven.sqlite3")
    openDatabase(path)
    now = "2026-12-05T00:00:00.000Z"
    with sqlite3.connect(path) as connection:
        for sessionId, kinds in (("ended", ["output", "kill", "exit"]), ("killed", ["output", "kill"]), ("quiet", [])):
            connection.execute(
                "INSERT INTO sessions (id, project_root, cwd, harness, title, status, created_at, updated_at)"
                " VALUES (?, '/p', '/p', 'fake', 't', 'killed', ?, ?)",
                (sessionId, now, now),
            )
            for number, kind in enumerate(kinds):
                connection.execute(
                    "INSERT INTO events (id, session_id, kind, payload_json, created_at) VALUES (?, ?, ?, '{}', ?)",
                    (f"{sessionId}-{number}", sessionId, kind, now),
                )

    assert unrecordedExits(home, ["ended", "killed", "quiet"]) == ["killed", "quiet"]
    assert unrecordedExits(os.path.join(home, "missing"), ["ended"]) is None


def test_log_pointer_only_for_log_of_this_start(tmp_path):
    logPath = str(tmp_path / "coven.log")
    missing = logPointer(logPath, 0)
    with open(logPath, "w") as file:
        file.write("earlier start\n")
    size = os.path.getsize(logPath)
    unchanged = logPointer(logPath, size)
    with open(logPath, "a") as file:
        file.write("this start\n")
    grown = logPointer(logPath, size)

    assert missing == ""
    assert unchanged == ""
    assert grown == f"; see {logPath}"


def test_older_database_upgrade_reported(emptyHome):
    home = os.path.join(emptyHome, "h")
    path = writeSchemaVersion(home, 1)

    report = coven(home, "doctor")

    assert (
        f"ok    database {path}: integrity check ok, schema version 1"
        f" (the daemon upgrades it to {SCHEMA_VERSION} when it starts)\n"
    ) in report.stdout


def doctorWithHarnessFile(emptyHome: str, text: str) -> tuple[str, subprocess.CompletedProcess[str]]:
    """
    Start a daemon on a new home whose harnesses.toml is C{text}, and return
    the home and the output of `coven doctor` against it.
    """
    home = os.path.join(emptyHome, "h")
    os.makedirs(home, mode=0o700)
    with open(os.path.join(home, "harnesses.toml"), "w") as file:
        file.write(text)
    started = coven(home, "daemon", "start")
    assert started.returncode == 0, started.stderr
    try:
        return home, coven(home, "doctor")
    finally:
        coven(home, "daemon", "stop")


def test_doctor_names_harness_file_without_executables(emptyHome):
    # A script that names a missing interpreter cannot start either.
    script = os.path.join(emptyHome, "agent.sh")
    with open(script, "w") as file:
        file.write("#!/nonexistent/interpreter\n")
    os.chmod(script, 0o755)
    commands = {"codex": f"{emptyHome}/missing-codex", "claude": script, "copilot": f"{emptyHome}/missing-copilot"}
    text = "".join(f'[harnesses.{harness}]\ncommand = ["{command}"]\n' for harness, command in commands.items())
    home, report = doctorWithHarnessFile(emptyHome, text)

    assert "FAIL  no harness can be launched from the daemon's PATH" in report.stdout
    assert f"add one to {home}/harnesses.toml" in report.stdout
    assert f"warn  harness codex: executable '{emptyHome}/missing-codex' does not exist\n" in report.stdout
    assert (
        f"warn  harness claude: script '{script}' names the interpreter '/nonexistent/interpreter'"
        " on its first line, which does not exist\n"
    ) in report.stdout


def test_file_as_home_explained(emptyHome):
    home = os.path.join(emptyHome, "file")
    with open(home, "w"):
        pass
    message = f"the home {home} is a file, not a folder; choose another with --home or COVEN_HOME"

    doctor = coven(home, "doctor")
    start = coven(home, "daemon", "start")
    below = coven(os.path.join(home, "h"), "sessions")

    assert (doctor.returncode, doctor.stdout, doctor.stderr) == (1, f"FAIL  {message}\n", "")
    assert (start.returncode, start.stderr) == (1, f"coven: {message}\n")
    assert below.returncode == 1
    assert below.stderr == (
        f"coven: the home {home}/h cannot be created: {home} is a file, not a folder; choose another with --home or COVEN_HOME\n"
    )


def test_log_folder_explained(emptyHome):
    home = os.path.join(emptyHome, "h")
    logPath = os.path.join(home, "coven.log")
    os.makedirs(logPath)

    start = coven(home, "daemon", "start")

    assert start.returncode == 1
    assert start.stderr == f"coven: Cannot use the log file {logPath}: Is a directory; move it away and start again.\n"


def test_empty_home_rejected(emptyHome):
    result = coven(emptyHome, "--home", "", "sessions")

    assert result.returncode == 2
    assert result.stderr.endswith(
        "coven: error: --home is empty; give a folder, or leave it out for $COVEN_HOME or ~/.coven\n"
    )


def test_doctor_reports_settings_file(emptyHome):
    home = os.path.join(emptyHome, "h")
    os.makedirs(home, mode=0o700)
    path = os.path.join(home, "coven.toml")
    with open(path, "w") as file:
        file.write("[redaction]\nenable = false\n")
    invalid = coven(home, "doctor")
    with open(path, "w") as file:
        file.write("[redaction]\nenabled = false\n")
    valid = coven(home, "doctor")

    assert (
        "FAIL  settings ignored, so the daemon starts with the defaults (redaction on):"
        f" {path}: [redaction] unknown key 'enable'; did you mean 'enabled'?\n"
    ) in invalid.stdout
    assert f"ok    settings {path}: redaction off (read when the daemon starts)\n" in valid.stdout


def test_daemon_start_warns_of_ignored_files(emptyHome):
    home = os.path.join(emptyHome, "h")
    os.makedirs(home, mode=0o700)
    with open(os.path.join(home, "harnesses.toml"), "w") as file:
        file.write("[harnesses.broken\n")
    with open(os.path.join(home, "coven.toml"), "w") as file:
        file.write("[redaction]\nenable = false\n")
    started = coven(home, "daemon", "start")
    coven(home, "daemon", "stop")

    assert started.returncode == 0, started.stderr
    warnings = started.stderr.splitlines()
    assert warnings[0] == (
        "coven: warning: settings ignored, so the daemon uses the defaults (redaction on):"
        f" {home}/coven.toml: [redaction] unknown key 'enable'; did you mean 'enabled'?"
    )
    assert warnings[1].startswith(
        "coven: warning: harness configuration ignored, so the daemon offers only the built-in"
        f" harnesses: {home}/harnesses.toml: "
    )
    assert len(warnings) == 2


def test_doctor_ignored_harness_file_fails_once(emptyHome):
    _, report = doctorWithHarnessFile(emptyHome, "[harnesses.broken\n")

    # Whether or not a built-in harness is installed, the one failure is the
    # file that was ignored.
    assert report.returncode == 1
    assert report.stdout.count("FAIL") == 1
    assert "FAIL  harness configuration ignored: " in report.stdout


# Attach, driven in a real terminal


def readUntil(terminal: ptyprocess.PtyProcess, text: bytes, seen: bytearray, timeout: float = 15) -> None:
    """
    Read the terminal into C{seen} until it contains C{text}.
    """
    deadline = time.monotonic() + timeout
    while text not in seen:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"{text!r} did not appear within {timeout}s; the terminal showed {bytes(seen)!r}")
        ready, _, _ = select.select([terminal.fd], [], [], remaining)
        if not ready:
            continue
        try:
            chunk = os.read(terminal.fd, 4096)
        except OSError:
            chunk = b""
        if not chunk:
            raise AssertionError(f"the terminal closed before {text!r}; it showed {bytes(seen)!r}")
        seen.extend(chunk)


def spawnInTerminal(daemon: CLIDaemon, script: str, *args: str) -> ptyprocess.PtyProcess:
    """
    Run a shell script in a new 30x100 terminal; its arguments are C{args}.
    """
    environment = covenEnvironment(daemon.home)
    environment["PATH"] = BIN + os.pathsep + environment.get("PATH", os.defpath)
    return ptyprocess.PtyProcess.spawn(
        ["sh", "-c", script, "sh", *args],
        env=environment,
        cwd=daemon.project,
        dimensions=(30, 100),
    )


def closeTerminal(terminal: ptyprocess.PtyProcess) -> None:
    if terminal.isalive():
        terminal.terminate(force=True)
    terminal.close()


def test_attach_in_terminal(cliDaemon):
    sessionId = launch(cliDaemon, "attach me", harness="cli")
    waitForOutput(cliDaemon, sessionId, "size 24 80")

    # stty runs after coven exits, in the same terminal, to show the mode it left.
    terminal = spawnInTerminal(
        cliDaemon, 'coven attach "$1"; echo "exit=$?"; stty -a; echo stty-done', sessionId[:8]
    )
    seen = bytearray()
    try:
        readUntil(terminal, b"prompt: attach me", seen)
        readUntil(terminal, b"winch 30 100", seen)

        terminal.write(b"typed text\r")
        readUntil(terminal, b"got: typed text", seen)

        terminal.setwinsize(40, 120)
        readUntil(terminal, b"winch 40 120", seen)

        terminal.write(b"\x1d")
        readUntil(terminal, b"exit=0", seen)
        readUntil(terminal, b"stty-done", seen)
    finally:
        closeTerminal(terminal)

    assert f"Detached from session {sessionId}; it keeps running.".encode() in seen
    settings = bytes(seen).split(b"exit=0", 1)[1]
    assert re.search(rb"(?<![-\w])icanon\b", settings), settings
    assert re.search(rb"(?<![-\w])echo\b", settings), settings

    # Detaching left the session running and able to take input.
    assert api(cliDaemon, "GET", f"/api/v1/sessions/{sessionId}")["status"] == "running"
    api(cliDaemon, "POST", f"/api/v1/sessions/{sessionId}/input", {"data": "after detach\r"})
    waitForOutput(cliDaemon, sessionId, "got: after detach")
    api(cliDaemon, "POST", f"/api/v1/sessions/{sessionId}/kill")


def test_attach_restores_terminal_on_sigterm(cliDaemon):
    sessionId = launch(cliDaemon, "sigterm", harness="cli")
    waitForOutput(cliDaemon, sessionId, "size 24 80")
    terminal = ptyprocess.PtyProcess.spawn(
        [COVEN, "attach", sessionId], env=covenEnvironment(cliDaemon.home), dimensions=(30, 100)
    )
    seen = bytearray()
    try:
        # The attach sends the terminal's size once it has set raw mode.
        readUntil(terminal, b"winch 30 100", seen)
        # On Linux the master side reports the terminal's line settings.
        assert not termios.tcgetattr(terminal.fd)[3] & termios.ICANON

        terminal.kill(signal.SIGTERM)
        readUntil(terminal, b"it keeps running", seen)
        waitUntil(lambda: not terminal.isalive(), timeout=15)
        assert termios.tcgetattr(terminal.fd)[3] & termios.ICANON
        assert termios.tcgetattr(terminal.fd)[3] & termios.ECHO
    finally:
        closeTerminal(terminal)
    assert terminal.exitstatus == 0, bytes(seen)
    assert b"Traceback" not in seen
    assert f"session {sessionId}; it keeps running".encode() in seen
    assert api(cliDaemon, "GET", f"/api/v1/sessions/{sessionId}")["status"] == "running"
    api(cliDaemon, "POST", f"/api/v1/sessions/{sessionId}/kill")


def test_run_attached_until_exit(cliDaemon):
    terminal = spawnInTerminal(cliDaemon, 'coven run cli "run attached"; echo "exit=$?"')
    seen = bytearray()
    try:
        # The session starts with the terminal's size.
        readUntil(terminal, b"size 30 100", seen)
        terminal.write(b"quit\r")
        readUntil(terminal, b"exit=0", seen)
    finally:
        closeTerminal(terminal)
    assert b"bye" in seen
    assert re.search(rb"Session [0-9a-f-]{36} ended: completed, exit code 0\.", bytes(seen)), bytes(seen)


def attachWithoutTerminal(daemon: CLIDaemon) -> tuple[str, subprocess.Popen[bytes]]:
    """
    Launch an echo session, wait for its "ready", and start `coven attach` on
    it with stdin from /dev/null.
    """
    sessionId = launch(daemon, "echo")
    waitForOutput(daemon, sessionId, "ready")
    attach = subprocess.Popen(
        [COVEN, "attach", sessionId],
        env=covenEnvironment(daemon.home),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    return sessionId, attach


def test_attach_without_terminal(cliDaemon):
    sessionId, attach = attachWithoutTerminal(cliDaemon)
    try:
        api(cliDaemon, "POST", f"/api/v1/sessions/{sessionId}/input", {"data": "piped\n"})
        api(cliDaemon, "POST", f"/api/v1/sessions/{sessionId}/input", {"data": "quit\n"})
        stdout, stderr = attach.communicate(timeout=20)
    finally:
        if attach.poll() is None:
            attach.kill()
            attach.wait()
    assert attach.returncode == 0, stderr
    assert stdout.startswith(b"ready\r\n")
    assert b"got: piped\r\n" in stdout
    assert stdout.endswith(b"bye\r\n")
    assert stderr == f"Session {sessionId} ended: completed, exit code 0.\n".encode()


def test_attach_end_line_after_unfinished_line(cliDaemon):
    sessionId = launch(cliDaemon, "bytes 3e20")
    waitForExit(cliDaemon, sessionId)

    # As bytes, since text mode would turn the "\r\n" into "\n".
    attached = subprocess.run(
        [COVEN, "attach", sessionId],
        env=covenEnvironment(cliDaemon.home),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
    )

    assert attached.returncode == 0, attached.stderr
    assert attached.stdout == b"> "
    assert attached.stderr == f"\r\nSession {sessionId} ended: completed, exit code 0.\n".encode()


@pytest.mark.parametrize("signalNumber", [signal.SIGINT, signal.SIGTERM])
def test_attach_without_terminal_stopped(cliDaemon, signalNumber):
    sessionId, attach = attachWithoutTerminal(cliDaemon)
    try:
        # The output so far arrives once the attach follows the session.
        assert attach.stdout.read(len(b"ready\r\n")) == b"ready\r\n"
        attach.send_signal(signalNumber)
        _, stderr = attach.communicate(timeout=20)
    finally:
        if attach.poll() is None:
            attach.kill()
            attach.wait()
    assert b"Traceback" not in stderr, stderr
    assert attach.returncode == 0, stderr
    assert f"Stopped following session {sessionId}; it keeps running.".encode() in stderr
    assert api(cliDaemon, "GET", f"/api/v1/sessions/{sessionId}")["status"] == "running"
    api(cliDaemon, "POST", f"/api/v1/sessions/{sessionId}/kill")


@pytest.mark.parametrize("command", [["sessions"], ["daemon", "start"]])
def test_long_home_reported_at_once(emptyHome, command):
    home = os.path.join(emptyHome, "h" * 120)

    result = coven(home, *command, timeout=10)

    assert result.returncode == 1
    assert result.stderr.startswith(f"coven: The socket path {home}/coven.sock is ")
    assert "at most 107" in result.stderr
    assert not os.path.exists(home)


# Daemon control


def test_daemon_stop_reports_killed_sessions(emptyHome):
    home = os.path.join(emptyHome, "h")
    os.makedirs(home, mode=0o700)
    with open(os.path.join(home, "harnesses.toml"), "w") as file:
        file.write(harnessConfig())
    started = coven(home, "daemon", "start")
    assert started.returncode == 0, started.stderr
    pid = readPidfile(os.path.join(home, "coven.pid"))
    daemon = CLIDaemon(home, os.path.join(home, "coven.sock"), emptyHome)
    try:
        sessionIds = [launch(daemon, "sleep") for _ in range(2)]
        for sessionId in sessionIds:
            waitForOutput(daemon, sessionId, "ready")

        stopped = coven(home, "daemon", "stop")
    finally:
        if processExists(pid):
            os.kill(pid, signal.SIGKILL)

    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout == (
        f"Coven daemon stopped (pid {pid}). It killed 2 running sessions and recorded how they ended.\n"
    )


def readPidfile(pidfile: str) -> int:
    with open(pidfile) as file:
        return int(file.read())


def test_daemon_start_replaces_stale_pidfile(emptyHome):
    home = os.path.join(emptyHome, "h")
    os.makedirs(home, mode=0o700)
    pidfile = os.path.join(home, "coven.pid")
    # As after a crash and a reboot: the pid now belongs to another process.
    with open(pidfile, "w") as file:
        file.write(f"{os.getpid()}\n")
    try:
        started = coven(home, "daemon", "start")
        pid = readPidfile(pidfile)
    finally:
        stopped = coven(home, "daemon", "stop")

    assert started.returncode == 0, started.stderr
    assert pid != os.getpid()
    assert f"Coven daemon started (pid {pid})" in started.stdout
    assert stopped.returncode == 0, stopped.stderr


def test_daemon_on_listen_socket_reached(emptyHome):
    home = os.path.join(emptyHome, "h")
    os.makedirs(home, mode=0o700)
    # A default daemon that crashed left its socket file behind.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(os.path.join(home, "coven.sock"))
    stale.close()
    socketPath = os.path.join(emptyHome, "other.sock")
    # Relative to the daemon's working folder, which is the home, and
    # without a mode, which the daemon sets to 0600.
    process = startForeground(home, "--listen", "unix:../other.sock")
    try:
        socketMode = stat.S_IMODE(os.stat(socketPath).st_mode)
        status = coven(home, "daemon", "status")
        sessions = coven(home, "sessions")
        stopProcess(process)
        notRunning = coven(home, "sessions")
    finally:
        stopProcess(process)

    assert socketMode == 0o600
    assert status.returncode == 0, status.stderr
    assert f"Coven daemon is running at {socketPath}\n" in status.stdout
    assert sessions.returncode == 0, sessions.stderr
    assert notRunning.returncode == 3
    assert f"Coven daemon is not running at {os.path.join(home, 'coven.sock')};" in notRunning.stderr


def test_daemon_start_status_stop_twice(emptyHome):
    home = os.path.join(emptyHome, "h")
    pidfile = os.path.join(home, "coven.pid")
    try:
        for round in (1, 2):
            started = coven(home, "daemon", "start")
            assert started.returncode == 0, started.stderr
            pid = readPidfile(pidfile)
            assert processExists(pid)
            assert f"Coven daemon started (pid {pid})" in started.stdout

            if round == 1:
                status = coven(home, "daemon", "status")
                assert status.returncode == 0, status.stderr
                assert f"pid:         {pid}\n" in status.stdout

                again = coven(home, "daemon", "start")
                assert again.returncode == 0
                assert f"already running (pid {pid})" in again.stdout
            else:
                status = coven(home, "daemon", "status", "--json")
                assert status.returncode == 0, status.stderr
                assert json.loads(status.stdout)["daemon"]["pid"] == pid

                restarted = coven(home, "daemon", "restart")
                assert restarted.returncode == 0, restarted.stderr
                newPid = readPidfile(pidfile)
                assert newPid != pid
                assert not processExists(pid)
                assert f"Coven daemon stopped (pid {pid})." in restarted.stdout
                assert f"Coven daemon started (pid {newPid})" in restarted.stdout
                pid = newPid

            stopped = coven(home, "daemon", "stop")
            assert stopped.returncode == 0, stopped.stderr
            assert stopped.stdout == f"Coven daemon stopped (pid {pid}).\n"
            assert not processExists(pid)
            assert not os.path.exists(pidfile)

            notRunning = coven(home, "daemon", "stop" if round == 1 else "status")
            assert notRunning.returncode == 3
            assert "Coven daemon is not running" in notRunning.stderr

        assert stat.S_IMODE(os.stat(os.path.join(home, "coven.log")).st_mode) == 0o600
    finally:
        if os.path.exists(pidfile):
            os.kill(readPidfile(pidfile), signal.SIGTERM)
            waitUntil(lambda: not os.path.exists(pidfile), timeout=20)


def test_stop_refuses_daemon_without_pidfile(emptyHome):
    home = os.path.join(emptyHome, "h")
    os.makedirs(home, mode=0o700)
    process = startForeground(home)
    try:
        result = coven(home, "daemon", "stop")
        assert result.returncode == 1
        assert "was not started by `coven daemon start`" in result.stderr
        assert process.poll() is None
    finally:
        stopProcess(process)
