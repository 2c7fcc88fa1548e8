"""
The master's adaptive worker pool: it starts and stops its own workers.

L{PoolService} runs the scaling loop: every C{tick} it builds a
L{PoolView} from the master's scheduler (queue, measured job duration,
workers) and its launcher's launches, asks the pure L{ScalingPolicy}
(L{cw.core.scaling}) what to do, and carries the decisions out through an
L{IWorkerLauncher}:

  - L{LocalLauncher}: workers as child processes of the master
    (C{cw.mp.start(min_workers=..., max_workers=...)});
  - L{SlurmLauncher}: workers as SLURM jobs, one worker per job or array
    task (C{cw-slurm start --max-workers ...}).

A worker says which launch it belongs to when it registers (its
C{CW_LAUNCH_ID}, or its SLURM job id), so the pool knows which worker to
drain.  Draining a worker is a SIGTERM (local) or C{scancel --signal=TERM}
(SLURM): the worker hands back its unstarted jobs, finishes its running
ones and exits; before signalling, the master stops giving it jobs.

The pool is described by a JSON file (C{cw-master --pool-file}), written
by the launchers (L{read_pool_file}).

Layer rule (cw.master): imports cw.discovery and below; never cw.client, cw.worker, cw.launch or cw.cli.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from twisted.internet import defer, error, protocol, task, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from cw.core.resources import Capacity, Shape
from cw.core.scaling import (
    POLL_INTERVAL,
    Cancel,
    Drain,
    Launch,
    PoolBounds,
    PoolView,
    ScalingPolicy,
    Submit,
    Worker,
    route_queued,
)
from cw.discovery import run_slurm
from cw.errors import CWError, SlurmError
from cw.system import start_time, with_cw_on_path, write_atomically

log = Logger(namespace="cw.master.pool")

#: Seconds between two rounds of the scaling loop.
TICK = 1.0

#: Longest back-off, in seconds, after the batch system failed or was slow.
MAX_BACKOFF = 600.0


class IWorkerLauncher(Interface):
    """Starts, drains and stops worker launches (one worker each) and reports on them."""

    poll_interval = Attribute("Seconds between two calls of poll, at least.")

    def submit(count: int) -> defer.Deferred:  # noqa: N805 (zope interface methods take no self)
        """Start C{count} launches; fires with their ids."""

    def drain(ids: Sequence[str]) -> defer.Deferred:  # noqa: N805 (zope interface methods take no self)
        """Ask these launches' workers to drain (finish running jobs, then exit)."""

    def cancel(ids: Sequence[str]) -> defer.Deferred:  # noqa: N805 (zope interface methods take no self)
        """Cancel these launches (pending, or running no job)."""

    def poll(ids: Sequence[str]) -> defer.Deferred:  # noqa: N805 (zope interface methods take no self)
        """Fires with C{{id: Launch}} for those of C{ids} still pending or running."""

    def stop() -> defer.Deferred:
        """The master stops: end every launch."""

    def adopt() -> list[Launch]:
        """
        The launches a previous master of this pool started and recorded
        (a master replaced, or restarted after a crash): this launcher's
        own from now on.  The next poll says which still run.
        """


# --- local processes ---------------------------------------------------------


class _WorkerProcess(protocol.ProcessProtocol):
    def __init__(self, launcher: LocalLauncher, launch: str) -> None:
        self.launcher = launcher
        self.launch = launch
        self.ended: defer.Deferred = defer.Deferred()

    def processEnded(self, reason) -> None:
        self.launcher._ended(self.launch)
        self.ended.callback(None)


#: The pidfile of a local pool's worker, in the run directory: C{worker-pool-LAUNCH.pid}.
_POOL_PIDFILE = "worker-pool-"


