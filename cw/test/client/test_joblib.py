"""
The C{"cw"} joblib backend (L{cw.joblib}) against a real master with two
workers (three job processes): the same results as joblib's own C{loky}
backend, C{n_jobs=-1} as the cluster's slots, exceptions of their own
type, the generator modes, and a scikit-learn C{GridSearchCV} whose fits
run on the cluster.  Plus unit tests of how batches become cw jobs (one
cached function per C{Parallel} call).
"""

from __future__ import annotations

import functools
import os

from joblib import Parallel, delayed, effective_n_jobs, parallel_config
from joblib.parallel import BatchedCalls
from twisted.trial import unittest

import cw.joblib  # noqa: F401 - registers the "cw" backend
from cw.client import RemoteException, SubmitError, master_status
from cw.client.joblib_backend import ClusterBackend, _run_tasks, cluster_slots
from cw.test.client.test_executor_contract import in_thread
from cw.test.procs import shared_cluster

#: Job processes of the shared cluster.
SLOTS = 3


def cluster():
    return shared_cluster("joblib", slots=(2, 1))


def where(i):
    """A task: its input and the pid of the process that ran it, and that one's parent."""
    return i, os.getpid(), os.getppid()


def scaled(x, factor=1, offset=0):
    return x * factor + offset


def reciprocal(x):
    return 1 / x


def fail_on(bad, x):
    if x == bad:
        raise KeyError(f"no {x}")
    return x


def nested(i):
    """A task that runs a Parallel call of its own: which backend it gets, and the results."""
    from joblib.parallel import get_active_backend

    backend = type(get_active_backend()[0]).__name__
    return backend, Parallel(n_jobs=-1)(delayed(pow)(i, k) for k in range(3))


class Unpicklable:
    def __reduce__(self):
        raise TypeError("not today")


class BackendTests(unittest.TestCase):
    """The backend on a real cluster."""

    timeout = 240

    def setUp(self):
        self.address = None

    def config(self, **options):
        self.address = cluster().address
        return parallel_config(backend="cw", master=self.address, **options)

    def loky(self, n_jobs=2):
        return parallel_config(backend="loky", n_jobs=n_jobs)

    @in_thread
    def test_n_jobs_is_the_cluster_slot_count(self):
        """C{n_jobs=-1} is every slot of the cluster, C{-2} one fewer; a positive count stays."""
        with self.config():
            self.assertEqual(effective_n_jobs(-1), SLOTS)
            self.assertEqual(effective_n_jobs(-2), SLOTS - 1)
            self.assertEqual(effective_n_jobs(-10), 1)
            self.assertEqual(effective_n_jobs(5), 5)
            parallel = Parallel(n_jobs=-1)
            parallel(delayed(abs)(i) for i in range(3))
            self.assertEqual(parallel._effective_n_jobs(), SLOTS)

    @in_thread
    def test_same_results_as_loky(self):
        """
        A few workloads (many small tasks, keyword arguments, a closure over
        a larger object, tasks of different functions in one call) give what
        loky gives; the tasks ran in the cluster's job processes.
        """
        table = list(range(100_000))
        workloads = {
            "squares": lambda: [delayed(pow)(i, 2) for i in range(500)],
            "keywords": lambda: [delayed(scaled)(i, factor=3, offset=-i) for i in range(50)],
            "closure": lambda: [delayed(functools.partial(table.__getitem__))(i * 997) for i in range(50)],
            "mixed": lambda: [delayed(f)(i + 1) for i in range(40) for f in (reciprocal, abs, str)],
        }
        with self.config():
            ours = {name: Parallel(n_jobs=-1)(make()) for name, make in workloads.items()}
            ran = Parallel(n_jobs=-1)(delayed(where)(i) for i in range(30))
        with self.loky():
            theirs = {name: Parallel()(make()) for name, make in workloads.items()}
        self.assertEqual(ours, theirs)
        workers = {w.pid for w in cluster().workers}
        self.assertEqual([i for i, _, _ in ran], list(range(30)))
        self.assertLessEqual({parent for _, _, parent in ran}, workers)
        self.assertNotIn(os.getpid(), {pid for _, pid, _ in ran})

    @in_thread
    def test_exceptions_keep_their_type(self):
        """A task's exception reaches the caller as its own class, as with loky."""
        with self.config():
            with self.assertRaises(KeyError) as ours:
                Parallel(n_jobs=-1)(delayed(fail_on)(7, i) for i in range(20))
            with self.assertRaises(ZeroDivisionError):
                Parallel(n_jobs=-1)(delayed(reciprocal)(i) for i in range(-3, 3))
        with self.loky(), self.assertRaises(KeyError) as theirs:
            Parallel()(delayed(fail_on)(7, i) for i in range(20))
        self.assertEqual(ours.exception.args, theirs.exception.args)
        self.assertIsInstance(ours.exception, RemoteException)
        self.assertIn("no 7", str(ours.exception))

    @in_thread
    def test_generators(self):
        """
        C{return_as="generator"} yields in input order as results come;
        C{"generator_unordered"} yields all of them.
        """
        with self.config():
            results = Parallel(n_jobs=-1, return_as="generator")(delayed(pow)(i, 2) for i in range(100))
            self.assertFalse(isinstance(results, list))
            self.assertEqual(next(results), 0)
            self.assertEqual(list(results), [i * i for i in range(1, 100)])
            unordered = Parallel(n_jobs=-1, return_as="generator_unordered")(
                delayed(pow)(i, 2) for i in range(100)
            )
            self.assertEqual(sorted(unordered), [i * i for i in range(100)])

    @in_thread
    def test_nested_parallel_runs_sequentially(self):
        """A Parallel call inside a task runs in its job process, sequentially: the task holds one slot."""
        with self.config():
            results = Parallel(n_jobs=-1)(delayed(nested)(i) for i in range(4))
        self.assertEqual(results, [("SequentialBackend", [1, i, i * i]) for i in range(4)])

    @in_thread
    def test_grid_search(self):
        """
        A scikit-learn C{GridSearchCV} with C{n_jobs=-1} under the backend
        runs its fits on the cluster and finds what a sequential search
        finds.
        """
        from sklearn.datasets import load_iris  # heavy: only in this test
        from sklearn.model_selection import GridSearchCV
        from sklearn.svm import SVC

        x, y = load_iris(return_X_y=True)
        grid = {"C": [0.1, 1, 10], "gamma": [0.01, 0.1, 1]}
        sequential = GridSearchCV(SVC(), grid, cv=3, n_jobs=1).fit(x, y)
        with self.config():
            before = master_status(self.address)["completed"]
            search = GridSearchCV(SVC(), grid, cv=3, n_jobs=-1).fit(x, y)
            ran = master_status(self.address)["completed"] - before
        self.assertEqual(search.best_params_, sequential.best_params_)
        self.assertEqual(
            list(search.cv_results_["mean_test_score"]), list(sequential.cv_results_["mean_test_score"])
        )
        # 27 fits and the final refit's; at least one job per batch went through the master.
        self.assertGreaterEqual(ran, 1)


