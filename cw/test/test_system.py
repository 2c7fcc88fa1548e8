"""
Tests for L{cw.system}: the operating-system helpers the layers share.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from twisted.trial import unittest

from cw import system


class WriteAtomicallyTests(unittest.TestCase):
    def test_writes_and_leaves_no_temporary_file(self):
        directory = Path(self.mktemp())
        directory.mkdir()
        path = directory / "master.address"
        path.write_text("old\n")
        system.write_atomically(path, "new\n", tmp_suffix=".node7")
        self.assertEqual(path.read_text(), "new\n")
        self.assertEqual([p.name for p in directory.iterdir()], ["master.address"])


class ProcStatTests(unittest.TestCase):
    def test_own_process(self):
        fields = system.proc_stat(os.getpid())
        self.assertEqual(fields[0], "R")
        self.assertEqual(int(fields[1]), os.getppid())
        self.assertEqual(system.start_time(os.getpid()), fields[19])

    def test_command_name_with_parenthesis_and_spaces(self):
        """The fields after a command name holding ") " are still found."""
        code = "import sys; open('/proc/self/comm', 'w').write('a) b (c'); print(flush=1); sys.stdin.read()"
        child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.addCleanup(child.wait, 10)
        self.addCleanup(child.stdin.close)
        self.addCleanup(child.stdout.close)
        child.stdout.readline()  # the name is set
        self.assertEqual(Path(f"/proc/{child.pid}/comm").read_text(), "a) b (c\n")
        fields = system.proc_stat(child.pid)
        self.assertEqual(int(fields[1]), os.getpid())
        self.assertIn(fields[0], "RS")

    def test_gone(self):
        child = subprocess.Popen(["true"])
        child.wait()
        self.assertIsNone(system.proc_stat(child.pid))
        self.assertIsNone(system.start_time(child.pid))
        system.sigkill(child.pid)  # gone: ignored
        system.sigkill(child.pid, group=True)


class PollingTests(unittest.TestCase):
    def test_delays_grow_to_the_most(self):
        slept: list[float] = []
        self.patch(system.time, "sleep", slept.append)
        for attempt in system.polling(0.01, 0.05):
            if attempt == 5:
                break
        self.assertEqual([round(d, 6) for d in slept], [0.01, 0.02, 0.04, 0.05, 0.05])


class PythonPathTests(unittest.TestCase):
    def test_cw_first_once(self):
        path = os.pathsep.join(["/x", system.CW_ROOT, "", "/x"])
        env = system.with_cw_on_path({"PYTHONPATH": path, "A": "1"})
        self.assertEqual(env["PYTHONPATH"], os.pathsep.join([system.CW_ROOT, "/x"]))
        self.assertEqual(env["A"], "1")
        self.assertTrue(os.path.isdir(os.path.join(system.CW_ROOT, "cw")))
        self.assertEqual(system.with_cw_on_path({})["PYTHONPATH"], system.CW_ROOT)
