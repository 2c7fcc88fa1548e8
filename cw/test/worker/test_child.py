"""
Tests for L{cw.worker.child.run_payload}, called in this process.

C{run_payload} changes the working directory and C{sys.path}; every test
restores both.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import threading

import cloudpickle
from twisted.trial.unittest import SynchronousTestCase

from cw.core.records import Outcome, read_error_report
from cw.worker import child as child
from cw.worker.child import run_payload


def payload(func, *args, **kwargs) -> bytes:
    """A job payload as a client makes it."""
    return cloudpickle.dumps((func, args, kwargs))


def add(a, b, scale=1):
    return (a + b) * scale


def deeply_failing_job(x):
    return _helper_that_raises(x)


def _helper_that_raises(x):
    raise ZeroDivisionError(f"cannot split {x} ways")


def exiting_job():
    sys.exit(3)


def lock_returning_job():
    return threading.Lock()


def current_directory():
    return os.getcwd()


def import_value(module_name):
    return importlib.import_module(module_name).VALUE


class Tracked:
    """A job argument that notes, once loaded in a job process, when it is freed."""

    freed: list[str] = []

    def __init__(self, name: str, loaded: bool = False) -> None:
        self.name, self.loaded = name, loaded

    def __reduce__(self):
        return Tracked, (self.name, True)

    def __del__(self):
        if self.loaded:
            Tracked.freed.append(self.name)


def freed_before(argument: Tracked) -> list[str]:
    """The loaded arguments freed before this job ran."""
    return list(Tracked.freed)


class ContextIsolation:
    """Mixin: restore the working directory, C{sys.path} and L{child}'s memory."""

    def isolate(self):
        cwd = os.getcwd()
        saved_path = list(sys.path)
        self.addCleanup(os.chdir, cwd)
        self.addCleanup(sys.path.__setitem__, slice(None), saved_path)
        self.patch(child, "_inserted", [])

    def directory(self) -> str:
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        return path


class RunPayloadTests(SynchronousTestCase, ContextIsolation):
    """L{run_payload} returns an outcome code and its payload, never raising."""

    def setUp(self):
        self.isolate()

    def test_ok(self):
        status, data = run_payload("", [], payload(add, 2, 3, scale=10))
        self.assertEqual(status, Outcome.OK)
        self.assertEqual(cloudpickle.loads(data), 50)

    def test_lambda(self):
        status, data = run_payload("", [], payload(lambda: {"answer": [42]}))
        self.assertEqual((status, cloudpickle.loads(data)), (Outcome.OK, {"answer": [42]}))

    def test_returns_function(self):
        status, data = run_payload("", [], payload(lambda: lambda y: y * 2))
        self.assertEqual(status, Outcome.OK)
        self.assertEqual(cloudpickle.loads(data)(21), 42)

    def test_raised(self):
        status, data = run_payload("", [], payload(deeply_failing_job, 3))
        self.assertEqual(status, Outcome.RAISED)
        report = json.loads(data.decode("utf-8"))
        self.assertEqual(report["type"], "ZeroDivisionError")
        self.assertEqual(report["message"], "cannot split 3 ways")
        self.assertIn("_helper_that_raises", report["traceback"])
        self.assertIn("deeply_failing_job", report["traceback"])
        self.assertIn("ZeroDivisionError: cannot split 3 ways", report["traceback"])
        self.assertEqual(report["pid"], os.getpid())
        self.assertIsInstance(report["host"], str)

    def test_traceback_starts_at_the_job(self):
        """The traceback shows the user's code, not cw's machinery."""
        _, data = run_payload("", [], payload(deeply_failing_job, 3))
        self.assertNotIn("run_payload", read_error_report(data)["traceback"])

    def test_sys_exit_reported(self):
        status, data = run_payload("", [], payload(exiting_job))
        self.assertEqual(status, Outcome.RAISED)
        report = read_error_report(data)
        self.assertEqual(report["type"], "SystemExit")
        self.assertEqual(report["message"], "3")
        self.assertIn("exiting_job", report["traceback"])

    def test_keyboard_interrupt_reported(self):
        def interrupted():
            raise KeyboardInterrupt

        status, data = run_payload("", [], payload(interrupted))
        self.assertEqual(status, Outcome.RAISED)
        self.assertEqual(read_error_report(data)["type"], "KeyboardInterrupt")

    def test_unpicklable_return_value(self):
        status, data = run_payload("", [], payload(lock_returning_job))
        self.assertEqual(status, Outcome.RAISED)
        report = read_error_report(data)
        self.assertEqual(report["type"], "TypeError")
        self.assertIn("return value", report["message"])
        self.assertIn("could not be pickled", report["message"])
        self.assertIn("lock", report["message"])

    def test_unreadable_payload(self):
        status, data = run_payload("", [], b"not a pickle")
        self.assertEqual(status, Outcome.RAISED)
        self.assertIn("could not be unpickled", read_error_report(data)["message"])

    def test_payload_of_wrong_shape(self):
        status, data = run_payload("", [], cloudpickle.dumps("just a string"))
        self.assertEqual(status, Outcome.RAISED)
        self.assertIn("could not be unpickled", read_error_report(data)["message"])


