"""
The worker's pool of job processes: ampoule's L{ProcessPool} with the fault
handling cw needs.

ampoule replaces a child whose call fails with L{error.ProcessTerminated}
(killed by a signal, non-zero exit), but a child that exits with status 0
in the middle of a call (C{os._exit(0)}) fails the call with
L{error.ProcessDone}: ampoule then puts the dead child back among the ready
ones and hands it the next job, which fails too, and never starts a
replacement.  Here every call that ends with the child's death fails with a
L{ChildExited} (a L{error.ProcessTerminated}), so ampoule always retires
the dead child and starts a fresh one.

Each child is talked to through a L{ChildLink}, the parent-side AMP object
of one child.  It also carries out, per call:

  - a timeout (L{BatchCall.timeout} seconds, counted from when the job reaches the
    child; a job with a timeout is held until a new child is up): the child
    is killed with SIGKILL, with every process its job started
    (L{cw.worker.containment}), and the call fails with L{JobTimedOut};
  - a memory check: after each job the child's resident size is read from
    C{/proc}, and a child above the pool's C{max_rss} (or one whose job ran
    out of memory) is retired before it gets another job;
  - what the child already holds: the contexts (working directory and
    C{sys.path}) of the clients whose jobs it ran, and which cached
    functions it keeps (the same L{cw.worker.child.FunctionCache} rule as the
    child's own), so that each L{P.RunBatch} carries only what is new.

Layer rule (cw.worker): imports cw.discovery and below; never cw.client, cw.master, cw.launch or cw.cli.
"""

from __future__ import annotations

import os
import signal
import socket
from dataclasses import dataclass, field

from ampoule import commands, pool
from twisted.internet import defer, error
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from cw.core.config import STOP_WAIT
from cw.errors import SharedMemoryRefused
from cw.wire import commands as P
from cw.wire.checked import LeanCalls
from cw.wire.private import push
from cw.wire.streaming import ChunkReceiver, StreamingSender
from cw.worker import shared
from cw.worker.child import FunctionCache, streams_output
from cw.worker.containment import kill_job_process

log = Logger(namespace="cw.pool")  # the namespace of its log lines before the layers


class ChildExited(error.ProcessTerminated):
    """The job process died (exit status 0 included) while running a call."""


class JobTimedOut(error.ProcessTerminated):
    """The job ran past its timeout and its process was killed."""

    def __init__(self, timeout: float) -> None:
        super().__init__(signal=signal.SIGKILL)
        self.timeout = timeout

    def __str__(self) -> str:
        return f"the job ran longer than its timeout of {self.timeout:g} s"


class JobCancelled(error.ProcessTerminated):
    """The job was cancelled by its client and its process was killed."""

    def __init__(self) -> None:
        super().__init__(signal=signal.SIGKILL)

    def __str__(self) -> str:
        return "the job was cancelled"


class JobWithdrawn(Exception):
    """The job was cancelled before it reached a job process."""


@dataclass
class BatchCall:
    """
    What one call into the pool carries besides its command's arguments:
    the one object that passes through ampoule's C{doWork} (as C{_cw_call})
    to the L{ChildLink} that runs it, and stays with the caller to cancel
    the call.
    """

    #: Seconds the job may run once it reaches its job process (None or 0: no limit).
    timeout: float | None = None
    #: Client contexts by client id, of master connection C{generation};
    #: a child is sent those it lacks.
    contexts: dict[int, dict] = field(default_factory=dict)
    #: Pickled functions by C{(client, key)}; a child is sent those it lacks.
    functions: dict[tuple[int, bytes], bytes] = field(default_factory=dict)
    #: The master connection the jobs came on.
    generation: int = 0
    #: Clients on this machine: their big results may be lent to them
    #: from the job process's reply file rather than sent (the call's answer
    #: then holds the file open, as a L{shared.ReplyFile} under C{"reply"}).
    local: frozenset[int] = frozenset()
    #: Cancelled before it reached a job process: it never will.
    withdrawn: bool = False
    #: The child running the call, while it runs.
    link: ChildLink | None = None
    #: The child the call last ran in (kept after it ended: its process's
    #: last output, should it have died, see L{last_output}).
    ran_in: ChildLink | None = None

    def last_output(self) -> tuple[bytes, bytes]:
        """
        What the job process this call ran in left in its stdout and stderr
        when it died (its connector's C{last_words}, see
        L{cw.worker.service.JobConnector}), else empty.
        """
        connector = getattr(self.ran_in, "transport", None)
        return getattr(connector, "last_words", (b"", b""))

    def cancel(self, withdraw: bool) -> None:
        """
        Kill the job process running this call, if any; with C{withdraw}
        (the call has not started), make sure it never starts either.
        """
        if withdraw:
            self.withdrawn = True
        if self.link is not None:
            self.link.cancel()