@implementer(IWorkerLauncher)
class LocalLauncher:
    """
    Workers as child processes of the master, C{python -m cw.worker
    --master ADDRESS ARGS}, each logging to C{run_dir/pool-worker-LAUNCH.log}
    with a pidfile next to it, C{worker-pool-LAUNCH.pid} (C{cw.mp.stop}
    stops them; a master started again adopts them, L{adopt}).
    C{time_limit} (seconds) gives each a walltime, as a batch system
    would: it is killed then, so a test can watch the pool replace
    workers ahead of it.
    """

    poll_interval = TICK

    def __init__(
        self,
        reactor,
        address: str,
        args: Sequence[str] = (),
        run_dir: str | None = None,
        time_limit: float | None = None,
    ) -> None:
        self.reactor = reactor
        self.address = address
        self.args = list(args)
        self.run_dir = Path(run_dir) if run_dir else None
        self.time_limit = time_limit
        self.launches: dict[str, tuple[Launch, Any, _WorkerProcess]] = {}
        #: Workers a previous master started (L{adopt}): by launch, C{(launch, pid, start time)}.
        self.adopted: dict[str, tuple[Launch, int, str]] = {}
        self._next = 0

    def submit(self, count: int) -> defer.Deferred:
        ids = [self._spawn() for _ in range(count)]
        return defer.succeed(ids)

    def _spawn(self) -> str:
        self._next += 1
        launch = f"local-{os.getpid()}-{self._next}"
        env = with_cw_on_path(os.environ)
        env["CW_LAUNCH_ID"] = launch
        argv = [sys.executable, "-m", "cw.worker", "--master", self.address, *self.args]
        child = _WorkerProcess(self, launch)
        fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        out = None
        if self.run_dir is not None:
            out = open(self.run_dir / f"pool-worker-{launch}.log", "ab")
            fds = {0: "w", 1: out.fileno(), 2: out.fileno()}
        try:
            process = self.reactor.spawnProcess(child, sys.executable, argv, env, childFDs=fds)
        finally:
            if out is not None:
                out.close()
        now = self.reactor.seconds()
        ends = None if self.time_limit is None else now + self.time_limit
        self.launches[launch] = (Launch(launch, now, now, ends), process, child)
        if self.run_dir is not None:
            pidfile = self.run_dir / f"{_POOL_PIDFILE}{launch}.pid"
            write_atomically(pidfile, f"{process.pid} {start_time(process.pid) or '-'}\n")
            child.pidfile = pidfile
        if self.time_limit is not None:
            self.reactor.callLater(self.time_limit, self._signal, launch, signal.SIGKILL)
        return launch

    def adopt(self) -> list[Launch]:
        """
        The workers a previous master of this run directory started that
        still run (their pidfiles, the PID's start time matching): this
        pool's from now on, counted, drained and stopped as its own.
        """
        if self.run_dir is None:
            return []
        now = self.reactor.seconds()
        for pidfile in sorted(self.run_dir.glob(f"{_POOL_PIDFILE}*.pid")):
            launch = pidfile.name[len(_POOL_PIDFILE) : -len(".pid")]
            if launch in self.launches or launch in self.adopted:
                continue
            try:
                pid_text, started = pidfile.read_text().split()
                pid = int(pid_text)
            except (OSError, ValueError):
                continue
            if started != "-" and start_time(pid) == started:
                self.adopted[launch] = (Launch(launch, now, now), pid, started)
            else:
                pidfile.unlink(missing_ok=True)
        return [entry[0] for entry in self.adopted.values()]

    def _adopted_alive(self, launch: str) -> bool:
        """Whether the adopted worker C{launch} still runs (forgotten, its pidfile removed, if not)."""
        _, pid, started = self.adopted[launch]
        if start_time(pid) == started:
            return True
        del self.adopted[launch]
        if self.run_dir is not None:
            (self.run_dir / f"{_POOL_PIDFILE}{launch}.pid").unlink(missing_ok=True)
        return False

    def _ended(self, launch: str) -> None:
        entry = self.launches.pop(launch, None)
        if entry is not None and getattr(entry[2], "pidfile", None) is not None:
            try:
                entry[2].pidfile.unlink()
            except FileNotFoundError:
                pass

    def _signal(self, launch: str, signum: int) -> None:
        entry = self.launches.get(launch)
        if entry is not None and entry[1].pid is not None:
            try:
                entry[1].signalProcess(signum)
            except (OSError, error.ProcessExitedAlready):
                pass
        elif launch in self.adopted and self._adopted_alive(launch):
            try:
                os.kill(self.adopted[launch][1], signum)
            except OSError:
                pass

    def drain(self, ids: Sequence[str]) -> defer.Deferred:
        for launch in ids:
            self._signal(launch, signal.SIGTERM)
        return defer.succeed(None)

    cancel = drain

    def poll(self, ids: Sequence[str]) -> defer.Deferred:
        found = {i: self.launches[i][0] for i in ids if i in self.launches}
        found.update({i: self.adopted[i][0] for i in ids if i in self.adopted and self._adopted_alive(i)})
        return defer.succeed(found)

    def stop(self) -> defer.Deferred:
        """
        SIGTERM every worker; fires once all its children have exited (the
        master's stop waits; adopted workers, not its children, get the
        signal only: C{cw.mp.stop} then waits for them by their pidfiles).
        """
        ended = [entry[2].ended for entry in self.launches.values()]
        for launch in [*self.launches, *self.adopted]:
            self._signal(launch, signal.SIGTERM)
        return defer.DeferredList(ended)


