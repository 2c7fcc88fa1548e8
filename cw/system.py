"""
Operating-system helpers shared by the layers above: atomic file writes,
reading C{/proc/PID/stat} (process states, parents and start times),
pidfiles that tell a process from a later one reusing its PID,
SIGKILL that ignores processes already gone, polling with exponential
back-off, putting this cw on a child's C{PYTHONPATH}, and mapping a big
buffer's pages in one system call rather than one page fault at a time
(L{populate}, L{copied}).

Layer rule: imports nothing of cw (it sits between cw.wire and cw.core, see
C{pyproject.toml}); no Twisted, no sockets: job processes import it.  The pure core must not import
it (it does I/O).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import itertools
import mmap
import os
import signal
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

#: The directory holding the C{cw} package (this file is cw/system.py), so
#: that child processes import this very code.
CW_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_atomically(path: str | os.PathLike, text: str, tmp_suffix: str = "") -> None:
    """
    Write C{text} to C{path} through a temporary file in the same directory
    and C{os.replace}, so that readers see the old file or the new one, never
    half of one.  C{tmp_suffix} goes into the temporary name besides the PID
    (a host name, where several machines share the directory).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}{tmp_suffix}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def proc_stat(pid: int | str) -> list[str] | None:
    """
    The fields of C{/proc/PID/stat} after the command name (Linux): C{[0]}
    is the state (C{Z} for a zombie), C{[1]} the parent's PID, C{[19]} the
    start time.  None if the process is gone (or this is not Linux).
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # The command name (in parentheses) may hold spaces and ")".
            return f.read().rsplit(b")", 1)[1].decode("ascii", "replace").split()
    except (OSError, IndexError):
        return None


def start_time(pid: int) -> str | None:
    """The kernel's start time of C{pid} (Linux), to tell a reused PID apart; None if unknown."""
    fields = proc_stat(pid)
    return fields[19] if fields is not None and len(fields) > 19 else None


def write_pidfile(path: str | os.PathLike, pid: int) -> None:
    """
    Record C{pid} in the pidfile C{path} as C{PID START}, START being the
    kernel's start time of the process (C{-} if unknown), so that
    L{read_pidfile} can tell the process started from a later one that
    reuses its PID.
    """
    Path(path).write_text(f"{pid} {start_time(pid) or '-'}\n")


def read_pidfile(path: str | os.PathLike) -> int | None:
    """
    The PID in the pidfile C{path} (as L{write_pidfile} writes it) if that
    process still runs and is the one started: not a zombie, and the same
    start time where both are known.  None if the file is missing or
    garbled, the process is gone, or its PID now belongs to another one.
    """
    try:
        pid_text, start = Path(path).read_text().split()
        pid = int(pid_text)
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    fields = proc_stat(pid)
    if fields is not None and fields[0] == "Z":
        return None
    if start != "-" and start_time(pid) not in (None, start):
        return None
    return pid


