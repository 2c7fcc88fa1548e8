"""
What a client or worker reports about itself when it registers: Python's
version and implementation and the versions of cw, cloudpickle and Twisted
(L{local_versions}); on request, the versions of other installed packages
(L{package_versions}).  Whether a client and a worker are compatible is the
pure core's decision (L{cw.core.versions}).

The one test hook: C{CW_TEST_WORKER_VERSIONS}, a JSON object, replaces
fields of what a I{worker} reports (L{worker_versions}; clients never read
it), so that tests can make a worker look like one with another Python or
cloudpickle.  It is for cw's own tests only: it makes a worker lie about
itself.

Layer rule (cw.wire): imports Twisted, ampoule, cw.system, cw.core and cw.errors; nothing above.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Iterable, Sequence
from importlib import metadata

import cloudpickle

import twisted

#: The environment variable of the test hook (see the module docstring).
TEST_HOOK = "CW_TEST_WORKER_VERSIONS"


def cw_version() -> str:
    """
    C{cw.__version__}.  The package C{cw} is imported before any of its
    modules, this one included, so it is read from C{sys.modules} rather
    than imported here (an import of C{cw} would count, for the layers'
    check, as one of everything C{cw} itself imports).
    """
    return getattr(sys.modules.get("cw"), "__version__", "unknown")


def local_versions() -> dict[str, str]:
    """This process's versions, as clients and workers report them at registration."""
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "cw": cw_version(),
        "cloudpickle": cloudpickle.__version__,
        "twisted": twisted.__version__,
    }


def worker_versions() -> dict[str, str]:
    """
    What a worker reports: L{local_versions}, with the fields of the test
    hook C{CW_TEST_WORKER_VERSIONS} (a JSON object) put over them.
    """
    versions = local_versions()
    hook = os.environ.get(TEST_HOOK)
    if hook:
        try:
            override = json.loads(hook)
        except ValueError:
            override = None
        if not isinstance(override, dict):
            raise ValueError(f"{TEST_HOOK} must be a JSON object, not {hook!r}")
        versions.update({str(k): str(v) for k, v in override.items()})
    return versions


def package_versions(names: Iterable[str], path: Sequence[str] = ()) -> dict[str, str | None]:
    """
    The installed version of each distribution in C{names} (None: not
    installed), as a job would find it with C{path} in front of this
    process's C{sys.path}.  Read from the packages' metadata: nothing is
    imported, so asking costs nothing and runs no package's code.
    """
    search = [*path, *(p for p in sys.path if p not in path)]
    found: dict[str, str | None] = {}
    for name in names:
        name = str(name)
        found[name] = None
        try:
            for distribution in metadata.distributions(name=name, path=search):
                found[name] = distribution.version
                break
        except Exception:
            pass  # a malformed name or metadata: reported as not installed
    return found


def probe_paths(context: dict) -> dict:
    """
    Whether this process can enter the working directory C{context["cwd"]}
    and sees the C{sys.path} entries C{context["path"]} (entries that exist
    on the asking client): C{{"cwd_error": why not, or None, "missing":
    [entries it cannot see]}}.  A job process of this worker runs as the
    same user with the same view of the filesystem.
    """
    cwd = context.get("cwd") or ""
    cwd_error = None
    if cwd:
        if not os.path.isdir(cwd):
            cwd_error = "no such directory here"
        elif not os.access(cwd, os.X_OK):
            cwd_error = "permission denied"
    missing = [entry for entry in context.get("path", []) if entry and not os.path.exists(entry)]
    return {"cwd_error": cwd_error, "missing": missing}
