"""How many glibc malloc arenas the daemon's threads use, in a fresh interpreter."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

# Start threads that allocate at the same time, then count the arenas in
# glibc's malloc_info report.
SCRIPT = """
import ctypes, sys, tempfile, threading
from coven.service import limitMallocArenas

if sys.argv[1] == "limit":
    assert limitMallocArenas()
barrier = threading.Barrier(4)

def allocate():
    barrier.wait()
    blocks = [bytearray(1024) for _ in range(10000)]
    barrier.wait()

threads = [threading.Thread(target=allocate) for _ in range(4)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
libc = ctypes.CDLL("libc.so.6")
libc.fopen.restype = ctypes.c_void_p
with tempfile.NamedTemporaryFile() as report:
    stream = libc.fopen(report.name.encode(), b"w")
    libc.malloc_info(0, ctypes.c_void_p(stream))
    libc.fclose(ctypes.c_void_p(stream))
    print(open(report.name).read().count("<heap nr="))
"""

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def arenasUsed(mode: str) -> int:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc arenas are glibc's")
def test_limit_keeps_threads_in_one_arena():
    assert arenasUsed("default") > 1
    assert arenasUsed("limit") == 1
