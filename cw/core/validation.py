"""
Checks on every field an authenticated peer sends: the master checks its
clients and workers, and they check the master (L{cw.wire.checked}).

Authentication proves that a peer holds the secret, not that it is bug-free
or of the same version: a malformed field must end that one connection with
one clear log line, never an unhandled error deep inside the master.  Each
check here raises L{BadCommand} naming the field and what was wrong; the
master's protocol (L{cw.master.protocol.MasterProtocol}) turns that into a dropped
connection.  Pure functions, no I/O: unit-tested in
L{cw.test.master.test_limits}.

Layer rule (cw.core): pure; imports only cw.core, cw.errors and the standard library (no Twisted, no I/O).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from cw.core import records as P
from cw.core.resources import ALLOCATION, CPUS, GPUS, MEMORY, RESOURCES, TAGS, Capacity, parse_size
from cw.errors import BadCommand

#: Largest share weight a client may ask for.
MAX_WEIGHT = 1000

#: Most job slots one worker may declare.
MAX_SLOTS = 1 << 16

#: Longest host name, working directory or C{sys.path} entry accepted.
MAX_NAME = 255
MAX_PATH = 4096

#: Most C{sys.path} entries in a client's context.
MAX_PATH_ENTRIES = 10_000

#: Most workers a client may wait for (L{P.AwaitWorkers}).
MAX_AWAIT = 1_000_000

#: Longest key of a cached function (the job record's field holds 255).
MAX_FUNCTION_KEY = 255

#: Longest client session name (L{P.RegisterClient}).
MAX_SESSION = 128

#: Largest id, payload limit or room (bytes, jobs) a master may send.
MAX_NUMBER = (1 << 63) - 1

#: Longest reason a stopping master may give (L{P.MasterStopping}).
MAX_REASON = 4096

#: The status codes a result may carry.
OUTCOMES = frozenset({P.Outcome.OK, P.Outcome.RAISED, P.Outcome.CRASHED, P.Outcome.FAILED})

#: The streams an output record may carry.
OUTPUT_STREAMS = frozenset({P.Stream.STDOUT, P.Stream.STDERR, P.Stream.LOG})


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_range(name: str, value: Any, low: int, high: int) -> int:
    """C{value} if it is an integer in C{[low, high]}, else L{BadCommand}."""
    if not _integer(value) or not low <= value <= high:
        raise BadCommand(f"{name} must be an integer from {low} to {high}, not {value!r:.80}")
    return value


def check_text(name: str, value: Any, limit: int, empty: bool = False, printable: bool = True) -> str:
    """
    C{value} if it is a string of at most C{limit} characters, all
    printable unless C{printable} is false (a directory may be named with
    anything, but a name that is logged may not forge log lines).
    """
    if not isinstance(value, str):
        raise BadCommand(f"{name} must be a string, not {type(value).__name__}")
    if len(value) > limit or (not value and not empty):
        raise BadCommand(f"{name} must be 1 to {limit} characters long, not {len(value)}")
    if printable and not value.isprintable():
        raise BadCommand(f"{name} holds control characters: {value!r:.80}")
    return value


def check_session(session: Any) -> str:
    """A client's session name: 1 to L{MAX_SESSION} printable characters."""
    return check_text("session", session, MAX_SESSION)


def check_peer(host: Any, pid: Any) -> str:
    """The C{host:pid} name of a registering peer."""
    check_text("host", host, MAX_NAME)
    check_range("pid", pid, 1, (1 << 32) - 1)
    return f"{host}:{pid}"


def check_context(context: Any) -> int:
    """
    Check a client's context (working directory, C{sys.path}, share weight;
    other keys are passed on untouched) and return its weight.
    """
    if not isinstance(context, dict):
        raise BadCommand(f"context must be a JSON object, not {type(context).__name__}")
    check_text("context cwd", context.get("cwd"), MAX_PATH, printable=False)
    path = context.get("path")
    if not isinstance(path, list) or len(path) > MAX_PATH_ENTRIES:
        raise BadCommand(f"context path must be a list of at most {MAX_PATH_ENTRIES:,} strings")
    for entry in path:
        check_text("context path entry", entry, MAX_PATH, empty=True, printable=False)
    return check_range("context weight", context.get("weight", 1), 1, MAX_WEIGHT)


