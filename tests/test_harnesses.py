"""Tests for harness commands: paths in harnesses.toml and why an executable is missing."""

from __future__ import annotations

import os
import pathlib

import pytest

from coven.harnesses import HarnessConfigError, HarnessSpec, interpreterProblem, parseHarnessFile


def spec(command: str) -> HarnessSpec:
    return HarnessSpec("h", "H", (command,), ())


def test_missing_reason_per_command(tmp_path: pathlib.Path) -> None:
    notExecutable = tmp_path / "agent"
    notExecutable.write_text("#!/bin/sh\n")
    os.chmod(notExecutable, 0o644)
    executable = tmp_path / "ready"
    executable.write_text("#!/bin/sh\n")
    os.chmod(executable, 0o755)

    # A bare name is looked up on PATH. A path is checked as it is.
    assert spec("agent").missingReason() == "executable 'agent' was not found on the daemon's PATH"
    assert spec("agent").missingReason("this shell's PATH") == (
        "executable 'agent' was not found on this shell's PATH"
    )
    assert spec(f"{tmp_path}/gone").missingReason() == f"executable '{tmp_path}/gone' does not exist"
    assert spec(str(tmp_path)).missingReason() == f"'{tmp_path}' is a folder, not an executable file"
    assert spec(str(notExecutable)).missingReason() == f"'{notExecutable}' is not executable by the daemon's user"
    assert spec(f"{notExecutable}/x").missingReason() == (
        f"executable '{notExecutable}/x' cannot be used: Not a directory"
    )
    assert spec(str(notExecutable)).resolveExecutable(None) is None
    assert spec(str(executable)).resolveExecutable(None) == str(executable)


def script(folder: pathlib.Path, name: str, text: bytes) -> str:
    path = folder / name
    path.write_bytes(text)
    os.chmod(path, 0o755)
    return str(path)


def test_interpreter_problem_per_script(tmp_path: pathlib.Path) -> None:
    notExecutable = script(tmp_path, "interpreter", b"")
    os.chmod(notExecutable, 0o644)
    install = "Install that interpreter, or change the script's first line."
    crlf = (
        "has Windows line endings, so its first line passes a carriage return to its interpreter",
        "Convert the script to Unix line endings, as with dos2unix.",
    )
    cases = [
        (b"#!/bin/sh\necho hi\n", None),
        (b"#! /bin/sh -e\n", None),
        (b"#!/bin/sh\t-e\n", None),
        (b"\x7fELF\x02\x01", None),
        (b"echo no interpreter line\n", None),
        # The kernel resolves a relative interpreter against the working folder.
        (b"#!sh\n", None),
        (
            b"#!/nonexistent/interp\n",
            ("names the interpreter '/nonexistent/interp' on its first line, which does not exist", install),
        ),
        (
            b"#!  /nonexistent/interp arg\n",
            ("names the interpreter '/nonexistent/interp' on its first line, which does not exist", install),
        ),
        (b"#!/bin/sh\r\necho hi\r\n", crlf),
        (b"#!/usr/bin/env sh\r\n", crlf),
        (b"#!/bin/sh -e\r\n", crlf),
        # Linux ends the line at a NUL byte too.
        (b"#!/bin/sh\0x\n", None),
        (
            f"#!{tmp_path}\n".encode(),
            (
                f"names the interpreter '{tmp_path}' on its first line, which is not an executable file",
                "Make that file executable, or change the script's first line.",
            ),
        ),
        (
            f"#!{notExecutable}\n".encode(),
            (
                f"names the interpreter '{notExecutable}' on its first line, which is not an executable file",
                "Make that file executable, or change the script's first line.",
            ),
        ),
        (b"#!\n", ("has no interpreter after the #! on its first line", "Add the interpreter's path after the #!.")),
    ]
    for number, (text, expected) in enumerate(cases):
        path = script(tmp_path, f"agent{number}", text)
        if expected is None:
            assert interpreterProblem(path) is None, text
        else:
            reason, advice = expected
            assert interpreterProblem(path) == (f"script {path!r} {reason}", advice), text


def test_relative_command_path_rejected(tmp_path: pathlib.Path) -> None:
    config = tmp_path / "harnesses.toml"
    config.write_text('[harnesses.local]\ncommand = ["./bin/agent"]\n')

    with pytest.raises(HarnessConfigError) as raised:
        parseHarnessFile(str(config))

    # Looked up from the daemon's folder but run from the session's, such a
    # path would name two different files.
    assert str(raised.value) == (
        f"{config}: [harnesses.local] command './bin/agent' is a relative path; give an"
        " absolute path, or a bare name to look up on the daemon's PATH"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[harnesses.typo]\ncommand = ["agent"]\nprompt_arg = ["--x", "{prompt}"]\n',
            "[harnesses.typo]: unknown key 'prompt_arg'; did you mean 'prompt_args'?",
        ),
        (
            '[harnesses.typo]\ncommand = ["agent"]\nenv = {}\n',
            "[harnesses.typo]: unknown key 'env'; the keys are command, prompt_args and label",
        ),
        (
            '[agent]\ncommand = ["agent"]\n',
            "unknown key 'agent'; each harness goes in a [harnesses.ID] table",
        ),
        (
            '[harness.typo]\ncommand = ["agent"]\n',
            "unknown key 'harness'; did you mean 'harnesses'?",
        ),
    ],
)
def test_unknown_key_rejected(tmp_path: pathlib.Path, text: str, message: str) -> None:
    config = tmp_path / "harnesses.toml"
    config.write_text(text)

    with pytest.raises(HarnessConfigError) as raised:
        parseHarnessFile(str(config))

    # A misspelled key would otherwise fall back to its default unnoticed,
    # such as prompt_args changing the harness's argv.
    assert str(raised.value) == f"{config}: {message}"


def test_home_relative_command_expanded(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    config = tmp_path / "harnesses.toml"
    config.write_text('[harnesses.mine]\ncommand = ["~/bin/agent", "--fast"]\n')

    [parsed] = parseHarnessFile(str(config))

    assert parsed.command == (f"{tmp_path}/bin/agent", "--fast")