# --- SLURM -------------------------------------------------------------------


def parse_slurm_time(text: str) -> float | None:
    """C{squeue}'s C{%L}/C{%l} time (C{[D-]HH:MM:SS}, C{MM:SS}) in seconds; None for none."""
    text = text.strip()
    if not text or text in ("UNLIMITED", "NOT_SET", "INVALID", "N/A"):
        return None
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
    parts = [int(p) for p in text.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    h, m, s = parts[-3:]
    return days * 86400 + h * 3600 + m * 60 + s


def parse_slurm_clock(text: str) -> float | None:
    """C{squeue}'s C{%S} (local time, C{YYYY-MM-DDTHH:MM:SS}) in seconds since the epoch; None if none."""
    try:
        return time.mktime(time.strptime(text.strip(), "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


def array_ids(job: str, count: int) -> list[str]:
    """The launch ids of the C{count} tasks of array job C{job}."""
    return [f"{job}_{i}" for i in range(count)] if count > 1 else [job]


class SqueuePoller:
    """
    The one C{squeue} of several pools (L{SlurmLauncher}s sharing it): a
    pool's poll that finds an answer younger than its interval gets that
    answer, so all the pools together call C{squeue} once per interval
    (for all of their jobs at once: C{-j} with every recorded id, C{-r} to
    list array tasks one by one).  After an error or a slow answer (over
    C{slow} seconds) the interval doubles, up to L{MAX_BACKOFF}, and comes
    back once SLURM answers promptly.
    """

    def __init__(self, reactor, slow: float = 10.0) -> None:
        self.reactor = reactor
        self.slow = slow
        #: What the interval is multiplied by (the back-off).
        self.backoff = 1.0
        self.launchers: list[SlurmLauncher] = []
        #: The last answer: C{(time, ids asked for, {id: squeue fields})}.
        self.answer: tuple[float, set[str], dict[str, list[str]]] | None = None
        self._waiting: list[defer.Deferred] | None = None

    def rows(self, launcher: SlurmLauncher, ids: Sequence[str], max_age: float) -> defer.Deferred:
        """
        Fires with the last answer (see L{answer}) if younger than
        C{max_age} seconds; else asks C{squeue} (through C{launcher}, which
        counts the call) about the jobs of every launcher and C{ids}.  A
        call already on its way is shared.
        """
        now = self.reactor.seconds()
        if self.answer is not None and now - self.answer[0] < max_age:
            return defer.succeed(self.answer)
        d: defer.Deferred = defer.Deferred()
        if self._waiting is not None:
            self._waiting.append(d)
            return d
        self._waiting = [d]
        wanted = set(ids).union(*(x.submitted for x in self.launchers))
        self._ask(launcher, wanted).addBoth(self._answered)
        return d

    def _answered(self, result) -> None:
        waiting, self._waiting = self._waiting or [], None
        for d in waiting:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)
        if isinstance(result, Failure):
            return None

    @defer.inlineCallbacks
    def _ask(self, launcher: SlurmLauncher, wanted: set[str]):
        jobs = sorted({i.split("_")[0] for i in wanted})
        began = self.reactor.seconds()
        try:
            out = yield launcher._run(["squeue", "-h", "-r", "-j", ",".join(jobs), "-o", "%i|%T|%S|%L"])
        except SlurmError as e:
            if "Invalid job id" not in str(e):
                self.backoff = min(MAX_BACKOFF, self.backoff * 2)
                log.warn("squeue failed ({e}); next look in {s:g} s", e=e, s=launcher.poll_interval)
                raise
            out = ""
        now = self.reactor.seconds()
        if now - began > self.slow:
            self.backoff = min(MAX_BACKOFF, self.backoff * 2)
            log.warn("squeue took {t:.1f} s; next look in {s:g} s", t=now - began, s=launcher.poll_interval)
        else:
            self.backoff = 1.0
        rows = {}
        for line in out.splitlines():
            fields = line.strip().split("|")
            if len(fields) == 4 and fields[0] in wanted:
                rows[fields[0]] = fields
        self.answer = (now, wanted, rows)
        return self.answer


@implementer(IWorkerLauncher)
class SlurmLauncher:
    """
    Workers as SLURM jobs: C{script} is the worker job's batch script (one
    worker), submitted with C{sbatch --array=0-(N-1)} to start N at once.
    One C{squeue} per C{poll_interval} at most, for all the pool's jobs at
    once, and for those of the other pools sharing its C{poller}
    (L{SqueuePoller}: one call per interval for all the master's pools).
    The launches are recorded in C{directory/pool-jobs.json}
    (C{pool-jobs-NAME.json} for the pool C{name} of several), so that
    C{cw-slurm stop} cancels them too.
    """

    def __init__(
        self,
        reactor,
        script: str,
        directory: str,
        poll_interval: float = POLL_INTERVAL,
        slow: float = 10.0,
        name: str | None = None,
        poller: SqueuePoller | None = None,
    ) -> None:
        self.reactor = reactor
        self.record = f"pool-jobs-{name}.json" if name else "pool-jobs.json"
        self.script = script
        self.directory = Path(directory)
        self.base_interval = poll_interval
        self.poller = poller if poller is not None else SqueuePoller(reactor, slow)
        self.poller.launchers.append(self)
        self.submitted: dict[str, float] = {}
        self.answered_at: float | None = None
        #: Calls made to each SLURM command (for the status and tests).
        self.calls = {"sbatch": 0, "squeue": 0, "scancel": 0}

    @property
    def poll_interval(self) -> float:
        """Seconds between two looks: the pool's interval, longer while SLURM is slow or fails."""
        return min(MAX_BACKOFF, self.base_interval * self.poller.backoff)

    def _run(self, args: list[str], input: str | None = None) -> defer.Deferred:
        self.calls[args[0]] = self.calls.get(args[0], 0) + 1
        return threads.deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), run_slurm, args, input=input
        )

    def _record(self) -> None:
        write_atomically(self.directory / self.record, json.dumps({"workers": sorted(self.submitted)}) + "\n")

    @defer.inlineCallbacks
    def submit(self, count: int):
        args = ["sbatch", "--parsable"]
        if count > 1:
            args.append(f"--array=0-{count - 1}")
        out = yield self._run(args, input=self.script)
        job = out.strip().split(";")[0]
        if not job.isdigit():
            raise SlurmError(f"sbatch did not print a job id but {out.strip()!r}")
        ids = array_ids(job, count)
        now = self.reactor.seconds()
        for launch in ids:
            self.submitted[launch] = now
        self._record()
        return ids

    def adopt(self) -> list[Launch]:
        """
        The worker jobs recorded in this pool's record file by a previous
        master (replaced, or crashed): pending as far as this master knows,
        until its first C{squeue} (at once) says more.  The record keeps
        them (it is merged, not overwritten) until they are gone.
        """
        try:
            recorded = json.loads((self.directory / self.record).read_text()).get("workers", [])
        except (OSError, ValueError, AttributeError):
            return []
        now = self.reactor.seconds()
        adopted = [str(i) for i in recorded if str(i) not in self.submitted]
        for launch in adopted:
            self.submitted[launch] = now
        return [Launch(launch, now) for launch in adopted]

    def drain(self, ids: Sequence[str]) -> defer.Deferred:
        # The signal goes to the job's steps: the worker under srun.
        return self._run(["scancel", "--signal=TERM", *ids]) if ids else defer.succeed(None)

    def cancel(self, ids: Sequence[str]) -> defer.Deferred:
        return self._run(["scancel", *ids]) if ids else defer.succeed(None)

    @defer.inlineCallbacks
    def poll(self, ids: Sequence[str]):
        if not ids:
            return {}
        when, asked, rows = yield self.poller.rows(self, ids, self.poll_interval)
        #: When the answer was asked for (for the loop's next look: see L{PoolService.tick}).
        self.answered_at = when
        found: dict[str, Launch] = {}
        for launch in ids:
            if launch not in asked:
                # Submitted since that squeue: pending, until the next one says.
                found[launch] = Launch(launch, self.submitted.get(launch, when))
                continue
            fields = rows.get(launch)
            if fields is None:
                continue
            _, state, start, left = fields
            if state in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED"):
                started = None
                ends = None
                if state != "PENDING":
                    started = parse_slurm_clock(start) or when
                    remaining = parse_slurm_time(left)
                    ends = None if remaining is None else when + remaining
                found[launch] = Launch(launch, self.submitted.get(launch, when), started, ends)
        gone = [launch for launch in ids if launch not in found]
        for launch in gone:
            self.submitted.pop(launch, None)
        if gone:
            self._record()
        return found

    def stop(self) -> defer.Deferred:
        ids = list(self.submitted)
        if not ids:
            return defer.succeed(None)
        d = self.cancel(ids)
        d.addErrback(lambda f: log.warn("could not cancel the pool's jobs: {e}", e=f.value))
        return d


