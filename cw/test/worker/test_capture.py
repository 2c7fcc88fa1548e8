"""
The job process's output capture (L{cw.worker.capture.OutputCapture}) in a
process of its own (it takes over fd 1 and 2): where the output waits
while a job runs, that a full C{$TMPDIR} cannot make a job's writes fail,
that what a long job writes is freed as it goes, and that nothing is left
behind.  Each script reports on the capture's own log descriptor (the
stderr it had before), as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from twisted.internet import threads
from twisted.trial import unittest

from cw.test.procs import DEADLINE, almost_full_tmpdir, can_mount, child_env, run_script

#: Shared by the scripts: a capture of this process's fd 1 and 2, and
#: report(), which writes its JSON where the test reads it.
PRELUDE = """
import json, os, sys, time
from cw.worker.capture import OutputCapture

capture = OutputCapture(1 << 20)

def report(**fields):
    os.write(capture.worker_err, json.dumps(fields).encode() + b"\\n")
"""

#: A script: write 100 KB to fd 1 with print() and os.write(); report how
#: each went, what fd 1 is, and what the capture took.
WRITE_100K = """
outcome = []
try:
    print("x" * 50_000, flush=True)
    outcome.append("print ok")
except OSError as e:
    outcome.append(f"print: {e}")
try:
    os.write(1, b"y" * 50_000)
    outcome.append("os.write ok")
except OSError as e:
    outcome.append(f"os.write: {e}")
out, err = capture.take()
report(outcome=outcome, fd1=os.readlink("/proc/self/fd/1"), took=len(out), listing=os.listdir(sys.argv[1]))
"""

#: A script: write 64 MiB to fd 1, 8 MiB at a time, each time waiting
#: (30 s at most) until the file holds less than 4 MiB; report whether
#: every wait ended so (it stops at the first that does not), and what the
#: capture took.
WRITE_64M = """
line = b"z" * 4095 + b"\\n"
freed = []
for step in range(8):
    for _ in range(2048):
        os.write(1, line)
    deadline = time.monotonic() + 30
    while os.fstat(1).st_blocks * 512 >= 4 << 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    freed.append(os.fstat(1).st_blocks * 512 < 4 << 20)
    if not freed[-1]:
        break
out, err = capture.take()
marker, _, rest = out.partition(b"\\n")
size = os.fstat(1).st_size
report(freed=freed, marker=marker.decode(), kept=len(rest), intact=rest == line * 256, size=size)
"""


class CaptureTests(unittest.TestCase):
    timeout = 120

    def script(self, body: str, *args: str, env: dict | None = None) -> dict:
        result = run_script(self, PRELUDE + body, *args, env=env)
        self.assertEqual(result.returncode, 0, result.stderr)
        return json.loads(result.stderr.splitlines()[-1])

    def test_in_memory_files(self):
        """A job process's fd 1 and 2 are anonymous memory files: nothing of them is in $TMPDIR."""
        tmpdir = os.path.abspath(self.mktemp())
        os.makedirs(tmpdir)

        def body():
            report = self.script(WRITE_100K, tmpdir, env={"TMPDIR": tmpdir})
            self.assertEqual(report["outcome"], ["print ok", "os.write ok"])
            self.assertEqual(report["fd1"], "/memfd:cw-job-output (deleted)")
            self.assertEqual(report["took"], 100_001)
            self.assertEqual(report["listing"], [])

        return threads.deferToThread(body)

    def test_full_tmpdir(self):
        """
        With $TMPDIR all but full, a job's writes to fd 1 (100 KB) do not
        fail, and come back whole.
        """
        if not can_mount():
            raise unittest.SkipTest("needs root and unshare to mount a small file system")
        tmpdir = os.path.abspath(self.mktemp())
        os.makedirs(tmpdir)
        source = os.path.abspath(self.mktemp()) + ".py"
        with open(source, "w") as f:
            f.write(PRELUDE + WRITE_100K)

        def body():
            result = subprocess.run(
                [*almost_full_tmpdir(tmpdir), sys.executable, source, tmpdir],
                capture_output=True,
                text=True,
                env=child_env(TMPDIR=tmpdir),
                timeout=DEADLINE,
            )
            self.assertEqual(result.returncode, 0, result.stderr)
            report = json.loads(result.stderr.splitlines()[-1])
            self.assertEqual(report["outcome"], ["print ok", "os.write ok"])
            self.assertEqual(report["took"], 100_001)
            self.assertEqual(report["listing"], ["fill"])

        return threads.deferToThread(body)

    def test_long_output_freed_as_it_comes(self):
        """
        A job that writes 64 MiB: what is older than the last MiB is freed
        while it writes (the file holds less than 4 MiB after each 8 MiB);
        the capture still takes the last MiB whole, after its marker.
        """

        def body():
            report = self.script(WRITE_64M)
            self.assertEqual(report["freed"], [True] * 8)
            cut = (64 << 20) - (1 << 20)
            self.assertEqual(
                report["marker"], f"[cw: {cut} bytes of earlier output cut; the last {1 << 20} follow]"
            )
            self.assertEqual((report["kept"], report["intact"], report["size"]), (1 << 20, True, 0))

        return threads.deferToThread(body)
