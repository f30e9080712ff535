"""Tests for the harness registry's messages about missing executables."""

from __future__ import annotations

import os
import pathlib

from coven.harnesses import HarnessSpec


def spec(command: str) -> HarnessSpec:
    return HarnessSpec("h", "H", (command,), ())


def test_missing_reason_per_command(tmp_path: pathlib.Path) -> None:
    notExecutable = tmp_path / "agent"
    notExecutable.write_text("#!/bin/sh\n")
    os.chmod(notExecutable, 0o644)
    executable = tmp_path / "ready"
    executable.write_text("#!/bin/sh\n")
    os.chmod(executable, 0o755)

    # A bare name is looked up on PATH; a path is checked as it is.
    assert spec("agent").missingReason() == "executable 'agent' was not found on the daemon's PATH"
    assert spec("agent").missingReason("this shell's PATH") == (
        "executable 'agent' was not found on this shell's PATH"
    )
    assert spec(f"{tmp_path}/gone").missingReason() == f"executable '{tmp_path}/gone' does not exist"
    assert spec(str(tmp_path)).missingReason() == f"'{tmp_path}' is a folder, not an executable file"
    assert spec(str(notExecutable)).missingReason() == (
        f"'{notExecutable}' is not executable (its mode lacks the execute permission)"
    )
    assert spec(str(notExecutable)).resolveExecutable(None) is None
    assert spec(str(executable)).resolveExecutable(None) == str(executable)
