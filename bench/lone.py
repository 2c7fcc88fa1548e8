"""
A/B of the lone round trip on a loaded machine (issue 18, item 4).

    python bench/lone.py TREE_A TREE_B [--rounds 5] [--calls 2000]

Each round runs, alternating, one process per tree (with that tree first on
PYTHONPATH) that starts a cw cluster as C{bench/run.py} does (C{cw.mp}, 2
workers, 1 job process each), warms it, then times C{--calls} lone no-op
round trips (submit, wait for the result, repeat) and a burst of 4,000
C{submit}s; ProcessPoolExecutor once per round for comparison.  The no-op
is defined here, in C{__main__}, as C{bench/systems.py} defines its own
when C{bench/run.py} runs it: shipped by value, by the same client path.  Besides
p50/p99/min it reports the CPU time all processes of the cluster spent per
round trip (from /proc), which varies less with other load than times do.
Prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def tree(pid: int) -> list[int]:
    """C{pid} and its descendants."""
    out = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split():
                out += tree(int(child))
    except OSError:
        pass
    return out


def cpu_seconds() -> float:
    """User and system time of this process and its descendants (those alive)."""
    total = 0
    for pid in set(tree(os.getpid())):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / os.sysconf("SC_CLK_TCK")


def noop(x):
    """The job: defined in C{__main__} (this script run with C{--one}), as in C{bench/systems.py}."""
    return x


def one(system: str, calls: int) -> dict:
    sys.path.insert(0, str(HERE))
    import systems

    # Its bursts too (System.submit_all) submit this __main__ function.
    systems.noop = noop

    s = systems.CW(5400 + os.getpid() % 500) if system == "cw" else systems.PPE()
    s.start()
    try:
        s.submit_all(200)
        start = time.perf_counter()
        s.submit_all(4000)
        submit = 4000 / (time.perf_counter() - start)
        times = []
        cpu = cpu_seconds()
        for i in range(calls):
            start = time.perf_counter()
            assert s.call(noop, i) == i
            times.append((time.perf_counter() - start) * 1000)
        cpu = cpu_seconds() - cpu
        times.sort()
        return {
            "p50": round(times[calls // 2], 3),
            "p99": round(times[int(calls * 0.99)], 3),
            "min": round(times[0], 3),
            "cpu_ms": round(cpu * 1000 / calls, 3),
            "submit": round(submit),
        }
    finally:
        s.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("trees", nargs="*")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--one", choices=["cw", "ppe"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.calls)), flush=True)
        return
    for r in range(args.rounds):
        runs = [(t, "cw") for t in args.trees] + [(args.trees[0], "ppe")]
        for path, system in runs:
            env = {**os.environ, "PYTHONPATH": os.path.abspath(path)}
            out = subprocess.run(
                [sys.executable, __file__, "--one", system, "--calls", str(args.calls)],
                env=env,
                cwd=path,
                capture_output=True,
                text=True,
                timeout=600,
            )
            line = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-300:]
            load = os.getloadavg()[0]
            print(json.dumps({"round": r + 1, "tree": path, "system": system, "load1": load, "result": line}))


if __name__ == "__main__":
    main()
