"""
The local adaptive pool (C{cw.mp.start(min_workers=0, max_workers=N)})
with real processes: no worker at rest, workers when jobs arrive, every
result right, none again after the idle timeout; and workers with a
walltime replaced ahead of it with no job lost or run twice.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from twisted.internet import threads
from twisted.trial import unittest

from cw.client import master_status
from cw.test.jobs import sleep_and_return
from cw.test.procs import DEADLINE, Processes, executor, free_port, process_exists, run_script, wait_until

#: Shared by the scripts: bounded waits on the master's status.
PRELUDE = """
import json, os, sys, time
import cw.mp
from cw.client import ClusterExecutor, master_status

port = int(sys.argv[1])

def status():
    return master_status(port=port, timeout=10)

def wait(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout} s waiting for {what}: {status()}")
        time.sleep(0.05)
"""

ADAPTIVE = (
    PRELUDE
    + """
def square(x):
    time.sleep(0.02)
    return x * x, os.getppid()

import subprocess, urllib.request
web_file = os.path.join(os.environ["CW_RUN_DIR"], "web.url")
cw.mp.start(
    port=port, min_workers=0, max_workers=3, idle_timeout=3, procs=2,
    master_options=["--web", "tcp:0:interface=127.0.0.1", "--web-address-file", web_file, "--web-open"],
)

def metrics():
    url = open(web_file).read().strip().rstrip("/") + "/metrics"
    return urllib.request.urlopen(url, timeout=10).read().decode()

