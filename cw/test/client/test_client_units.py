"""
Tests for the parts of L{cw.client} and L{cw.errors} that need no master:
pickling calls, decoding results and remote exceptions.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import io
import logging
import os
import pickle
import subprocess
import sys
import threading

import cloudpickle
from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from cw.client import ClientThread, ClusterExecutor
from cw.client import session as session_module
from cw.client.echo import Echo
from cw.client.session import (
    client_context,
    decode_result,
    describe_unpicklable,
    job_options,
    logging_level,
    pickle_call,
    pickle_function,
)
from cw.client.thread import takes_output
from cw.core.records import Job, Outcome, Output, Result, Stream, error_report, read_options
from cw.errors import (
    EXCEPTION_PICKLE_LIMIT,
    CWError,
    JobCrashed,
    JobTimeout,
    RemoteException,
    SubmitError,
    WorkerLost,
    exception_fields,
    remote_error,
    typed_class,
)
from cw.worker import child as child
from cw.worker.child import run_payload


def failing_job():
    raise LookupError("no such thing")


class Unpicklable:
    """An object that refuses to be pickled and has a long repr."""

    def __reduce__(self):
        raise TypeError("refusing to be pickled")

    def __repr__(self):
        return "Unpicklable(" + "x" * 200 + ")"


class BadRepr(Unpicklable):
    """An unpicklable object whose repr fails too."""

    def __repr__(self):
        raise RuntimeError("no repr")


REPORT = {
    "type": "ValueError",
    "message": "bad value",
    "traceback": (
        'Traceback (most recent call last):\n  File "job.py", line 3, in compute\nValueError: bad value\n'
    ),
    "host": "node7",
    "pid": 1234,
}


class RemoteExceptionTests(SynchronousTestCase):
    """L{RemoteException} shows where and how a job failed."""

    def test_attributes(self):
        exc = RemoteException("job-1", REPORT)
        self.assertEqual(
            (exc.jobid, exc.type, exc.message, exc.host, exc.pid),
            ("job-1", "ValueError", "bad value", "node7", 1234),
        )
        self.assertEqual(exc.traceback, REPORT["traceback"])

    def test_str_shows_traceback_and_job(self):
        text = str(RemoteException("job-1", REPORT))
        self.assertIn("'job-1'", text)
        self.assertIn("node7", text)
        self.assertIn('File "job.py", line 3, in compute', text)
        self.assertIn("ValueError: bad value", text)

    def test_str_without_traceback(self):
        text = str(RemoteException(42, {"type": "MemoryError", "message": "out of memory"}))
        self.assertIn("42", text)
        self.assertIn("MemoryError: out of memory", text)

    def test_str_of_empty_report(self):
        self.assertIn("job 5 failed", str(RemoteException(5, {})))

    def test_args(self):
        exc = RemoteException("job-1", REPORT)
        self.assertEqual(exc.args, (str(exc),))

    def test_is_a_cw_error(self):
        self.assertIsInstance(RemoteException(1, {}), CWError)
        self.assertIsInstance(JobCrashed(1, {}), RemoteException)

    def test_picklable(self):
        for cls in (RemoteException, JobCrashed):
            exc = cls(("tuple", 1), REPORT)
            copy = pickle.loads(pickle.dumps(exc))
            self.assertIs(type(copy), cls)
            self.assertEqual(copy.jobid, ("tuple", 1))
            self.assertEqual(copy.report, REPORT)
            self.assertEqual(str(copy), str(exc))

    def test_cloudpicklable(self):
        copy = cloudpickle.loads(cloudpickle.dumps(RemoteException("j", REPORT)))
        self.assertEqual(str(copy), str(RemoteException("j", REPORT)))


class PickleCallTests(SynchronousTestCase):
    """L{pickle_call} makes a job payload or says what cannot be sent."""

    def test_payload(self):
        payload = pickle_call("j", divmod, (17, 5), {})
        func, args, kwargs = cloudpickle.loads(payload)
        self.assertEqual((func, args, kwargs), (divmod, (17, 5), {}))
        self.assertEqual(func(*args, **kwargs), (3, 2))

    def test_lambda_and_kwargs(self):
        payload = pickle_call("j", lambda a, *, b: a - b, (10,), {"b": 3})
        func, args, kwargs = cloudpickle.loads(payload)
        self.assertEqual(func(*args, **kwargs), 7)

    def test_not_callable(self):
        error = self.assertRaises(SubmitError, pickle_call, "job-9", 42, (), {})
        self.assertIn("'job-9'", str(error))
        self.assertIn("42 is not callable", str(error))

    def test_unpicklable_argument(self):
        error = self.assertRaises(SubmitError, pickle_call, "job-9", print, (1, threading.Lock()), {})
        text = str(error)
        self.assertIn("'job-9'", text)
        self.assertIn("argument 1 (lock", text)
        self.assertIn("cannot be pickled", text)
        self.assertIsInstance(error.__cause__, TypeError)

    def test_unpicklable_keyword_argument(self):
        error = self.assertRaises(SubmitError, pickle_call, 1, print, (1,), {"file": threading.Lock()})
        self.assertIn("keyword argument 'file'", str(error))

    def test_unpicklable_function(self):
        lock = threading.Lock()

        def uses_lock():
            with lock:
                return 1

        error = self.assertRaises(SubmitError, pickle_call, 1, uses_lock, (), {})
        self.assertIn("the function (function", str(error))

    def test_submit_error_is_value_error(self):
        self.assertRaises(ValueError, pickle_call, 1, None, (), {})
        self.assertTrue(issubclass(SubmitError, CWError))


class DescribeUnpicklableTests(SynchronousTestCase):
    """L{describe_unpicklable} names the first part of a call that cannot be pickled."""

    def test_first_offender(self):
        text = describe_unpicklable(print, (1, 2, threading.Lock(), threading.Lock()), {})
        self.assertTrue(text.startswith("argument 2 (lock"), text)

    def test_long_repr_shortened(self):
        text = describe_unpicklable(print, (Unpicklable(),), {})
        self.assertIn("argument 0 (Unpicklable Unpicklable(xxx", text)
        self.assertIn("...)", text)
        self.assertNotIn("x" * 100, text)
        self.assertIn("refusing to be pickled", text)

    def test_failing_repr(self):
        text = describe_unpicklable(print, (), {"k": BadRepr()})
        self.assertIn("keyword argument 'k' (BadRepr <", text)
        self.assertIn("refusing to be pickled", text)

    def test_nothing_to_blame(self):
        self.assertEqual(describe_unpicklable(print, (1,), {"a": 2}), "the call cannot be pickled")


class DecodeResultTests(SynchronousTestCase):
    """L{decode_result} turns a result record into a value or an exception."""

    def test_ok(self):
        result = Result(1, 1, Outcome.OK, cloudpickle.dumps({"v": [1, 2]}))
        self.assertEqual(decode_result("j", result), (True, {"v": [1, 2]}))

    def test_ok_but_unreadable(self):
        ok, exc = decode_result("j", Result(1, 1, Outcome.OK, b"garbage"))
        self.assertFalse(ok)
        self.assertIsInstance(exc, RemoteException)
        self.assertIn("could not be unpickled in the client", str(exc))
        self.assertEqual(exc.jobid, "j")

    def test_raised(self):
        payload = error_report(
            REPORT["type"], REPORT["message"], REPORT["traceback"], host=REPORT["host"], pid=REPORT["pid"]
        )
        ok, exc = decode_result("j", Result(1, 1, Outcome.RAISED, payload))
        self.assertFalse(ok)
        self.assertIs(type(exc), RemoteException)
        self.assertEqual((exc.type, exc.message, exc.host), ("ValueError", "bad value", "node7"))

    def test_crashed(self):
        ok, exc = decode_result("j", Result(1, 1, Outcome.CRASHED, error_report("ProcessDied", "signal 9")))
        self.assertFalse(ok)
        self.assertIs(type(exc), JobCrashed)
        self.assertIn("signal 9", str(exc))

    def test_failed(self):
        ok, exc = decode_result("j", Result(1, 1, Outcome.FAILED, error_report("OSError", "no cwd")))
        self.assertFalse(ok)
        self.assertIs(type(exc), RemoteException)

    def test_garbage_report(self):
        ok, exc = decode_result("j", Result(1, 1, Outcome.RAISED, b"\xffcore dumped"))
        self.assertFalse(ok)
        self.assertEqual(exc.type, "Error")
        self.assertIn("core dumped", str(exc))

    def test_job_process_exception_end_to_end(self):
        """What a job raised in a job process reaches the client with its traceback."""
        self.addCleanup(os.chdir, os.getcwd())
        self.addCleanup(sys.path.__setitem__, slice(None), list(sys.path))
        self.patch(child, "_inserted", [])
        status, data = run_payload("", [], pickle_call("job-3", failing_job, (), {}))
        ok, exc = decode_result("job-3", Result(1, 3, status, data))
        self.assertFalse(ok)
        text = str(exc)
        self.assertIn("'job-3'", text)
        self.assertIn("in failing_job", text)
        self.assertIn("LookupError: no such thing", text)


class ClientContextTests(SynchronousTestCase):
    """L{client_context} captures where this client's jobs should run."""

    def test_context(self):
        cwd = os.getcwd()
        self.patch(sys, "path", ["", "relative", "/abs/one", "/abs/one", cwd])
        context = client_context()
        self.assertEqual(context["cwd"], cwd)
        self.assertEqual(context["path"], [cwd, os.path.abspath("relative"), "/abs/one"])


