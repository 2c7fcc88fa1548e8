"""
The worker: one per machine, runs jobs from the master in a pool of job
processes (ampoule children).

L{Worker} keeps a local queue of jobs the master sent (up to the worker's
slots plus a little prefetch), starts each in a free job process, and sends
results back in batches.  A job that crashes or hangs takes down only its
job process, never the worker.  The connection to the master is kept up by
a L{ClientService}: a worker started before its master, or whose master
restarts, connects (again) on its own.

Run it with C{twistd -n cw-worker --master HOST[:PORT] [--procs N]} or
C{python -m cw.worker [HOST]}.
"""

from __future__ import annotations

import os
import socket
import sys
from collections import deque

from ampoule import main as ampoule_main
from twisted.application import service
from twisted.application.internet import ClientService
from twisted.internet import error
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python import usage

from cw import protocol as P
from cw.address import client_description, client_endpoint
from cw.batching import Outbox

log = Logger()


def describe_crash(reason) -> str:
    """Say in words why a job process failed a call."""
    value = reason.value
    if isinstance(value, error.ProcessTerminated):
        if value.signal is not None:
            import signal

            try:
                name = signal.Signals(value.signal).name
            except ValueError:
                name = str(value.signal)
            return f"the job's process was killed by signal {value.signal} ({name})"
        return f"the job's process exited with code {value.exitCode}"
    if isinstance(value, (error.ProcessDone, error.ConnectionDone, error.ConnectionLost)):
        return "the job's process exited while running the job"
    return f"the job could not run in a job process: {reason.getErrorMessage()}"


class WorkerProtocol(amp.AMP):
    """The worker's connection to its master."""

    def __init__(self, worker: Worker) -> None:
        super().__init__()
        self.worker = worker

    def connectionMade(self):
        super().connectionMade()
        d = self.callRemote(
            P.RegisterWorker,
            version=P.PROTOCOL_VERSION,
            host=socket.gethostname(),
            pid=os.getpid(),
            slots=self.worker.procs,
        )
        d.addCallbacks(self._registered, self._refused)

    def _registered(self, answer):
        self.worker.connected(self, answer["worker_id"])

    def _refused(self, failure):
        log.error("The master refused this worker: {why}", why=failure.getErrorMessage())
        self.transport.loseConnection()

    @P.ClientContext.responder
    def client_context(self, client, context):
        self.worker.contexts[client] = context
        return {}

    @P.RunJobs.responder
    def run_jobs(self, jobs):
        self.worker.enqueue(jobs)
        return {}

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self.worker.disconnected(self)


class Worker:
    """
    Runs jobs for one master connection at a time.

    @param pool: an ampoule L{ProcessPool} of L{cw.child.JobChild} processes
        (or anything with the same C{doWork}).
    @param procs: how many jobs run at once.
    """

    def __init__(self, pool, procs: int, clock=None) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self.pool = pool
        self.procs = procs
        self.proto: WorkerProtocol | None = None
        self.worker_id = 0
        self.contexts: dict[int, dict] = {}
        self.queue: deque[P.Job] = deque()
        self.running = 0
        self.completed = 0
        #: Bumped on every new master connection; results of jobs started
        #: under an earlier connection are not sent on a later one.
        self.generation = 0
        #: Set when the worker shuts down, so a lost connection is expected.
        self.stopping = False
        self.outbox = Outbox(clock, self._send_results, P.result_size)

    def connected(self, proto: WorkerProtocol, worker_id: int) -> None:
        self.proto = proto
        self.worker_id = worker_id
        peer = proto.transport.getPeer()
        log.info(
            "Registered with the master at {peer} as worker {wid} with {n} slots",
            peer=getattr(peer, "host", peer),
            wid=worker_id,
            n=self.procs,
        )

    def disconnected(self, proto: WorkerProtocol) -> None:
        if proto is not self.proto:
            return
        dropped = len(self.queue)
        self.proto = None
        self.generation += 1
        self.queue.clear()
        self.contexts.clear()
        self.outbox.discard()
        log.info(
            "Lost the master connection; dropped {n} queued jobs (the master requeues them); reconnecting",
            n=dropped,
        )

    def enqueue(self, jobs: list[P.Job]) -> None:
        self.queue.extend(jobs)
        self._pump()

    def _pump(self) -> None:
        while self.queue and self.running < self.procs:
            self._start(self.queue.popleft())

    def _start(self, job: P.Job) -> None:
        context = self.contexts.get(job.client, {})
        self.running += 1
        generation = self.generation
        d = self.pool.doWork(
            P.RunJob,
            cwd=context.get("cwd", ""),
            path=context.get("path", []),
            payload=job.payload,
        )
        d.addCallbacks(
            lambda answer: P.Result(job.client, job.seq, answer["status"], answer["payload"]),
            lambda reason: P.Result(
                job.client,
                job.seq,
                P.Outcome.CRASHED,
                P.error_report(
                    "JobProcessDied",
                    f"{describe_crash(reason)} (worker {socket.gethostname()} pid {os.getpid()})",
                    host=socket.gethostname(),
                ),
            ),
        )
        d.addCallback(self._finished, generation)
        d.addErrback(lambda f: log.failure("Bookkeeping of a finished job failed", f))

    def _finished(self, result: P.Result, generation: int) -> None:
        self.running -= 1
        self.completed += 1
        if generation == self.generation:
            self.outbox.add(result)
        self._pump()

    def _send_results(self, batch: list[P.Result]) -> None:
        if self.proto is not None:
            self.proto.callRemote(P.JobResults, results=batch)