def check_jobs(jobs: list[P.Job], from_master: bool = False) -> None:
    """
    Check the options of each submitted job (framing was checked on
    decoding); C{from_master}: jobs the master sends a worker, which carry
    their client's id and may carry the master's allocation.
    """
    for job in jobs:
        if from_master and job.client < 1:
            raise BadCommand(f"job {job.key}: client ids start at 1")
        if job.seq < 1:
            raise BadCommand(f"job {job.seq}: sequence numbers start at 1")
        if not job.options:
            continue
        try:
            options = json.loads(bytes(job.options).decode("utf-8"))
        except ValueError:
            options = None
        if not isinstance(options, dict):
            raise BadCommand(f"job {job.seq}: options are not a JSON object")
        timeout = options.get("timeout")
        if timeout is not None and not P.valid_timeout(timeout):
            raise BadCommand(f"job {job.seq}: timeout must be positive seconds, not {timeout!r:.40}")
        # Any integer the client accepts (see cw.client.session.job_options).
        attempts = options.get("max_attempts")
        if attempts is not None and (not _integer(attempts) or attempts < 1):
            raise BadCommand(f"job {job.seq}: max_attempts must be a positive integer, not {attempts!r:.40}")
        priority = options.get("priority")
        if priority is not None and not _integer(priority):
            raise BadCommand(f"job {job.seq}: priority must be an integer, not {priority!r:.40}")
        if ALLOCATION in options and not from_master:
            raise BadCommand(f"job {job.seq}: {ALLOCATION!r} is the master's to set, not the client's")
        if RESOURCES in options or TAGS in options:
            try:
                check_request(options.get(RESOURCES), options.get(TAGS))
            except ValueError as e:
                raise BadCommand(f"job {job.seq}: {e}") from None
        if ENV in options:
            try:
                check_env(options[ENV])
            except ValueError as e:
                raise BadCommand(f"job {job.seq}: {e}") from None
        echo = options.get("echo")
        if echo is not None and not isinstance(echo, bool):
            raise BadCommand(f"job {job.seq}: echo must be true or false, not {echo!r:.40}")
        level = options.get("log")
        if level is not None and (not _integer(level) or level < 0):
            raise BadCommand(f"job {job.seq}: log must be a logging level (an integer), not {level!r:.40}")


#: The job option holding the environment variables a job runs with
#: (C{submit_with(..., env=)}; applied by L{cw.worker.child.job_limits}).
ENV = "env"

#: Most variables in a job's C{env}, and the most bytes of their JSON (a
#: job's options travel in at most 65,535 bytes, L{P.job_parts}).
MAX_ENV_VARIABLES = 256
MAX_ENV_BYTES = 32 * 1024


def _environment_text(what: str, text: Any) -> str:
    if not isinstance(text, str):
        raise ValueError(f"env {what}s must be strings, not {type(text).__name__}: {text!r:.80}")
    try:
        text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise ValueError(f"env {what} {text!r:.80} cannot be encoded for the environment") from None
    if "\0" in text:
        raise ValueError(f"env {what} {text!r:.80} holds a NUL character")
    return text


def check_env(env: Any) -> dict[str, str]:
    """
    The environment variables a job asks to run with (C{submit_with(...,
    env={"NAME": "value"})}): a mapping of names (not empty, without C{=})
    to values, all strings, at most L{MAX_ENV_VARIABLES} of them and
    L{MAX_ENV_BYTES} bytes as JSON.  Returns them sorted by name, so that
    equal requests travel as equal bytes; raises L{ValueError} saying what
    is wrong.
    """
    if env is None:
        return {}
    if not isinstance(env, Mapping):
        raise ValueError(f"env must be a dict like {{'OMP_NUM_THREADS': '1'}}, not {env!r:.80}")
    if len(env) > MAX_ENV_VARIABLES:
        raise ValueError(f"env may set at most {MAX_ENV_VARIABLES} variables, not {len(env):,}")
    for name, value in env.items():
        if not _environment_text("name", name) or "=" in name:
            raise ValueError(f"env names must be non-empty and without '=', not {name!r:.80}")
        _environment_text("value", value)
    normal = dict(sorted(env.items()))
    size = len(json.dumps(normal))
    if size > MAX_ENV_BYTES:
        raise ValueError(
            f"env is {size:,} bytes as JSON, over {MAX_ENV_BYTES:,}; pass large data as arguments"
        )
    return normal


