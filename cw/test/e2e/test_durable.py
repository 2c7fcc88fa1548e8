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
from cw.client import ClusterExecutor, master_status
from cw.master.web import render_metrics
from cw.system import with_cw_on_path
from cw.test.jobs import touch
from cw.test.procs import (
    COLLECT_SESSION,
    DEADLINE,
    SUBMIT_AND_DETACH,
    Processes,
    abandon,
    executor,
    run_script,
    wait_until,
)

#: A C{sitecustomize} module, put first on a master's C{PYTHONPATH}: while
#: the file HOLD exists, its state file's commits of submitted jobs wait
#: before they write (a disk slow to sync), saying so in C{HOLD.entered}.
SLOW_DISK = """
import os, time
from cw.master import store

HOLD = {hold!r}
_commit = store.Store.commit

def commit(self, batch):
    if batch.acks and os.path.exists(HOLD):
        open(HOLD + ".entered", "w").close()
        deadline = time.monotonic() + 60
        while os.path.exists(HOLD) and time.monotonic() < deadline:
            time.sleep(0.01)
    _commit(self, batch)

store.Store.commit = commit
"""


#: A script: attach to session S at ADDRESS with a client whose process
#: dies as the results that waited for the session arrive (it prints how
#: many), before it has answered for them.
DIE_WITH_STORED_RESULTS = """
import os, sys
from cw.client import ClusterExecutor
from cw.client.session import Session

def die(self, results):
    print(len(results), flush=True)
    os._exit(3)

Session.results_arrived = die
ClusterExecutor(sys.argv[1], session=sys.argv[2])
"""


