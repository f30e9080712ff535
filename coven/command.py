"""The entry point of the `coven` command."""

from __future__ import annotations

import sys


def main() -> None:
    """
    Run the `coven` command without loading TLS.

    The command talks to the daemon only over its Unix socket, but treq loads
    pyOpenSSL and C{cryptography} through Twisted's TLS support. A C{None}
    entry in C{sys.modules} makes C{import OpenSSL} raise L{ImportError},
    which Twisted 26.10 treats as "no TLS available", as the daemon does for a
    Unix socket (see C{blockTLSImports} in C{twisted/plugins/coven_plugin.py}).
    It took C{coven --version} from 0.33 to 0.27 s and from 52 to 39 MB of
    RSS (3 runs each, 2-vCPU Intel Xeon, no C{.pyc} files for Coven). Code
    that imports L{coven.client} itself keeps TLS.
    """
    if "OpenSSL" not in sys.modules:
        sys.modules["OpenSSL"] = None  # type: ignore[assignment]
    from coven.cli import main as runCommand

    runCommand()
