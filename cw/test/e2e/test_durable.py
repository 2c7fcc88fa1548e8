"""
End-to-end tests of the durable queue (issue 14, C{cw-master --state}):
jobs a client left with the master survive the master's SIGKILL, and a new
process of the same session collects their results.
"""

from __future__ import annotations

import json
import os
import signal

from twisted.internet import threads
from twisted.trial import unittest

from cw.cli.cw import format_status
from cw.client import master_status
from cw.master.web import render_metrics
from cw.test.procs import (
    COLLECT_SESSION,
    DEADLINE,
    SUBMIT_AND_DETACH,
    Processes,
    run_script,
    wait_until,
)


class DurableQueueTests(unittest.TestCase):
    timeout = 240

    def setUp(self):
        self.procs = Processes(self, self.mktemp())
        self.state = str(self.procs.directory / "state.db")

    def test_one_master_per_state_file(self):
        """
        A second master on a state file in use exits at once with one line
        naming the master that holds it, and no traceback.
        """

        def body():
            self.procs.start_master("--state", self.state)
            second = self.procs.spawn("second", ["cw-master", "--port", "tcp:0", "--state", self.state])
            self.assertEqual(second.wait(DEADLINE), 1)
            log = second.log.read_text()
            self.assertIn(f"cw-master: the state file {self.state} is in use by another master (", log)
            self.assertIn(f":{self.procs.master.pid})", log)
            self.assertNotIn("Traceback", log)

        return threads.deferToThread(body)

    def test_jobs_outlive_master_crash_and_their_client(self):
        """
        A client submits 1,000 jobs to a master with no workers and exits;
        the master is SIGKILLed and restarted on the same state file;
        workers join; a new process of the same session collects 1,000
        right results.
        """

        def body():
            procs = self.procs
            address = procs.start_master("--state", self.state)
            out = run_script(self, SUBMIT_AND_DETACH, address, "nightly", "1000", "0")
            self.assertEqual(out.returncode, 0, out.stderr)
            self.assertEqual(out.stdout.split(), ["1000", "1", "1000"])
            os.kill(procs.master.pid, signal.SIGKILL)
            procs.master.wait(30)
            address = procs.start_master("--state", self.state)
            self.assertIn("1,000 jobs of 1 sessions requeued", procs.master.log.read_text())
            procs.start_worker(2)
            # Their results wait on disk for the session's next client.
            wait_until(
                lambda: (master_status(address)["state"] or {}).get("stored_results") == 1000,
                timeout=30,
                what="the 1,000 results to be stored",
            )
            # cw status, the dashboard's status and /metrics show them.
            status = master_status(address)
            text = format_status(address, status)
            self.assertIn(f"state    {self.state}: ", text)
            self.assertIn("1,000 results (", text)
            self.assertRegex(text, r"clients  \d+ \(1 away: their jobs wait for them\)")
            self.assertRegex(render_metrics(status), r"\ncw_stored_results 1000\n")
            self.assertGreater(status["state"]["bytes"], 1000 * 4)
            out = run_script(self, COLLECT_SESSION, address, "nightly")
            self.assertEqual(out.returncode, 0, out.stderr)
            report = json.loads(out.stdout)
            self.assertEqual(report["pending"], 0)
            results = {int(n): value for n, value in report["results"].items()}
            self.assertEqual(results, {n: (n - 1) ** 2 for n in range(1, 1001)})
            self.assertIn("delivering 1,000 results that waited for it", procs.master.log.read_text())
            self.assertEqual(master_status(address)["state"]["stored_results"], 0)

        return threads.deferToThread(body)
