"""
Version checks at connect (issue 17, item 3): a worker made to report
another cloudpickle or Python version (the test hook
C{CW_TEST_WORKER_VERSIONS}, L{cw.wire.versions}) fails the jobs of a client
with an error naming both versions, or is avoided by a client that asks;
C{ClusterExecutor.versions()} shows the table and, with C{check=True},
raises.
"""

from __future__ import annotations

import json
import logging
import os
import platform

import cloudpickle
from twisted.internet import threads
from twisted.trial import unittest

from cw.client import ClientThread, RemoteException
from cw.errors import IncompatibleWorker, VersionConflict
from cw.test.jobs import square, worker_pid
from cw.test.procs import DEADLINE, Processes, executor
from cw.wire.versions import TEST_HOOK

#: A worker that claims another cloudpickle major version than this client's.
OTHER_CLOUDPICKLE = {TEST_HOOK: json.dumps({"cloudpickle": "99.0.0"})}

#: A worker that claims another Python.
OTHER_PYTHON = {TEST_HOOK: json.dumps({"python": "3.99.1"})}


class Captured(logging.Handler):
    """Records of one logger, for the duration of a test."""

    def __init__(self, testcase, name: str) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []
        logger = logging.getLogger(name)
        logger.addHandler(self)
        testcase.addCleanup(logger.removeHandler, self)

    def emit(self, record):
        self.records.append(record)

    def messages(self) -> list[str]:
        return [record.getMessage() for record in self.records]


class VersionCheckTests(unittest.TestCase):
    timeout = 180

    def setUp(self):
        self.procs = Processes(self, self.mktemp())

    def test_job_error_names_both_versions(self):
        """
        A job sent to a worker reporting another cloudpickle major version
        fails with L{IncompatibleWorker} (a L{RemoteException}) naming the
        client's and the worker's versions and the worker; the client
        warned once at connect; the master's status shows the versions.
        """

        def body():
            self.procs.start_master()
            bad = self.procs.start_worker(procs=1, env=OTHER_CLOUDPICKLE)
            log = Captured(self, "cw.client")
            with executor(self.procs.address) as ex:
                error = ex.submit(square, 3).exception(DEADLINE)
                status = ex.status()
            self.assertIsInstance(error, IncompatibleWorker)
            self.assertIsInstance(error, RemoteException)
            text = str(error)
            self.assertIn(f"cloudpickle {cloudpickle.__version__}", text)
            self.assertIn("cloudpickle 99.0.0", text)
            self.assertIn(f":{bad.pid}", text)
            self.assertIn("version_mismatch='avoid'", text)
            self.assertEqual(error.report["worker_versions"]["cloudpickle"], "99.0.0")
            (warning,) = [m for m in log.messages() if "incompatible" in m]
            self.assertIn("cloudpickle 99.0.0", warning)
            (worker,) = status["workers"]
            self.assertEqual(worker["versions"]["cloudpickle"], "99.0.0")
            self.assertEqual(worker["versions"]["python"], platform.python_version())
            client = [c for c in status["clients"] if c["versions"]]
            self.assertEqual(client[0]["versions"]["cloudpickle"], cloudpickle.__version__)

        return threads.deferToThread(body)

    def test_python_version_error(self):
        """Another Python major.minor on the worker: the error names both Pythons."""

        def body():
            self.procs.start_master()
            self.procs.start_worker(procs=1, env=OTHER_PYTHON)
            with executor(self.procs.address) as ex:
                error = ex.submit(square, 3).exception(DEADLINE)
            self.assertIsInstance(error, IncompatibleWorker)
            self.assertIn(f"Python {platform.python_version()}", str(error))
            self.assertIn("Python 3.99.1", str(error))

        return threads.deferToThread(body)

    def test_avoid(self):
        """
        With C{version_mismatch="avoid"}, no job goes to the incompatible
        worker (it has two slots, the good one one); a
        L{ClientThread} takes the option too.
        """

        def body():
            self.procs.start_master()
            bad = self.procs.start_worker(procs=2, env=OTHER_CLOUDPICKLE)
            good = self.procs.start_worker(procs=1)
            log = Captured(self, "cw.client")
            with executor(self.procs.address, version_mismatch="avoid") as ex:
                pids = set(ex.map(worker_pid, range(40), timeout=DEADLINE))
                status = ex.status()
            self.assertEqual(pids, {good.pid})
            by_pid = {int(w["peer"].rsplit(":", 1)[1]): w for w in status["workers"]}
            self.assertEqual((by_pid[bad.pid]["completed"], by_pid[bad.pid]["failed"]), (0, 0))
            self.assertTrue(any("not sent to them" in m for m in log.messages()), log.messages())
            got = {}
            with ClientThread(
                lambda i, pid: got.update({i: pid}), self.procs.address, version_mismatch="avoid"
            ) as c:
                for i in range(20):
                    c.submit(i, worker_pid)
            self.assertEqual(set(got.values()), {good.pid})

        return threads.deferToThread(body)

    def test_versions_table(self):
        """
        C{versions()} lists the client and each worker; with C{check=True}
        it raises L{VersionConflict} naming the incompatible worker, and
        with C{packages=} it compares those too: a distribution only on
        one worker's C{sys.path} is a conflict.
        """
        extra = os.path.abspath(self.mktemp())
        info = os.path.join(extra, "cwprobedemo-2.5.dist-info")
        os.makedirs(info)
        with open(os.path.join(info, "METADATA"), "w") as f:
            f.write("Metadata-Version: 2.1\nName: cwprobedemo\nVersion: 2.5\n")

        def body():
            self.procs.start_master()
            bad = self.procs.start_worker(procs=1, env=OTHER_CLOUDPICKLE)
            with executor(self.procs.address, version_mismatch="avoid") as ex:
                table = ex.versions()
                self.assertEqual(table["client"]["cloudpickle"], cloudpickle.__version__)
                self.assertEqual(
                    {name: w["cloudpickle"] for name, w in table["workers"].items()},
                    {f"{platform.node()}:{bad.pid}": "99.0.0"},
                )
                with self.assertRaises(VersionConflict) as caught:
                    ex.versions(check=True)
                self.assertIn(f":{bad.pid}: cloudpickle major", str(caught.exception))
            self.procs.stop_worker(bad)
            pythonpath = f"{extra}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
            odd = self.procs.start_worker(procs=1, env={"PYTHONPATH": pythonpath})
            self.procs.start_worker(procs=1)
            with executor(self.procs.address) as ex:
                ex.versions(check=True)  # same versions everywhere: no error
                table = ex.versions(packages=["twisted", "cwprobedemo"])
                self.assertEqual(table["client"]["packages"]["cwprobedemo"], None)
                packages = {name: w["packages"]["cwprobedemo"] for name, w in table["workers"].items()}
                self.assertEqual(sorted(packages.values(), key=str), ["2.5", None])
                self.assertEqual(
                    {w["packages"]["twisted"] for w in table["workers"].values()} - {None},
                    {table["client"]["packages"]["twisted"]},
                )
                with self.assertRaises(VersionConflict) as caught:
                    ex.versions(packages=["cwprobedemo"], check=True)
                self.assertIn(f":{odd.pid}: cwprobedemo not installed vs 2.5", str(caught.exception))

        return threads.deferToThread(body)
