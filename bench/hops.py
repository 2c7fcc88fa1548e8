"""
Where a lone job's round trip goes, hop by hop (issue 18, item 4).

    python bench/hops.py [--calls 2000]

Starts a cw cluster as C{bench/run.py} does (C{cw.mp}, 2 workers, 1 job
process each) with a probe in every process (a C{sitecustomize} put on
C{PYTHONPATH}; cw's code is not changed): it timestamps, with the
machine-wide monotonic clock, each read of a socket or pipe, each box
written (C{write_through}, C{write_now}), the setting of a future's result
and each return of a reactor to its poll.  Then it runs C{--calls} lone
no-op round trips (submit, wait for the result, repeat) and prints the
median time line of the round trips that took the most common path: for
each step, its median time from the submit and the median gap from the
step before (time in Python when both ends are in one process, a wake-up
when they are in two).  The probe itself costs a few microseconds per
step.  Other load on the machine shows up in the wake-ups: note the load
average printed.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: Signals that start and stop recording in every process of the cluster.
START, STOP = signal.SIGRTMIN + 2, signal.SIGRTMIN + 3

PROBE = r"""
import importlib.abc, importlib.util, os, signal, sys, threading, time

_events = []
_on = [False]
_OUT = os.environ["CW_HOPS_DIR"]

def ts(tag):
    if _on[0]:
        _events.append((time.monotonic_ns(), tag, threading.get_ident()))

def _start(sig, frame):
    _events.clear()
    _on[0] = True

def _stop(sig, frame):
    _on[0] = False
    with open(os.path.join(_OUT, f"{os.getpid()}.txt"), "w") as f:
        f.writelines(f"{t} {tag} {thread}\n" for t, tag, thread in _events)

def _wrap(owner, name, tag):
    original = getattr(owner, name, None)
    if original is None:
        return
    def probed(*args, **kwargs):
        ts(tag + ">")
        try:
            return original(*args, **kwargs)
        finally:
            ts(tag + "<")
    setattr(owner, name, probed)

def _probe(name, module):
    if name == "twisted.internet.tcp":
        _wrap(module.Connection, "doRead", "read")
    elif name in ("twisted.internet.epollreactor", "twisted.internet.selectreactor"):
        for cls in vars(module).values():
            if isinstance(cls, type) and "doIteration" in vars(cls):
                _wrap(cls, "doIteration", "poll")
    elif name == "cw.wire.private":
        _wrap(module, "write_through", "write")
        _wrap(module, "write_now", "write")
    elif name == "cw.worker.pipes":
        _wrap(module, "_do_read", "read")
    elif name == "concurrent.futures._base":
        _wrap(module.Future, "set_result", "set_result")

_WATCHED = {"twisted.internet.tcp", "twisted.internet.epollreactor", "twisted.internet.selectreactor",
            "cw.wire.private", "cw.worker.pipes", "concurrent.futures._base"}

class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in _WATCHED:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module
        def exec_module(module):
            execute(module)
            _probe(name, module)
        spec.loader.exec_module = exec_module
        return spec

signal.signal(%(start)d, _start)
signal.signal(%(stop)d, _stop)
for _name in _WATCHED:
    if _name in sys.modules:
        _probe(_name, sys.modules[_name])
sys.meta_path.insert(0, _Finder())
"""


def noop(x):
    """The job: defined in C{__main__}, as in C{bench/systems.py}."""
    return x


def descendants(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split():
            out += [int(child), *descendants(int(child))]
    return out


def record(calls: int) -> dict[int, str]:
    """Run the cluster and the round trips; return the role of each process by pid."""
    sys.path.insert(0, str(HERE))
    import systems

    systems.noop = noop
    import sitecustomize  # the probe, on PYTHONPATH (see main)

    cluster = systems.CW(5400 + os.getpid() % 500)
    cluster.start()
    try:
        cluster.submit_all(200)
        for i in range(300):
            cluster.call(noop, i)
        roles = {os.getpid(): "client"}
        for role, pids in systems.cluster_pids(cluster.port).items():
            for pid in pids:
                roles[pid] = f"{role}{pid}"
                for child in descendants(pid):
                    roles[child] = f"{role}{pid}.job"
        for pid in roles:
            os.kill(pid, START)
        time.sleep(0.3)
        for i in range(calls):
            sitecustomize.ts("CALL>")
            cluster.call(noop, i)
            sitecustomize.ts("CALL<")
        time.sleep(0.3)
        for pid in roles:
            os.kill(pid, STOP)
        time.sleep(1)
        return roles
    finally:
        cluster.stop()


def timeline(directory: str, roles: dict[int, str]) -> None:
    events = []
    threads: dict[str, str] = {}
    for name in os.listdir(directory):
        if not name.endswith(".txt"):
            continue
        role = roles.get(int(name[:-4]), name[:-4])
        for line in Path(directory, name).read_text().splitlines():
            t, tag, thread = line.split()
            who = role
            if role == "client":
                who = threads.setdefault(thread, f"client.thread{len(threads)}")
            events.append((int(t), who, tag))
    events.sort()
    trips, current = [], None
    for event in events:
        if event[2] == "CALL>":
            current = [event]
        elif current is not None:
            current.append(event)
            if event[2] == "CALL<":
                trips.append(current)
                current = None
    paths = collections.Counter(tuple(e[1:] for e in trip) for trip in trips)
    path, count = paths.most_common(1)[0]
    same = [trip for trip in trips if tuple(e[1:] for e in trip) == path]
    print(f"{len(trips)} round trips; {count} took the most common path:")
    print(f"{'at us':>8} {'gap us':>8}  step")
    for i, (who, tag) in enumerate(path):
        at = statistics.median((trip[i][0] - trip[0][0]) / 1000 for trip in same)
        gap = statistics.median((trip[i][0] - trip[i - 1][0]) / 1000 for trip in same) if i else 0
        print(f"{at:8.1f} {gap:8.1f}  {who} {tag}")
    total = sorted((trip[-1][0] - trip[0][0]) / 1000 for trip in trips)
    print(f"round trip p50 {total[len(total) // 2]:.0f} us (with the probe)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--record", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.record:
        roles = record(args.calls)
        Path(args.record, "roles.json").write_text(json.dumps(roles))
        return
    import subprocess

    with tempfile.TemporaryDirectory() as directory:
        Path(directory, "sitecustomize.py").write_text(PROBE % {"start": START, "stop": STOP})
        env = dict(os.environ, CW_HOPS_DIR=directory)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (directory, env.get("PYTHONPATH")) if p)
        print(f"load average {os.getloadavg()[0]:.2f}")
        subprocess.run(
            [sys.executable, __file__, "--calls", str(args.calls), "--record", directory], env=env, check=True
        )
        recorded = json.loads(Path(directory, "roles.json").read_text())
        roles = {int(pid): role for pid, role in recorded.items()}
        timeline(directory, roles)


if __name__ == "__main__":
    main()
