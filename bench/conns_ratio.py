"""
Tiny-job C{submit} throughput with few against many worker connections,
measured in alternating pairs (issue 18, "Many workers").

Two masters run side by side: one with C{--few} fake worker connections
(L{bench/fake_workers.py}, one slot each), one with C{--many}.  One client
process holds an executor on each and submits C{--warmup} then C{--jobs}
no-op jobs (timed) to one, then the other, C{--pairs} times (the order
alternating), so that both see the same load from the rest of the
machine.  For each it reports the median jobs/s and the median master CPU
seconds per timed run (user + system, from C{/proc}: less noisy than wall
time on a shared machine), the jobs per box of jobs the master sent, and
the ratio of the medians.  (The same masters and fake workers as
C{bench/run.py}'s row: L{systems.FakeCluster}.)  With C{--base
TREE}, two more masters run another cw source tree's code (e.g. a
worktree of C{main}), interleaved with these: a change measured against
its base under the same load.

    python bench/conns_ratio.py --pairs 8 --many 2000 [--base /work/main]
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from systems import FakeCluster  # noqa: E402


def spy_on(spy: str, pid: int, out: str) -> subprocess.Popen:
    """Record C{pid}'s samples with py-spy (raw collapsed stacks) until SIGINT."""
    return subprocess.Popen(
        [spy, "record", "-r", "200", "-f", "raw", "-p", str(pid), "-o", out],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def summary(name: str, few: FakeCluster, many: FakeCluster, jobs: int) -> dict:
    """Medians of C{few} and C{many}, printed and returned."""
    out = {
        side.n: {
            "rate": statistics.median(side.rates),
            "cpu": statistics.median(side.cpu),
            "fake_cpu": statistics.median(side.fake_cpu),
            "client_cpu": statistics.median(side.client_cpu),
            "jobs_per_box": jobs / statistics.median(side.boxes),
            "register_s": side.register_s,
            "rates": side.rates,
            "cpus": side.cpu,
        }
        for side in (few, many)
    }
    ratios = sorted(m / f for f, m in zip(few.rates, many.rates, strict=True))
    a, b = out[few.n], out[many.n]
    print(
        f"{name} median: {few.n}: {a['rate']:,.0f} jobs/s, master {a['cpu']:.2f} s CPU per {jobs:,} jobs;"
        f" {many.n}: {b['rate']:,.0f} jobs/s, master {b['cpu']:.2f} s CPU;"
        f" ratio of medians {b['rate'] / a['rate']:.2f},"
        f" median of pair ratios {statistics.median(ratios):.2f},"
        f" CPU ratio {b['cpu'] / a['cpu']:.2f};"
        f" fake CPU {a['fake_cpu']:.2f} / {b['fake_cpu']:.2f},"
        f" client CPU {a['client_cpu']:.2f} / {b['client_cpu']:.2f};"
        f" jobs per box {a['jobs_per_box']:.1f} / {b['jobs_per_box']:.1f}",
        flush=True,
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, default=5531, help="first port (each master takes the next)")
    parser.add_argument("--few", type=int, default=2)
    parser.add_argument("--many", type=int, default=2000)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument(
        "--warmup", type=int, default=200, help="jobs run untimed just before each timed run (as cw-fake)"
    )
    parser.add_argument(
        "--base", help="another cw source tree: its masters are measured too, interleaved with this one's"
    )
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--spy", help="py-spy executable: record each master's samples while measuring")
    parser.add_argument(
        "--spy-out", default="/tmp/conns-spy", help="py-spy output prefix (raw collapsed stacks)"
    )
    args = parser.parse_args()
    groups = {"this": (FakeCluster(args.port, args.few), FakeCluster(args.port + 1, args.many))}
    if args.base:
        groups["base"] = (
            FakeCluster(args.port + 2, args.few, args.base),
            FakeCluster(args.port + 3, args.many, args.base),
        )
    sides = [side for pair in groups.values() for side in pair]
    spies = []
    try:
        for name, pair in groups.items():
            for side in pair:
                side.start()
                print(f"{name}: {side.n} connections registered in {side.register_s:.1f} s", flush=True)
                if args.spy:
                    spies.append(spy_on(args.spy, side.pid, f"{args.spy_out}-{name}-{side.n}.txt"))
        if spies:
            time.sleep(2)
        for i in range(args.pairs):
            order = sides[i % len(sides) :] + sides[: i % len(sides)]
            if i % 2:
                order.reverse()
            for side in order:
                side.measure(args.jobs, args.warmup)
            print(
                f"round {i}: "
                + "; ".join(
                    f"{name} {side.n}: {side.rates[-1]:,.0f} jobs/s CPU s master {side.cpu[-1]:.2f}"
                    f" fake {side.fake_cpu[-1]:.2f} client {side.client_cpu[-1]:.2f} boxes {side.boxes[-1]}"
                    for name, pair in groups.items()
                    for side in pair
                ),
                flush=True,
            )
        for spy in spies:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
    finally:
        for side in sides:
            side.stop()
    out = {name: summary(name, few, many, args.jobs) for name, (few, many) in groups.items()}
    if args.json:
        Path(args.json).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
