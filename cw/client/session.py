"""
Client programs: submit jobs to a master and get their results back.

Two blocking APIs over one connection class (L{Session}, here) and one
delivery engine (L{ClusterExecutor}'s):

  - L{ClusterExecutor}: a L{concurrent.futures.Executor}.
  - L{ClientThread}: submit C{(jobid, func, args)} and receive
    C{callback(jobid, result)} for each job that succeeds; C{wait()} blocks
    until all jobs are done and raises L{RemoteException} for a failure.
    A layer over a L{ClusterExecutor} whose delivery thread hands it each
    job's outcome.

Both talk to the master through the Twisted reactor.  If no reactor is
running, crochet runs one in a background thread; if one already runs in
another thread (a Twisted program, or trial), that one is used.  Either
way, the blocking calls must be made from a thread other than the
reactor's.

Jobs are pickled with cloudpickle in the caller's thread, so a job that
cannot be pickled raises L{SubmitError} at C{submit}.  Results are unpickled
in a delivery thread, never in the reactor thread.

Layer rule (cw.client): imports cw.discovery and below; never cw.master, cw.worker, cw.launch or cw.cli.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import operator
import os
import socket
import sys
import threading
import types
import uuid
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import cloudpickle
import crochet
from twisted.application.internet import backoffPolicy
from twisted.internet import defer, task
from twisted.internet.error import ConnectionClosed, ConnectionLost
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python import threadable
from twisted.python.failure import Failure

from cw.client.arguments import REFERENCE_ABOVE, ArgumentFiles
from cw.client.mapping import progress as progress
from cw.core.payload import Segments, payload_size, read_reference, read_result_reference
from cw.core.validation import (
    MAX_NUMBER,
    MAX_REASON,
    MAX_WEIGHT,
    check_env,
    check_outputs,
    check_range,
    check_registered,
    check_request,
    check_results,
    check_session,
    check_text,
)
from cw.core.versions import CONTEXT_KEY, MISMATCH_MODES, short
from cw.discovery import MasterSource, default_host, is_address_file, master_source
from cw.errors import (
    REPORT_TYPES,
    AuthenticationFailed,
    BadCommand,
    JobCrashed,
    MasterUnavailable,
    PayloadUnavailable,
    RemoteException,
    ReportKind,
    SubmitError,
    remote_error,
)
from cw.system import machine_identity
from cw.wire import commands as P
from cw.wire import memfile, pickling
from cw.wire.address import FindingEndpoint, client_description, enable_keepalive
from cw.wire.auth import AuthGate, authenticate
from cw.wire.checked import CheckedCommands
from cw.wire.liveness import HeartbeatMonitor, SignsOfLife
from cw.wire.memfile import map_private
from cw.wire.private import can_write_now, push, tls_starting, write_now
from cw.wire.secret import load_secret
from cw.wire.streaming import STREAM_ABOVE, ChunkReceiver, SpareBuffers, StreamingSender
from cw.wire.versions import local_versions

log = Logger(namespace="cw.client")  # the namespace of its log lines before the layers

#: Where a client warns about workers with incompatible versions (the
#: standard library's logging, which a program sees without set-up).
version_log = logging.getLogger("cw.client")

#: Bytes of submitted jobs a client lets wait to be sent before submit
#: blocks (one job of any size is always accepted).
SEND_WINDOW = 256 << 20

#: Seconds a client keeps trying to reach its master before giving up.
CONNECT_TIMEOUT = float(os.environ.get("CW_CONNECT_TIMEOUT", "10"))

#: Seconds a client waits to hear from its master (an answer to its
#: heartbeats, or anything else) before it fails its outstanding jobs with
#: L{MasterUnavailable}; C{CW_MASTER_TIMEOUT} or C{master_timeout=} change it.
MASTER_TIMEOUT = 20.0

#: Seconds a client keeps trying to get its master back after losing it
#: (reconnecting, resubmitting its jobs) before its jobs fail with
#: L{MasterUnavailable}; C{reconnect_timeout=} changes it, 0 turns it off.
RECONNECT_TIMEOUT = 300.0

#: Seconds between attempts to reach the master: 0.05, doubling up to 1.
_connect_delay = backoffPolicy(initialDelay=0.05, maxDelay=1.0, factor=2.0, jitter=lambda: 0)

_setup_lock = threading.Lock()
_setup_done = False


def running_reactor():
    """
    The global reactor, running in some thread other than the caller's.

    Starts it in a crochet thread if nothing runs it yet.  Raises
    L{RuntimeError} when called from the reactor's own thread, where a
    blocking call would deadlock.
    """
    global _setup_done
    # Imported here, not at the top: importing the reactor installs the
    # default one, and a program (or twistd, or trial) that imports cw.client
    # must still be able to install its own reactor first.
    from twisted.internet import reactor

    with _setup_lock:
        if not _setup_done:
            if reactor.running:
                crochet.no_setup()
            else:
                crochet.setup()
            _setup_done = True
    if threadable.isInIOThread() and reactor.running:
        raise RuntimeError(
            "cw's blocking client API was called from the reactor thread;"
            " call it from another thread (e.g. deferToThread)"
        )
    return reactor


def call_in_reactor(func: Callable, *args, timeout: float | None = None, **kwargs) -> Any:
    """
    Run C{func} (which may return a Deferred) in the reactor; wait for its
    result, at most C{timeout} seconds (then raise L{TimeoutError}).

    Not crochet's C{run_in_reactor}: its results call the deprecated
    C{Event.isSet()}, so that a program run with C{-W
    error::DeprecationWarning} would never get one.
    """
    reactor = running_reactor()
    done = threading.Event()
    outcome: list = []
    name = getattr(func, "__name__", func)

    def finish(result: Any) -> None:
        if not outcome:
            outcome.append(result)
        done.set()

    def stopped() -> None:
        finish(Failure(MasterUnavailable(f"{name}: the reactor stopped (the program is exiting)")))

    with _pending_lock:
        _watch_shutdown(reactor)
        if _reactor_stopping:
            stopped()
            _pending_calls.discard(stopped)
        else:
            _pending_calls.add(stopped)
    try:
        if not done.is_set():
            reactor.callFromThread(lambda: defer.maybeDeferred(func, *args, **kwargs).addBoth(finish))
        if not done.wait(timeout):
            raise TimeoutError(f"{name} did not finish in the reactor within {timeout} s")
    finally:
        with _pending_lock:
            _pending_calls.discard(stopped)
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


# Blocking calls waiting on the reactor, failed at once when it shuts down
# (at the program's exit) instead of each waiting out its timeout.
_pending_lock = threading.Lock()
_pending_calls: set[Callable[[], None]] = set()
_reactor_stopping = False
_shutdown_watched: set[int] = set()


def _watch_shutdown(reactor: Any) -> None:
    """Once per reactor: fail pending blocking calls when it begins to stop."""
    if id(reactor) in _shutdown_watched:
        return
    _shutdown_watched.add(id(reactor))

    def fail_pending() -> None:
        global _reactor_stopping
        with _pending_lock:
            _reactor_stopping = True
            pending = list(_pending_calls)
        for stop in pending:
            stop()

    def started() -> None:
        # A reactor that stopped cannot start again, but one whose shutdown
        # event was only fired can: trial -j fires it after every test
        # (TrialSuite._bail) and runs the next in the same reactor.
        global _reactor_stopping
        with _pending_lock:
            _reactor_stopping = False

    reactor.callFromThread(reactor.addSystemEventTrigger, "before", "shutdown", fail_pending)
    reactor.callFromThread(reactor.addSystemEventTrigger, "after", "startup", started)


def describe_unpicklable(func: Callable, args: tuple, kwargs: dict) -> str:
    """Name the part of a call that cloudpickle refuses."""
    parts = [("the function", func)]
    parts += [(f"argument {i}", a) for i, a in enumerate(args)]
    parts += [(f"keyword argument {k!r}", v) for k, v in kwargs.items()]
    for label, obj in parts:
        try:
            cloudpickle.dumps(obj)
        except Exception as e:
            return f"{label} ({type(obj).__name__} {_short_repr(obj)}) cannot be pickled: {e}"
    return "the call cannot be pickled"


def _short_repr(obj: Any) -> str:
    try:
        text = repr(obj)
    except Exception:
        text = object.__repr__(obj)
    return text if len(text) <= 80 else text[:77] + "..."


def pickle_call(jobid: Any, func: Callable, args: tuple, kwargs: dict) -> bytes | Segments:
    """
    The job payload for C{func(*args, **kwargs)}, or L{SubmitError}: its
    big buffers are not copied (L{cw.wire.pickling}), so the caller must
    not change them until the job's result arrives.
    """
    if not callable(func):
        raise SubmitError(f"job {jobid!r}: {_short_repr(func)} is not callable")
    try:
        return pickling.dumps(pickling.call_value(func, args, kwargs))
    except Exception as e:
        raise SubmitError(f"job {jobid!r} cannot be sent: {describe_unpicklable(func, args, kwargs)}") from e


def pickle_function(func: Callable) -> tuple[bytes, bytes]:
    """
    C{(key, pickle)} of a function to be cached on workers: its cloudpickle
    and a digest of that pickle, or L{SubmitError}.  A self-contained
    function (L{SelfContained}) is pickled once, not at every submit.
    """
    if not callable(func):
        raise SubmitError(f"{_short_repr(func)} is not callable")
    known = _self_contained.get(func)
    if known is not None:
        return known
    try:
        data = cloudpickle.dumps(func)
    except Exception as e:
        raise SubmitError(f"the function {_short_repr(func)} cannot be pickled: {e}") from e
    pickled = hashlib.blake2b(data, digest_size=16).digest(), data
    _self_contained.put(func, pickled)
    return pickled


class SelfContained:
    """
    The pickles of self-contained functions, by function: a function of
    C{__main__} (which cloudpickle pickles by value) without a closure,
    attributes, annotations or keyword defaults, whose defaults are
    scalars and whose code (nested code included) names no global of its
    module.  Such a function's pickle follows from its own attributes
    alone (code, defaults, names, doc) and its module's identifying
    globals, so it is the same as long as these are the same objects,
    which L{get} checks: submitting it again costs that check rather than
    cloudpickle's 15 us or more (issue 18, a lone job's round trip).  Any
    other function is pickled every time, so that a changed captured or
    global value is seen (L{cw.client.executor.RecentFunctions}).
    """

    #: The module globals that cloudpickle pickles with every function of the module.
    BASE_GLOBALS = ("__package__", "__name__", "__path__", "__file__")

    def __init__(self) -> None:
        self._entries: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    @staticmethod
    def _state(func: Callable, names: frozenset[str] | None = None) -> tuple | None:
        """
        What C{func}'s pickle follows from, if it is self-contained; else
        None.  C{names}: those its code uses (L{_code_names}), if known.
        """
        if type(func) is not types.FunctionType or func.__module__ != "__main__":
            return None
        if func.__closure__ is not None or func.__dict__ or func.__kwdefaults__ is not None:
            return None
        if getattr(func, "__annotations__", None):
            return None
        defaults = func.__defaults__
        if defaults is not None and not all(type(value) in _SCALARS for value in defaults):
            return None
        module = func.__globals__
        if names is None:
            names = _code_names(func.__code__)
        # (In C: the shorter of the two is walked.)
        if not module.keys().isdisjoint(names):
            return None
        return (
            func.__code__,
            defaults,
            func.__name__,
            func.__qualname__,
            func.__module__,
            func.__doc__,
            *(module.get(name) for name in SelfContained.BASE_GLOBALS),
        )

    def get(self, func: Callable) -> tuple[bytes, bytes] | None:
        """C{func}'s C{(key, pickle)} if it is known and still the same; else None."""
        if type(func) is not types.FunctionType:
            return None
        with self._lock:
            entry = self._entries.get(func)
        if entry is None:
            return None
        state, names, pickled = entry
        if func.__code__ is not state[0]:
            return None
        now = self._state(func, names)
        if now is None or len(now) != len(state) or not all(map(operator.is_, now, state)):
            return None
        return pickled

    def put(self, func: Callable, pickled: tuple[bytes, bytes]) -> None:
        """Remember C{func}'s C{(key, pickle)} if it is self-contained (forget it if not)."""
        if type(func) is not types.FunctionType:
            return
        names = _code_names(func.__code__)
        state = self._state(func, names)
        with self._lock:
            if state is None:
                self._entries.pop(func, None)
            else:
                self._entries[func] = (state, names, pickled)


