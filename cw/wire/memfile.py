"""
Anonymous memory files (C{memfd_create}) that carry big payloads from one
process to another on the same machine without copying them through a
socket or a pipe: the primitives, shared by the worker (to its job
processes, L{cw.worker.shared}) and the client (its big job arguments,
opened by job processes on its machine).

A file is written once (L{write_parts}), then sealed (L{seal}: no process
can change, grow or shrink it any more); another process of the same user,
boot and PID namespace (L{cw.system.machine_identity}) opens it through
C{/proc/PID/fd/N} (L{peer_path}) and maps it copy-on-write
(L{map_private}), or its owner maps it read-only (L{map_shared}).  The
files have no name (nothing in C{/dev/shm}): they vanish with the last
descriptor and mapping, so no process dying anywhere can leak one.

Layer rule (cw.wire): imports Twisted, ampoule, cw.system, cw.core and cw.errors; nothing above.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import weakref

from cw.core.payload import Segments
from cw.system import MADV_POPULATE_READ, address_of, populate

#: What cw's memory files are called in C{/proc/PID/fd} (their only name).
NAME = "cw-payload"

#: Once sealed, a file cannot be written, grown or shrunk (so a mapping of
#: it never faults past its end) nor unsealed.
_SEALS = (
    getattr(fcntl, "F_SEAL_WRITE", 8)
    | getattr(fcntl, "F_SEAL_GROW", 4)
    | getattr(fcntl, "F_SEAL_SHRINK", 2)
    | getattr(fcntl, "F_SEAL_SEAL", 1)
)
_F_ADD_SEALS = getattr(fcntl, "F_ADD_SEALS", 1033)
_F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)
_SEAL_SEAL = getattr(fcntl, "F_SEAL_SEAL", 1)
#: A received file (L{map_received}) may not shrink under its mapping.
_SEAL_SHRINK = getattr(fcntl, "F_SEAL_SHRINK", 2)

#: Each payload in a memory file starts at a multiple of this many bytes
#: (as out-of-band buffers do within a payload, see L{cw.core.payload}):
#: arrays loaded from the mapping are aligned.
ALIGN = 64

#: Parts of at least this many bytes have their pages mapped in bulk
#: (L{cw.system.populate}) before they are written.
POPULATE_ABOVE = 256 << 10

#: Bytes given to one C{pwrite} (Linux writes at most about 2 GiB at once).
_WRITE = 1 << 30

_supported: bool | None = None


def supported() -> bool:
    """
    True if this process can create memory files that its children can
    open through C{/proc} (tried once, on a file of its own).
    """
    global _supported
    if _supported is None:
        _supported = False
        if hasattr(os, "memfd_create"):
            try:
                fd = create()
            except OSError:
                pass
            else:
                try:
                    os.close(os.open(peer_path(os.getpid(), fd), os.O_RDONLY | os.O_CLOEXEC))
                    _supported = True
                except OSError:
                    pass
                finally:
                    os.close(fd)
    return _supported


def create() -> int:
    """A new, empty memory file's descriptor (closed on exec, sealable)."""
    return os.memfd_create(NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)


def peer_path(pid: int, fd: int) -> str:
    """The path through which another process opens descriptor C{fd} of process C{pid}."""
    return f"/proc/{pid}/fd/{fd}"


def write_parts(fd: int, payloads, offset: int = 0) -> int:
    """
    Write C{payloads} (bytes-like, or L{Segments} written part by part,
    never joined), one after another, at C{offset} of file C{fd}; return
    the offset after them.
    """
    parts = []
    for payload in payloads:
        parts += payload.parts if isinstance(payload, Segments) else [payload]
    for part in parts:
        view = memoryview(part).cast("B")
        done = 0
        while done < len(view):
            piece = view[done : done + _WRITE]
            if len(piece) >= POPULATE_ABOVE:
                # Pages never touched (C{bytes(n)}, fresh arrays) would
                # otherwise fault in one by one inside the write: 3 times slower.
                populate(piece)
            done += os.pwrite(fd, piece, offset + done)
        offset += done
    return offset


