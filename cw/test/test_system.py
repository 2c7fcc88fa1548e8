"""
Tests for L{cw.system}: the operating-system helpers the layers share.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import pickle
import subprocess
import sys
from pathlib import Path
from unittest import SkipTest, skipIf

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


PAGE = mmap.PAGESIZE


def resident(buffer) -> list[bool]:
    """Whether each page holding C{buffer} is mapped in this process (C{mincore})."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    address, length = system._address(buffer)
    start = address - address % PAGE
    pages = (address + length - start + PAGE - 1) // PAGE
    vector = ctypes.create_string_buffer(pages)
    if libc.mincore(start, pages * PAGE, vector) != 0:
        raise OSError(ctypes.get_errno(), "mincore")
    return [bool(b & 1) for b in vector.raw]


def untouched(pages: int) -> mmap.mmap:
    """A private anonymous mapping of C{pages} pages, none of them mapped yet."""
    return mmap.mmap(-1, pages * PAGE)


@skipIf(not sys.platform.startswith("linux"), "madvise(MADV_POPULATE_*) and mincore are Linux's")
class PopulateTests(unittest.TestCase):
    """L{system.populate}: a buffer's pages mapped in one system call, best effort."""

    def setUp(self):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        probe = untouched(1)
        self.addCleanup(probe.close)
        if libc.madvise(system._address(probe)[0], PAGE, system.MADV_POPULATE_READ) != 0:
            raise SkipTest("this kernel has no MADV_POPULATE_READ (Linux 5.14)")

    def test_maps_every_page(self):
        mapping = untouched(64)
        self.assertEqual(resident(mapping), [False] * 64)
        system.populate(mapping)
        self.assertEqual(resident(mapping), [True] * 64)
        self.assertEqual(mapping[:], bytes(64 * PAGE), "nothing written")

    def test_for_writing(self):
        mapping = untouched(8)
        system.populate(memoryview(mapping), write=True)
        self.assertEqual(resident(mapping), [True] * 8)
        self.assertEqual(mapping[:], bytes(8 * PAGE))

    def test_unaligned(self):
        """A view starting and ending within pages: exactly the pages holding it."""
        mapping = untouched(8)
        view = memoryview(mapping)[PAGE + 100 : 4 * PAGE + 1]
        system.populate(view)
        self.assertEqual(resident(mapping), [False, True, True, True, True, False, False, False])

    def test_empty(self):
        system.populate(b"")
        mapping = untouched(2)
        system.populate(memoryview(mapping)[PAGE:PAGE])
        system.populate(memoryview(mapping)[PAGE:PAGE], write=True)
        self.assertEqual(resident(mapping), [False, False])

    def test_read_only(self):
        """Populating read-only memory for writing is refused by the kernel, and ignored."""
        mapping = mmap.mmap(-1, 4 * PAGE, prot=mmap.PROT_READ)
        system.populate(mapping, write=True)
        system.populate(mapping)
        self.assertEqual(resident(mapping), [True] * 4)
        self.assertEqual(mapping[:], bytes(4 * PAGE))

    def test_pages_mapped_already_skipped(self):
        """A buffer whose pages are mapped already costs no madvise."""
        calls = []
        real = system._madvise
        self.patch(system, "_madvise", lambda *a: calls.append(a) or real(*a))
        touched = bytearray(os.urandom(64 * PAGE))
        system.populate(touched)
        self.assertEqual(calls, [])
        mapping = untouched(64)
        mapping[32 * PAGE] = 1  # one page mapped: not enough
        system.populate(mapping)
        self.assertEqual(len(calls), 1)
        self.assertEqual(resident(mapping), [True] * 64)

    def test_not_contiguous(self):
        with self.assertRaises(BufferError):
            system.populate(memoryview(bytes(100))[::2])


class PopulateElsewhereTests(unittest.TestCase):
    """Where there is no madvise (not Linux), populating does nothing and copies still copy."""

    def setUp(self):
        self.patch(system, "_madvise", None)
        self.patch(system, "_mincore", None)

    def test_populate_does_nothing(self):
        system.populate(bytes(1 << 21))
        system.populate(bytearray(10), write=True)

    def test_copied(self):
        data = os.urandom(system.COPY_IN_BULK_ABOVE + 5)
        self.assertEqual(system.copied(memoryview(data)[1:]), data[1:])
        self.assertEqual(system.copied(data, bytearray), bytearray(data))

    def test_no_libc_madvise(self):
        self.patch(sys, "platform", "darwin")
        self.assertIsNone(system._libc_function("madvise"))


class CopiedTests(unittest.TestCase):
    """L{system.copied}: C{bytes(buffer)} or C{bytearray(buffer)}, made with bulk-mapped pages."""

    def check(self, source, kind=bytes) -> None:
        made = system.copied(source, kind)
        self.assertIs(type(made), kind)
        self.assertEqual(made, kind(source))
        return made

    def test_sizes(self):
        data = os.urandom(3 * system.COPY_IN_BULK_ABOVE + 3)
        for size in (0, 1, 4095, system.COPY_IN_BULK_ABOVE - 1, system.COPY_IN_BULK_ABOVE, len(data)):
            for kind in (bytes, bytearray):
                self.check(memoryview(data)[:size], kind)

    def test_unaligned_source(self):
        data = os.urandom(2 * system.COPY_IN_BULK_ABOVE + 100)
        self.check(memoryview(data)[7:-9])
        self.check(pickle.PickleBuffer(data), bytearray)

    def test_read_only_untouched_source(self):
        """From a read-only mapping never read (as a result's memory file mapped by the client)."""
        size = 2 * system.COPY_IN_BULK_ABOVE + 1
        fd = os.memfd_create("cw-test")
        self.addCleanup(os.close, fd)
        os.pwrite(fd, os.urandom(size), 0)
        mapping = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        self.addCleanup(mapping.close)
        view = memoryview(mapping)
        self.addCleanup(view.release)
        self.assertEqual(system.copied(view), os.pread(fd, size, 0))

    def test_bytearray_is_its_own(self):
        data = os.urandom(system.COPY_IN_BULK_ABOVE * 2)
        made = self.check(data, bytearray)
        made[0] ^= 0xFF
        self.assertNotEqual(made[0], data[0])

    def test_not_contiguous(self):
        data = os.urandom(system.COPY_IN_BULK_ABOVE * 3)
        self.check(memoryview(data)[::3])

    def test_other_kind_refused(self):
        self.assertRaises(TypeError, system.copied, b"abc", str)

    def test_source_held_while_copied(self):
        """The copy runs without the GIL: meanwhile the source cannot be resized (nor freed)."""
        source = bytearray(os.urandom(system.COPY_IN_BULK_ABOVE * 2))
        refused = []
        real = ctypes.memmove

        def memmove(target, address, length):
            try:
                source.extend(b"more")
            except BufferError:
                refused.append(True)
            return real(target, address, length)

        self.patch(ctypes, "memmove", memmove)
        self.assertEqual(system.copied(source), bytes(source))
        self.assertEqual(refused, [True])