def cw_status():
    done = subprocess.run([sys.executable, "-m", "cw.cli", "status", "--master", f"localhost:{port}"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout

try:
    time.sleep(1.5)  # a scaling round or more: still nobody
    rest = status()
    assert rest["workers"] == [] and rest["pool"]["running"] == 0, rest
    workers = set()
    began = time.monotonic()
    with ClusterExecutor(port=port) as ex:
        first = ex.submit(square, 3)
        assert first.result(30)[0] == 9
        up = time.monotonic() - began
        results = list(ex.map(square, range(300)))
    done = time.monotonic()  # the workers are idle from here (or a little before)
    assert [r[0] for r in results] == [x * x for x in range(300)], results
    workers = {r[1] for r in results}
    text = cw_status()
    assert "pool     target" in text and "submit 1:" in text and "jobs queued" in text, text
    assert "cw_pool_max_workers 3" in metrics()
    wait(lambda: not status()["workers"] and status()["pool"]["running"] == 0, 30, "no workers")
    down = time.monotonic() - done
    pool = status()["pool"]
    text = cw_status()
    assert "drain local-" in text and "idle for" in text, text
    assert "cw_pool_running_workers 0" in metrics()
    print(json.dumps({"up": up, "down": down, "workers": len(workers), "pool": pool}))
finally:
    cw.mp.stop(port=port)
"""
)


WALLTIME = (
    PRELUDE
    + """
markers = sys.argv[2]

def job(i):
    with open(os.path.join(markers, str(i)), "a") as f:
        f.write(f"{os.getpid()}\\n")
    time.sleep(0.3)
    return i

cw.mp.start(port=port, min_workers=1, max_workers=2, idle_timeout=60, procs=2, time_limit=20)
try:
    wait(lambda: status()["workers"], 30, "a first worker")
    sizes, actions = [], set()
    with ClusterExecutor(port=port) as ex:
        futures, i = [], 0
        end = time.monotonic() + 25
        while time.monotonic() < end:
            futures += [ex.submit(job, i), ex.submit(job, i + 1)]
            i += 2
            st = status()
            sizes.append(sum(1 for w in st["workers"] if not w["draining"]))
            actions.update(d["action"] for d in st["pool"]["decisions"])
            time.sleep(0.25)
        results = [f.result(60) for f in futures]
    assert results == list(range(i)), results
    print(json.dumps({"jobs": i, "sizes": sizes, "actions": sorted(actions)}))
finally:
    cw.mp.stop(port=port)
"""
)


class AdaptiveLocalTests(unittest.TestCase):
    timeout = 300

    def test_zero_at_rest_up_on_work_down_when_idle(self):
        """
        0 workers at rest; workers start when jobs arrive; every result is
        right; back to 0 workers within a few seconds of the 3 s idle
        timeout.
        """
        port = free_port()

        def body():
            done = run_script(self, ADAPTIVE, str(port), timeout=DEADLINE * 2)
            self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
            report = json.loads(done.stdout.strip().splitlines()[-1])
            self.assertGreaterEqual(report["workers"], 1)
            self.assertLess(report["up"], 15)
            # The idle timeout (3 s), a scaling round, the worker's exit.
            self.assertGreaterEqual(report["down"], 2.5)
            self.assertLess(report["down"], 15)
            actions = [d["action"] for d in report["pool"]["decisions"]]
            self.assertTrue(any(a.startswith("submit") for a in actions), actions)
            self.assertTrue(any(a.startswith("drain") for a in actions), actions)
            print(report)

        return threads.deferToThread(body)

    def test_walltime_replacement(self):
        """
        Workers with a 20 s walltime serving a 25 s stream: each is replaced
        ahead of its end, every job runs exactly once (a marker line per
        run), and the pool never dips to zero workers.
        """
        port = free_port()
        markers = os.path.abspath(self.mktemp())
        os.makedirs(markers)

        def body():
            done = run_script(self, WALLTIME, str(port), markers, timeout=DEADLINE * 4)
            self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
            report = json.loads(done.stdout.strip().splitlines()[-1])
            runs = {}
            for name in os.listdir(markers):
                with open(os.path.join(markers, name)) as f:
                    runs[name] = len(f.read().splitlines())
            self.assertEqual(len(runs), report["jobs"])
            self.assertEqual(set(runs.values()), {1}, {k: v for k, v in runs.items() if v != 1})
            self.assertGreater(min(report["sizes"]), 0, report["sizes"])
            replacing = [a for a in report["actions"] if "replacing" in a]
            self.assertGreaterEqual(len(replacing), 1, report["actions"])

        return threads.deferToThread(body)

    def test_replaced_master_adopts_the_pools_workers(self):
        """
        A master with --state and an adaptive pool dies (SIGKILL) with its
        two workers running; the master started again in its place adopts
        them (their pidfiles): it counts them (no submission for its
        --min-workers 1, which they satisfy), and drains one once idle,
        down to its minimum, so no worker of the old master is orphaned.
        """
        procs = Processes(self, self.mktemp())
        run = procs.directory / "run"
        run.mkdir()
        state = str(procs.directory / "state.db")
        pool_file = procs.directory / "pool.json"
        pool = {"launcher": "local", "run_dir": str(run), "worker_args": ["--procs", "1"], "max_workers": 2}
        listen = f"tcp:{free_port()}:interface=127.0.0.1"

        def body():
            # The first master: no draining while the test kills it.
            pool_file.write_text(json.dumps({**pool, "min_workers": 0, "idle_timeout": 600}))
            procs.start_master("--state", state, "--pool-file", str(pool_file), listen=listen)
            first = procs.master
            with executor(procs.address) as ex:
                self.assertEqual(
                    list(ex.map(sleep_and_return, [0.2] * 10, range(10), timeout=DEADLINE)), list(range(10))
                )
            launches = wait_until(
                lambda: (ws := master_status(procs.address)["workers"]) and len(ws) == 2 and ws,
                what="two pool workers",
            )
            pidfiles = sorted(run.glob("worker-pool-*.pid"))
            self.assertEqual(len(pidfiles), 2)
            pids = [int(f.read_text().split()[0]) for f in pidfiles]
            first.send_signal(signal.SIGKILL)
            first.wait(DEADLINE)
            self.assertTrue(all(process_exists(pid) for pid in pids))
            # Its replacement, on the same port and state file, at least one worker, quick to drain.
            pool_file.write_text(json.dumps({**pool, "min_workers": 1, "idle_timeout": 2}))
            procs.start_master("--state", state, "--pool-file", str(pool_file), listen=listen)

            def drained_to_one():
                status = master_status(procs.address)
                alive = [pid for pid in pids if process_exists(pid)]
                running = status["pool"]["running"]
                return len(alive) == 1 and len(status["workers"]) == 1 and running == 1 and (status, alive)

            status, _ = wait_until(drained_to_one, timeout=DEADLINE, what="one adopted worker drained")
            (left,) = status["workers"]
            self.assertIn(left["launch"], {w["launch"] for w in launches})
            actions = [d["action"] for d in status["pool"]["decisions"]]
            self.assertFalse([a for a in actions if a.startswith("submit")], actions)
            self.assertEqual(len([a for a in actions if a.startswith("drain local-")]), 1, actions)
            self.assertIn("adopted 2 worker launches", Path(procs.master.log).read_text())
            # The drained worker's pidfile goes at the next look (cw.mp.stop stops the other).
            wait_until(lambda: len(list(run.glob("worker-pool-*.pid"))) == 1, what="one pidfile left")

        return threads.deferToThread(body)