class JobOptionTests(SynchronousTestCase):
    """Per-job options: defaults, overrides, validation and error classes."""

    class Owner:
        timeout = None
        max_attempts = None

    def test_no_options_no_bytes(self):
        self.assertEqual(job_options(self.Owner(), None, None), b"")

    def test_given_options_travel_as_json(self):
        options = job_options(self.Owner(), 2.5, 4)
        self.assertEqual(read_options(Job(0, 1, b"", options)), {"timeout": 2.5, "max_attempts": 4})

    def test_owner_defaults_and_overrides(self):
        owner = self.Owner()
        owner.timeout, owner.max_attempts = 10, 2
        self.assertEqual(
            read_options(Job(0, 1, b"", job_options(owner, None, None))), {"timeout": 10, "max_attempts": 2}
        )
        self.assertEqual(read_options(Job(0, 1, b"", job_options(owner, 1, None)))["timeout"], 1)

    def test_owner_defaults_followed_when_they_change(self):
        """
        Jobs without options of their own get their owner's defaults as they
        are at each submit (their encoding is kept per defaults), and a bad
        default is refused every time, whatever was submitted before.
        """
        owner = self.Owner()
        for timeout in (10, 20, 1, 1.0, None, 10):
            owner.timeout = timeout
            for _ in range(2):
                options = read_options(Job(0, 1, b"", job_options(owner, None, None)))
                self.assertEqual(options.get("timeout"), timeout)
                self.assertIs(type(options.get("timeout")), type(timeout))
        for bad in (True, 0, "1"):
            owner.timeout = bad
            for _ in range(2):
                self.assertRaises(SubmitError, job_options, owner, None, None)
        owner.timeout = None
        owner.forward_logging = ["INFO"]  # unhashable and bad: refused, not cached
        self.assertRaises(SubmitError, job_options, owner, None, None)

    def test_bad_values_refused(self):
        bad = [(0, None), (-1, None), ("1", None), (float("inf"), None), (float("nan"), None), (True, None)]
        bad += [(None, 0), (None, 1.5), (None, "3"), (None, True)]
        for timeout, attempts in bad:
            self.assertRaises(SubmitError, job_options, self.Owner(), timeout, attempts)

    def test_expected_duration(self):
        options = job_options(self.Owner(), None, None, expected_duration=90)
        self.assertEqual(read_options(Job(0, 1, b"", options)), {"expected_duration": 90})
        for bad in (0, -1, "5", float("nan"), True):
            self.assertRaises(SubmitError, job_options, self.Owner(), None, None, None, bad)

    def test_env(self):
        """C{env} travels sorted; a bad one raises SubmitError saying what is wrong."""
        options = job_options(self.Owner(), None, None, env={"B": "2", "A": "1"})
        self.assertEqual(options, b'{"env":{"A":"1","B":"2"}}')
        for bad, text in [({"A": 1}, "env values must be strings"), ("A=1", "env must be a dict")]:
            e = self.assertRaises(SubmitError, job_options, self.Owner(), None, None, env=bad)
            self.assertIn(text, str(e))

    def test_malformed_options_read_as_none(self):
        for raw in [b"{", b"[1]", b"\xff"]:
            self.assertEqual(read_options(Job(0, 1, b"", raw)), {})

    def test_error_classes_by_report_type(self):
        for kind, cls in [
            ("JobTimeout", JobTimeout),
            ("WorkerLost", WorkerLost),
            ("JobProcessDied", JobCrashed),
        ]:
            result = Result(1, 1, Outcome.CRASHED, error_report(kind, "m", host="h"))
            ok, error = decode_result("j", result)
            self.assertFalse(ok)
            self.assertIs(type(error), cls)
            self.assertEqual(pickle.loads(pickle.dumps(error)).report, error.report)
        self.assertTrue(issubclass(WorkerLost, JobCrashed))
        self.assertFalse(issubclass(JobTimeout, JobCrashed))


