import pytest_twisted

from .support import outputText


@pytest_twisted.ensureDeferred
async def test_launch_records_output(daemon):
    session = await daemon.client.launch(daemon.project, "print hello world")
    events = await daemon.client.waitForExit(session["id"])
    assert outputText(events) == "hello world\r\n"