#: Types whose values cannot change (L{SelfContained}'s defaults).
_SCALARS = frozenset({int, float, complex, str, bytes, bool, type(None)})


def _code_names(code: types.CodeType) -> frozenset[str]:
    """The names C{code} and the code nested in it use (globals among them)."""
    found = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            found |= _code_names(const)
    return frozenset(found)


_self_contained = SelfContained()


def pickle_arguments(jobid: Any, func: Callable, args: tuple, kwargs: dict) -> bytes | Segments:
    """The payload of a job whose function is cached: its pickled arguments (as in L{pickle_call})."""
    try:
        return pickling.dumps(pickling.arguments_value(args, kwargs))
    except Exception as e:
        raise SubmitError(f"job {jobid!r} cannot be sent: {describe_unpicklable(func, args, kwargs)}") from e


def client_secret(secret_file: str | None = None, insecure: bool | None = None) -> bytes | None:
    """
    The secret a client or worker authenticates with (see L{cw.wire.secret}), or
    None when C{insecure} (default: C{CW_INSECURE} in the environment) is set.
    """
    if insecure is None:
        insecure = os.environ.get("CW_INSECURE", "").lower() in ("1", "true", "yes")
    if insecure:
        return None
    return load_secret(secret_file)


def logging_level(value: Any) -> int | None:
    """
    A C{forward_logging} setting as a level number (None: off), or
    L{SubmitError}: a level (C{logging.INFO}, 20) or its name (C{"INFO"}).
    """
    if value is None or value is False:
        return None
    if isinstance(value, str):
        level = logging.getLevelName(value.upper())
        if isinstance(level, int):
            return level
    elif isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise SubmitError(f"forward_logging must be a logging level (logging.INFO, 'INFO'), not {value!r}")


