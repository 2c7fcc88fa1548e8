"""
The options of each role, once: L{MasterConfig} (C{cw-master}),
L{WorkerConfig} (C{cw-worker}) and L{SlurmConfig} (C{cw-slurm}),
dataclasses whose fields carry each option's name, type, default and help
text, and whose construction checks the values (L{Checked}: the one place
for range checks, each failing with a one-line L{OptionError}).

Everything else is built from them: the twistd C{usage.Options}
(L{cw.wire.options}), C{cw-slurm}'s argparse (L{cw.cli.slurm}), the
services (C{MasterService.from_config}, C{WorkerService.from_config}), the
launchers' reading of the options a user passes on (L{parse_argv}:
C{cw.mp}, C{cw.slurm}), and the README's option tables, which a test
compares with these fields.

Layer rule (cw.core): pure; imports only cw.core, cw.errors and the standard library (no Twisted, no I/O).
"""

from __future__ import annotations

import dataclasses
import getopt
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cw.core.records import MAX_PAYLOAD
from cw.core.resources import Capacity, build_capacity, parse_resource, parse_size
from cw.core.scaling import IDLE_TIMEOUT, PENDING_TIMEOUT, POLL_INTERVAL, pool_capacity
from cw.errors import OptionError

# --- defaults named elsewhere too ------------------------------------------

#: Seconds a peer has to authenticate (C{--auth-timeout}).
AUTH_TIMEOUT = 10.0

#: Bytes of payloads, and jobs, a client may have queued
#: (C{--max-queued-bytes}, C{--max-queued-jobs}); see C{JobRoom}.
MAX_QUEUED_BYTES = 1 << 30
MAX_QUEUED_JOBS = 10_000_000

#: Seconds a client may stay silent (no answer to heartbeats, nothing sent)
#: before the master drops it and its jobs (C{--client-timeout}).
CLIENT_TIMEOUT = 60.0
#: Bytes of results waiting to be read by a client beyond which its jobs are
#: not dispatched (C{--max-unsent-bytes}), and seconds it may read nothing
#: while results wait before it is disconnected (C{--client-read-timeout}).
MAX_UNSENT_BYTES = 64 << 20
CLIENT_READ_TIMEOUT = 60.0

#: Bytes of results a master with a state file keeps on disk for clients
#: that are away (C{--max-stored-results-bytes}); the oldest go first.
MAX_STORED_RESULTS_BYTES = 1 << 30

#: Seconds past a job's own timeout that a worker has to report it before
#: the master takes it back (C{--deadline-grace}; see C{Scheduler.expire}).
DEADLINE_GRACE = 30.0

#: Seconds a stopping worker lets its running jobs finish (C{--drain-timeout}).
DRAIN_TIMEOUT = 30.0

#: Seconds a drained worker waits for its job processes to exit once asked
#: to; those still there (stopped, hung, not reading their pipe) are then
#: killed with SIGKILL, with their groups and descendants, and waited for as
#: long again before the worker exits regardless.
STOP_WAIT = 2.0

#: Seconds a drained worker gives its master to take what is left to send
#: (results) as it closes the connection, at the same time as its job
#: processes stop: a master that reads nothing (stopped with SIGSTOP, a dead
#: link) then has its connection aborted, and requeues the jobs whose
#: results it did not get.
CLOSE_WAIT = 2 * STOP_WAIT

#: A stopped worker exits within C{--drain-timeout} plus this many seconds
#: (its job processes' L{STOP_WAIT}, twice, or the L{CLOSE_WAIT} of its
#: master connection, and its own exit), whatever its job processes and its
#: master do.
STOP_BOUND = max(2 * STOP_WAIT, CLOSE_WAIT) + 1.0

#: Longest wait, in seconds, between attempts to (re)connect to the master
#: (C{--reconnect-delay}); the wait grows from 1 s by half each attempt up
#: to this, plus up to 1 s of random jitter.
RECONNECT_DELAY = 5.0

