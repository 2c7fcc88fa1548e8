"""
cw against its peers on this machine, in one run: one command, one table.

    pip install -e '.[bench]'
    python bench/run.py            # full run (about 10 minutes on 2 cores)
    python bench/run.py --quick    # fewer jobs, one round (about 3 minutes)
    python bench/run.py --only cw,dask --quick

Systems, each with 2 worker processes: cw (a local master and two one-slot
workers, L{cw.mp}), cw-remote (the same, its client playing a process on
another machine, so that payloads take the sockets through the master
rather than the same-machine shared-memory shortcut),
C{concurrent.futures.ProcessPoolExecutor(2)}, Dask
distributed (C{LocalCluster(n_workers=2, threads_per_worker=1)}), Ray
(C{ray.init(num_cpus=2)}) and ipyparallel (C{Cluster(n=2)}).  A system that
is not installed is reported as such.  Each round starts every system afresh
in its own process (L{bench/systems.py}), measures it and stops it; rounds
alternate the order of the systems, and the table keeps each system's best
round.  Then two cw-only scenarios run once: 1,000,000 jobs queued on a
master with no worker (its peak RSS, then the drain once two workers join),
and two masters side by side, with 2 and with 200 (C{--connections}) fake
worker connections (L{bench/fake_workers.py}), measured in alternating
pairs of runs (C{--fake-pairs}) so that a loaded machine shows as a spread
of the pairs' ratios rather than as one low ratio.

The table is printed as markdown; a full run also writes it, with the date
and the machine, to C{bench/RESULTS.md} (C{--results PATH} to choose): as
the first section under the title, above the earlier runs, which stay.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/systems.py, also when loaded by a test
from systems import PAYLOAD_CALLS, own_machines_rate  # noqa: E402 (one count for the rows and the runs)

HERE = Path(__file__).resolve().parent
PEERS = ["cw-remote", "ppe", "dask", "ray", "ipp"]
SYSTEMS = ["cw", *PEERS]
TITLES = {
    "cw": "cw",
    "cw-remote": "cw, client on another machine",
    "ppe": "ProcessPool",
    "dask": "Dask",
    "ray": "Ray",
    "ipp": "ipyparallel",
}

#: (key, label, unit, higher is better, decimals)
#: How the big-payload rows are made (bench/systems.py measure).
MEDIAN = f"(median of {PAYLOAD_CALLS} calls)"

COMMON_ROWS = [
    ("submit", "{jobs} no-op jobs, `submit` one by one, then wait", "jobs/s", True, 0),
    ("map", "{jobs} no-op jobs, `map` (ProcessPool, ipyparallel: chunksize=1)", "jobs/s", True, 0),
    ("map100", "{map_items} no-op calls, `map` chunksize=100", "calls/s", True, 0),
    ("map_auto", '{map_items} no-op calls, `map` chunksize="auto" (cw only)', "calls/s", True, 0),
    ("lat_p50", "round trip of a lone no-op job ({latency} in a row), p50", "ms", False, 2),
    ("lat_p99", "round trip of a lone no-op job ({latency} in a row), p99", "ms", False, 2),
    ("arg", "one job with a {payload} MB argument " + MEDIAN, "MB/s", True, 0),
    ("res", "one job with a {payload} MB result " + MEDIAN, "MB/s", True, 0),
    ("medium_submit", "{medium} jobs of a 1 MB NumPy array each (its sum), `submit`", "jobs/s", True, 0),
    ("medium_map", "{medium} jobs of a 1 MB NumPy array each (its sum), `map`", "jobs/s", True, 0),
]

PACKAGES = [
    "cw",
    "twisted",
    "ampoule",
    "cloudpickle",
    "crochet",
    "cryptography",
    "dask",
    "distributed",
    "ray",
    "ipyparallel",
    "pyzmq",
    "tornado",
    "psutil",
]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_child(kind: str, options: list[str], timeout: float, port: int) -> dict:
    """Run C{bench/systems.py KIND} in its own process; its figures, or an error."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    cmd = [sys.executable, str(HERE / "systems.py"), kind, "--out", str(out), "--port", str(port), *options]
    start = time.monotonic()
    child = subprocess.Popen(cmd, start_new_session=True)
    try:
        child.wait(timeout)
    except subprocess.TimeoutExpired:
        log(f"{kind}: still running after {timeout:.0f} s; stopping it")
        child.send_signal(signal.SIGTERM)  # it stops what it started, then exits
        try:
            child.wait(120)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    except BaseException:
        child.send_signal(signal.SIGTERM)
        child.wait(120)
        raise
    finally:
        try:
            result = json.loads(out.read_text())
        except (OSError, ValueError):
            result = {}
        out.unlink(missing_ok=True)
    if child.returncode != 0 and "error" not in result:
        result["error"] = f"exited with code {child.returncode}"
    result.setdefault("system", kind)
    result["wall_s"] = time.monotonic() - start
    return result