def job_options(
    owner: Any,
    timeout: float | None = None,
    max_attempts: int | None = None,
    priority: int | None = None,
    expected_duration: float | None = None,
    *,
    echo: bool | None = None,
    forward_logging: int | str | None = None,
    resources: Mapping[str, Any] | None = None,
    tags: Iterable[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> bytes:
    """
    L{P.Job.options} for one job: the given options, else the defaults of
    C{owner} (a L{ClientThread} or L{ClusterExecutor}); checked here so that
    a bad value raises L{SubmitError} in the caller.  C{resources} and
    C{tags}: what the job asks of its worker (L{check_request}); C{env}:
    environment variables it runs with (L{check_env}).
    """
    if (
        timeout is None
        and max_attempts is None
        and priority is None
        and expected_duration is None
        and echo is None
        and forward_logging is None
        and resources is None
        and tags is None
        and env is None
    ):
        # A job with no options of its own (most jobs): its options follow
        # from its owner's defaults alone, checked and encoded once.
        values = (
            getattr(owner, "timeout", None),
            getattr(owner, "max_attempts", None),
            getattr(owner, "echo", False),
            getattr(owner, "forward_logging", None),
        )
        # With their types: 1, 1.0 and True are one key, not one option.
        defaults = (*values, *map(type, values))
        try:
            return _DEFAULT_OPTIONS[defaults]
        except (KeyError, TypeError):
            pass
    else:
        defaults = None
    try:
        resources, tags = check_request(resources, tags)
        env = check_env(env)
    except ValueError as e:
        raise SubmitError(f"{e}") from None
    if timeout is None:
        timeout = getattr(owner, "timeout", None)
    if max_attempts is None:
        max_attempts = getattr(owner, "max_attempts", None)
    if echo is None:
        echo = getattr(owner, "echo", False)
    if forward_logging is None:
        forward_logging = getattr(owner, "forward_logging", None)
    level = logging_level(forward_logging)
    if timeout is not None and not P.valid_timeout(timeout):
        raise SubmitError(f"timeout must be a positive number of seconds, not {timeout!r}")
    if max_attempts is not None and (
        isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1
    ):
        raise SubmitError(f"max_attempts must be a positive integer, not {max_attempts!r}")
    if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int)):
        raise SubmitError(f"priority must be an integer, not {priority!r}")
    if expected_duration is not None and not P.valid_timeout(expected_duration):
        raise SubmitError(f"expected_duration must be positive seconds, not {expected_duration!r}")
    options = P.encode_options(
        timeout=timeout,
        max_attempts=max_attempts,
        priority=priority or None,
        expected_duration=expected_duration,
        echo=bool(echo) or None,
        log=level,
        resources=resources or None,
        tags=tags or None,
        env=env or None,
    )
    if defaults is not None:
        try:
            if len(_DEFAULT_OPTIONS) >= _DEFAULT_OPTIONS_KEPT:
                _DEFAULT_OPTIONS.clear()
            _DEFAULT_OPTIONS[defaults] = options
        except TypeError:
            pass  # an unhashable default: checked (and encoded) every time
    return options


#: L{job_options} of jobs without options of their own, by their owner's
#: defaults (C{timeout}, C{max_attempts}, C{echo}, C{forward_logging}) and
#: their types.
_DEFAULT_OPTIONS: dict[tuple, bytes] = {}
_DEFAULT_OPTIONS_KEPT = 64


class _NoAnswer(Exception):
    """Nothing answered at the master's address (or there is no address yet): worth trying again."""


def seconds_setting(name: str, value: Any) -> float:
    """C{value} as a number of seconds >= 0, else L{ValueError} naming the setting."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise ValueError(f"{name} must be a number of seconds >= 0, not {value!r}")
    return float(value)


def master_timeout_setting(value: float | None) -> float:
    """
    A client's C{master_timeout}: C{value}, else C{CW_MASTER_TIMEOUT} from
    the environment, else L{MASTER_TIMEOUT}; 0 turns the check off.
    """
    if value is None:
        text = os.environ.get("CW_MASTER_TIMEOUT", "")
        try:
            value = float(text) if text else MASTER_TIMEOUT
        except ValueError:
            raise ValueError(f"CW_MASTER_TIMEOUT must be a number of seconds, not {text!r}") from None
    return seconds_setting("master_timeout", value)


def session_name(session: str | None) -> str:
    """
    A client's session name: C{session} if given (1 to 128 printable
    characters, else L{ValueError}), else a new random one.
    """
    if session is None:
        return uuid.uuid4().hex
    try:
        return check_session(session)
    except BadCommand as e:
        raise ValueError(f"bad session name: {e}") from None


def client_context() -> dict:
    """The working directory and sys.path that this client's jobs run with."""
    cwd = os.getcwd()
    path = [os.path.abspath(p) if p else cwd for p in sys.path]
    return {"cwd": cwd, "path": list(dict.fromkeys(path))}


class ClientProtocol(SignsOfLife, StreamingSender, AuthGate, ChunkReceiver, CheckedCommands, amp.AMP):
    """
    A client's connection to the master; accepts results only once the
    master is authenticated.  What the master sends is checked as the master
    checks its peers (L{CheckedCommands}): a malformed command ends the
    connection with one log line.
    """

    def __init__(self, session: Session) -> None:
        super().__init__()
        self.session = session
        self.lost = defer.Deferred()
        #: Boxes that another thread sent while it could not write them
        #: itself (and the unwritten end of one it wrote in part): the
        #: reactor thread sends them, in order, before anything else.
        self._backlog: list = []
        self._backlog_call = False
        #: Held while boxes are put on this connection: by the reactor
        #: thread, and by L{Session.send}'s caller (see L{sendBox}).
        self.send_lock = threading.RLock()
        #: The thread that L{Session.send} lets write its lone job itself,
        #: while it does (under C{send_lock}).
        self.writer: int | None = None
        # Big results are assembled in the memory of earlier ones, once
        # nothing uses it (a bytes result copied out, an array let go of):
        # no fresh pages for the kernel to clear, map and free each time.
        self.spare_buffers = SpareBuffers(session.reactor)

    def sendBox(self, box):
        """
        Send C{box}.  From the reactor thread, as AMP does, after anything
        other threads left for it.  From another thread (L{Session.send}'s
        lone job, which then needs no wake-up of the reactor thread):
        straight to the socket when nothing is ahead of it
        (L{cw.wire.private.write_now}), else handed to the reactor thread,
        in order.  Under C{send_lock} either way, so that boxes go out in
        the order they were signed and numbered.
        """
        with self.send_lock:
            if self.writer != threading.get_ident():
                if self._backlog:
                    self._send_backlog()
                super().sendBox(box)
                return
            if (
                not self._backlog
                and self._outgoing is None
                and not tls_starting(self)
                and can_write_now(self.transport)
                and sum(map(len, box.values())) < STREAM_ABOVE
            ):
                data = self.box_bytes(box)
                written = write_now(self.transport, data)
                if written == len(data):
                    return
                box = data[written:]
            self._backlog.append(box)
            if not self._backlog_call:
                self._backlog_call = True
                self.session.reactor.callFromThread(self._drain_backlog)

    def _drain_backlog(self) -> None:
        with self.send_lock:
            self._backlog_call = False
            self._send_backlog()
        push(self.transport)

    def _send_backlog(self) -> None:
        """Send what other threads left (reactor thread, holding C{send_lock})."""
        backlog, self._backlog = self._backlog, []
        for item in backlog:
            try:
                if isinstance(item, bytes):
                    if self.transport is not None:
                        self.transport.write(item)
                else:
                    super().sendBox(item)
            except ConnectionLost:
                return  # the session handles the loss

    def resumeProducing(self) -> None:
        """Write the next piece of a streamed box (under C{send_lock}, as L{sendBox})."""
        with self.send_lock:
            super().resumeProducing()

    def connectionMade(self):
        super().connectionMade()
        # Heartbeats notice a master that hangs (L{cw.wire.liveness}); keepalive,
        # one that vanished while they are off.
        enable_keepalive(self.transport)

    @P.Heartbeat.responder
    def heartbeat(self):
        """The master checks that this client is alive."""
        return {}

    @P.JobResults.responder
    def job_results(self, results):
        check_results(results)
        self.session.results_arrived(results)
        self.session.took(results)
        return {}

    @P.StoredResults.responder
    def stored_results(self, results):
        """Results that waited for this session on the master's disk: answered once they are here."""
        check_results(results)
        self.session.results_arrived(results)
        return {}

    @P.FetchPayload.responder
    def fetch_payload(self, seq):
        """The master wants the bytes of an argument left here, for a worker on another machine."""
        return {"payload": self.session.kept_argument(seq)}

    @P.JobRoom.responder
    def job_room(self, bytes, jobs):
        check_range("bytes", bytes, 0, MAX_NUMBER)
        check_range("jobs", jobs, 0, MAX_NUMBER)
        self.session.room(bytes, jobs)
        return {}

    @P.OutputNotice.responder
    def output_notice(self, host, outputs):
        check_outputs(host, outputs)
        if self.session.on_output is not None:
            self.session.on_output(host, outputs)
        return {}

    @P.JobsStored.responder
    def jobs_stored(self, keys):
        self.session.stored([seq for _, seq in keys])
        return {}

    @P.JobsStarted.responder
    def jobs_started(self, keys):
        if self.session.on_started is not None:
            self.session.on_started([seq for _, seq in keys])
        return {}

    def stream_progress(self) -> None:
        self.session.sent_some()

    @P.MasterStopping.responder
    def master_stopping(self, reason):
        check_text("reason", reason, MAX_REASON)
        self.session.master_stopping(self, reason)
        return {}

    @P.SessionReplaced.responder
    def session_replaced(self, reason):
        self.session.replaced(self, reason)
        return {}

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self.spare_buffers.clear()
        self.session.connection_lost(self, reason)
        self.lost.callback(None)