def sigkill(pid: int, group: bool = False) -> None:
    """SIGKILL process C{pid} (or, if C{group}, process group C{pid}); ignore it being gone or not ours."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)


def polling(first: float, most: float, factor: float = 2.0) -> Iterator[int]:
    """
    The rounds of a blocking polling loop: yields 0, 1, 2, ... and sleeps
    between rounds, C{first} seconds at first, then C{factor} times longer
    each round up to C{most}.  The loop's body checks its condition and
    deadline and leaves the loop.  (For blocking code without a reactor;
    reactor code uses Twisted's C{backoffPolicy}.)
    """
    delay = first
    for attempt in itertools.count():
        yield attempt
        time.sleep(delay)
        delay = min(delay * factor, most)


def with_cw_on_path(env: Mapping[str, str]) -> dict[str, str]:
    """
    A copy of C{env} with L{CW_ROOT} first on C{PYTHONPATH} (each entry once),
    so that a child process imports the same cw as this one.
    """
    env = dict(env)
    paths = [CW_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


#: The status L{exit_with_status} asked for (None: leave the exit status alone).
_exit_status: int | None = None


def exit_with_status(status: int) -> None:
    """
    Make this process exit with C{status} once it has finished normally:
    twistd returns 0 whenever its reactor stops, so a service that could not
    start (a port in use) would otherwise look like a clean exit.  The exit
    comes after twistd has removed its pidfile and flushed its log, and after
    every exit handler registered since cw.system was imported.
    """
    global _exit_status
    _exit_status = status


@atexit.register
def _exit_if_asked() -> None:
    if _exit_status is not None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(_exit_status)


# -- what this machine (or SLURM allocation) gives a worker -------------------


def affinity_cores() -> list[int]:
    """The cores this process may run on (its CPU affinity), in order."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return list(range(os.cpu_count() or 1))


def detect_cpus(env: Mapping[str, str], cores: list[int]) -> int:
    """
    Cores a worker has: under SLURM, its task's C{SLURM_CPUS_PER_TASK}
    (the allocation, whatever the affinity says where SLURM does not bind
    tasks); else those in C{cores} (its affinity), no more than
    C{SLURM_CPUS_ON_NODE} if set.
    """
    count = len(cores) or 1
    per_task = env.get("SLURM_CPUS_PER_TASK", "").strip()
    if per_task.isdigit() and int(per_task) > 0:
        return int(per_task)
    on_node = env.get("SLURM_CPUS_ON_NODE", "").strip()
    if on_node.isdigit() and int(on_node) > 0:
        return min(count, int(on_node))
    return count


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_memory_limit(
    proc: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")
) -> int | None:
    """
    This process's cgroup memory limit in bytes (cgroup v2 C{memory.max},
    or v1 C{memory.limit_in_bytes}), or None when there is none.
    """
    text = _read(proc) or ""
    limits = []
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        path = path.lstrip("/")
        if controllers == "":
            candidates = [root / path / "memory.max", root / "memory.max"]
        elif "memory" in controllers.split(","):
            candidates = [
                root / "memory" / path / "memory.limit_in_bytes",
                root / "memory" / "memory.limit_in_bytes",
            ]
        else:
            continue
        for candidate in candidates:
            value = _read(candidate)
            if value is not None:
                if value.isdigit() and int(value) < 1 << 60:
                    limits.append(int(value))
                break
    return min(limits) if limits else None


def physical_memory() -> int:
    """Bytes of physical memory."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def detect_memory(env: Mapping[str, str], cgroup: int | None, physical: int) -> int:
    """
    Memory a worker has: the cgroup limit if there is one, else physical
    memory, and under SLURM no more than C{SLURM_MEM_PER_NODE} (MiB).
    """
    memory = cgroup if cgroup else physical
    value = env.get("SLURM_MEM_PER_NODE", "").strip()
    if value.isdigit() and int(value) > 0:
        memory = min(memory, int(value) << 20) if memory else int(value) << 20
    return memory


def detect_gpus(env: Mapping[str, str]) -> tuple[str, ...]:
    """
    The ids of the GPUs a worker was given: C{CUDA_VISIBLE_DEVICES} if set
    (C{NoDevFiles} or an empty value: none), else SLURM's
    C{SLURM_STEP_GPUS}, else C{SLURM_JOB_GPUS}; none without any.
    """
    for name in ("CUDA_VISIBLE_DEVICES", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        if name in env:
            value = env[name].strip()
            if value in ("", "NoDevFiles") or value.startswith("-1"):
                return ()
            return tuple(part.strip() for part in value.split(",") if part.strip())
    return ()


def machine_identity() -> str | None:
    """
    What two processes share when each can open the other's memory files
    through C{/proc/PID/fd/N}: the same running kernel (its boot id), the
    same PID namespace (so a PID names the same process for both) and the
    same user.  Two processes with equal identities are on one machine
    and can pass big payloads through shared memory instead of sockets;
    C{None} where there is no C{/proc} (no such shortcut).

    C{CW_MACHINE_IDENTITY} in the environment replaces it: C{none} turns
    the shortcut off for this process; any other value stands for the
    identity (tests use it to play a process on another machine).
    """
    forced = os.environ.get("CW_MACHINE_IDENTITY")
    if forced:
        return None if forced.lower() == "none" else forced
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None
    return f"{boot}:{namespace}:{os.getuid()}"


#: C{madvise} advice (Linux 5.14; Python names them from 3.13): map a
#: range's pages now, as a read (without copying a private mapping's
#: pages, nor allocating any for memory never written: the zero page), or
#: as a write (allocated, so that writing them takes no page fault).
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)

_PAGE = mmap.PAGESIZE


class _Buffer(ctypes.Structure):
    """C{Py_buffer}: where an object's buffer lies, read-only ones included."""

    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


def _libc_function(name: str, *argtypes):
    """libc's function C{name}, or None where the advice above means nothing (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = list(argtypes)
    function.restype = ctypes.c_int
    return function


_madvise = _libc_function("madvise", ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_fallocate = _libc_function("fallocate", ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)

#: C{fallocate} modes (linux/falloc.h): free a range's blocks, the file's size unchanged.
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """
    Free the room bytes C{offset} to C{offset + length} of file C{fd} take
    (they read as zeros after; the file's size does not change); False
    where that cannot be done (not Linux, a file system without holes).
    """
    if _fallocate is None:
        return False
    return _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0


_mincore = _libc_function("mincore", ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)

# The C API, to find any buffer's address (read-only ones too) and to make
# bytes and bytearray objects without zeroing them first.
_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_Buffer), ctypes.c_int]
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_Buffer)]
_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
_new_bytes.restype = ctypes.py_object
_bytes_data = ctypes.pythonapi.PyBytes_AsString
_bytes_data.argtypes = [ctypes.py_object]
_bytes_data.restype = ctypes.c_void_p
_new_bytearray = ctypes.pythonapi.PyByteArray_FromStringAndSize
_new_bytearray.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
_new_bytearray.restype = ctypes.py_object


def _address(buffer) -> tuple[int, int]:
    """C{(address, length)} of C{buffer}'s bytes (a contiguous buffer, read-only or not)."""
    view = _Buffer()
    _get_buffer(buffer, ctypes.byref(view), 0)  # PyBUF_SIMPLE: raises BufferError if not contiguous
    try:
        return view.buf or 0, view.len
    finally:
        _release_buffer(ctypes.byref(view))


def address_of(buffer) -> int:
    """The address of C{buffer}'s first byte (a contiguous buffer): where a view lies in what it views."""
    return _address(buffer)[0]


def _advise(address: int, length: int, advice: int) -> None:
    if _madvise is None or length <= 0:
        return
    start = address - address % _PAGE
    _madvise(start, address + length - start, advice)  # an error (old kernel, read-only pages) is ignored


#: Pages of a buffer looked at to tell whether it is mapped already (L{_mapped}).
_SAMPLES = 16


def _mapped(address: int, length: int) -> bool:
    """
    True if a sample of the pages of C{length} bytes at C{address} (the
    first, the last and some between) are all mapped in this process: then
    the range very likely was written or read already.
    """
    if _mincore is None:
        return False
    start = address - address % _PAGE
    pages = (address + length - start + _PAGE - 1) // _PAGE
    vector = ctypes.create_string_buffer(1)
    for i in range(_SAMPLES):
        page = start + (pages - 1) * i // (_SAMPLES - 1) * _PAGE
        if _mincore(page, 1, vector) != 0 or not vector.raw[0] & 1:
            return False
    return True


def populate(buffer, write: bool = False) -> None:
    """
    Map every page of C{buffer} (any contiguous buffer) into this
    process now, in one system call (C{MADV_POPULATE_READ}, or
    C{MADV_POPULATE_WRITE} if C{write}), rather than one page fault per
    page when it is first read or written: a fault costs microseconds (a
    trap, more in a virtual machine), a gigabyte has 262,144 pages.  For
    pages already mapped it would cost about 0.04 ms per MB (a walk of the
    page tables): a buffer whose sampled pages are all mapped already
    (L{_mapped}: C{mincore} of a few pages) is left as it is for a read.
    Whole pages around the buffer's ends are included; nothing
    is read or changed.  Best effort: does nothing where the advice is not
    known (not Linux, Linux before 5.14) or refused (C{write} on read-only
    memory), nor for an empty buffer.
    """
    if _madvise is None:
        return
    address, length = _address(buffer)
    if write:
        _advise(address, length, MADV_POPULATE_WRITE)
    else:
        _populate_read(address, length)


def _populate_read(address: int, length: int) -> None:
    if length > 0 and not _mapped(address, length):
        _advise(address, length, MADV_POPULATE_READ)


#: L{copied} makes smaller copies as C{bytes(buffer)} does (few pages: the
#: system calls would cost more than they save).
COPY_IN_BULK_ABOVE = 1 << 20


def copied(buffer, kind: type = bytes) -> bytes | bytearray:
    """
    A new C{bytes} (or C{bytearray}, C{kind}) holding a copy of
    C{buffer} (contiguous), as C{kind(buffer)} makes, but faster for big
    buffers: the source's and the new object's pages are mapped in bulk
    first (L{populate}), and the new object is not zeroed before the copy.
    Below L{COPY_IN_BULK_ABOVE} bytes, C{kind(buffer)} itself.
    """
    if kind is not bytes and kind is not bytearray:
        raise TypeError(f"copied() makes bytes or bytearray, not {kind.__name__}")
    # The view holds the source's buffer until the copy is made (the copy
    # runs without the GIL): meanwhile a bytearray cannot be resized, an
    # mmap not closed.
    with memoryview(buffer) as view:
        if view.nbytes < COPY_IN_BULK_ABOVE or not view.c_contiguous:
            return kind(view)
        address, length = _address(view)
        if kind is bytes:
            new = _new_bytes(None, length)
            target = _bytes_data(new)  # written before anything else sees it, as C code builds bytes
        else:
            new = _new_bytearray(None, length)
            target = _address(new)[0]
        _populate_read(address, length)
        _advise(target, length, MADV_POPULATE_WRITE)
        ctypes.memmove(target, address, length)
    return new


def unfilled_bytearray(length: int) -> bytearray:
    """
    A new C{bytearray} of C{length} bytes whose contents are undefined
    (not zeroed, as C{bytearray(length)} would: that writes every page),
    for a receiver that fills it all before anyone reads it.  Its pages
    are not mapped yet: map them ahead of the writes with L{populate_range}.
    Raises C{MemoryError} if it cannot be allocated.
    """
    if length < COPY_IN_BULK_ABOVE:
        return bytearray(length)
    return _new_bytearray(None, length)


def populate_range(buffer, start: int, end: int) -> None:
    """
    Map bytes C{start} to C{end} of C{buffer} (writable, contiguous) for
    writing, in one system call (C{MADV_POPULATE_WRITE}), as L{populate}
    does for a whole buffer: so a receiver writing a big value into a
    fresh buffer maps it a window at a time, never more than it fills.
    """
    if _madvise is None or end <= start:
        return
    address, length = _address(buffer)
    _advise(address + start, min(end, length) - start, MADV_POPULATE_WRITE)