class HoldsALock(Exception):
    """An exception whose state cannot be pickled."""

    def __init__(self, message):
        super().__init__(message)
        self.lock = threading.Lock()


class TypedRemoteErrorTests(SynchronousTestCase):
    """L{exception_fields} in the job process and L{remote_error} in the client, without a master."""

    def raised(self, exc: BaseException) -> RemoteException:
        report = {"type": type(exc).__name__, "message": str(exc), "traceback": "tb", "host": "h", "pid": 1}
        return remote_error("j", {**report, **exception_fields(exc)})

    def test_class_made_once_per_type(self):
        first, second = self.raised(KeyError("a")), self.raised(KeyError("b"))
        self.assertIs(type(first), type(second))
        self.assertIs(type(first), typed_class(KeyError))
        self.assertEqual(type(first).__name__, "RemoteException(KeyError)")
        self.assertIsInstance(first, KeyError)
        self.assertEqual(first.args, ("a",))

    def test_pickles(self):
        """A typed exception pickles (plain pickle too) and comes back as the same class."""
        error = self.raised(ValueError("bad"))
        for dumps, loads in ((pickle.dumps, pickle.loads), (cloudpickle.dumps, cloudpickle.loads)):
            copy = loads(dumps(error))
            self.assertIs(type(copy), type(error))
            self.assertEqual((copy.args, copy.jobid, copy.host), (("bad",), "j", "h"))

    def test_unpicklable_state_dropped(self):
        """State that cannot be pickled is left out; the class and args still arrive."""
        error = self.raised(HoldsALock("locked"))
        self.assertIsInstance(error, HoldsALock)
        self.assertEqual(error.args, ("locked",))
        self.assertFalse(hasattr(error, "lock"))

    def test_too_big(self):
        error = self.raised(ValueError(b"x" * (EXCEPTION_PICKLE_LIMIT + 1)))
        self.assertIs(type(error), RemoteException)
        self.assertIn("over", error.fallback)

    def test_garbage(self):
        """An exception field that is not a pickle: a plain RemoteException saying why."""
        error = remote_error("j", {"type": "ValueError", "exception": "bm90IGEgcGlja2xl"})
        self.assertIs(type(error), RemoteException)
        self.assertIn("cannot be unpickled in the client", error.fallback)
        self.assertIn("raised as RemoteException, not as ValueError", str(error))
        self.assertNotIn("exception", error.report)

    def test_not_an_exception_class(self):
        import base64

        data = base64.b64encode(cloudpickle.dumps((int, (1,), None))).decode()
        error = remote_error("j", {"type": "int", "exception": data})
        self.assertIs(type(error), RemoteException)
        self.assertIn("is not an exception class", error.fallback)