class Session:
    """
    One client's connection to a master, usable from any non-reactor
    thread.  C{on_results(list)} and C{on_lost(exc)} are called in the
    reactor thread and must not block; so is C{on_started(seqs)}, if given,
    with the jobs the master handed to workers (L{P.JobsStarted}), and
    C{on_output(host, outputs)}, if set, with what running jobs wrote
    (L{P.OutputNotice}).

    With a C{reconnect_timeout} (seconds, 0: off), a lost connection is not
    the end: the session finds the master again (C{find}, a
    L{cw.discovery.MasterSource}, before each attempt; else the same
    address), with back-off, for up to that long, registers under the same
    session name and resends every job it has no result for, with its
    options and the functions they use.  Only then does C{on_lost} get
    L{MasterUnavailable}.  To resend them it keeps each job it sent until
    the job's result arrives.
    """

    on_output: Callable[[str, list[P.Output]], None] | None = None

    def __init__(
        self,
        host: str | None,
        port: int | None,
        on_results: Callable[[list[P.Result]], None],
        on_lost: Callable[[Exception], None],
        connect_timeout: float | None = None,
        secret_file: str | None = None,
        insecure: bool | None = None,
        weight: int = 1,
        master_timeout: float | None = None,
        on_started: Callable[[list[int]], None] | None = None,
        session: str | None = None,
        version_mismatch: str = "error",
        on_session_jobs: Callable[[list[int]], None] | None = None,
        reconnect_timeout: float = 0,
        find: MasterSource | None = None,
    ) -> None:
        #: The client's session name (L{session_name}), the same on every
        #: connection: its jobs are known by C{(session, seq)}.
        self.name = session_name(session)
        if version_mismatch not in MISMATCH_MODES:
            choices = " or ".join(map(repr, MISMATCH_MODES))
            raise ValueError(f"version_mismatch must be {choices}, not {version_mismatch!r}")
        #: What becomes of jobs sent to workers whose versions are
        #: incompatible with this client's (L{cw.core.versions}).
        self.version_mismatch = version_mismatch
        #: This client's versions, as reported to the master.
        self.versions = local_versions()
        #: The incompatible workers the master named at registration.
        self.mismatched: list[dict] = []
        if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= MAX_WEIGHT:
            raise ValueError(f"weight must be an integer from 1 to {MAX_WEIGHT}, not {weight!r}")
        self.weight = weight
        #: Seconds without a sign of life from the master before its jobs
        #: fail (0: no limit); see L{cw.wire.liveness}.
        self.master_timeout = master_timeout_setting(master_timeout)
        #: Seconds to keep trying to reach the master again after losing
        #: it, before its jobs fail (0: fail at once).
        self.reconnect_timeout = seconds_setting("reconnect_timeout", reconnect_timeout)
        self._beats: HeartbeatMonitor | None = None
        self.secret = client_secret(secret_file, insecure)
        self.reactor = running_reactor()
        #: How to find the master again (None: the same address).
        self.find = find if find is not None else master_source(host)
        #: The master's address (an endpoint description); None until an
        #: address file or SLURM has given one.
        self.address: str | None = None if is_address_file(host) else client_description(host, port)
        #: Connects to the master, found again first if it was found through discovery.
        self._endpoint = FindingEndpoint(self.reactor, self.address, self.find, self._found)
        self.on_results = on_results
        self.on_lost = on_lost
        self.on_started = on_started
        #: Called in the reactor thread, right after each registration and
        #: before any result, with the numbers of this session's jobs that
        #: the master holds (L{P.SessionJobs}).
        self.on_session_jobs = on_session_jobs
        #: Whether the master keeps a state file (C{--state}): then jobs it
        #: has acknowledged (L{P.JobsStored}) outlive it and this client.
        self.durable = False
        #: Whether the master keeps the results it sends until this client
        #: acknowledges them (L{P.ResultsTaken}); and those to acknowledge
        #: at the end of this reactor turn.
        self.acks = False
        self._taken: list[int] = []
        #: Jobs sent to a durable master that it has not acknowledged yet.
        self._unstored: set[int] = set()
        self.proto: ClientProtocol | None = None
        self.client_id = 0
        #: The master's payload limit, learnt at registration.
        self.max_payload = P.MAX_PAYLOAD
        #: Whether big arguments are left in this process's memory and sent
        #: as references (L{cw.client.arguments}): the master allowed it.
        self.references = False
        #: The memory files holding them.
        self.arguments = ArgumentFiles()
        self.closing = False
        #: C{"connecting"}, C{"connected"}, C{"reconnecting"} (the
        #: connection was lost and the session tries to get it back),
        #: C{"lost"} (for good) or C{"closed"}.
        self.state = "connecting"
        #: While reconnecting: when the connection was lost, and why.
        self.lost_at: float | None = None
        self.lost_why = ""
        #: Connections made after the first.
        self.reconnects = 0
        #: Jobs sent again on the last new connection.
        self.resubmitted = 0
        #: When the reconnect window opened: the first loss since a result arrived.
        self._window_start: float | None = None
        self._lock = threading.Lock()
        #: Jobs not sent yet, by sequence number, in the order submitted.
        self._pending: dict[int, P.Job] = {}
        #: Jobs sent whose results have not arrived, kept to resend them on
        #: another connection (only with a reconnect_timeout).
        self._sent: dict[int, P.Job] = {}
        self._cancels: list[tuple[int, int]] = []
        #: Functions to define before the pending jobs, and the keys defined
        #: on this connection.
        self._defines: list[tuple[bytes, bytes]] = []
        self._defined: set[bytes] = set()
        #: Every function defined, by key, to define again on another
        #: connection (only with a reconnect_timeout).
        self._functions: dict[bytes, bytes] = {}
        #: Payload bytes of L{_pending}; with what the connection has yet to
        #: write, it is what L{send} keeps under L{SEND_WINDOW}.
        self._pending_bytes = 0
        self._sent_some = threading.Condition(self._lock)
        #: Room left in the master's queue (L{P.JobRoom}): jobs are sent
        #: only while both are positive; the rest wait in L{_pending}.
        self._room_bytes = 0
        self._room_jobs = 0
        #: Jobs L{_pending} may hold before L{wait_for_room} blocks: the
        #: master's job limit, learnt at registration.
        self._job_window = 1
        self._flush_scheduled = False
        #: Jobs sent on this connection whose results have not arrived (a
        #: cancelled job counts as arrived): a job sent while none is out
        #: is a lone job, which L{send} may write from its caller's thread.
        self._in_flight = 0
        #: This machine (L{machine_identity}): workers on it lend this
        #: client big results from their memory instead of sending them,
        #: and its big arguments stay here (L{references}).
        self.machine = machine_identity()
        #: Jobs sent again because their result could not be taken from
        #: the worker's memory (each is, once).
        self._unreachable: set[int] = set()
        timeout = CONNECT_TIMEOUT if connect_timeout is None else connect_timeout
        call_in_reactor(self._connect, timeout, timeout=timeout + 30)

    @property
    def where(self) -> str:
        """The master's address for messages, and how it was found."""
        address = self.address or "(no address yet)"
        return address if self.find is None else f"{address} (found through {self.find})"

    def _found(self, address: str) -> None:
        self.address = address

    @property
    def _keep_sent(self) -> bool:
        return self.reconnect_timeout > 0

    def kept_argument(self, seq: int):
        """
        Job C{seq}'s argument, for the master (L{P.FetchPayload}): from its
        memory file if it was left in one (L{cw.client.arguments}), else
        as kept for a resubmission (L{_keep_sent}: the master let go of it
        once dispatched, and runs the job again).  L{PayloadUnavailable}
        if this client no longer holds it.
        """
        try:
            return self.arguments.read(seq)
        except PayloadUnavailable:
            with self._lock:
                job = self._sent.get(seq)
            if job is None or read_reference(job.payload) is not None:
                raise
            return job.payload

    @defer.inlineCallbacks
    def _open(self, timeout: float):
        """
        One attempt: find the master, connect, authenticate and register.
        Fires with C{(proto, answer)}; fails with L{_NoAnswer} if nothing
        answers at the address, else with L{AuthenticationFailed} or
        L{MasterUnavailable} saying what went wrong.
        """
        factory = Factory.forProtocol(lambda: ClientProtocol(self))
        try:
            proto = yield self._endpoint.connect(factory).addTimeout(max(timeout, 0.1), self.reactor)
        except Exception as e:
            raise _NoAnswer(f"{e.__class__.__name__}: {e}") from None
        address = self.address
        try:
            yield authenticate(proto, self.secret, "client", address)
        except AuthenticationFailed:
            proto.transport.loseConnection()
            raise
        except Exception as e:
            proto.transport.loseConnection()
            raise MasterUnavailable(
                f"the connection to the cw master at {self.where} broke while"
                f" authenticating ({e.__class__.__name__}: {e}); for ssl: addresses"
                " check the certificates, otherwise check that this is a cw master"
            ) from None
        try:
            answer = yield proto.callRemote(
                P.RegisterClient,
                version=P.PROTOCOL_VERSION,
                host=socket.gethostname(),
                pid=os.getpid(),
                context={
                    **client_context(),
                    "weight": self.weight,
                    P.RUNNING_NOTICES: self.on_started is not None,
                    CONTEXT_KEY: self.version_mismatch,
                    P.MACHINE: self.machine,
                    P.KEEPS_ARGUMENTS: self._keep_sent,
                    P.TAKES_RESULTS: True,
                },
                session=self.name,
                versions=self.versions,
            )
        except Exception as e:
            proto.transport.loseConnection()
            hint = (
                " (it requires authentication: do not set insecure / CW_INSECURE)"
                if self.secret is None
                else ""
            )
            raise MasterUnavailable(f"the cw master at {self.where} refused this client{hint}: {e}") from None
        try:
            check_registered(answer, "client_id")
        except BadCommand as e:
            proto.transport.loseConnection()
            raise MasterUnavailable(
                f"the cw master at {self.where} answered this client's registration with a"
                f" malformed field: {e}; install the same cw version everywhere"
            ) from None
        return proto, answer

    @defer.inlineCallbacks
    def _connect(self, timeout: float):
        """The first connection: retry while nothing answers, for up to C{timeout} seconds."""
        deadline = self.reactor.seconds() + timeout
        for attempt in itertools.count():
            try:
                proto, answer = yield self._open(deadline - self.reactor.seconds())
                break
            except _NoAnswer as e:
                left = deadline - self.reactor.seconds()
                if left <= 0:
                    raise MasterUnavailable(
                        f"no cw master answers at {self.where} ({e}); start one with"
                        " 'twistd -n cw-master' or cw.start(), or pass the master's host"
                    ) from None
                yield task.deferLater(self.reactor, min(_connect_delay(attempt), left))
        try:
            yield self._adopt(proto, answer)
        except MasterUnavailable:
            self.closing = True  # the constructor fails: nothing to reconnect for
            raise

    @defer.inlineCallbacks
    def _adopt(self, proto: ClientProtocol, answer: dict):
        """
        Make C{proto}, just registered, this session's connection; learn
        which of the session's jobs the master holds (L{P.SessionJobs}), and
        resend those of the last connection it does not hold.
        """
        self.proto = proto
        self.client_id = answer["client_id"]
        self.state = "connected"
        if self.master_timeout:
            self._beats = HeartbeatMonitor(
                self.reactor, self.master_timeout / 4, self.master_timeout, self._master_silent
            )
            self._beats.watch(proto)
            self._beats.start()
        self.max_payload = answer["max_payload"]
        self.references = bool(answer.get("references")) and memfile.supported()
        self._job_window = answer["room_jobs"]
        self.mismatched = answer.get("mismatched") or []
        if self.mismatched:
            self._warn_mismatched()
        try:
            held = yield proto.callRemote(P.SessionJobs)
        except Exception as e:
            proto.transport.loseConnection()
            raise MasterUnavailable(
                f"the connection to the cw master at {self.where} broke right after this client"
                f" registered ({e.__class__.__name__}: {e})"
            ) from None
        self.durable = held["durable"]
        self.acks = bool(held.get("acks"))
        self._taken = []
        seqs = [seq for _, seq in held["keys"]]
        with self._lock:
            # The last connection's unacknowledged jobs go again (below) or
            # are held by this master already.
            self._unstored = set()
            self._in_flight = 0
            if self._sent:
                # Every job without a result that this master does not hold
                # (one with --state may) goes again, in the order first
                # submitted, ahead of those submitted since.
                for seq in seqs:
                    self._sent.pop(seq, None)
                self.resubmitted = len(self._sent)
                again = {**self._sent, **self._pending}
                self._pending = {seq: again[seq] for seq in sorted(again)}
                self._pending_bytes += sum(payload_size(job.payload) for job in self._sent.values())
                self._sent = {}
            if not self.references and len(self.arguments):
                # A master that takes no references (one with --state): the bytes go.
                for job in self._pending.values():
                    if read_reference(job.payload) is not None:
                        job.payload = self.arguments.take_back(job.seq)
            # Functions are defined once per connection: again on this one,
            # those that jobs still to be sent use.
            needed = {job.func for job in self._pending.values() if job.func}
            self._defined = set(needed)
            self._defines = [(key, self._functions[key]) for key in needed if key in self._functions]
        if self.on_session_jobs is not None:
            self.on_session_jobs(seqs)
        self.room(answer["room_bytes"], answer["room_jobs"])

    def _warn_mismatched(self) -> None:
        """Warn, once at connect, of the workers whose versions are incompatible with this client's."""
        workers = "; ".join(f"{m['worker']} runs {short(m.get('versions'))}" for m in self.mismatched)
        if self.version_mismatch == "avoid":
            fate = "this client's jobs are not sent to them (version_mismatch='avoid')"
        else:
            fate = (
                "jobs sent to them fail with IncompatibleWorker; pass version_mismatch='avoid'"
                " to keep this client's jobs off them"
            )
        version_log.warning(
            "cw: this client runs %s, but %d worker(s) of the master at %s are incompatible"
            " (%s): %s; install the same Python and cloudpickle versions everywhere",
            short(self.versions),
            len(self.mismatched),
            self.address,
            workers,
            fate,
        )

    def results_arrived(self, results: list[P.Result]) -> None:
        self._window_start = None
        if self.machine is not None:
            results = self._take_lent(results)
        with self._lock:
            self._in_flight = max(0, self._in_flight - len(results))
            if self._sent:
                for result in results:
                    self._sent.pop(result.seq, None)
        try:
            self.on_results(results)
        finally:
            # After the results are handed on: closing a big argument's
            # file frees its memory (about 0.3 ms per MB), which the
            # result need not wait for.
            if len(self.arguments):
                self.arguments.close(result.seq for result in results)

    def took(self, results: list[P.Result]) -> None:
        """
        These results (L{P.JobResults}) are handed on: tell a master that
        keeps them until then (L{acks}), in one box for all that arrive in
        this reactor turn (reactor thread).
        """
        if not self.acks or not results:
            return
        if not self._taken:
            self.reactor.callLater(0, self._send_taken)
        self._taken.extend(result.seq for result in results)

    def _send_taken(self) -> None:
        """Send the acknowledgements gathered by L{took} (L{P.ResultsTaken})."""
        taken, self._taken = self._taken, []
        proto = self.proto
        if proto is None or not taken:
            return  # the master keeps them for this session's next connection
        for start in range(0, len(taken), 50_000):
            proto.callRemote(P.ResultsTaken, keys=[(0, seq) for seq in taken[start : start + 50_000]])

    def _take_lent(self, results: list[P.Result]) -> list[P.Result]:
        """
        C{results} with those a worker on this machine lent by reference
        (L{cw.core.payload.ResultReference}) mapped from its memory file,
        which it is then told to close (L{P.ReleaseResults}).  A result
        whose file cannot be opened (its worker died meanwhile) is not
        lost: its job is sent again (once), or fails saying so.
        """
        released = []
        taken = []
        for result in results:
            where = read_result_reference(result.payload) if result.status == P.Outcome.OK else None
            if where is None:
                taken.append(result)
                continue
            released.append((where.worker, result.seq))
            try:
                # Not populated here, in the reactor thread: its pages are
                # read (or not, for arrays) in the delivery thread.
                result.payload = map_private(
                    where.pid, where.fd, where.length, where.inode, "worker", where.offset, populate=False
                )
            except OSError as e:
                if not self._resend_unreachable(result.seq, where, e):
                    taken.append(self._unreachable_result(result, where, e))
                continue
            taken.append(result)
        proto = self.proto
        if released and proto is not None:
            proto.callRemote(P.ReleaseResults, keys=released)
        return taken

    def _resend_unreachable(self, seq: int, where, error: OSError) -> bool:
        """
        Send job C{seq} again, whose result could not be taken from its
        worker's memory (C{where}); False if it cannot be (it is not kept,
        see C{reconnect_timeout}, or it was sent again for this already).
        """
        with self._lock:
            job = self._sent.pop(seq, None)
            if job is None or seq in self._unreachable:
                return False
            self._unreachable.add(seq)
            self._in_flight = max(0, self._in_flight - 1)
            self._pending[seq] = job
            self._pending_bytes += payload_size(job.payload)
            wake = not self._flush_scheduled
            self._flush_scheduled = True
        log.warn(
            "cw client session {name}: job {seq}'s result could not be taken from the memory of"
            " worker process {pid} on this machine ({e}); running the job again",
            name=self.name,
            seq=seq,
            pid=where.pid,
            e=error,
        )
        if wake:
            self.reactor.callLater(0, self._flush)
        return True

    @staticmethod
    def _unreachable_result(result: P.Result, where, error: OSError) -> P.Result:
        """The failure of a job whose result could not be taken from its worker's memory."""
        message = (
            f"job {result.seq}'s result ({where.length:,} bytes) lay in the memory of worker process"
            f" {where.pid} on {socket.gethostname()}, which this client could not open: {error}"
            " (the worker died or was restarted meanwhile); submit the job again"
        )
        report = P.error_report(ReportKind.WORKER_LOST, message, host=socket.gethostname(), pid=where.pid)
        return P.Result(result.client, result.seq, P.Outcome.FAILED, report, result.stdout, result.stderr)

    def connection_lost(self, proto: ClientProtocol, reason) -> None:
        why = proto.rejected or reason.getErrorMessage()  # rejected: this side dropped it, and why
        # A master this client refused (a box without a valid MAC: forged or
        # corrupted on the way) is not one to resend jobs to.
        self._lost(
            proto, f"lost the connection to the cw master at {self.where}: {why}", final=bool(proto.rejected)
        )

    def master_stopping(self, proto: ClientProtocol, reason: str) -> None:
        """
        The master announced that it shuts down: fail every outstanding job
        now, saying so, rather than on the connection error that follows
        (or, with a reconnect_timeout, wait for a master to come back).
        """
        self._lost(
            proto,
            f"the cw master at {self.where} shut down ({reason}); the jobs it had"
            " not finished are lost, submit them again once a master is back",
        )
        proto.transport.loseConnection()

    def replaced(self, proto: ClientProtocol, reason: str) -> None:
        """
        Another client registered this session (L{P.SessionReplaced}): this
        one's jobs are dropped, and it does not reconnect (the two would
        otherwise take the session from each other for ever).
        """
        self._lost(
            proto,
            f"the cw master at {self.where} dropped this client: {reason}; its jobs are lost"
            f" (give each client a session name of its own)",
            final=True,
        )
        proto.transport.loseConnection()

    def _master_silent(self, proto: ClientProtocol, silent: float) -> None:
        """The master gave no sign of life for too long: fail its jobs now and drop it."""
        self._lost(
            proto,
            f"the cw master at {self.where} gave no sign of life for {silent:.1f} s"
            f" (master_timeout / CW_MASTER_TIMEOUT: {self.master_timeout:g} s): it is hung,"
            " stopped or unreachable; the jobs it had not finished are lost, submit them"
            " again to a master that works",
        )
        proto.transport.abortConnection()

    def _lost(self, proto: ClientProtocol, message: str, final: bool = False) -> None:
        """
        Handle the end of the registered connection C{proto}, once: reconnect
        (unless C{final}), or fail its jobs.
        """
        if proto is not self.proto:
            return
        if self._beats is not None:
            self._beats.stop()
            self._beats = None
        self.proto = None
        with self._lock:
            # The next master gives room of its own; cancellations were for this one.
            self._room_bytes = self._room_jobs = 0
            self._cancels = []
        self.sent_some()
        if self.closing:
            self.arguments.close()
            return
        if self._keep_sent and not final:
            self._reconnect(message)
            return
        self.state = "lost"
        self.arguments.close()
        self.on_lost(MasterUnavailable(message))

    @defer.inlineCallbacks
    def _reconnect(self, message: str):
        """Find and reach the master again, for up to L{reconnect_timeout} seconds."""
        self.state = "reconnecting"
        self.lost_at = self.reactor.seconds()
        self.lost_why = message
        if self._window_start is None:
            self._window_start = self.lost_at
        # The window runs from the first loss since a result last arrived, so
        # that a connection lost again and again before any result (a job the
        # master keeps refusing) ends too.
        deadline = self._window_start + self.reconnect_timeout
        log.warn(
            "cw client session {name}: {why}; reconnecting for up to {t:g} s (reconnect_timeout)",
            name=self.name,
            why=message,
            t=self.reconnect_timeout,
        )
        last = ""
        for attempt in itertools.count():
            left = deadline - self.reactor.seconds()
            if self.closing or left <= 0 or not self.reconnect_timeout:
                break
            try:
                proto, answer = yield self._open(min(left, 30.0))
            except Exception as e:
                last = str(e)
                left = deadline - self.reactor.seconds()
                if left > 0 and not self.closing:
                    yield task.deferLater(self.reactor, min(_connect_delay(attempt), left))
                continue
            if self.closing:
                proto.transport.loseConnection()
                return
            self.resubmitted = 0
            try:
                yield self._adopt(proto, answer)
            except MasterUnavailable:
                return  # lost again at once: that loss reconnects anew
            self.reconnects += 1
            log.info(
                "cw client session {name}: reconnected to the cw master at {where} after {s:.1f} s;"
                " resubmitted {n} jobs",
                name=self.name,
                where=self.where,
                s=self.reactor.seconds() - self.lost_at,
                n=self.resubmitted,
            )
            self.lost_at = None
            return
        if self.closing:
            return
        self.state = "lost"
        self.arguments.close()
        self.on_lost(
            MasterUnavailable(
                f"{message}; no cw master answered at {self.where} within {self.reconnect_timeout:g} s"
                f" (reconnect_timeout; last try: {last or 'none'}): the jobs without a result are"
                " lost. Start a master there (or point the address file, CW_MASTER or SLURM at"
                " one), then submit them again with a new client, or allow a longer"
                " reconnect_timeout"
            )
        )

    def stop_reconnecting(self) -> None:
        """
        Ride through no more losses (as C{reconnect_timeout=0}): the next
        loss, or the one being ridden out, fails the outstanding jobs.
        """
        self.reconnect_timeout = 0.0

    def _check_usable(self) -> None:
        """Raise L{MasterUnavailable} unless jobs can be sent now or after reconnecting."""
        if self.state == "lost" or (self.proto is None and self.state != "reconnecting"):
            raise MasterUnavailable(f"not connected to the cw master at {self.where}")

    def send(self, job: P.Job, jobid: Any = None, now: bool = False) -> None:
        """
        Queue a job for the master; jobs sent in a burst share boxes.  A job
        over the master's payload limit raises L{SubmitError} here.  While
        reconnecting, jobs wait for the next connection.  With C{now}, a
        lone job (no other job of this session is out) is written to the
        connection by this thread itself where it can, rather than by the
        reactor thread woken up to do it: one thread switch less per round
        trip.  Jobs sent while others are out are left to the reactor
        thread, which sends those of a burst in shared boxes.
        """
        size = len(job.payload)
        if size > self.max_payload:
            raise SubmitError(P.too_big(f"job {jobid!r}", size, self.max_payload))
        self._check_usable()
        if size >= REFERENCE_ABOVE and self.references:
            # Left in this process's memory: a reference travels instead.
            job.payload = self.arguments.leave(job.seq, job.payload) or job.payload
        with self._lock:
            self._pending[job.seq] = job
            self._pending_bytes += size
            wake = not self._flush_scheduled
            self._flush_scheduled = True
            # (Even with a flush scheduled: by define, for this job's function.)
            here = now and not self._in_flight and len(self._pending) == 1
        if here and not threadable.isInIOThread():
            self._flush(here=True)
        elif wake:
            self.reactor.callFromThread(self._flush)

    def wait_for_room(self, give_up: Callable[[], bool] = lambda: False) -> None:
        """
        Flow control: block while more than L{SEND_WINDOW} bytes of jobs, or
        more jobs than the master queues per client, wait to be sent (the
        master has no room for them yet, or it or the network is slower than
        this client), rather than pile up pickled payloads.  Call before L{send}, holding no lock that the
        reactor thread or a shutdown needs.  Returns early once C{give_up()}
        is true or the session closes; raises L{MasterUnavailable} if the
        connection is lost meanwhile (for good, when reconnecting).
        """
        if not self.full():
            # The common case, without the lock: what it would read under the
            # lock may change as soon as it is released anyway (issue 18).
            return
        with self._lock:
            while self.full():
                if self.closing or give_up():
                    return
                if self.state == "lost" or (self.proto is None and self.state != "reconnecting"):
                    raise MasterUnavailable(f"lost the connection to the cw master at {self.where}")
                self._sent_some.wait(1.0)

    def full(self) -> bool:
        """Whether L{wait_for_room} would block now (for callers that must not block)."""
        return self._backlog() > SEND_WINDOW or len(self._pending) > self._job_window

    def define(self, key: bytes, function: bytes) -> None:
        """
        Make sure the master has this cached function before the jobs sent
        after this call (once per connection).
        """
        if key in self._defined:
            return
        if len(function) > self.max_payload:
            raise SubmitError(P.too_big("the pickled function", len(function), self.max_payload))
        with self._lock:
            if key in self._defined:
                return
            self._defined.add(key)
            self._defines.append((key, function))
            if self._keep_sent:
                self._functions[key] = function
            wake = not self._flush_scheduled
            self._flush_scheduled = True
        if wake:
            self.reactor.callFromThread(self._flush)

    def _backlog(self) -> int:
        proto = self.proto
        return self._pending_bytes + (proto.outgoing_bytes if proto is not None else 0)

    def room(self, more_bytes: int, more_jobs: int) -> None:
        """The master has room for this many more bytes and jobs (L{P.JobRoom})."""
        with self._lock:
            self._room_bytes += more_bytes
            self._room_jobs += more_jobs
        self._flush()

    def _held(self) -> bool:
        """Whether jobs wait for room in the master's queue (call with the lock)."""
        return self._room_bytes <= 0 or self._room_jobs <= 0

    def stored(self, seqs: list[int]) -> None:
        """The master committed these jobs to its state file (L{P.JobsStored})."""
        with self._lock:
            self._unstored.difference_update(seqs)
            self._sent_some.notify_all()

    def wait_stored(self, timeout: float) -> bool:
        """
        Block until every job sent so far is on the master's disk (sent,
        and acknowledged by a master with C{--state}); False if that takes
        over C{timeout} seconds.  Raises L{MasterUnavailable} if the
        connection is lost meanwhile.
        """
        self.reactor.callFromThread(self._flush)
        with self._lock:
            done = self._sent_some.wait_for(
                lambda: self.proto is None or not (self._pending or self._unstored), timeout
            )
            if self.proto is None and (self._pending or self._unstored):
                raise MasterUnavailable(
                    f"lost the connection to the cw master at {self.address} before it stored"
                    f" {len(self._pending) + len(self._unstored)} jobs"
                )
            return done

    def sent_some(self) -> None:
        """The connection wrote part of a big box: wake senders waiting for room."""
        with self._lock:
            self._sent_some.notify_all()

    def cancel(self, seq: int) -> None:
        """
        Ask the master to withdraw job C{seq}; cancellations are batched like
        jobs.  A job not sent yet, or sent on a connection since lost, is
        just forgotten (it is not sent again).
        """
        with self._lock:
            self._sent.pop(seq, None)
            job = self._pending.pop(seq, None)
            if len(self.arguments):
                self.arguments.close([seq])
            if job is not None:
                # Not sent yet (held back by flow control): just drop it.
                self._pending_bytes -= payload_size(job.payload)
                self._sent_some.notify_all()
                return
            if self.proto is None:
                return
            self._in_flight = max(0, self._in_flight - 1)
            self._cancels.append((0, seq))
            wake = not self._flush_scheduled
            self._flush_scheduled = True
        if wake:
            self.reactor.callFromThread(self._flush)

    def _flush(self, here: bool = False) -> None:
        """
        Send what waits: in the reactor thread, or, C{here}, in L{send}'s
        caller's, which then writes to the connection itself where it can;
        under the connection's C{send_lock}, so that two flushes cannot
        overtake each other.
        """
        proto = self.proto
        if proto is None:
            with self._lock:
                self._flush_scheduled = False
            return  # everything waits for the next connection, if any
        with proto.send_lock:
            if here:
                proto.writer = threading.get_ident()
                try:
                    self._send_waiting(proto)
                finally:
                    proto.writer = None
            else:
                self._send_waiting(proto)
                push(proto.transport)  # written now, not on the reactor's next turn

    def _send_waiting(self, proto: ClientProtocol) -> None:
        """L{_flush}'s work, holding C{proto}'s C{send_lock}."""
        with self._lock:
            self._flush_scheduled = False
            if self.proto is not proto:
                return  # lost meanwhile: a new connection flushes once registered
            jobs = self._take_sendable()
            cancels, self._cancels = self._cancels, []
            defines, self._defines = self._defines, []
            if self.durable and jobs:
                self._unstored.update(job.seq for job in jobs)
        for key, function in defines:
            proto.callRemote(P.DefineFunction, client=0, key=key, function=function)
        for batch in P.batches(jobs, P.job_size):
            proto.callRemote(P.SubmitJobs, jobs=batch)
        # After the jobs: a job submitted and cancelled in one burst is
        # queued, then withdrawn.
        for start in range(0, len(cancels), 50_000):
            proto.callRemote(P.CancelJobs, keys=cancels[start : start + 50_000])

    def _take_sendable(self) -> list[P.Job]:
        """
        Take the pending jobs that fit in the master's room (call with the
        lock): jobs go while room is left, so at most the last one overshoots.
        """
        if self._held() or not self._pending:
            return []
        jobs = []
        size = 0
        for job in self._pending.values():
            if self._room_bytes - size <= 0 or self._room_jobs - len(jobs) <= 0:
                break
            size += payload_size(job.payload)
            jobs.append(job)
        # Not held, so the loop took at least one job.
        keep = self._keep_sent
        for job in jobs:
            del self._pending[job.seq]
            if keep:
                self._sent[job.seq] = job
        self._pending_bytes -= size
        self._room_bytes -= size
        self._room_jobs -= len(jobs)
        self._in_flight += len(jobs)
        self._sent_some.notify_all()
        return jobs

    def connection_status(self) -> dict:
        """The client's side: its state, session and master, and while reconnecting, since when and why."""
        status = {"connection": self.state, "session": self.name, "master": self.where}
        if self.state == "reconnecting" and self.lost_at is not None:
            lost_for = self.reactor.seconds() - self.lost_at
            status.update(
                reason=self.lost_why,
                reconnecting_for=lost_for,
                gives_up_in=max(0.0, self.reconnect_timeout - lost_for),
            )
        return status

    def call(self, command, timeout: float = 30, **kwargs) -> dict:
        """Call an answered command on the master and wait for the answer."""

        def go():
            if self.proto is None:
                raise MasterUnavailable(f"not connected to the cw master at {self.where}")
            d = self.proto.callRemote(command, **kwargs)
            d.addTimeout(timeout, self.reactor)
            return d

        try:
            return call_in_reactor(go, timeout=timeout + 30)
        except ConnectionClosed:
            raise MasterUnavailable(
                f"lost the connection to the cw master at {self.where} before it answered {command.__name__}"
            ) from None
        except defer.TimeoutError:
            raise TimeoutError(
                f"the cw master at {self.where} did not answer {command.__name__} within {timeout} s"
            ) from None

    def probe_workers(
        self, packages: list[str] = [], context: dict | None = None, timeout: float = 30
    ) -> list[dict]:
        """
        Every worker's answer to L{P.Probe} (versions, C{packages}, clock,
        and whether it sees C{context}'s paths), through the master
        (L{P.ProbeWorkers}); workers that do not answer within C{timeout}
        seconds are listed with an C{"error"}.
        """
        answer = self.call(
            P.ProbeWorkers,
            timeout=timeout + 10,
            packages=list(packages),
            context=context,
            wait=float(timeout),
        )
        return answer["workers"]

    def close(self, timeout: float = 10) -> None:
        """Flush pending jobs and close the connection (or stop reconnecting)."""

        def go():
            self.closing = True
            self.state = "closed"
            self.sent_some()
            self._flush()
            self._send_taken()
            if self.proto is None:
                self.arguments.close()
                return None
            lost = self.proto.lost
            self.proto.transport.loseConnection()
            return lost

        if not self.closing:
            call_in_reactor(go, timeout=timeout)