def aligned(offset: int) -> int:
    """The first offset at or after C{offset} where a payload may start (L{ALIGN})."""
    return -(-offset // ALIGN) * ALIGN


def seal(fd: int) -> None:
    """Forbid any change to file C{fd} from now on (see L{_SEALS})."""
    fcntl.fcntl(fd, _F_ADD_SEALS, _SEALS)


def sealed(fd: int) -> bool:
    """Whether file C{fd} was L{seal}ed (it may not be changed any more)."""
    return bool(fcntl.fcntl(fd, _F_GET_SEALS) & _SEAL_SEAL)


def map_shared(fd: int, length: int, populate: bool = True) -> memoryview:
    """
    A read-only view of the first C{length} bytes of the sealed file
    C{fd}, mapped with its pages in place (so that reading it takes no
    page faults; unless not C{populate}: for a file that may not be read
    here at all); the mapping lasts as long as a view of it does.
    """
    if os.fstat(fd).st_size < length:
        raise ValueError(f"the memory file holds fewer than the {length:,} bytes announced")
    flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
    return memoryview(mmap.mmap(fd, length, flags=flags, prot=mmap.PROT_READ))


def map_private(
    pid: int,
    fd: int,
    length: int,
    inode: int | None = None,
    whose: str = "worker",
    offset: int = 0,
    populate: bool = True,
) -> memoryview:
    """
    A writable, copy-on-write view of C{length} bytes from C{offset} of
    process C{pid}'s file C{fd}: pages are shared with the file until
    written (only the pages holding them are mapped).  With C{inode}, the
    file must be that one (not another that
    took the descriptor's number since, nor one of another process that
    took the pid).  Raise L{OSError} if it cannot be opened or is not the
    file announced (C{whose}: the process's role, for the message).
    Unless not C{populate} (work in proportion to the size, which a
    reactor thread must not do), every page is mapped at once.
    """
    handle = os.open(peer_path(pid, fd), os.O_RDONLY | os.O_CLOEXEC)
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    try:
        status = os.fstat(handle)
        if inode is not None and status.st_ino != inode:
            raise OSError(f"descriptor {fd} of the {whose} (pid {pid}) is not the memory file announced")
        if status.st_size < offset + length:
            raise OSError(
                f"the {whose}'s memory file holds fewer than the {offset + length:,} bytes announced"
            )
        mapping = mmap.mmap(
            handle,
            offset + length - start,
            flags=mmap.MAP_PRIVATE,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
            offset=start,
        )
    finally:
        os.close(handle)
    if populate:
        _populate(mapping)
    view = memoryview(mapping)
    return view if start == offset else view[offset - start :]


def _populate(mapping: mmap.mmap) -> None:
    try:
        # Map every page now, read-only and shared with the file (a write
        # still copies its page), in one call rather than one fault per page.
        mapping.madvise(MADV_POPULATE_READ)
    except OSError:
        pass  # a kernel older than 5.14: pages fault in as they are read


def release(view: memoryview | None) -> None:
    """
    Unmap what C{view} (of L{map_private} or L{map_shared}) maps now if
    nothing else uses it; otherwise it goes when its last user does.
    """
    if view is None:
        return
    mapping = view.obj
    try:
        view.release()
        mapping.close()
    except BufferError:
        pass  # still exported (a job kept part of its argument): left to the garbage collector


class FileMapping(mmap.mmap):
    """
    A copy-on-write mapping of a whole sealed memory file that a receiver
    wrote a value into (L{cw.wire.streaming.ChunkReceiver}, L{map_received}),
    holding the file's descriptor C{fd} (closed when the mapping is
    collected): a payload lying in it (a view of it) can be handed to
    another process as its place in the file (L{placed}), without being
    copied into a new file.
    """

    #: The file's descriptor (this process's), and the mapping's address.
    fd = -1
    address = 0


def map_received(fd: int, length: int) -> FileMapping:
    """
    Map the first C{length} bytes of memory file C{fd}, which a receiver
    wrote, copy-on-write (writable: a write copies its page and never
    reaches the file), unpopulated (the pages are mapped as they are
    read).  The file may not shrink any more (so the mapping never faults
    past its end); whoever hands it on L{seal}s it first (having maybe
    appended to it, L{cw.worker.pool}).  The mapping owns C{fd} from now
    on (unless this raises L{OSError}: C{fd} is then still the caller's).
    """
    fcntl.fcntl(fd, _F_ADD_SEALS, _SEAL_SHRINK)
    mapping = FileMapping(fd, length, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    mapping.fd = fd
    weakref.finalize(mapping, os.close, fd)
    mapping.address = address_of(mapping)
    return mapping


def placed(payload) -> tuple[FileMapping, int] | None:
    """
    If C{payload} is a view of a L{FileMapping}, that mapping and where
    the payload starts in its file; else None.
    """
    if not isinstance(payload, memoryview):
        return None
    mapping = payload.obj
    if not isinstance(mapping, FileMapping) or mapping.closed:
        return None
    return mapping, address_of(payload) - mapping.address
