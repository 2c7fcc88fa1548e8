"""
The master: routes jobs from clients to workers and results back.

L{Master} owns one L{Scheduler}, the master's other pure decisions
(L{cw.core.flow}, L{cw.core.liveness}, L{cw.core.routing}) and the live
connections, and carries out the decisions; every connection is a
L{MasterProtocol} (L{cw.master.protocol}), an AMP adapter that turns
commands into calls on the L{Master}.  Payloads are passed along as
opaque bytes: the master never unpickles anything a peer sends.

Run it with C{twistd -n cw-master [--port ENDPOINT]} or
C{python -m cw.master [--port ENDPOINT]}.

Layer rule (cw.master): imports cw.discovery and below; never cw.client, cw.worker, cw.launch or cw.cli.
"""

from __future__ import annotations

import dataclasses
import operator
import os
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.protocols import amp

from cw.core.config import MasterConfig
from cw.core.flow import FlowControl, LentBytes
from cw.core.handover import Unclaimed
from cw.core.limits import Admission, default_max_pending, default_per_address
from cw.core.payload import (
    RESULT_REFERENCE_SIZE,
    is_kept,
    kept_reference,
    payload_size,
    read_reference,
    read_result_reference,
)
from cw.core.resources import Capacity
from cw.core.routing import Routing, SendContext
from cw.core.scheduler import Scheduler, Unsent
from cw.core.versions import CONTEXT_KEY, incompatible, short
from cw.errors import ReportKind, StateFileError
from cw.master.durable import DurableQueue, InlineWriter, StateWriter
from cw.master.heap import HeapKeeper
from cw.master.pool import (
    MasterSource,
    PoolService,
    bounds_from,
    launcher_factory,
    pools_in,
    read_pool_file,
    start_pools,
)
from cw.master.protocol import MasterFactory, MasterProtocol
from cw.master.web import FailureLog, WebDashboard
from cw.system import write_atomically
from cw.wire import commands as P
from cw.wire.address import (
    describe_listening,
    listen_failed,
    server_description,
    server_endpoint,
    stop_reactor,
)
from cw.wire.auth import WrongSecretLog
from cw.wire.forwarding import RELAY_ABOVE
from cw.wire.limits import descriptor_limit, log_descriptor_limit
from cw.wire.liveness import HeartbeatMonitor
from cw.wire.options import ConfigOptions
from cw.wire.private import last_tag, push
from cw.wire.secret import load_options_secret
from cw.wire.streaming import SpareBuffers

log = Logger(namespace="cw.master")  # the namespace of its log lines before the layers

#: The options' defaults (L{MasterConfig}), which L{Master}'s arguments share.
_DEFAULTS = MasterConfig()

#: Seconds over which the status reports a completion rate.
RATE_WINDOW = 60


#: Seconds between two checks of the jobs' deadlines.
DEADLINE_TICK = 0.5

#: Arguments of at least this many bytes are let go of once dispatched,
#: for clients that keep them (L{MasterService.keeps_arguments}).
LET_GO_ABOVE = 1 << 20


