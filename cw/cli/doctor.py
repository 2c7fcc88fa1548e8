"""
C{cw doctor [--master ADDRESS] [--json]}: what is wrong, and what to do.

Each check is a function returning a L{Check} (one line: OK or the
problem, and what to do about it); the judgments are pure functions of
what was observed (L{judge_clock}, L{judge_versions}, L{judge_paths},
L{judge_slurm}, ...), unit-tested without a cluster.  In order:

  - the secret file: exists, mode, owner (L{cw.wire.secret}'s checks);
  - the master: how its address was found (L{cw.discovery.locate_master}),
    that the name resolves, that something listens there, and that it
    authenticates with this secret;
  - clocks: the master's (from its status) and the workers' against this
    machine's;
  - workers: how many; their versions against this client's
    (L{cw.core.versions}); whether each can enter this directory and sees
    this C{sys.path} (asked of every worker, L{P.Probe}); and a tiny probe
    job that runs here-and-back;
  - SLURM, when it is in use: the controller answers, this user's cw jobs
    and their states, the master job's log.

The exit status is 0 only when every check passed (skipped ones aside).

Layer rule (cw.cli): the top layer; may import any of cw, and nothing in cw imports it.
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from concurrent import futures
from typing import Any

from cw import discovery
from cw.cli.common import add_master_options
from cw.client import ClusterExecutor
from cw.client.session import client_context
from cw.core.versions import incompatible, short
from cw.errors import CWError, SecretError
from cw.wire.address import client_description
from cw.wire.secret import load_secret, secret_path
from cw.wire.versions import local_versions

#: Clocks further apart than this (beyond what the round trip leaves unknown) are a problem.
MAX_SKEW = 1.0

#: SLURM job states that say a cw job ended badly.
BAD_END_STATES = frozenset({"BOOT_FAIL", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "TIMEOUT"})


@dataclasses.dataclass
class Check:
    """
    The outcome of one check: C{ok} (None: skipped, it could not or need
    not run), what was found, and what to do when it is not ok.
    """

    name: str
    ok: bool | None
    message: str
    fix: str = ""
    details: dict = dataclasses.field(default_factory=dict)

    def line(self) -> str:
        state = {True: "OK", False: "PROBLEM", None: "SKIPPED"}[self.ok]
        text = f"{state:<8} {self.name}: {self.message}"
        return f"{text}; {self.fix}" if self.fix and self.ok is False else text


def passed(checks: Iterable[Check]) -> bool:
    """Whether no check found a problem (skipped checks do not count)."""
    return all(check.ok is not False for check in checks)


# -- the secret --------------------------------------------------------------


def check_secret(secret_file: str | None, insecure: bool) -> Check:
    """The secret file: it exists, is this user's (or root's) and private (L{load_secret}'s checks)."""
    if insecure:
        return Check("secret file", None, "not used (--insecure)")
    path, named = secret_path(secret_file)
    how = "named with --secret-file / CW_SECRET_FILE" if named else "the default"
    if not path.exists():
        return Check(
            "secret file",
            False,
            f"{path} ({how}) does not exist",
            "copy the master's secret file there (mode 0600), or name it with --secret-file /"
            " CW_SECRET_FILE (a master started by this user creates the default one)",
        )
    try:
        load_secret(path)
        info = path.stat()
    except (SecretError, OSError) as e:
        return Check("secret file", False, str(e))
    mode = stat.S_IMODE(info.st_mode)
    try:
        owner = pwd.getpwuid(info.st_uid).pw_name
    except KeyError:
        owner = f"uid {info.st_uid}"
    return Check(
        "secret file",
        True,
        f"{path} ({how}), mode {mode:04o}, owner {owner}",
        details={"path": str(path), "mode": f"{mode:04o}", "uid": info.st_uid},
    )


# -- the master's address ----------------------------------------------------


def endpoint_target(description: str) -> tuple[str, str, int | str]:
    """
    C{("tcp", host, port)}, or C{("unix", path, "")}, from a client endpoint
    description (L{client_description}: C{tcp:host=H:port=P}, C{tcp:H:P},
    C{ssl:...}, C{unix:PATH}).
    """
    kind, _, rest = description.partition(":")
    fields, positional, current = {}, [], ""
    escaped = False
    for char in rest + ":":
        if escaped:
            current += char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            key, equals, value = current.partition("=")
            if equals:
                fields[key] = value
            else:
                positional.append(current)
            current = ""
        else:
            current += char
    if kind == "unix":
        return "unix", fields.get("path", positional[0] if positional else ""), ""
    host = fields.get("host", positional[0] if positional else "")
    port = fields.get("port", positional[1] if len(positional) > 1 else "")
    return "tcp", host, int(port) if str(port).isdigit() else 0


def check_address(master: str | None, timeout: float) -> tuple[Check, str | None]:
    """
    How the master's address was found, that it resolves and that
    something listens there.  Returns the check and the address to connect
    to (None if there is no point).
    """
    try:
        host, how = discovery.locate_master(master)
        address = client_description(host)
    except (CWError, ValueError) as e:
        return Check("master address", False, str(e)), None
    kind, target, port = endpoint_target(address)
    where = f"{target}:{port}" if kind == "tcp" else target
    found = {"address": address, "how": how}
    if kind == "unix":
        family, sockaddr = socket.AF_UNIX, target
    else:
        try:
            info = socket.getaddrinfo(target, port, type=socket.SOCK_STREAM)
        except OSError as e:
            return Check(
                "master address",
                False,
                f"{where} ({how}) does not resolve: {e.strerror or e}",
                "check the host name (--master, CW_MASTER), or the SLURM master job's address file",
                found,
            ), None
        family, _, _, _, sockaddr = info[0]
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(sockaddr)
    except OSError as e:
        why = "no answer" if isinstance(e, socket.timeout) else (e.strerror or str(e))
        return Check(
            "master address",
            False,
            f"nothing answers at {where} ({how}): {why}",
            "start a master (twistd -n cw-master, cw.start(), cw-slurm start) or name the right one"
            " with --master / CW_MASTER",
            found,
        ), None
    return Check("master address", True, f"{where} ({how}) answers", details=found), address


# -- judgments on what the master and workers said -----------------------------


def judge_clock(name: str, skew: float, uncertainty: float, limit: float = MAX_SKEW) -> Check:
    """
    C{skew}: seconds the other clock is ahead of this machine's, known to
    within C{uncertainty} (half the round trip).  A problem beyond C{limit}.
    """
    details = {"skew": round(skew, 4), "uncertainty": round(uncertainty, 4)}
    if abs(skew) - uncertainty <= limit:
        return Check(name, True, f"{skew:+.3f} s from this machine's (±{uncertainty:.3f} s)", details=details)
    direction = "ahead of" if skew > 0 else "behind"
    return Check(
        name,
        False,
        f"{abs(skew):.1f} s {direction} this machine's",
        "synchronise the clocks (NTP: chrony, systemd-timesyncd); timeouts, logs and SLURM times disagree"
        " otherwise",
        details,
    )


def judge_worker_clocks(reports: list[dict], sent: float, received: float) -> Check:
    """The workers' clocks (their probe answers' C{time}) against this machine's, from one probe round."""
    middle, uncertainty = (sent + received) / 2, (received - sent) / 2
    worst = None
    for entry in reports:
        report = entry.get("report") or {}
        if "time" in report:
            skew = report["time"] - middle
            if worst is None or abs(skew) > abs(worst[1]):
                worst = (entry["peer"], skew)
    if worst is None:
        return Check("worker clocks", None, "no worker answered")
    check = judge_clock("worker clocks", worst[1], uncertainty)
    check.message = f"worst is worker {worst[0]}, " + check.message
    return check


def judge_workers(workers: list[dict]) -> Check:
    """How many workers (from the master's status)."""
    if not workers:
        return Check(
            "workers",
            False,
            "no worker is connected to the master",
            "start workers (cw-worker --master ADDRESS, cw.start(), cw-slurm start) and check their logs",
        )
    slots = sum(w.get("slots", 0) for w in workers)
    busy = sum(w.get("busy", 0) for w in workers)
    return Check(
        "workers",
        True,
        f"{len(workers)} connected, {slots} slots, {busy} busy",
        details={"count": len(workers)},
    )


def judge_versions(client: dict, reports: list[dict]) -> Check:
    """The workers' versions (their probe answers) against this client's (L{incompatible})."""
    bad, silent = [], []
    for entry in reports:
        report = entry.get("report")
        if report is None:
            silent.append(f"{entry['peer']} ({entry.get('error', 'no answer')})")
            continue
        reasons = incompatible(client, report.get("versions"))
        if reasons:
            bad.append(f"{entry['peer']} runs {short(report.get('versions'))} ({'; '.join(reasons)})")
    if bad or silent:
        parts = []
        if bad:
            parts.append(
                f"{len(bad)} worker(s) incompatible with this client's {short(client)}: " + ", ".join(bad)
            )
        if silent:
            parts.append("not answering: " + ", ".join(silent))
        fix = "install the same Python and cloudpickle versions on clients and workers"
        if silent:
            fix += "; check the silent workers' logs (a worker that does not answer may be hung)"
        return Check("worker versions", False, "; ".join(parts), fix, {"client": client})
    return Check("worker versions", True, f"every worker matches this client ({short(client)})")


def judge_paths(cwd: str, reports: list[dict]) -> Check:
    """Whether every worker can enter C{cwd} and sees this client's C{sys.path} entries."""
    problems = []
    for entry in reports:
        report = entry.get("report")
        if report is None:
            continue
        if report.get("cwd_error"):
            problems.append(f"worker {entry['peer']} cannot enter {cwd} ({report['cwd_error']})")
        missing = report.get("missing") or []
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            problems.append(f"worker {entry['peer']} does not see sys.path entries {shown}")
    if problems:
        return Check(
            "worker paths",
            False,
            "; ".join(problems),
            "jobs run in the client's directory with its sys.path: run the client from a directory the"
            " workers share (a shared filesystem), or start workers where it is mounted",
        )
    return Check("worker paths", True, f"every worker can enter {cwd} and sees this sys.path")


def judge_slurm(
    controller_up: bool, insisted: bool, jobs: list[dict], directory: str, error: str = ""
) -> Check:
    """
    SLURM's part: C{controller_up} (C{scontrol ping}), whether SLURM was
    asked for (C{CW_BACKEND=slurm}), this user's cw jobs (C{{"id", "name",
    "state"}}) and the cluster's directory (where the jobs' logs are).
    """
    if error:
        return Check("SLURM", False, error, "check that slurmctld runs (scontrol ping, squeue)")
    if not controller_up:
        if insisted:
            return Check(
                "SLURM",
                False,
                "CW_BACKEND=slurm but the controller does not answer (scontrol ping)",
                "start slurmctld or ask your administrators; unset CW_BACKEND to run locally",
            )
        return Check("SLURM", None, "not in use (no controller answers)")
    masters = [j for j in jobs if j["name"].startswith(discovery.MASTER_JOB)]
    described = ", ".join(f"{j['name']} {j['id']} {j['state']}" for j in jobs) or "none"
    logs = [os.path.join(directory, f"master-{j['id']}.log") for j in masters]
    details = {"jobs": jobs, "master_logs": logs}
    ended = [j for j in jobs if j["state"] in BAD_END_STATES]
    if ended:
        names = ", ".join(f"{j['name']} {j['id']} {j['state']}" for j in ended)
        return Check(
            "SLURM",
            False,
            f"cw jobs ended badly: {names}",
            f"read their logs in {directory} (master-JOBID.log, workers-JOBID.log) and start again"
            " (cw-slurm start)",
            details,
        )
    log_text = f"; master log {logs[-1]}" if logs else ""
    return Check("SLURM", True, f"controller answers; your cw jobs: {described}{log_text}", details=details)


# -- the checks that talk to the cluster ----------------------------------------


def check_slurm(timeout: float) -> Check:
    """Ask SLURM (when it is on PATH) about the controller and this user's cw jobs."""
    chosen = os.environ.get("CW_BACKEND", "").strip().lower()
    if chosen == "local":
        return Check("SLURM", None, "not in use (CW_BACKEND=local)")
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        if chosen == "slurm":
            return judge_slurm(False, True, [], "")
        return Check("SLURM", None, "not in use (no scontrol on PATH)")
    try:
        ping = subprocess.run([scontrol, "ping"], capture_output=True, text=True, timeout=timeout)
        up = " is UP" in ping.stdout
    except (OSError, subprocess.TimeoutExpired):
        up = False
    if not up:
        return judge_slurm(False, chosen == "slurm", [], "")
    names = discovery.job_names()
    try:
        out = discovery.run_slurm(
            ["squeue", "-h", "-t", "all", "-u", getpass.getuser(), "-o", "%i|%j|%T"], timeout=timeout
        )
    except CWError as e:
        return judge_slurm(True, True, [], str(cluster_directory()), error=str(e))
    jobs = []
    for line in out.splitlines():
        fields = line.strip().split("|")
        if len(fields) == 3 and fields[1].startswith(names):
            jobs.append({"id": fields[0], "name": fields[1], "state": fields[2]})
    return judge_slurm(True, chosen == "slurm", jobs, str(cluster_directory()))


def cluster_directory() -> str:
    try:
        return str(discovery.cluster_dir())
    except CWError:
        return "~/.cw/slurm"


def probe_job(ex: ClusterExecutor, cwd: str, timeout: float, workers: list[dict]) -> Check:
    """
    A tiny job (C{os.getcwd}, run in this client's directory on a worker)
    there and back.  Not counted as a problem when every slot is busy: it
    would only wait its turn.
    """
    started = time.monotonic()
    future = ex.submit(os.getcwd)
    try:
        ran_in = future.result(timeout)
    except futures.TimeoutError:
        ex.kill(future)
        slots = sum(w.get("slots", 0) for w in workers)
        if workers and sum(w.get("busy", 0) for w in workers) >= slots:
            return Check("probe job", None, f"not run within {timeout:g} s: all {slots} slots are busy")
        return Check(
            "probe job",
            False,
            f"no result within {timeout:g} s though slots were free",
            "look at the workers' logs (a worker may be hung or unable to start job processes)",
        )
    except Exception as e:
        return Check(
            "probe job",
            False,
            f"failed: {str(e).splitlines()[0]}",
            "see the error; the checks above usually name the cause",
        )
    took = time.monotonic() - started
    if ran_in != cwd:
        return Check("probe job", False, f"ran in {ran_in}, not in this directory {cwd}")
    return Check("probe job", True, f"ran in this directory and came back in {took:.2f} s")


def check_cluster(address: str, args: argparse.Namespace) -> list[Check]:
    """Authenticate with the master, then the clock, worker and probe-job checks."""
    try:
        ex = ClusterExecutor(
            address,
            connect_timeout=args.timeout,
            secret_file=args.secret_file,
            insecure=args.insecure or None,
        )
    except (CWError, OSError, TimeoutError) as e:
        fix = "use the master's secret file (--secret-file / CW_SECRET_FILE)" if "secret" in str(e) else ""
        return [Check("master authenticates", False, str(e), fix)]
    checks = [Check("master authenticates", True, f"registered as a client of {address}")]
    try:
        sent = time.time()
        status = ex.status()
        received = time.time()
        skew = status.get("time", (sent + received) / 2) - (sent + received) / 2
        checks.append(judge_clock("master clock", skew, (received - sent) / 2))
        workers = status.get("workers", [])
        checks.append(judge_workers(workers))
        if not workers:
            return checks
        context = client_context()
        here = {"cwd": context["cwd"], "path": [p for p in context["path"] if os.path.exists(p)]}
        sent = time.time()
        reports = ex.session.probe_workers([], here, timeout=args.timeout)
        received = time.time()
        checks.append(judge_worker_clocks(reports, sent, received))
        checks.append(judge_versions(local_versions(), reports))
        checks.append(judge_paths(here["cwd"], reports))
        checks.append(probe_job(ex, here["cwd"], args.timeout, workers))
    except (CWError, OSError, TimeoutError) as e:
        checks.append(Check("master", False, f"stopped answering: {e}"))
    finally:
        abandon(ex)
    return checks


def abandon(ex: ClusterExecutor) -> None:
    """Close the doctor's connection at once, whatever it left outstanding."""
    outstanding = ex.outstanding()
    ex.shutdown(wait=False, cancel_futures=True)
    ex.kill(*outstanding)
    ex._thread.join(10)


def run_checks(args: argparse.Namespace) -> list[Check]:
    """Every check, in order; those that need a master are left out when there is none."""
    checks = [check_secret(args.secret_file, args.insecure)]
    address_check, address = check_address(args.master, args.timeout)
    checks.append(address_check)
    if checks[0].ok is False:
        # Connecting would create the default secret file (as a client does
        # on first use): a doctor only looks, and a new secret would not be
        # the master's anyway.
        checks.append(Check("master authenticates", None, "not tried without a usable secret file"))
    elif address is not None:
        checks += check_cluster(address, args)
    else:
        checks.append(Check("master authenticates", None, "no master to ask"))
    checks.append(check_slurm(args.timeout))
    return checks


def doctor_command(args: argparse.Namespace, out: Callable[[str], Any] = print) -> int:
    """Run L{run_checks}, print one line per check (or JSON); 0 only when all passed."""
    try:
        checks = run_checks(args)
    except Exception as e:  # a bug in a check must not end in a traceback either
        print(f"cw doctor: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    ok = passed(checks)
    if args.json:
        out(json.dumps({"ok": ok, "checks": [dataclasses.asdict(c) for c in checks]}, indent=2))
    else:
        for check in checks:
            out(check.line())
    return 0 if ok else 1


def add_parser(commands) -> None:
    """The C{doctor} subcommand of C{cw}."""
    doctor = commands.add_parser("doctor", help="check the secret, master, clocks, workers and SLURM")
    add_master_options(doctor, "print the checks as JSON, for scripts", "seconds to wait for each answer")
    doctor.set_defaults(func=doctor_command)