class ContextTests(SynchronousTestCase, ContextIsolation):
    """Jobs run in their client's working directory with its C{sys.path}."""

    def setUp(self):
        self.isolate()

    def test_cwd_applied(self):
        where = self.directory()
        status, data = run_payload(where, [], payload(current_directory))
        self.assertEqual(status, Outcome.OK)
        self.assertEqual(os.path.realpath(cloudpickle.loads(data)), os.path.realpath(where))

    def test_empty_cwd_leaves_directory(self):
        before = os.getcwd()
        status, data = run_payload("", [], payload(current_directory))
        self.assertEqual(cloudpickle.loads(data), before)

    def test_missing_cwd(self):
        missing = os.path.join(self.directory(), "no-such-directory")
        status, data = run_payload(missing, [], payload(add, 1, 2))
        self.assertEqual(status, Outcome.FAILED)
        report = read_error_report(data)
        self.assertEqual(report["type"], "FileNotFoundError")
        self.assertIn(repr(missing), report["message"])
        self.assertIn("working directory", report["message"])

    def test_cwd_is_a_file(self):
        path = os.path.join(self.directory(), "file")
        with open(path, "w") as f:
            f.write("x")
        status, data = run_payload(path, [], payload(add, 1, 2))
        self.assertEqual(status, Outcome.FAILED)
        self.assertIn(repr(path), read_error_report(data)["message"])

    def write_module(self, name: str, value: int) -> str:
        where = self.directory()
        with open(os.path.join(where, name + ".py"), "w") as f:
            f.write(f"VALUE = {value}\n")
        self.addCleanup(sys.modules.pop, name, None)
        return where

    def test_path_applied(self):
        where = self.write_module("cw_test_child_probe_a", 17)
        status, data = run_payload("", [where], payload(import_value, "cw_test_child_probe_a"))
        self.assertEqual((status, cloudpickle.loads(data)), (Outcome.OK, 17))
        self.assertEqual(sys.path[0], where)

    def test_path_in_front_in_order(self):
        first, second = self.directory(), self.directory()
        run_payload("", [first, second], payload(add, 1, 2))
        self.assertEqual(sys.path[:2], [first, second])

    def test_path_of_next_client_replaces_previous(self):
        first, second = self.directory(), self.directory()
        run_payload("", [first], payload(add, 1, 2))
        run_payload("", [second], payload(add, 1, 2))
        self.assertIn(second, sys.path)
        self.assertNotIn(first, sys.path)

    def test_existing_entries_not_duplicated(self):
        existing = sys.path[-1]
        before = sys.path.count(existing)
        fresh = self.directory()
        run_payload("", [fresh, existing], payload(add, 1, 2))
        run_payload("", [fresh, existing], payload(add, 1, 2))
        self.assertEqual(sys.path.count(existing), before)
        self.assertEqual(sys.path.count(fresh), 1)

    def test_existing_entries_kept_when_context_changes(self):
        existing = sys.path[-1]
        run_payload("", [self.directory(), existing], payload(add, 1, 2))
        run_payload("", [self.directory()], payload(add, 1, 2))
        self.assertIn(existing, sys.path)


