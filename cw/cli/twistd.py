"""
The C{cw-master} and C{cw-worker} commands (and C{python -m cw.master},
C{python -m cw.worker}): twistd in this process with the role's plugin.

Layer rule (cw.cli): the top layer; may import any of cw, and nothing in cw imports it.
"""

from __future__ import annotations

import sys

from cw.launch.twistd import run_twistd


def master_main(argv: list[str] | None = None) -> None:
    """C{cw-master [OPTIONS]}: see C{cw-master --help}."""
    run_twistd("cw-master", sys.argv[1:] if argv is None else argv)


def worker_main(argv: list[str] | None = None) -> None:
    """C{cw-worker [OPTIONS] [HOST]}: see C{cw-worker --help}."""
    run_twistd("cw-worker", sys.argv[1:] if argv is None else argv)