#: Bytes of a job's stdout, and of its stderr, that go back with its result
#: (the last ones; C{--output-limit}).
OUTPUT_LIMIT = 1 << 20

#: Bytes of results a worker keeps, of jobs that finished while its master
#: was away, to hand to the next master (C{--keep-results}).
KEEP_RESULTS = 64 << 20

#: Seconds a worker started before its master waits for it (C{--slurm-wait}).
MASTER_WAIT = 600.0

#: Seconds before the time limit at which SLURM sends a worker job's
#: workers SIGTERM, so that they drain (C{--signal=TERM@...},
#: C{cw-slurm --walltime-warning}), and a master job with a state file
#: SIGUSR2, so that it submits its replacement.  SLURM may send it up to a
#: minute earlier than asked.
WALLTIME_WARNING = 120

_SECRET_HELP = "shared secret (default $CW_SECRET_FILE or ~/.config/cw/secret)"


def option(
    default: Any,
    help: str,
    *,
    short: str | None = None,
    doc: str | None = None,
    long: str | None = None,
    metavar: str | None = None,
) -> Any:
    """
    A config field that is a command-line option C{--NAME} (the field's
    name with C{-} for C{_}, unless C{long} names it otherwise).  C{doc} is
    the default as the README states it, when the value alone would not say
    it (C{None} meaning "the number of cores", C{1 << 30} written "1 GiB").
    A field of type C{tuple[str, ...]} is an option that may be repeated.
    """
    metadata = {"help": help, "short": short, "doc": doc, "long": long, "metavar": metavar}
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Option:
    """One option of a role, as read from its config field."""

    #: The field's name (C{max_queued_bytes}).
    name: str
    #: The long option without dashes (C{max-queued-bytes}).
    long: str
    short: str | None
    #: C{int}, C{float}, C{str}, C{bool} for a flag (which takes no value),
    #: or C{tuple} for a repeatable option (of strings).
    kind: type
    default: Any
    help: str
    #: The default as the README states it.
    doc_default: str
    #: What the option's value is called in help texts (None: the usual).
    metavar: str | None = None


def _kind(annotation: str) -> type:
    base = annotation.replace(" | None", "").strip()
    return {"int": int, "float": float, "str": str, "bool": bool, "tuple[str, ...]": tuple}[base]


