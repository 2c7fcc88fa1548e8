"""
Tests of L{cw.core.config}: the options of each role exist once, the
launchers read a user's options by twistd's rules, and the README's option
tables say what the code does.
"""

from __future__ import annotations

import os
import re

from twisted.trial import unittest

from cw.core.config import MasterConfig, WorkerConfig, options, parse_argv
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