@dataclass(frozen=True)
class JobOutput:
    """
    What a job wrote to its standard output and standard error (text, the
    last megabyte of each by default: see C{cw-worker --output-limit}).
    """

    stdout: str = ""
    stderr: str = ""


#: The output of a job that wrote nothing (shared).
NO_OUTPUT = JobOutput()


def _text(data: bytes) -> str:
    return str(data, "utf-8", "replace")


def result_output(result: P.Result) -> JobOutput:
    """The L{JobOutput} that C{result} carries."""
    if not result.stdout and not result.stderr:
        return NO_OUTPUT
    return JobOutput(_text(result.stdout), _text(result.stderr))


def decode_result(jobid: Any, result: P.Result) -> tuple[bool, Any]:
    """
    C{(True, value)} for a success, C{(False, exception)} for a failure
    (whose C{stdout} and C{stderr} are what the job wrote).
    """
    if result.stdout or result.stderr:
        output = {"stdout": _text(result.stdout), "stderr": _text(result.stderr)}
    else:
        output = {}
    if result.status == P.Outcome.OK:
        try:
            return True, pickling.loads(result.payload)
        except Exception as e:
            return False, RemoteException(
                jobid,
                {
                    "type": type(e).__name__,
                    "message": f"the job's result could not be unpickled in the client: {e}",
                    **output,
                },
            )
    report = P.read_error_report(result.payload)
    if output:
        report.update(output)
    cls = JobCrashed if result.status == P.Outcome.CRASHED else RemoteException
    if result.status != P.Outcome.OK:
        cls = REPORT_TYPES.get(report.get("type"), cls)
    if result.status == P.Outcome.RAISED:
        return False, remote_error(jobid, report, cls)
    return False, cls(jobid, report)


def master_status(host: str | None = None, port: int = P.PORT, timeout: float = 30, **auth: Any) -> dict:
    """
    The status snapshot of the master at C{host} (see
    L{cw.master.service.Master.status}); C{auth}: C{secret_file}, C{insecure}.
    """
    session = Session(default_host(host), port, lambda r: None, lambda e: None, timeout, **auth)
    try:
        return session.call(P.GetStatus, timeout=timeout)["status"]
    finally:
        session.close()


def wait_for_workers(
    count: int, host: str | None = None, port: int = P.PORT, timeout: float = 60, **auth: Any
) -> int:
    """Block until the master has at least C{count} workers; return how many."""
    session = Session(default_host(host), port, lambda r: None, lambda e: None, **auth)
    try:
        return session.call(P.AwaitWorkers, timeout=timeout, count=count)["workers"]
    except TimeoutError:
        raise TimeoutError(
            f"the cw master at {session.address} did not get {count} workers within {timeout} s"
        ) from None
    finally:
        session.close()