class Master:
    """
    The master's state: a L{Scheduler} plus the connections it routes
    between.  Independent of how it listens, so tests run it in-process.
    """

    def __init__(
        self,
        clock,
        prefetch: int = _DEFAULTS.prefetch,
        secret: bytes | None = None,
        max_pending: int | None = _DEFAULTS.max_pending,
        max_pending_per_address: int | None = _DEFAULTS.max_pending_per_address,
        max_attempts: int = _DEFAULTS.max_attempts,
        heartbeat: float = _DEFAULTS.heartbeat,
        heartbeat_timeout: float | None = _DEFAULTS.heartbeat_timeout,
        client_timeout: float = _DEFAULTS.client_timeout,
        auth_timeout: float = _DEFAULTS.auth_timeout,
        max_payload: int = _DEFAULTS.max_payload,
        prefetch_seconds: float = _DEFAULTS.prefetch_seconds,
        max_queued_bytes: int = _DEFAULTS.max_queued_bytes,
        max_queued_jobs: int = _DEFAULTS.max_queued_jobs,
        deadline_grace: float = _DEFAULTS.deadline_grace,
        stall_timeout: float = _DEFAULTS.stall_timeout,
        max_unsent_bytes: int = _DEFAULTS.max_unsent_bytes,
        client_read_timeout: float = _DEFAULTS.client_read_timeout,
        reserve_after: float = _DEFAULTS.reserve_after,
        unschedulable_timeout: float = _DEFAULTS.unschedulable_timeout,
        state: str | None = _DEFAULTS.state,
        max_stored_results_bytes: int = _DEFAULTS.max_stored_results_bytes,
        state_writer: StateWriter | InlineWriter | None = None,
    ) -> None:
        #: The reactor's clock (C{IReactorTime}): all the master's time comes from it.
        self.clock = clock
        #: Where every connection assembles the big values it receives (a
        #: client's argument, a worker's result), reusing the memory of
        #: earlier ones that nothing uses any more (forwarded, delivered):
        #: no fresh pages to clear, map and free for each.
        self.spare_buffers = SpareBuffers(clock)
        #: Seconds between heartbeats to each worker and client (0: none),
        #: and how long a worker, or a client, may go unheard before it is
        #: declared lost (L{cw.wire.liveness}).
        self.heartbeat = heartbeat
        self.heartbeat_timeout = heartbeat_timeout or 3 * heartbeat
        self.client_timeout = client_timeout
        self.worker_beats = self.client_beats = None
        if heartbeat > 0:
            # A peer to which this master forwards a box that waits for its
            # source is not silent (L{relay_fetched}, L{relay_result}); nor
            # is a client it does not read from (L{_client_excused}).
            waiting = operator.methodcaller("waiting_on_relay")
            self.worker_beats = HeartbeatMonitor(
                clock, heartbeat, self.heartbeat_timeout, self._worker_silent, waiting
            )
            if client_timeout > 0:
                self.client_beats = HeartbeatMonitor(
                    clock,
                    heartbeat,
                    client_timeout,
                    self._client_silent,
                    self._client_excused,
                    peers_watch=True,  # clients ping this master themselves
                )
        #: The shared secret peers must prove they hold; None: --insecure.
        self.secret = secret
        #: When to warn about peers with another secret (rate-limited).
        self.wrong_secrets = WrongSecretLog(clock)
        #: Connections not yet authenticated, and how many of them may wait
        #: (in all and per source address; see L{cw.wire.limits}).
        self.max_pending = default_max_pending(descriptor_limit(), max_pending)
        self.pending = Admission(
            self.max_pending, max_pending_per_address or default_per_address(self.max_pending)
        )
        self.auth_timeout = auth_timeout
        #: Largest job or result payload accepted, in bytes.
        self.max_payload = max_payload
        #: Room in the master's queue per client (flow control, L{P.JobRoom}).
        self.max_queued_bytes = max_queued_bytes
        self.max_queued_jobs = max_queued_jobs
        self.scheduler = Scheduler(
            prefetch=prefetch,
            max_attempts=max_attempts,
            horizon=prefetch_seconds,
            max_queued_bytes=max_queued_bytes,
            max_queued_jobs=max_queued_jobs,
            deadline_grace=deadline_grace,
            stall_timeout=stall_timeout,
            max_unsent_bytes=max_unsent_bytes,
            read_timeout=client_read_timeout,
            reserve_after=reserve_after,
            unschedulable_timeout=unschedulable_timeout,
        )
        self.flow = FlowControl(self.scheduler)
        #: Results workers lent to clients on their machine, not taken yet.
        self.lent = LentBytes()
        #: Clients' contexts and functions, and which workers were sent them.
        self.routing = Routing(max_payload)
        self._output_watch: task.LoopingCall | None = None
        self._deadline_checks: task.LoopingCall | None = None
        self.clients: dict[int, MasterProtocol] = {}
        #: The registered client of each session (L{P.RegisterClient}).
        self.sessions: dict[str, int] = {}
        #: Clients that asked never to be sent to workers with incompatible
        #: versions (C{version_mismatch="avoid"}, L{cw.core.versions}).
        self.avoiding: set[int] = set()
        #: Clients that may send big arguments as references to their
        #: memory (L{takes_references}).
        self.referencing: set[int] = set()
        #: Clients that keep their jobs' arguments until the results come
        #: (L{keeps_arguments}): big ones are let go of once dispatched.
        self.refetching: set[int] = set()
        #: Results workers handed over (L{handed_over}) for clients not back yet.
        self.unclaimed = Unclaimed()
        #: Clients told which of their jobs were handed to workers (L{P.JobsStarted}).
        self.running_notices: set[int] = set()
        #: Jobs handed to workers whose clients are yet to be told, by client
        #: (L{P.RUNNING_NOTICE_DELAY}); and the call that tells them.
        self._started: dict[int, dict[int, None]] = {}
        self._started_call = None
        self.workers: dict[int, MasterProtocol] = {}
        self.started = clock.seconds()
        #: The adaptive worker pool's loop (L{cw.master.pool.PoolService}), if the master runs one.
        self.pool = None
        #: Every pool's loop, when there are several (C{--pool NAME:min=..,max=..}).
        self.pools: list = []
        #: The dashboard's URL once it listens (set by L{MasterService}),
        #: for the clients' status (Jupyter links to it).
        self.dashboard: str | None = None
        self._dispatch_call = None
        #: Within a connection's read (L{read}), a dispatch asked for at
        #: once waits for the read's end: one pass for all the boxes one
        #: read brought, in the same turn of the reactor.
        self._reading = False
        self._dispatch_after_read = False
        #: [second, jobs completed in it] for the last minute.
        self._recent: deque[list[int]] = deque()
        self._worker_waiters: list[tuple[int, defer.Deferred]] = []
        #: Failed results delivered, for the dashboard (L{cw.master.web}).
        self.failures = FailureLog(clock=clock.seconds)
        #: Results passed on as they arrived (L{relay_result}), and those voided on the way.
        self.cut_through = 0
        self.cut_through_voided = 0
        #: Arguments passed on to workers as they arrived (L{relay_fetched}).
        self.cut_through_arguments = 0
        #: The durable queue (C{--state}), reloaded from its file; None: in memory only.
        self.durable: DurableQueue | None = None
        #: Keeps long-lived objects out of full garbage collections (the
        #: C{cw-master} process only, see L{makeService}); None: left alone.
        self.heap: HeapKeeper | None = None
        if state is not None:
            self.durable = DurableQueue(self, state, max_stored_results_bytes, state_writer)
            self.durable.reload()

    # -- events from connections -----------------------------------------

    def admit(self, proto: MasterProtocol) -> None:
        """
        Count a new unauthenticated connection.  If too many already wait
        (in all, or from its address), drop those L{Admission} picks: a
        flood of idle connections then can neither use up the master's
        descriptors nor lock out a peer that authenticates promptly.
        """
        address = getattr(proto.transport.getPeer(), "host", "local")
        for connection, why in self.pending.admit(proto, address):
            connection.reject(why)

    def client_joined(
        self,
        proto: MasterProtocol,
        context: dict,
        weight: int = 1,
        session: str | None = None,
        versions: dict | None = None,
    ) -> int:
        """
        Register a client connection; return its id.  C{session} names the
        client across its connections (L{P.RegisterClient}): a connection of
        a session that is still registered (the client reconnected before
        this master noticed that its old connection died) is dropped, with
        its jobs, which the client resubmits on the new one.  Workers are
        sent the session with the client's context, so that results they
        kept for it can be matched to the resubmitted jobs.  With
        C{--state}, a session whose jobs waited here while it was away
        takes them over (L{DurableQueue}).
        """
        old = self.sessions.get(session) if session is not None else None
        if old is not None and old in self.clients:
            stale = self.clients[old]
            log.info(
                "Client {cid} ({peer}) of session {session} reconnected; dropping its old connection",
                cid=old,
                peer=stale.peer_name,
                session=session,
            )
            self.client_left(stale)
            stale.callRemote(
                P.SessionReplaced,
                reason=f"another client registered its session {session!r} (from {proto.peer_name})",
            )
            stale.transport.loseConnection()
            # A half-open link would never close: do not keep it past the notice.
            self.clock.callLater(5, lambda: stale.closed.called or stale.transport.abortConnection())
        durable = self.durable if session is not None else None
        cid = durable.client_id(session) if durable is not None else None
        new = cid is None
        if new:
            cid = self.scheduler.add_client(weight)
        else:
            # Its session's jobs waited here: it takes them over, with a full room.
            self.scheduler.renew_room(cid)
        self.clients[cid] = proto
        proto.versions = versions
        if self.heap is not None:
            proto.heap_epoch = self.heap.epoch()
        if session is not None:
            self.sessions[session] = cid
            context = {**context, "session": session}
        if self.durable is not None:
            # Results that may have to wait on disk for their client cannot
            # stay in a worker's memory: workers send them all as bytes.
            context = {**context, P.RESULTS_STORED: True}
        # Workers get the client's versions with its context, to refuse its
        # jobs if they are incompatible (L{cw.core.versions}).
        routed = {**context, "versions": versions} if versions else context
        if new:
            self.routing.client_joined(cid, routed)
        if context.get(CONTEXT_KEY) == "avoid":
            self.avoiding.add(cid)
            for wid, worker in self.workers.items():
                if incompatible(versions, worker.versions):
                    self.scheduler.avoid(cid, wid)
        if durable is not None:
            durable.joined(session, cid, routed, weight)
        if self.client_beats is not None:
            self.client_beats.watch(proto)
        if context.get(P.RUNNING_NOTICES):
            self.running_notices.add(cid)
        log.info("Client {cid} connected from {peer}", cid=cid, peer=proto.peer_name)
        return cid

    def client_left(self, proto: MasterProtocol) -> None:
        cid = proto.peer_id
        if self.clients.get(cid) is not proto:
            return  # replaced by a newer connection of its session, and forgotten then
        if self.heap is not None:
            self.heap.left(proto.heap_epoch)
        session = getattr(proto, "session", None)
        if session is not None and self.sessions.get(session) == cid:
            del self.sessions[session]
        if self.client_beats is not None:
            self.client_beats.forget(proto)
        self.clients.pop(cid, None)
        self.avoiding.discard(cid)
        self.referencing.discard(cid)
        self.refetching.discard(cid)
        self.flow.forget(cid)
        self.lent.forget(cid)
        self.running_notices.discard(cid)
        self._started.pop(cid, None)
        if self.durable is not None and self.durable.left(cid):
            # Its session keeps its jobs; their results wait on disk for it.
            self.scheduler.unsent_results(cid, 0, 0, self.clock.seconds())
            state = self.scheduler.client(cid)
            log.info(
                "Client {cid} ({peer}) disconnected; its session keeps {n} queued and {k} running jobs"
                " (--state)",
                cid=cid,
                peer=proto.peer_name,
                n=state.queued,
                k=state.running,
            )
            self.schedule_dispatch()
            return
        dropped, killed = self.cancel(cid)
        self.forget_client(cid)
        log.info(
            "Client {cid} ({peer}) disconnected; dropped {n} queued jobs and stopped {k} running",
            cid=cid,
            peer=proto.peer_name,
            n=dropped,
            k=killed,
        )

    def takes_references(self, proto: MasterProtocol) -> bool:
        """
        Whether client C{proto}, just registered, may send big arguments as
        references to its memory (L{cw.core.payload.reference}): if it said
        which machine it runs on, and this master keeps no job beyond its
        client's connection (with C{--state}, a queued job outlives its
        client, and so would have to outlive the client's memory).
        """
        if self.durable is not None or proto.machine is None:
            return False
        self.referencing.add(proto.peer_id)
        return True

    def keeps_arguments(self, proto: MasterProtocol, context: dict) -> None:
        """
        Client C{proto}, just registered, said in its C{context} whether it
        keeps each job's argument until the job's result arrives
        (L{P.KEEPS_ARGUMENTS}): if so, and this master keeps no job beyond
        its client's connection, a big argument is let go of once a worker
        has it and fetched again from the client should the job run again
        (L{_let_go}), so that the master does not hold it while the job
        runs (and its result passes through).
        """
        if self.durable is None and context.get(P.KEEPS_ARGUMENTS) is True:
            self.refetching.add(proto.peer_id)

    def forget_client(self, cid: int) -> None:
        """
        Forget a departed client whose jobs are gone: the scheduler's
        record, and the workers' copies of its context and functions.
        """
        self.scheduler.remove_client(cid)
        for wid in self.routing.client_left(cid):
            worker = self.workers.get(wid)
            if worker is not None:
                worker.callRemote(P.ForgetClient, client=cid)

    def release_results(self, client: int, keys: list[tuple[int, int]]) -> None:
        """
        C{client} has taken these results that came by reference (keys
        C{(worker, seq)}, see L{P.ReleaseResults}): let each worker close
        their memory files.  A worker gone since closed its files then.
        """
        for wid, released in self.lent.released(client, keys).items():
            worker = self.workers.get(wid)
            if worker is not None:
                worker.callRemote(P.ReleaseResults, keys=released)
        proto = self.clients.get(client)
        if proto is not None:
            self.watch_output(proto)

    def define_function(self, client: int, key: bytes, function: bytes) -> None:
        """
        Keep a client's function (opaque bytes) for its jobs that name
        C{key}; it is sent to each worker once, before the first such job.
        """
        kept = self.routing.define(client, key, function)
        if kept and self.durable is not None:
            self.durable.function(client, key, function)
        if not kept:
            log.warn(
                "Client {cid} defined a function of {n:,} bytes, over --max-payload; its jobs will fail",
                cid=client,
                n=len(function),
            )

    def cancel(self, client: int, seqs: list[int] | None = None) -> tuple[int, int]:
        """
        Withdraw jobs of C{client} (C{seqs}, or all): drop queued ones, tell
        workers to kill held ones.  Return both counts.
        """
        dropped, kill = self.scheduler.cancel(client, seqs)
        if self.durable is not None and seqs is not None:
            self.durable.withdrawn(client, seqs)
        if dropped:
            self._give_room()
        for wid, keys in kill.items():
            self.workers[wid].callRemote(P.CancelJobs, keys=keys)
        if kill:
            self.schedule_dispatch()
        return dropped, sum(len(keys) for keys in kill.values())

    def worker_joined(
        self,
        proto: MasterProtocol,
        slots: int,
        versions: dict | None = None,
        capacity: Capacity | None = None,
    ) -> int:
        wid = self.scheduler.add_worker(slots, proto.peer_name, capacity)
        self.workers[wid] = proto
        if self.heap is not None:
            proto.heap_epoch = self.heap.epoch()
        proto.versions = versions
        self.routing.worker_joined(wid)
        clashes = []
        for cid, client in self.clients.items():
            if incompatible(client.versions, versions):
                clashes.append(f"{cid} ({client.peer_name})")
                if cid in self.avoiding:
                    self.scheduler.avoid(cid, wid)
        if clashes:
            log.warn(
                "Worker {peer} runs {versions}, incompatible with clients {clients}:"
                " their jobs fail there, or avoid it (version_mismatch='avoid')",
                peer=proto.peer_name,
                versions=short(versions),
                clients=", ".join(clashes),
            )
        if self.worker_beats is not None:
            self.worker_beats.watch(proto)
        log.info(
            "Worker {wid} joined from {peer} with {slots} slots, {capacity} ({n} workers)",
            wid=wid,
            peer=proto.peer_name,
            slots=slots,
            capacity=self.scheduler.worker(wid).resources.describe(),
            n=len(self.workers),
        )
        self._wake_worker_waiters()
        self.schedule_dispatch()
        if self.heap is not None:
            self.heap.joined()
        return wid

    def worker_left(self, proto: MasterProtocol) -> None:
        wid = proto.peer_id
        if self.worker_beats is not None:
            self.worker_beats.forget(proto)
        self.workers.pop(wid, None)
        self.routing.worker_left(wid)
        self.lent.worker_left(wid)
        how = proto.lost_how or "its connection was lost"
        requeued, failed = self.scheduler.lose_worker(wid, how)
        log.info(
            "Worker {wid} ({peer}) left ({how}); {n} of its jobs requeued ({left} workers)",
            wid=wid,
            peer=proto.peer_name,
            how=how,
            n=len(requeued),
            left=len(self.workers),
        )
        if failed:
            log.warn(
                "{n} jobs failed: this was the last of the lost workers each may outlive",
                n=len(failed),
            )
            self._deliver(failed)
        self.schedule_dispatch()
        if self.heap is not None:
            self.heap.left(proto.heap_epoch)

    def handed_over(self, worker: int, results: list[P.Result], sessions: list[str]) -> None:
        """
        Results a worker kept from a previous master connection (this
        master's or another's), each naming its client by session
        (C{result.client} is an index, from 1, in C{sessions}): a connected
        client of that session gets them, and its resubmitted copies of
        those jobs are withdrawn (it drops a result it has already had);
        for a client not back yet they are kept a while (L{Unclaimed}) and
        answer its jobs when it resubmits them.
        """
        now = self.clock.seconds()
        by_client: dict[int, list[P.Result]] = {}
        kept = 0
        for result in results:
            session = sessions[result.client - 1]
            cid = self.sessions.get(session)
            if cid is None:
                self.unclaimed.add(session, result, now)
                kept += 1
            else:
                by_client.setdefault(cid, []).append(P.Result(cid, result.seq, result.status, result.payload))
        for cid, batch in by_client.items():
            self.cancel(cid, [result.seq for result in batch])
            self._deliver(batch)
        log.info(
            "Worker {wid} handed over {n} results of jobs that finished while it had no master:"
            " {r} to their clients, {k} kept for clients not back yet",
            wid=worker,
            n=len(results),
            r=len(results) - kept,
            k=kept,
        )

    def _claim_results(self, client: int, jobs: list[P.Job]) -> tuple[list[P.Job], list[P.Result]]:
        """Of C{jobs}, those that a worker's handed-over result answers already, and those results."""
        session = getattr(self.clients[client], "session", None)
        if not len(self.unclaimed) or session is None:
            return [], []
        answered, results = [], []
        for job in jobs:
            result = self.unclaimed.take(session, job.seq)
            if result is not None:
                answered.append(job)
                results.append(P.Result(client, job.seq, result.status, result.payload))
        return answered, results

    def submit(self, client: int, jobs: list[P.Job]) -> None:
        answered, handed = self._claim_results(client, jobs)
        if answered:
            done = {id(job) for job in answered}
            jobs = [job for job in jobs if id(job) not in done]
        refused = []
        referencing = client in self.referencing
        for job in jobs:
            if payload_size(job.payload) > self.max_payload:
                # Clients check this limit at submit; this catches older or
                # misbehaving ones without queueing what no worker may answer.
                message = P.too_big("the job", payload_size(job.payload), self.max_payload)
                refused.append((job, ReportKind.PAYLOAD_TOO_LARGE, message))
            elif not referencing and read_reference(job.payload) is not None:
                refused.append(
                    (
                        job,
                        ReportKind.ARGUMENT_UNAVAILABLE,
                        "the job's argument was sent as a reference to its client's memory, which this"
                        " master did not allow (it keeps jobs beyond their client with --state, or the"
                        " client did not say which machine it runs on)",
                    )
                )
            elif job.func and not self.routing.defined(client, job.func):
                refused.append(
                    (
                        job,
                        ReportKind.UNKNOWN_FUNCTION,
                        "the job names a function its client did not define on this connection"
                        " (or one over the master's --max-payload)",
                    )
                )
            elif self.durable is not None and self.durable.too_big(job):
                message = P.too_big("the job", len(job.payload), self.durable.store.max_blob)
                refused.append(
                    (job, ReportKind.PAYLOAD_TOO_LARGE, message + " (what the master's --state file holds)")
                )
        if refused:
            bad = {id(job) for job, _, _ in refused}
            jobs = [job for job in jobs if id(job) not in bad]
            self.clients[client].send_results(
                [
                    P.Result(client, job.seq, P.Outcome.FAILED, P.error_report(kind, message))
                    for job, kind, message in refused
                ]
            )
        if handed:
            self._deliver(handed)
        if self.durable is not None:
            jobs = self.durable.accept(client, jobs)
        idle = not self.scheduler.queued
        duplicates = self.scheduler.submit(client, jobs, [job for job, _, _ in refused] + answered)
        if duplicates:
            log.warn(
                "Client {cid} ({name}) submitted jobs {seqs} while jobs with those numbers were"
                " queued or running; refused them ({kind})",
                cid=client,
                name=self.clients[client].peer_name,
                seqs=", ".join(str(result.seq) for result in duplicates[:10]),
                kind=ReportKind.DUPLICATE_JOB,
            )
            self.clients[client].send_results(duplicates)
        self._throttle(client)
        if idle:
            # Nothing was waiting, so nothing is gained by waiting for more:
            # a lone job goes out at once.
            self.dispatch_now()
        else:
            self.schedule_dispatch()

    def _throttle(self, client: int) -> None:
        """
        Carry out flow control (L{cw.core.flow}, L{P.JobRoom}): log once
        that a client has used its room; stop reading from one that sent
        past it.
        """
        proto = self.clients[client]
        throttle = self.flow.submitted(client)
        if throttle.first_held:
            log.info(
                "Client {cid} has used its room in the queue ({mib} MiB, {jobs:,} jobs);"
                " it holds further jobs until its queue drains (logged once per client)",
                cid=client,
                mib=self.max_queued_bytes >> 20,
                jobs=self.max_queued_jobs,
            )
        if throttle.stop_reading:
            log.warn(
                "Client {cid} ({peer}) sent past its room in the queue: not reading from it"
                " until its queue drains",
                cid=client,
                peer=proto.peer_name,
            )
            proto.stop_reading()

    def _give_room(self) -> None:
        """Tell clients whose queues have drained how much more they may send."""
        for room in self.flow.give_room():
            proto = self.clients.get(room.client)
            if proto is None:
                continue
            proto.callRemote(P.JobRoom, bytes=room.bytes, jobs=room.jobs)
            if room.resume_reading:
                # Its queue has drained to half: read on (up to one more box
                # if it still ignores its room).
                proto.resume_reading()

    def relay_result(self, worker: int, first, total: int) -> MasterProtocol | None:
        """
        Where a big result arriving from C{worker} goes as it arrives (cut
        through, L{cw.wire.forwarding}): its client's connection, if its
        batch (C{total} bytes, starting with C{first}) holds that one
        result, a success, of a job the worker holds for a client still
        here; None to receive it whole first (its result is then
        delivered as any other).  Not with C{--state}, which stores the
        results of absent clients.
        """
        if self.durable is not None or total < RELAY_ABOVE:
            return None
        found = P.lone_result(first, total)
        if found is None:
            return None
        client, seq, status = found
        if status != P.Outcome.OK or not self.scheduler.holds(worker, (client, seq)):
            return None
        return self.clients.get(client)

    def results(self, worker: int, results: list[P.Result], forwarded: tuple[int, int] | None = None) -> None:
        """
        C{worker} reports C{results}; the one whose key is C{forwarded}
        already went to its client as it arrived (L{relay_result}).
        """
        if forwarded is not None:
            self.cut_through += 1
        before = self.scheduler.completed
        self._deliver(self.scheduler.complete(worker, results, self.clock.seconds()), forwarded)
        self._count_completed(self.scheduler.completed - before)
        self._heard_from_worker(worker)
        if self.scheduler.queued:
            self.schedule_dispatch()  # once for the burst of results this turn may bring
        else:
            # Nothing waits: the pass (its bookkeeping and the room it gives
            # back) costs less now than a turn of the reactor later, which a
            # lone job's round trip would otherwise wait behind (issue 18).
            self.dispatch_now()

    def job_output(self, worker: int, host: str, outputs: list[P.Output]) -> None:
        """
        Pass what running jobs of C{worker} (on C{host}) wrote on to their
        clients at once (L{P.OutputNotice}); nothing is kept.
        """
        by_client: dict[int, list[P.Output]] = {}
        for output in self.scheduler.holding(worker, outputs):
            by_client.setdefault(output.client, []).append(output)
        for cid, batch in by_client.items():
            proto = self.clients.get(cid)
            if proto is not None:
                proto.callRemote(P.OutputNotice, host=host, outputs=batch)

    def return_jobs(self, worker: int, keys: list[tuple[int, int]]) -> None:
        """
        A worker is stopping gracefully and will not start these jobs:
        requeue them at once (see L{Scheduler.return_jobs}) and send it no
        more.
        """
        if worker not in self.workers:
            return
        back = self.scheduler.return_jobs(worker, keys)
        self._heard_from_worker(worker)
        log.info(
            "Worker {wid} ({peer}) is draining; {n} of its unstarted jobs requeued",
            wid=worker,
            peer=self.workers[worker].peer_name,
            n=len(back),
        )
        self.schedule_dispatch()

    # -- heartbeats ------------------------------------------------------

    def _heard_from_worker(self, worker: int) -> None:
        """A worker's report is a sign of life, as any data from it is (L{SignsOfLife})."""
        proto = self.workers.get(worker)
        if proto is not None and self.worker_beats is not None:
            self.worker_beats.heard(proto)

    def start_heartbeats(self) -> None:
        """Ping every worker and client each C{heartbeat} seconds (unless 0)."""
        for monitor in (self.worker_beats, self.client_beats):
            if monitor is not None:
                monitor.start()

    def stop_heartbeats(self) -> None:
        for monitor in (self.worker_beats, self.client_beats):
            if monitor is not None:
                monitor.stop()

    def _worker_silent(self, proto: MasterProtocol, silent: float) -> None:
        """
        Drop a worker unheard for longer than C{heartbeat_timeout} (its TCP
        connection may never close on its own): its jobs go elsewhere.  (Not
        one to which the master is forwarding a client's argument that is
        slow to come, L{relay_fetched}: L{cw.core.liveness.Liveness.beat}
        does not report it.)
        """
        proto.lost_how = f"no answer to heartbeats for {silent:.1f} s"
        log.warn(
            "Worker {wid} ({peer}) gave no sign of life for {s:.1f} s; dropping it",
            wid=proto.peer_id,
            peer=proto.peer_name,
            s=silent,
        )
        proto.transport.abortConnection()

    def _client_excused(self, proto: MasterProtocol) -> bool:
        """
        Whether a client's silence is not its own, so that
        L{cw.core.liveness.Liveness.beat} does not report it: a result
        forwarded to it waits for its source (L{relay_result}), or this
        master stopped reading from it (L{cw.core.flow.FlowControl.excused}).
        """
        return proto.waiting_on_relay() or self.flow.excused(proto.peer_id)

    def _client_silent(self, proto: MasterProtocol, silent: float) -> None:
        """
        Drop a client unheard for longer than C{client_timeout} (stopped,
        hung, or behind a dead link): its jobs are dropped as for any client
        that leaves.  (Not one whose silence is excused, L{_client_excused}:
        L{cw.core.liveness.Liveness.beat} does not report it.)
        """
        log.warn(
            "Client {cid} ({peer}) gave no sign of life for {s:.1f} s (--client-timeout {t:g});"
            " dropping it and its jobs",
            cid=proto.peer_id,
            peer=proto.peer_name,
            s=silent,
            t=self.client_timeout,
        )
        proto.transport.abortConnection()

    # -- deadlines -------------------------------------------------------

    def start_deadlines(self) -> None:
        """Enforce jobs' deadlines and stalled workers every L{DEADLINE_TICK} seconds."""
        if self._deadline_checks is None:
            self._deadline_checks = task.LoopingCall(self.enforce_deadlines)
            self._deadline_checks.clock = self.clock
            self._deadline_checks.start(DEADLINE_TICK, now=False)

    def stop_deadlines(self) -> None:
        if self._deadline_checks is not None and self._deadline_checks.running:
            self._deadline_checks.stop()
        self._deadline_checks = None

    def enforce_deadlines(self) -> None:
        """
        Carry out L{Scheduler.expire}: tell workers to kill the jobs taken
        back from them, drop stalled workers, deliver C{JobTimeout}s and
        dispatch the requeued jobs.  Tell the scheduler how late this
        tick ran (L{Scheduler.note_lag}: how long a busy master takes to
        read what comes).
        """
        now = self.clock.seconds()
        loop = self._deadline_checks
        if loop is not None and loop.starttime is not None:
            late = (now - loop.starttime) % DEADLINE_TICK
            self.scheduler.note_lag(0.0 if late > DEADLINE_TICK - 1e-6 else late, now)
        expiry = self.scheduler.expire(now)
        for warning in expiry.unschedulable:
            log.warn("Unschedulable: {warning}", warning=warning)
        self.unclaimed.expire(self.clock.seconds())
        for wid, keys in expiry.cancel.items():
            proto = self.workers.get(wid)
            if proto is None:
                continue
            log.warn(
                "Worker {wid} ({peer}) did not report {n} jobs within their timeout plus"
                " {grace:g} s (--deadline-grace); taking them back",
                wid=wid,
                peer=proto.peer_name,
                n=len(keys),
                grace=self.scheduler.deadline_grace,
            )
            if wid not in expiry.stalled:
                proto.callRemote(P.CancelJobs, keys=keys)
        for wid, how in expiry.stalled.items():
            proto = self.workers.get(wid)
            if proto is None:
                continue
            proto.lost_how = how
            log.warn(
                "Worker {wid} ({peer}) is stalled: {how}; dropping it", wid=wid, peer=proto.peer_name, how=how
            )
            proto.transport.abortConnection()
        if expiry.failed:
            self._deliver(expiry.failed)
        if expiry.requeued:
            self.schedule_dispatch()

    def _deliver(self, results: list[P.Result], forwarded: tuple[int, int] | None = None) -> None:
        """
        Send results to their clients (with C{--state}, store those of
        absent ones), but for the one whose key is C{forwarded}: it went
        as it arrived.
        """
        self.failures.record(results)
        if self.durable is not None:
            results = self.durable.ended(results, self.clients.keys())
        by_client: dict[int, list[P.Result]] = {}
        for result in results:
            by_client.setdefault(result.client, []).append(result)
        for cid, batch in by_client.items():
            for result in batch:
                if result.status == P.Outcome.OK and len(result.payload) == RESULT_REFERENCE_SIZE:
                    where = read_result_reference(result.payload)
                    if where is not None:
                        # Its bytes wait for the client in the worker's memory.
                        self.lent.lent(cid, where.worker, result.seq, where.length)
            # A client's last outstanding result leaves at once (a lone
            # job's round trip waits for no turn); while more are out, the
            # results of every worker report read in this reactor turn
            # share a box to the client (many workers each reporting a few
            # results cost one box, not one each).
            proto = self.clients[cid]
            sent = batch
            if forwarded is not None:
                sent = [result for result in batch if result.key != forwarded]
            if sent:
                proto.send_results(sent, now=not self.scheduler.has_jobs(cid))
            # Its jobs need no notice that they started: dropped once the
            # results have gone (a lone job's waits for nothing else), in
            # the same turn, so before any notice could be sent.
            notices = self._started.get(cid)
            if notices:
                for result in batch:
                    notices.pop(result.seq, None)
                if not notices:
                    self._no_notice_left(cid)
            self.watch_output(proto)

    def busy(self) -> bool:
        """Whether any client has jobs queued or running (those away with C{--state} too)."""
        if self.scheduler.queued:
            return True
        cids = self.clients.keys() if self.durable is None else {*self.clients, *self.durable.names}
        return any(self.scheduler.has_jobs(cid) for cid in cids)

    def keeps_results(self, cid: int) -> bool:
        """
        Whether the results sent to client C{cid} are kept until it
        acknowledges them (L{P.ResultsTaken}): with C{--state}, for a client
        that said it would (L{P.TAKES_RESULTS}).
        """
        return self.durable is not None and self.durable.acking(cid)

    def results_taken(self, cid: int, seqs: list[int]) -> None:
        """Client C{cid} has these results (L{P.ResultsTaken}): they need not be kept any more."""
        if self.durable is not None:
            self.durable.taken(cid, seqs)

    def jobs_stored(self, acks: dict[int, list[int]]) -> None:
        """A commit of the state file holds these clients' jobs: tell them (L{P.JobsStored})."""
        for cid, seqs in acks.items():
            proto = self.clients.get(cid)
            if proto is not None and seqs:
                for start in range(0, len(seqs), 50_000):
                    proto.callRemote(P.JobsStored, keys=[(0, seq) for seq in seqs[start : start + 50_000]])

    def session_jobs(self, cid: int) -> list[int]:
        """
        The numbers of client C{cid}'s session's jobs that this master holds
        (L{P.SessionJobs}); the results that waited for it follow the answer
        (L{P.StoredResults}), and are deleted once the client has them.
        """
        if self.durable is None:
            return []
        proto = self.clients[cid]

        def send(results: list[P.Result]) -> defer.Deferred:
            return proto.callRemote(P.StoredResults, results=results)

        def deliver() -> None:
            sent = self.durable.deliver(cid, send)
            sent.addErrback(lambda f: log.failure("Cannot deliver the stored results of {cid}", f, cid=cid))

        # After the answer (this turn): the client knows the jobs by then.
        self.clock.callLater(0, deliver)
        return self.durable.session_jobs(cid)

    # -- clients that do not read ----------------------------------------

    def start_watching_clients(self) -> None:
        """Check every client's unsent results every second (or quarter of the read timeout)."""
        if self._output_watch is None:
            self._output_watch = task.LoopingCall(self._watch_outputs)
            self._output_watch.clock = self.clock
            self._output_watch.start(min(1.0, self.scheduler.read_timeout / 4), now=False)

    def stop_watching_clients(self) -> None:
        if self._output_watch is not None and self._output_watch.running:
            self._output_watch.stop()
        self._output_watch = None

    def _watch_outputs(self) -> None:
        for proto in list(self.clients.values()):
            self.watch_output(proto)

    def watch_output(self, proto: MasterProtocol) -> None:
        """
        Tell the scheduler how much of its results C{proto}'s client has
        not read: its jobs wait while that is over C{--max-unsent-bytes},
        and a client that reads nothing for C{--client-read-timeout}
        seconds is disconnected (L{Scheduler.unsent_results}).
        """
        cid = proto.peer_id
        if self.clients.get(cid) is not proto or proto.transport is None:
            return
        buffered = proto.unsent_bytes()
        # Results lent by workers count as unsent until the client takes them.
        unsent = buffered + self.lent.outstanding(cid)
        read = proto.sent_bytes() + self.lent.taken(cid)
        now = self.clock.seconds()
        verdict = self.scheduler.unsent_results(cid, unsent, read, now)
        if verdict is Unsent.RESUME:
            self.schedule_dispatch()
        elif verdict is Unsent.DROP:
            log.warn(
                "Client {cid} ({peer}) read none of its results for over {t:g} s"
                " ({mib:.1f} MiB wait): disconnecting it (--client-read-timeout)",
                cid=cid,
                peer=proto.peer_name,
                t=self.scheduler.read_timeout,
                mib=unsent / (1 << 20),
            )
            proto.transport.abortConnection()

    # -- dispatch --------------------------------------------------------

    def schedule_dispatch(self) -> None:
        """Dispatch on the reactor's next turn, once for a burst of events."""
        if self._dispatch_call is None:
            self._dispatch_call = self.clock.callLater(0, self._dispatch)

    def dispatch_now(self) -> None:
        """
        Dispatch at once (a scheduled dispatch, if any, is dropped); within
        a connection's read, at its end (L{read}).
        """
        if self._reading:
            self._dispatch_after_read = True
            return
        if self._dispatch_call is not None and self._dispatch_call.active():
            self._dispatch_call.cancel()
        self._dispatch()

    def read(self, receive: Callable[[bytes], None], data: bytes) -> None:
        """
        Pass one read of a connection, C{data}, to C{receive} (its parser),
        and dispatch once at its end if a box in it asked to dispatch at once
        (L{dispatch_now}: jobs or results that found the queue empty).  A
        client whose boxes of jobs pile up in its socket while the master is
        busy sends many in one read: dispatched box by box, each would go to
        another idle worker in a box of its own (a write, a read and a
        result box each, both ends, per box of the client's); dispatched
        together, jobs of a short kind go many to a box as they do to a
        master with few workers (L{cw.core.scheduler}).  A lone job still
        leaves in the turn of the reactor that read it.
        """
        if self._reading:  # a read within a read (in-memory connections in tests)
            receive(data)
            return
        self._reading = True
        try:
            receive(data)
        finally:
            self._reading = False
            if self._dispatch_after_read:
                self._dispatch_after_read = False
                self.dispatch_now()

    def _dispatch(self) -> None:
        self._dispatch_call = None
        notify = self.running_notices
        started: dict[int, list[tuple[int, int]]] = {}
        for wid, jobs in self.scheduler.dispatch(self.clock.seconds()):
            proto = self.workers[wid]
            for send in self.routing.before(wid, jobs):
                if isinstance(send, SendContext):
                    proto.callRemote(P.ClientContext, client=send.client, context=send.context)
                else:
                    proto.callRemote(
                        P.DefineFunction, client=send.client, key=send.key, function=send.function
                    )
            if self.referencing or self.refetching:
                jobs = self._fetch_elsewhere(wid, proto, jobs)
            proto.send_jobs(jobs)
            push(proto.transport)  # the worker gets its jobs now, before any notice to clients
            if self.refetching:
                self._let_go(wid, jobs)
            if notify:
                for job in jobs:
                    if job.client in notify:
                        started.setdefault(job.client, []).append((job.client, job.seq))
        # Told a little later, and not at all for jobs whose results come
        # first (the result says it): a short job costs one message less.
        for cid, keys in started.items():
            self._started.setdefault(cid, {}).update(dict.fromkeys(seq for _, seq in keys))
        if started and self._started_call is None:
            self._started_call = self.clock.callLater(P.RUNNING_NOTICE_DELAY, self._send_started)
        self._give_room()

    def _fetch_elsewhere(self, wid: int, worker: MasterProtocol, jobs: list[P.Job]) -> list[P.Job]:
        """
        Of C{jobs}, handed to worker C{wid}, those to send it now: the
        others are references to their clients' memory that it cannot open
        (it runs on another machine, or did not say which); their bytes are
        fetched from the client first (L{P.FetchPayload}) and sent when
        they arrive.
        """
        send = []
        for job in jobs:
            where = read_reference(job.payload)
            if where is not None and (job.client in self.referencing or is_kept(where)):
                client = self.clients[job.client]
                if is_kept(where) or worker.machine is None or worker.machine != client.machine:
                    self._fetch(wid, worker, client, job)
                    continue
            send.append(job)
        return send

    def _let_go(self, wid: int, jobs: list[P.Job]) -> None:
        """
        Of C{jobs}, just written to worker C{wid}, let go of the big
        arguments of clients that keep them (L{keeps_arguments}): the
        scheduler's record holds a L{kept_reference} of the same size
        instead, fetched from the client if the job runs again
        (L{_fetch_elsewhere}).  The bytes being written are not affected
        (the connection holds them until they are sent).
        """
        worker = self.scheduler.worker(wid)
        for job in jobs:
            if job.client in self.refetching and len(job.payload) >= LET_GO_ABOVE:
                worker.stand_in(job.key, kept_reference(len(job.payload)))

    def _fetch(self, wid: int, worker: MasterProtocol, client: MasterProtocol, job: P.Job) -> None:
        """
        Ask C{client} for the bytes C{job}'s reference stands for; send the
        job with them to worker C{wid} if it still holds it (it may have
        been cancelled, or the worker lost, meanwhile); fail it if the
        client cannot send them.
        """
        size = payload_size(job.payload)
        why = " to run it again" if is_kept(read_reference(job.payload)) else " on another machine"

        def holds() -> bool:
            return self.workers.get(wid) is worker and job.key in self.scheduler.worker(wid).held

        def arrived(answer: dict) -> None:
            client.fetches.pop(tag, None)
            relay = client.relayed
            if relay is not None and not relay.lost:
                self.cut_through_arguments += 1
                return  # it went on to the worker as it arrived (L{relay_fetched})
            if holds():
                worker.send_jobs([P.Job(job.client, job.seq, answer["payload"], job.options, job.func)])
                push(worker.transport)

        def failed(reason) -> None:
            client.fetches.pop(tag, None)
            if not holds():
                return
            message = (
                f"job {job.seq} of client {client.peer_name}: its argument ({size:,} bytes) lies in its"
                f" client's memory, and the client could not send it for worker {worker.peer_name}{why}"
                f" ({reason.getErrorMessage()}); submit it again"
            )
            report = P.error_report(ReportKind.ARGUMENT_UNAVAILABLE, message)
            self.results(wid, [P.Result(job.client, job.seq, P.Outcome.FAILED, report)])

        asked = client.callRemote(P.FetchPayload, seq=job.seq)
        tag = last_tag(client)
        client.fetches[tag] = (holds, worker, job)
        asked.addCallbacks(arrived, failed)

    def relay_fetched(self, client: MasterProtocol, tag: bytes, total: int) -> tuple | None:
        """
        Where the argument that C{client} sends in answer to the question
        tagged C{tag} goes as it arrives (cut through, L{cw.wire.forwarding}):
        the job's worker, in a L{P.RunJobs} box of that one job, if the
        argument was asked for to run it there (L{_fetch}), is big, and
        the worker still holds the job; None to receive it whole first.
        Voided on the way (the client's box failing its MAC, or its
        connection lost), the job fails as when the client cannot send
        its argument, and the worker discards the box.
        """
        fetch = client.fetches.get(tag)
        if fetch is None or total < RELAY_ABOVE:
            return None
        holds, worker, job = fetch
        if not holds():
            return None
        items = [(amp.COMMAND, P.RunJobs.commandName)]
        return (worker, items, b"jobs", P.job_prefix(job, total))

    def _no_notice_left(self, cid: int) -> None:
        """
        Every job of client C{cid} that was to be told started has ended
        first: drop its entry, and the timer if no client has one left (a
        lone job's master then wakes up once less).
        """
        del self._started[cid]
        if not self._started and self._started_call is not None:
            if self._started_call.active():
                self._started_call.cancel()
            self._started_call = None

    def _send_started(self) -> None:
        """
        Tell clients which of their jobs were handed to workers
        (L{P.JobsStarted}).  How late this call runs tells the scheduler
        the master's lag during a burst of dispatches
        (L{Scheduler.note_lag}), sooner than the deadline tick.
        """
        if self._started_call is not None:
            now = self.clock.seconds()
            self.scheduler.note_lag(max(0.0, now - self._started_call.getTime()), now)
        self._started_call = None
        started, self._started = self._started, {}
        for cid, seqs in started.items():
            proto = self.clients.get(cid)
            if proto is not None and seqs:
                proto.callRemote(P.JobsStarted, keys=[(cid, seq) for seq in seqs])

    # -- inspection ------------------------------------------------------

    def mismatched_workers(self, versions: dict | None) -> list[dict]:
        """The workers whose versions are incompatible with C{versions} (a client's)."""
        found = []
        for worker in self.workers.values():
            reasons = incompatible(versions, worker.versions)
            if reasons:
                found.append({"worker": worker.peer_name, "versions": worker.versions, "reasons": reasons})
        return found

    def probe_workers(self, packages: list[str], context: dict | None, timeout: float) -> defer.Deferred:
        """
        Ask every worker for its versions, those of C{packages}, and
        whether it sees C{context}'s paths (L{P.Probe}); fires with one
        entry per worker, C{"report"} or C{"error"} (no answer within
        C{timeout} seconds, or the connection failed).
        """

        def ask(wid: int, proto: MasterProtocol) -> defer.Deferred:
            entry = {"id": wid, "peer": proto.peer_name}
            d = proto.callRemote(P.Probe, packages=packages, context=context)
            d.addTimeout(timeout, self.clock)
            d.addCallbacks(
                lambda answer: {**entry, "report": answer["report"]},
                lambda failure: {**entry, "error": f"no answer: {failure.getErrorMessage()}"},
            )
            return d

        asked = [ask(wid, proto) for wid, proto in list(self.workers.items())]
        return defer.gatherResults(asked)

    def await_workers(self, count: int) -> defer.Deferred:
        """A Deferred firing with the number of workers once it is >= count."""
        d = defer.Deferred()
        self._worker_waiters.append((count, d))
        self._wake_worker_waiters()
        return d

    def _wake_worker_waiters(self) -> None:
        n = len(self.workers)
        waiting = []
        for count, d in self._worker_waiters:
            if n >= count:
                d.callback(n)
            else:
                waiting.append((count, d))
        self._worker_waiters = waiting

    def _count_completed(self, n: int) -> None:
        """Remember completions per second, for the rate over the last minute."""
        if not n:
            return
        second = int(self.clock.seconds())
        if self._recent and self._recent[-1][0] == second:
            self._recent[-1][1] += n
        else:
            self._recent.append([second, n])
        while self._recent and self._recent[0][0] <= second - RATE_WINDOW:
            self._recent.popleft()

    def rate(self) -> float:
        """Jobs completed per second over the last minute (or the uptime, if shorter)."""
        now = self.clock.seconds()
        done = sum(n for second, n in self._recent if second > now - RATE_WINDOW)
        return done / max(1.0, min(RATE_WINDOW, now - self.started))

    def _client_name(self, cid: int) -> str:
        """A client's C{host:pid}, or C{away} for a session whose client is away (C{--state})."""
        proto = self.clients.get(cid)
        if proto is not None:
            return proto.peer_name
        return "away" if self.durable is not None else "?"

    def _session_name(self, cid: int) -> str | None:
        """A client's session name (that of a client away, with C{--state}, too)."""
        proto = self.clients.get(cid)
        if proto is not None:
            return getattr(proto, "session", None)
        return self.durable.names.get(cid) if self.durable is not None else None

    def status(self) -> dict:
        """A JSON-ready snapshot of the master's state (C{state}: the state file's, or None)."""
        s = self.scheduler
        return {
            "pool": None if self.pool is None else self.pool.status(),
            "pools": [pool.status() for pool in self.pools],
            # The master's clock, so that a client can tell their skew (cw doctor).
            "time": self.clock.seconds(),
            "state": None if self.durable is None else self.durable.status(),
            "uptime": self.clock.seconds() - self.started,
            "queued": s.queued,
            "unschedulable": sum(s.unschedulable().values()),
            # The sized jobs queued, by shape (the rest ask for nothing): for
            # the pools of 'cw-slurm adapt', each scaled for its share.
            "queued_shapes": [{**shape.to_json(), "count": n} for shape, n in s.queued_shapes()[1].items()],
            # Results workers handed over for clients not back yet (L{handed_over}).
            "unclaimed_results": len(self.unclaimed),
            "unclaimed_bytes": self.unclaimed.bytes,
            "job_seconds": s.job_seconds,
            "completed": s.completed,
            # Big results passed on to their clients as they arrived, and
            # those voided on the way (L{relay_result}).
            "cut_through": {
                "results": self.cut_through,
                "arguments": self.cut_through_arguments,
                "voided": self.cut_through_voided,
            },
            "rate": self.rate(),
            "dashboard": self.dashboard,
            "workers": [
                {
                    "id": w.id,
                    "peer": self.workers[w.id].peer_name,
                    "slots": w.slots,
                    "held": len(w.held),
                    "busy": min(len(w.held), w.slots),
                    "draining": w.draining,
                    "launch": getattr(self.workers[w.id], "launch", None),
                    "completed": w.completed,
                    "failed": w.failed,
                    "versions": self.workers[w.id].versions,
                    "capacity": w.resources.to_json(),
                    "free": {"cpus": w.ledger.cpus - w.ledger.plain, "gpus": list(w.ledger.gpus)},
                }
                for w in s.workers()
            ],
            "clients": [
                {
                    "id": c.id,
                    "peer": self._client_name(c.id),
                    "session": self._session_name(c.id),
                    "queued": c.queued,
                    "queued_bytes": s.queued_bytes(c.id),
                    "peak_queued": c.peak_queued,
                    "peak_queued_bytes": c.peak_queued_bytes,
                    "held": s.held(c.id),
                    "unsent_bytes": c.unsent,
                    "results_backed_up": c.results_backed_up,
                    "running": c.running,
                    "submitted": c.submitted,
                    "completed": c.completed,
                    "versions": getattr(self.clients.get(c.id), "versions", None),
                }
                for c in s.clients()
            ],
        }

    def disconnect_all(self) -> None:
        for proto in [*self.clients.values(), *self.workers.values(), *list(self.pending)]:
            proto.transport.loseConnection()

    def shutdown(self, reason: str, timeout: float = 5.0) -> defer.Deferred:
        """
        Tell every client and worker that this master stops, and why
        (L{P.MasterStopping}): clients then fail their outstanding jobs at
        once instead of waiting for a connection error, workers reconnect
        later.  Then close every connection, letting the notice out first.
        Fires once all are closed; any still open after C{timeout} seconds
        is aborted.
        """
        peers = [*self.clients.values(), *self.workers.values()]
        log.info(
            "Stopping ({reason}); telling {c} clients and {w} workers",
            reason=reason,
            c=len(self.clients),
            w=len(self.workers),
        )
        for proto in peers:
            proto.callRemote(P.MasterStopping, reason=reason)
        peers += list(self.pending)
        closed = defer.DeferredList([proto.closed for proto in peers])
        self.disconnect_all()

        def abort_stragglers() -> None:
            for proto in peers:
                if not proto.closed.called:
                    proto.transport.abortConnection()

        deadline = self.clock.callLater(timeout, abort_stragglers)
        return closed.addCallback(lambda _: deadline.active() and deadline.cancel())


