"""Harness registry: built-in coding-agent CLIs, user entries from harnesses.toml, argv building."""

from __future__ import annotations

import difflib
import os
import re
import shutil
import stat
import tomllib
from typing import Any

import attrs
from twisted.logger import Logger

log = Logger()

PROMPT_PLACEHOLDER = "{prompt}"
HARNESS_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@attrs.frozen
class HarnessSpec:
    """
    How to run one harness.

    @ivar id: the id clients pass as C{harness}.
    @ivar label: a name for people.
    @ivar command: the executable and its fixed arguments; the executable is
        looked up on C{PATH} unless it contains a slash.
    @ivar prompt_args: arguments after C{command}, in which every C{{prompt}} is
        replaced by the prompt, so the prompt is always part of one argv element.
    """

    id: str
    label: str
    command: tuple[str, ...]
    prompt_args: tuple[str, ...]

    def argv(self, prompt: str) -> list[str]:
        """
        Build the argv for C{prompt}; nothing here goes through a shell.
        """
        return [*self.command, *(arg.replace(PROMPT_PLACEHOLDER, prompt) for arg in self.prompt_args)]

    def resolveExecutable(self, path: str | None) -> str | None:
        """
        Return the absolute path of the executable found on C{path}, or the
        command itself when it is a path (harnesses.toml accepts only
        absolute ones), or C{None}.
        """
        return shutil.which(self.command[0], path=path)

    def _missingKind(self) -> tuple[str, str]:
        """
        Return why L{resolveExecutable} found no executable, as a kind
        (C{"path"}, C{"absent"}, C{"unreachable"}, C{"unusable"},
        C{"folder"} or C{"mode"}) and, for C{"unusable"}, the system's error.
        A command with a slash is a file path, never looked up on C{PATH}.
        """
        command = self.command[0]
        if os.sep not in command:
            return "path", ""
        try:
            status = os.stat(command)
        except FileNotFoundError:
            return "absent", ""
        except PermissionError:
            return "unreachable", ""
        except OSError as error:
            return "unusable", error.strerror or str(error)
        if stat.S_ISDIR(status.st_mode):
            return "folder", ""
        return "mode", ""

    def missingReason(self, where: str = "the daemon's PATH") -> str:
        """
        Return why L{resolveExecutable} found no executable.

        @param where: the C{PATH} searched, as the message should name it.
        """
        command = self.command[0]
        kind, error = self._missingKind()
        reasons = {
            "path": f"executable {command!r} was not found on {where}",
            "absent": f"executable {command!r} does not exist",
            "unreachable": (
                f"executable {command!r} cannot be reached: a folder on its path denies"
                " search permission"
            ),
            "unusable": f"executable {command!r} cannot be used: {error}",
            "folder": f"{command!r} is a folder, not an executable file",
            "mode": f"{command!r} is not executable by the daemon's user",
        }
        return reasons[kind]

    def missingAdvice(self, configPath: str, path: str) -> str:
        """
        Return what to do about the missing executable that
        L{missingReason} explains.

        @param configPath: the harnesses.toml that sets commands.
        @param path: the C{PATH} the daemon searched.
        """
        kind, _ = self._missingKind()
        if kind == "path":
            return (
                f"Install it in a folder on that PATH ({path}), or set its command in"
                f" {configPath}. A different PATH takes a restart of the daemon."
            )
        if kind == "mode":
            return (
                f"Make that file executable, or set the harness's command in {configPath}"
                " to one that is."
            )
        return f"Set the harness's command in {configPath} to an executable file."


# The bytes of a script's first line that Linux reads for its interpreter
# (BINPRM_BUF_SIZE in the kernel headers, <linux/binfmts.h>).
_SCRIPT_HEADER_BYTES = 256


def interpreterProblem(executable: str) -> tuple[str, str] | None:
    """
    Return why the kernel cannot start C{executable}, a script, because of the
    interpreter its first line names, with what to do about it, or C{None}.

    C{execve} then fails as if the script were missing, so only this check
    can name the file that is missing. Twisted's PTY child reports such a
    failure as a Python traceback in the session's output, after the launch
    succeeded.
    As Linux does, the line ends at a newline or a NUL byte and the
    interpreter's path at a space or a tab, so a script with Windows line
    endings passes a carriage return to its interpreter. Only an absolute
    interpreter path is checked, since the kernel resolves a relative one
    against the harness's working folder.
    """
    try:
        with open(executable, "rb") as file:
            header = file.read(_SCRIPT_HEADER_BYTES)
    except OSError:
        # A binary may be executable without being readable. The kernel
        # reports anything else when the harness starts.
        return None
    if not header.startswith(b"#!"):
        return None
    line = header[2:].split(b"\n", 1)[0].split(b"\0", 1)[0]
    script = f"script {executable!r}"
    if line.endswith(b"\r"):
        # The carriage return ends the interpreter's path or its argument,
        # as in "/usr/bin/env node\r", and either then fails.
        return (
            f"{script} has Windows line endings, so its first line passes a carriage return"
            " to its interpreter",
            "Convert the script to Unix line endings, as with dos2unix.",
        )
    name = re.split(rb"[ \t]", line.lstrip(b" \t"), maxsplit=1)[0]
    if not name:
        return (
            f"{script} has no interpreter after the #! on its first line",
            "Add the interpreter's path after the #!.",
        )
    interpreter = os.fsdecode(name)
    if not os.path.isabs(interpreter):
        return None
    names = f"{script} names the interpreter {interpreter!r} on its first line"
    if not os.path.exists(interpreter):
        return f"{names}, which does not exist", "Install that interpreter, or change the script's first line."
    if os.path.isdir(interpreter) or not os.access(interpreter, os.X_OK):
        return (
            f"{names}, which is not an executable file",
            "Make that file executable, or change the script's first line.",
        )
    return None