def best_of(rounds: list[dict]) -> dict:
    """Best figure of each kind over the rounds (latency: the round with the lowest p50)."""
    good = [r for r in rounds if "error" not in r]
    if not good:
        return {"error": rounds[-1].get("error", "failed") if rounds else "not run"}
    best = {}
    for key, _, _, higher, _ in COMMON_ROWS:
        values = [r[key] for r in good if key in r]
        if values and not key.startswith("lat_"):
            best[key] = max(values) if higher else min(values)
    with_lat = [r for r in good if "lat_p50" in r]
    if with_lat:
        fastest = min(with_lat, key=lambda r: r["lat_p50"])
        best["lat_p50"], best["lat_p99"] = fastest["lat_p50"], fastest["lat_p99"]
    best["rounds"] = len(good)
    if len(good) < len(rounds):
        best["note"] = f"{len(rounds) - len(good)} round(s) failed: {rounds[0].get('error', '?')}"
    return best


def fmt(value, decimals: int) -> str:
    if value is None:
        return "n/a"
    if decimals == 0:
        return f"{value:,.0f}"
    return f"{value:,.{decimals}f}"


def ratio(cw_value, peer_value) -> str:
    if cw_value is None or peer_value in (None, 0):
        return ""
    return f"{cw_value / peer_value:.2f}"


def table(results: dict, systems: list[str], extra: dict, sizes: dict) -> str:
    peers = [s for s in systems if s != "cw"]
    heads = ["measure", "unit", "better"] + [TITLES[s] for s in systems]
    if "cw" in systems:
        heads += [f"cw / {TITLES[p]}" for p in peers]
    lines = ["| " + " | ".join(heads) + " |", "|" + "|".join(["---"] * 3 + ["--:"] * (len(heads) - 3)) + "|"]

    def value(system: str, key: str):
        return results.get(system, {}).get(key)

    for key, label, unit, higher, decimals in COMMON_ROWS:
        if not any(value(s, key) is not None for s in systems):
            continue
        cells = [label.format(**sizes), unit, "higher" if higher else "lower"]
        for s in systems:
            r = results.get(s, {})
            if "error" in r:
                cells.append("n/a")
            else:
                cells.append(fmt(value(s, key), decimals))
        if "cw" in systems:
            cw_value = value("cw", key)
            cells += [ratio(cw_value, value(p, key)) for p in peers]
        lines.append("| " + " | ".join(cells) + " |")
    for label, unit, higher, text in extra.get("rows", []):
        cells = [label, unit, "higher" if higher else "lower", text] + ["n/a"] * (len(systems) - 1)
        if "cw" in systems:
            cells += [""] * len(peers)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: Where the client of the big-payload rows runs: cw-big's on the workers'
#: machine, cw-big-remote's playing another machine (see bench/systems.py).
BIG_WHERE = {"cw-big": "", "cw-big-remote": ", client on another machine"}

#: The processes whose CPU per GB the between-machines big rows give (bench/systems.py cpu_during).
CPU_ROLES = {"master": "master", "worker": "worker", "job": "job process", "client": "client"}