def check_results(results: list[P.Result]) -> None:
    """Check the status of each result a worker reports."""
    for result in results:
        if result.status not in OUTCOMES:
            raise BadCommand(f"result of job {result.key}: unknown status {result.status}")


def check_outputs(host: Any, outputs: list[P.Output]) -> str:
    """Check an L{P.OutputNotice}: the host's name and each record's stream; return the host."""
    check_text("host", host, MAX_NAME)
    for output in outputs:
        if output.stream not in OUTPUT_STREAMS:
            raise BadCommand(f"output of job {output.key}: unknown stream {output.stream}")
    return host


def check_registered(answer: Any, id_name: str) -> None:
    """
    The master's answer to L{P.RegisterClient} (C{id_name} C{client_id})
    or L{P.RegisterWorker} (C{worker_id}): a positive id and payload limit,
    and room that is not negative.
    """
    check_range(id_name, answer.get(id_name), 1, MAX_NUMBER)
    check_range("max_payload", answer.get("max_payload"), 1, MAX_NUMBER)
    for name in ("room_bytes", "room_jobs"):
        if name in answer:
            check_range(name, answer[name], 0, MAX_NUMBER)


def check_handover(results: list[P.Result] | None, sessions: Any) -> list[str]:
    """
    Check results a worker hands over (L{P.HandOverResults}): each names
    its client's session by its index, from 1, in C{sessions}.  Returns
    the sessions (an empty list for none).
    """
    if results is None and sessions is None:
        return []
    if results is None or not isinstance(sessions, list):
        raise BadCommand("handed-over results need both results and a list of sessions")
    for session in sessions:
        check_session(session)
    check_results(results)
    for result in results:
        check_range(f"result of job {result.key}: session index", result.client, 1, len(sessions))
    return sessions


def check_function_key(key: Any) -> bytes:
    if not isinstance(key, bytes) or not 1 <= len(key) <= MAX_FUNCTION_KEY:
        raise BadCommand(f"a function key must be 1 to {MAX_FUNCTION_KEY} bytes")
    return key


# -- resources (see cw.core.resources) --------------------------------------

#: Longest name of a custom resource or tag, and most of them in one request.
MAX_RESOURCE_NAME = 64
MAX_RESOURCE_NAMES = 64

#: Most GPUs one worker may declare.
MAX_GPUS = 1024


def _resource_name(what: str, name: Any) -> str:
    if (
        not isinstance(name, str)
        or not 1 <= len(name) <= MAX_RESOURCE_NAME
        or not all(c.isalnum() or c in "_-.:" for c in name)
    ):
        raise ValueError(
            f"{what} names must be 1 to {MAX_RESOURCE_NAME} letters, digits or '_-.:', not {name!r:.80}"
        )
    return name


def _count(name: str, value: Any, whole: bool) -> float:
    ok = isinstance(value, int) if whole else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or not 0 <= value < float("inf"):
        kind = "a whole number" if whole else "a number"
        raise ValueError(f"resource {name!r} must be {kind} >= 0, not {value!r:.40}")
    return value


