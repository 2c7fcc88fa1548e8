"""
Adaptive pools on a real SLURM (C{cw-slurm start --max-workers ...}): the
master job submits worker jobs as work arrives, drains them when idle,
replaces them ahead of their walltime, and asks C{squeue} at most once per
polling interval.  They skip without a SLURM controller (CI brings one up:
C{contrib/slurm/ci/up.sh}).  The walltime test takes over five minutes and
runs only with C{CW_LONG_TESTS=1}.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from twisted.internet import threads
from twisted.trial import unittest

from cw import slurm
from cw.client import master_status
from cw.test.jobs import probe
from cw.test.launch import test_slurm
from cw.test.launch.test_slurm import SCRIPT, _slurm_skip
from cw.test.procs import DEADLINE, child_env, executor, wait_until

#: A PATH entry whose squeue logs each call (time, calling job, arguments) to $CW_SQUEUE_LOG.
SQUEUE_WRAPPER = """#!/bin/bash
echo "$(date +%s.%N) ${{SLURM_JOB_NAME:-login}} $*" >> "$CW_SQUEUE_LOG"
exec {real} "$@"
"""

#: The format of the pool's own squeue call (cw.master.pool.SlurmLauncher.poll).
POOL_FORMAT = "%i|%T|%S|%L"


class AdaptiveSlurmTests(unittest.TestCase):
    timeout = 420
    skip = _slurm_skip()

    # Borrowed through the module: a test class imported by name would be
    # collected, and run, a second time here.
    setUp = test_slurm.SlurmClusterTests.setUp
    squeue = test_slurm.SlurmClusterTests.squeue
    logs = test_slurm.SlurmClusterTests.logs

    def cancel_all(self):
        """Cancel every job of this test: recorded, the pool's, or seen."""
        jobs = slurm.recorded_jobs(self.name)
        pool = sorted({i.split("_")[0] for i in slurm.pool_jobs(self.name)})
        ids = list(dict.fromkeys(jobs["master"] + pool + [i.split("_")[0] for i in self.job_ids]))
        return threads.deferToThread(slurm.cancel, ids, DEADLINE)

    def env(self) -> dict[str, str]:
        """The environment of cw-slurm and the clients: squeue through the logging wrapper."""
        env = child_env(CW_SLURM_DIR=self.directory, CW_SLURM_CLUSTER=self.name)
        env.pop("CW_BACKEND")
        wrappers = Path(self.directory) / "bin"
        if not wrappers.exists():
            wrappers.mkdir()
            wrapper = wrappers / "squeue"
            wrapper.write_text(SQUEUE_WRAPPER.format(real=shutil.which("squeue")))
            wrapper.chmod(0o755)
        env["PATH"] = f"{wrappers}:{env['PATH']}"
        env["CW_SQUEUE_LOG"] = str(Path(self.directory) / "squeue.log")
        return env

    def run_command(self, *args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, SCRIPT, *args]
        out = subprocess.run(command, capture_output=True, text=True, env=self.env(), timeout=DEADLINE * 2)
        self.assertEqual(out.returncode, 0, f"slurm.py {' '.join(args)}:\n{out.stdout}{out.stderr}")
        return out

    def pool_polls(self, caller: str | None = None) -> list[float]:
        """When the master job (or C{caller}: C{login} for 'cw-slurm adapt') called squeue for the pools."""
        try:
            lines = (Path(self.directory) / "squeue.log").read_text().splitlines()
        except FileNotFoundError:
            return []
        caller = caller or slurm.job_names(self.name)[0]
        return [float(line.split()[0]) for line in lines if f" {caller} " in line and POOL_FORMAT in line]

    def worker_jobs(self) -> list[str]:
        workers = slurm.job_names(self.name)[1]
        return [i for i, name in self.squeue().items() if name == workers]

    def status(self) -> dict:
        info = slurm.master_info(self.name)
        return master_status(info["address"], timeout=30)

    def test_scale_up_and_down(self):
        """
        --min-workers 0 --max-workers 3, 300 jobs of 0.2 s: worker jobs
        appear in squeue, every result arrives, the worker jobs are gone
        after the idle timeout, and the master called squeue at most once
        per polling interval (counted by a squeue on PATH that logs each
        call).
        """
        poll = 2.0
        idle = 8.0

        def body():
            self.run_command(
                "start", "--min-workers", "0", "--max-workers", "3", "--idle-timeout", str(idle),
                "--poll-interval", str(poll), "--Xworkers", "--cpus-per-task=2", "--wait", str(DEADLINE),
            )  # fmt: skip
            began = time.time()
            self.assertEqual(self.worker_jobs(), [])
            client = textwrap.dedent(
                """
                import json, sys, time
                import cw
                from cw.client import ClusterExecutor

                def nap(x):
                    time.sleep(0.2)
                    return x * x

                with ClusterExecutor(cw.slurm_master_host()) as ex:
                    t0 = time.time()
                    futures = [ex.submit(nap, i) for i in range(300)]
                    first = futures[0].result(120)
                    t1 = time.time()
                    results = [f.result(120) for f in futures]
                assert results == [i * i for i in range(300)], results
                print(json.dumps({"submitted": t0, "first": t1, "done": time.time()}))
                """
            )
            proc = subprocess.Popen(
                [sys.executable, "-c", client], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                env=self.env(),
            )  # fmt: skip
            self.addCleanup(lambda: proc.poll() is None and proc.kill())
            seen = wait_until(self.worker_jobs, timeout=DEADLINE, what="worker jobs in squeue")
            text = self.run_command("status").stdout
            self.assertIn("pool     target", text)
            self.assertIn(slurm.job_names(self.name)[1], text)  # the pool's jobs in the jobs table
            full = None  # when all three workers were connected (a measurement, not a check)
            while proc.poll() is None and full is None:
                if len(self.status()["workers"]) >= 3:
                    full = time.time()
                time.sleep(0.2)
            out, err = proc.communicate(timeout=DEADLINE * 3)
            self.assertEqual(proc.returncode, 0, err + self.logs())
            times = json.loads(out.strip().splitlines()[-1])
            peak = len(self.status()["workers"])
            wait_until(lambda: not self.worker_jobs(), timeout=idle + 60, what="the worker jobs to end")
            gone = time.time()
            status = self.status()
            polls = self.pool_polls()
            elapsed = time.time() - began
            self.run_command("stop")
            self.assertEqual(self.squeue(), {})
            self.assertTrue(seen)
            # At most one squeue per polling interval (the first round may poll at once).
            self.assertGreater(len(polls), 0)
            self.assertLessEqual(len(polls), elapsed / poll + 2, polls)
            gaps = [b - a for a, b in zip(polls, polls[1:], strict=False)]
            self.assertGreaterEqual(min(gaps), poll * 0.9, gaps)
            self.assertEqual(status["pool"]["calls"]["squeue"], len(polls))
            self.assertEqual(status["pool"]["running"], 0)
            actions = [d["action"] for d in status["pool"]["decisions"]]
            self.assertTrue(any(a.startswith("drain") for a in actions), actions)
            self.assertGreaterEqual(gone - times["done"], idle - 1)
            report = {
                "scale_up_s": round(times["first"] - times["submitted"], 1),
                "all_workers_s": None if full is None else round(full - times["submitted"], 1),
                "all_done_s": round(times["done"] - times["submitted"], 1),
                "scale_down_s": round(gone - times["done"], 1),
                "peak_workers": peak,
                "squeue_calls": len(polls),
                "elapsed_s": round(elapsed, 1),
                "poll_interval_s": poll,
                "sbatch_calls": status["pool"]["calls"].get("sbatch"),
            }
            print("adaptive SLURM measurements:", json.dumps(report))

        return threads.deferToThread(body)

    def pool_jobs_named(self, *pools: str) -> list[str]:
        """The worker jobs of the pools C{pools} in squeue (any of them: C{plain} and C{wide})."""
        names = [f"{slurm.job_names(self.name)[1]}.{pool}" for pool in pools or ("plain", "wide")]
        out = subprocess.run(
            ["squeue", "-h", "-n", ",".join(names), "-o", "%i"], capture_output=True, text=True, timeout=30
        )
        self.assertEqual(out.returncode, 0, out.stderr)
        return out.stdout.split()

    def test_two_adaptive_pools(self):
        """
        Two adaptive pools, 0 to 2 workers each: jobs tagged 'wide' bring
        up only the tagged pool's worker jobs, then plain jobs only the
        other's (route_queued: the plainest pool that can run them); every
        result is right, each ran in its pool, 'cw-slurm status' shows
        each pool, and both pools are back to no job after the idle timeout.
        """
        idle = 5.0

        def body():
            self.run_command(
                "--pool", "plain:min=0,max=2,cpus=1", "--pool", "wide:min=0,max=2,cpus=2,tag=wide",
                "start", "--idle-timeout", str(idle), "--poll-interval", "1", "--wait", str(DEADLINE),
            )  # fmt: skip
            began = time.time()
            pool_file = json.loads(Path(self.directory, self.name, "pool.json").read_text())
            self.assertEqual([p["name"] for p in pool_file["pools"]], ["plain", "wide"])
            self.assertEqual(self.worker_jobs(), [])
            address = slurm.master_info(self.name)["address"]
            with executor(address) as ex:
                tagged = [ex.submit_with(probe, (0.5,), tags={"wide"}) for _ in range(6)]
                wide = wait_until(lambda: self.pool_jobs_named("wide"), timeout=DEADLINE, what="wide jobs")
                self.assertEqual(self.pool_jobs_named("plain"), [])
                self.assertEqual({f.result(DEADLINE)["slurm_cpus"] for f in tagged}, {"2"})
                self.assertEqual(self.pool_jobs_named("plain"), [], "plain pool started for tagged jobs")
                self.assertLessEqual(len(wide), 2)
                text = self.run_command("status").stdout
                self.assertIn("pool     wide: target", text)
                self.assertIn("pool     plain: target 0", text)
                # Plain jobs, once the wide pool has drained: only the plain pool grows.
                gone = lambda: not self.pool_jobs_named("wide")  # noqa: E731
                wait_until(gone, timeout=idle + DEADLINE, what="the wide pool to drain")
                plain = list(ex.map(probe, [0.2] * 20, timeout=DEADLINE))
                self.assertEqual({r["slurm_cpus"] for r in plain}, {"1"})
                self.assertEqual(self.pool_jobs_named("wide"), [], "wide pool started for plain jobs")
                status = ex.status()
            pools = {p["name"]: p for p in status["pools"]}
            self.assertEqual(sorted(pools), ["plain", "wide"])
            self.assertGreaterEqual(pools["plain"]["calls"].get("sbatch", 0), 1)
            self.assertEqual(pools["wide"]["max_workers"], 2)
            wait_until(lambda: not self.pool_jobs_named(), timeout=idle + DEADLINE, what="both pools idle")
            elapsed = time.time() - began
            # One squeue per polling interval (1 s) for both pools together.
            counted = sum(p["calls"]["squeue"] for p in self.status()["pools"])
            polls = self.pool_polls()
            gaps = [b - a for a, b in zip(polls, polls[1:], strict=False)]
            self.assertGreaterEqual(min(gaps), 0.9, gaps)
            self.assertIn(counted, (len(polls), len(polls) - 1))
            self.run_command("stop")
            self.assertEqual(self.squeue(), {})
            self.assertEqual(self.pool_jobs_named(), [])
            print("two adaptive pools:", json.dumps({"elapsed_s": round(elapsed, 1)}))

        return threads.deferToThread(body)

    def test_adapt_on_the_login_node(self):
        """
        'cw-slurm adapt' with two adaptive pools starts the master job
        (with no pool of its own) and runs every pool's loop in the
        foreground: the plain pool's --min 1 worker job serves plain jobs,
        tagged jobs bring up the tagged pool's worker jobs (and run there),
        all with one squeue per polling interval for both pools; on SIGINT
        it cancels the worker jobs and exits 0, the master job staying.
        """
        poll = 2.0

        def body():
            command = [
                SCRIPT, "--pool", "plain:min=1,max=2,cpus=1", "--pool", "wide:min=0,max=2,cpus=2,tag=wide",
                "adapt", "--poll-interval", str(poll),
            ]  # fmt: skip
            proc = subprocess.Popen(
                [sys.executable, *command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                env=self.env(),
            )  # fmt: skip
            self.addCleanup(lambda: proc.poll() is None and proc.kill())
            plain = wait_until(
                lambda: self.pool_jobs_named("plain"), timeout=DEADLINE, what="a plain worker job from adapt"
            )
            self.assertEqual(self.pool_jobs_named("wide"), [])
            master = slurm.recorded_jobs(self.name)["master"]
            self.assertEqual(len(master), 1)
            info = slurm.master_info(self.name)
            self.assertNotIn(
                "--pool-file", Path(self.directory, self.name, f"master-{master[0]}.log").read_text()
            )
            status = self.status()
            self.assertEqual((status["pool"], status["pools"]), (None, []))
            with executor(info["address"]) as ex:
                self.assertEqual(sum(ex.map(abs, range(-50, 50), timeout=DEADLINE)), 2500)
                tagged = [ex.submit_with(probe, (0.5,), tags={"wide"}) for _ in range(6)]
                wide = wait_until(lambda: self.pool_jobs_named("wide"), timeout=DEADLINE, what="wide jobs")
                self.assertEqual({f.result(DEADLINE)["slurm_cpus"] for f in tagged}, {"2"})
            # Enough rounds for the gaps between squeue calls to say something
            # (on a quiet machine the jobs above can be done within two).
            wait_until(
                lambda: len(self.pool_polls("login")) > 2, timeout=DEADLINE, what="3 squeue calls by adapt"
            )
            proc.send_signal(2)
            output, _ = proc.communicate(timeout=DEADLINE * 2)
            self.assertEqual(proc.returncode, 0, output)
            self.assertIn("of the pools plain, wide", output)
            self.assertIn("cancelling the pool's worker jobs", output)
            self.assertIn("Pool plain: submit 1", output)
            self.assertIn("Pool wide: submit", output)
            wait_until(lambda: not self.pool_jobs_named(), timeout=DEADLINE, what="the worker jobs to end")
            self.assertTrue(slurm.active_jobs(master), "the master job ended too")
            self.assertTrue(plain and wide and info)
            # One squeue per polling interval for both pools together.
            polls = self.pool_polls("login")
            gaps = [b - a for a, b in zip(polls, polls[1:], strict=False)]
            self.assertGreater(len(polls), 2, polls)
            self.assertGreaterEqual(min(gaps), poll * 0.9, gaps)
            self.run_command("stop")
            self.assertEqual(self.squeue(), {})
            report = {"squeue_calls": len(polls), "shortest_gap_s": round(min(gaps), 2)}
            print("cw-slurm adapt, two pools:", json.dumps(report))

        return threads.deferToThread(body)

    def long_test_walltime_replacement(self):
        """
        A pool of worker jobs with a 2-minute --time serves a 5-minute
        stream of jobs: each job runs exactly once (a marker line per run),
        none fails, and the pool never dips to zero workers once up.

        Over five minutes: a test only with C{CW_LONG_TESTS=1} (below), not a
        skip, since CI treats a skip as a missing feature.
        """
        self.timeout = 900
        markers = Path(self.directory) / "markers"
        markers.mkdir()

        def body():
            self.run_command(
                "start", "--min-workers", "2", "--max-workers", "3", "--idle-timeout", "60",
                "--poll-interval", "5", "--time", "2", "--walltime-warning", "20", "--wait", str(DEADLINE),
            )  # fmt: skip
            client = textwrap.dedent(
                """
                import json, os, sys, time
                import cw
                from cw.client import ClusterExecutor

                markers = sys.argv[1]

                def job(i):
                    with open(os.path.join(markers, str(i)), "a") as f:
                        f.write(f"{os.getpid()}\\n")
                    time.sleep(0.5)
                    return i

                with ClusterExecutor(cw.slurm_master_host()) as ex:
                    end = time.time() + 300
                    futures = []
                    i = 0
                    while time.time() < end:
                        futures += [ex.submit(job, i + k) for k in range(4)]
                        i += 4
                        time.sleep(0.5)
                    results = [f.result(300) for f in futures]
                assert results == list(range(i)), results
                print(json.dumps({"jobs": i}))
                """
            )
            proc = subprocess.Popen(
                [sys.executable, "-c", client, str(markers)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True, env=self.env(),
            )  # fmt: skip
            self.addCleanup(lambda: proc.poll() is None and proc.kill())
            wait_until(lambda: self.status()["workers"], timeout=DEADLINE, what="a first worker")
            sizes = []
            actions = set()
            while proc.poll() is None:
                status = self.status()
                sizes.append(sum(1 for w in status["workers"] if not w["draining"]))
                actions.update(d["action"] for d in status["pool"]["decisions"])
                time.sleep(1)
            out, err = proc.communicate()
            self.assertEqual(proc.returncode, 0, err + self.logs())
            jobs = json.loads(out.strip().splitlines()[-1])["jobs"]
            runs = {p.name: len(p.read_text().splitlines()) for p in markers.iterdir()}
            self.run_command("stop")
            self.assertEqual(len(runs), jobs)
            self.assertEqual(set(runs.values()), {1}, {k: v for k, v in runs.items() if v != 1})
            self.assertGreater(min(sizes), 0, sizes)
            self.assertTrue([a for a in actions if "replacing" in a], actions)
            print(
                "walltime test:",
                json.dumps({"jobs": jobs, "min_workers_seen": min(sizes), "samples": len(sizes)}),
            )

        return threads.deferToThread(body)

    if os.environ.get("CW_LONG_TESTS") == "1":
        test_walltime_replacement = long_test_walltime_replacement
