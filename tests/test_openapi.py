"""docs/openapi.yaml: a valid OpenAPI 3.1 document that a real daemon, fuzzed by schemathesis, matches."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from typing import Any, Iterator

import attrs
import hypothesis
import jsonschema
import pytest
import requests
import schemathesis
import yaml
from openapi_spec_validator import validate as validateOpenAPI
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import unsupported_method

from coven.api import CovenAPI

from .support import FAKE_HARNESS, markedProcesses, waitUntil

OPENAPI = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "openapi.yaml")
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")

# A fixed seed makes each run send the same requests, so a failure reproduces.
# COVEN_FUZZ_SEED and COVEN_FUZZ_EXAMPLES override the seed and the example
# count for a longer run by hand.
SEED = int(os.environ.get("COVEN_FUZZ_SEED", "20261204"))
# Generated cases per operation in the fuzzing phase. The examples and coverage
# phases add their own, fewer, deterministic cases. With 50, the module ran in
# about 17 s on the 2-core development machine.
MAX_EXAMPLES = int(os.environ.get("COVEN_FUZZ_EXAMPLES", "50"))
# Stateful scenarios follow the links of a launch (input, kill, archive, ...).
STATEFUL_EXAMPLES = max(1, MAX_EXAMPLES // 2)
STATEFUL_STEPS = 6
# A long poll on a live session waits for the whole waitMs, so valid values
# above this many milliseconds are lowered to keep the run short.
MAX_FUZZ_WAIT_MS = 50
DAEMON_TIMEOUT = 20.0

# Runs in the daemon's process before twistd. It moves the listening socket
# the test opened to descriptor 3 and describes it in the environment with
# this process's pid, as systemd socket activation does. Then it execs twistd,
# which keeps the pid and serves systemd:domain=INET:index=0. Twisted ignores
# LISTEN_FDS unless LISTEN_FDNAMES names as many sockets.
SOCKET_ACTIVATION = """
import os, sys
descriptor = int(sys.argv[1])
if descriptor != 3:
    os.dup2(descriptor, 3)
    os.close(descriptor)
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDNAMES"] = "coven-openapi-test"
os.execv(sys.argv[2], sys.argv[2:])
"""


def harnessesToml() -> str:
    """
    Return a harnesses.toml in which every id runs tests/fake_harness.py.

    The built-in ids are replaced too, so no generated harness id can start a
    real coding agent that happens to be installed. C{absent} names an
    executable that does not exist, for the documented 500.
    """
    command = json.dumps([sys.executable, FAKE_HARNESS])
    entries = [
        f'[harnesses.{harnessId}]\ncommand = {command}\nprompt_args = ["{{prompt}}"]\n'
        for harnessId in ("fake", "codex", "claude", "copilot")
    ]
    entries.append('[harnesses.absent]\ncommand = ["/nonexistent/coven-absent-harness"]\n')
    return "\n".join(entries)


@attrs.define
class FuzzTarget:
    """
    A daemon in a subprocess that serves HTTP on a loopback port the test
    opened, with its home and a project folder under one scratch folder.
    """

    process: subprocess.Popen[bytes]
    baseUrl: str
    home: str
    project: str
    logPath: str
    marker: str
    responses: Counter[tuple[str, int]] = attrs.Factory(Counter)
    sessionIds: list[str] = attrs.Factory(list)
    eventIds: dict[str, list[str]] = attrs.Factory(dict)

    def record(self, case: schemathesis.Case, response: Any) -> None:
        """
        Count the response and keep the session and event ids it reveals, for
        L{aimAtKnownSessions}.
        """
        label = case.operation.label
        self.responses[(label, response.status_code)] += 1
        if label == "POST /api/v1/sessions" and response.status_code == 201:
            self.sessionIds.append(response.json()["id"])
        if label == "GET /api/v1/events" and response.status_code == 200:
            for event in response.json()["events"]:
                self.eventIds.setdefault(event["session_id"], []).append(event["id"])

    def summary(self) -> str:
        lines = [f"{count:5d}  {status}  {label}" for (label, status), count in sorted(self.responses.items())]
        return f"{sum(self.responses.values())} requests from schemathesis:\n" + "\n".join(lines)

    def log(self) -> str:
        with open(self.logPath, errors="replace") as file:
            return file.read()


def _stopDaemon(target: FuzzTarget) -> None:
    """
    Stop the daemon with SIGTERM, which kills its live sessions, and check
    that no process it started is left.
    """
    if target.process.poll() is None:
        target.process.send_signal(signal.SIGTERM)
    try:
        target.process.wait(timeout=DAEMON_TIMEOUT)
    except subprocess.TimeoutExpired:
        target.process.kill()
        target.process.wait(timeout=DAEMON_TIMEOUT)
        raise AssertionError(f"daemon did not stop within {DAEMON_TIMEOUT}s of SIGTERM:\n{target.log()}")

    try:
        waitUntil(lambda: not markedProcesses(target.marker), timeout=DAEMON_TIMEOUT)
    except AssertionError:
        leftovers = markedProcesses(target.marker)
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        raise AssertionError(f"processes {leftovers} outlived the daemon") from None
    # twistd ends a clean stop by raising the signal that stopped it again.
    assert target.process.returncode in (0, -signal.SIGTERM), target.log()


@pytest.fixture(scope="module")
def fuzzTarget() -> Iterator[FuzzTarget]:
    scratch = tempfile.mkdtemp(prefix="coven-openapi-", dir="/tmp")
    home = os.path.join(scratch, "coven")
    project = os.path.join(scratch, "project")
    os.makedirs(os.path.join(project, "src"))
    os.makedirs(home, mode=0o700)
    with open(os.path.join(home, "harnesses.toml"), "w") as file:
        file.write(harnessesToml())

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]

    marker = f"COVEN_OPENAPI_TEST={uuid.uuid4()}"
    markerName, markerValue = marker.split("=")
    environment = {name: value for name, value in os.environ.items() if not name.startswith("LISTEN_")}
    environment[markerName] = markerValue
    logPath = os.path.join(scratch, "daemon.log")
    with open(logPath, "wb") as log:
        process = subprocess.Popen(
            [
                sys.executable, "-c", SOCKET_ACTIVATION, str(listener.fileno()),
                TWISTD, "-n", "--pidfile=", "coven",
                "--home", home,
                "--listen", "systemd:domain=INET:index=0",
                "--kill-grace", "1",
            ],
            pass_fds=(listener.fileno(),),
            env=environment,
            cwd=scratch,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    # The daemon owns the listening socket now.
    listener.close()

    target = FuzzTarget(process, f"http://127.0.0.1:{port}", home, project, logPath, marker)
    try:
        waitUntil(
            lambda: os.path.exists(os.path.join(home, "daemon.json")) or process.poll() is not None,
            timeout=DAEMON_TIMEOUT,
        )
        assert process.poll() is None, target.log()
        for prompt in ("echo", "echo", "sleep", "print done"):
            response = requests.post(
                f"{target.baseUrl}/api/v1/sessions",
                json={"projectRoot": project, "harness": "fake", "prompt": prompt},
                timeout=10,
            )
            assert response.status_code == 201, response.text
            target.sessionIds.append(response.json()["id"])
        yield target
        print(target.summary())
    finally:
        try:
            _stopDaemon(target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def _validString(value: Any, pattern: str) -> bool:
    return isinstance(value, str) and re.fullmatch(pattern, value) is not None


def _integralFloatsToIntegers(values: Any) -> None:
    # NOTE: JSON Schema counts 569.0 as an integer, but the daemon reads a query
    # parameter as decimal digits only, so such values are sent as plain
    # integers. In bodies the daemon accepts 569.0 itself.
    if isinstance(values, dict):
        for name, value in values.items():
            if isinstance(value, float) and value.is_integer():
                values[name] = int(value)


def makeHarmless(case: schemathesis.Case, target: FuzzTarget) -> None:
    """
    Point a generated launch at the scratch project and the fake harness, and
    shorten long polls, leaving every value that breaks the document as it is.

    Only values that the document accepts are replaced, so a negative case
    stays invalid for the reason schemathesis chose. Every schema-valid launch
    runs the fake harness in the project folder: either C{sleep}, which runs
    until it is killed, at the latest when the daemon stops, or C{print},
    which exits at once.
    """
    _integralFloatsToIntegers(case.query)
    if case.operation.label == "POST /api/v1/sessions" and isinstance(case.body, dict):
        body = case.body
        if _validString(body.get("projectRoot"), r"/[^\x00]*"):
            body["projectRoot"] = target.project
        if _validString(body.get("harness"), r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"):
            body["harness"] = "fake"
        cwd = body.get("cwd")
        if _validString(cwd, r"[^\x00]*"):
            body["cwd"] = (".", "src", os.path.join(target.project, "src"))[len(cwd) % 3]
        prompt = body.get("prompt")
        if _validString(prompt, r"[^\x00]*"):
            body["prompt"] = "sleep" if len(prompt) % 4 == 0 else "print " + prompt.replace("\n", " ")
    if case.operation.label in ("GET /api/v1/events", "GET /api/v1/sessions/{sessionId}"):
        waitMs = case.query.get("waitMs") if case.query else None
        if isinstance(waitMs, int) and not isinstance(waitMs, bool) and 0 <= waitMs <= 60000:
            case.query["waitMs"] = min(waitMs, MAX_FUZZ_WAIT_MS)
        elif isinstance(waitMs, str) and waitMs.isascii() and waitMs.isdigit() and int(waitMs) <= 60000:
            # Coverage cases send some integers as their text.
            case.query["waitMs"] = str(min(int(waitMs), MAX_FUZZ_WAIT_MS))


def aimAtKnownSessions(case: schemathesis.Case, target: FuzzTarget) -> None:
    """
    Replace two in three generated session ids with ids of sessions that
    exist, so the session routes get past their 404.

    Path parameters are replaced in both generation modes, because a negative
    case never puts its violation in a non-empty string. The C{sessionId} query
    parameter of the events route is replaced in positive cases only, together
    with C{afterEventId}, which must then name an event of that session.
    """
    if not target.sessionIds:
        return
    sessionId = (case.path_parameters or {}).get("sessionId")
    if isinstance(sessionId, str) and len(sessionId) % 3:
        case.path_parameters["sessionId"] = target.sessionIds[len(sessionId) % len(target.sessionIds)]

    if case.operation.label != "GET /api/v1/events" or not case.meta.generation.mode.is_positive:
        return
    sessionId = case.query.get("sessionId")
    if not isinstance(sessionId, str) or not len(sessionId) % 3:
        return
    case.query["sessionId"] = target.sessionIds[len(sessionId) % len(target.sessionIds)]
    _aimAfterEventId(case, target)


def _aimAfterEventId(case: schemathesis.Case, target: FuzzTarget) -> None:
    # A generated afterEventId is never an event of an existing session, which
    # is a documented 400 that positive cases must not hit.
    afterEventId = case.query.get("afterEventId")
    if afterEventId is None:
        return
    known = target.eventIds.get(case.query["sessionId"])
    if known:
        case.query["afterEventId"] = known[len(str(afterEventId)) % len(known)]
    else:
        del case.query["afterEventId"]


def _config() -> schemathesis.Config:
    return schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "generation": {"max-examples": MAX_EXAMPLES, "database": "none"},
            # Only the document's own links: links inferred from the session
            # list would depend on sessions left by earlier scenarios, so the
            # same choices would take different steps.
            "phases": {"stateful": {"inference": {"algorithms": []}}},
            "request-timeout": 10.0,
        }
    )


schema = schemathesis.openapi.from_path(OPENAPI, config=_config())

# The daemon returns 404 not_found, never 405, for a method a path does not
# serve (see the document's description), so this check does not apply.
EXCLUDED_CHECKS = [unsupported_method]


def test_document_valid_openapi_31() -> None:
    with open(OPENAPI) as file:
        document = yaml.safe_load(file)
    assert document["openapi"].startswith("3.1.")
    validateOpenAPI(document)


def _routes() -> set[tuple[str, str]]:
    routes = set()
    for rule in CovenAPI.app.url_map.iter_rules():
        if rule.endpoint.startswith("otherVersion"):
            continue
        path = re.sub(r"<([A-Za-z]+)>", r"{\1}", rule.rule)
        for method in rule.methods or ():
            if method != "HEAD":
                routes.add((method, path))
    return routes


def test_document_lists_every_route() -> None:
    with open(OPENAPI) as file:
        document = yaml.safe_load(file)
    documented = {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method in ("get", "post", "delete", "put", "patch")
    }
    versioned = {(method, path) for method, path in _routes() if path.startswith("/api/v1/")}
    legacy = {(method, path) for method, path in _routes() if not path.startswith("/api/")}

    assert documented == versioned
    for method, path in legacy:
        assert f"`{method} {path}`" in document["info"]["description"], (method, path)
    assert len(legacy) == len(versioned)


@schema.parametrize()
def test_daemon_matches_document(case: schemathesis.Case, fuzzTarget: FuzzTarget) -> None:
    makeHarmless(case, fuzzTarget)
    aimAtKnownSessions(case, fuzzTarget)
    response = case.call(base_url=fuzzTarget.baseUrl)
    fuzzTarget.record(case, response)
    case.validate_response(response, excluded_checks=EXCLUDED_CHECKS)


def _waitForExit(target: FuzzTarget, sessionId: str) -> None:
    """
    Follow the session's events with long polls until its C{exit} event is
    stored.
    """
    deadline = time.monotonic() + DAEMON_TIMEOUT
    cursor = 0
    while time.monotonic() < deadline:
        page = requests.get(
            f"{target.baseUrl}/api/v1/events",
            params={"sessionId": sessionId, "afterSeq": cursor, "waitMs": 1000},
            timeout=10,
        ).json()
        if any(event["kind"] == "exit" for event in page["events"]):
            return
        if page["nextCursor"] is not None:
            cursor = page["nextCursor"]["afterSeq"]
    raise AssertionError(f"session {sessionId} did not exit within {DAEMON_TIMEOUT}s")


def test_linked_calls_match_document(fuzzTarget: FuzzTarget) -> None:
    # Hypothesis requires that the same choices lead to the same steps, and
    # which links a step follows depends on the statuses before it. So each
    # step leaves the session in a settled state: a launch that exits at once
    # and a kill return only once the exit is stored. Sessions of the sleep
    # mode run until they are killed and ignore input.
    class LinkedCalls(schema.as_state_machine()):  # type: ignore[misc]
        def before_call(self, case: schemathesis.Case) -> None:
            makeHarmless(case, fuzzTarget)
            # The sessionId of the events route comes from a launch's link,
            # so it names a session that exists.
            if case.operation.label == "GET /api/v1/events" and case.meta.generation.mode.is_positive:
                _aimAfterEventId(case, fuzzTarget)

        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, Any]:
            return {"base_url": fuzzTarget.baseUrl}

        def after_call(self, response: Any, case: schemathesis.Case) -> None:
            fuzzTarget.record(case, response)
            label = case.operation.label
            if label == "POST /api/v1/sessions" and response.status_code == 201:
                if case.body["prompt"].startswith("print "):
                    _waitForExit(fuzzTarget, response.json()["id"])
            if label == "POST /api/v1/sessions/{sessionId}/kill" and response.status_code == 202:
                _waitForExit(fuzzTarget, case.path_parameters["sessionId"])

        def validate_response(self, response: Any, case: schemathesis.Case, **kwargs: Any) -> None:
            case.validate_response(response, excluded_checks=EXCLUDED_CHECKS, transport_kwargs=kwargs)

    LinkedCalls.run(
        settings=hypothesis.settings(
            max_examples=STATEFUL_EXAMPLES,
            stateful_step_count=STATEFUL_STEPS,
            derandomize=True,
            database=None,
            deadline=None,
            suppress_health_check=list(hypothesis.HealthCheck),
        )
    )


def test_spawn_failure_matches_document(fuzzTarget: FuzzTarget) -> None:
    operation = schema["/api/v1/sessions"]["POST"]
    case = operation.Case(
        body={"projectRoot": fuzzTarget.project, "harness": "absent", "prompt": "print never"}
    )
    response = case.call(base_url=fuzzTarget.baseUrl)

    assert response.status_code == 500
    error = response.json()["error"]
    assert error["code"] == "pty_spawn_failed"
    assert error["details"]["harness"] == "absent"
    # Every check but the one that rejects any 5xx: this 500 is documented.
    case.validate_response(
        response,
        excluded_checks=[*EXCLUDED_CHECKS, not_a_server_error],
    )

    sessionId = error["details"]["sessionId"]
    record = requests.get(f"{fuzzTarget.baseUrl}/api/v1/sessions/{sessionId}", timeout=10).json()
    assert record["status"] == "failed"


def _payloadSchemas() -> dict[str, Any]:
    with open(OPENAPI) as file:
        document = yaml.safe_load(file)
    schemas = document["components"]["schemas"]
    return {
        kind: schemas[f"{kind.capitalize()}Payload"]
        for kind in ("output", "input", "kill", "exit", "orphaned")
    }


def test_recorded_payloads_match_document(fuzzTarget: FuzzTarget) -> None:
    # The document gives the schema of payload_json only as an annotation
    # (contentSchema), so it is checked here. The events checked are those of
    # a session that gets output, input, a kill and an exit, and those of
    # every session that earlier tests launched.
    baseUrl = fuzzTarget.baseUrl
    launched = requests.post(
        f"{baseUrl}/api/v1/sessions",
        json={"projectRoot": fuzzTarget.project, "harness": "fake", "prompt": "echo"},
        timeout=10,
    ).json()
    sessionId = launched["id"]
    response = requests.post(f"{baseUrl}/api/v1/sessions/{sessionId}/input", json={"data": "hello\n"}, timeout=10)
    assert response.status_code == 202, response.text
    response = requests.post(f"{baseUrl}/api/v1/sessions/{sessionId}/kill", timeout=10)
    assert response.status_code == 202, response.text
    _waitForExit(fuzzTarget, sessionId)

    payloadSchemas = _payloadSchemas()
    sessions = []
    for archived in ("false", "true"):
        response = requests.get(f"{baseUrl}/api/v1/sessions", params={"archived": archived}, timeout=10)
        sessions.extend(response.json())
    kinds = set()
    for session in sessions:
        response = requests.get(f"{baseUrl}/api/v1/events", params={"sessionId": session["id"]}, timeout=10)
        for event in response.json()["events"]:
            jsonschema.validate(json.loads(event["payload_json"]), payloadSchemas[event["kind"]])
            kinds.add(event["kind"])
    assert kinds >= {"output", "input", "kill", "exit"}
