"""Fixtures: a real daemon on a real Unix socket in a temporary home."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, AsyncIterator

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor

from coven.service import CovenService, defaultListen

from .support import UnixClient, harnessConfig


@attrs.define
class RunningDaemon:
    service: CovenService
    client: UnixClient
    home: str
    project: str


def makeHome() -> str:
    # Unix socket paths are limited to about 100 bytes, so homes live in a short
    # folder instead of pytest's tmp_path.
    return tempfile.mkdtemp(prefix="coven-test-", dir="/tmp")


async def startDaemon(home: str, killGrace: float = 1.0) -> CovenService:
    os.makedirs(home, mode=0o700, exist_ok=True)
    with open(os.path.join(home, "harnesses.toml"), "w") as file:
        file.write(harnessConfig())
    service = CovenService(home, defaultListen(home), reactor, killGrace=killGrace)
    # Stops wait this long for followers to come back for the exits. A test
    # that follows a session across a stop sets its own.
    service.stopQuietPeriod = 0.02
    service.startService()
    await service.ready
    return service


@pytest.fixture
def home() -> Any:
    path = makeHome()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest_twisted.async_yield_fixture
async def daemon(home: str) -> AsyncIterator[RunningDaemon]:
    project = os.path.join(home, "project")
    os.makedirs(project)
    service = await startDaemon(os.path.join(home, "coven"))
    yield RunningDaemon(service, UnixClient(service.socketPath), service.home, project)
    if service.running:
        await service.stopService()
