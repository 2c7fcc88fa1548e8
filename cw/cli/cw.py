"""
The C{cw} command: C{cw status [--json]} shows what a master is doing;
C{cw doctor [--json]} checks what may be wrong (L{cw.cli.doctor}).

Layer rule (cw.cli): the top layer; may import any of cw, and nothing in cw imports it.
"""

from __future__ import annotations

import argparse
import json
import sys

from cw.cli import doctor
from cw.cli.common import add_master_options
from cw.client.session import master_status
from cw.discovery import default_host
from cw.errors import CWError
from cw.wire.address import client_description


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    if days:
        return f"{days}d{hours:02d}h{minutes:02d}m"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s"


def _busy(worker: dict) -> int:
    """Slots running a job: the jobs a worker holds, up to its slots."""
    return min(worker["held"], worker["slots"])


def _mib(n: int) -> str:
    return f"{n / (1 << 20):,.1f} MiB"


def format_status(address: str, status: dict) -> str:
    """The human-readable form of a master's status snapshot."""
    workers = status.get("workers", [])
    clients = status.get("clients", [])
    slots = sum(w["slots"] for w in workers)
    busy = sum(_busy(w) for w in workers)
    lines = [
        f"master   {address}",
        f"uptime   {_duration(status.get('uptime', 0))}",
        f"jobs     {status.get('queued', 0):,} queued"
        + (f" ({status['unschedulable']:,} unschedulable)" if status.get("unschedulable") else "")
        + f", {status.get('completed', 0):,} done,"
        f" {status.get('rate', 0.0):,.1f}/s over the last minute",
        f"workers  {len(workers)} ({slots} slots, {busy} busy)",
    ]
    if workers:
        lines.append(f"  {'ID':>4}  {'WORKER':<28} {'SLOTS':>5} {'BUSY':>5} {'DONE':>9} {'FAILED':>7}")
        for w in workers:
            state = " (draining)" if w.get("draining") else ""
            lines.append(
                f"  {w['id']:>4}  {w['peer'] + state:<28} {w['slots']:>5}"
                f" {_busy(w):>5} {w['completed']:>9,} {w.get('failed', 0):>7,}"
            )
    for pool in status.get("pools") or [status.get("pool")]:
        lines += format_pool(pool, status.get("uptime", 0))
    state = status.get("state")
    if state:
        lines.append(
            f"state    {state['path']}: {_mib(state['bytes'])} on disk; {state['stored_results']:,} results"
            f" ({_mib(state['stored_results_bytes'])}) wait for absent clients"
            + (f", {state['dropped_results']:,} dropped" if state.get("dropped_results") else "")
            + (" (WRITES FAIL: see the master's log)" if state.get("failing") else "")
        )
    away = sum(1 for c in clients if c.get("peer") == "away")
    lines.append(f"clients  {len(clients)}" + (f" ({away} away: their jobs wait for them)" if away else ""))
    if status.get("unclaimed_results"):
        # Handed over by workers for clients that have not reconnected (yet).
        lines[-1] += (
            f"; {status['unclaimed_results']:,} results ({status.get('unclaimed_bytes', 0):,} bytes)"
            " kept for clients not back yet"
        )
    if clients:
        lines.append(f"  {'ID':>4}  {'CLIENT':<28} {'QUEUED':>7} {'ON WORKERS':>10} {'DONE':>9}")
        for c in clients:
            lines.append(
                f"  {c['id']:>4}  {c['peer']:<28} {c['queued']:>7,} {c['running']:>10,} {c['completed']:>9,}"
            )
    return "\n".join(lines)


def format_pool(pool: dict | None, uptime: float = 0) -> list[str]:
    """The adaptive pool's lines of the status: its size and its recent decisions, with reasons."""
    if not pool:
        return []
    name = f"{pool['name']}: " if pool.get("name") else ""
    lines = [
        f"pool     {name}target {pool['target']} (min {pool['min_workers']}, max {pool['max_workers']},"
        f" idle timeout {pool['idle_timeout']:g} s): {pool['running']} running, {pool['pending']} pending,"
        f" {pool['draining']} draining"
    ]
    calls = pool.get("calls") or {}
    if calls:
        lines.append("  SLURM calls: " + ", ".join(f"{k} {v}" for k, v in sorted(calls.items())))
    now = pool.get("now")
    for d in pool.get("decisions", []):
        ago = f"{now - d['time']:>6.0f} s ago " if now is not None else ""
        lines.append(f"  {ago}{d['action']}: {d['reason']}")
    return lines


def status_command(args: argparse.Namespace) -> int:
    try:
        host = default_host(args.master)
        status = master_status(
            host, timeout=args.timeout, secret_file=args.secret_file, insecure=args.insecure or None
        )
    except (CWError, TimeoutError, OSError) as e:
        print(f"cw status: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"master": client_description(host), **status}, indent=2))
    else:
        print(format_status(client_description(host), status))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cw", description="Inspect a cw cluster.")
    commands = parser.add_subparsers(dest="command", required=True)
    status = commands.add_parser("status", help="show a master's workers, queue and throughput")
    add_master_options(status, "print the status as JSON, for scripts", "seconds to wait for the master")
    status.set_defaults(func=status_command)
    doctor.add_parser(commands)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
