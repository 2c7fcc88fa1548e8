"""
The C{cw-slurm} command (also C{contrib/slurm/slurm.py}): start, stop and
inspect a cw cluster that runs as SLURM jobs (see L{cw.slurm}).

    cw-slurm [-n N] [-M] [-W] [-i] [-d IMAGE] [--docker-args ARGS]
             [--Xworkers ARG]... [--Xmaster ARG]... [--time T] [--partition P]
             [--name NAME] start|stop|status

Layer rule (cw.cli): the top layer; may import any of cw, and nothing in cw imports it.
"""

from __future__ import annotations

import argparse
import sys

from cw import slurm
from cw.cli.cw import format_status
from cw.client.session import master_status
from cw.discovery import squeue_jobs
from cw.errors import CWError

#: Options whose value is an sbatch option, so usually starts with "-".
_PASSTHROUGH = ("--Xworkers", "--Xmaster")


def _join_passthrough(argv: list[str]) -> list[str]:
    """Turn C{--Xworkers --mem=4G} into C{--Xworkers=--mem=4G}, which argparse accepts."""
    out: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg in _PASSTHROUGH:
            value = next(args, None)
            if value is None:
                out.append(arg)  # argparse reports the missing value
            else:
                out.append(f"{arg}={value}")
        else:
            out.append(arg)
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cw-slurm",
        description="Start, stop or inspect a cw cluster running as SLURM jobs: a master job"
        " (cmaster) and a worker job (cworkers) with one worker per task.",
        epilog="Job ids, the master's address and the jobs' logs are kept in"
        " $CW_SLURM_DIR/NAME (default ~/.cw/slurm/default).",
    )
    p.add_argument("command", choices=["start", "stop", "status"])
    p.add_argument("-n", "--workers", type=int, default=32, metavar="N", help="workers to start (default 32)")
    p.add_argument("-M", "--no-master", action="store_true", help="leave the master job alone")
    p.add_argument("-W", "--no-workers", action="store_true", help="leave the worker jobs alone")
    p.add_argument("-i", "--isolated", action="store_true", help="one worker per node (--ntasks-per-node=1)")
    p.add_argument(
        "-d",
        "--docker-image",
        metavar="IMAGE",
        help="run each worker in 'docker run -i --rm --net=host IMAGE' (cw installed in the image)",
    )
    p.add_argument("--docker-args", default="", metavar="ARGS", help="more 'docker run' arguments")
    p.add_argument(
        "--Xworkers",
        action="append",
        default=[],
        metavar="ARG",
        help="an extra sbatch option for the worker job, e.g. --Xworkers --mem=4G (repeatable)",
    )
    p.add_argument(
        "--Xmaster",
        action="append",
        default=[],
        metavar="ARG",
        help="an extra sbatch option for the master job",
    )
    p.add_argument("--time", metavar="LIMIT", help="the jobs' time limit (sbatch --time), e.g. 8:00:00")
    p.add_argument("--partition", metavar="P", help="the SLURM partition to run in")
    p.add_argument(
        "--name",
        default=None,
        help="cluster name, to run several clusters: jobs cmaster-NAME, cworkers-NAME"
        " (default $CW_SLURM_CLUSTER, else none)",
    )
    p.add_argument(
        "--port", type=int, help="the master's port (default 5494; a free one for a named cluster)"
    )
    p.add_argument(
        "--walltime-warning",
        type=int,
        default=slurm.WALLTIME_WARNING,
        metavar="S",
        help="workers drain this many seconds before the time limit (default %(default)s; 0: no signal)",
    )
    p.add_argument("--secret-file", help="the shared secret (default $CW_SECRET_FILE or ~/.config/cw/secret)")
    p.add_argument(
        "--wait",
        type=float,
        default=0,
        metavar="S",
        help="start: wait up to S seconds for the master to listen and print its address (default: do not)",
    )
    p.add_argument(
        "--timeout", type=float, default=120, metavar="S", help="stop: seconds to wait for each job to end"
    )
    return p