def check_request(resources: Any, tags: Any) -> tuple[dict, list[str]]:
    """
    Normalise what a job asks for (C{submit_with(..., resources=, tags=)}):
    C{resources} a mapping of resource name to amount (C{cpus} and C{gpus}
    whole numbers, C{cpus} at least 1; C{memory} bytes or a size such as
    C{"16G"}; any other name a custom amount), C{tags} a collection of
    names.  Returns the resources without defaults (C{cpus} 1, zero
    amounts dropped) and the tags sorted, so that equal requests travel as
    equal bytes.  Raises L{ValueError} saying what is wrong.
    """
    if resources is None:
        resources = {}
    if not isinstance(resources, Mapping):
        raise ValueError(
            f"resources must be a dict like {{'cpus': 4, 'memory': '16G'}}, not {resources!r:.80}"
        )
    if tags is None:
        tags = ()
    if isinstance(tags, str) or not isinstance(tags, Iterable):
        raise ValueError(f"tags must be a set of names like {{'gpu'}}, not {tags!r:.80}")
    tags = sorted({_resource_name("tag", tag) for tag in tags})
    if len(resources) > MAX_RESOURCE_NAMES or len(tags) > MAX_RESOURCE_NAMES:
        raise ValueError(f"a job may ask for at most {MAX_RESOURCE_NAMES} resources and tags")
    normal: dict = {}
    for name, value in resources.items():
        _resource_name("resource", name)
        if name == MEMORY:
            amount = parse_size(value)
        else:
            amount = _count(name, value, whole=name in (CPUS, GPUS))
        if name == CPUS:
            if amount < 1:
                raise ValueError(f"a job needs at least one cpu, not {value!r}")
            if amount == 1:
                continue
        if amount:
            normal[name] = amount
    return dict(sorted(normal.items())), tags


def check_capacity(data: Any) -> Capacity:
    """
    The capacity a registering worker advertises
    (L{cw.core.resources.Capacity.to_json}), as a L{Capacity}; L{BadCommand}
    naming the field if malformed.
    """
    if not isinstance(data, dict):
        raise BadCommand(f"capacity must be a JSON object, not {type(data).__name__}")
    try:
        cpus = check_range("capacity cpus", data.get("cpus"), 1, MAX_SLOTS)
        memory = check_range("capacity memory", data.get("memory", 0), 0, 1 << 62)
        gpus = data.get("gpus", [])
        if not isinstance(gpus, list) or len(gpus) > MAX_GPUS or len(set(gpus)) != len(gpus):
            raise BadCommand(f"capacity gpus must be a list of at most {MAX_GPUS} distinct ids")
        for gpu in gpus:
            _resource_name("GPU id", gpu)
        custom = data.get("custom", {})
        if not isinstance(custom, dict) or len(custom) > MAX_RESOURCE_NAMES:
            raise BadCommand(f"capacity custom must be an object of at most {MAX_RESOURCE_NAMES} names")
        for name, amount in custom.items():
            _resource_name("resource", name)
            _count(name, amount, whole=False)
        tags = data.get("tags", [])
        if not isinstance(tags, list) or len(tags) > MAX_RESOURCE_NAMES:
            raise BadCommand(f"capacity tags must be a list of at most {MAX_RESOURCE_NAMES} names")
        for tag in tags:
            _resource_name("tag", tag)
    except ValueError as e:
        raise BadCommand(f"capacity: {e}") from None
    return Capacity.from_json({**data, "cpus": cpus, "memory": memory})


#: Most fields in a version report, and most packages one probe may ask about.
MAX_VERSION_FIELDS = 64
MAX_PACKAGES = 256

#: Longest time, in seconds, a client may let the master wait for workers' probes.
MAX_PROBE_TIMEOUT = 300.0


def check_versions(versions: Any) -> dict | None:
    """
    A peer's version report (L{cw.core.versions}): None (an older peer), or
    a JSON object of at most L{MAX_VERSION_FIELDS} printable names to
    printable strings.
    """
    if versions is None:
        return None
    if not isinstance(versions, dict) or len(versions) > MAX_VERSION_FIELDS:
        raise BadCommand(f"versions must be a JSON object of at most {MAX_VERSION_FIELDS} fields")
    for name, value in versions.items():
        check_text("versions field", name, MAX_NAME)
        check_text(f"versions {name}", value, MAX_NAME, empty=True)
    return versions


def check_packages(packages: Any) -> list[str]:
    """The distribution names a client asks workers about (L{P.ProbeWorkers})."""
    if not isinstance(packages, list) or len(packages) > MAX_PACKAGES:
        raise BadCommand(f"packages must be a list of at most {MAX_PACKAGES} names")
    for name in packages:
        check_text("package name", name, MAX_NAME)
    return packages


def check_probe_context(context: Any) -> dict | None:
    """A probe's context: None, or a working directory and C{sys.path} entries (as L{check_context})."""
    if context is None:
        return None
    check_context({**context, "weight": 1} if isinstance(context, dict) else context)
    return context
