"""
The C{cw-slurm} command (also C{contrib/slurm/slurm.py}): start, stop and
inspect a cw cluster that runs as SLURM jobs (see L{cw.slurm}).  Its
options are built from L{cw.core.config.SlurmConfig}.

    cw-slurm [-n N] [-M] [-W] [-i] [-d IMAGE] [--docker-args ARGS]
             [--Xworkers ARG]... [--Xmaster ARG]... [--time T] [--partition P]
             [--state PATH [--master-time T]]
             [--pool NAME:n=N|min=A,max=B,cpus=C,mem=M,gres=G,tag=T]...
             [--min-workers A --max-workers B --idle-timeout S --poll-interval S]
             [--name NAME] start|stop|status|adapt

Layer rule (cw.cli): the top layer; may import any of cw, and nothing in cw imports it.
"""

from __future__ import annotations

import argparse
import os
import sys

from cw import slurm
from cw.cli.cw import format_status
from cw.client.session import master_status
from cw.core.config import SlurmConfig, options, parse_pool
from cw.discovery import squeue_jobs
from cw.errors import CWError

#: Options whose value is an sbatch option, so usually starts with "-".
_PASSTHROUGH = tuple(f"--{o.long}" for o in options(SlurmConfig) if o.kind is tuple)


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


def add_options(p: argparse.ArgumentParser, config: type) -> None:
    """
    Add the options of C{config} (a config dataclass, L{cw.core.config})
    to C{p}, each with its field's name, type, default and help.
    """
    for o in options(config):
        flags = [f"-{o.short}"] if o.short else []
        flags.append(f"--{o.long}")
        keywords: dict = {"dest": o.name, "help": o.help}
        if o.kind is bool:
            keywords["action"] = "store_true"
        else:
            keywords["default"] = o.default
            keywords["help"] = f"{o.help} (default: {o.doc_default})"
            keywords["metavar"] = o.metavar
            if o.kind is tuple:
                keywords["action"] = "append"
                keywords["default"] = None  # argparse appends to a default list in place
            else:
                keywords["type"] = o.kind
        p.add_argument(*flags, **keywords)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cw-slurm",
        description="Start, stop or inspect a cw cluster running as SLURM jobs: a master job"
        " (cmaster) and a worker job (cworkers) with one worker per task.",
        epilog="Job ids, the master's address and the jobs' logs are kept in"
        " $CW_SLURM_DIR/NAME (default ~/.cw/slurm/default).",
    )
    p.add_argument(
        "command",
        choices=["start", "stop", "status", "adapt"],
        help="adapt: run the adaptive pool's loop here in the foreground (for clusters whose compute"
        " nodes cannot sbatch); starts the master job if needed",
    )
    add_options(p, SlurmConfig)
    return p


def read_config(args: argparse.Namespace) -> SlurmConfig:
    """The parsed options as a L{SlurmConfig}, whose checks raise L{OptionError}."""
    values = {o.name: getattr(args, o.name) for o in options(SlurmConfig)}
    for o in options(SlurmConfig):
        if o.kind is tuple:
            values[o.name] = tuple(values[o.name] or ())
    return SlurmConfig(**values)


def _jobs_table(cluster: str) -> list[str]:
    jobs = slurm.recorded_jobs(cluster)
    pools = slurm.recorded_pools(cluster)
    ids = jobs["master"] + jobs["workers"] + slurm.pool_jobs(cluster)
    if not ids:
        return [f"jobs     none recorded in {slurm.cluster_dir(cluster) / 'jobs.json'}"]
    # SlurmError if the controller cannot be asked.
    out = squeue_jobs(ids, "%i|%j|%T|%M|%l|%D|%R", every_task=True)
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
    if pools:
        lines.append(f"pools    {'JOBID':>8}  DEFINITION")
        lines += [f"         {job_id:>8}  {spec}" for job_id, spec in pools.items()]
    return lines