def _jobs_table(cluster: str) -> list[str]:
    jobs = slurm.recorded_jobs(cluster)
    ids = jobs["master"] + jobs["workers"]
    if not ids:
        return [f"jobs     none recorded in {slurm.cluster_dir(cluster) / 'jobs.json'}"]
    out = squeue_jobs(ids, "%i|%j|%T|%M|%l|%D|%R")  # SlurmError if the controller cannot be asked
    rows = {line.split("|")[0]: line.split("|") for line in out.splitlines() if line.count("|") == 6}
    lines = [
        f"jobs     {'JOBID':>8}  {'NAME':<20} {'STATE':<11} {'TIME':>10} {'LIMIT':>10} {'NODES':>5}  WHERE"
    ]
    for job_id in ids:
        row = rows.get(job_id)
        if row is None:
            lines.append(f"         {job_id:>8}  (finished; squeue no longer knows it)")
        else:
            _, name, state, used, limit, nodes, where = row
            lines.append(
                f"         {job_id:>8}  {name:<20} {state:<11} {used:>10} {limit:>10} {nodes:>5}  {where}"
            )
    return lines


def status(args: argparse.Namespace) -> int:
    cluster = slurm.cluster_name(args.name)
    print(f"cluster  {cluster or '(default)'} in {slurm.cluster_dir(cluster)}")
    try:
        print("\n".join(_jobs_table(cluster)))
    except CWError as e:
        # Not "finished": a controller that does not answer knows nothing of them.
        jobs = slurm.recorded_jobs(cluster)
        ids = ", ".join(jobs["master"] + jobs["workers"])
        print(
            f"jobs     {ids}: state unknown, SLURM could not be asked ({e}); retry when 'scontrol ping' says UP"
        )
        return 1
    info = slurm.master_info(cluster)
    if info is None:
        print("master   not running (yet): no address published")
        return 1
    try:
        snapshot = master_status(info["address"], timeout=10, secret_file=args.secret_file)
    except (CWError, TimeoutError, OSError) as e:
        print(f"master   {info['address']}: cannot get its status: {e}")
        return 1
    print(format_status(info["address"], snapshot))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(_join_passthrough(list(sys.argv[1:] if argv is None else argv)))
    try:
        cluster = slurm.cluster_name(args.name)
        if args.command == "status":
            return status(args)
        if args.command == "stop":
            jobs = slurm.recorded_jobs(cluster)
            if not (jobs["master"] or jobs["workers"]):
                where = slurm.cluster_dir(cluster) / "jobs.json"
                print(f"cw-slurm: no jobs recorded in {where}; nothing to stop")
                return 0
            slurm.stop(
                master=not args.no_master, workers=not args.no_workers, cluster=cluster, timeout=args.timeout
            )
            print(f"cw-slurm: stopped the jobs recorded in {slurm.cluster_dir(cluster) / 'jobs.json'}")
            return 0
        slurm.start(
            args.workers,
            master=not args.no_master,
            workers=not args.no_workers,
            docker_image=args.docker_image,
            docker_args=args.docker_args,
            cluster=cluster,
            isolated=args.isolated,
            time_limit=args.time,
            partition=args.partition,
            master_sbatch=args.Xmaster,
            worker_sbatch=args.Xworkers,
            port=args.port,
            secret_file=args.secret_file,
            walltime_warning=args.walltime_warning,
            wait=False,
        )
        jobs = slurm.recorded_jobs(cluster)
        print(
            f"cw-slurm: master job {', '.join(jobs['master']) or '-'}, worker jobs"
            f" {', '.join(jobs['workers']) or '-'} (logs in {slurm.cluster_dir(cluster)})",
            flush=True,
        )
        if args.wait > 0:
            # The jobs stay queued if this gives up: 'cw-slurm status' shows them.
            address = slurm.wait_for_master(cluster, args.wait)["address"]
            print(f"cw-slurm: the master listens at {address}")
        return 0
    except CWError as e:
        print(f"cw-slurm: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
