"""
Tests of SLURM clusters (L{cw.slurm}, C{contrib/slurm/slurm.py}).

The batch-script tests are pure.  The others run against a real SLURM on
this machine (in CI, C{contrib/slurm/ci/up.sh} brings up a single-node one);
they skip if C{scontrol ping} does not report a controller UP.  Each uses
a cluster name of its own and a cluster directory under the test's
temporary directory, and its cleanup cancels the job ids that were
recorded, whether the test passed or not.  Every wait is bounded.
"""

from __future__ import annotations

import inspect
import io
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from twisted.internet import threads
from twisted.trial import unittest

import cw
from cw import discovery, slurm
from cw.cli import slurm as cli_slurm
from cw.cli.slurm import _jobs_table, _join_passthrough
from cw.core import config as cw_config
from cw.core.config import SlurmConfig, parse_pool
from cw.errors import OptionError
from cw.test.jobs import probe
from cw.test.procs import (
    COLLECT_SESSION,
    DEADLINE,
    ROOT,
    SUBMIT_AND_DETACH,
    child_env,
    executor,
    run_script,
    wait_until,
)

SCRIPT = os.path.join(ROOT, "contrib", "slurm", "slurm.py")


def slow_square(x, delay=0.02):
    time.sleep(delay)
    return x * x


