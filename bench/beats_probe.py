"""
What heartbeats cost a master with many worker connections, idle and busy
(issue 18, "Many workers"): master CPU seconds over a window, and the
heartbeats the fake workers (L{bench/fake_workers.py}) received per
connection per heartbeat period, answered or not
(L{cw.core.liveness.Liveness}).

Two masters run side by side, this tree's and C{--base TREE}'s, each with
C{-n} fake connections (L{systems.FakeCluster}); their windows alternate,
C{--rounds} times: C{--window} seconds idle, then as long busy (one client
submitting no-op jobs in rounds of 2,000).

    python bench/beats_probe.py -n 2000 --base /work/main --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from fake_workers import read_heartbeats  # noqa: E402
from systems import FakeCluster, cpu_seconds  # noqa: E402

#: The master's default heartbeat period (cw.core.config), seconds.
PERIOD = 5.0


def window(cluster: FakeCluster, seconds: float, busy: bool) -> dict:
    """Master CPU and heartbeats over C{seconds}, idle or with jobs flowing."""
    asked, notices = read_heartbeats(cluster.fake)
    cpu, fake = cpu_seconds(cluster.pid), cpu_seconds(cluster.fake.pid)
    start = time.monotonic()
    jobs = 0
    while time.monotonic() - start < seconds:
        if busy:
            cluster.run(2000)
            jobs += 2000
        else:
            time.sleep(seconds - (time.monotonic() - start))
    took = time.monotonic() - start
    asked2, notices2 = read_heartbeats(cluster.fake)
    per = cluster.n * took / PERIOD
    return {
        "cpu": cpu_seconds(cluster.pid) - cpu,
        "fake_cpu": cpu_seconds(cluster.fake.pid) - fake,
        "asked": (asked2 - asked) / per,
        "notices": (notices2 - notices) / per,
        "jobs_s": jobs / took,
        "load": os.getloadavg()[0],
        "seconds": took,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=2000)
    parser.add_argument("--base", required=True, help="another cw source tree (e.g. /work/main)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window", type=float, default=15.0)
    parser.add_argument("--port", type=int, default=5710)
    args = parser.parse_args()
    here = str(HERE.parent)
    clusters = {"A": FakeCluster(args.port, args.n, args.base), "B": FakeCluster(args.port + 1, args.n, here)}
    results: dict = {name: {"idle": [], "busy": []} for name in clusters}
    try:
        for cluster in clusters.values():
            cluster.start()
        for r in range(args.rounds):
            order = ["A", "B"] if r % 2 == 0 else ["B", "A"]
            for busy in (False, True):
                for name in order:
                    out = window(clusters[name], args.window, busy)
                    results[name]["busy" if busy else "idle"].append(out)
                    print(name, "busy" if busy else "idle", json.dumps(out), flush=True)
    finally:
        for cluster in clusters.values():
            cluster.stop()
    for name in clusters:
        for kind in ("idle", "busy"):
            rows = results[name][kind]
            print(
                f"{name} {kind}: master CPU median {statistics.median(r['cpu'] for r in rows):.3f} s"
                f" per {args.window:g} s; heartbeats/conn/period asked"
                f" {statistics.median(r['asked'] for r in rows):.2f},"
                f" unanswered {statistics.median(r['notices'] for r in rows):.2f};"
                f" fake CPU {statistics.median(r['fake_cpu'] for r in rows):.3f} s;"
                f" jobs/s {statistics.median(r['jobs_s'] for r in rows):.0f}"
            )


if __name__ == "__main__":
    main()
