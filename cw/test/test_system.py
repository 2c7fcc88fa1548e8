"""
Tests for L{cw.system}: the operating-system helpers the layers share.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from twisted.trial import unittest

from cw import system


class WriteAtomicallyTests(unittest.TestCase):
    def test_writes_and_leaves_no_temporary_file(self):
        directory = Path(self.mktemp())
        directory.mkdir()
        path = directory / "master.address"
        path.write_text("old\n")
        system.write_atomically(path, "new\n", tmp_suffix=".node7")
        self.assertEqual(path.read_text(), "new\n")
        self.assertEqual([p.name for p in directory.iterdir()], ["master.address"])


class ProcStatTests(unittest.TestCase):
    def test_own_process(self):
        fields = system.proc_stat(os.getpid())
        self.assertEqual(fields[0], "R")
        self.assertEqual(int(fields[1]), os.getppid())
        self.assertEqual(system.start_time(os.getpid()), fields[19])

    def test_command_name_with_parenthesis_and_spaces(self):
        """The fields after a command name holding ") " are still found."""
        code = "import sys; open('/proc/self/comm', 'w').write('a) b (c'); print(flush=1); sys.stdin.read()"
        child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.addCleanup(child.wait, 10)
        self.addCleanup(child.stdin.close)
        self.addCleanup(child.stdout.close)
        child.stdout.readline()  # the name is set
        self.assertEqual(Path(f"/proc/{child.pid}/comm").read_text(), "a) b (c\n")
        fields = system.proc_stat(child.pid)
        self.assertEqual(int(fields[1]), os.getpid())
        self.assertIn(fields[0], "RS")

    def test_gone(self):
        child = subprocess.Popen(["true"])
        child.wait()
        self.assertIsNone(system.proc_stat(child.pid))
        self.assertIsNone(system.start_time(child.pid))
        system.sigkill(child.pid)  # gone: ignored
        system.sigkill(child.pid, group=True)


class PidfileTests(unittest.TestCase):
    """
    L{system.write_pidfile} and L{system.read_pidfile}: a PID only while it
    is still the process started.
    """

    def setUp(self):
        self.path = Path(self.mktemp())
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def test_running(self):
        system.write_pidfile(self.path, os.getpid())
        self.assertEqual(self.path.read_text(), f"{os.getpid()} {system.start_time(os.getpid())}\n")
        self.assertEqual(system.read_pidfile(self.path), os.getpid())

    def test_unknown_start_time(self):
        """A pidfile written where the start time was unknown names a running process."""
        self.path.write_text(f"{os.getpid()} -\n")
        self.assertEqual(system.read_pidfile(self.path), os.getpid())

    def test_missing_or_garbled(self):
        self.assertIsNone(system.read_pidfile(self.path))
        for text in ("", "12\n", "x 1\n", "1 2 3\n"):
            self.path.write_text(text)
            self.assertIsNone(system.read_pidfile(self.path), text)

    def test_pid_reused(self):
        """The PID's process started at another time: not the one started."""
        self.path.write_text(f"{os.getpid()} 1\n")
        self.assertIsNone(system.read_pidfile(self.path))

    def test_gone(self):
        child = subprocess.Popen(["true"])
        system.write_pidfile(self.path, child.pid)
        child.wait()
        self.assertIsNone(system.read_pidfile(self.path))

    def test_zombie(self):
        """A child that exited but is not reaped yet counts as gone."""
        code = "import sys; sys.stdin.read()"
        child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)
        system.write_pidfile(self.path, child.pid)
        self.assertEqual(system.read_pidfile(self.path), child.pid)
        child.stdin.close()
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
        self.assertEqual(system.proc_stat(child.pid)[0], "Z")
        self.assertIsNone(system.read_pidfile(self.path))
        child.wait()


class PollingTests(unittest.TestCase):
    def test_delays_grow_to_the_most(self):
        slept: list[float] = []
        self.patch(system.time, "sleep", slept.append)
        for attempt in system.polling(0.01, 0.05):
            if attempt == 5:
                break
        self.assertEqual([round(d, 6) for d in slept], [0.01, 0.02, 0.04, 0.05, 0.05])


class PythonPathTests(unittest.TestCase):
    def test_cw_first_once(self):
        path = os.pathsep.join(["/x", system.CW_ROOT, "", "/x"])
        env = system.with_cw_on_path({"PYTHONPATH": path, "A": "1"})
        self.assertEqual(env["PYTHONPATH"], os.pathsep.join([system.CW_ROOT, "/x"]))
        self.assertEqual(env["A"], "1")
        self.assertTrue(os.path.isdir(os.path.join(system.CW_ROOT, "cw")))
        self.assertEqual(system.with_cw_on_path({})["PYTHONPATH"], system.CW_ROOT)