def _doc_default(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def options(config: type) -> list[Option]:
    """The options of C{config} (L{MasterConfig} or L{WorkerConfig}), in order."""
    found = []
    for f in dataclasses.fields(config):
        meta = f.metadata
        found.append(
            Option(
                name=f.name,
                long=meta.get("long") or f.name.replace("_", "-"),
                short=meta.get("short"),
                kind=_kind(f.type if isinstance(f.type, str) else f.type.__name__),
                default=f.default,
                help=meta["help"],
                doc_default=meta.get("doc") or _doc_default(f.default),
                metavar=meta.get("metavar"),
            )
        )
    return found


def parse_argv(config: type, argv: Sequence[str], role: str) -> tuple[dict[str, Any], list[str]]:
    """
    Read C{argv}, options of C{config} for the program C{role}, by twistd's
    rules (C{getopt}: C{--name value}, C{--name=value}, a unique prefix of a
    name, C{-p value}, C{-pvalue}, flags without a value), anywhere among
    the positional arguments.  Returns the options given, by field name and
    converted to their type, and the positional arguments.  Raises
    L{OptionError} naming the option for an unknown option or a bad value
    (of its type, or out of range: L{Checked}), so that a launcher fails
    before it starts anything.
    """
    opts = options(config)
    by_name = {f"--{o.long}": o for o in opts}
    by_name.update({f"-{o.short}": o for o in opts if o.short})
    shorts = "".join(o.short + ("" if o.kind is bool else ":") for o in opts if o.short)
    longs = [o.long + ("" if o.kind is bool else "=") for o in opts]
    try:
        pairs, rest = getopt.gnu_getopt(list(argv), shorts, longs)
    except getopt.GetoptError as e:
        raise OptionError(f"{role}: {e} (see '{role} --help')") from None
    given: dict[str, Any] = {}
    for flag, value in pairs:
        o = by_name[flag]
        if o.kind is bool:
            given[o.name] = True
            continue
        if o.kind is tuple:
            given[o.name] = (*given.get(o.name, ()), value)
            continue
        try:
            given[o.name] = o.kind(value)
        except ValueError:
            raise OptionError(
                f"{role}: --{o.long} takes {'a number' if o.kind is not str else 'a value'}, not {value!r}"
            ) from None
    try:
        config(**given)
    except OptionError as e:
        raise OptionError(f"{role}: {e}") from None
    return given, rest


class Checked:
    """
    A config whose values are checked when it is made: L{problems} lists
    what is wrong, and the first problem is raised as an L{OptionError}
    (one line, naming the option).  The twistd options
    (L{cw.wire.options.ConfigOptions}), C{cw-slurm} and the launchers
    (L{parse_argv}) all check through here.
    """

    def __post_init__(self) -> None:
        for problem in self.problems():
            raise OptionError(problem)

    def problems(self) -> list[str]:
        """What is wrong with the values, as messages naming the options."""
        return []


def _negative(config: Any, *names: str) -> list[str]:
    """A problem for each of the fields C{names} of C{config} below zero."""
    return [f"--{name.replace('_', '-')} must not be negative" for name in names if getattr(config, name) < 0]


@dataclass(frozen=True)
class MasterConfig(Checked):
    """The options of C{cw-master} (C{twistd -n cw-master --help})."""

    port: str | None = option(None, "endpoint to listen on (default tcp:5494)", short="p", doc="tcp:5494")
    prefetch: int = option(1, "extra jobs a worker may hold per slot, at least")
    prefetch_seconds: float = option(0.05, "also as many as a worker completes in this time")
    address_file: str | None = option(None, "write the master's address here once listening", doc="none")
    secret_file: str | None = option(None, _SECRET_HELP, doc="$CW_SECRET_FILE, else ~/.config/cw/secret")
    max_pending: int | None = option(
        None,
        "connections that may wait to authenticate (default: 1024, at most 1/4 of the fd limit)",
        doc="1024, at most 1/4 of the fd limit",
    )
    max_pending_per_address: int | None = option(
        None, "of those, from one address (default: a quarter)", doc="a quarter of --max-pending"
    )
    auth_timeout: float = option(AUTH_TIMEOUT, "seconds a new connection has to authenticate")
    max_payload: int = option(MAX_PAYLOAD, "largest job or result payload, in bytes", doc="4 GiB")
    max_queued_bytes: int = option(MAX_QUEUED_BYTES, "bytes of jobs a client may have queued", doc="1 GiB")
    max_queued_jobs: int = option(MAX_QUEUED_JOBS, "jobs a client may have queued", doc="10,000,000")
    max_unsent_bytes: int = option(
        MAX_UNSENT_BYTES,
        "dispatch none of a client's jobs while it has this many bytes of results unread",
        doc="64 MiB",
    )
    client_read_timeout: float = option(
        CLIENT_READ_TIMEOUT, "disconnect a client that reads none of its results for this long"
    )
    max_attempts: int = option(3, "lost workers a running job may outlive before it fails")
    heartbeat: float = option(5.0, "seconds between heartbeats to each worker and client (0: none)")
    heartbeat_timeout: float | None = option(
        None, "seconds a worker may stay silent (default: 3 heartbeats)", doc="three heartbeats"
    )
    client_timeout: float = option(CLIENT_TIMEOUT, "seconds a client may stay silent (0: no limit)")
    deadline_grace: float = option(DEADLINE_GRACE, "seconds past a job's timeout before it is taken back")
    stall_timeout: float = option(0.0, "drop a worker holding jobs that reports nothing this long (0: never)")
    reserve_after: float = option(
        10.0, "keep a worker free for a job shape that found no room this long (0: never)"
    )
    unschedulable_timeout: float = option(
        0.0, "fail jobs that no connected worker could run after this long (0: never)"
    )
    state: str | None = option(
        None, "keep the queue in this SQLite file: jobs outlive a restart and their clients", doc="none"
    )
    max_stored_results_bytes: int = option(
        MAX_STORED_RESULTS_BYTES,
        "bytes of results kept for absent clients (--state; oldest dropped)",
        doc="1 GiB",
    )
    web: str | None = option(
        None, "serve the dashboard and /metrics on this endpoint, e.g. tcp:8494 (loopback)", doc="none"
    )
    web_address_file: str | None = option(None, "write the dashboard's URL here once it listens", doc="none")
    web_token_file: str | None = option(
        None, "write the dashboard's token here (mode 0600; default ~/.cache/cw/)", doc="~/.cache/cw/"
    )
    web_host: str = option(
        "", "more names the dashboard answers to in Host headers, comma-separated", doc="none"
    )
    pool_file: str | None = option(
        None, "run an adaptive worker pool as this JSON file describes (cw.mp, cw-slurm write it)", doc="none"
    )
    insecure: bool = option(False, "accept peers without authentication (trusted networks only)", doc="off")
    web_open: bool = option(
        False, "serve the dashboard without its token (single-user machines only)", doc="off"
    )

    def problems(self) -> list[str]:
        found = [
            f"--{name} must be at least 1"
            for name, value in (
                ("max-pending", self.max_pending),
                ("max-pending-per-address", self.max_pending_per_address),
            )
            if value is not None and value < 1
        ]
        if self.max_attempts < 1:
            found.append("--max-attempts must be at least 1")
        if self.max_unsent_bytes < 1 or self.client_read_timeout <= 0:
            found.append("--max-unsent-bytes and --client-read-timeout must be positive")
        if self.max_queued_bytes < 1 or self.max_queued_jobs < 1:
            found.append("--max-queued-bytes and --max-queued-jobs must be at least 1")
        if self.prefetch < 0 or self.prefetch_seconds < 0:
            found.append("--prefetch and --prefetch-seconds must not be negative")
        found += _negative(
            self,
            "deadline_grace",
            "stall_timeout",
            "client_timeout",
            "heartbeat",
            "reserve_after",
            "unschedulable_timeout",
        )
        if not self.web:
            found += [
                f"--{name.replace('_', '-')} needs --web"
                for name in ("web_address_file", "web_token_file", "web_host", "web_open")
                if getattr(self, name)
            ]
        return found


@dataclass(frozen=True)
class WorkerConfig(Checked):
    """The options of C{cw-worker} (C{twistd -n cw-worker --help})."""

    master: str | None = option(
        None, "the master's address (default localhost:5494)", short="m", doc="localhost"
    )
    procs: int | None = option(
        None, "jobs to run at once (default: number of cores)", doc="the number of cores"
    )
    recycle_after: int = option(0, "restart a job process after this many jobs (0: never)")
    job_timeout: float | None = option(
        None, "seconds a job may run unless it sets its own timeout", doc="no limit"
    )
    memory_limit: int = option(0, "address-space limit per job process, MiB (0: none)")
    recycle_memory: int = option(0, "restart a job process above this resident size, MiB (0: never)")
    output_limit: int = option(
        OUTPUT_LIMIT, "bytes of a job's stdout, and of its stderr, sent back (the last ones)", doc="1 MiB"
    )
    master_timeout: float = option(30.0, "reconnect if master heartbeats stop this long (0: never)")
    drain_timeout: float = option(DRAIN_TIMEOUT, "seconds running jobs may finish when stopped")
    reconnect_delay: float = option(RECONNECT_DELAY, "most seconds between tries to reach the master")
    keep_results: int = option(
        KEEP_RESULTS,
        "bytes of results of jobs finished while the master is away, for the next one (0: kill the jobs)",
        doc="64 MiB",
    )
    secret_file: str | None = option(None, _SECRET_HELP, doc="$CW_SECRET_FILE, else ~/.config/cw/secret")
    slurm_wait: float = option(MASTER_WAIT, "with --slurm: seconds to wait for the master job to start")
    slurm: bool = option(
        False, "find the master through SLURM (this user's job cmaster[-$CW_SLURM_CLUSTER])", doc="off"
    )
    insecure: bool = option(False, "skip authentication (only with a master that runs --insecure)", doc="off")
    cpus: int | None = option(
        None,
        "cores jobs may use (default: the cores this process may run on, or SLURM's; at least --procs)",
        doc="the cores it may use",
    )
    memory: str | None = option(
        None,
        "memory jobs may ask for, e.g. 64G (default: the cgroup limit, else physical)",
        doc="all",
    )
    gpus: str | None = option(
        None,
        "GPUs: a count or ids, e.g. 0,1 (default: $CUDA_VISIBLE_DEVICES, else SLURM's, else none)",
        doc="those it was given",
    )
    resource: tuple[str, ...] = option(
        (), "a custom resource NAME=N jobs may ask for (repeatable)", doc="none", metavar="NAME=N"
    )
    tag: tuple[str, ...] = option((), "a tag jobs may ask for (repeatable)", doc="none", metavar="NAME")

    def problems(self) -> list[str]:
        found = ["--procs must be at least 1"] if self.procs is not None and self.procs < 1 else []
        try:
            build_capacity(self.cpus, self.memory, self.gpus, self.resource, self.tag, 1, Capacity(cpus=1))
        except ValueError as e:
            found.append(str(e))
        return found


@dataclass(frozen=True)
class SlurmConfig(Checked):
    """
    The options of C{cw-slurm} (besides its command: start, stop or
    status); C{cw.slurm.start} and C{stop} take the same defaults.
    """

    workers: int = option(32, "workers to start", short="n", metavar="N")
    no_master: bool = option(False, "leave the master job alone", short="M", doc="off")
    no_workers: bool = option(False, "leave the worker jobs alone", short="W", doc="off")
    isolated: bool = option(False, "one worker per node (--ntasks-per-node=1)", short="i", doc="off")
    docker_image: str | None = option(
        None,
        "run each worker in 'docker run -i --rm --net=host IMAGE' (cw installed in the image)",
        short="d",
        doc="none",
        metavar="IMAGE",
    )
    docker_args: str = option("", "more 'docker run' arguments", doc="none", metavar="ARGS")
    x_workers: tuple[str, ...] = option(
        (),
        "an extra sbatch option for the worker job, e.g. --Xworkers --mem=4G (repeatable)",
        long="Xworkers",
        doc="none",
        metavar="ARG",
    )
    x_master: tuple[str, ...] = option(
        (),
        "an extra sbatch option for the master job (repeatable)",
        long="Xmaster",
        doc="none",
        metavar="ARG",
    )
    time: str | None = option(
        None, "the jobs' time limit (sbatch --time), e.g. 8:00:00", doc="the partition's", metavar="LIMIT"
    )
    master_time: str | None = option(
        None,
        "the master job's time limit; a master with --state replaces itself before it",
        doc="--time",
        metavar="LIMIT",
    )
    state: str | None = option(
        None,
        "the master keeps its queue in this file (cw-master --state), on a shared filesystem",
        doc="none",
        metavar="PATH",
    )
    partition: str | None = option(None, "the SLURM partition to run in", doc="SLURM's", metavar="P")
    name: str | None = option(
        None,
        "cluster name, to run several clusters: jobs cmaster-NAME, cworkers-NAME",
        doc="$CW_SLURM_CLUSTER, else none",
    )
    port: int | None = option(None, "the master's port", doc="5494; a free one for a named cluster")
    walltime_warning: int = option(
        WALLTIME_WARNING,
        "workers drain, and a master with --state is replaced, this many seconds before the time limit"
        " (0: no signal)",
        metavar="S",
    )
    secret_file: str | None = option(
        None, "the shared secret", doc="$CW_SECRET_FILE, else ~/.config/cw/secret"
    )
    wait: float = option(
        0.0,
        "start: wait up to S seconds for the master to listen and print its address",
        doc="0: do not wait",
        metavar="S",
    )
    timeout: float = option(120.0, "stop: seconds to wait for each job to end", metavar="S")
    pool: tuple[str, ...] = option(
        (),
        "start: a pool of workers, its own worker job, instead of -n (repeatable): n workers, each with"
        " cpus cores, mem memory, gres (e.g. gpu:1), tags and resources NAME=N, e.g."
        " gpu:n=4,gres=gpu:1,cpus=8,mem=64G,tag=gpu; min=A,max=B instead of n: an adaptive pool of"
        " A to B worker jobs of one worker each, with idle=S, poll=S, pending=S its own"
        " --idle-timeout, --poll-interval, --pending-timeout",
        doc="none",
        metavar="NAME:KEY=VALUE,...",
    )

    min_workers: int = option(0, "adaptive pool: workers kept at least", metavar="A")
    max_workers: int | None = option(
        None,
        "an adaptive pool of at most B worker jobs of one worker each, started and drained as work"
        " comes and goes (-n is then ignored)",
        doc="none: a fixed pool of -n workers",
        metavar="B",
    )
    idle_timeout: float = option(IDLE_TIMEOUT, "adaptive pool: drain a worker idle this long", metavar="S")
    poll_interval: float = option(
        POLL_INTERVAL, "adaptive pool: one squeue per S seconds at most", metavar="S"
    )
    pending_timeout: float = option(
        PENDING_TIMEOUT, "adaptive pool: cancel and resubmit a worker job pending this long", metavar="S"
    )

    def problems(self) -> list[str]:
        found = _negative(self, "walltime_warning", "wait", "timeout", "min_workers", "idle_timeout")
        for text in self.pool:
            try:
                parse_pool(text)
            except OptionError as e:
                found.append(str(e))
        return found


@dataclass(frozen=True)
class PoolSpec:
    """
    One pool of workers on SLURM (C{cw-slurm start --pool NAME:KEY=VALUE,...}):
    its own worker job of C{n} workers, each with C{cpus} cores
    (C{--cpus-per-task}), C{mem} memory (a size such as C{64G}), the
    generic resources C{gres} (C{--gres}, e.g. C{gpu:1}), and the C{tags}
    and custom C{resources} (C{NAME=N}) its workers advertise.  With
    C{max_workers} (C{max=}) the pool is adaptive: between C{min_workers}
    (C{min=}, default 0) and C{max_workers} worker jobs of one worker
    each, as the queued work it could run needs (L{cw.core.scaling}); its
    C{idle_timeout} (C{idle=}), C{poll_interval} (C{poll=}) and
    C{pending_timeout} (C{pending=}), in seconds, override the common
    C{--idle-timeout}, C{--poll-interval} and C{--pending-timeout} (None:
    the common one).  Parsed by L{parse_pool}; L{spec} gives the text back.
    """

    name: str
    n: int = 1
    cpus: int | None = None
    mem: str | None = None
    gres: str | None = None
    tags: tuple[str, ...] = ()
    resources: tuple[str, ...] = ()
    min_workers: int | None = None
    max_workers: int | None = None
    idle_timeout: float | None = None
    poll_interval: float | None = None
    pending_timeout: float | None = None

    @property
    def adaptive(self) -> bool:
        """Whether the pool scales itself (C{max=} given)."""
        return self.max_workers is not None

    def capacity(self) -> Capacity:
        """
        What one of its workers will have, for routing queued work to
        pools (L{cw.core.scaling.route_queued}): GPUs counted from C{gres}
        (C{gpu:2}, C{gpu:a100:2}).
        """
        gpus = 0
        for item in filter(None, (self.gres or "").split(",")):
            parts = item.split(":")
            if parts[0] == "gpu":
                gpus += int(parts[-1]) if len(parts) > 1 and parts[-1].isdigit() else 1
        memory = parse_size(self.mem) if self.mem else None
        return pool_capacity(self.cpus, memory, gpus, self.tags, dict(map(parse_resource, self.resources)))

    def spec(self) -> str:
        """The definition as C{--pool} takes it."""
        parts = [f"min={self.min_workers or 0},max={self.max_workers}" if self.adaptive else f"n={self.n}"]
        parts += [
            f"{key}={value}"
            for key, value in (("cpus", self.cpus), ("mem", self.mem), ("gres", self.gres))
            if value
        ]
        parts += [f"tag={tag}" for tag in self.tags] + [f"resource={r}" for r in self.resources]
        parts += [
            f"{key}={getattr(self, field):g}"
            for key, field in _POOL_TIMES.items()
            if getattr(self, field) is not None
        ]
        return f"{self.name}:" + ",".join(parts)


#: C{--pool} keys that name a field otherwise.
_POOL_KEYS = {"max": "max_workers"}

#: C{--pool} keys of an adaptive pool's own times, in seconds (C{idle=0} allowed).
_POOL_TIMES = {"idle": "idle_timeout", "poll": "poll_interval", "pending": "pending_timeout"}


def parse_pool(text: str) -> PoolSpec:
    """
    A L{PoolSpec} from C{NAME:KEY=VALUE,...} (keys C{n}, or C{min} and
    C{max} for an adaptive pool, C{cpus}, C{mem}, C{gres}, C{tag} and
    C{resource}, the last two repeatable), e.g.
    C{gpu:n=4,gres=gpu:1,cpus=8,mem=64G,tag=gpu} or
    C{gpu:min=0,max=4,gres=gpu:1,tag=gpu}.  Raises L{OptionError}
    saying what is wrong.
    """
    name, _, rest = text.partition(":")
    if not name or not all(c.isalnum() or c in "_-" for c in name):
        raise OptionError(f"--pool {text!r}: start with a name of letters, digits, '_' or '-', then ':'")
    fields: dict[str, Any] = {"tags": [], "resources": []}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not value:
            raise OptionError(f"--pool {text!r}: {item!r} is not KEY=VALUE")
        if key in ("n", "cpus", "max"):
            if not value.isdigit() or int(value) < 1:
                raise OptionError(f"--pool {text!r}: {key} must be a positive whole number, not {value!r}")
            fields[_POOL_KEYS.get(key, key)] = int(value)
        elif key == "min":
            if not value.isdigit():
                raise OptionError(f"--pool {text!r}: min must be a whole number, not {value!r}")
            fields["min_workers"] = int(value)
        elif key in _POOL_TIMES:
            try:
                seconds = float(value)
            except ValueError:
                seconds = math.nan
            if not (seconds > 0 or (key == "idle" and seconds == 0)) or math.isinf(seconds):
                least = "0 or more" if key == "idle" else "more than 0"
                raise OptionError(
                    f"--pool {text!r}: {key} must be a number of seconds, {least}, not {value!r}"
                )
            fields[_POOL_TIMES[key]] = seconds
        elif key in ("mem", "gres"):
            fields[key] = value
        elif key == "tag":
            fields["tags"].append(value)
        elif key == "resource":
            fields["resources"].append(value)
        else:
            raise OptionError(
                f"--pool {text!r}: unknown key {key!r}"
                " (n, min, max, idle, poll, pending, cpus, mem, gres, tag, resource)"
            )
    fields["tags"], fields["resources"] = tuple(fields["tags"]), tuple(fields["resources"])
    for key, field in [("min", "min_workers"), *_POOL_TIMES.items()]:
        if field in fields and "max_workers" not in fields:
            raise OptionError(f"--pool {text!r}: {key}= needs max= (an adaptive pool)")
    if "max_workers" in fields:
        if "n" in fields:
            raise OptionError(
                f"--pool {text!r}: give n= (a fixed pool) or min= and max= (adaptive), not both"
            )
        if fields.get("min_workers", 0) > fields["max_workers"]:
            raise OptionError(f"--pool {text!r}: min must not exceed max")
    try:
        if "mem" in fields:
            parse_size(fields["mem"])
        for resource in fields["resources"]:
            parse_resource(resource)
    except ValueError as e:
        raise OptionError(f"--pool {text!r}: {e}") from None
    return PoolSpec(name, **fields)