def cw_only_rows(queue: dict | None, fake: dict | None, bigs: dict[str, dict]) -> list[tuple]:
    rows = []
    for scenario, big in bigs.items():
        where = BIG_WHERE[scenario]
        if "error" in big:
            rows.append(
                (
                    f"one job with a big argument, one with a big result{where}",
                    "",
                    True,
                    f"failed: {big['error']}",
                )
            )
        else:
            size = f"{big['big'] / 1e9:g} GB"
            for key, what in (("big_arg", "argument"), ("big_res", "result")):
                rows.append((f"one job with a {size} {what}{where}", "MB/s", True, fmt(big[key], 0)))
                peaks = big.get(f"{key}_peaks", {})
                for role in ("master", "worker"):
                    if role in peaks:
                        rows.append(
                            (
                                f"... {role}'s peak RSS (VmHWM) during it; copies of the payload above"
                                " its RSS before",
                                "MiB",
                                False,
                                f"{peaks[role]['peak_mb']:,.0f}; {peaks[role]['copies']:.2f}",
                            )
                        )
                cpu = big.get(f"{key}_cpu")
                if cpu and where:
                    rows += [
                        (
                            "... CPU per GB of the busiest process of each role: "
                            + "; ".join(CPU_ROLES[role] for role in CPU_ROLES)
                            + "; all processes",
                            "s",
                            False,
                            "; ".join(fmt(cpu[role], 2) for role in [*CPU_ROLES, "total"]),
                        ),
                        (
                            "... rate if each process had a machine of its own (1 / the most CPU per GB"
                            " of one process)",
                            "MB/s",
                            True,
                            fmt(own_machines_rate(cpu), 0),
                        ),
                    ]
    if queue is not None:
        if "error" in queue:
            rows.append(("1M queued jobs (master alone)", "", False, f"failed: {queue['error']}"))
        else:
            n = queue["queued"]
            rows += [
                (
                    f"{n:,} queued no-op jobs, no worker: master peak RSS (VmHWM)",
                    "MiB",
                    False,
                    fmt(queue["master_hwm_mb"], 0),
                ),
                (
                    f"... master RSS growth per queued job (payload {queue['job_bytes']} B, f by value)",
                    "bytes",
                    False,
                    fmt(queue["master_bytes_per_job"], 0),
                ),
                (
                    "... client (ClientThread, counting callback): submit time",
                    "s",
                    False,
                    fmt(queue["submit_s"], 1),
                ),
                (
                    "... client peak RSS once all are queued",
                    "MiB",
                    False,
                    fmt(queue["client_peak_mb_queued"], 0),
                ),
                (
                    "... drain once 2 workers join (from their start)",
                    "s",
                    False,
                    fmt(queue["drain_s"], 1) + (" (incomplete)" if queue.get("drain_incomplete") else ""),
                ),
                ("... drain rate", "jobs/s", True, fmt(queue["drain_rate"], 0)),
            ]
    if fake is not None:
        rows += fake_rows(fake)
    return rows


def median(values: list[float]) -> float:
    """The median of C{values} (the mean of the middle two for an even count)."""
    values = sorted(values)
    half = len(values) // 2
    return values[half] if len(values) % 2 else (values[half - 1] + values[half]) / 2


def fake_rows(fake: dict) -> list[tuple]:
    """
    The rows of the fake-worker scenario (L{bench/systems.py}'s C{cw_fake}):
    a master with 2 connections and one with many, their runs alternating
    in pairs.  Medians of each, the median of the pairs' ratios (its range
    too: a machine loaded unevenly shows as a wide range), and what a job
    cost the master in CPU and boxes, which the load changes less.
    """
    if "error" in fake:
        return [("fake worker connections", "", True, f"failed: {fake['error']}")]
    few, many = fake["few"], fake["many"]
    n, jobs, pairs = many["connections"], fake["jobs"], fake["pairs"]
    both = f"{few['connections']:,} / {n:,} connections"

    def per_side(values) -> str:
        return " / ".join(values(side) for side in (few, many))

    ratios = fake["ratios"]
    rows = [
        (
            f"{jobs:,} no-op jobs, `submit`, {few['connections']:,} fake worker connections"
            f" (median of {pairs} runs alternating with {n:,})",
            "jobs/s",
            True,
            fmt(median(few["rates"]), 0),
        ),
        (
            f"... {n:,} fake worker connections (median of {pairs}, alternating)",
            "jobs/s",
            True,
            fmt(median(many["rates"]), 0),
        ),
        (
            f"... {n:,} against {few['connections']:,} connections: median of the {pairs} pairs' ratios"
            " (lowest-highest)",
            "ratio",
            True,
            f"{median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})",
        ),
        (
            f"... master CPU per 1,000 jobs, {both} (medians)",
            "ms",
            False,
            per_side(lambda side: f"{1000 * median(side['cpu_s']) / jobs * 1000:.1f}"),
        ),
        (
            f"... jobs per box the master sent, {both} (medians)",
            "jobs",
            True,
            per_side(lambda side: f"{jobs / median(side['boxes']):.0f}"),
        ),
    ]
    if few.get("lat_p50") is not None:
        rows.append(
            (
                f"... round trip of a lone no-op job, {both}, p50; p99",
                "ms",
                False,
                per_side(lambda side: f"{side['lat_p50']:.2f}; {side['lat_p99']:.2f}"),
            )
        )
    return rows