class MachineResourceTests(unittest.TestCase):
    """What a worker finds it has, from fake environments and cgroup files."""

    def test_cpus(self):
        self.assertEqual(system.detect_cpus({}, [0, 1, 2, 3]), 4)
        self.assertEqual(
            system.detect_cpus({"SLURM_CPUS_PER_TASK": "2", "SLURM_CPUS_ON_NODE": "3"}, [0, 1, 2, 3]), 2
        )
        self.assertEqual(system.detect_cpus({"SLURM_CPUS_ON_NODE": "3"}, [0, 1, 2, 3]), 3)
        self.assertEqual(system.detect_cpus({"SLURM_CPUS_ON_NODE": "16"}, [0, 1]), 2)
        self.assertEqual(system.detect_cpus({"SLURM_CPUS_PER_TASK": "x"}, [5]), 1)
        self.assertEqual(system.detect_cpus({"SLURM_CPUS_PER_TASK": "8"}, [0, 1]), 8)

    def test_gpus(self):
        self.assertEqual(system.detect_gpus({}), ())
        self.assertEqual(
            system.detect_gpus({"CUDA_VISIBLE_DEVICES": "2,3", "SLURM_JOB_GPUS": "0"}), ("2", "3")
        )
        self.assertEqual(system.detect_gpus({"CUDA_VISIBLE_DEVICES": ""}), ())
        self.assertEqual(system.detect_gpus({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}), ())
        self.assertEqual(system.detect_gpus({"CUDA_VISIBLE_DEVICES": "-1"}), ())
        self.assertEqual(system.detect_gpus({"SLURM_STEP_GPUS": "1", "SLURM_JOB_GPUS": "0,1"}), ("1",))
        self.assertEqual(system.detect_gpus({"SLURM_JOB_GPUS": "0,1"}), ("0", "1"))

    def cgroup(self, lines: str, files: dict[str, str]):
        root = Path(self.mktemp())
        root.mkdir(parents=True)
        for name, text in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(text)
        proc = root / "proc-cgroup"
        proc.write_text(lines)
        return system.cgroup_memory_limit(proc, root)

    def test_cgroup_v2(self):
        self.assertEqual(self.cgroup("0::/job/step\n", {"job/step/memory.max": "1073741824\n"}), 1 << 30)
        self.assertIsNone(self.cgroup("0::/job\n", {"job/memory.max": "max\n"}))
        self.assertIsNone(self.cgroup("0::/\n", {}))

    def test_cgroup_v1(self):
        lines = "4:memory:/slurm/uid_0/job_7\n3:cpu,cpuacct:/slurm\n"
        files = {"memory/slurm/uid_0/job_7/memory.limit_in_bytes": "2147483648"}
        self.assertEqual(self.cgroup(lines, files), 2 << 30)
        unlimited = {"memory/slurm/uid_0/job_7/memory.limit_in_bytes": str((1 << 63) - 4096)}
        self.assertIsNone(self.cgroup(lines, unlimited))

    def test_memory(self):
        self.assertEqual(system.detect_memory({}, None, 8 << 30), 8 << 30)
        self.assertEqual(system.detect_memory({}, 2 << 30, 8 << 30), 2 << 30)
        self.assertEqual(system.detect_memory({"SLURM_MEM_PER_NODE": "1024"}, None, 8 << 30), 1 << 30)
        self.assertGreater(system.physical_memory(), 0)


class MachineIdentityTests(unittest.TestCase):
    def test_same_in_a_child_process(self):
        """A child process on this machine has the same identity (so it may map our memory files)."""
        mine = system.machine_identity()
        self.assertIsNotNone(mine)
        child = subprocess.run(
            [sys.executable, "-c", "from cw.system import machine_identity; print(machine_identity())"],
            capture_output=True,
            text=True,
            timeout=60,
            env=system.with_cw_on_path(os.environ),
            check=True,
        )
        self.assertEqual(child.stdout.strip(), mine)

    def test_differs_for_another_user(self):
        """The user is part of it: another user's process may not open our files."""
        real = os.getuid
        self.addCleanup(setattr, os, "getuid", real)
        mine = system.machine_identity()
        os.getuid = lambda: real() + 1
        self.assertNotEqual(system.machine_identity(), mine)

    def test_environment_replaces_it(self):
        """CW_MACHINE_IDENTITY plays another machine, or turns the shortcut off with "none"."""
        self.addCleanup(os.environ.pop, "CW_MACHINE_IDENTITY", None)
        mine = system.machine_identity()
        os.environ["CW_MACHINE_IDENTITY"] = "elsewhere"
        self.assertEqual(system.machine_identity(), "elsewhere")
        os.environ["CW_MACHINE_IDENTITY"] = "none"
        self.assertIsNone(system.machine_identity())
        os.environ["CW_MACHINE_IDENTITY"] = ""
        self.assertEqual(system.machine_identity(), mine)