BUILTIN_HARNESSES = (
    HarnessSpec("codex", "Codex CLI", ("codex",), ("--", PROMPT_PLACEHOLDER)),
    HarnessSpec("claude", "Claude Code", ("claude",), ("--", PROMPT_PLACEHOLDER)),
    HarnessSpec("copilot", "Copilot CLI", ("copilot",), (f"--interactive={PROMPT_PLACEHOLDER}",)),
)


class HarnessConfigError(Exception):
    """
    C{harnesses.toml} could not be used; the message names the file and, where
    known, the line.
    """


# The keys of a [harnesses.ID] table.
HARNESS_KEYS = ("command", "prompt_args", "label")


def _rejectUnknownKeys(table: dict[str, Any], known: tuple[str, ...], where: str, expected: str) -> None:
    """
    Raise for the first key of C{table} not in C{known}, so a misspelled key
    is not silently ignored in favour of a default.
    """
    for key in table:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            advice = f"did you mean {close[0]!r}?" if close else expected
            raise HarnessConfigError(f"{where}: unknown key {key!r}; {advice}")


def _stringList(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise HarnessConfigError(f"{where} must be a list of strings")
    return tuple(value)


def parseHarnessFile(path: str) -> list[HarnessSpec]:
    """
    Read the C{[harnesses.ID]} tables of the TOML file at C{path}.

    @raise HarnessConfigError: the file is not valid TOML or an entry is invalid.
    """
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except tomllib.TOMLDecodeError as error:
        raise HarnessConfigError(f"{path}: invalid TOML: {error}") from error
    except (OSError, UnicodeDecodeError) as error:
        raise HarnessConfigError(f"{path}: cannot be read: {error}") from error

    _rejectUnknownKeys(document, ("harnesses",), path, "each harness goes in a [harnesses.ID] table")
    tables = document.get("harnesses", {})
    if not isinstance(tables, dict):
        raise HarnessConfigError(f"{path}: 'harnesses' must be a table of [harnesses.ID] tables")

    specs = []
    for harnessId, table in tables.items():
        where = f"{path}: [harnesses.{harnessId}]"
        if not HARNESS_ID.match(harnessId):
            raise HarnessConfigError(
                f"{where}: invalid id; use letters, digits, '.', '_' or '-', at most 64"
            )
        if not isinstance(table, dict):
            raise HarnessConfigError(f"{where} must be a table")
        _rejectUnknownKeys(table, HARNESS_KEYS, where, "the keys are command, prompt_args and label")
        command = _stringList(table.get("command"), f"{where} command")
        if not command or not command[0]:
            raise HarnessConfigError(f"{where} command must name an executable")
        executable = os.path.expanduser(command[0])
        # A relative path would be looked up from the daemon's folder but run
        # from the session's, so it is rejected.
        if os.sep in executable and not os.path.isabs(executable):
            raise HarnessConfigError(
                f"{where} command {command[0]!r} is a relative path; give an absolute path,"
                " or a bare name to look up on the daemon's PATH"
            )
        command = (executable, *command[1:])
        promptArgs = _stringList(table.get("prompt_args", [PROMPT_PLACEHOLDER]), f"{where} prompt_args")
        label = table.get("label", harnessId)
        if not isinstance(label, str):
            raise HarnessConfigError(f"{where} label must be a string")
        specs.append(HarnessSpec(harnessId, label, command, promptArgs))
    return specs


class HarnessRegistry:
    """
    The harnesses this daemon can launch: the built-ins, overridden or extended
    by C{<home>/harnesses.toml}.

    The file is read again when it changes, so an edit takes effect at the next
    launch without a restart. An invalid file leaves the built-ins in force and
    is reported in L{configError}.
    """

    def __init__(self, configPath: str) -> None:
        self.configPath = configPath
        self.configError: str | None = None
        self._specs: dict[str, HarnessSpec] = {}
        self._loadedStamp: tuple[int, int] | None = None
        self.reload()

    def _stamp(self) -> tuple[int, int] | None:
        try:
            stat = os.stat(self.configPath)
        # A home that is not a folder has no harness file either.
        except (FileNotFoundError, NotADirectoryError):
            return None
        return (stat.st_mtime_ns, stat.st_size)

    def reload(self) -> None:
        """
        Read C{harnesses.toml} again, if it exists.
        """
        specs = {spec.id: spec for spec in BUILTIN_HARNESSES}
        self._loadedStamp = self._stamp()
        self.configError = None
        if self._loadedStamp is not None:
            try:
                for spec in parseHarnessFile(self.configPath):
                    specs[spec.id] = spec
            except HarnessConfigError as error:
                self.configError = str(error)
                log.error(
                    "Ignoring harness configuration, using the built-in harnesses: {error}",
                    error=self.configError,
                )
        self._specs = specs

    def _reloadIfChanged(self) -> None:
        if self._stamp() != self._loadedStamp:
            self.reload()

    def get(self, harnessId: str) -> HarnessSpec | None:
        self._reloadIfChanged()
        return self._specs.get(harnessId)

    def all(self) -> list[HarnessSpec]:
        self._reloadIfChanged()
        return sorted(self._specs.values(), key=lambda spec: spec.id)
