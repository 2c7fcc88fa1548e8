"""
What a job asks for and what a worker has: cores, memory, GPUs, custom
resources and tags.

A job's request travels in its options (C{"resources"}: C{{"cpus": 4,
"memory": 17179869184, "gpus": 1, "licenses": 1}}, C{"tags": ["avx512"]}),
normalised by L{cw.core.validation.check_request} so that equal requests
have equal bytes.  A job that asks for nothing beyond the default (one
core, no memory, no GPU, no tag) is I{plain}: L{shape_of} gives C{None}
for it, and plain jobs are scheduled as before (prefetched, batched).
Every other job has a L{Shape}.

A worker advertises a L{Capacity} when it registers; L{Ledger} is the
master's account of what of it is free.  The scheduler places a sized job
only where L{Ledger.fits} (now) and never prefetches it; L{Ledger.could_run}
tells whether a worker could ever run a shape (else, with no such worker,
the job is unschedulable).

Layer rule (cw.core): pure; imports only cw.core, cw.errors and the standard library (no Twisted, no I/O).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cw.core.records import Job, read_options

#: The resources every job and worker has a count of; other names are custom.
CPUS, MEMORY, GPUS = "cpus", "memory", "gpus"

#: Option keys a job's request travels under, and the allocation the master
#: adds to a sized job it sends to a worker (the GPU ids it may use).
RESOURCES, TAGS, ALLOCATION = "resources", "tags", "allocation"


@dataclass(frozen=True)
class Shape:
    """
    What a sized job asks for: C{cpus} cores, C{memory} bytes, C{gpus}
    devices, C{custom} amounts of named resources (sorted pairs), and
    C{tags} the worker must have.
    """

    cpus: int = 1
    memory: int = 0
    gpus: int = 0
    custom: tuple[tuple[str, float], ...] = ()
    tags: frozenset[str] = frozenset()

    def to_json(self) -> dict:
        """The request as the master's status shows it (C{queued_shapes}, for C{cw-slurm adapt})."""
        return {
            CPUS: self.cpus,
            MEMORY: self.memory,
            GPUS: self.gpus,
            "custom": dict(self.custom),
            TAGS: sorted(self.tags),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Shape:
        """Undo L{to_json}."""
        return cls(
            cpus=data.get(CPUS, 1),
            memory=data.get(MEMORY, 0),
            gpus=data.get(GPUS, 0),
            custom=tuple(sorted(data.get("custom", {}).items())),
            tags=frozenset(data.get(TAGS, ())),
        )

    def describe(self) -> str:
        """The request in words, as a user would write it (C{cpus=2, gpus=1, tags=gpu})."""
        parts = [f"cpus={self.cpus}"]
        if self.memory:
            parts.append(f"memory={format_size(self.memory)}")
        if self.gpus:
            parts.append(f"gpus={self.gpus}")
        parts += [f"{name}={amount:g}" for name, amount in self.custom]
        if self.tags:
            parts.append("tags=" + ",".join(sorted(self.tags)))
        return ", ".join(parts)


@dataclass(frozen=True)
class Capacity:
    """
    What a worker has: C{cpus} cores, C{memory} bytes (0: not said, so no
    job asking for memory goes there), the ids of its GPUs, custom amounts
    and tags.
    """

    cpus: int
    memory: int = 0
    gpus: tuple[str, ...] = ()
    custom: tuple[tuple[str, float], ...] = ()
    tags: frozenset[str] = frozenset()

    def to_json(self) -> dict:
        """The capacity as it travels in L{cw.wire.commands.RegisterWorker}."""
        return {
            CPUS: self.cpus,
            MEMORY: self.memory,
            GPUS: list(self.gpus),
            "custom": dict(self.custom),
            TAGS: sorted(self.tags),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Capacity:
        """Undo L{to_json} (the values checked by L{cw.core.validation.check_capacity})."""
        return cls(
            cpus=data[CPUS],
            memory=data.get(MEMORY, 0),
            gpus=tuple(data.get(GPUS, ())),
            custom=tuple(sorted(data.get("custom", {}).items())),
            tags=frozenset(data.get(TAGS, ())),
        )

    def describe(self) -> str:
        parts = [f"cpus={self.cpus}"]
        if self.memory:
            parts.append(f"memory={format_size(self.memory)}")
        if self.gpus:
            parts.append("gpus=" + ",".join(self.gpus))
        parts += [f"{name}={amount:g}" for name, amount in self.custom]
        if self.tags:
            parts.append("tags=" + ",".join(sorted(self.tags)))
        return ", ".join(parts)


_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(value: Any) -> int:
    """
    Bytes from C{value}: an integer (bytes) or a string such as C{"16G"},
    C{"512M"}, C{"1.5GiB"}, C{"2048"} (binary units; K, M, G, T, P with an
    optional C{B} or C{iB}).  Raises L{ValueError} saying what was wrong.
    """
    if isinstance(value, bool):
        raise ValueError(f"a size must be bytes or a string like '16G', not {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size must not be negative, not {value}")
        return value
    if not isinstance(value, str):
        raise ValueError(f"a size must be bytes or a string like '16G', not {type(value).__name__}")
    text = value.strip().upper().removesuffix("IB").removesuffix("B")
    number = text.rstrip("KMGTP")
    unit = text[len(number) :]
    try:
        amount = float(number)
    except ValueError:
        amount = -1.0
    if len(unit) > 1 or not 0 <= amount < float("inf"):
        raise ValueError(f"not a size: {value!r} (write bytes or a number with K, M, G or T, like '16G')")
    return int(amount * _UNITS[unit])


def format_size(size: int) -> str:
    """C{size} bytes in the largest binary unit that divides it (C{17179869184} -> C{16G})."""
    for unit in "PTGMK":
        if size and size % _UNITS[unit] == 0:
            return f"{size // _UNITS[unit]}{unit}"
    return str(size)


def request_shape(resources: Mapping[str, Any], tags: Iterable[str]) -> Shape | None:
    """The L{Shape} of a normalised request, or C{None} if it is plain."""
    custom = tuple(sorted((k, v) for k, v in resources.items() if k not in (CPUS, MEMORY, GPUS)))
    shape = Shape(
        cpus=resources.get(CPUS, 1),
        memory=resources.get(MEMORY, 0),
        gpus=resources.get(GPUS, 0),
        custom=custom,
        tags=frozenset(tags),
    )
    return None if shape == _PLAIN else shape


_PLAIN = Shape()

#: Shapes by options bytes: the jobs of one map share their options.
_shapes: dict[bytes, Shape | None] = {}


def shape_of(job: Job) -> Shape | None:
    """
    The L{Shape} a job asks for, or C{None} if it is plain (no options, or
    none that ask for resources).  Options were checked by the master
    (L{cw.core.validation.check_jobs}); malformed ones count as plain.
    """
    options = job.options
    if not options:
        return None
    shape = _shapes.get(options, _PLAIN)
    if shape is not _PLAIN:
        return shape
    read = read_options(job)
    resources, tags = read.get(RESOURCES) or {}, read.get(TAGS) or ()
    try:
        shape = request_shape(resources, tags) if isinstance(resources, dict) else None
    except TypeError:
        shape = None
    if len(_shapes) > 4096:
        _shapes.clear()
    _shapes[bytes(options)] = shape
    return shape


def allocation_of(job: Job) -> dict:
    """What the master allocated a sized job (C{{"gpus": [...], "cpus": N, ...}}), or C{{}}."""
    if not job.options:
        return {}
    allocation = read_options(job).get(ALLOCATION)
    return allocation if isinstance(allocation, dict) else {}


@dataclass
class Ledger:
    """
    The master's account of one worker's capacity: what the sized jobs it
    holds took, and how many plain jobs it holds (each counted as one core,
    whether running or prefetched, so the account errs on the safe side).
    """

    capacity: Capacity
    cpus: int = field(init=False)
    memory: int = field(init=False)
    gpus: list[str] = field(init=False)
    custom: dict[str, float] = field(init=False)
    plain: int = 0
    #: GPU ids given to each held sized job, by job key.
    given: dict[tuple[int, int], tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cpus = self.capacity.cpus
        self.memory = self.capacity.memory
        self.gpus = list(self.capacity.gpus)
        self.custom = dict(self.capacity.custom)

    def could_run(self, shape: Shape | None) -> bool:
        """Whether this worker could run a job of C{shape} when idle."""
        if shape is None:
            return True
        c = self.capacity
        if shape.cpus > c.cpus or shape.memory > c.memory or shape.gpus > len(c.gpus):
            return False
        if not shape.tags <= c.tags:
            return False
        have = dict(c.custom)
        return all(have.get(name, 0) >= amount for name, amount in shape.custom)

    def fits(self, shape: Shape | None) -> bool:
        """Whether a job of C{shape} could start here now."""
        if shape is None:
            return self.cpus - self.plain >= 1
        if shape.cpus > self.cpus - self.plain or shape.memory > self.memory or shape.gpus > len(self.gpus):
            return False
        if not shape.tags <= self.capacity.tags:
            return False
        return all(self.custom.get(name, 0) >= amount for name, amount in shape.custom)

    def take(self, key: tuple[int, int], shape: Shape | None) -> tuple[str, ...]:
        """Count a job of C{shape} as held; return the GPU ids it is given."""
        if shape is None:
            self.plain += 1
            return ()
        self.cpus -= shape.cpus
        self.memory -= shape.memory
        for name, amount in shape.custom:
            self.custom[name] -= amount
        gpus = tuple(self.gpus[: shape.gpus])
        del self.gpus[: shape.gpus]
        self.given[key] = gpus
        return gpus

    def give_back(self, key: tuple[int, int], shape: Shape | None) -> None:
        """Undo L{take} for the job C{key} of C{shape}."""
        if shape is None:
            self.plain -= 1
            return
        self.cpus += shape.cpus
        self.memory += shape.memory
        for name, amount in shape.custom:
            self.custom[name] += amount
        gpus = self.given.pop(key, ())
        # Keep the order of the capacity, so the lowest free ids go first.
        order = {gpu: i for i, gpu in enumerate(self.capacity.gpus)}
        self.gpus = sorted(self.gpus + list(gpus), key=order.__getitem__)


def parse_gpus(value: str) -> tuple[str, ...]:
    """C{--gpus}: a count (C{"2"}: ids 0 and 1) or comma-separated ids (C{"0,3"})."""
    value = value.strip()
    if value.isdigit():
        return tuple(str(i) for i in range(int(value)))
    ids = tuple(part.strip() for part in value.split(","))
    if not all(ids) or len(set(ids)) != len(ids):
        raise ValueError(f"--gpus takes a count or distinct ids like 0,1, not {value!r}")
    return ids


def parse_resource(text: str) -> tuple[str, float]:
    """C{--resource NAME=N}: a custom resource and its amount."""
    name, sep, amount = text.partition("=")
    try:
        value = float(amount)
    except ValueError:
        value = -1.0
    if not sep or not name.strip() or not 0 <= value < float("inf"):
        raise ValueError(f"--resource takes NAME=N (e.g. licenses=4), not {text!r}")
    return name.strip(), int(value) if value.is_integer() else value


def build_capacity(
    cpus: int | None,
    memory: str | None,
    gpus: str | None,
    resources: Iterable[str],
    tags: Iterable[str],
    procs: int,
    machine: Capacity,
) -> Capacity:
    """
    A worker's capacity from its options (C{None}: not given), with the
    C{machine}'s detected cores, memory and GPUs as defaults; cores default
    to at least C{procs}, so that C{--procs} alone keeps meaning the most
    jobs at once.  Raises L{ValueError} naming the option.
    """
    if cpus is not None and cpus < 1:
        raise ValueError(f"--cpus must be at least 1, not {cpus}")
    try:
        size = machine.memory if memory is None else parse_size(memory)
    except ValueError as e:
        raise ValueError(f"--memory: {e}") from None
    custom = dict(parse_resource(text) for text in resources)
    for name in [*custom, *tags]:
        if not name or not all(c.isalnum() or c in "_-.:" for c in name) or name in (CPUS, MEMORY, GPUS):
            raise ValueError(f"not a resource or tag name: {name!r} (letters, digits or '_-.:')")
    return Capacity(
        cpus=cpus if cpus is not None else max(machine.cpus, procs),
        memory=size,
        gpus=machine.gpus if gpus is None else parse_gpus(gpus),
        custom=tuple(sorted(custom.items())),
        tags=frozenset(tags),
    )
