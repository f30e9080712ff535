"""Coven: a per-user daemon that runs coding-agent CLIs in pseudo-terminals."""

__version__ = "0.1.0"
