"""
Tests of local clusters (C{cw.start}/C{cw.allocate}/C{cw.mp}) and of client
programs run as real scripts: what a user gets from C{python script.py}.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from twisted.internet import threads
from twisted.trial import unittest

from cw.test.procs import (
    DEADLINE,
    child_env,
    executor,
    free_port,
    group_members,
    listening,
    process_exists,
    run_script,
    wait_until,
)

#: How long a client program may take to exit after its last line (the
#: interpreter's own exit, with a ClusterExecutor never shut down).
EXIT_BOUND = 5


#: Adds two workers to the master on port argv[1] with cw.mp.start(master=False),
#: prints how many workers the master then has, and stops the two again.
ADD_WORKERS = """
import sys
import cw.mp
from cw.client import master_status

port = int(sys.argv[1])
cw.mp.start(2, master=False, port=port)
try:
    print(len(master_status(port=port)["workers"]))
finally:
    cw.mp.stop(master=False, port=port)
"""


class ScriptTests(unittest.TestCase):
    """Client programs written only against the original API."""

    timeout = 180

    def run_script(
        self, source: str, *args: str, env: dict | None = None, timeout: float = DEADLINE * 2
    ) -> subprocess.CompletedProcess:
        return run_script(self, source, *args, env=env, timeout=timeout)

    def test_allocate_leaves_nothing_behind(self):
        """
        C{cw.allocate(2)} starts a master and two workers that serve
        ClientThread and ClusterExecutor; afterwards none of their
        processes (nor their job processes) is left.
        """
        port = free_port()
        script = """
            import json, os, sys
            import cw
            from cw.client import ClientThread, ClusterExecutor
            from cw.mp import run_dir

            def where(x):
                return x * x, os.getpid(), os.getppid()

            port = int(sys.argv[1])
            pids = set()
            with cw.allocate(2, port=port):
                master_pid = int(open(run_dir(port) / "master.pid").read().split()[0])
                results = {}
                def callback(jobid, result):
                    results[jobid] = result[0]
                    pids.update(result[1:])
                with ClientThread(callback, port=port) as client:
                    for i in range(20):
                        client.submit(i, where, i)
                with ClusterExecutor(port=port) as ex:
                    for value, *ids in ex.map(where, range(20)):
                        pids.update(ids)
                assert results == {i: i * i for i in range(20)}, results
            print(json.dumps({"master": master_pid, "pids": sorted(pids)}))
        """

        def body():
            done = self.run_script(script, str(port))
            self.assertEqual(done.returncode, 0, done.stderr)
            report = json.loads(done.stdout.strip().splitlines()[-1])
            pids = [report["master"], *report["pids"]]
            # Two workers, each with at least one job process, plus the master.
            self.assertGreaterEqual(len(pids), 5)
            for pid in pids:
                self.assertFalse(process_exists(pid), f"process {pid} is still running")
                self.assertEqual(group_members(pid), [])

        return threads.deferToThread(body)

    def test_original_module_attributes(self):
        """
        'import cw' alone gives cw.mp and cw.slurm (the original imported
        both), on first use only: cw.mp.allocate runs a cluster,
        cw.slurm.master_host and cw.is_slurm_available are there.
        """
        port = free_port()
        script = """
            import sys
            import cw

            assert "cw.mp" not in sys.modules and "cw.slurm" not in sys.modules
            with cw.mp.allocate(1, port=int(sys.argv[1])) as address:
                from cw.client import ClusterExecutor

                with ClusterExecutor(address) as ex:
                    print(ex.submit(pow, 2, 5).result(60))
            print(callable(cw.slurm.master_host), cw.is_slurm_available())
        """

        def body():
            done = self.run_script(script, str(port))
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assertEqual(done.stdout.split(), ["32", "True", "False"])

        return threads.deferToThread(body)

    def test_exit_without_shutdown(self):
        """
        A program that never shuts its executor down (a job still pending,
        its master gone) still exits within C{EXIT_BOUND} seconds of the end
        of its main code.
        """
        port = free_port()
        script = """
            import sys, time
            import cw
            from cw.client import ClusterExecutor

            port = int(sys.argv[1])
            cw.start(1, port=port)
            try:
                ex = ClusterExecutor(port=port)
                print(ex.submit(pow, 2, 10).result(60))
                ex.submit(sum, [1, 2, 3])  # left pending on purpose
            finally:
                cw.stop(port=port)
            print(time.monotonic())
        """

        def body():
            done = self.run_script(script, str(port), timeout=DEADLINE)
            exited = time.monotonic()
            self.assertEqual(done.returncode, 0, done.stderr)
            result, ended = done.stdout.split()
            self.assertEqual(result, "1024")
            self.assertLess(exited - float(ended), EXIT_BOUND, done.stderr)

        return threads.deferToThread(body)

    def test_no_master_clear_error(self):
        """A client with no master to talk to fails fast with a clear error."""
        port = free_port()
        script = """
            import sys
            from cw.client import ClusterExecutor, MasterUnavailable
            try:
                ClusterExecutor(port=int(sys.argv[1]), connect_timeout=0.5)
            except MasterUnavailable as e:
                print("refused:", e)
        """

        def body():
            done = self.run_script(script, str(port))
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assertIn("refused: no cw master answers at", done.stdout)
            self.assertIn("twistd -n cw-master", done.stdout)

        return threads.deferToThread(body)

    def test_compat_module_entry_points(self):
        """
        C{python -m cw.master} and C{python -m cw.worker HOST} (the original
        commands) serve a client; C{cw.mp.start(master=False)} can add
        workers to them.
        """
        port = free_port()
        run_dir = os.path.abspath(self.mktemp())
        os.makedirs(run_dir)
        env = child_env()
        popens = []

        def spawn(*args):
            log = open(os.path.join(run_dir, "log-%d" % len(popens)), "wb")
            self.addCleanup(log.close)
            p = subprocess.Popen(
                [sys.executable, "-m", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=run_dir,
                start_new_session=True,
            )
            popens.append(p)
            from cw.test.procs import stop_process

            self.addCleanup(stop_process, p)
            return p

        def body():
            from cw.client import master_status, wait_for_workers

            spawn("cw.master", "--port", f"tcp:{port}:interface=127.0.0.1")
            spawn("cw.worker", f"localhost:{port}", "--procs", "2")
            # A client does not retry a refused connection: wait until the master listens.
            wait_until(lambda: listening(port), what=f"the master to listen on port {port}")
            self.assertEqual(wait_for_workers(1, port=port, timeout=DEADLINE), 1)
            with executor(port=port) as ex:
                self.assertEqual(list(ex.map(abs, [-1, -2, -3], timeout=DEADLINE)), [1, 2, 3])
            done = self.run_script(ADD_WORKERS, str(port))
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assertEqual(done.stdout.split(), ["3"])
            wait_until(
                lambda: len(master_status(port=port)["workers"]) == 1,
                what="cw.mp.stop(master=False) to stop the two added workers",
            )

        return threads.deferToThread(body)