def status(config: SlurmConfig) -> int:
    cluster = slurm.cluster_name(config.name)
    print(f"cluster  {cluster or '(default)'} in {slurm.cluster_dir(cluster)}")
    try:
        print("\n".join(_jobs_table(cluster)))
    except CWError as e:
        # Not "finished": a controller that does not answer knows nothing of them.
        jobs = slurm.recorded_jobs(cluster)
        ids = ", ".join(jobs["master"] + jobs["workers"])
        print(
            f"jobs     {ids}: state unknown, SLURM could not be asked ({e});"
            " retry when 'scontrol ping' says UP"
        )
        return 1
    info = slurm.master_info(cluster)
    if info is None:
        print("master   not running (yet): no address published")
        return 1
    try:
        snapshot = master_status(info["address"], timeout=10, secret_file=config.secret_file)
    except (CWError, TimeoutError, OSError) as e:
        print(f"master   {info['address']}: cannot get its status: {e}")
        return 1
    print(format_status(info["address"], snapshot))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(_join_passthrough(list(sys.argv[1:] if argv is None else argv)))
    try:
        config = read_config(args)
        cluster = slurm.cluster_name(config.name)
        if args.command == "status":
            return status(config)
        if args.command == "stop":
            jobs = slurm.recorded_jobs(cluster)
            if not (jobs["master"] or jobs["workers"] or slurm.pool_jobs(cluster)):
                where = slurm.cluster_dir(cluster) / "jobs.json"
                print(f"cw-slurm: no jobs recorded in {where}; nothing to stop")
                return 0
            slurm.stop(
                master=not config.no_master,
                workers=not config.no_workers,
                cluster=cluster,
                timeout=config.timeout,
            )
            print(f"cw-slurm: stopped the jobs recorded in {slurm.cluster_dir(cluster) / 'jobs.json'}")
            return 0
        pool = dict(
            min_workers=config.min_workers if config.max_workers is not None else None,
            max_workers=config.max_workers,
            idle_timeout=config.idle_timeout,
            poll_interval=config.poll_interval,
            pending_timeout=config.pending_timeout,
        )
        if args.command == "adapt":
            slurm.adapt(
                cluster,
                secret_file=config.secret_file,
                docker_image=config.docker_image,
                docker_args=config.docker_args,
                time_limit=config.time,
                partition=config.partition,
                master_sbatch=config.x_master,
                worker_sbatch=config.x_workers,
                port=config.port,
                walltime_warning=config.walltime_warning,
                master_time=config.master_time,
                master_options=["--state", os.path.abspath(config.state)] if config.state else [],
                pools=[parse_pool(text) for text in config.pool],
                **pool,
            )
            return 0
        slurm.start(
            config.workers,
            master=not config.no_master,
            workers=not config.no_workers,
            docker_image=config.docker_image,
            docker_args=config.docker_args,
            cluster=cluster,
            isolated=config.isolated,
            time_limit=config.time,
            partition=config.partition,
            master_sbatch=config.x_master,
            worker_sbatch=config.x_workers,
            port=config.port,
            secret_file=config.secret_file,
            walltime_warning=config.walltime_warning,
            master_time=config.master_time,
            master_options=["--state", os.path.abspath(config.state)] if config.state else [],
            wait=False,
            pools=[parse_pool(text) for text in config.pool],
            **pool,
        )
        jobs = slurm.recorded_jobs(cluster)
        print(
            f"cw-slurm: master job {', '.join(jobs['master']) or '-'}, worker jobs"
            f" {', '.join(jobs['workers']) or '-'} (logs in {slurm.cluster_dir(cluster)})",
            flush=True,
        )
        if config.wait > 0:
            # The jobs stay queued if this gives up: 'cw-slurm status' shows them.
            address = slurm.wait_for_master(cluster, config.wait)["address"]
            print(f"cw-slurm: the master listens at {address}")
        return 0
    except CWError as e:
        print(f"cw-slurm: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
