"""
Running a twistd plugin (cw-master, cw-worker) in this process.

Layer rule (cw.launch): imports cw.client, cw.master, cw.worker and below; never cw.cli.
"""

from __future__ import annotations

import sys

from twisted.scripts.twistd import run


def run_twistd(tapname: str, argv: list[str]) -> None:
    """Run C{twistd -n TAPNAME ARGV...} in this process (no pidfile)."""
    sys.argv = ["twistd", "--nodaemon", "--pidfile=", tapname, *argv]
    run()
