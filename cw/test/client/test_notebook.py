"""
cw in Jupyter: the executor's rich display and plain C{repr}, a client
program that runs clean under C{python -W error::DeprecationWarning}, and
the example notebook (C{examples/notebook.ipynb}) executed end to end by
nbclient in a real kernel (once: a kernel takes seconds to start).
"""

from __future__ import annotations

import json
import os

from twisted.internet import threads
from twisted.trial import unittest

from cw.client import ClusterExecutor
from cw.client.display import executor_html
from cw.test.client.test_executor_contract import in_thread
from cw.test.jobs import block_until, touch
from cw.test.procs import ROOT, Processes, abandon, run_script, shared_cluster, wait_until

NOTEBOOK = os.path.join(ROOT, "examples", "notebook.ipynb")


class DisplayTests(unittest.TestCase):
    """C{ClusterExecutor._repr_html_} and C{__repr__} against a master that serves its dashboard."""

    timeout = 120

    @in_thread
    def test_repr_html(self):
        """
        The HTML shows the master's address, its workers, slots (busy ones),
        the jobs queued on it and this client's, and links the dashboard;
        the plain repr says where and how many jobs, without asking the
        master anything.
        """
        procs = Processes(self, self.mktemp())
        release = os.path.abspath(self.mktemp())
        self.addCleanup(lambda: os.path.exists(release) or touch(release))
        procs.start_master(
            "--web", "tcp:0:interface=127.0.0.1", "--web-token-file", os.path.abspath(self.mktemp())
        )
        procs.start_worker(procs=2)
        ex = ClusterExecutor(procs.address)
        try:
            # Two running, two more held by the worker (prefetch), two queued.
            blocked = [ex.submit(block_until, release) for _ in range(6)]
            wait_until(
                lambda: (lambda s: (s["queued"], s["workers"][0]["held"]))(ex.status()) == (2, 4),
                what="four jobs on the worker and two queued",
            )
            html = ex._repr_html_()
            text = repr(ex)
            touch(release)
            for future in blocked:
                future.result(60)
        except BaseException:
            abandon(ex)
            raise
        ex.shutdown()
        self.assertIn(f'<td style="text-align: left">{procs.address}</td>', html)
        self.assertIn('Workers</th><td style="text-align: left">1</td>', html)
        self.assertIn('Slots</th><td style="text-align: left">2 (2 busy)</td>', html)
        self.assertIn('Queued on the master</th><td style="text-align: left">2</td>', html)
        self.assertIn('Jobs outstanding</th><td style="text-align: left">6</td>', html)
        dashboard = (procs.directory / "master.log").read_text()
        url = dashboard.split("cw dashboard at ", 1)[1].split()[0]
        self.assertTrue(url.startswith("http://127.0.0.1:"), url)
        self.assertIn(f'<a href="{url}" target="_blank">{url}</a>', html)
        self.assertEqual(text, f"<ClusterExecutor {procs.address} connected, 6 jobs outstanding>")
        self.assertEqual(repr(ex), f"<ClusterExecutor {procs.address} shut down, 0 jobs outstanding>")
        self.assertNotIn("Workers", ex._repr_html_())

    def test_html_escaped(self):
        """Everything shown is escaped; a master that did not answer is shown as such."""
        html = executor_html(
            "ClusterExecutor", "<b>", "connected", 0, None, "no status: TimeoutError: <late>"
        )
        self.assertIn("&lt;b&gt;", html)
        self.assertIn("no status: TimeoutError: &lt;late&gt;", html)
        self.assertNotIn("<b>", html)
        html = executor_html(
            "ClusterExecutor", "x", "connected", 0, {"workers": [], "dashboard": "unix:/a<b"}
        )
        self.assertIn("unix:/a&lt;b", html)
        self.assertNotIn("href", html)


class StrictWarningsTests(unittest.TestCase):
    timeout = 120

    def test_no_deprecation_warning(self):
        """
        A client program using every client API (ClusterExecutor, ClientThread,
        cw.aio, the joblib backend) runs under C{python -W
        error::DeprecationWarning}: no deprecated call in crochet or cw.
        """

        def run():
            address = shared_cluster("joblib", slots=(2, 1)).address
            return run_script(
                self,
                """
                import asyncio, sys
                import cw.joblib
                from joblib import Parallel, delayed, parallel_config
                from cw.aio import AsyncClusterExecutor
                from cw.client import ClientThread, ClusterExecutor

                address = sys.argv[1]
                with ClusterExecutor(address) as ex:
                    workers = len(ex.status()["workers"])
                    print(ex.submit(pow, 2, 5).result(), list(ex.map(abs, [-1, -2])), workers)
                got = []
                with ClientThread(lambda jobid, result: got.append(result), address) as client:
                    client.submit(1, abs, -3)
                    client.wait()
                print(got)
                with parallel_config(backend="cw", master=address):
                    print(Parallel(n_jobs=-1)(delayed(abs)(-i) for i in range(4)))

                async def main():
                    async with AsyncClusterExecutor(address) as aex:
                        print(await aex.submit(abs, -4))

                asyncio.run(main())
                """,
                address,
                python_options=("-W", "error::DeprecationWarning"),
            )

        def check(result):
            self.assertEqual((result.returncode, result.stderr), (0, ""))
            self.assertEqual(result.stdout, "32 [1, 2] 2\n[3]\n[0, 1, 2, 3]\n4\n")

        return threads.deferToThread(run).addCallback(check)


class NotebookTests(unittest.TestCase):
    timeout = 300

    def test_example_notebook(self):
        """
        C{examples/notebook.ipynb} runs end to end in a real kernel against
        a cluster: the executor's table, a progress widget, C{cw.aio} with
        top-level C{await}, a grid search on the cluster; no error and
        nothing on standard error.
        """
        import nbclient  # noqa: F401 - the test extra installs them; a missing one fails here
        import nbformat  # noqa: F401

        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)

        def run():
            address = shared_cluster("joblib", slots=(2, 1)).address
            return run_script(
                self,
                """
                import json, sys
                import nbformat
                from nbclient import NotebookClient

                notebook = nbformat.read(sys.argv[1], as_version=4)
                resources = {"metadata": {"path": sys.argv[2]}}
                NotebookClient(notebook, timeout=120, kernel_name="python3", resources=resources).execute()
                code = [cell for cell in notebook.cells if cell.cell_type == "code"]
                print(json.dumps([cell.get("outputs", []) for cell in code]))
                """,
                NOTEBOOK,
                workdir,
                env={"CW_MASTER": address},
                timeout=240,
            )

        def check(result):
            self.assertEqual(result.returncode, 0, result.stderr)
            outputs = json.loads(result.stdout)
            streams = [o for cell in outputs for o in cell if o["output_type"] == "stream"]
            self.assertEqual([o for o in streams if o["name"] == "stderr"], [])
            address, display, progress, asyncio_cell, search, closed = outputs
            html = display[0]["data"]["text/html"]
            self.assertIn("Workers", html)
            self.assertIn('Slots</th><td style="text-align: left">3 (', html)
            self.assertTrue(
                any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in progress),
                progress,
            )
            self.assertEqual(progress[-1]["data"]["text/plain"], str(sum(i * i for i in range(200))))
            self.assertEqual(
                asyncio_cell[0]["data"]["text/plain"], "(144, [0, 1, 8, 27, 64, 125, 216, 343, 512, 729])"
            )
            self.assertEqual(search[0]["data"]["text/plain"], "{'C': 1, 'gamma': 0.1}")
            self.assertIn("shut down", closed[0]["data"]["text/plain"])

        return threads.deferToThread(run).addCallback(check)
