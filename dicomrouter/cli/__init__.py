"""The `dicomrouter` command line: parse, call a service, print; errors become exit codes."""

from __future__ import annotations

from dicomrouter.cli.main import main

__all__ = ["main"]
