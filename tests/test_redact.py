"""Redaction of secret-shaped tokens: a corpus of secrets and of ordinary output."""

from __future__ import annotations

import os
import sys

import pytest
import pytest_twisted

from coven import redact
from coven.harnesses import HarnessSpec
from coven.redact import StreamRedactor, redactBytes
from coven.sessions import TITLE_LENGTH, defaultTitle

from .conftest import RunningDaemon, startDaemon
from .support import UnixClient, outputText, payload

# Each secret with the kind it must be reported as. None of these is a real
# credential: they only have the shape of one.
SECRETS = [
    (b"sk-abcdefghijklmnopqrstuvwxyz0123456789ABCD", "openai"),
    (b"sk-proj-Zx9_abcdefghijklmnopqrstuvwxyz-0123456789", "openai"),
    (b"sk-ant-api03-abcdefghijklmnopqrstuvwxyz0123456789-AAAA", "anthropic"),
    (b"ghp_abcdefghijklmnopqrstuvwxyz0123456789AB", "github"),
    (b"gho_abcdefghijklmnopqrstuvwxyz0123456789AB", "github"),
    (b"ghs_abcdefghijklmnopqrstuvwxyz0123456789AB", "github"),
    (b"github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz0123456789", "github"),
    (b"AKIAIOSFODNN7EXAMPLE", "aws-access-key-id"),
    (b"ASIAY34FZKBOKMUTVV7A", "aws-access-key-id"),
    (b"xoxb-123456789012-1234567890123-abcdefghijklmnopqrstuvwx", "slack"),
    (b"xoxp-123456789012-abcdefghij", "slack"),
    (
        b"eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4ifQ."
        b"SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c",
        "jwt",
    ),
    (
        b"-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA0Z3VS5JJcds3xfn\n/ygWyF8PbnGy0AHB7MhgHcTz6sE2I2y\n"
        b"-----END RSA PRIVATE KEY-----",
        "private-key",
    ),
    (
        b"-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ\n"
        b"-----END OPENSSH PRIVATE KEY-----",
        "private-key",
    ),
    (b"-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----", "private-key"),
]

# Secrets whose label stays: the part before the value is kept.
LABELLED = [
    (b"Authorization: Bearer abcdef0123456789abcdef", b"Authorization: Bearer [REDACTED:bearer]"),
    (b"authorization: bearer abc.def-ghi_jkl~mno", b"authorization: bearer [REDACTED:bearer]"),
    (b"password=hunter2hunter2", b"password=[REDACTED:assignment]"),
    (b"PASSWORD: 'correct horse'", b"PASSWORD: [REDACTED:assignment]"),
    (b"DB_PASSWORD='s3cr3tvalue'", b"DB_PASSWORD=[REDACTED:assignment]"),
    (b"GITHUB_TOKEN=abcdefgh12345678", b"GITHUB_TOKEN=[REDACTED:assignment]"),
    (b"token = \"abcd1234efgh\"", b"token = [REDACTED:assignment]"),
    (b"api_key: zyxwvutsrq", b"api_key: [REDACTED:assignment]"),
    (b"export SECRET=topsecretvalue", b"export SECRET=[REDACTED:assignment]"),
    (b"access-key=AbCdEfGh12", b"access-key=[REDACTED:assignment]"),
    (b"passwd:abcdefgh", b"passwd:[REDACTED:assignment]"),
]

# Output that looks a little like a secret but is not one, left alone.
ORDINARY = [
    b"hello world\r\n",
    b"Running 42 tests... ok\r\n",
    b"\x1b[38;5;245m\xe2\x94\x82\x1b[0m tokens used: 1,234\r\n",
    b"The password must be at least 8 characters.\r\n",
    b"Enter token:",
    b"sk-short",
    b"task-abcdefghijklmnopqrstuvwxyz0123456789",
    b"ghp_short",
    b"AKIA is a prefix, AKIAshort is not a key",
    b"see https://github.com/owner/repo/pull/12",
    b"def get_token(self) -> str:\n",
    b"if password == confirm:\n",
    b"eyJ is how base64 JSON starts",
    b"-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUQ\n-----END CERTIFICATE-----\n",
    b"Bearer tokens go in the Authorization header.",
    "café ünïcödé ✓ 日本語\r\n".encode("utf-8"),
    b"x" * 5000,
]


def feedInPieces(pieces: list[bytes]) -> bytes:
    redactor = StreamRedactor()
    output = b"".join(redactor.feed(piece) for piece in pieces)
    return output + redactor.flush(final=True)


@pytest.mark.parametrize("secret, kind", SECRETS)
def test_secret_redacted(secret: bytes, kind: str) -> None:
    text = b"before " + secret + b" after\r\n"

    redacted = redactBytes(text)

    assert redacted == b"before [REDACTED:" + kind.encode() + b"] after\r\n"


@pytest.mark.parametrize("text, expected", LABELLED)
def test_labelled_value_redacted(text: bytes, expected: bytes) -> None:
    assert redactBytes(text) == expected