#: Every built-in class a job may raise (C{Exception} and below).
BUILTIN_EXCEPTIONS = sorted(
    {
        value
        for value in vars(builtins).values()
        if isinstance(value, type) and issubclass(value, Exception) and not issubclass(value, Warning)
    },
    key=lambda cls: cls.__name__,
) + [Warning, UserWarning, DeprecationWarning]


#: Python 3.11's exception groups (none before).
EXCEPTION_GROUP = getattr(builtins, "BaseExceptionGroup", ())


def builtin_instance(cls: type, text: str) -> Exception:
    """An instance of the built-in exception class C{cls} with C{text} and the arguments it requires."""
    if issubclass(cls, UnicodeDecodeError):
        return cls("utf-8", b"\xff" + text.encode(), 0, 1, text)
    if issubclass(cls, UnicodeEncodeError):
        return cls("ascii", "\xe9" + text, 0, 1, text)
    if issubclass(cls, UnicodeTranslateError):
        return cls("\xe9" + text, 0, 1, text)
    if issubclass(cls, EXCEPTION_GROUP):
        return cls(text, [ValueError(text)])
    if issubclass(cls, OSError):
        return cls(2, text, "/no/" + text)
    return cls(text)


class BuiltinRemoteErrorTests(SynchronousTestCase):
    """
    A job's built-in exception comes back as an instance of both its class
    and L{RemoteException}, including the classes whose C{__new__} Python
    refuses to call for a class made from them by name (C{MemoryError}) and
    those with required arguments or read-only attributes.
    """

    def check(self, cls: type, text: str) -> None:
        original = builtin_instance(cls, text)
        cls = type(original)  # OSError(2, ...) is a FileNotFoundError
        report = {"type": cls.__name__, "message": str(original), "traceback": f"{cls.__name__}: tb\n"}
        error = remote_error("j", {**report, "host": "h", **exception_fields(original)})
        self.assertIsInstance(error, cls)
        self.assertIsInstance(error, RemoteException)
        self.assertIs(type(error), typed_class(cls))
        self.assertIsNone(error.fallback)
        self.assertEqual(repr(error.args), repr(original.args))
        self.assertEqual((error.type, error.jobid, error.host), (cls.__name__, "j", "h"))
        self.assertEqual(str(error), f"job 'j' failed on h; remote traceback:\n{cls.__name__}: tb")
        if issubclass(cls, OSError):
            self.assertEqual((error.errno, error.filename), (original.errno, original.filename))
        if issubclass(cls, EXCEPTION_GROUP):
            self.assertEqual(repr(error.exceptions), repr(original.exceptions))
        copy = pickle.loads(pickle.dumps(error))
        self.assertEqual((type(copy), repr(copy.args)), (type(error), repr(error.args)))

    def test_memory_error(self):
        """C{except MemoryError} catches a job's MemoryError (whose C{__new__} refuses a subclass)."""
        try:
            raise remote_error("j", {"type": "MemoryError", **exception_fields(MemoryError("out"))})
        except MemoryError as e:
            self.assertIsInstance(e, RemoteException)
            self.assertEqual(e.args, ("out",))

    def test_every_builtin_class(self):
        for cls in BUILTIN_EXCEPTIONS:
            with self.subTest(cls=cls.__name__):
                self.check(cls, "text")

    @given(st.sampled_from(BUILTIN_EXCEPTIONS), st.text(max_size=20))
    def test_builtin_classes_and_texts(self, cls, text):
        self.check(cls, text)