class ScriptTests(unittest.TestCase):
    """The generated batch scripts (no SLURM needed)."""

    def setUp(self):
        self.directory = Path("/shared/cw/test")

    def worker(self, n=4, **kwargs):
        kwargs.setdefault("directory", self.directory)
        kwargs.setdefault("python", "/venv/bin/python")
        kwargs.setdefault("cwd", "/home/u/project")
        return slurm.worker_script(n, **kwargs)

    def master(self, **kwargs):
        kwargs.setdefault("directory", self.directory)
        kwargs.setdefault("python", "/venv/bin/python")
        kwargs.setdefault("cwd", "/home/u/project")
        return slurm.master_script(**kwargs)

    def test_worker_job(self):
        """
        The worker job: named cworkers, N tasks, SIGTERM to the workers
        before the time limit, each task a worker under srun that finds (and
        waits for) the master, with a slot per CPU of its task, run by the
        caller's Python in the caller's directory with this cw on its path.
        """
        script = self.worker(4, secret_file="/shared/secret")
        lines = script.splitlines()
        self.assertEqual(lines[0], "#!/bin/bash")
        self.assertIn("#SBATCH --job-name=cworkers", lines)
        self.assertIn("#SBATCH --ntasks=4", lines)
        self.assertIn(f"#SBATCH --signal=TERM@{slurm.WALLTIME_WARNING}", lines)
        self.assertIn("#SBATCH --output=/shared/cw/test/workers-%j.log", lines)
        self.assertNotIn("#SBATCH --ntasks-per-node=1", lines)
        self.assertTrue([line for line in lines if line.startswith("cd /home/u/project || {")], script)
        self.assertIn(f"export PYTHONPATH={ROOT}", "\n".join(lines))
        self.assertIn("export CW_SECRET_FILE=/shared/secret", lines)
        srun = lines[-1]
        self.assertTrue(srun.startswith("srun /venv/bin/python -m cw.worker --slurm --slurm-wait 600 "), srun)
        self.assertIn("--procs ${SLURM_CPUS_PER_TASK:-1}", srun)
        self.assertIn("--secret-file /shared/secret", srun)
        self.assertIn(f"--drain-timeout {slurm.WALLTIME_WARNING - 30}", srun)
        # Every #SBATCH line comes before the first command (sbatch stops there).
        first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
        self.assertFalse([line for line in lines[first_command:] if line.startswith("#SBATCH")])

    def test_pool_jobs(self):
        """
        --pool: each pool its own worker job, named after it, with its
        cores, memory and GRES for SLURM and its tags, custom resources and
        memory for its workers.
        """
        gpu = parse_pool("gpu:n=4,gres=gpu:1,cpus=8,mem=64G,tag=gpu,tag=fast,resource=licenses=2")
        self.assertEqual(
            (gpu.name, gpu.n, gpu.cpus, gpu.mem, gpu.gres, gpu.tags, gpu.resources),
            ("gpu", 4, 8, "64G", "gpu:1", ("gpu", "fast"), ("licenses=2",)),
        )
        self.assertEqual(parse_pool(gpu.spec()), gpu)
        lines = self.worker(1, cluster="c", pool=gpu).splitlines()
        for line in [
            "#SBATCH --job-name=cworkers-c.gpu",
            "#SBATCH --ntasks=4",
            "#SBATCH --cpus-per-task=8",
            "#SBATCH --mem-per-cpu=8192M",
            "#SBATCH --gres=gpu:1",
            "#SBATCH --ntasks-per-node=1",
        ]:
            self.assertIn(line, lines)
        self.assertIn("--tag gpu --tag fast --resource licenses=2 --memory 64G", lines[-1])
        cpu = self.worker(1, pool=parse_pool("cpu:n=32")).splitlines()
        self.assertIn("#SBATCH --ntasks=32", cpu)
        self.assertFalse([line for line in cpu if "cpus-per-task" in line or "--gres" in line])
        for bad in [":n=1", "gpu:n=0", "gpu:n=x", "gpu:mem=lots", "gpu:colour=red", "gpu:resource=x"]:
            self.assertRaises(OptionError, parse_pool, bad)

    def test_adaptive_pools(self):
        """
        --pool NAME:min=A,max=B: an adaptive pool (n= or min=/max=, not
        both); its definition round-trips; its worker's capacity (GPUs
        from gres) is what the master routes queued work by.
        """
        gpu = parse_pool("gpu:min=1,max=4,cpus=8,gres=gpu:a100:2,mem=64G,tag=gpu,resource=lic=2")
        self.assertTrue(gpu.adaptive)
        self.assertEqual((gpu.min_workers, gpu.max_workers), (1, 4))
        self.assertEqual(parse_pool(gpu.spec()), gpu)
        capacity = gpu.capacity()
        self.assertEqual(
            (capacity.cpus, capacity.memory, capacity.gpus, capacity.custom, capacity.tags),
            (8, 64 << 30, ("0", "1"), (("lic", 2),), frozenset({"gpu"})),
        )
        self.assertFalse(parse_pool("cpu:n=2").adaptive)
        self.assertEqual(parse_pool("cpu:max=2").min_workers, None)
        for bad in ["gpu:min=1", "gpu:n=2,max=3", "gpu:min=3,max=2", "gpu:max=0", "gpu:min=x,max=2"]:
            self.assertRaises(OptionError, parse_pool, bad)

    def test_adaptive_pool_times(self):
        """
        An adaptive pool's own idle=, poll= and pending= (seconds) override
        the common --idle-timeout, --poll-interval and --pending-timeout in
        the pool file the master reads; they round-trip, need max=, and
        out-of-range values are refused with the pool's text.
        """
        gpu = parse_pool("gpu:min=0,max=4,idle=30,poll=5.5,pending=600,tag=gpu")
        self.assertEqual((gpu.idle_timeout, gpu.poll_interval, gpu.pending_timeout), (30, 5.5, 600))
        self.assertEqual(parse_pool(gpu.spec()), gpu)
        self.assertEqual(parse_pool("cpu:max=2,idle=0").idle_timeout, 0)
        self.assertIsNone(parse_pool("cpu:max=2").idle_timeout)
        for bad in [
            "gpu:n=2,idle=30", "gpu:idle=30", "gpu:max=2,idle=-1", "gpu:max=2,poll=0", "gpu:max=2,pending=0",
            "gpu:max=2,poll=x", "gpu:max=2,idle=nan", "gpu:max=2,pending=inf", "gpu:max=2,poll=",
        ]:  # fmt: skip
            with self.assertRaises(OptionError, msg=bad) as caught:
                parse_pool(bad)
            self.assertIn(repr(bad), str(caught.exception))
        directory = self.mktemp()
        self.patch(os, "environ", {**os.environ, "CW_SLURM_DIR": directory})
        slurm.start(
            0, master=False, workers=False, wait=False, pool_in_master=False, cluster="t",
            master_options=["--insecure"], pools=[gpu, parse_pool("cpu:max=2")],
            idle_timeout=100, poll_interval=20, pending_timeout=900,
        )  # fmt: skip
        data = json.loads((slurm.cluster_dir("t") / "pool.json").read_text())
        times = {
            p["name"]: (p["idle_timeout"], p["poll_interval"], p["pending_timeout"]) for p in data["pools"]
        }
        self.assertEqual(times, {"gpu": (30, 5.5, 600), "cpu": (100, 20, 900)})

    def test_isolated(self):
        """-i: one worker per node."""
        self.assertIn("#SBATCH --ntasks-per-node=1", self.worker(8, isolated=True).splitlines())

    def test_docker(self):
        """
        -d IMAGE: the batch script waits for the master once, then runs each
        worker in 'docker run -i --rm --net=host ARGS IMAGE', with the
        secret file mounted read-only.
        """
        script = self.worker(
            2, docker_image="me/cw:1", docker_args="--memory 4g -v /data:/data", secret_file="/shared/secret"
        )
        lines = script.splitlines()
        self.assertIn("master=$(/venv/bin/python -m cw.slurm wait-master --timeout 600) || exit 1", lines)
        self.assertEqual(
            lines[-1],
            "srun docker run -i --rm --net=host --memory 4g -v /data:/data"
            " -v /shared/secret:/shared/secret:ro -e CW_SECRET_FILE=/shared/secret me/cw:1"
            ' python3 -m cw.worker --master "$master" --secret-file /shared/secret'
            f" --drain-timeout {slurm.WALLTIME_WARNING - 30} --procs ${{SLURM_CPUS_PER_TASK:-1}}",
        )

    def test_extra_sbatch_options(self):
        """--Xworkers and --Xmaster become #SBATCH lines of their own job only."""
        workers = self.worker(2, sbatch_options=["--mem=4G", "--account=lab"]).splitlines()
        master = self.master(sbatch_options=["--mem=1G"]).splitlines()
        self.assertIn("#SBATCH --mem=4G", workers)
        self.assertIn("#SBATCH --account=lab", workers)
        self.assertNotIn("#SBATCH --mem=1G", workers)
        self.assertIn("#SBATCH --mem=1G", master)
        self.assertNotIn("#SBATCH --mem=4G", master)
        self.assertRaises(slurm.SlurmError, self.worker, 2, sbatch_options=["--mem=1G\nrm -rf ~"])

    def test_time_partition_and_name(self):
        """--time, --partition and a cluster name reach both jobs."""
        common = dict(cluster="big", time_limit="8:00:00", partition="long")
        for script, name in [
            (self.worker(2, **common), "cworkers-big"),
            (self.master(**common), "cmaster-big"),
        ]:
            lines = script.splitlines()
            self.assertIn(f"#SBATCH --job-name={name}", lines)
            self.assertIn("#SBATCH --time=8:00:00", lines)
            self.assertIn("#SBATCH --partition=long", lines)
            self.assertIn("export CW_SLURM_CLUSTER=big", lines)

    def test_master_job(self):
        """
        The master job runs 'python -m cw.slurm master-job' with the master's
        options; the default cluster listens on port 5494 (so that
        'cw.worker HOST' and clients given only the host still work), a
        named one on a free port (the address file tells which).
        """
        lines = self.master(master_options=["--prefetch", "2"], secret_file="/s").splitlines()
        self.assertIn("#SBATCH --job-name=cmaster", lines)
        self.assertIn("#SBATCH --ntasks=1", lines)
        self.assertEqual(
            lines[-1],
            "exec /venv/bin/python -m cw.slurm master-job -- --secret-file /s --port tcp:5494 --prefetch 2",
        )
        self.assertTrue(self.master(cluster="two").splitlines()[-1].endswith("--port tcp:0"))
        self.assertIn("--port tcp:7000", self.master(master_options=["--port", "tcp:7000"]).splitlines()[-1])
        self.assertNotIn("tcp:5494", self.master(master_options=["--port", "tcp:7000"]))

    def test_options_by_twistd_rules(self):
        """
        The user's options count however they are written ('--opt=value',
        '--opt value', a prefix): none is given twice, and a mistyped one is
        refused before anything is submitted.
        """
        last = self.master(master_options=["--secret-file=/mine", "--port=tcp:7000"], secret_file="/s")
        command = last.splitlines()[-1]
        self.assertTrue(command.endswith("master-job -- --secret-file=/mine --port=tcp:7000"), command)
        command = self.worker(
            worker_options=["--procs=3", "--drain=5", "--secret-file=/mine"], secret_file="/s"
        )
        command = command.splitlines()[-1]
        self.assertNotIn("SLURM_CPUS_PER_TASK", command)
        self.assertEqual(command.count("--drain"), 1)
        self.assertEqual(command.count("--secret-file"), 1)
        self.assertRaises(OptionError, self.master, master_options=["--prefech", "2"])
        self.assertRaises(OptionError, self.worker, worker_options=["--procs", "all"])

    def test_master_json_secret_file(self):
        """
        The master job publishes in master.json the secret file its master
        uses, given as '--secret-file PATH' or '--secret-file=PATH' (which
        the master reads alike), and none for --insecure.
        """
        directory = os.path.abspath(self.mktemp())
        env = {k: v for k, v in os.environ.items() if k not in ("SLURM_JOB_ID", "CW_SECRET_FILE")}
        self.patch(os, "environ", {**env, "CW_SLURM_DIR": directory, "CW_SLURM_CLUSTER": "s"})
        published = []

        def fake_twistd(tapname, argv):
            # A master that listens at once, and stops once master.json is published.
            address_file = argv[argv.index("--address-file") + 1]
            Path(address_file).write_text("tcp:127.0.0.1:7001\n")
            path = slurm.cluster_dir() / "master.json"
            deadline = time.monotonic() + DEADLINE
            while not path.exists():
                self.assertLess(time.monotonic(), deadline, "master.json was not written")
                time.sleep(0.01)
            published.append(json.loads(path.read_text()))
            path.unlink()  # the next round waits for its own

        self.patch(slurm, "run_twistd", fake_twistd)
        for options in (["--secret-file=/x/secret"], ["--secret-file", "/x/secret"], ["--insecure"]):
            slurm.run_master_job(options)
        self.assertEqual([info["secret_file"] for info in published], ["/x/secret", "/x/secret", None])
        self.assertEqual(published[0]["address"], f"{socket.gethostname()}:7001")

    def test_names(self):
        """Job names and cluster directories; bad names are refused."""
        self.assertEqual(slurm.job_names(""), ("cmaster", "cworkers"))
        self.assertEqual(slurm.job_names("a.b-1"), ("cmaster-a.b-1", "cworkers-a.b-1"))
        self.patch(os, "environ", {**os.environ, "CW_SLURM_DIR": "/x/y"})
        self.assertEqual(slurm.cluster_dir(""), Path("/x/y/default"))
        self.assertEqual(slurm.cluster_dir("c"), Path("/x/y/c"))
        for bad in ["a b", "../x", "-x", "a;b"]:
            self.assertRaises(slurm.SlurmError, slurm.job_names, bad)

    def test_cli_passthrough(self):
        """'--Xworkers --mem=4G' is read as one option with its value."""
        self.assertEqual(
            _join_passthrough(["-n", "4", "--Xworkers", "--mem=4G", "--Xmaster", "-A", "start"]),
            ["-n", "4", "--Xworkers=--mem=4G", "--Xmaster=-A", "start"],
        )

    def test_cli_built_from_config(self):
        """cw-slurm's options are SlurmConfig's fields, with its defaults."""
        args = cli_slurm.parser().parse_args(["start"])
        self.assertEqual(set(vars(args)), {"command"} | {o.name for o in cw_config.options(SlurmConfig)})
        self.assertEqual(cli_slurm.read_config(args), SlurmConfig())
        argv = ["-n", "4", "-M", "-i", "--Xworkers", "--mem=4G", "--Xworkers", "-A", "--time", "1:00", "stop"]
        config = cli_slurm.read_config(cli_slurm.parser().parse_args(_join_passthrough(argv)))
        self.assertEqual(
            config,
            SlurmConfig(workers=4, no_master=True, isolated=True, x_workers=("--mem=4G", "-A"), time="1:00"),
        )

    def test_cli_defaults_once(self):
        """
        cw.slurm.start and stop, which cw-slurm calls, default to what
        SlurmConfig says; cw-slurm's parser names no default of its own.
        """
        defaults = SlurmConfig()
        start = inspect.signature(slurm.start).parameters
        stop = inspect.signature(slurm.stop).parameters
        for field, parameter in [
            ("workers", start["nworkers"]),
            ("docker_image", start["docker_image"]),
            ("docker_args", start["docker_args"]),
            ("isolated", start["isolated"]),
            ("time", start["time_limit"]),
            ("partition", start["partition"]),
            ("x_master", start["master_sbatch"]),
            ("x_workers", start["worker_sbatch"]),
            ("port", start["port"]),
            ("secret_file", start["secret_file"]),
            ("walltime_warning", start["walltime_warning"]),
            ("walltime_warning", inspect.signature(slurm.worker_script).parameters["walltime_warning"]),
            ("timeout", stop["timeout"]),
        ]:
            self.assertEqual(parameter.default, getattr(defaults, field), f"{parameter.name} vs {field}")
        source = inspect.getsource(cli_slurm)
        self.assertNotIn("default=", source, "a default written in cw.cli.slurm, not taken from SlurmConfig")

    def test_cli_bad_value_one_line(self):
        """A bad value ends cw-slurm with one line naming the option, before it does anything."""
        self.patch(slurm, "start", lambda *a, **k: self.fail("started with a bad option"))
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        self.assertEqual(cli_slurm.main(["--walltime-warning", "-5", "start"]), 1)
        self.assertEqual(err.getvalue(), "cw-slurm: --walltime-warning must not be negative\n")

    def test_cli_options_in_readme(self):
        """The README's cw-slurm section names every cw-slurm option."""
        with open(os.path.join(ROOT, "README.rst")) as f:
            readme = f.read()
        for o in cw_config.options(SlurmConfig):
            names = [f"``--{o.long}", *([f"``-{o.short}"] if o.short else [])]
            self.assertTrue(any(name in readme for name in names), f"cw-slurm --{o.long} in the README")

    def test_master_file(self):
        """
        master_info reads master.json; master_host gives the bare host for
        the default port and HOST:PORT otherwise.
        """
        directory = os.path.abspath(self.mktemp())
        self.patch(os, "environ", {**os.environ, "CW_SLURM_DIR": directory})
        self.patch(discovery, "active_jobs", lambda ids: {i: "RUNNING" for i in ids})
        slurm._write_json(slurm.cluster_dir("a") / "master.json", slurm._info("node7", 5494, job_id="12"))
        slurm._write_json(slurm.cluster_dir("b") / "master.json", slurm._info("node8", 40001, job_id="13"))
        self.assertEqual(slurm.master_host("a"), "node7")
        self.assertEqual(slurm.master_host("b"), "node8:40001")
        self.assertEqual(slurm.master_address("a"), "node7:5494")
        # A master job that is gone: its file is not believed.
        self.patch(discovery, "active_jobs", lambda ids: {})
        self.assertIsNone(slurm.master_info("a"))

    def test_forgotten_jobs(self):
        """
        squeue's "Invalid job id" (every job asked about is long finished)
        means no state, in job_states and in 'cw-slurm status' alike; any
        other failure of squeue is raised.
        """
        asked = []

        def forgotten(args, input=None, timeout=30):
            asked.append(args)
            raise slurm.SlurmError("squeue -h failed (exit 1): slurm_load_jobs error: Invalid job id")

        self.patch(discovery, "run_slurm", forgotten)
        self.assertEqual(slurm.job_states(["7", "8"]), {})
        self.assertEqual(asked[-1][:6], ["squeue", "-h", "-t", "all", "-j", "7,8"])
        directory = os.path.abspath(self.mktemp())
        self.patch(os, "environ", {**os.environ, "CW_SLURM_DIR": directory})
        slurm._write_json(slurm.cluster_dir("a") / "jobs.json", {"master": ["7"], "workers": ["8"]})
        table = "\n".join(_jobs_table("a"))
        self.assertIn("7  (finished; squeue no longer knows it)", table)
        self.assertNotIn("Invalid", table)

        def down(args, input=None, timeout=30):
            raise slurm.SlurmError("squeue did not answer within 30 s: is slurmctld up?")

        self.patch(discovery, "run_slurm", down)
        self.assertRaises(slurm.SlurmError, slurm.job_states, ["7"])

    def test_status_controller_down(self):
        """
        'cw-slurm status' with an squeue that fails (the controller down):
        one line saying the jobs' state is unknown and why, exit status 1,
        and no job called finished.
        """
        bin_dir = Path(self.mktemp()).absolute()
        bin_dir.mkdir()
        squeue = bin_dir / "squeue"
        squeue.write_text(
            "#!/bin/sh\n"
            "echo 'slurm_load_jobs error: Unable to contact slurm controller (connect failure)' >&2\n"
            "exit 1\n"
        )
        squeue.chmod(0o755)
        directory = os.path.abspath(self.mktemp())
        self.patch(
            os,
            "environ",
            {**os.environ, "CW_SLURM_DIR": directory, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"},
        )
        slurm._write_json(slurm.cluster_dir("a") / "jobs.json", {"master": ["7"], "workers": ["8"]})
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        status = cli_slurm.main(["status", "--name", "a"])
        lines = out.getvalue().splitlines()
        self.assertEqual(status, 1, out.getvalue())
        self.assertNotIn("finished", out.getvalue())
        [jobs] = [line for line in lines if line.startswith("jobs")]
        self.assertIn("7, 8: state unknown", jobs)
        self.assertIn("Unable to contact slurm controller", jobs)


def _slurm_skip() -> str | None:
    if not discovery._slurm_controller_up():
        return (
            "no SLURM controller answers here ('scontrol ping' does not say UP); as root on a"
            " disposable machine, contrib/slurm/ci/up.sh brings up a single-node SLURM"
        )
    return None


class SlurmClusterTests(unittest.TestCase):
    """Clusters run as jobs of a real SLURM."""

    timeout = 240
    skip = _slurm_skip()
    _counter = 0

    def setUp(self):
        SlurmClusterTests._counter += 1
        self.name = f"t{os.getpid()}-{SlurmClusterTests._counter}"
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        env = {**os.environ, "CW_SLURM_DIR": self.directory, "CW_SLURM_CLUSTER": self.name}
        env.pop("CW_BACKEND", None)
        env.pop("CW_MASTER", None)
        self.patch(os, "environ", env)
        self.job_ids: list[str] = []
        self.addCleanup(self.cancel_all)

    def cancel_all(self):
        """Cancel every job this test submitted (recorded or seen), and wait for them to end."""
        jobs = slurm.recorded_jobs(self.name)
        ids = list(dict.fromkeys(jobs["master"] + jobs["workers"] + self.job_ids))
        return threads.deferToThread(slurm.cancel, ids, DEADLINE)

    def env(self) -> dict[str, str]:
        env = child_env(CW_SLURM_DIR=self.directory, CW_SLURM_CLUSTER=self.name)
        env.pop("CW_BACKEND")
        return env

    def squeue(self) -> dict[str, str]:
        """This test's active jobs: name by job id."""
        out = subprocess.run(
            ["squeue", "-h", "-n", ",".join(slurm.job_names(self.name)), "-o", "%i %j"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        self.assertEqual(out.returncode, 0, out.stderr)
        jobs = dict(line.split() for line in out.stdout.splitlines() if line.strip())
        self.job_ids += [i for i in jobs if i not in self.job_ids]
        return jobs

    def run_command(self, *args: str) -> subprocess.CompletedProcess:
        out = subprocess.run(
            [sys.executable, SCRIPT, *args],
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=DEADLINE * 2,
        )
        self.assertEqual(out.returncode, 0, f"slurm.py {' '.join(args)}:\n{out.stdout}{out.stderr}")
        return out

    def logs(self) -> str:
        return "\n".join(
            f"--- {p}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted(Path(self.directory).rglob("*.log"))
        )

    def test_start_run_stop(self):
        """
        'slurm.py -n 4 start', as a user runs it: squeue shows cmaster and
        cworkers; a client program given cw.slurm_master_host() runs 500
        jobs and gets every result; 'slurm.py stop' leaves no job in squeue;
        'slurm.py status' shows the jobs and the connected workers.
        """

        def body():
            self.run_command("-n", "4", "start")
            master, workers = slurm.job_names(self.name)
            self.assertEqual(sorted(self.squeue().values()), [master, workers])
            slurm.wait_for_master(self.name, timeout=DEADLINE)
            client = textwrap.dedent(
                """
                import cw
                from cw.client import ClusterExecutor, wait_for_workers

                host = cw.slurm_master_host()
                wait_for_workers(4, host, timeout=60)
                with ClusterExecutor(host) as ex:
                    results = list(ex.map(pow, range(500), [2] * 500, timeout=120))
                assert results == [i * i for i in range(500)], results
                print("ok", len(results), host)
                """
            )
            out = subprocess.run(
                [sys.executable, "-c", client],
                capture_output=True,
                text=True,
                env=self.env(),
                timeout=DEADLINE * 2,
            )
            self.assertEqual(out.returncode, 0, out.stderr + self.logs())
            self.assertTrue(out.stdout.startswith("ok 500 "), out.stdout)
            status = self.run_command("status").stdout
            self.assertIn(master, status)
            self.assertIn("RUNNING", status)
            self.assertIn("workers  4 (4 slots", status)
            self.run_command("stop")
            self.assertEqual(self.squeue(), {})
            self.assertEqual(slurm.recorded_jobs(self.name), {"master": [], "workers": []})

        return threads.deferToThread(body)

    def test_master_host_right_after_start(self):
        """
        'slurm.py -n 2 start' (the master job held back a few seconds with
        --begin, so that it is surely still queued), then at once a program
        written against the original API: cw.slurm_master_host() waits for
        the queued master job, says so once, and never claims that squeue
        has none; cw.client.SlurmExecutor() runs jobs on that master.
        """

        def body():
            self.run_command("-n", "2", "--Xmaster", "--begin=now+5", "start")
            self.assertIn("PENDING", slurm.master_jobs(self.name).values())
            client = textwrap.dedent(
                """
                import cw
                from cw.client import SlurmExecutor, wait_for_workers

                assert cw.is_slurm_available()
                host = cw.slurm_master_host()
                wait_for_workers(2, host, timeout=60)
                with SlurmExecutor() as ex:
                    print("ok", sum(ex.map(abs, range(-5, 5))), host)
                """
            )
            out = subprocess.run(
                [sys.executable, "-c", client],
                capture_output=True,
                text=True,
                env=self.env(),
                timeout=DEADLINE * 2,
            )
            self.assertEqual(out.returncode, 0, out.stderr + self.logs())
            self.assertTrue(out.stdout.startswith("ok 25 "), out.stdout)
            self.assertEqual(out.stderr.count("has not started its master yet"), 1, out.stderr)
            self.assertNotIn("none in squeue", out.stderr)
            self.run_command("stop")
            self.assertEqual(self.squeue(), {})

        return threads.deferToThread(body)

    def test_no_master_job(self):
        """Without a master job in squeue, master_host fails at once, saying there is none."""

        def body():
            started = time.monotonic()
            with self.assertRaises(slurm.SlurmError) as caught:
                cw.slurm_master_host()
            self.assertIn("none in squeue", str(caught.exception))
            self.assertIn("start one with", str(caught.exception))
            self.assertLess(time.monotonic() - started, 30)

        return threads.deferToThread(body)

    def test_allocate_picks_slurm(self):
        """
        With no CW_BACKEND and a SLURM controller answering, cw.allocate(4)
        starts the cluster as SLURM jobs (the original looked for salloc on
        PATH; cw asks the controller, see cw.launch.backend), and clients find its
        master without being told; on exit the jobs are gone.
        """

        def body():
            self.assertEqual(discovery.backend(), "slurm")
            with cw.allocate(4) as address:
                jobs = self.squeue()
                self.assertEqual(sorted(jobs.values()), sorted(slurm.job_names(self.name)))
                self.assertEqual(address, slurm.master_address())
                from cw.client import wait_for_workers

                wait_for_workers(4, timeout=DEADLINE)
                with executor() as ex:
                    self.assertEqual(
                        list(ex.map(slow_square, range(40), timeout=DEADLINE)), [i * i for i in range(40)]
                    )
            self.assertEqual(self.squeue(), {})

        return threads.deferToThread(body)

    def test_workers_before_master(self):
        """Workers submitted before their master wait for it, then join."""

        def body():
            slurm.start(2, master=False, wait=False)
            worker_job = slurm.recorded_jobs(self.name)["workers"][0]
            wait_until(
                lambda: slurm.job_states([worker_job]).get(worker_job) == "RUNNING",
                what="the worker job to run",
            )
            log = Path(self.directory, self.name, f"workers-{worker_job}.log")
            wait_until(
                lambda: log.exists() and "waiting up to" in log.read_text(), what=f"'waiting' in {log}"
            )
            time.sleep(1)  # the workers really are up before their master
            self.assertEqual(slurm.job_states([worker_job]).get(worker_job), "RUNNING", self.logs())
            address = slurm.start(0, workers=False, timeout=DEADLINE)
            from cw.client import wait_for_workers

            wait_for_workers(2, address, timeout=DEADLINE)
            with executor(address) as ex:
                self.assertEqual(
                    list(ex.map(slow_square, range(20), timeout=DEADLINE)), [i * i for i in range(20)]
                )
            slurm.stop()
            self.assertEqual(self.squeue(), {})

        return threads.deferToThread(body)

    def test_replace_cancelled_workers(self):
        """
        Cancel the worker job while it runs jobs, submit another worker job:
        every job still comes back, exactly once.
        """

        def body():
            from cw.client import wait_for_workers

            address = slurm.start(2, timeout=DEADLINE)
            wait_for_workers(2, address, timeout=DEADLINE)
            first = slurm.recorded_jobs(self.name)["workers"][0]
            with executor(address) as ex:
                futures = [ex.submit(slow_square, i, 0.05) for i in range(200)]
                wait_until(lambda: sum(f.done() for f in futures) >= 30, what="30 results")
                subprocess.run(["scancel", first], check=True, timeout=30)
                wait_until(lambda: not slurm.active_jobs([first]), what=f"worker job {first} to end")
                done_before = sum(f.done() for f in futures)
                self.assertLess(done_before, 200)
                slurm.start(2, master=False, wait=False)
                self.assertEqual(len(slurm.recorded_jobs(self.name)["workers"]), 1)
                results = [f.result(timeout=DEADLINE) for f in futures]
            self.assertEqual(results, [i * i for i in range(200)])
            slurm.stop()
            self.assertEqual(self.squeue(), {})

        return threads.deferToThread(body)

    def test_pools_route_jobs(self):
        """
        'cw-slurm --pool small:n=1,cpus=1 --pool big:n=1,cpus=4,tag=wide
        start': two worker jobs whose workers advertise what SLURM gave
        them; jobs asking for four cores or the tag run in the big pool,
        plain jobs in both; 'cw-slurm status' lists the pools.
        """

        def body():
            from cw.client import wait_for_workers

            self.run_command("--pool", "small:n=1,cpus=1", "--pool", "big:n=1,cpus=4,tag=wide", "start")
            pools = slurm.recorded_pools(self.name)
            self.assertEqual(sorted(pools.values()), ["big:n=1,cpus=4,tag=wide", "small:n=1,cpus=1"])
            self.assertEqual(sorted(pools), sorted(slurm.recorded_jobs(self.name)["workers"]))
            address = slurm.wait_for_master(self.name, timeout=DEADLINE)["address"]
            wait_for_workers(2, address, timeout=DEADLINE)
            with executor(address) as ex:
                capacities = sorted(
                    (w["capacity"]["cpus"], w["capacity"]["tags"]) for w in ex.status()["workers"]
                )
                self.assertEqual(capacities, [(1, []), (4, ["wide"])], self.logs())
                wide = [ex.submit_with(probe, (0.02,), resources={"cpus": 4}) for _ in range(8)]
                self.assertEqual({f.result(DEADLINE)["slurm_cpus"] for f in wide}, {"4"})
                tagged = list(ex.map(probe, [0.01] * 8, tags={"wide"}, timeout=DEADLINE))
                self.assertEqual({r["slurm_cpus"] for r in tagged}, {"4"})
                plain = list(ex.map(probe, [0.05] * 40, timeout=DEADLINE))
                self.assertEqual({r["slurm_cpus"] for r in plain}, {"1", "4"})
            status = self.run_command("status").stdout
            self.assertIn("pools", status)
            self.assertIn("big:n=1,cpus=4,tag=wide", status)
            self.run_command("stop")
            self.assertEqual(slurm.recorded_pools(self.name), {})

        return threads.deferToThread(body)

    def test_walltime_drain(self):
        """
        A worker job that reaches its time limit gets SIGTERM first
        (--signal=TERM@...), and its worker drains: the job ends by itself
        before the limit (not TIMEOUT), and a replacement worker job
        finishes every job, none failed.  SLURM sends the signal up to a minute early, so
        with a one-minute limit it comes within about 30 s.
        """

        def body():
            from cw.client import wait_for_workers

            address = slurm.start(0, workers=False, timeout=DEADLINE)
            slurm.start(1, master=False, wait=False, time_limit="1", walltime_warning=55)
            first = slurm.recorded_jobs(self.name)["workers"][0]
            wait_for_workers(1, address, timeout=DEADLINE)
            with executor(address) as ex:
                futures = [ex.submit(slow_square, i, 0.5) for i in range(200)]
                wait_until(
                    lambda: not slurm.active_jobs([first]), timeout=90, what=f"worker job {first} to end"
                )
                # It ended on the signal, before SLURM's time limit.
                self.assertNotEqual(slurm.job_states([first]).get(first), "TIMEOUT", self.logs())
                self.assertLess(sum(f.done() for f in futures), 200)
                log = Path(self.directory, self.name, f"workers-{first}.log").read_text()
                self.assertIn("Received SIGTERM", log)
                self.assertIn("Drained (", log)
                slurm.start(1, master=False, wait=False, worker_options=["--procs", "8"])
                results = [f.result(timeout=DEADLINE) for f in futures]
            self.assertEqual(results, [i * i for i in range(200)])
            slurm.stop()

        return threads.deferToThread(body)

    def test_master_replaced_before_walltime(self):
        """
        A master job with --state and a two-minute limit submits its
        replacement before the limit (SIGUSR2, --signal=B:USR2@...); the
        replacement has it hand the state file over: the first job ends by
        itself, not TIMEOUT, and the new master reloads the queue and
        listens on the same port, so the worker follows it.  None of the 200
        jobs a client left with the first master is lost: a client of the
        same session collects all 200 right results from the second.
        """

        def body():
            state = os.path.join(self.directory, "state.db")
            # SLURM sends the warning up to a minute early: with 2 minutes and
            # 50 s, at least 10 s after the job starts, once the master has its
            # handler (with 1 minute, it could come before: the job died of it).
            address = slurm.start(
                1, master_options=["--state", state], master_time="2", walltime_warning=50, timeout=DEADLINE
            )
            [first] = slurm.recorded_jobs(self.name)["master"]
            out = run_script(self, SUBMIT_AND_DETACH, address, "walltime", "200", "0.1")
            self.assertEqual(out.returncode, 0, out.stderr)

            def replaced():
                info = discovery.master_info(self.name) or {}
                return info.get("job_id") not in (None, first) and info

            info = wait_until(replaced, timeout=150, what="a replacement master to take over")
            second = info["job_id"]
            # Push the replacement's own limit back: one handover per test.
            subprocess.run(["scontrol", "update", f"JobId={second}", "TimeLimit=10"], check=True, timeout=30)
            wait_until(lambda: not slurm.active_jobs([first]), timeout=60, what=f"master job {first} to end")
            self.assertNotEqual(slurm.job_states([first]).get(first), "TIMEOUT", self.logs())
            old = Path(self.directory, self.name, f"master-{first}.log").read_text()
            self.assertIn(f"submitted replacement master job {second}", old)
            self.assertIn("committed and closed", old)
            new = Path(self.directory, self.name, f"master-{second}.log").read_text()
            self.assertIn(f"master job {first} handed over the state file", new)
            self.assertIn("Reloaded the state file", new)
            self.assertEqual(info["address"], address)
            out = run_script(self, COLLECT_SESSION, info["address"], "walltime")
            self.assertEqual(out.returncode, 0, out.stderr + self.logs())
            report = json.loads(out.stdout)
            self.assertEqual(report["pending"], 0, self.logs())
            results = {int(n): value for n, value in report["results"].items()}
            self.assertEqual(results, {n: (n - 1) ** 2 for n in range(1, 201)})
            slurm.stop()

        return threads.deferToThread(body)


class MasterFileTests(unittest.TestCase):
    """What the master job publishes, checked against a real SLURM."""

    timeout = 120
    skip = _slurm_skip()

    def test_published_and_removed(self):
        """
        The master job publishes master.json (host, port, secret file, job
        id) and its address as the job comment (the fallback without a
        shared directory); both lead to the same master; stopping the job
        removes the file.
        """
        name = f"f{os.getpid()}"
        directory = os.path.abspath(self.mktemp())
        self.patch(os, "environ", {**os.environ, "CW_SLURM_DIR": directory, "CW_SLURM_CLUSTER": name})

        def body():
            address = slurm.start(0, workers=False, timeout=DEADLINE)
            self.addCleanup(slurm.cancel, slurm.recorded_jobs(name)["master"], DEADLINE)
            path = slurm.cluster_dir() / "master.json"
            info = json.loads(path.read_text())
            self.assertEqual(info["address"], address)
            self.assertEqual(info["secret_file"], os.environ["CW_SECRET_FILE"])
            self.assertEqual(info["job_id"], slurm.recorded_jobs(name)["master"][0])
            self.assertEqual(discovery._master_from_squeue(name)["address"], address)
            slurm.stop()
            self.assertFalse(path.exists())
            self.assertIsNone(slurm.master_info())

        return threads.deferToThread(body)