def targets(results: dict, queue: dict | None, bigs: dict[str, dict], fake: dict | None = None) -> list[str]:
    cw = results.get("cw", {})
    out = []

    def check(text: str, ok: bool | None, detail: str) -> None:
        mark = "n/a" if ok is None else ("met" if ok else "**missed**")
        out.append(f"- {text}: {mark} ({detail})")

    def pair(key: str, peer: str):
        a, b = cw.get(key), results.get(peer, {}).get(key)
        return (a / b) if a is not None and b else None

    for peer, factor in (("dask", 5), ("ray", 3)):
        r = pair("submit", peer)
        check(
            f"`submit` at least {factor}x {TITLES[peer]}",
            None if r is None else r >= factor,
            "not measured" if r is None else f"{r:.2f}x",
        )
    r = pair("map", "ppe")
    check(
        "`map` at least as fast as `ProcessPoolExecutor.map(chunksize=1)`",
        None if r is None else r >= 1,
        "not measured" if r is None else f"{r:.2f}x",
    )
    p50 = cw.get("lat_p50")
    check(
        "lone no-op round trip p50 under 1 ms",
        None if p50 is None else p50 < 1,
        "not measured" if p50 is None else f"{p50:.2f} ms",
    )
    p99 = cw.get("lat_p99")
    check(
        "lone no-op round trip p50 at most 0.6 ms and p99 at most 1.5 ms (issue 18)",
        None if p50 is None or p99 is None else (p50 <= 0.6 and p99 <= 1.5),
        "not measured" if p50 is None or p99 is None else f"p50 {p50:.2f} ms, p99 {p99:.2f} ms",
    )
    for key, what in (("arg", "argument"), ("res", "result")):
        r = pair(key, "ray")
        check(
            f"one job with a big {what} at least Ray's rate (issue 18)",
            None if r is None else r >= 1,
            "not measured" if r is None else f"{r:.2f}x",
        )
    for key, peer, how in (("medium_submit", "ray", "`submit`"), ("medium_map", "ppe", "`map`")):
        r = pair(key, peer)
        check(
            f"1 MB NumPy jobs with {how} at least {TITLES[peer]}'s rate (issue 18)",
            None if r is None else r >= 1,
            "not measured" if r is None else f"{cw[key]:,.0f} jobs/s, {r:.2f}x",
        )
    measured = {scenario: big for scenario, big in bigs.items() if "error" not in big}
    for scenario, big in measured.items():
        where = BIG_WHERE[scenario]
        mb = big["big"] / 1e6
        both = 2 * mb / (mb / big["big_arg"] + mb / big["big_res"])
        check(
            f"{mb / 1000:g} GB argument and {mb / 1000:g} GB result at 200 MB/s or more{where}",
            both >= 200,
            f"{both:,.0f} MB/s over both jobs",
        )
        for key, what in (("big_arg", "argument"), ("big_res", "result")):
            peaks = big.get(f"{key}_peaks", {})
            copies = {role: peaks[role]["copies"] for role in ("master", "worker") if role in peaks}
            cpu = big.get(f"{key}_cpu")
            bound = ""
            if cpu and where:
                busiest = max(CPU_ROLES, key=lambda role: cpu[role])
                bound = (
                    f"; CPU {cpu['total']:.2f} s per GB in all, the {CPU_ROLES[busiest]} {cpu[busiest]:.2f}"
                    f" at most: {own_machines_rate(cpu):,.0f} MB/s with a machine each"
                )
            check(
                f"{mb / 1000:g} GB {what} at 600 MB/s or more, the master and the worker each peaking at"
                f" no more than one copy{where} (issue 18)",
                big[key] >= 600 and len(copies) == 2 and max(copies.values()) <= 1,
                f"{big[key]:,.0f} MB/s; copies: "
                + ", ".join(f"{r} {c:.2f}" for r, c in copies.items())
                + bound,
            )
    if not measured:
        check("1 GB argument round trip at 200 MB/s or more", None, "not measured: --big, on in a full run")
    m100, p100 = cw.get("map100"), results.get("ppe", {}).get("map100")
    check(
        "`map(chunksize=100)` at least 300,000 calls/s and 0.4x `ProcessPoolExecutor.map(chunksize=100)`"
        " (issue 18)",
        None if m100 is None or p100 is None else (m100 >= 300_000 and m100 >= 0.4 * p100),
        "not measured" if m100 is None or p100 is None else f"{m100:,.0f} calls/s, {m100 / p100:.2f}x",
    )
    if fake is not None and "error" not in fake:
        ratio = median(fake["ratios"])
        check(
            f"`submit` with {fake['connections']:,} fake worker connections at least 80% of that with 2"
            f" (issue 18; median of {fake['pairs']} alternating pairs)",
            ratio >= 0.8,
            f"{ratio:.2f}",
        )
    if queue is not None and "error" not in queue:
        check(
            f"master peak RSS at most 250 MiB with {queue['queued']:,} jobs of one function queued"
            " (issue 18)",
            queue["master_hwm_mb"] <= 250,
            f"{queue['master_hwm_mb']:,.0f} MiB",
        )
        check(
            f"master RSS under 1 GB with {queue['queued']:,} jobs queued",
            queue["master_hwm_mb"] < 1024,
            f"{queue['master_hwm_mb']:,.0f} MiB",
        )
    else:
        check("master RSS under 1 GB with 1,000,000 jobs queued", None, "not measured")
    return out


