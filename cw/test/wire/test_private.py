"""Tests of cw.wire.private: the uses of Twisted's and ampoule's private names."""

from __future__ import annotations

import pathlib
import re

from ampoule import main as ampoule_main
from twisted.protocols import amp
from twisted.trial import unittest

from cw.wire import private


class JobBootstrapTests(unittest.TestCase):
    """The job process's bootstrap is ampoule's, edited, or nothing at all."""

    def test_edited(self):
        text = private.job_bootstrap("PREFIX = 1\n")
        self.assertTrue(text.startswith("PREFIX = 1\n"))
        self.assertIn("LogLevel.warn", text)
        self.assertNotIn("LogLevel.info", text)
        self.assertIn("redirectStandardIO=False", text)

    def test_changed_ampoule_text_fails_loudly(self):
        """If ampoule's bootstrap no longer holds what cw edits, starting job processes fails, saying why."""
        self.patch(
            ampoule_main, "BOOTSTRAP", ampoule_main.BOOTSTRAP.replace("LogLevel.info", "LogLevel.debug")
        )
        with self.assertRaises(RuntimeError) as caught:
            private.job_bootstrap("")
        self.assertIn("'LogLevel.info'", str(caught.exception))


class PrivateNamesTests(unittest.TestCase):
    """Twisted's and ampoule's private names appear in cw.wire.private only."""

    #: Modules allowed a private name, besides cw.wire.private (the exception
    #: its docstring names).
    EXCEPTIONS = {("_catchUp", "worker/pool.py")}

    def test_only_in_private(self):
        """
        No module of cw but cw.wire.private (and the tests) names one of
        L{private.PRIVATE_NAMES}: a new use outside it fails here.
        """
        root = pathlib.Path(private.__file__).resolve().parent.parent
        found = []
        for path in sorted(root.rglob("*.py")):
            relative = path.relative_to(root).as_posix()
            if relative.startswith("test/") or relative == "wire/private.py":
                continue
            text = path.read_text(encoding="utf-8")
            for name in private.PRIVATE_NAMES:
                if (name, relative) not in self.EXCEPTIONS and re.search(rf"\b{name}\b", text):
                    found.append(f"{name} in cw/{relative}")
        self.assertEqual(found, [])

    def test_names_are_private(self):
        """Each listed name is one Twisted or ampoule still has (else the list is stale)."""
        import inspect

        from ampoule import pool
        from twisted.internet import endpoints

        sources = "".join(inspect.getsource(module) for module in (amp, endpoints, pool, ampoule_main))
        for name in private.PRIVATE_NAMES:
            self.assertRegex(sources, rf"\b{name}\b")