#: A script: submit N jobs (returning i * i, once the file FLAG exists)
#: under session S at ADDRESS, with a worker running, from a client whose
#: process dies as the first of their results arrive (it prints how many),
#: before it has acknowledged them.  FLAG is made once the master has
#: stored every job.
DIE_WITH_LIVE_RESULTS = """
import os, sys
from cw.client import ClusterExecutor
from cw.client.session import Session
from cw.test.jobs import wait_then

def die(self, results):
    print(len(results), flush=True)
    os._exit(3)

Session.results_arrived = die
address, session, n, flag = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
ex = ClusterExecutor(address, session=session)
futures = [ex.submit(wait_then, flag, i * i) for i in range(n)]
if not ex.session.wait_stored(30):
    sys.exit("the jobs were not stored")
open(flag, "w").close()
futures[0].result(60)
"""


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

    def test_master_answers_while_its_disk_syncs(self):
        """
        While the state file's commit waits for the disk (held by the
        test), the master answers: its status, and another client's jobs
        are queued; the job being committed is not acknowledged until it
        is written.  Once acknowledged, it survives the master's SIGKILL
        and runs on the restarted master.
        """

        def body():
            procs = self.procs
            hold = str(procs.directory / "hold")
            site = procs.directory / "slow-disk"
            site.mkdir()
            (site / "sitecustomize.py").write_text(SLOW_DISK.format(hold=hold))
            touch(hold)
            path = os.pathsep.join([str(site), with_cw_on_path(os.environ)["PYTHONPATH"]])
            address = procs.start_master("--state", self.state, env={"PYTHONPATH": path})
            ex = ClusterExecutor(address, session="slow")
            self.addCleanup(abandon, ex)
            ex.submit(pow, 3, 2)
            wait_until(lambda: os.path.exists(hold + ".entered"), what="the commit to start")
            # The commit waits for the disk; the master answers meanwhile.
            self.assertEqual(master_status(address, timeout=20)["queued"], 1)
            with executor(address) as other:
                other.submit(pow, 2, 2)
                wait_until(lambda: master_status(address, timeout=20)["queued"] == 2, what="the 2nd job")
                self.assertFalse(other.session.wait_stored(0.5))  # it waits for the next commit
                self.assertFalse(ex.session.wait_stored(0.5))
                self.assertTrue(os.path.exists(hold))  # still held: nothing above waited for it
                os.unlink(hold)
                self.assertTrue(ex.session.wait_stored(DEADLINE))
                self.assertTrue(other.session.wait_stored(DEADLINE))
                os.kill(procs.master.pid, signal.SIGKILL)
                procs.master.wait(30)
                abandon(other)
            ex.detach(timeout=DEADLINE)
            address = procs.start_master("--state", self.state)
            # Both sessions' jobs (the other one's results wait for it).
            self.assertIn("2 jobs of 2 sessions requeued", procs.master.log.read_text())
            procs.start_worker(1)
            out = run_script(self, COLLECT_SESSION, address, "slow")
            self.assertEqual(out.returncode, 0, out.stderr)
            self.assertEqual(json.loads(out.stdout), {"pending": 0, "results": {"1": 9}})

        return threads.deferToThread(body)

    def test_stored_results_kept_until_their_client_has_them(self):
        """
        A client re-attaching to its session gets the results that waited
        for it; its process dies before it has answered for them: the
        master keeps them, and the session's next client gets them all.
        """

        def body():
            procs = self.procs
            address = procs.start_master("--state", self.state)
            out = run_script(self, SUBMIT_AND_DETACH, address, "nightly", "20", "0")
            self.assertEqual(out.stdout.split(), ["20", "1", "20"], out.stderr)
            procs.start_worker(2)
            wait_until(
                lambda: master_status(address)["state"]["stored_results"] == 20,
                what="the 20 results to be stored",
            )
            out = run_script(self, DIE_WITH_STORED_RESULTS, address, "nightly")
            self.assertEqual((out.returncode, out.stdout), (3, "20\n"), out.stderr)
            self.assertEqual(master_status(address)["state"]["stored_results"], 20)
            out = run_script(self, COLLECT_SESSION, address, "nightly")
            self.assertEqual(out.returncode, 0, out.stderr)
            report = json.loads(out.stdout)
            self.assertEqual(report, {"pending": 0, "results": {str(n): (n - 1) ** 2 for n in range(1, 21)}})
            wait_until(
                lambda: master_status(address)["state"]["stored_results"] == 0,
                what="the delivered results to be deleted",
            )
            self.assertIn("they wait for its next client", procs.master.log.read_text())

        return threads.deferToThread(body)

    def test_live_results_kept_until_their_client_has_them(self):
        """
        A client's process dies as the first results of its jobs arrive,
        before it has acknowledged them: the master keeps them, and the
        session's next client gets every result.
        """

        def body():
            procs = self.procs
            address = procs.start_master("--state", self.state)
            procs.start_worker(2)
            flag = str(procs.directory / "flag")
            out = run_script(self, DIE_WITH_LIVE_RESULTS, address, "live", "20", flag)
            self.assertEqual(out.returncode, 3, out.stderr)
            self.assertGreater(int(out.stdout), 0)
            out = run_script(self, COLLECT_SESSION, address, "live")
            self.assertEqual(out.returncode, 0, out.stderr)
            report = json.loads(out.stdout)
            self.assertEqual(report, {"pending": 0, "results": {str(n): (n - 1) ** 2 for n in range(1, 21)}})

        return threads.deferToThread(body)

    def test_acknowledged_results_forgotten(self):
        """
        A client that has its results (acknowledged as they arrive): the
        master forgets them, and the session's next client finds none.
        """

        def body():
            procs = self.procs
            address = procs.start_master("--state", self.state)
            procs.start_worker(2)
            with ClusterExecutor(address, session="acked") as ex:
                self.assertEqual(
                    [f.result(DEADLINE) for f in [ex.submit(pow, i, 2) for i in range(200)]][-1], 199**2
                )
            out = run_script(self, COLLECT_SESSION, address, "acked")
            self.assertEqual(out.returncode, 0, out.stderr)
            self.assertEqual(json.loads(out.stdout), {"pending": 0, "results": {}})
            self.assertEqual(master_status(address)["state"]["stored_results"], 0)

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