class ClientThreadOptionsTests(SynchronousTestCase):
    """ClientThread passes its connection and job options on to the ClusterExecutor under it."""

    def test_same_options_as_the_executor(self):
        """Every ClusterExecutor option is a ClientThread option, of the same kind and default."""
        executor = inspect.signature(ClusterExecutor).parameters
        thread = inspect.signature(ClientThread).parameters
        for name, parameter in executor.items():
            self.assertIn(name, thread)
            ours = (thread[name].kind, thread[name].default)
            self.assertEqual(ours, (parameter.kind, parameter.default), name)
        self.assertEqual(set(thread) - set(executor), {"callback", "progress"})


_REACTOR_STOP_PROGRAM = r"""
import threading, time
from twisted.internet import defer
from cw.client.session import call_in_reactor, running_reactor
from cw.errors import MasterUnavailable

reactor = running_reactor()
assert call_in_reactor(lambda: 7, timeout=30) == 7
outcomes = []

def waiter():
    started = time.monotonic()
    try:
        call_in_reactor(defer.Deferred, timeout=30)
    except MasterUnavailable as e:
        outcomes.append(("stopped", time.monotonic() - started, str(e)))
    except BaseException as e:
        outcomes.append((type(e).__name__, time.monotonic() - started, str(e)))

thread = threading.Thread(target=waiter)
thread.start()
time.sleep(0.2)
reactor.callFromThread(reactor.stop)
thread.join(15)
started = time.monotonic()
try:
    call_in_reactor(lambda: 1, timeout=15)
    outcomes.append(("after: returned", 0, ""))
except MasterUnavailable as e:
    outcomes.append(("after: stopped", time.monotonic() - started, str(e)))
print(outcomes)
"""


