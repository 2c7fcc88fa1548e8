"""
What several C{cw} subcommands share: the options that name a master and
how to reach it (C{cw status}, C{cw doctor}).

Layer rule (cw.cli): the top layer; may import any of cw, and nothing in cw imports it.
"""

from __future__ import annotations

import argparse


def add_master_options(parser: argparse.ArgumentParser, json_help: str, timeout_help: str) -> None:
    """
    Add C{--master}, C{--json}, C{--secret-file}, C{--insecure} and
    C{--timeout} (10 s by default; C{timeout_help} says what for) to
    C{parser}; C{json_help} says what C{--json} prints.
    """
    parser.add_argument(
        "--master",
        "-m",
        help="the master (HOST, HOST:PORT or an endpoint description); default: $CW_MASTER,"
        " the SLURM master, or localhost",
    )
    parser.add_argument("--json", action="store_true", help=json_help)
    parser.add_argument(
        "--secret-file", help="the shared secret (default $CW_SECRET_FILE or ~/.config/cw/secret)"
    )
    parser.add_argument("--insecure", action="store_true", help="for a master running --insecure")
    parser.add_argument("--timeout", type=float, default=10, help=f"{timeout_help} (default %(default)g)")
