"""
Tests of L{cw.core.config}: the options of each role exist once, the
launchers read a user's options by twistd's rules, and the README's option
tables say what the code does.
"""

from __future__ import annotations

import os
import re

from twisted.trial import unittest

from cw.core.config import MasterConfig, SlurmConfig, WorkerConfig, options, parse_argv
from cw.errors import CWError, OptionError
from cw.test.procs import ROOT


def readme_table(role: str) -> list[tuple[str, str]]:
    """The rows (option, default) of the README's table of C{role}'s options."""
    with open(os.path.join(ROOT, "README.rst")) as f:
        lines = f.read().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith(f"{role} option "))
    border = lines[header - 1]
    # Column starts: after each run of "=" and its two spaces.
    starts = [m.start() for m in re.finditer(r"=+", border)]
    rows = []
    for line in lines[header + 2 :]:
        if line.startswith("="):
            break
        option = re.match(r"``--([a-z-]+)``", line).group(1)
        rows.append((option, line[starts[1] : starts[2]].strip()))
    return rows


def _number(text: str) -> float | None:
    """C{text} as a number if it is one ("10,000,000", "4 GiB", "0.05"), else None."""
    m = re.fullmatch(r"([\d.,]+)( GiB| MiB)?", text)
    if m is None:
        return None
    scale = {None: 1, " GiB": 1 << 30, " MiB": 1 << 20}[m.group(2)]
    return float(m.group(1).replace(",", "")) * scale


class ReadmeTests(unittest.TestCase):
    def check(self, config: type, role: str) -> None:
        rows = readme_table(role)
        documented = [name for name, _ in rows]
        expected = [o.long for o in options(config)]
        self.assertEqual(sorted(documented), sorted(expected), f"the README's {role} options")
        self.assertEqual(len(documented), len(set(documented)), f"an option twice in {role}'s table")
        defaults = dict(rows)
        for o in options(config):
            self.assertEqual(defaults[o.long], o.doc_default, f"{role} --{o.long}'s default in the README")
            number = _number(o.doc_default)
            if o.default is not None and number is not None:
                self.assertEqual(
                    number, o.default, f"{role} --{o.long}: {o.doc_default!r} is not the default"
                )

    def test_master_options(self):
        """Every cw-master option is in the README's table, with its default."""
        self.check(MasterConfig, "cw-master")

    def test_worker_options(self):
        """Every cw-worker option is in the README's table, with its default."""
        self.check(WorkerConfig, "cw-worker")


class ParseTests(unittest.TestCase):
    """L{parse_argv}: one reading of a user's options for every launcher."""

    def test_forms(self):
        """'--opt value', '--opt=value', a unique prefix and short options all count."""
        for argv in (
            ["--secret-file", "/s", "--prefetch", "2", "-p", "tcp:1"],
            ["--secret-file=/s", "--prefetch=2", "-ptcp:1"],
            ["--secret=/s", "--prefetch", "2", "--port=tcp:1"],
        ):
            given, rest = parse_argv(MasterConfig, argv, "cw-master")
            self.assertEqual(given, {"secret_file": "/s", "prefetch": 2, "port": "tcp:1"}, argv)
            self.assertEqual(rest, [])

    def test_flags_and_positional(self):
        """Flags take no value; a worker's HOST may stand anywhere."""
        given, rest = parse_argv(WorkerConfig, ["node1", "--insecure", "--procs=3"], "cw-worker")
        self.assertEqual(given, {"insecure": True, "procs": 3})
        self.assertEqual(rest, ["node1"])
        self.assertEqual(parse_argv(WorkerConfig, [], "cw-worker"), ({}, []))

    def test_errors(self):
        """An unknown option or a bad value: an error naming it (a CWError, for the CLIs)."""
        e = self.assertRaises(OptionError, parse_argv, MasterConfig, ["--prefech", "2"], "cw-master")
        self.assertIn("prefech", str(e))
        self.assertIn("cw-master", str(e))
        e = self.assertRaises(OptionError, parse_argv, WorkerConfig, ["--procs=many"], "cw-worker")
        self.assertIn("--procs", str(e))
        self.assertIn("'many'", str(e))
        self.assertIsInstance(e, CWError)
        self.assertRaises(OptionError, parse_argv, MasterConfig, ["--insecure=yes"], "cw-master")

    def test_fields(self):
        """Each option's type and default come from its field."""
        by_name = {o.long: o for o in options(MasterConfig)}
        self.assertEqual((by_name["prefetch"].kind, by_name["prefetch"].default), (int, 1))
        self.assertEqual(by_name["port"].short, "p")
        self.assertIs(by_name["insecure"].kind, bool)
        self.assertEqual(WorkerConfig().master_timeout, 30.0)


class CheckTests(unittest.TestCase):
    """
    The values' checks live in the config dataclasses (L{cw.core.config.Checked}):
    one line naming the option, wherever the config is made.
    """

    def test_master_checks(self):
        for changes, message in [
            ({"max_pending": 0}, "--max-pending must be at least 1"),
            ({"max_pending_per_address": 0}, "--max-pending-per-address must be at least 1"),
            ({"max_attempts": 0}, "--max-attempts must be at least 1"),
            ({"max_unsent_bytes": 0}, "--max-unsent-bytes and --client-read-timeout must be positive"),
            ({"client_read_timeout": 0.0}, "--max-unsent-bytes and --client-read-timeout must be positive"),
            ({"max_queued_jobs": 0}, "--max-queued-bytes and --max-queued-jobs must be at least 1"),
            ({"prefetch_seconds": -1.0}, "--prefetch and --prefetch-seconds must not be negative"),
            ({"stall_timeout": -1.0}, "--stall-timeout must not be negative"),
            ({"heartbeat": -1.0}, "--heartbeat must not be negative"),
            ({"web_open": True}, "--web-open needs --web"),
            ({"web_host": "a"}, "--web-host needs --web"),
        ]:
            e = self.assertRaises(OptionError, MasterConfig, **changes)
            self.assertEqual(str(e), message)
        MasterConfig(web="tcp:0", web_open=True, heartbeat=0.0, max_pending=1)

    def test_worker_checks(self):
        e = self.assertRaises(OptionError, WorkerConfig, procs=0)
        self.assertEqual(str(e), "--procs must be at least 1")
        WorkerConfig(procs=1)

    def test_slurm_checks(self):
        e = self.assertRaises(OptionError, SlurmConfig, walltime_warning=-1)
        self.assertEqual(str(e), "--walltime-warning must not be negative")
        SlurmConfig(walltime_warning=0, wait=0.0)

    def test_launchers_check_too(self):
        """parse_argv, which the launchers use, fails on a bad value before anything starts."""
        e = self.assertRaises(OptionError, parse_argv, MasterConfig, ["--max-attempts=0"], "cw-master")
        self.assertEqual(str(e), "cw-master: --max-attempts must be at least 1")
        e = self.assertRaises(OptionError, parse_argv, WorkerConfig, ["--procs", "0"], "cw-worker")
        self.assertEqual(str(e), "cw-worker: --procs must be at least 1")

    def test_repeatable(self):
        """A tuple field is an option that may be given again and again."""
        given, _ = parse_argv(SlurmConfig, ["--Xworkers", "--mem=4G", "--Xworkers=-A", "start"], "cw-slurm")
        self.assertEqual(given, {"x_workers": ("--mem=4G", "-A")})