#: The first line of C{bench/RESULTS.md}; each run is a section (C{## ...}) below it.
TITLE = "# cw benchmark"


def with_new_run(old: str, section: str) -> str:
    """
    The text of a results file (C{old}: its earlier runs, possibly empty)
    with the run C{section} first under the title, and everything that
    was there before kept below it, so a full run adds to the record
    rather than replacing it.
    """
    lines = old.splitlines()
    if lines and lines[0].strip() == TITLE:
        lines = lines[1:]
    earlier = "\n".join(lines).strip("\n")
    parts = [TITLE, section.strip("\n")] + ([earlier] if earlier else [])
    return "\n\n".join(parts) + "\n"


def machine(load_before: tuple) -> list[str]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = []
    for name in PACKAGES:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    try:
        commit = subprocess.run(
            ["git", "-C", str(HERE.parent), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "?"
    try:
        memory = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        )
    except (OSError, StopIteration):
        memory = "?"
    try:
        uname = subprocess.run(["uname", "-a"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        uname = " ".join(platform.uname())
    try:
        lines = subprocess.run(
            ["git", "-C", str(HERE.parent), "status", "--porcelain", "--", "cw"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.splitlines()
        changed = sum(1 for line in lines if line[:2] != "??")
        added = sum(1 for line in lines if line[:2] == "??")
        dirty = [f"{changed} changed and {added} new files in cw/, uncommitted"] if lines else []
    except (OSError, subprocess.SubprocessError):
        dirty = []
    if dirty:
        commit = f"{commit} ({dirty[0]})"
    return [
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- Machine: `{uname}`",
        f"- CPU: {cpu}; {os.cpu_count()} cores; memory {memory}",
        f"- Python {platform.python_version()} ({sys.executable})",
        f"- Packages: {', '.join(versions)}",
        f"- cw source: git {commit or '?'}",
        "- Load average (1, 5, 15 min) at the start: %s; at the end: %s"
        % (" ".join(f"{x:.2f}" for x in load_before), " ".join(f"{x:.2f}" for x in os.getloadavg())),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2,000 jobs, 1 round, 100,000 queued")
    parser.add_argument("--only", default=",".join(SYSTEMS), help="systems to run, e.g. cw,dask")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of the common measures (2)")
    parser.add_argument("--jobs", type=int, default=None, help="jobs per throughput measure (20,000)")
    parser.add_argument("--latency", type=int, default=None, help="sequential round trips (1,000)")
    parser.add_argument("--payload", type=int, default=50_000_000, help="bytes of the big argument/result")
    parser.add_argument("--medium", type=int, default=1_000, help="jobs of a 1 MB NumPy array (0: skip)")
    parser.add_argument("--queued", type=int, default=None, help="jobs queued on a lone master (1,000,000)")
    parser.add_argument("--connections", type=int, default=200, help="fake worker connections (200)")
    parser.add_argument(
        "--fake-pairs",
        type=int,
        default=3,
        help="alternating runs of 2 and --connections fake connections (3)",
    )
    parser.add_argument("--big", type=int, default=None, help="bytes of cw's big payload (1e9; 0: skip)")
    parser.add_argument("--no-cw-extra", action="store_true", help="skip the queue and fake-worker scenarios")
    parser.add_argument("--port", type=int, default=5499, help="port of the benchmark's cw master")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one system's round may take")
    parser.add_argument("--results", default=None, help="write the report here (full run: bench/RESULTS.md)")
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="cw without authentication and MACs (--insecure), to measure what they cost",
    )
    parser.add_argument(
        "--state",
        action="store_true",
        help="cw's master with a state file (--state, the durable queue), to measure what it costs",
    )
    args = parser.parse_args()

    quick = args.quick
    rounds = args.rounds or (1 if quick else 2)
    jobs = args.jobs or (2_000 if quick else 20_000)
    latency = args.latency or (200 if quick else 1_000)
    queued = args.queued or (100_000 if quick else 1_000_000)
    big_size = args.big if args.big is not None else (0 if quick else 1_000_000_000)
    systems = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    systems = [s for s in SYSTEMS if s in systems]
    results_path = args.results
    if results_path is None and not quick and set(systems) == set(SYSTEMS):
        results_path = str(HERE / "RESULTS.md")

    # A private run directory and secret, inherited by every process started below.
    workdir = Path(tempfile.mkdtemp(prefix="cw-bench-"))
    secret = workdir / "secret"
    secret.write_text(secrets.token_hex(32) + "\n")
    secret.chmod(0o600)
    os.environ["CW_RUN_DIR"] = str(workdir / "run")
    os.environ["CW_SECRET_FILE"] = str(secret)
    os.environ.pop("CW_INSECURE", None)
    if args.insecure:
        os.environ["CW_INSECURE"] = "1"
    os.environ.pop("CW_BENCH_STATE", None)
    if args.state:
        os.environ["CW_BENCH_STATE"] = str(workdir / "state.db")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    common = ["--jobs", str(jobs), "--latency", str(latency), "--payload", str(args.payload)]
    common += ["--medium", str(args.medium)]
    rounds_by_system: dict[str, list[dict]] = {s: [] for s in systems}
    queue = None
    bigs: dict[str, dict] = {}
    fake: dict | None = None
    started = time.monotonic()
    load_before = os.getloadavg()
    failed = False
    try:
        for r in range(rounds):
            order = systems if r % 2 == 0 else systems[::-1]
            for s in order:
                log(f"round {r + 1}/{rounds}: {s}")
                result = run_child(s, common, args.timeout, args.port)
                rounds_by_system[s].append(result)
                if "error" in result:
                    log(f"{s}: {result['error']}")
                else:
                    log(
                        f"{s}: "
                        + ", ".join(
                            f"{k} {v:,.2f}"
                            for k, v in result.items()
                            if isinstance(v, float) and k != "wall_s"
                        )
                    )
        if "cw" in systems and not args.no_cw_extra:
            log(f"cw: 2 and {args.connections} fake worker connections, {args.fake_pairs} alternating pairs")
            fake = run_child(
                "cw-fake",
                ["--jobs", str(jobs), "--connections", str(args.connections), "--latency", str(latency)]
                + ["--pairs", str(args.fake_pairs)],
                args.timeout,
                args.port,
            )
            log(f"cw-fake: {fake}")
            log(f"cw: {queued:,} jobs queued on a master alone, then 2 workers")
            queue = run_child("cw-queue", ["--queued", str(queued)], max(args.timeout, 1500), args.port)
            log(f"cw-queue: {queue}")
            if big_size:
                log(f"cw: one job with a {big_size:,}-byte argument, one with such a result")
                for scenario in BIG_WHERE:
                    bigs[scenario] = run_child(scenario, ["--big", str(big_size)], args.timeout, args.port)
                    log(f"{scenario}: {bigs[scenario]}")
    except BaseException:
        failed = True
        raise
    finally:
        import cw.mp

        cw.mp.stop(port=args.port)  # in case a child could not stop its cluster
        if failed:
            log(f"logs of the cw processes kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    results = {s: best_of(rs) for s, rs in rounds_by_system.items()}
    extra = {"rows": cw_only_rows(queue, fake, bigs)}
    sizes = {
        "jobs": f"{jobs:,}",
        "map_items": f"{10 * jobs:,}",  # bench/systems.py's CHUNKED_MAP_FACTOR
        "latency": f"{latency:,}",
        "payload": f"{args.payload / 1e6:g}",
        "medium": f"{args.medium:,}",
    }
    text = table(results, systems, extra, sizes)
    minutes = (time.monotonic() - started) / 60
    notes = []
    for s in systems:
        r = results[s]
        if "error" in r:
            notes.append(f"- {TITLES[s]}: n/a: {r['error']}")
        elif "note" in r:
            notes.append(f"- {TITLES[s]}: {r['note']}")
    command = " ".join(["python", "bench/run.py", *sys.argv[1:]])
    report = [
        f"## {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC: `{command}`",
        "",
        f"`{command}`: {', '.join(TITLES[s] for s in systems)},"
        f" each with 2 worker processes; best of {rounds} round(s), systems alternating; {minutes:.1f} min.",
        "",
        *machine(load_before),
        "",
        text,
        "",
        "Ratios are cw's figure divided by the peer's, from the same run: for a \"higher\" row above 1"
        ' means cw is faster, for a "lower" row below 1 means cw is better.',
        "",
    ]
    if notes:
        report += ["Not measured:", "", *notes, ""]
    if max(load_before[0], os.getloadavg()[0]) > 1:
        report += [
            "Other work ran on the machine during this run (see the load averages): a round's figures"
            " can be off by tens of percent; compare the ratios of one run rather than figures across runs.",
            "",
        ]
    if "cw" in systems:
        report += ["Targets (issues 3 and 18):", "", *targets(results, queue, bigs, fake), ""]
    report += [
        "How: every round starts each system afresh in its own process (`bench/systems.py`), warms it"
        " up with 200 jobs, then runs the measures in the order of the rows; the job function is"
        " defined in the benchmark script, so cw, Dask, Ray and ipyparallel ship it by value as they"
        " would a user's function (ProcessPoolExecutor forks and ships it by name).  Dask jobs use"
        " `pure=False`; Ray's `map` is the same remote calls as its `submit`.  The big arguments are"
        " random bytes passed to `len`; the big results are `bytes(n)`; a 50 MB row is the median"
        f" rate of {PAYLOAD_CALLS} calls, argument and result calls alternating.  cw-only rows, each on"
        " a fresh cluster: the 1 GB jobs (the client on the workers' machine, then playing one on another"
        " machine, `CW_MACHINE_IDENTITY`, so that the payloads cross the sockets through the master,"
        " as the cw-remote column's do); a master started alone that gets the queued jobs from one"
        " `ClientThread` whose callback only counts (peak RSS from `VmHWM` in"
        " `/proc/<master pid>/status`, growth measured from the idle master), then two one-slot"
        " workers join; two masters side by side, one with 2 and one with many fake worker connections"
        " (`bench/fake_workers.py`: the real handshake and protocol, every job answered at once and"
        " never run), whose round trip is cw's without a worker's job process: their runs alternate in"
        " pairs, each after 200 untimed jobs, and the master's CPU is its user + system time from"
        " `/proc/<pid>/stat` over the run.  The 1 MB jobs each get an array of their own (float64, made"
        " before the clock starts) and return its sum.  The peak RSS of the 1 GB rows is each"
        " process's `VmHWM`, reset before each job (`/proc/<pid>/clear_refs`), and the copies are its"
        " growth over its RSS before the job, in payloads.  The CPU per GB of the between-machines 1 GB rows"
        " is each process's user and system time during the job (`/proc/<pid>/stat`; the client's own),"
        " the busiest process of each role; the rate with a machine each is 1 GB over the largest of them"
        " (a perfect pipeline, the network no bound): what bounds the rate on real machines.",
        "",
    ]
    output = "\n".join(report)
    print(output)
    if results_path:
        path = Path(results_path)
        path.write_text(with_new_run(path.read_text() if path.exists() else "", output))
        log(f"written to {results_path}, above the earlier runs")


if __name__ == "__main__":
    main()