class MasterService(service.Service):
    """
    Listen on an endpoint and run a L{Master} behind it.

    @param listen: endpoint description (default C{tcp:5494}).
    @param address_file: if given, the address clients should use is written
        there (atomically) once the master listens; removed on stop.
    @param web: if given, serve the dashboard, C{/api/status} and
        C{/metrics} on this endpoint (L{cw.master.web.WebDashboard}), and write its
        URL to C{web_address_file} if that is given.
    @param web_options: more keyword arguments of L{cw.master.web.WebDashboard}
        (C{token_file}, C{open_access}, C{hosts}).
    @param pool_file: if given, run the adaptive worker pool it describes
        (L{cw.master.pool}) once listening.
    @param reactor: the reactor to listen with, and the L{Master}'s clock.
    @param options: passed on to L{Master}.
    """

    name = "cw-master"

    def __init__(
        self,
        listen: str | None = None,
        address_file: str | None = None,
        web: str | None = None,
        web_address_file: str | None = None,
        web_options: dict | None = None,
        *,
        reactor,
        pool_file: str | None = None,
        **options: Any,
    ) -> None:
        self.reactor = reactor
        self.listen = listen
        self.address_file = address_file
        #: The adaptive pool's description (L{cw.master.pool.read_pool_file}), and its loop once listening.
        self.pool_spec = None if pool_file is None else read_pool_file(pool_file)
        if self.pool_spec is not None:
            for pool in pools_in(self.pool_spec):
                bounds_from(pool)  # a bad file fails here, before listening
        self.pool: PoolService | None = None
        #: Everything else (prefetch, secret, limits, heartbeats) is L{Master}'s.
        self.master = Master(reactor, **options)
        self.port = None
        self.web = (
            None if web is None else WebDashboard(self.master, web, web_address_file, **(web_options or {}))
        )

    @classmethod
    def from_config(cls, config: MasterConfig, secret: bytes | None, reactor) -> MasterService:
        """
        The master that C{config} (the command line's options) describes,
        holding C{secret} (None: C{--insecure}) and running on C{reactor};
        the fields that are not the service's own go to L{Master} under the
        same names.
        """
        fields = dataclasses.asdict(config)
        for name in ("secret_file", "insecure"):  # made into C{secret}
            del fields[name]
        web = {name: fields.pop(name) for name in ("web", "web_address_file", "web_token_file", "web_host")}
        return cls(
            listen=fields.pop("port"),
            address_file=fields.pop("address_file"),
            pool_file=fields.pop("pool_file"),
            web=web["web"],
            web_address_file=web["web_address_file"],
            web_options={
                "token_file": web["web_token_file"],
                "open_access": fields.pop("web_open"),
                "hosts": [name for name in web["web_host"].split(",") if name.strip()],
            },
            secret=secret,
            reactor=reactor,
            **fields,
        )

    def startService(self):
        super().startService()
        reactor = self.reactor
        if self.master.secret is None:
            log.warn(
                "cw master running with --insecure: anyone who can connect can run"
                " code on every worker; use it only on a trusted, isolated network"
            )
        self.master.start_heartbeats()
        self.master.start_deadlines()
        self.master.start_watching_clients()
        if self.master.heap is not None:
            self.master.heap.freeze()  # what start-up made (and a --state file's queue) lives on
        if self.web is not None:
            self.web.start(reactor).addCallback(self._dashboard_listening)
        endpoint = server_endpoint(reactor, self.listen)
        d = endpoint.listen(MasterFactory(self.master))
        d.addCallbacks(self._listening, self._failed)
        d.addErrback(self._start_failed)
        return d

    def _dashboard_listening(self, port) -> None:
        self.master.dashboard = self.web.url

    def _listening(self, port):
        self.port = port
        address = describe_listening(port)
        host = port.getHost()
        log.info(
            "cw master listening on {where}; clients and workers on this machine can use {address}",
            where=f"{getattr(host, 'host', '')}:{getattr(host, 'port', '')}".strip(":")
            if hasattr(host, "port")
            else address,
            address=address,
        )
        if self.address_file:
            write_atomically(self.address_file, address + "\n")
        if self.pool_spec is not None:
            pools = start_pools(
                self.pool_spec,
                MasterSource(self.master),
                launcher_factory(self.reactor, address),
                self.reactor,
            )
            self.pool = pools[0]
            self.master.pool = self.pool
            self.master.pools = pools
            for pool in pools:
                pool.start()

    def _failed(self, failure):
        listen_failed(self.reactor, "cw master", server_description(self.listen), "--port", failure)

    def _start_failed(self, failure):
        """Listening, but what follows failed (the address file, the pool): stop, exit status 1."""
        log.error("cw master could not start: {error}", error=failure.getErrorMessage())
        stop_reactor(self.reactor, status=1)

    def stopService(self):
        """
        Stop (SIGTERM, SIGINT): tell clients and workers (L{Master.shutdown}),
        close their connections and stop listening.
        """
        super().stopService()
        self.master.stop_heartbeats()
        self.master.stop_deadlines()
        self.master.stop_watching_clients()
        if self.master.heap is not None:
            self.master.heap.stop()
        if self.address_file:
            try:
                os.unlink(self.address_file)
            except FileNotFoundError:
                pass
        stopped = self.master.shutdown("the master was stopped")
        if self.pool is not None:
            stopped = defer.gatherResults([stopped, *(pool.stop() for pool in self.master.pools)])
        if self.port is not None:
            stopped = defer.gatherResults([stopped, defer.maybeDeferred(self.port.stopListening)])
        if self.web is not None:
            stopped = defer.gatherResults([stopped, self.web.stop()])
        if self.master.durable is not None:
            # Once every connection is closed: what they did is in the file.
            stopped.addBoth(self._close_state)
        stopped.addBoth(self._drop_spares)
        return stopped

    def _drop_spares(self, passthrough):
        """Once every connection is closed: no spare buffer is kept, nor the timer that would free them."""
        self.master.spare_buffers.clear()
        return passthrough

    def _close_state(self, passthrough):
        def closed(_):
            log.info("State file {path} committed and closed", path=self.master.durable.store.path)
            return passthrough

        return self.master.durable.close().addCallback(closed)