class JobConnector(ampoule_main.AMPConnector):
    """Log what a job process prints as info lines, not as errors."""

    def errReceived(self, data):
        for line in data.decode("utf-8", "replace").rstrip().splitlines():
            log.info("job process {n}: {line}", n=self.name, line=line)


class JobStarter(ampoule_main.ProcessStarter):
    """
    Starts job processes quietly (Twisted logs at warning level, so a job's
    own output stands out) and without spelling the environment into the
    worker's log.
    """

    connectorFactory = JobConnector

    def __init__(self, env: dict[str, str]) -> None:
        bootstrap = ampoule_main.BOOTSTRAP.replace("LogLevel.info", "LogLevel.warn")
        super().__init__(bootstrap=bootstrap, env=env)

    def __repr__(self) -> str:
        return "JobStarter()"


def job_process_env() -> dict[str, str]:
    """
    The environment for job processes: the worker's own, with the
    directory holding the C{cw} package on C{PYTHONPATH} so that a job
    process imports the same cw as its worker.
    """
    import cw

    env = dict(os.environ)
    here = os.path.dirname(os.path.dirname(os.path.abspath(cw.__file__)))
    paths = [here] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


class WorkerService(service.MultiService):
    """
    A worker: a pool of job processes plus a (re)connecting link to the
    master.

    @param master: the master's address (see L{cw.address}).
    @param procs: jobs to run at once (default: the machine's cores).
    @param recycle_after: restart a job process after this many jobs
        (0: never).
    """

    name = "cw-worker"

    def __init__(self, master: str | None = None, procs: int | None = None, recycle_after: int = 0) -> None:
        super().__init__()
        self.master_address = client_description(master)
        self.procs = procs or os.cpu_count() or 1
        self.recycle_after = recycle_after
        self.pool = None
        self.worker: Worker | None = None
        self.client_service: ClientService | None = None

    def startService(self):
        from ampoule import pool
        from twisted.internet import reactor

        from cw.child import JobChild

        starter = JobStarter(job_process_env())
        self.pool = pool.ProcessPool(
            JobChild,
            min=self.procs,
            max=self.procs,
            maxIdle=3600,
            recycleAfter=self.recycle_after,
            starter=starter,
        )
        self.worker = Worker(self.pool, self.procs)
        factory = Factory.forProtocol(lambda: WorkerProtocol(self.worker))
        endpoint = client_endpoint(reactor, self.master_address)
        self.client_service = ClientService(endpoint, factory)
        self.client_service.setServiceParent(self)
        log.info(
            "cw worker starting {n} job processes; master at {master}",
            n=self.procs,
            master=self.master_address,
        )
        self.pool.start()
        super().startService()

    def stopService(self):
        if self.worker is not None:
            self.worker.stopping = True
        d = super().stopService()

        def stop_pool(_):
            if self.pool is not None:
                return self.pool.stop()

        return d.addCallback(stop_pool)


class Options(usage.Options):
    synopsis = "[--master HOST[:PORT] | --master ENDPOINT] [--procs N] [HOST]"
    longdesc = (
        "Run a cw worker: it connects to a master and runs its jobs in N job"
        " processes.  The master is named as HOST, HOST:PORT or a Twisted"
        " endpoint description (tcp:HOST:PORT, unix:PATH); default localhost."
    )
    optParameters = [
        ["master", "m", None, "the master's address (default localhost:5494)"],
        ["procs", None, None, "jobs to run at once (default: number of cores)", int],
        ["recycle-after", None, 0, "restart a job process after this many jobs (0: never)", int],
    ]
    optFlags = [
        ["slurm", None, "find the master through SLURM (this user's job named cmaster)"],
    ]

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
        if self["procs"] is not None and self["procs"] < 1:
            raise usage.UsageError("--procs must be at least 1")
        if self["slurm"]:
            if self["master"]:
                raise usage.UsageError("give either --slurm or a master address, not both")
            from cw import slurm

            try:
                self["master"] = slurm.master_host()
            except Exception as e:
                raise usage.UsageError(f"--slurm: {e}") from None


def makeService(options: Options) -> WorkerService:
    return WorkerService(
        master=options["master"],
        procs=options["procs"],
        recycle_after=options["recycle-after"],
    )


def main(argv: list[str] | None = None) -> None:
    from cw.master import run_twistd

    run_twistd("cw-worker", sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
