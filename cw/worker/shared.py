"""
Big payloads between a worker and its job processes through shared memory
rather than through the pipe.

Through the pipe, a payload is written by one process and read by the
other in 64 KiB pieces, each copied in and out of the kernel and into the
receiver's growing buffer.  Instead, a payload of L{THRESHOLD} bytes or
more goes into an anonymous memory file (C{memfd_create}): the sender
writes it once, and the receiver maps it, without copying it.  Only where
it lies (the process and descriptor, the offset and length) crosses the
pipe.

The files have no name (nothing in C{/dev/shm}): they vanish with the last
descriptor and mapping, so no process dying anywhere can leak one.  The
I{worker} creates every file and holds its descriptor: the job process
opens it through C{/proc/WORKER/fd/N} while it handles the call that named
it, and closes it at once (see L{cw.worker.pool.ChildLink} for when the
worker closes its own).

 - Arguments: the worker writes the batch's big payloads into one file,
   seals it (no process can change, grow or shrink it any more) and sends
   its descriptor with the call; the job process maps it copy-on-write
   (L{map_private}: a writable view that is only copied where written) and
   unpickles from the mapping.
 - Results: each job process is given a file to answer into (the reply
   file, created when first needed and again after each use); it writes the
   batch's big results into it (L{write_parts}) and says where in its
   answer; the worker seals and maps it (L{map_shared}) and passes the
   mapping on to the master without copying it into bytes.

The files' primitives are in L{cw.wire.memfile}.  L{supported} tells
whether this machine can (Linux's C{memfd_create} and C{/proc}); where
it cannot, or a job process finds it cannot open the worker's file,
payloads travel through the pipe as before.

Layer rule (cw.worker): imports cw.discovery and below; never cw.client, cw.master, cw.launch or cw.cli.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from cw.core.payload import ResultReference

# The memory files themselves live a layer down (the client makes some too).
from cw.wire.memfile import (  # noqa: F401 (this module's names, as before)
    ALIGN,
    NAME,
    aligned,
    create,
    map_private,
    map_shared,
    peer_path,
    placed,
    release,
    seal,
    sealed,
    supported,
    write_parts,
)

#: Payloads of this many bytes or more travel through shared memory.
THRESHOLD = 1 << 20


class ReplyFile:
    """
    A job process's reply file, sealed, whose big results its worker may
    lend to their clients (L{LentResults}) rather than send: open while
    the batch's answer is handled or any lent result is not released.
    """

    def __init__(self, fd: int, places: dict[tuple[int, int], tuple[int, int]]) -> None:
        self.fd = fd
        self.inode = os.fstat(fd).st_ino
        #: C{(offset, length)} of each big result in it, by job key.
        self.places = places
        self._users = 1

    def reference(self, key: tuple[int, int], worker: int) -> ResultReference:
        """Where the result of job C{key} lies, for worker id C{worker}."""
        offset, length = self.places[key]
        return ResultReference(os.getpid(), self.fd, self.inode, offset, length, worker)

    def hold(self) -> None:
        self._users += 1

    def drop(self) -> None:
        """One user less: the last closes the file (mappings of it stay valid)."""
        self._users -= 1
        if self._users == 0:
            os.close(self.fd)
            self.fd = -1


class LentResults:
    """
    The reply files of results a worker sent by reference, by job key
    C{(client, seq)}, held until the client releases them
    (L{cw.wire.commands.ReleaseResults}), the master forgets the client
    or the master connection is lost.
    """

    def __init__(self) -> None:
        self._files: dict[tuple[int, int], ReplyFile] = {}

    def __len__(self) -> int:
        return len(self._files)

    def lend(self, key: tuple[int, int], file: ReplyFile) -> None:
        """Hold C{file} for the result of job C{key}."""
        file.hold()
        old = self._files.pop(key, None)
        self._files[key] = file
        if old is not None:
            old.drop()

    def release(self, keys: Iterable[tuple[int, int]]) -> None:
        """These results are taken: close their files once nothing else needs them."""
        for key in keys:
            file = self._files.pop(key, None)
            if file is not None:
                file.drop()

    def forget_client(self, client: int) -> None:
        """Release every result lent to C{client}."""
        self.release([key for key in self._files if key[0] == client])

    def clear(self) -> None:
        """Release them all."""
        self.release(list(self._files))