class Options(ConfigOptions):
    synopsis = "[--port ENDPOINT] [--prefetch N] [--address-file PATH]"
    longdesc = (
        "Run a cw master: it queues jobs from clients and routes them to"
        " workers.  ENDPOINT is a Twisted endpoint description such as"
        " tcp:5494 (the default), tcp:5494:interface=127.0.0.1 or"
        " unix:/path/to/socket."
    )
    config_class = MasterConfig

    def postOptions(self):
        super().postOptions()  # the values' checks (MasterConfig)
        self["secret"] = load_options_secret(self)


def makeService(options: Options) -> MasterService:
    from twisted.internet import reactor  # twistd has installed the reactor it runs by now

    log_descriptor_limit("master")
    try:
        service = MasterService.from_config(options.config(), options["secret"], reactor)
    except StateFileError as e:
        raise SystemExit(f"cw-master: {e}") from None
    service.master.heap = HeapKeeper(reactor, busy=service.master.busy)
    asked = options["max-pending"]
    if asked is not None and asked > service.master.max_pending:
        log.warn(
            "--max-pending {asked} is over a quarter of the descriptor limit; using {n}",
            asked=asked,
            n=service.master.max_pending,
        )
    log.info(
        "At most {n} connections may wait to authenticate, {a} from one address (--max-pending)",
        n=service.master.max_pending,
        a=service.master.pending.per_address,
    )
    return service