@pytest.mark.parametrize("text", ORDINARY)
def test_ordinary_output_untouched(text: bytes) -> None:
    assert redactBytes(text) == text
    assert feedInPieces([text[: len(text) // 2], text[len(text) // 2 :]]) == text


@pytest.mark.parametrize("secret, kind", SECRETS)
def test_secret_split_anywhere(secret: bytes, kind: str) -> None:
    text = b"key: " + secret + b"\r\nnext line\r\n"
    expected = redactBytes(text)

    for cut in range(1, len(text)):
        assert feedInPieces([text[:cut], text[cut:]]) == expected, cut


@pytest.mark.parametrize("text, expected", LABELLED)
def test_labelled_split_anywhere(text: bytes, expected: bytes) -> None:
    line = text + b"\n"
    whole = redactBytes(line)

    for cut in range(1, len(line)):
        assert feedInPieces([line[:cut], line[cut:]]) == whole, cut


# A source file full of "=" and ":" with labelled secrets among them: more
# separators than the redactor looks back from, so it searches for the labels.
SOURCE_LIKE = b"".join(
    b"value_%d = compute(%d)  # ratio: %d:1\n" % (number, number, number) for number in range(40)
) + b"".join(text + b"\n" for text, _ in LABELLED)


def test_many_separators_still_redacted() -> None:
    assert SOURCE_LIKE.count(b"=") + SOURCE_LIKE.count(b":") > redact._MAX_SEPARATORS

    redacted = redactBytes(SOURCE_LIKE)

    for _, expected in LABELLED:
        assert expected in redacted
    assert b"value_39 = compute(39)  # ratio: 39:1\n" in redacted


@pytest.mark.parametrize(
    "text",
    [
        b"".join(text + b" ; " for text, _ in LABELLED),
        b"password    \t  =  hunter2hunter2 and token:: abcdefgh",
        b"xpassword=abcdefgh api_key=abcdefgh accesskey :abcdefgh my-secret=abcdefgh",
        SOURCE_LIKE,
        b"=:" * 40 + b"token=abcdefgh",
    ],
)
def test_separator_search_matches_label_search(text: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    # Looking back from each separator must find what searching for every
    # label word finds. A limit of 0 forces the label search.
    found = redactBytes(text)
    monkeypatch.setattr(redact, "_MAX_SEPARATORS", 0)

    assert redactBytes(text) == found


@pytest.mark.parametrize(
    "haystack",
    [b"", b"token", b"xtokentoken", b"a\0token\0key\0", b"bearer" * 3, SOURCE_LIKE.lower()],
)
def test_search_matches_bytes_find(haystack: bytes) -> None:
    searchable = redact._Searchable(haystack)

    for word in (b"token", b"key", b"bearer", b"\0k", b"tokentoken", b""):
        for start in range(len(haystack) + 2):
            assert searchable.find(word, start) == haystack.find(word, start), (word, start)


@pytest.mark.parametrize(
    "haystack",
    [b"", b"bearer", b"BEARER xBeArEr", b"xbearerbearer", b"beare", b"B\xc3\xa9arer bEARER", SOURCE_LIKE],
)
def test_folded_search_matches_lower_find(haystack: bytes) -> None:
    searchable = redact._Searchable(haystack)

    for start in range(len(haystack) + 2):
        assert searchable.findFolded(b"bearer", start) == haystack.lower().find(b"bearer", start), start


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc has memmem; other C libraries may not")
def test_memmem_loaded() -> None:
    # Without it the redactor still works (the next test), but slower.
    assert redact._memmem is not None


def test_same_redaction_without_memmem_or_strcasestr(monkeypatch: pytest.MonkeyPatch) -> None:
    texts = [secret for secret, _ in SECRETS] + [text for text, _ in LABELLED] + [SOURCE_LIKE]
    texts += [b"Authorization: BeArEr abcdef0123456789abcdef\0 and Bearer abcdef0123456789xyz"]
    texts += [b"Authorization: BeArEr abcdef0123456789abcdef and Bearer abcdef0123456789xyz"]
    withMemmem = [redactBytes(text) for text in texts]
    monkeypatch.setattr(redact, "_memmem", None)
    monkeypatch.setattr(redact, "_strcasestr", None)

    assert [redactBytes(text) for text in texts] == withMemmem
    for redacted in withMemmem[-2:]:
        assert b"BeArEr [REDACTED:bearer]" in redacted
        assert redacted.count(b"[REDACTED:bearer]") == 2


def test_key_block_held_until_end() -> None:
    redactor = StreamRedactor()

    first = redactor.feed(b"cat id_rsa\n-----BEGIN RSA PRIVATE KEY-----\nMIIEow")
    paused = redactor.flush(final=False)
    rest = redactor.feed(b"IBAAKCAQEA\n-----END RSA PRIVATE KEY-----\n$ ")

    assert first == b"cat id_rsa\n"
    assert paused == b""
    assert rest == b"[REDACTED:private-key]\n$ "


def test_unfinished_key_block_redacted_at_end() -> None:
    redactor = StreamRedactor()

    shown = redactor.feed(b"-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBg")
    final = redactor.flush(final=True)

    assert shown == b""
    assert final == b"[REDACTED:private-key]"


def test_corpus_size() -> None:
    # The corpus is part of the contract of this module: keep it growing.
    assert len(SECRETS) + len(LABELLED) >= 25
    assert len(ORDINARY) >= 15


@pytest_twisted.ensureDeferred
async def test_session_output_redacted(daemon: RunningDaemon) -> None:
    secret = SECRETS[0][0]
    pieces = [b"key " + secret[:10], secret[10:] + b" done\n"]
    session = await daemon.client.launch(
        daemon.project, "pieces " + " ".join(piece.hex() for piece in pieces)
    )
    await daemon.client.waitForOutput(session["id"], "key ")

    await daemon.client.post(f"/api/v1/sessions/{session['id']}/input", {"data": "next\n"})
    events = await daemon.client.waitForExit(session["id"])

    text = outputText(events)
    assert text == "key [REDACTED:openai] done\n"
    assert secret.decode() not in "".join(event["payload_json"] for event in events)


@pytest_twisted.ensureDeferred
async def test_input_redacted_but_delivered(daemon: RunningDaemon) -> None:
    secret = SECRETS[3][0].decode()
    session = await daemon.client.launch(daemon.project, "lengths")
    await daemon.client.waitForOutput(session["id"], "ready")

    await daemon.client.post(f"/api/v1/sessions/{session['id']}/input", {"data": f"token={secret}\n"})
    await daemon.client.waitForOutput(session["id"], "length")
    await daemon.client.post(f"/api/v1/sessions/{session['id']}/input", {"data": "quit\n"})
    events = await daemon.client.waitForExit(session["id"])

    inputs = [payload(event)["data"] for event in events if event["kind"] == "input"]
    assert inputs[0] == "token=[REDACTED:assignment]\n"
    # The harness got the whole secret: its length is that of the original line.
    assert f"length {len('token=' + secret)}" in outputText(events)


@pytest_twisted.ensureDeferred
async def test_titles_redacted(daemon: RunningDaemon) -> None:
    fromPrompt = await daemon.client.launch(daemon.project, "print password=hunter2hunter2")
    withTitle = await daemon.client.launch(daemon.project, "exit", title="deploy with token=abcd1234efgh")
    await daemon.client.waitForExit(fromPrompt["id"])
    await daemon.client.waitForExit(withTitle["id"])

    status, sessions = await daemon.client.get("/api/v1/sessions")

    assert status == 200
    titles = {session["id"]: session["title"] for session in sessions}
    assert fromPrompt["title"] == "print password=[REDACTED:assignment]"
    assert titles[fromPrompt["id"]] == "print password=[REDACTED:assignment]"
    assert withTitle["title"] == "deploy with token=[REDACTED:assignment]"
    assert titles[withTitle["id"]] == "deploy with token=[REDACTED:assignment]"


TITLE_HARNESS = HarnessSpec(id="fake", label="Fake", command=("fake",), prompt_args=("{prompt}",))


def test_default_title_redacted_before_cut() -> None:
    # The key starts before the 80th character and ends after it. If the line
    # were cut first, its first 6 characters would be too short to look like
    # a key and would be kept.
    prompt = "x" * 70 + " sk-A1b2C3d4E5f6G7h8I9j0K1l2\nsecond line"

    title = defaultTitle(prompt, TITLE_HARNESS, redact=True)

    assert title == ("x" * 70 + " [REDACTED:openai]")[:TITLE_LENGTH]
    assert "A1b2" not in title
    assert defaultTitle(prompt, TITLE_HARNESS) == prompt[:TITLE_LENGTH]


@pytest.mark.parametrize(
    "prompt, leaked",
    [
        # Line breaks of str.splitlines that the byte patterns take as part of
        # the value.
        ("password=hun\x85ter2hunter2", "hun"),
        ("password=hun\u2028ter2hunter2", "hun"),
        ("token=abc\x1cdefghijkl", "abc"),
        # A key block that starts on the first line and ends on another.
        ("-----BEGIN RSA PRIVATE KEY-----MIIEowIBAAKCAQEA0Z3VS5JJcds3xfn\n-----END RSA PRIVATE KEY-----", "MIIE"),
    ],
)
def test_default_title_redacted_across_lines(prompt: str, leaked: str) -> None:
    title = defaultTitle(prompt, TITLE_HARNESS, redact=True)

    assert "[REDACTED:" in title
    assert leaked not in title


@pytest_twisted.ensureDeferred
async def test_redaction_switched_off(home: str) -> None:
    covenHome = os.path.join(home, "coven")
    os.makedirs(covenHome, mode=0o700)
    with open(os.path.join(covenHome, "coven.toml"), "w") as file:
        file.write("[redaction]\nenabled = false\n")
    project = os.path.join(home, "project")
    os.makedirs(project)
    secret = SECRETS[0][0].decode()
    service = await startDaemon(covenHome)
    try:
        client = UnixClient(service.socketPath)
        session = await client.launch(project, f"print {secret}")
        events = await client.waitForExit(session["id"])
    finally:
        await service.stopService()

    assert outputText(events) == f"{secret}\r\n"
    assert session["title"] == f"print {secret}"
