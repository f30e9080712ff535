"""coven.toml: daemon settings and how invalid files are reported."""

from __future__ import annotations

import pathlib

import pytest

from coven.settings import Settings, loadSettings


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", Settings(redact=True)),
        ("[redaction]\nenabled = false\n", Settings(redact=False)),
        ("[redaction]\nenabled = true\n", Settings(redact=True)),
    ],
)
def test_valid_settings_read(tmp_path: pathlib.Path, text: str, expected: Settings) -> None:
    path = tmp_path / "coven.toml"
    path.write_text(text)

    assert loadSettings(str(path)) == expected


def test_missing_file_gives_defaults(tmp_path: pathlib.Path) -> None:
    assert loadSettings(str(tmp_path / "coven.toml")) == Settings()


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("[redaction]\nenable = false\n", "[redaction] unknown key 'enable'; did you mean 'enabled'?"),
        ("[redaction]\nstrict = true\n", "[redaction] unknown key 'strict'; the only key is enabled"),
        ("[redacton]\nenabled = false\n", "unknown key 'redacton'; did you mean 'redaction'?"),
        ("[logging]\nlevel = 1\n", "unknown key 'logging'; the only table is [redaction]"),
        ("redaction = false\n", "redaction must be a table, [redaction]"),
        ('[redaction]\nenabled = "no"\n', "[redaction] enabled must be true or false"),
    ],
)
def test_invalid_settings_keep_redaction_on(tmp_path: pathlib.Path, text: str, error: str) -> None:
    path = tmp_path / "coven.toml"
    path.write_text(text)

    settings = loadSettings(str(path))

    # A file that was meant to turn redaction off but cannot be used leaves it on.
    assert settings.redact is True
    assert settings.error == f"{path}: {error}"


def test_invalid_toml_reported(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "coven.toml"
    path.write_text("[redaction\n")

    settings = loadSettings(str(path))

    assert settings.redact is True
    assert settings.error is not None
    assert settings.error.startswith(f"{path}: cannot be used: ")
