"""
The worker: one per machine, runs jobs from the master in a pool of job
processes (ampoule children).

L{Worker} keeps a local queue of jobs the master sent (up to the worker's
slots plus a little prefetch), starts each in a free job process, and sends
results back in batches.  A job that crashes or hangs takes down only its
job process, never the worker.  The connection to the master is kept up by
a L{ClientService}: a worker started before its master, or whose master
restarts, connects (again) on its own, trying at least every
C{--reconnect-delay} seconds.  SIGTERM or SIGINT stops a worker gracefully:
it returns its unstarted jobs and finishes its running ones first
(L{Worker.drain}), and exits within C{--drain-timeout} plus
L{cw.core.config.STOP_BOUND} seconds whatever its job processes do
(L{JobPool.stop}).

Run it with C{twistd -n cw-worker --master HOST[:PORT] [--procs N]} or
C{python -m cw.worker [HOST]}.

Layer rule (cw.worker): imports cw.discovery and below; never cw.client, cw.master, cw.launch or cw.cli.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import socket
import stat
import sys

from ampoule import main as ampoule_main
from twisted.application import service
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer, error
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python import usage

from cw import discovery
from cw.core.config import CLOSE_WAIT, OUTPUT_LIMIT, STOP_BOUND, WorkerConfig
from cw.core.handover import KeptResults
from cw.core.liveness import MasterSilent, MasterWatch, Recheck
from cw.core.payload import result_reference
from cw.core.resources import Capacity, build_capacity
from cw.core.validation import (
    MAX_NUMBER,
    MAX_REASON,
    check_context,
    check_function_key,
    check_jobs,
    check_packages,
    check_probe_context,
    check_range,
    check_registered,
    check_text,
)
from cw.core.versions import incompatible, mismatch_message
from cw.core.worker_state import (
    CancelBatch,
    Death,
    Drained,
    HandOver,
    KillRunning,
    ReturnJobs,
    SendResults,
    StartBatch,
    StartDrainTimer,
    WorkerState,
)
from cw.errors import AuthenticationFailed, BadCommand, ReportKind
from cw.system import (
    affinity_cores,
    cgroup_memory_limit,
    detect_cpus,
    detect_gpus,
    detect_memory,
    machine_identity,
    physical_memory,
    with_cw_on_path,
)
from cw.wire import commands as P
from cw.wire.address import FindingEndpoint, client_description
from cw.wire.auth import AuthGate, authenticate, refused_retry_delay
from cw.wire.batching import Outbox
from cw.wire.checked import CheckedCommands
from cw.wire.limits import log_descriptor_limit
from cw.wire.liveness import SignsOfLife
from cw.wire.options import ConfigOptions
from cw.wire.private import job_bootstrap, push
from cw.wire.secret import load_options_secret
from cw.wire.streaming import STREAM_ABOVE, ChunkReceiver, StreamingSender
from cw.wire.versions import package_versions, probe_paths, worker_versions
from cw.worker.capture import cut_marker
from cw.worker.child import JobChild
from cw.worker.containment import kill_group, release_pipes
from cw.worker.pipes import READ_SIZE, bulk_pipe_reads, widen_pipe
from cw.worker.pool import BatchCall, JobCancelled, JobPool, JobTimedOut
from cw.worker.shared import ALIGN, LentResults, ReplyFile, supported

#: Seconds a drained worker waits for its clients to take the results it
#: lent them (they release them within milliseconds: this bounds a client
#: that is stuck or gone without its master noticing yet).
LENT_WAIT = 10.0

log = Logger(namespace="cw.worker")  # the namespace of its log lines before the layers

#: The options' defaults (L{WorkerConfig}), which L{WorkerService}'s arguments share.
_DEFAULTS = WorkerConfig()


def describe_crash(reason) -> str:
    """Say in words why a job process failed a call."""
    value = reason.value
    if isinstance(value, error.ProcessTerminated):
        if value.signal is not None:
            try:
                name = signal.Signals(value.signal).name
            except ValueError:
                name = str(value.signal)
            hint = " (the kernel's out-of-memory killer sends this signal)" if name == "SIGKILL" else ""
            return f"the job's process was killed by signal {value.signal} ({name}){hint}"
        return f"the job's process exited with code {value.exitCode}"
    if isinstance(value, (error.ProcessDone, error.ConnectionDone, error.ConnectionLost)):
        return "the job's process exited while running the job"
    return f"the job could not run in a job process: {reason.getErrorMessage()}"


def crash_report(reason) -> bytes:
    """
    The error report for a job whose process failed it: L{JobTimedOut}
    becomes a C{JobTimeout} report, any other death a C{JobProcessDied} one
    naming the signal or exit status.  Both name this worker's host and pid.
    """
    host, pid = socket.gethostname(), os.getpid()
    if reason.check(JobTimedOut):
        return P.error_report(
            ReportKind.JOB_TIMEOUT,
            f"{reason.value} and was killed (worker {host} pid {pid})",
            host=host,
            timeout=reason.value.timeout,
        )
    return P.error_report(
        ReportKind.JOB_PROCESS_DIED,
        f"{describe_crash(reason)} (worker {host} pid {pid})",
        host=host,
        signal=getattr(reason.value, "signal", None),
        exit_code=getattr(reason.value, "exitCode", None),
    )


def machine_capacity(env=os.environ) -> Capacity:
    """
    What this machine, or SLURM allocation, gives a worker when its options
    do not say: the cores it may run on (SLURM's), the cgroup memory limit
    else physical memory, and the GPUs it was given.
    """
    return Capacity(
        cpus=detect_cpus(env, affinity_cores()),
        memory=detect_memory(env, cgroup_memory_limit(), physical_memory()),
        gpus=detect_gpus(env),
    )


def join_master(
    proto: amp.AMP,
    secret: bytes | None,
    address: str,
    slots: int,
    versions: dict | None = None,
    capacity: Capacity | None = None,
    kept: KeptResults | None = None,
) -> defer.Deferred:
    """
    Authenticate C{proto}, a new connection to the master at C{address},
    and register it as a worker with C{slots} slots, C{versions}
    (L{worker_versions}) and C{capacity} (default: a core per slot),
    handing over the results C{kept} holds.  Fires with the
    L{P.RegisterWorker} answer (worker id and the master's payload limit).
    """
    capacity = capacity or Capacity(cpus=slots)

    def register(_):
        handover = {}
        if kept is not None and kept.results:
            sessions, results = kept.take()
            handover = {"results": results, "sessions": sessions}
            log.info("Handing {n} results of jobs from the lost master connection over", n=len(results))
        return proto.callRemote(
            P.RegisterWorker,
            version=P.PROTOCOL_VERSION,
            host=socket.gethostname(),
            pid=os.getpid(),
            slots=slots,
            launch=launch_id(os.environ),
            versions=versions,
            capacity=capacity.to_json(),
            # Its job processes open the big arguments of clients on this
            # machine where they lie (cw.core.payload.reference).
            machine=machine_identity() if supported() else None,
            **handover,
        )

    return (
        authenticate(proto, secret, "worker", address)
        .addCallback(register)
        .addCallback(_checked_registration)
    )


def _checked_registration(answer: dict) -> dict:
    try:
        check_registered(answer, "worker_id")
    except BadCommand as e:
        raise BadCommand(
            f"a malformed answer to RegisterWorker: {e}; install the same cw version everywhere"
        ) from None
    return answer


def launch_id(environ) -> str | None:
    """
    Which launch of an adaptive pool this worker is (L{cw.master.pool}):
    C{CW_LAUNCH_ID}, else its SLURM job (C{JOB_TASK} for an array task),
    else None.
    """
    if environ.get("CW_LAUNCH_ID"):
        return environ["CW_LAUNCH_ID"]
    if environ.get("SLURM_ARRAY_JOB_ID") and environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    return environ.get("SLURM_JOB_ID") or None


class WorkerProtocol(SignsOfLife, StreamingSender, AuthGate, ChunkReceiver, CheckedCommands, amp.AMP):
    """
    The worker's connection to its master.  The master must prove it holds
    the secret before this worker accepts any job from it, and what it sends
    is checked as the master checks its peers (L{CheckedCommands}): a
    malformed command ends the connection with one log line.
    """

    def __init__(self, worker: Worker) -> None:
        super().__init__()
        self.worker = worker

    def connectionMade(self):
        super().connectionMade()
        if self.worker.draining:
            self.transport.loseConnection()  # stopping: join no master
            return
        d = join_master(
            self,
            self.worker.secret,
            self.worker.address,
            self.worker.procs,
            self.worker.versions,
            self.worker.capacity,
            self.worker.state.kept,
        )
        d.addCallbacks(self._registered, self._refused)

    def assemble_in_file(self, name, first):
        # A big batch of jobs goes to job processes through a memory file
        # (cw.worker.shared): received straight into one, which the job
        # process maps, rather than into memory and then copied into one
        # (JobChild._share); placed so that the first job's payload starts
        # aligned, as there.
        if name != b"jobs" or not supported():
            return None
        at = P.first_payload_at(first)
        return 0 if at is None else -at % ALIGN

    def _registered(self, answer):
        self.worker.max_payload = answer["max_payload"]
        self.worker.connected(self, answer["worker_id"])

    def _refused(self, failure):
        retry = ""
        if failure.check(AuthenticationFailed):
            # Trying again at once would fail the same way: back off.
            self.worker.refusals += 1
            retry = f"; trying again in {self.worker.retry_delay(1):g} s"
        log.error(
            "Could not join the master at {address}: {why}{retry}",
            address=self.worker.address,
            why=failure.getErrorMessage(),
            retry=retry,
        )
        self.transport.loseConnection()

    @P.ClientContext.responder
    def client_context(self, client, context):
        check_range("client", client, 1, MAX_NUMBER)
        check_context(context)
        self.worker.client_context(client, context)
        return {}

    @P.DefineFunction.responder
    def define_function(self, client, key, function):
        check_range("client", client, 1, MAX_NUMBER)
        check_function_key(key)
        self.worker.functions[(client, key)] = function
        return {}

    @P.Probe.responder
    def probe(self, packages, context):
        check_packages(packages)
        check_probe_context(context)
        return {"report": self.worker.probe(packages, context)}

    @P.ForgetClient.responder
    def forget_client(self, client):
        check_range("client", client, 1, MAX_NUMBER)
        self.worker.forget_client(client)
        return {}

    @P.ReleaseResults.responder
    def release_results(self, keys):
        self.worker.release_results(keys)
        return {}

    @P.RunJobs.responder
    def run_jobs(self, jobs):
        check_jobs(jobs, from_master=True)
        self.worker.enqueue(jobs)
        return {}

    @P.CancelJobs.responder
    def cancel_jobs(self, keys):
        self.worker.cancel(keys)
        return {}

    @P.MasterStopping.responder
    def master_stopping(self, reason):
        check_text("reason", reason, MAX_REASON)
        log.info(
            "The master is shutting down ({reason}); this worker keeps trying to reconnect",
            reason=reason,
        )
        return {}

    @P.Heartbeat.responder
    def heartbeat(self):
        self.worker.heartbeat_received(self)
        return {}

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self.worker.disconnected(self)


class Worker:
    """
    Runs jobs for one master connection at a time: the adapter between the
    master connection, the pool of job processes and L{WorkerState}, which
    makes every decision (what to start and as what batch, what to send,
    return or kill, when a drain ends).  This class feeds it events and
    carries out its instructions (L{Worker._carry_out}).

    @param pool: a L{cw.worker.pool.JobPool} of L{cw.worker.child.JobChild} processes (or
        anything with the same C{doWork}, taking each call's L{BatchCall}
        as its C{_cw_call} keyword, and C{kill_busy} for L{drain}).
    @param procs: how many jobs run at once.
    @param clock: all the worker's time (C{IReactorTime}).
    """

    def __init__(
        self,
        pool,
        procs: int,
        clock,
        secret: bytes | None = None,
        address: str = "",
        capacity: Capacity | None = None,
        cores: list[int] = (),
        keep_results: int = _DEFAULTS.keep_results,
    ) -> None:
        self.clock = clock
        #: What this worker advertises (default: a core per slot).
        self.capacity = capacity or Capacity(cpus=procs)
        #: The shared secret the master must prove it holds; None: --insecure.
        self.secret = secret
        self.address = address
        self.pool = pool
        self.procs = procs
        self.state = WorkerState(
            procs,
            host=socket.gethostname(),
            recycles=bool(getattr(pool, "recycleAfter", 0)),
            cpus=self.capacity.cpus,
            cores=cores,
            keep_bytes=keep_results,
        )
        self.proto: WorkerProtocol | None = None
        self.worker_id = 0
        self.contexts: dict[int, dict] = {}
        #: This machine (L{machine_identity}), and the clients that share it:
        #: their big results are lent to them from the job processes'
        #: memory files (L{LentResults}) rather than sent.
        self.machine = machine_identity()
        self.local_clients: set[int] = set()
        self.lent = LentResults()
        #: While a batch's answer is handled: its reply file, if it may lend results.
        self._reply: ReplyFile | None = None
        #: Drained, waiting for clients to take the results lent to them (L{_drained}).
        self._lent_wait = None
        #: Cached functions by C{(client, key)} (L{P.DefineFunction}).
        self.functions: dict[tuple[int, bytes], bytes] = {}
        #: The pool call of each running batch, so that a cancelled job's
        #: process can be killed.
        self.calls: dict[int, BatchCall] = {}
        self._drain_waiters: list[defer.Deferred] = []
        self._drain_timer = None
        self._drain_timeout = _DEFAULTS.drain_timeout
        #: Whether the master has gone silent (its heartbeats stopped): a
        #: half-open link may otherwise never close on this side.
        self.master_watch = MasterWatch(_DEFAULTS.master_timeout)
        self._master_watchdog = None
        self.outbox = Outbox(clock, self._send_results, P.result_size, after_flush=self._push)
        #: Longest wait between tries to reach the master (see L{retry_delay}).
        self.reconnect_delay = _DEFAULTS.reconnect_delay
        #: Handshakes in a row that failed on the secret.
        self.refusals = 0
        #: Job processes killed by the last L{KillRunning}.
        self._killed = 0
        #: What this worker reports at registration (L{worker_versions}).
        self.versions = worker_versions()
        #: Clients whose jobs cannot run here (L{cw.core.versions}): why.
        self._mismatch: dict[int, str] = {}

    # What the rest of the worker reads and sets lives in the state.

    @property
    def queue(self):
        """Jobs from the master not started yet."""
        return self.state.queue

    @property
    def running(self) -> int:
        """Jobs handed to job processes and not yet ended."""
        return self.state.running

    @property
    def draining(self) -> bool:
        """Set once the worker drains (see L{drain}): it starts no more jobs."""
        return self.state.draining

    @property
    def terminating(self) -> bool:
        """Set the moment SIGTERM arrives (see L{WorkerService._note_sigterm})."""
        return self.state.terminating

    @terminating.setter
    def terminating(self, value: bool) -> None:
        self.state.terminating = value

    @property
    def job_timeout(self) -> float | None:
        """Seconds a job may run when it does not set its own timeout (None: no limit)."""
        return self.state.job_timeout

    @job_timeout.setter
    def job_timeout(self, value: float | None) -> None:
        self.state.job_timeout = value

    @property
    def max_payload(self) -> int:
        """The master's payload limit, learnt at registration."""
        return self.state.max_payload

    @max_payload.setter
    def max_payload(self, value: int) -> None:
        self.state.max_payload = value

    @property
    def master_timeout(self) -> float:
        """
        Once the master sends heartbeats, how long the worker waits for the
        next before it drops the connection and reconnects; at least three
        of the master's heartbeat intervals; 0: never (L{MasterWatch}).
        """
        return self.master_watch.timeout

    @master_timeout.setter
    def master_timeout(self, value: float) -> None:
        self.master_watch.timeout = value

    def retry_delay(self, attempt: int) -> float:
        """
        Seconds until the next try to reach the master: the usual back-off
        after C{attempt} failed connections, or, after handshakes that
        failed on the secret, L{refused_retry_delay} of them.
        """
        if self.refusals:
            return refused_retry_delay(self.refusals, self.reconnect_delay)
        return backoffPolicy(maxDelay=self.reconnect_delay)(attempt)

    def connected(self, proto: WorkerProtocol, worker_id: int) -> None:
        self.refusals = 0
        self.proto = proto
        self.worker_id = worker_id
        # Anything from the master counts as a sign of life (L{cw.wire.liveness}):
        # its heartbeat may wait behind a big box it is sending.
        proto.liveness_clock = self.clock
        proto.last_heard = self.clock.seconds()
        peer = proto.transport.getPeer()
        log.info(
            "Registered with the master at {peer} as worker {wid} with {n} slots, {capacity}",
            peer=getattr(peer, "host", peer),
            wid=worker_id,
            n=self.procs,
            capacity=self.capacity.describe(),
        )
        # Kept results of jobs that finished while registering; the jobs of
        # the lost connection still running are killed (their clients
        # resubmitted them).
        self._hand_over()
        running = self.state.running_orphans()
        self._carry_out(self.state.master_back())
        if running:
            log.info(
                "Killed {n} jobs of the lost master connection that were still running"
                " (their clients resubmit them)",
                n=running,
            )

    def heartbeat_received(self, proto: WorkerProtocol) -> None:
        """The master is alive: (re)arm the watchdog as L{MasterWatch} says."""
        if proto is not self.proto:
            return
        self._watch_master(proto, self.master_watch.heartbeat(self.clock.seconds()))

    def _check_master(self, proto: WorkerProtocol) -> None:
        last_heard = getattr(proto, "last_heard", float("-inf"))
        self._watch_master(proto, self.master_watch.check(self.clock.seconds(), last_heard))

    def _watch_master(self, proto: WorkerProtocol, decision: Recheck | MasterSilent | None) -> None:
        """Carry out L{MasterWatch}'s C{decision}."""
        if isinstance(decision, Recheck):
            self._stop_master_watchdog()
            self._master_watchdog = self.clock.callLater(decision.after, self._check_master, proto)
        elif isinstance(decision, MasterSilent):
            self._master_watchdog = None
            log.warn(
                "No heartbeat or anything else from the master for {s:g} s;"
                " dropping the connection to reconnect",
                s=decision.timeout,
            )
            proto.transport.abortConnection()

    def _stop_master_watchdog(self) -> None:
        if self._master_watchdog is not None and self._master_watchdog.active():
            self._master_watchdog.cancel()
        self._master_watchdog = None

    def disconnected(self, proto: WorkerProtocol) -> None:
        if proto is not self.proto:
            return
        self._stop_master_watchdog()
        self.master_watch.reset()
        dropped = len(self.state.queue)
        self.proto = None
        # Which session each client is: the results of jobs still running
        # are handed to the next master under it.
        sessions = {cid: context.get("session") for cid, context in self.contexts.items()}
        self.contexts.clear()
        self.local_clients.clear()
        self.lent.clear()
        self._check_lent()
        self._mismatch.clear()
        self.functions.clear()
        self.outbox.discard()
        draining = self.state.draining
        self._killed = 0
        self._carry_out(self.state.master_lost(sessions))
        if draining:
            return
        if self.state.kept is not None:
            # The running jobs finish; their results go to the next master
            # (L{P.RegisterWorker}), which gives them to the clients that
            # resubmitted those jobs.
            log.info(
                "Lost the master connection; dropped {n} queued jobs, {r} running ones go on"
                " (their results are kept for the next master); reconnecting",
                n=dropped,
                r=self.state.running_orphans(),
            )
        else:
            # The master requeues the running jobs too, and their results
            # could not be sent: they were killed rather than run twice (this
            # is also what a worker stopped past the master's heartbeat
            # timeout does when it resumes).
            log.info(
                "Lost the master connection; dropped {n} queued jobs and killed {k} running ones"
                " (the master requeues them); reconnecting",
                n=dropped,
                k=self._killed,
            )

    def forget_client(self, client: int) -> None:
        """The master says this client left: drop its context and functions."""
        self.contexts.pop(client, None)
        self.local_clients.discard(client)
        self.lent.forget_client(client)
        self._check_lent()
        self._mismatch.pop(client, None)
        for key in [key for key in self.functions if key[0] == client]:
            del self.functions[key]

    def probe(self, packages: list[str], context: dict | None) -> dict:
        """The answer to L{P.Probe}: versions, C{packages}' versions, clock, and C{context}'s paths."""
        path = context.get("path", []) if context else []
        report = {
            "host": socket.gethostname(),
            "versions": self.versions,
            "packages": package_versions(packages, path),
            "time": self.clock.seconds(),
        }
        if context is not None:
            report.update(probe_paths(context))
        return report

    def client_context(self, client: int, context: dict) -> None:
        """
        Keep a client's context (L{P.ClientContext}); judge once whether its
        versions are compatible with this worker's (L{cw.core.versions}).
        """
        self.contexts[client] = context
        if (
            self.machine is not None
            and context.get(P.MACHINE) == self.machine
            and not context.get(P.RESULTS_STORED)
        ):
            self.local_clients.add(client)
        else:
            self.local_clients.discard(client)
        theirs = context.get("versions") if isinstance(context, dict) else None
        if incompatible(theirs, self.versions):
            where = f"{socket.gethostname()}:{os.getpid()}"
            self._mismatch[client] = mismatch_message(theirs, self.versions, where)
        else:
            self._mismatch.pop(client, None)

    def _refuse_incompatible(self, jobs: list[P.Job]) -> list[P.Job]:
        """
        Fail at once, unopened, the jobs of clients whose versions are
        incompatible with this worker's (L{client_context}); return the rest.
        """
        mismatch = self._mismatch
        refused = [job for job in jobs if job.client in mismatch]
        if not refused:
            return jobs
        self.outbox.extend(
            P.Result(
                job.client,
                job.seq,
                P.Outcome.FAILED,
                P.error_report(
                    ReportKind.INCOMPATIBLE_WORKER,
                    mismatch[job.client],
                    host=socket.gethostname(),
                    pid=os.getpid(),
                    client_versions=self.contexts.get(job.client, {}).get("versions"),
                    worker_versions=self.versions,
                ),
            )
            for job in refused
        )
        self.outbox.flush()
        return [job for job in jobs if job.client not in mismatch]

    def enqueue(self, jobs: list[P.Job]) -> None:
        if self._mismatch:  # nothing to look at per job unless some client is incompatible
            jobs = self._refuse_incompatible(jobs)
        self._carry_out(self.state.jobs_arrived(jobs))
        if self.state.draining:
            return
        if sum(len(job.payload) for job in jobs) >= STREAM_ABOVE:
            # Start them on the next turn, once the box they came in (which
            # holds the payloads' chunks) is freed.
            self.clock.callLater(0, self._pump)
        else:
            self._pump()

    def _pump(self) -> None:
        self._carry_out(self.state.start_jobs(self.clock.seconds()))

    def drain(self, timeout: float) -> defer.Deferred:
        """
        Stop gracefully: start no more jobs and hand the unstarted ones back
        to the master at once (L{P.ReturnJobs}: it requeues them without
        counting an attempt and sends this worker nothing more), let the
        running jobs finish and send their results.  Fires once nothing
        runs.  Jobs still running after C{timeout} seconds have their
        processes killed and no result sent; the master requeues them
        without counting an attempt, whether this worker hands a killed job
        back (L{P.ReturnJobs}) before its connection closes or leaves still
        holding it (one rule: L{cw.core.scheduler}'s, on draining workers).
        """
        d: defer.Deferred = defer.Deferred()
        if self.state.drained:
            d.callback(None)
            return d
        self._drain_waiters.append(d)
        if self.state.draining:
            return d
        self._drain_timeout = timeout
        unstarted = len(self.state.queue)
        instructions = self.state.drain(connected=self.proto is not None)
        log.info(
            "Draining: handed {n} unstarted jobs back to the master; waiting up to {t:g} s for"
            " {r} running jobs",
            n=unstarted,
            t=timeout,
            r=self.state.running,
        )
        self._carry_out(instructions)
        return d

    def _drain_expired(self, timeout: float) -> None:
        self._drain_timer = None
        self._carry_out(self.state.drain_expired(timeout))

    def cancel(self, keys: list[tuple[int, int]]) -> None:
        """
        Drop these jobs if still queued here; kill the processes of those
        running (other jobs of the same batch run again).  The master has
        already taken them back, so no result is sent for them.
        """
        keys = list(keys)
        self._carry_out(self.state.cancel(keys))
        log.info("Cancelled {n} jobs at the master's request", n=len(set(keys)))

    def _carry_out(self, instructions: list) -> None:
        """Do what L{WorkerState} decided, in order."""
        for instruction in instructions:
            if isinstance(instruction, StartBatch):
                self._start(instruction)
            elif isinstance(instruction, SendResults):
                results = instruction.results
                if self._reply is not None:
                    results = self._lend(results, self._reply)
                self.outbox.send_now(results)
            elif isinstance(instruction, ReturnJobs):
                self._return(instruction.keys)
            elif isinstance(instruction, CancelBatch):
                call = self.calls.get(instruction.batch)
                if call is not None:
                    call.cancel(withdraw=instruction.withdraw)
            elif isinstance(instruction, KillRunning):
                self._killed = self.pool.kill_busy(
                    f"was still running when the drain timeout ({self._drain_timeout:g} s) passed"
                )
            elif isinstance(instruction, HandOver):
                self._hand_over()
            elif isinstance(instruction, StartDrainTimer):
                self._drain_timer = self.clock.callLater(
                    self._drain_timeout, self._drain_expired, self._drain_timeout
                )
            elif isinstance(instruction, Drained):
                self._drained(instruction.how)
            else:
                raise TypeError(f"unknown instruction {instruction!r}")

    def _start(self, start: StartBatch) -> None:
        call = BatchCall(start.timeout or None, self.contexts, self.functions, start.generation)
        if self.local_clients:
            call.local = frozenset(self.local_clients)
        self.calls[start.batch] = call
        d = self.pool.doWork(P.RunBatch, jobs=list(start.jobs), _cw_call=call)
        # What follows needs the jobs' keys, not their payloads: the state's
        # record of the batch leaves out a lone job's (L{WorkerState}).
        start = StartBatch(start.batch, self.state.batches[start.batch].jobs, start.timeout, start.generation)
        d.addCallbacks(self._batch_finished, self._batch_failed, (start,), None, (start,))
        d.addErrback(lambda f: log.failure("Bookkeeping of a finished job failed", f))

    def _batch_finished(self, answer: dict, start: StartBatch) -> None:
        self.calls.pop(start.batch, None)
        self._reply = answer.get("reply")
        try:
            self._carry_out(self.state.batch_finished(start.batch, answer["results"], self.clock.seconds()))
        finally:
            reply, self._reply = self._reply, None
            if reply is not None:
                reply.drop()

    def _lend(self, results, reply: ReplyFile) -> list[P.Result]:
        """
        C{results} with those lying in C{reply} whose clients are on this
        machine replaced by references to where they lie (the file held
        until they are released): their bytes go through no socket.
        """
        if self.proto is None or self.state.draining:
            return list(results)  # (a draining worker leaves soon: no file of its may be needed later)
        lent = []
        for result in results:
            place = reply.places.get(result.key)
            if (
                place is not None
                and result.status == P.Outcome.OK
                and result.client in self.local_clients
                and len(result.payload) == place[1]
            ):
                self.lent.lend(result.key, reply)
                where = reply.reference(result.key, self.worker_id)
                result = P.Result(
                    result.client,
                    result.seq,
                    result.status,
                    result_reference(where),
                    result.stdout,
                    result.stderr,
                )
            lent.append(result)
        return lent

    def _batch_failed(self, reason, start: StartBatch) -> None:
        """
        The job process running C{start}'s batch died (or never got it).
        What becomes of its jobs is L{WorkerState.batch_failed}'s decision.
        """
        call = self.calls.pop(start.batch, None)
        if reason.check(JobCancelled):
            death = Death.CANCELLED
        elif reason.check(JobTimedOut):
            death = Death.TIMED_OUT
        else:
            death = Death.DIED
        report = crash_report(reason) if len(start.jobs) == 1 else b""
        if len(start.jobs) > 1 and start.generation == self.state.generation:
            cancelled = self.state.batches[start.batch].cancelled
            log.info(
                "A job process died running a batch of {n} jobs ({why}); running {m} of them again, alone",
                n=len(start.jobs),
                why=describe_crash(reason),
                m=len([job for job in start.jobs if job.key not in cancelled]),
            )
        output = call.last_output() if call is not None and len(start.jobs) == 1 else (b"", b"")
        self._carry_out(self.state.batch_failed(start.batch, death, report, self.clock.seconds(), output))

    def _return(self, keys) -> None:
        """Tell the master this worker will not start the jobs C{keys} and wants no more."""
        if self.proto is None:
            return
        d = self.proto.callRemote(P.ReturnJobs, keys=list(keys))
        d.addErrback(
            lambda f: (
                None
                if f.check(error.ConnectionDone, error.ConnectionLost)  # it requeues them itself
                else log.info("Could not return jobs to the master: {f.value}", f=f)
            )
        )

    def _drained(self, how: str) -> None:
        """
        Finish draining: flush results, then fire L{drain}'s Deferreds, once
        the results lent to clients are released (or L{LENT_WAIT} seconds
        passed): a client must find this worker alive to map them.
        """
        if self._drain_timer is not None and self._drain_timer.active():
            self._drain_timer.cancel()
        self._drain_timer = None
        self.outbox.flush()
        log.info("Drained ({how}); leaving", how=how)
        if len(self.lent) and self.proto is not None:
            log.info(
                "Waiting up to {t:g} s for clients to take {n} results lent to them",
                t=LENT_WAIT,
                n=len(self.lent),
            )
            self._lent_wait = self.clock.callLater(LENT_WAIT, self._leave)
            return
        self._leave()

    def _leave(self) -> None:
        """Fire L{drain}'s Deferreds (once the results lent to clients are taken)."""
        if self._lent_wait is not None and self._lent_wait.active():
            self._lent_wait.cancel()
        self._lent_wait = None
        waiters, self._drain_waiters = self._drain_waiters, []
        for d in waiters:
            d.callback(None)

    def release_results(self, keys: list[tuple[int, int]]) -> None:
        """Clients took these results lent to them (L{P.ReleaseResults}): close their files."""
        self.lent.release(keys)
        self._check_lent()

    def _check_lent(self) -> None:
        """Leave now if a drained worker waited only for lent results, and none is left."""
        if self._lent_wait is not None and not len(self.lent):
            self._leave()

    def job_output(self, outputs: list[P.Output]) -> None:
        """Pass what running jobs wrote on to the master at once (L{P.OutputNotice})."""
        if self.proto is not None:
            for batch in P.batches(outputs, P.output_size):
                self.proto.callRemote(P.OutputNotice, host=self.state.host, outputs=batch)

    def _hand_over(self) -> None:
        """
        Send the master the results kept from a lost connection (jobs that
        finished after it registered; the others went with its registration).
        """
        kept = self.state.kept
        if kept is None or not kept.results:
            return
        if self.proto is None:
            log.info(
                "Keeping the results of {n} jobs ({b:,} bytes) that finished with no master, for the next",
                n=len(kept.results),
                b=kept.bytes,
            )
            return
        sessions, results = kept.take()
        for batch in P.batches(results, P.result_size):
            self.proto.callRemote(P.HandOverResults, results=batch, sessions=sessions)

    def _send_results(self, batch: list[P.Result]) -> None:
        if self.proto is not None:
            self.proto.callRemote(P.JobResults, results=batch)

    def _push(self) -> None:
        """Write the results just sent now, not on the reactor's next turn."""
        if self.proto is not None:
            push(getattr(self.proto, "transport", None))


class JobConnector(ampoule_main.AMPConnector):
    """
    Log what a job process prints as info lines, not as errors; widen the
    pipes to it (L{cw.worker.pipes}).  The job process's end is its exit, not the
    end of its pipes (which something it started may hold): what is left
    in its process group is then killed and its pipes closed
    (L{cw.worker.containment}).
    """

    #: The job process's pid, which is also its process group's id.
    pgid: int | None = None

    _held: list[bytes] | None = None

    def connectionMade(self):
        self.pgid = self.transport.pid
        for pipe in getattr(self.transport, "pipes", {}).values():
            widen_pipe(pipe.fileno())
        #: What is written to the job process until it has caught its output
        #: (see L{_output_received}); then None.
        self._held: list[bytes] | None = []
        super().connectionMade()

    def write(self, data):
        if self._held is not None:
            self._held.append(data)
            return
        super().write(data)

    def passes_writes(self) -> bool:
        """Whether L{write} passes data on as ampoule's does (L{cw.wire.private.write_through})."""
        return self._held is None

    #: What schedules the release of an exited job process's pipes
    #: (C{IReactorTime}): set by L{JobStarter} (its C{clock}).
    clock = None

    def processEnded(self, reason):
        why = getattr(self.amp, "killed_for", None)
        if why is None or reason.check(error.ProcessDone):
            super().processEnded(reason)
            return
        # Killed on purpose (L{cw.worker.pool.ChildLink.kill}): said in cw's
        # words, naming its jobs, and ended for ampoule as a stopped job
        # process is (through its connector's public C{amp} and C{finished},
        # as ampoule's own processEnded does), not as a "FATAL" death.
        log.info("Job process {pid} killed: {why}", pid=self.pgid, why=why)
        self.amp.connectionLost(reason)
        self.finished.callback("")

    def processExited(self, reason):
        if self.pgid is not None:
            # The job process's guard does this too (L{cw.worker.containment}); this
            # covers a job process whose guard could not start.
            kill_group(self.pgid)
        self._last_words()
        # On the next turn, so that Twisted finishes its own bookkeeping of
        # the exit first.
        self.clock.callLater(0, release_pipes, self.transport)

    # Big boxes to the job process are streamed (L{cw.wire.streaming}) through
    # the pipe that ampoule writes them to.

    def registerProducer(self, producer, streaming):
        self.transport.pipes[3].registerProducer(producer, streaming)

    def unregisterProducer(self):
        pipe = self.transport.pipes.get(3)
        if pipe is not None:
            pipe.unregisterProducer()

    def errReceived(self, data):
        for line in data.decode("utf-8", "replace").rstrip().splitlines():
            log.info("job process {n}: {line}", n=self.name, line=line)

    #: Called with the L{P.Output} records the job process sends while its
    #: jobs run (L{cw.worker.capture.Watcher}): set by L{JobStarter}.
    on_output = None

    _frames: P.OutputFrames | None = None

    #: Whether the batch the job process runs may send output notices (a
    #: job that streams its output, L{cw.worker.child.streams_output}):
    #: set by L{cw.worker.pool.ChildLink} as it sends each batch.
    notices_expected = True

    def childDataReceived(self, fd, data):
        if fd == 1:
            self._output_received(data)
            return
        if fd == ampoule_main.FROM_CHILD and self.notices_expected:
            # The job process writes a job's last output notices before its
            # result: take them first, so that they reach the client first.
            # (Other jobs send none: no read that finds nothing.)
            self._drain_output()
        super().childDataReceived(fd, data)

    def _output_received(self, data: bytes) -> None:
        """
        Output notices (and anything else) on the job process's first pipe.
        The first notice is empty (of no job): the job process sends it
        once it has caught its output (L{cw.worker.capture}), before it
        reads anything.  Only then does it get what was written to it
        meanwhile, once its capture files are opened here too
        (L{_open_spools}): no job can run, and its process die, before.
        """
        if self._frames is None:
            self._frames = P.OutputFrames()
        outputs, stray = self._frames.feed(data)
        if stray:
            self.errReceived(stray)
        if not outputs:
            return
        if self._held is not None:
            self._open_spools()
            held, self._held = self._held, None
            for box in held:
                super().write(box)
        outputs = [output for output in outputs if output.client]
        if outputs and self.on_output is not None:
            self.on_output(outputs)

    #: The job process's fd 1 and 2 (the files its jobs' output is caught
    #: in, L{cw.worker.capture}), opened here too once it runs, so that what
    #: a job wrote before its process died is not lost with it.
    _spools: list[tuple[str, int]] = []

    def _open_spools(self) -> None:
        self._spools = []
        for name, fd in (("stdout", 1), ("stderr", 2)):
            try:
                spool = os.open(f"/proc/{self.pgid}/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            if stat.S_ISREG(os.fstat(spool).st_mode):
                self._spools.append((name, spool))
            else:  # not caught (yet): a pipe, which is not to be read here
                os.close(spool)

    #: What the job process's last job wrote to stdout and stderr and did
    #: not report, read when the process ended (L{_last_words}); its
    #: worker puts it in the crash report of a lone job.
    last_words: tuple[bytes, bytes] = (b"", b"")

    #: Bytes of each stream kept in L{last_words} (C{cw-worker --output-limit}):
    #: set by L{JobStarter}.
    output_limit = OUTPUT_LIMIT

    def _last_words(self) -> None:
        """The job process ended: keep, and log the end of, what its last job wrote and did not report."""
        spools, self._spools = self._spools, []
        self._held = None
        words = {"stdout": b"", "stderr": b""}
        for name, spool in spools:
            try:
                size = os.lseek(spool, 0, os.SEEK_END)
                if size > self.output_limit:
                    kept = self.output_limit
                    data = cut_marker(size - kept, kept) + os.pread(spool, kept, size - kept)
                else:
                    data = os.pread(spool, size, 0) if size else b""
            except OSError:
                data = b""
            finally:
                os.close(spool)
            words[name] = data
            tail = data[-LAST_WORDS:].decode("utf-8", "replace").rstrip()
            for line in tail.splitlines():
                log.info("job process {n} ended; its job's {name}: {line}", n=self.name, name=name, line=line)
        self.last_words = (words["stdout"], words["stderr"])

    def _drain_output(self) -> None:
        """Read what waits on the job process's first pipe, now."""
        reader = getattr(self.transport, "pipes", {}).get(1)
        if reader is None:
            return
        while True:
            try:
                data = os.read(reader.fileno(), READ_SIZE)
            except OSError:  # nothing more now (EAGAIN), or closed
                return
            if not data:
                return  # the end: the reactor sees it too
            self._output_received(data)


#: Bytes of its job's stdout, and of its stderr, that a job process which
#: died leaves in its worker's log (the last ones).
LAST_WORDS = 16 << 10


class JobStarter(ampoule_main.ProcessStarter):
    """
    Starts job processes quietly (Twisted logs at warning level, so a job's
    own output stands out) and without spelling the environment into the
    worker's log.
    """

    def __init__(self, env: dict[str, str], clock, on_output=None, output_limit: int = OUTPUT_LIMIT) -> None:
        # ampoule builds each job process's connector from connectorFactory.
        self.connectorFactory = type(
            "JobConnector",
            (JobConnector,),
            {"clock": clock, "on_output": staticmethod(on_output), "output_limit": output_limit},
        )
        # First of all, the job process leads its own session and dies with
        # this worker (L{cw.worker.containment}).
        contain = (
            f"from cw.worker.containment import contain_job_process\ncontain_job_process({os.getpid()})\n"
        )
        # Then ampoule's bootstrap, quieter and leaving the job's stdout/stderr
        # alone (cw.wire.private.job_bootstrap).
        super().__init__(bootstrap=job_bootstrap(contain), env=env)

    def __repr__(self) -> str:
        return "JobStarter()"


def job_process_env() -> dict[str, str]:
    """
    The environment for job processes: the worker's own, with the
    directory holding the C{cw} package on C{PYTHONPATH} so that a job
    process imports the same cw as its worker.
    """
    return with_cw_on_path(os.environ)


class WorkerService(service.MultiService):
    """
    A worker: a pool of job processes plus a (re)connecting link to the
    master.

    @param master: the master's address (see L{cw.wire.address}).
    @param procs: jobs to run at once (default: the machine's cores).
    @param recycle_after: restart a job process after this many jobs
        (0: never).
    @param job_timeout: seconds a job may run unless it sets its own
        timeout; its process is then killed (None: no limit).
    @param memory_limit: address-space limit of each job process in MiB
        (C{RLIMIT_AS}); a job that allocates past it gets a C{MemoryError}
        and its process is replaced (0: no limit).
    @param recycle_memory: replace a job process whose resident size is
        above this many MiB after a job (0: never).
    @param master_timeout: reconnect when the master, having sent
        heartbeats, falls silent for this many seconds (0: never).
    @param drain_timeout: when stopped, seconds the running jobs may take to
        finish before their processes are killed (see L{Worker.drain}).
    @param reconnect_delay: longest wait between attempts to reach the
        master, so that a worker rejoins a restarted master within about
        this many seconds.
    @param output_limit: bytes of each job's stdout, and of its stderr,
        that go back with its result (the last ones; L{cw.worker.capture}).
    @param reactor: the reactor to connect and start job processes with,
        and the L{Worker}'s clock.
    """

    name = "cw-worker"

    def __init__(
        self,
        master: str | None = _DEFAULTS.master,
        procs: int | None = _DEFAULTS.procs,
        recycle_after: int = _DEFAULTS.recycle_after,
        secret: bytes | None = None,
        job_timeout: float | None = _DEFAULTS.job_timeout,
        memory_limit: int = _DEFAULTS.memory_limit,
        recycle_memory: int = _DEFAULTS.recycle_memory,
        master_timeout: float = _DEFAULTS.master_timeout,
        drain_timeout: float = _DEFAULTS.drain_timeout,
        reconnect_delay: float = _DEFAULTS.reconnect_delay,
        output_limit: int = _DEFAULTS.output_limit,
        cpus: int | None = _DEFAULTS.cpus,
        memory: str | None = _DEFAULTS.memory,
        gpus: str | None = _DEFAULTS.gpus,
        resource: tuple[str, ...] = _DEFAULTS.resource,
        tag: tuple[str, ...] = _DEFAULTS.tag,
        keep_results: int = _DEFAULTS.keep_results,
        *,
        reactor,
        machine: Capacity | None = None,
        find: discovery.MasterSource | None = None,
    ) -> None:
        super().__init__()
        self.output_limit = output_limit
        self.reactor = reactor
        self.drain_timeout = drain_timeout
        self.reconnect_delay = reconnect_delay
        self.keep_results = keep_results
        self.job_timeout = job_timeout
        self.master_timeout = master_timeout
        self.memory_limit = memory_limit
        self.recycle_memory = recycle_memory
        self.secret = secret
        #: How to find the master again before each connection: C{find},
        #: else the address file that C{master} names (C{file:PATH}); None:
        #: C{master} as given.
        self.find = find or discovery.master_source(master or "localhost")
        self.master_address = None if discovery.is_address_file(master) else client_description(master)
        machine = machine or machine_capacity()
        self.procs = procs or machine.cpus
        #: What this worker advertises; raises ValueError for a bad option.
        self.capacity = build_capacity(cpus, memory, gpus, resource, tag, self.procs, machine)
        #: The cores it owns, to pin jobs that ask for fewer to.
        self.cores = affinity_cores()[: self.capacity.cpus]
        self.recycle_after = recycle_after
        self.pool = None
        self.worker: Worker | None = None
        self.client_service: ClientService | None = None

    @classmethod
    def from_config(cls, config: WorkerConfig, secret: bytes | None, reactor) -> WorkerService:
        """
        The worker that C{config} (the command line's options, with the
        master resolved: C{--slurm} done) describes, holding C{secret}
        (None: C{--insecure}); the fields go to L{WorkerService} under the
        same names.
        """
        fields = dataclasses.asdict(config)
        for name in ("secret_file", "insecure", "slurm", "slurm_wait"):  # used by Options
            del fields[name]
        return cls(secret=secret, reactor=reactor, **fields)

    def startService(self):
        reactor = self.reactor
        bulk_pipe_reads()
        starter = JobStarter(
            job_process_env(), reactor, lambda outputs: self.worker.job_output(outputs), self.output_limit
        )
        self.pool = JobPool(
            JobChild,
            min=self.procs,
            max=self.procs,
            maxIdle=3600,
            recycleAfter=self.recycle_after,
            starter=starter,
            ampChildArgs=(str(self.memory_limit << 20), str(self.output_limit)),
            max_rss=self.recycle_memory << 20,
            clock=reactor,
        )
        self.worker = Worker(
            self.pool,
            self.procs,
            reactor,
            secret=self.secret,
            address=self.master_address,
            capacity=self.capacity,
            cores=self.cores,
            keep_results=self.keep_results,
        )
        self.worker.job_timeout = self.job_timeout
        self.worker.master_timeout = self.master_timeout
        self.worker.reconnect_delay = self.reconnect_delay
        if self.secret is None:
            log.warn(
                "cw worker running with --insecure: it runs jobs from any master it reaches"
                " without checking who that is"
            )
        factory = Factory.forProtocol(lambda: WorkerProtocol(self.worker))
        endpoint = FindingEndpoint(reactor, self.master_address, self.find, self._found)
        self.client_service = ClientService(endpoint, factory, retryPolicy=self.worker.retry_delay)
        self.client_service.setServiceParent(self)
        log.info(
            "cw worker starting {n} job processes ({capacity}); master at {master}",
            n=self.procs,
            capacity=self.capacity.describe(),
            master=self.master_address
            if self.find is None
            else f"{self.master_address} (found through {self.find})",
        )
        self.pool.start()
        super().startService()
        if self.note_sigterm:
            reactor.callWhenRunning(self._note_sigterm)

    def _found(self, address: str) -> None:
        """The master was found (again) at C{address}: connect there."""
        if address != self.master_address:
            if self.master_address is not None:
                log.info(
                    "The master is now at {address} (found through {find})", address=address, find=self.find
                )
            self.master_address = address
        if self.worker is not None:
            self.worker.address = address

    #: Set by L{makeService} (twistd): see L{_note_sigterm}.
    note_sigterm = False

    def _note_sigterm(self) -> None:
        """
        Chain a handler in front of the reactor's SIGTERM handler that marks
        the worker as terminating at once: under SLURM (scancel, the
        walltime warning) the job processes get the same signal and may die
        before the reactor stops this service, and their jobs must then go
        back to the master rather than be reported as crashed.

        A second SIGTERM or SIGINT while it stops is only logged (the
        reactor's handler would log a C{ReactorNotRunning} traceback): the
        stop is bounded anyway (C{--drain-timeout} plus L{STOP_BOUND}).
        """
        stopping = []
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(signum)
            if callable(previous):
                signal.signal(signum, functools.partial(self._stop_signal, previous, stopping))

    def _stop_signal(self, previous, stopping: list, signum: int, frame) -> None:
        """SIGTERM or SIGINT: mark the worker terminating, then stop it (once: see L{_note_sigterm})."""
        if signum == signal.SIGTERM and self.worker is not None:
            self.worker.terminating = True
        if stopping:
            log.info(
                "Received {name} while stopping: exiting within {t:g} s of the first one as it is",
                name=signal.Signals(signum).name,
                t=self.drain_timeout + STOP_BOUND,
            )
            return
        stopping.append(signum)
        previous(signum, frame)

    def stopService(self):
        """
        Stop gracefully (SIGTERM, SIGINT): drain (L{Worker.drain}), then
        close the master connection and stop the job processes, both at
        once and each within a bound (L{_close_master}, L{JobPool.stop}).
        """
        if self.worker is None:
            d = defer.succeed(None)
        else:
            d = self.worker.drain(self.drain_timeout)

        def close_and_stop(_):
            stopping = [self._close_master()]
            if self.pool is not None:
                stopping.append(self.pool.stop())
            return defer.gatherResults(stopping, consumeErrors=True)

        return d.addCallback(close_and_stop)

    def _close_master(self) -> defer.Deferred:
        """
        Close the master connection (L{ClientService.stopService}): the
        close waits until what is left to send (results) is written, which
        a master that reads nothing (stopped with SIGSTOP, a dead link)
        never lets happen, so after L{CLOSE_WAIT} seconds the connection is
        aborted.
        """
        current: list = []
        if self.client_service is not None:
            # Fires now if connected; else fails at the latest when stopped.
            connected = self.client_service.whenConnected(failAfterFailures=1)
            connected.addCallbacks(current.append, lambda _: None)
        closed = defer.maybeDeferred(super().stopService)

        def abort():
            transport = getattr(current[0], "transport", None) if current else None
            if transport is None:
                return
            log.warn(
                "The master did not take what was left to send within {t:g} s; closed the connection anyway"
                " (it runs again the jobs whose results it did not get)",
                t=CLOSE_WAIT,
            )
            transport.abortConnection()

        timer = self.reactor.callLater(CLOSE_WAIT, abort)

        def done(result):
            if timer.active():
                timer.cancel()
            return result

        return closed.addBoth(done)


class Options(ConfigOptions):
    synopsis = "[--master HOST[:PORT] | --master ENDPOINT] [--procs N] [HOST]"
    longdesc = (
        "Run a cw worker: it connects to a master and runs its jobs in N job"
        " processes.  The master is named as HOST, HOST:PORT or a Twisted"
        " endpoint description (tcp:HOST:PORT, unix:PATH); default localhost."
    )
    config_class = WorkerConfig

    def parseOptions(self, options=None):
        # Accept the original "cw.worker HOST --procs N" order too: getopt
        # stops at the first positional argument, so move HOST to the end.
        if options is None:
            options = sys.argv[1:]
        if options and not options[0].startswith("-"):
            options = [*options[1:], options[0]]
        super().parseOptions(options)

    def parseArgs(self, host=None):
        if host is not None:
            if self["master"]:
                raise usage.UsageError("give the master either as --master or as HOST, not both")
            self["master"] = host

    def postOptions(self):
        super().postOptions()  # the values' checks (WorkerConfig), before any wait for the master
        if self["slurm"]:
            if self["master"]:
                raise usage.UsageError("give either --slurm or a master address, not both")
            try:
                # Started before the master: wait for it (bounded).
                info = discovery.wait_for_master(
                    timeout=self["slurm-wait"], report=lambda m: print(f"cw worker: {m}", file=sys.stderr)
                )
            except Exception as e:
                raise usage.UsageError(f"--slurm: {e}") from None
            self["master"] = info["address"]
            if info.get("secret_file") and not self["secret-file"] and not self["insecure"]:
                self["secret-file"] = info["secret_file"]
        self["secret"] = load_options_secret(self, "cw-worker")


def makeService(options: Options) -> WorkerService:
    log_descriptor_limit("worker")
    from twisted.internet import reactor  # twistd has installed the reactor it runs by now

    worker = WorkerService.from_config(options.config(), options["secret"], reactor)
    if options["slurm"]:
        # Found through SLURM at start: found again there before each reconnection.
        worker.find = discovery.slurm_source()
    worker.note_sigterm = True
    return worker
