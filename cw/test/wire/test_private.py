"""Tests of cw.wire.private: the uses of Twisted's and ampoule's private names."""

from __future__ import annotations

from ampoule import main as ampoule_main
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