class ReactorStopTests(SynchronousTestCase):
    """
    A blocking call in flight when the reactor stops (the program exiting)
    fails at once with L{cw.errors.MasterUnavailable}, and so does one made
    afterwards, instead of each waiting out its (here 15-30 s) timeout.
    """

    def test_pending_and_later_calls_fail_at_once(self):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        done = subprocess.run(
            [sys.executable, "-c", _REACTOR_STOP_PROGRAM],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        outcomes = ast.literal_eval(done.stdout.strip().splitlines()[-1])
        self.assertEqual([o[0] for o in outcomes], ["stopped", "after: stopped"], outcomes)
        for kind, seconds, message in outcomes:
            self.assertLess(seconds, 10, kind)
            self.assertIn("reactor stopped", message)


_TRIAL_J_MODULE = """
from twisted.internet import threads
from twisted.trial import unittest

from cw.client.session import call_in_reactor


class T(unittest.TestCase):
    def test_a(self):
        return threads.deferToThread(call_in_reactor, lambda: 7, timeout=10)

    def test_b(self):
        return threads.deferToThread(call_in_reactor, lambda: 7, timeout=10)
"""


class TrialJobsTests(SynchronousTestCase):
    """
    C{trial -j N} fires the reactor's shutdown event after every test
    (C{TrialSuite._bail}) and runs the next one in the same reactor: the
    blocking client API keeps working there (it took that event for the
    program's exit, and failed every later call with MasterUnavailable).
    """

    def test_second_test_in_a_trial_worker(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        with open(os.path.join(directory, "cw_trial_j_module.py"), "w") as f:
            f.write(_TRIAL_J_MODULE)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([directory, *sys.path]))
        done = subprocess.run(
            [sys.executable, "-m", "twisted.trial", "-j1", "cw_trial_j_module"],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            cwd=directory,
        )
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertIn("PASSED (successes=2)", done.stdout)


class OutputOptionTests(SynchronousTestCase):
    """The job options echo and forward_logging, and the parts of live output that need no master."""

    class Owner:
        timeout = max_attempts = None
        echo = False
        forward_logging = None

    def options(self, owner=None, **given) -> dict:
        return read_options(Job(0, 1, b"", job_options(owner or self.Owner(), None, None, **given)))

    def test_job_options(self):
        self.assertEqual(self.options(), {})
        self.assertEqual(self.options(echo=True, forward_logging="info"), {"echo": True, "log": logging.INFO})
        owner = self.Owner()
        owner.echo, owner.forward_logging = True, logging.WARNING
        self.assertEqual(self.options(owner), {"echo": True, "log": logging.WARNING})
        self.assertEqual(self.options(owner, echo=False, forward_logging=False), {})
        for bad in ("LOUD", -1, 2.5, True, object()):
            self.assertRaises(SubmitError, logging_level, bad)
            self.assertRaises(SubmitError, job_options, self.Owner(), None, None, forward_logging=bad)

    def test_takes_output(self):
        """A callback gets the output only if it takes a third positional argument."""

        def two(jobid, result):
            pass

        def three(jobid, result, output):
            pass

        def optional(jobid, result, output=None):
            pass

        def star(*args):
            pass

        class Callable:
            def __call__(self, jobid, result, output):
                pass

        self.assertEqual(
            [takes_output(f) for f in (None, two, three, optional, star, Callable(), print)],
            [False, False, True, True, False, True, False],
        )

    def test_echo_lines(self):
        """Echo prefixes whole lines, keeps a line's start until its end, decodes split UTF-8."""
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        echo = Echo()
        snow = "\u2603".encode()
        echo.show("#3", "n7", Output(1, 3, Stream.STDOUT, b"one\ntw"))
        echo.show("#4", "n8", Output(1, 4, Stream.STDOUT, b"other job\n"))
        echo.show("#3", "n7", Output(1, 3, Stream.STDOUT, b"o " + snow[:1]))
        echo.show("#3", "n7", Output(1, 3, Stream.STDERR, b"an error\n"))
        self.assertEqual(out.getvalue(), "[#3 n7] one\n[#4 n8] other job\n")
        echo.show("#3", "n7", Output(1, 3, Stream.STDOUT, snow[1:] + b"\nthree"))
        echo.finish(3)
        echo.finish(4)
        self.assertEqual(
            out.getvalue(), "[#3 n7] one\n[#4 n8] other job\n[#3 n7] two \u2603\n[#3 n7] three\n"
        )
        self.assertEqual(err.getvalue(), "[#3 n7] an error\n")


class ResourceRequestTests(SynchronousTestCase):
    """What a job asks for is checked where it is submitted."""

    def test_client_refuses_bad_request(self):
        e = self.assertRaises(SubmitError, job_options, None, None, None, resources={"memory": "16Q"})
        self.assertIn("16Q", str(e))
        self.assertEqual(job_options(None, None, None, resources={"cpus": 1}, tags=()), b"")


def main_function(source: str, **globals_) -> tuple:
    """A function defined in a module named C{__main__} (pickled by value), and that module's globals."""
    namespace = {"__name__": "__main__", **globals_}
    exec(source, namespace)
    return namespace["f"], namespace


class SelfContainedTests(SynchronousTestCase):
    """
    L{pickle_function} pickles a self-contained function of C{__main__}
    once (L{cw.client.session.SelfContained}); anything its pickle could
    depend on that changes makes it pickle again, and any other function is
    pickled every time, so that a changed captured or global value is seen.
    """

    def setUp(self):
        self.pickled = 0
        dumps = session_module.cloudpickle.dumps

        def counting(value):
            self.pickled += 1
            return dumps(value)

        self.patch(session_module.cloudpickle, "dumps", counting)

    def test_pickled_once(self):
        f, _ = main_function("def f(x, y=2):\n    return [len(str(i)) for i in range(x + y)]")
        first = pickle_function(f)
        self.assertEqual(pickle_function(f), first)
        self.assertEqual(self.pickled, 1)
        self.assertEqual(cloudpickle.loads(first[1])(8), [1] * 10)

    def test_changes_pickled_again(self):
        f, namespace = main_function("def f(x=1):\n    return x + 1")
        g, _ = main_function("def f(x=1):\n    return x + 2")
        keys = {pickle_function(f)[0]}
        for change in [
            lambda: setattr(f, "__defaults__", (5,)),
            lambda: setattr(f, "__code__", g.__code__),
            lambda: setattr(f, "__doc__", "documented"),
            lambda: setattr(f, "__name__", "renamed"),
            lambda: namespace.__setitem__("__file__", "elsewhere.py"),
        ]:
            change()
            before = self.pickled
            key, data = pickle_function(f)
            self.assertEqual(self.pickled, before + 1)
            self.assertNotIn(key, keys)
            keys.add(key)
            self.assertEqual(pickle_function(f), (key, data))
            self.assertEqual(self.pickled, before + 1)
        self.assertEqual(cloudpickle.loads(data)(), 7)

    def test_others_pickled_every_time(self):
        """A global, a closure, a mutable default, attributes, a module: its pickle may change."""
        uses_global, namespace = main_function("def f():\n    return limit", limit=1)
        key = pickle_function(uses_global)[0]
        namespace["limit"] = 2
        self.assertNotEqual(pickle_function(uses_global)[0], key)
        self.assertEqual(cloudpickle.loads(pickle_function(uses_global)[1])(), 2)
        # A name that was no global when first pickled, and is one now.
        later, namespace = main_function("def f():\n    return later_global")
        pickle_function(later)
        namespace["later_global"] = 3
        self.assertEqual(cloudpickle.loads(pickle_function(later)[1])(), 3)
        nested, _ = main_function("def f():\n    return (lambda: limit)()", limit=4)
        closure, _ = main_function("def f():\n    n = [1]\n    def g():\n        return n\n    return g")
        mutable, _ = main_function("def f(x=[]):\n    return x")
        attributed, _ = main_function("def f():\n    return 1")
        attributed.note = [1]
        kwdefault, _ = main_function("def f(*, x=[]):\n    return x")
        for func in (nested, closure(), mutable, attributed, kwdefault, len):
            before = self.pickled
            pickle_function(func)
            pickle_function(func)
            self.assertEqual(self.pickled, before + 2, func)
        mutable.__defaults__[0].append(1)
        self.assertEqual(cloudpickle.loads(pickle_function(mutable)[1])(), [1])


class DeliverNowTests(SynchronousTestCase):
    """
    L{cw.client.executor._Jobs.deliver_results_now}: a result is delivered
    in the reactor thread (no switch to the delivery thread) only when that
    keeps the delivery thread's promises.
    """

    def setUp(self):
        from cw.client.executor import ClusterFuture, _Jobs

        self.jobs = _Jobs()
        self.future = ClusterFuture()
        self.seq = self.jobs.add(self.future)
        self.delivered: list = []

    def now(self, payload: bytes = b"x") -> bool:
        results = [Result(0, self.seq, Outcome.OK, payload)]
        return self.jobs.deliver_results_now(results, self.delivered.append)

    def test_idle(self):
        self.assertTrue(self.now())
        self.assertEqual(len(self.delivered), 1)

    def test_not_before_waiting_items(self):
        """Order: nothing overtakes an item the delivery thread has yet to deliver."""
        self.jobs.put("earlier")
        self.assertFalse(self.now())
        self.jobs.inbox.get()
        with self.jobs.delivering:
            self.jobs.delivered()
        self.assertTrue(self.now())

    def test_not_while_delivering(self):
        with self.jobs.delivering:
            self.assertFalse(self.now())

    def test_not_with_done_callbacks(self):
        """User code (a done-callback) never runs in the reactor thread."""
        self.future.add_done_callback(lambda f: None)
        self.assertFalse(self.now())
        self.assertReleased()

    def assertReleased(self):
        """Whether delivered or not, no lock is left held: another thread takes them at once."""
        taken = []

        def other():
            for lock in (self.jobs.delivering, self.future._condition):
                if lock.acquire(blocking=False):
                    lock.release()
                    taken.append(lock)

        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        self.assertEqual(len(taken), 2)

    def test_locks_released(self):
        self.assertTrue(self.now())
        self.assertReleased()
        self.jobs.put("earlier")
        self.assertFalse(self.now())
        self.assertReleased()

    def test_not_big(self):
        from cw.client.executor import DELIVER_NOW_BYTES

        self.assertFalse(self.now(b"x" * (DELIVER_NOW_BYTES + 1)))
        self.assertEqual(self.delivered, [])

    def test_not_a_burst(self):
        """Many results at once (a burst) go to the delivery thread, which overlaps with the reactor's I/O."""
        from cw.client.executor import DELIVER_NOW_RESULTS, ClusterFuture

        results = []
        for _ in range(DELIVER_NOW_RESULTS + 1):
            results.append(Result(0, self.jobs.add(ClusterFuture()), Outcome.OK, b"x"))
        self.assertFalse(self.jobs.deliver_results_now(results, self.delivered.append))


#: Seconds L{JobsIdleTests} wait for a thread (a bug fails them this fast).
IDLE_DEADLINE = 10


class JobsIdleTests(SynchronousTestCase):
    """
    L{cw.client.executor._Jobs.wait_idle} (shutdown's wait) returns once
    the table empties, whichever way it does: the table notifies only while
    someone waits (a lone job empties it with every result).
    """

    def wait_then(self, empty) -> None:
        from cw.client.executor import ClusterFuture, _Jobs

        jobs = _Jobs()
        future = ClusterFuture()
        seq = jobs.add(future)
        returned: list = []
        # Told, it returns well before its own timeout (which would return True too).
        waiter = threading.Thread(target=lambda: returned.append(jobs.wait_idle(6 * IDLE_DEADLINE)))
        waiter.start()

        def release():
            with jobs._lock:
                jobs._idle.notify_all()
            waiter.join()

        self.addCleanup(release)
        # Bounded: the waiter counts itself as it starts waiting.
        deadline = threading.Event()
        for _ in range(int(IDLE_DEADLINE * 100)):
            with jobs._lock:
                if jobs._idle_waiters:
                    break
            deadline.wait(0.01)
        empty(jobs, seq, future)
        waiter.join(IDLE_DEADLINE)
        self.assertEqual(returned, [True])
        self.assertEqual(jobs._idle_waiters, 0)

    def test_forget(self):
        self.wait_then(lambda jobs, seq, future: jobs.forget(seq))

    def test_pop(self):
        self.wait_then(lambda jobs, seq, future: jobs.pop(seq, future))

    def test_clear(self):
        self.wait_then(lambda jobs, seq, future: jobs.clear())

    def test_no_waiter(self):
        """Emptied with nobody waiting, a later wait returns at once."""
        from cw.client.executor import ClusterFuture, _Jobs

        jobs = _Jobs()
        jobs.forget(jobs.add(ClusterFuture()))
        self.assertTrue(jobs.wait_idle(0))
