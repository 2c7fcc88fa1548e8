"""
Whether a client's jobs can run on a worker, judged from the versions each
reports when it registers (L{cw.wire.versions} collects them), with no I/O.

A job is a cloudpickle made by the client and opened in a job process on
the worker.  Pickles of functions carry code objects, which are specific to
a Python major.minor version and implementation, and cloudpickle's format
may change between its major versions: a job that crosses such a line fails
to unpickle, or worse, unpickles into something subtly wrong.  So a client
and a worker are I{incompatible} when their Python major.minor version,
their Python implementation or their cloudpickle major version differ
(L{incompatible}); other differences (cw, Twisted, patch releases) are
shown by C{ClusterExecutor.versions()} but do not stop jobs.

Unit-tested in L{cw.test.core.test_versions}.

Layer rule (cw.core): pure; imports only cw.core, cw.errors and the standard library (no Twisted, no I/O).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: What every client and worker reports, in the order shown.
FIELDS = ("python", "implementation", "cw", "cloudpickle", "twisted")

#: How each field is named in messages.
LABELS = {
    "python": "Python",
    "implementation": "implementation",
    "cw": "cw",
    "cloudpickle": "cloudpickle",
    "twisted": "Twisted",
}

#: A client's C{version_mismatch} choices: jobs sent to an incompatible
#: worker fail there with C{IncompatibleWorker} ("error"), or the master
#: never sends them to one ("avoid").
MISMATCH_MODES = ("error", "avoid")

#: The key of a client's context (L{P.RegisterClient}) that carries its choice.
CONTEXT_KEY = "version_mismatch"


def _leading(version: Any, parts: int) -> str | None:
    """The first C{parts} dot-separated parts of C{version}, or None if it is not a string."""
    if not isinstance(version, str) or not version:
        return None
    return ".".join(version.split(".")[:parts])


def incompatible(client: Mapping | None, worker: Mapping | None) -> list[str]:
    """
    Why jobs pickled by C{client} cannot run on C{worker} (both version
    reports): one phrase per difference in Python major.minor version,
    Python implementation or cloudpickle major version.  Empty when they
    are compatible, or when either side did not report (an older peer:
    nothing is known, nothing is refused).
    """
    if not client or not worker:
        return []
    reasons = []
    for field, parts in (("python", 2), ("implementation", 99), ("cloudpickle", 1)):
        mine, theirs = _leading(client.get(field), parts), _leading(worker.get(field), parts)
        if mine is not None and theirs is not None and mine != theirs:
            kind = {"python": "Python major.minor", "cloudpickle": "cloudpickle major"}.get(field, "Python")
            reasons.append(f"{kind} {mine} vs {theirs}")
    return reasons


def short(versions: Mapping | None) -> str:
    """C{"Python 3.11.2 (CPython), cloudpickle 3.1.0"}: the fields that decide compatibility."""
    if not versions:
        return "unknown versions (an older cw)"
    python = versions.get("python", "?")
    implementation = versions.get("implementation")
    text = f"Python {python}" + (f" ({implementation})" if implementation else "")
    return f"{text}, cloudpickle {versions.get('cloudpickle', '?')}"


def describe(versions: Mapping | None) -> str:
    """Every reported field, for tables and logs."""
    if not versions:
        return "unknown versions (an older cw)"
    return ", ".join(f"{LABELS.get(f, f)} {versions[f]}" for f in FIELDS if versions.get(f))


def mismatch_message(client: Mapping, worker: Mapping, worker_name: str) -> str:
    """
    The error of a job sent to an incompatible worker: both versions, the
    worker, and what to do.
    """
    reasons = "; ".join(incompatible(client, worker))
    return (
        f"the client runs {short(client)} but worker {worker_name} runs {short(worker)}"
        f" ({reasons}): its jobs cannot be unpickled reliably there, so the job was not run."
        "  Install the same Python and cloudpickle versions on clients and workers, or create"
        " the client with version_mismatch='avoid' to keep its jobs off such workers"
    )


def package_differences(client: Mapping | None, worker: Mapping | None) -> list[str]:
    """
    C{"numpy 1.26.4 vs 2.0.1"} for each extra package (C{versions(packages=...)})
    whose version differs between the client's and the worker's report
    (None: not installed).
    """
    client, worker = client or {}, worker or {}
    differences = []
    for name in sorted(set(client) | set(worker)):
        mine, theirs = client.get(name), worker.get(name)
        if mine != theirs:
            differences.append(f"{name} {mine or 'not installed'} vs {theirs or 'not installed'}")
    return differences


def table_conflicts(table: Mapping) -> list[str]:
    """
    Every difference that C{ClusterExecutor.versions(check=True)} refuses,
    one line per worker: incompatible Python or cloudpickle versions
    (L{incompatible}) and differing extra packages (L{package_differences}).
    C{table} is C{{"client": {..., "packages": {...}}, "workers": {name: {...}}}}.
    """
    client = table.get("client") or {}
    lines = []
    for name, worker in sorted((table.get("workers") or {}).items()):
        found = incompatible(client, worker)
        found += package_differences(client.get("packages"), (worker or {}).get("packages"))
        if found:
            lines.append(f"worker {name}: " + "; ".join(found))
    return lines