# --- the loop ------------------------------------------------------------------


def read_pool_file(path: str) -> dict:
    """The pool description in C{path} (JSON), or L{CWError} saying what is wrong."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise CWError(f"cannot read the pool file {path}: {e}") from None
    if not isinstance(data, dict) or data.get("launcher") not in ("local", "slurm"):
        raise CWError(f"the pool file {path} names no launcher ('local' or 'slurm')")
    return data


def bounds_from(data: dict) -> PoolBounds:
    """The L{PoolBounds} a pool file gives (its other keys are the launcher's)."""
    fields = set(PoolBounds.__dataclass_fields__)
    try:
        return PoolBounds(**{k: v for k, v in data.items() if k in fields})
    except (TypeError, ValueError) as e:
        raise CWError(f"bad pool bounds: {e}") from None


def make_launcher(reactor, data: dict, address: str, poller: SqueuePoller | None = None) -> IWorkerLauncher:
    """
    The launcher a pool file describes; C{address} is the master's, for
    local workers; SLURM launchers sharing C{poller} share their C{squeue}.
    """
    if data["launcher"] == "local":
        return LocalLauncher(
            reactor, address, data.get("worker_args", ()), data.get("run_dir"), data.get("time_limit")
        )
    return SlurmLauncher(
        reactor,
        data["script"],
        data["directory"],
        float(data.get("poll_interval", POLL_INTERVAL)),
        name=data.get("name"),
        poller=poller,
    )


def launcher_factory(reactor, address: str):
    """
    C{launcher_for(description)} for L{start_pools}: L{make_launcher}, the
    SLURM launchers of all the pools sharing one L{SqueuePoller} (one
    C{squeue} per interval for all of them).
    """
    poller = SqueuePoller(reactor)
    return lambda data: make_launcher(reactor, data, address, poller)


def pools_in(data: dict) -> list[dict]:
    """
    The pools a pool file describes, each as a one-pool description: the
    file itself, or for several (C{"pools"}, each named, with its worker's
    C{"capacity"}) each entry with the file's other keys as defaults.
    """
    if "pools" not in data:
        return [data]
    common = {k: v for k, v in data.items() if k != "pools"}
    return [{**common, **pool} for pool in data["pools"]]


def start_pools(data: dict, source, launcher_for, clock) -> list[PoolService]:
    """
    The L{PoolService}s of the pool file C{data} (not started): one, or one
    per pool of several, each reading C{source} through its L{PoolShare}.
    C{launcher_for(description)} makes each pool's launcher.
    """
    pools = pools_in(data)
    if len(pools) == 1 and "name" not in pools[0]:
        return [PoolService(source, launcher_for(pools[0]), bounds_from(pools[0]), clock)]
    capacities = [(p["name"], Capacity.from_json(p["capacity"])) for p in pools]
    services = []
    for pool in pools:
        share = PoolShare(source, pool["name"], capacities)
        service = PoolService(share, launcher_for(pool), bounds_from(pool), clock, name=pool["name"])
        share.service = service
        services.append(service)
    return services


class MasterSource:
    """
    What the scaling loop reads of the master it runs in: its scheduler's
    queue and workers.  It also keeps a drained worker from getting more
    jobs and tells the scheduler the workers' walltime ends.
    """

    def __init__(self, master) -> None:
        self.master = master

    def snapshot(self) -> defer.Deferred:
        """
        Fires with C{(queued, job_seconds, workers)}, each worker as
        C{(id, launch, slots, held, completed, draining)}.
        """
        scheduler = self.master.scheduler
        workers = [
            (
                w.id,
                getattr(self.master.workers.get(w.id), "launch", None),
                w.slots,
                len(w.held),
                w.completed,
                w.draining,
            )
            for w in scheduler.workers()
        ]
        return defer.succeed((scheduler.queued, scheduler.job_seconds, workers))

    def set_end(self, worker: int, ends_at: float | None) -> None:
        self.master.scheduler.set_end(worker, ends_at)

    def workers_of(self, launch: str) -> list[int]:
        """The connected workers of C{launch}, now."""
        return [wid for wid, proto in self.master.workers.items() if getattr(proto, "launch", None) == launch]

    def stop_dispatch(self, worker: int) -> None:
        if worker in self.master.workers:
            self.master.scheduler.return_jobs(worker, [])

    def queued_shapes(self) -> tuple[int, dict]:
        """The queued jobs: how many plain, and the sized ones by shape."""
        return self.master.scheduler.queued_shapes()


class PoolShare:
    """
    What one of several pools reads of the master (C{source}, a
    L{MasterSource}): its share of the queue (L{route_queued} over
    C{pools}, C{(name, one worker's capacity)}), and only its own
    workers (those of C{service}'s launches), so that each pool scales
    for the work only it would run, with its own workers.
    """

    def __init__(self, source, name: str, pools: list[tuple[str, Capacity]]) -> None:
        self.source = source
        self.name = name
        self.pools = pools
        self.service: PoolService | None = None

    @defer.inlineCallbacks
    def snapshot(self):
        _, job_seconds, workers = yield self.source.snapshot()
        plain, shapes = self.source.queued_shapes()
        share = route_queued(plain, shapes, self.pools)[self.name]
        own = self.service.launches if self.service is not None else {}
        return (share, job_seconds, [w for w in workers if w[1] in own])

    def set_end(self, worker: int, ends_at: float | None) -> None:
        self.source.set_end(worker, ends_at)

    def workers_of(self, launch: str) -> list[int]:
        return self.source.workers_of(launch)

    def stop_dispatch(self, worker: int) -> None:
        self.source.stop_dispatch(worker)


class StatusSource:
    """
    The same read from a master elsewhere, through its status
    (C{cw-slurm adapt} on a login node): C{get_status()} fires with
    L{cw.master.service.Master.status}.  The pools of one C{cw-slurm
    adapt} share one: a status younger than C{max_age} seconds (or one on
    its way) serves them all.  It cannot stop dispatch or set walltime
    ends: a drained worker may get a job just before its signal (it hands
    it back, unstarted), and jobs' expected durations are not matched
    against walltimes.
    """

    def __init__(self, get_status, clock, max_age: float = TICK / 2) -> None:
        self.get_status = get_status
        self.clock = clock
        self.max_age = max_age
        self.last: tuple[float, dict] | None = None
        self._waiting: list[defer.Deferred] | None = None

    def _status(self) -> defer.Deferred:
        now = self.clock.seconds()
        if self.last is not None and now - self.last[0] < self.max_age:
            return defer.succeed(self.last[1])
        d: defer.Deferred = defer.Deferred()
        if self._waiting is not None:
            self._waiting.append(d)
            return d
        self._waiting = [d]

        def done(result):
            waiting, self._waiting = self._waiting or [], None
            if not isinstance(result, Failure):
                self.last = (now, result)
            for each in waiting:
                if isinstance(result, Failure):
                    each.errback(result)
                else:
                    each.callback(result)

        defer.maybeDeferred(self.get_status).addBoth(done)
        return d

    @defer.inlineCallbacks
    def snapshot(self):
        status = yield self._status()
        workers = [
            (w["id"], w.get("launch"), w["slots"], w["held"], w["completed"], w["draining"])
            for w in status["workers"]
        ]
        return (status["queued"], status.get("job_seconds"), workers)

    def queued_shapes(self) -> tuple[int, dict]:
        """The queued jobs of the last status: how many plain, and the sized ones by shape."""
        status = self.last[1] if self.last else {}
        shapes: dict[Shape, int] = {}
        for entry in status.get("queued_shapes") or []:
            shape = Shape.from_json(entry)
            shapes[shape] = shapes.get(shape, 0) + entry["count"]
        return status.get("queued", 0) - sum(shapes.values()), shapes

    def set_end(self, worker: int, ends_at: float | None) -> None:
        pass

    def workers_of(self, launch: str) -> list[int]:
        return []

    def stop_dispatch(self, worker: int) -> None:
        pass


class PoolService:
    """
    The scaling loop of one pool (see the module docstring): C{source} is
    what it reads of the master (L{MasterSource} in the master,
    L{StatusSource} elsewhere), C{launcher} an L{IWorkerLauncher}, C{clock}
    the reactor.
    """

    def __init__(
        self,
        source,
        launcher: IWorkerLauncher,
        bounds: PoolBounds,
        clock,
        tick: float = TICK,
        name: str | None = None,
    ) -> None:
        #: The pool's name when there are several (C{--pool NAME:...}).
        self.name = name
        self.source = source
        self.clock = clock
        self.launcher = launcher
        self.policy = ScalingPolicy(bounds)
        self.tick_seconds = tick
        #: The pool's launches, by id, as last seen (and just submitted).
        self.launches: dict[str, Launch] = {}
        self._idle: dict[int, tuple[float, int]] = {}
        self._polled_at: float | None = None
        self._busy = False
        self._loop: task.LoopingCall | None = None

    def start(self) -> None:
        adopted = self.launcher.adopt() if hasattr(self.launcher, "adopt") else []
        for launch in adopted:
            self.launches[launch.id] = launch
        if adopted:
            log.info(
                "Pool{name}: adopted {n} worker launches of a previous master: {ids}",
                name=f" {self.name}" if self.name else "",
                n=len(adopted),
                ids=", ".join(x.id for x in adopted),
            )
        self._loop = task.LoopingCall(self.tick)
        self._loop.clock = self.clock
        self._loop.start(self.tick_seconds, now=True)

    def stop(self) -> defer.Deferred:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return defer.maybeDeferred(self.launcher.stop)

    @defer.inlineCallbacks
    def tick(self):
        """One round: poll the launcher if due, decide, carry out."""
        if self._busy:
            return
        self._busy = True
        try:
            now = self.clock.seconds()
            due = self._polled_at is None or now - self._polled_at >= self.launcher.poll_interval
            if due and self.launches:
                self._polled_at = now
                seen = yield self.launcher.poll(list(self.launches))
                # A launcher sharing its look with other pools' (L{SqueuePoller}) may
                # answer with an earlier look: the next is due an interval after that.
                answered = getattr(self.launcher, "answered_at", None)
                self._polled_at = now if answered is None else answered
                for launch in list(self.launches):
                    old = self.launches[launch]
                    if launch in seen:
                        self.launches[launch] = replace(seen[launch], draining=old.draining)
                    else:
                        del self.launches[launch]
            inputs = yield self.source.snapshot()
            now = self.clock.seconds()
            for decision in self.policy.decide(self.view(now, *inputs)):
                yield self._carry_out(decision, now)
        except Exception:
            log.failure("The pool's scaling round failed; trying again next round")
        finally:
            self._busy = False

    def view(self, now: float, queued: int, job_seconds: float | None, workers: list) -> PoolView:
        """The L{PoolView} at C{now} of the master's queue and workers (as L{MasterSource} gives them)."""
        seen = []
        ends = {x.id: x.ends_at for x in self.launches.values()}
        for wid, launch, slots, held, completed, draining in workers:
            if held:
                self._idle.pop(wid, None)
                since = None
            else:
                since, before = self._idle.get(wid, (now, completed))
                if before != completed:
                    since = now
                self._idle[wid] = (since, completed)
            if launch in ends:
                self.source.set_end(wid, ends[launch])
            seen.append(Worker(wid, launch, slots, held, since, draining))
        for wid in set(self._idle) - {w.id for w in seen}:
            del self._idle[wid]
        return PoolView(
            now=now,
            queued=queued,
            job_seconds=job_seconds,
            workers=tuple(seen),
            launches=tuple(self.launches.values()),
        )

    @defer.inlineCallbacks
    def _carry_out(self, decision, now: float):
        log.info(
            "Pool{name}: {decision}", name=f" {self.name}" if self.name else "", decision=describe(decision)
        )
        if isinstance(decision, Submit):
            ids = yield self.launcher.submit(decision.count)
            for launch in ids:
                self.launches[launch] = Launch(launch, now)
        elif isinstance(decision, Drain):
            if decision.worker is not None:
                # No more jobs for it before the signal gets there.
                self.source.stop_dispatch(decision.worker)
            self._mark_draining(decision.launch)
            yield self.launcher.drain([decision.launch])
        elif isinstance(decision, Cancel):
            self._mark_draining(decision.launch)
            workers = self.source.workers_of(decision.launch)
            if workers:
                # Its worker connected since the policy looked: drain it rather than kill its jobs.
                for worker in workers:
                    self.source.stop_dispatch(worker)
                yield self.launcher.drain([decision.launch])
            else:
                yield self.launcher.cancel([decision.launch])

    def _mark_draining(self, launch: str) -> None:
        if launch in self.launches:
            self.launches[launch] = replace(self.launches[launch], draining=True)

    def status(self) -> dict:
        """The pool for the status: bounds, target, launches by state, recent decisions."""
        launches = list(self.launches.values())
        b = self.policy.bounds
        return {
            "name": self.name,
            "now": self.clock.seconds(),
            "min_workers": b.min_workers,
            "max_workers": b.max_workers,
            "idle_timeout": b.idle_timeout,
            "target": self.policy.target,
            "running": sum(1 for x in launches if x.started is not None and not x.draining),
            "pending": sum(1 for x in launches if x.started is None and not x.draining),
            "draining": sum(1 for x in launches if x.draining),
            "decisions": [
                {"time": t, "action": describe(d, reason=False), "reason": d.reason}
                for t, d in list(self.policy.history)[-10:]
            ],
            "calls": dict(getattr(self.launcher, "calls", {})),
        }


def describe(decision, reason: bool = True) -> str:
    """A decision in words, for the log and the status."""
    if isinstance(decision, Submit):
        what = f"submit {decision.count}" + (f" (replacing {decision.replaces})" if decision.replaces else "")
    elif isinstance(decision, Drain):
        what = f"drain {decision.launch}"
    else:
        what = f"cancel {decision.launch}" + (" (will retry)" if decision.retry else "")
    return f"{what}: {decision.reason}" if reason else what