class FakeExecutor:
    """What the backend asks of a L{cw.client.ClusterExecutor}: C{submit} and C{_submit}, recorded."""

    timeout = None
    max_attempts = None

    def __init__(self):
        self.jobs = []

    def submit(self, fn, *args):
        self.jobs.append(("plain", fn, args))

    def _submit(self, fn, args, kwargs, options, cached):
        self.jobs.append(("cached", cached, args))


class BatchTests(unittest.TestCase):
    """How joblib batches become cw jobs."""

    def setUp(self):
        self.executor = FakeExecutor()
        self.backend = ClusterBackend(executor=self.executor)
        self.backend.configure(n_jobs=2)

    def batch(self, tasks):
        return BatchedCalls(tasks, (None, None))

    def test_one_function_cached_once_per_call(self):
        """
        Batches of one function are cached jobs with the same key, even when
        each task has a function object of its own (as C{delayed} wrappers
        of scikit-learn make), and carry only the arguments.
        """
        self.backend._send(self.batch([delayed(abs)(-1), delayed(abs)(-2)]))
        self.backend._send(self.batch([(functools.partial(abs), (-3,), {})]))
        self.backend._send(self.batch([(functools.partial(abs), (-4,), {})]))
        kinds = [kind for kind, _, _ in self.executor.jobs]
        self.assertEqual(kinds, ["cached"] * 3)
        (_, first, args), (_, second, _), (_, third, _) = self.executor.jobs
        self.assertEqual(args, ([((-1,), {}), ((-2,), {})],))
        self.assertEqual(second[0], third[0])
        self.assertNotEqual(first[0], second[0])
        self.assertEqual(len(self.backend._pickles), 2)

    def test_different_functions_one_plain_job(self):
        """A batch of tasks with different functions is one job that runs them all."""
        self.backend._send(self.batch([delayed(abs)(-1), delayed(str)(2)]))
        [(kind, fn, args)] = self.executor.jobs
        self.assertEqual((kind, fn), ("plain", _run_tasks))
        self.assertEqual(_run_tasks(*args), [1, "2"])

    def test_unpicklable_function(self):
        """A task function that cannot be pickled is refused at once, saying so."""
        with self.assertRaises(SubmitError) as caught:
            self.backend._send(self.batch([(Unpicklable(), (), {})]))
        self.assertIn("cannot be pickled", str(caught.exception))

    def test_terminate_forgets_the_cache(self):
        self.backend._send(self.batch([delayed(abs)(-1)]))
        self.backend.terminate()
        self.assertEqual((self.backend._keys, self.backend._pickles), ({}, {}))

    def test_slots(self):
        """Draining workers take no new jobs: their slots do not count."""
        status = {"workers": [{"slots": 4}, {"slots": 2, "draining": True}, {"slots": 1}]}
        self.assertEqual(cluster_slots(status), 5)