class CachedFunctionTests(SynchronousTestCase, ContextIsolation):
    """
    A function cached for C{map} is unpickled in its client's context, and
    a failed unpickling is not kept.
    """

    def setUp(self):
        self.isolate()

    def pickled_function(self, name: str) -> tuple[str, bytes]:
        """A function of a module only in a fresh directory: C{(directory, pickle by reference)}."""
        where = self.directory()
        with open(os.path.join(where, name + ".py"), "w") as f:
            f.write("def triple(x):\n    return 3 * x\n")
        sys.path.insert(0, where)
        self.addCleanup(sys.modules.pop, name, None)
        data = cloudpickle.dumps(importlib.import_module(name).triple)
        sys.path.remove(where)
        del sys.modules[name]
        return where, data

    def run_map_jobs(self, job_child, where, functions, *args):
        from cw.wire import commands as P

        jobs = [P.Job(7, seq, cloudpickle.dumps(((x,), {})), b"", b"key") for seq, x in enumerate(args)]
        contexts = {"7": {"cwd": where, "path": [where]}} if functions else {}
        return job_child.run_batch(jobs, contexts, functions)["results"]

    def test_unpickled_in_client_context(self):
        where, data = self.pickled_function("cw_test_child_cached_a")
        [result] = self.run_map_jobs(child.JobChild(), where, {(7, b"key"): data}, 5)
        self.assertEqual(result.status, Outcome.OK, read_error_report(result.payload))
        self.assertEqual(cloudpickle.loads(result.payload), 15)

    def test_context_entered_once_per_job(self):
        """
        Once its function is unpickled, a job looks at the working
        directory once (L{child.enter_context} in L{child.run_payload}), not
        again before the function is fetched from the cache.
        """
        where, data = self.pickled_function("cw_test_child_cached_c")
        job_child = child.JobChild()
        self.run_map_jobs(job_child, where, {(7, b"key"): data}, 1)
        looks = []
        getcwd = os.getcwd
        self.patch(os, "getcwd", lambda: looks.append(1) or getcwd())
        [result] = self.run_map_jobs(job_child, where, {}, 2)
        self.assertEqual(cloudpickle.loads(result.payload), 6)
        self.assertEqual(len(looks), 1)

    def test_failed_load_not_kept(self):
        where, data = self.pickled_function("cw_test_child_cached_b")
        module = os.path.join(where, "cw_test_child_cached_b.py")
        os.rename(module, module + ".away")
        importlib.invalidate_caches()
        job_child = child.JobChild()
        [failed] = self.run_map_jobs(job_child, where, {(7, b"key"): data}, 1)
        self.assertEqual(read_error_report(failed.payload)["type"], "ModuleNotFoundError")
        os.rename(module + ".away", module)
        importlib.invalidate_caches()
        # The worker sends a function once per job process: not again here.
        [result] = self.run_map_jobs(job_child, where, {}, 2)
        self.assertEqual(result.status, Outcome.OK, read_error_report(result.payload))
        self.assertEqual(cloudpickle.loads(result.payload), 6)


class LeftoversTests(SynchronousTestCase):
    """
    A batch's last arguments are freed once its answer is sent
    (L{child.JobChild.let_go}), not before (freeing a big one takes
    milliseconds); the other jobs' as the next job starts, as before.
    """

    def test_arguments_freed(self):
        from cw.wire import commands as P

        Tracked.freed.clear()
        self.addCleanup(Tracked.freed.clear)
        job_child = child.JobChild()
        jobs = [P.Job(7, seq, payload(freed_before, Tracked(name))) for seq, name in enumerate("abc")]
        results = job_child.run_batch(jobs, {}, {})["results"]
        self.assertEqual([cloudpickle.loads(r.payload) for r in results], [[], ["a"], ["a", "b"]])
        self.assertEqual(Tracked.freed, ["a", "b"], "the last job's argument is not kept until the answer")
        job_child.let_go()
        self.assertEqual(Tracked.freed, ["a", "b", "c"])
        self.assertEqual((job_child.after_answer, job_child.last_arguments), ([], []))