def resident_bytes(pid: int) -> int | None:
    """The resident set size of process C{pid}, or C{None} if unknown."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class ChildLink(StreamingSender, ChunkReceiver, LeanCalls, amp.AMP):
    """
    The worker's end of the connection to one job process.

    C{retire} is set when this child should get no more jobs (it grew past
    the pool's C{max_rss}, or its job ran out of memory); L{JobPool} then
    replaces it.  C{dead} is set once its process has ended.
    """

    #: Set by L{JobPool} on every link it creates.
    pool: JobPool | None = None

    #: What times job timeouts (C{IReactorTime}): set by L{JobPool} on every
    #: link it creates (its C{clock}); tests set a Clock.
    clock = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.dead = False
        self.retire = False
        self.timed_out: float | None = None
        self.cancelled = False
        #: The jobs of the call it runs, as (client, seq) keys: named when it is killed.
        self.running: list[tuple[int, int]] = []
        #: Why the worker killed this job process on purpose (L{kill}), in
        #: words for its log (L{cw.worker.service.JobConnector}); None: it did not.
        self.killed_for: str | None = None
        #: (generation, client) pairs whose context this child was sent.
        self.contexts_sent: set[tuple[int, int]] = set()
        #: The function keys this child holds, kept as the child keeps them.
        self.functions = FunctionCache()
        #: Set once the job process has answered its first box: it is up.
        self.up = False
        #: Calls held until it is up (see L{callRemote}).
        self._when_up: list = []
        #: Big payloads go to and from this job process through shared
        #: memory (L{cw.worker.shared}): unless the machine cannot, or the
        #: job process could not open a memory file of this worker.
        self.shares = shared.supported()
        #: The memory file this job process puts big results in (it was told
        #: with the call that created it); None: none made yet, or used.
        self.reply_fd: int | None = None

    def connectionMade(self):
        super().connectionMade()
        # The answer to this first box says the job process is running.
        # (Echo: ampoule's Ping answers a str, which AMP refuses to send.)
        d = super().callRemote(commands.Echo, data=b"")
        if d is not None:
            d.addBoth(self._is_up)

    def _is_up(self, _) -> None:
        """The job process answered (or died, and held calls then fail): send what was held."""
        self.up = True
        when_up, self._when_up = self._when_up, []
        for send in when_up:
            send()

    @property
    def pid(self) -> int | None:
        """The job process's pid while it runs."""
        process = getattr(self.transport, "transport", None)
        return getattr(process, "pid", None)

    def callRemote(self, command, _cw_call: BatchCall | None = None, **kwargs):
        """
        Call C{command} in the child, carrying out C{_cw_call} (see
        L{BatchCall}): its timeout, and its link so that the caller can
        L{BatchCall.cancel} it later; a call already withdrawn fails at once.

        For L{P.RunBatch}, pass C{jobs} only: C{contexts} and C{functions}
        are filled in here from C{_cw_call}'s, with what this child lacks.
        """
        call = _cw_call if _cw_call is not None else BatchCall()
        if call.withdrawn:
            # Never started: fail the call without harming this child.
            return defer.fail(JobWithdrawn())
        call.link = call.ran_in = self
        if self.dead:
            return defer.fail(ChildExited(exitCode=None))
        if call.timeout and not self.up:
            # A job's timeout counts from when it reaches a running job
            # process, not while the process starts (seconds on a loaded
            # machine); and a job process answers nothing while it runs a
            # job, so it must be known to be up before the job is sent.
            held: defer.Deferred = defer.Deferred()
            self._when_up.append(lambda: self.callRemote(command, call, **kwargs).chainDeferred(held))
            return held
        if command is P.RunBatch:
            kwargs["contexts"], kwargs["functions"] = self._missing(
                kwargs["jobs"], call.contexts, call.functions, call.generation
            )
            self.running = [(job.client, job.seq) for job in kwargs["jobs"]]
            # Only a job that streams its output sends notices ahead of the
            # answer, for the job process's connector to take first.
            self.transport.notices_expected = any(streams_output(job.options) for job in kwargs["jobs"])
        d = self._send(command, kwargs, call.local)
        if d is None:
            return d
        timer = None
        if call.timeout is not None and call.timeout > 0:
            timer = self.clock.callLater(call.timeout, self._kill, call.timeout)

        def ended(result):
            if timer is not None and timer.active():
                timer.cancel()
            # The call is over: a late cancel must not kill this child's next job.
            call.link = None
            self.running = []
            if not isinstance(result, dict) or self.pool is None:
                return result
            limit = self.pool.max_rss
            rss = resident_bytes(self.pid) if limit and self.pid else None
            if rss is not None and rss > limit:
                log.info(
                    "Job process {pid} uses {mib} MiB, more than the limit of {limit} MiB; replacing it",
                    pid=self.pid,
                    mib=rss >> 20,
                    limit=limit >> 20,
                )
                self.retire = True
            else:
                # A job that ran out of memory may leave its process damaged.
                raised = [r for r in result.get("results", ()) if r.status == P.Outcome.RAISED]
                if any(P.read_error_report(r.payload)["type"] == MemoryError.__name__ for r in raised):
                    self.retire = True
            return result

        def died(reason):
            ended(None)
            if self.cancelled:
                return Failure(JobCancelled())
            if self.timed_out is not None:
                return Failure(JobTimedOut(self.timed_out))
            if reason.check(error.ProcessTerminated):
                return reason
            if reason.check(error.ProcessDone, error.ConnectionDone, error.ConnectionLost):
                # Exit status 0 in the middle of a call: still a death.
                return Failure(ChildExited(exitCode=0))
            return reason

        return d.addCallbacks(ended, died)

    #: The process whose memory files the job process opens (this one; tests change it).
    owner_pid = staticmethod(os.getpid)

    def _send(self, command, kwargs: dict, local: frozenset[int] = frozenset()):
        """
        Send C{command} with C{kwargs} to the job process; for
        L{P.RunBatch}, with big payloads in shared memory (L{_share}), and
        the big results of its answer mapped from it (L{_take_shared}; for
        the C{local} clients, see L{BatchCall.local}).
        """
        sharing = command is P.RunBatch and self.shares
        payload_fd = None
        sent = kwargs
        if sharing:
            sent, payload_fd = self._share(kwargs)
        d = super().callRemote(command, **sent)
        push(self.transport)  # to the job process now, not on the reactor's next turn
        if d is None or not sharing:
            return d
        if payload_fd is not None:
            # The big payloads lie in the file now: this call keeps no other
            # copy of them while the jobs run (a refusal reads them back).
            kwargs = None

        def refused(reason):
            reason.trap(SharedMemoryRefused)
            log.info(
                "Job process {pid} cannot map this worker's memory files ({why});"
                " its payloads go through the pipe",
                pid=self.pid,
                why=reason.getErrorMessage(),
            )
            self.shares = False
            self._close_reply()
            return self._send(command, kwargs if kwargs is not None else _unshared(sent, payload_fd))

        d.addCallbacks(self._take_shared, refused, callbackArgs=(local,))
        if payload_fd is not None:
            # The call is over (answered, or its process is gone): the job
            # process no longer opens the file.
            d.addBoth(_closing, payload_fd)
        return d

    def _share(self, kwargs: dict) -> tuple[dict, int | None]:
        """
        C{kwargs} of a L{P.RunBatch} with the big payloads of its jobs in a
        sealed memory file (their payloads in the box left empty), and a
        reply file if the job process has none; and the memory file's
        descriptor (None: no payload is big).
        """
        jobs = kwargs["jobs"]
        description: dict = {}
        big = [i for i, job in enumerate(jobs) if len(job.payload) >= shared.THRESHOLD]
        payload_fd = None
        # In the memory file they arrived in (WorkerProtocol.assemble_in_file), or a new one.
        in_file = (_received_file(jobs, big) or _written_file(jobs, big)) if big else None
        if in_file is not None:
            payload_fd, where, size = in_file
            jobs = list(jobs)
            for i in big:
                job = jobs[i]
                jobs[i] = P.Job(job.client, job.seq, b"", job.options, job.func)
            description.update(fd=payload_fd, size=size, jobs=where)
        if self.reply_fd is None:
            try:
                self.reply_fd = description["reply"] = shared.create()
            except OSError as e:
                log.info("Results go through the pipe: no memory file for them ({e})", e=e)
        if not description:
            return kwargs, None
        description["pid"] = self.owner_pid()
        return {**kwargs, "jobs": jobs, "shared": description}, payload_fd

    def _take_shared(self, answer: dict, local: frozenset[int] = frozenset()) -> dict:
        """
        Put the big results that L{P.RunBatch}'s C{answer} says lie in the
        reply file into their records, as views of the file mapped here
        (the file is closed: the mapping keeps it as long as they need it;
        unless some are results of C{local} clients, which may be lent to
        them: the file then stays open in C{answer["reply"]}, a
        L{shared.ReplyFile} its taker must L{drop<shared.ReplyFile.drop>}).
        """
        where = answer.get("shared")
        if not where:
            return answer
        fd, self.reply_fd = self.reply_fd, None
        results = answer["results"]
        lendable = [
            results[i].client in local and results[i].status == P.Outcome.OK for i, _, _ in where["results"]
        ]
        view, problem = None, None
        try:
            if fd is None:
                raise ValueError("no reply file was given")
            shared.seal(fd)
            # Results that may never be read here are not paged in.
            view = shared.map_shared(fd, where["size"], populate=not all(lendable))
            if any(lendable):
                answer["reply"] = shared.ReplyFile(
                    fd, {results[i].key: (offset, length) for i, offset, length in where["results"]}
                )
                fd = None
        except (OSError, ValueError) as e:
            problem = e
        finally:
            _closing(None, fd)
        for i, offset, length in where["results"]:
            result = results[i]
            if view is not None:
                result.payload = view[offset : offset + length]
            else:
                result.status = P.Outcome.RAISED
                result.payload = P.error_report(
                    "SharedMemoryError",
                    f"job {result.seq}'s result ({length:,} bytes) could not be read from its job"
                    f" process's memory file on {socket.gethostname()}: {problem}; run it again",
                )
        return answer

    def _close_reply(self) -> None:
        fd, self.reply_fd = self.reply_fd, None
        _closing(None, fd)

    def _missing(self, jobs, contexts: dict, functions: dict, generation: int) -> tuple[dict, dict]:
        """The contexts and functions that C{jobs} need and this child lacks."""
        send_contexts: dict[str, dict] = {}
        send_functions: dict[tuple[int, bytes], bytes] = {}
        for job in jobs:
            if (generation, job.client) not in self.contexts_sent:
                self.contexts_sent.add((generation, job.client))
                send_contexts[str(job.client)] = contexts.get(job.client, {})
            if job.func:
                key = (job.client, job.func)
                present, _ = self.functions.use(key, lambda: None)
                if not present and key in functions:
                    send_functions[key] = functions[key]
        return send_contexts, send_functions

    def cancel(self) -> None:
        """Kill the job process: its current call fails with L{JobCancelled}."""
        self.cancelled = True
        # The call may have just ended, with the kill still on its way: make
        # sure this child is not handed another job meanwhile.
        self.retire = True
        self.kill(self.jobs_doing("was cancelled"))

    def _kill(self, timeout: float) -> None:
        self.timed_out = timeout
        self.retire = True  # as in L{cancel}: no new job for a child being killed
        self.kill(self.jobs_doing(f"ran past its timeout of {timeout:g} s"))

    def jobs_doing(self, what: str) -> str:
        """C{what} said of the jobs it runs (L{describe_jobs}), or of its job if it runs none."""
        return f"{describe_jobs(self.running)} {what}"

    def kill(self, why: str = "") -> bool:
        """
        SIGKILL the job process with everything its jobs started (its
        descendants and its process group, L{cw.worker.containment}); False if it
        had already exited.  C{why} says why, in words for the worker's log
        (the first reason given is the one logged).
        """
        pid = self.pid
        if pid is None:
            return False
        if self.killed_for is None:
            self.killed_for = why or "the worker killed it"
        kill_job_process(pid)
        return True

    def connectionLost(self, reason):
        self.dead = True
        super().connectionLost(reason)
        # Its process has ended (ampoule calls this from processEnded): no
        # one opens the reply file any more.
        self._close_reply()


def describe_jobs(keys: list[tuple[int, int]], most: int = 5) -> str:
    """
    Name the jobs C{keys} (C{(client, seq)}) as a worker's log does:
    C{job #5 of client 2}, C{jobs #5, #6 of client 2}, at most C{most}
    numbers per client; C{its job} for none.
    """
    if not keys:
        return "its job"
    by_client: dict[int, list[int]] = {}
    for client, seq in keys:
        by_client.setdefault(client, []).append(seq)
    parts = []
    for client, seqs in by_client.items():
        numbers = ", ".join(f"#{seq}" for seq in seqs[:most])
        if len(seqs) > most:
            numbers += f" and {len(seqs) - most} more"
        parts.append(f"{'job' if len(seqs) == 1 else 'jobs'} {numbers} of client {client}")
    return "; ".join(parts)


def _written_file(jobs: list, big: list[int]) -> tuple[int, list, int] | None:
    """
    The payloads of C{jobs} numbered C{big} written into a new sealed
    memory file, each aligned: its descriptor, where each lies
    (C{[i, offset, length]}) and the file's length; None if no file
    could be made or written.
    """
    where, offset, payload_fd = [], 0, None
    try:
        payload_fd = shared.create()
        for i in big:
            offset = shared.aligned(offset)
            end = shared.write_parts(payload_fd, [jobs[i].payload], offset)
            where.append([i, offset, end - offset])
            offset = end
        shared.seal(payload_fd)
    except OSError as e:
        log.info("Payloads go through the pipe: no memory file for them ({e})", e=e)
        _closing(None, payload_fd)
        return None
    return payload_fd, where, offset


def _received_file(jobs: list, big: list[int]) -> tuple[int, list, int] | None:
    """
    If the payloads of C{jobs} numbered C{big} all lie in one memory file
    they were received into (L{cw.wire.memfile.placed}): that file, as
    L{_written_file} would have written them.  Those that start aligned
    (L{shared.ALIGN}) stay where they lie; the others (the second job of
    a batch, ...) are copied to its end, aligned, unless it was sealed
    already (handed on before).  Then it is sealed.  Else None.
    """
    places = [shared.placed(jobs[i].payload) for i in big]
    if None in places or any(mapping is not places[0][0] for mapping, _ in places):
        return None
    fd = places[0][0].fd
    where, moved = [], []
    for i, (_, offset) in zip(big, places, strict=True):
        if offset % shared.ALIGN:
            moved.append(i)
        else:
            where.append([i, offset, len(jobs[i].payload)])
    try:
        if not shared.sealed(fd):
            end = os.fstat(fd).st_size
            for i in moved:
                offset = shared.aligned(end)
                end = shared.write_parts(fd, [jobs[i].payload], offset)
                where.append([i, offset, end - offset])
            shared.seal(fd)
        elif moved:
            return None
        return os.dup(fd), where, os.fstat(fd).st_size
    except OSError:
        return None


def _unshared(sent: dict, payload_fd: int) -> dict:
    """
    The arguments of a L{P.RunBatch} that L{ChildLink._share} put in a
    memory file (C{sent}, and the file C{payload_fd}), with the big
    payloads back in their jobs: views of the file, read back to go
    through the pipe instead.
    """
    where = sent["shared"]
    view = shared.map_shared(payload_fd, where["size"])
    jobs = list(sent["jobs"])
    for i, offset, length in where["jobs"]:
        job = jobs[i]
        jobs[i] = P.Job(job.client, job.seq, view[offset : offset + length], job.options, job.func)
    return {key: value for key, value in sent.items() if key != "shared"} | {"jobs": jobs}


def _closing(passed, fd: int | None):
    """Close C{fd} (if any); return C{passed} (a Deferred's result)."""
    if fd is not None:
        os.close(fd)
    return passed


class JobPool(pool.ProcessPool):
    """
    An ampoule L{ProcessPool} that never hands a job to a dead or retired
    child.

    @param clock: what times its jobs' timeouts, and its L{stop} (C{IReactorTime}).
    @param max_rss: replace a child once its resident size passes this many
        bytes after a job (0: no limit).
    """

    def __init__(self, *args, clock, max_rss: int = 0, **kwargs) -> None:
        pool_ = self

        class Link(ChildLink):
            pool = pool_

        Link.clock = clock

        kwargs.setdefault("ampParent", Link)
        super().__init__(*args, **kwargs)
        self.max_rss = max_rss
        self.clock = clock

    def _retire_unusable(self) -> None:
        """Stop ready children that must not run another job; start fresh ones."""
        for child in [c for c in self.ready if c.dead or c.retire]:
            self.ready.discard(child)
            if child.dead:
                continue  # ampoule prunes it when its process ends
            self.stopAWorker(child).addCallback(lambda _: self.startAWorker())

    def _catchUp(self):
        # Overrides ampoule's private ProcessPool._catchUp (the one private name
        # used outside cw.wire.private: an override has to live in the subclass).
        self._retire_unusable()
        # ampoule's _catchUp takes a ready child without looking: after
        # retiring one there may be none (a replacement is on its way and
        # catches up when it starts).
        if self.ready:
            return super()._catchUp()

    def kill_busy(self, why: str = "was still running when the worker stopped") -> int:
        """
        Kill (SIGKILL) every child that is running a job, as a worker does
        when its drain timeout passes; their calls fail.  Return how many.
        C{why} is said of their jobs in the log (L{ChildLink.jobs_doing}).
        """
        return sum(child.kill(child.jobs_doing(why)) for child in list(self.busy))

    def doWork(self, command, **kwargs):
        self._retire_unusable()
        return super().doWork(command, **kwargs)

    def stop(self, wait: float = STOP_WAIT) -> defer.Deferred:
        """
        Stop every job process, within a bound: ampoule asks each to shut
        down and waits for it to exit, which one that never answers (stopped
        with SIGSTOP, hung, not reading its pipe) never does.  Those still
        there after C{wait} seconds are killed by pid (L{ChildLink.kill}:
        with their descendants and groups), and after as long again the
        returned Deferred fires whether or not they were reaped.
        """
        stopped = super().stop()
        done: defer.Deferred = defer.Deferred()

        def kill_left():
            why = f"it did not exit within {wait:g} s of being asked to (the worker is stopping)"
            left = [child for child in self.processes if child.kill(why)]
            if left:
                log.info(
                    "{n} job processes did not exit within {t:g} s of being asked to (pids {pids});"
                    " killed them",
                    n=len(left),
                    t=wait,
                    pids=", ".join(str(child.pid) for child in left),
                )
            timers[0] = self.clock.callLater(wait, give_up)

        def give_up():
            log.info(
                "Job processes {pids} were not reaped within {t:g} s of being killed; leaving anyway",
                pids=", ".join(str(child.pid) for child in self.processes),
                t=wait,
            )
            finish(None)

        def finish(result):
            if timers[0].active():
                timers[0].cancel()
            if not done.called:
                done.callback(None)
            return result

        timers = [self.clock.callLater(wait, kill_left)]
        stopped.addBoth(finish)
        return done
