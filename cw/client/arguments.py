"""
Big job arguments left in the client's memory rather than sent.

When the master allows it (L{P.RegisterClient}'s C{references}: the
client said which machine it runs on, L{cw.system.machine_identity}), a
job payload of L{REFERENCE_ABOVE} bytes or more is written once into a
sealed memory file of this process (L{cw.wire.memfile}) and the job is
sent with a reference to it (L{cw.core.payload.reference}: this pid, the
descriptor, the file's inode and length) instead of the bytes.  A job
process on this machine opens the file through C{/proc} and maps it; for
a worker on another machine, the master asks for the bytes
(L{P.FetchPayload}, answered from a read-only mapping of the file).

A file is kept until its job's result arrives, the job is cancelled, or
the session ends: a job retried after its worker died (or resent after a
reconnection) finds it still there.  Files have no name and vanish with
this process, so nothing leaks whatever dies.

Layer rule (cw.client): imports cw.discovery and below; never cw.master, cw.worker, cw.launch or cw.cli.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable

from cw.core.payload import Segments, reference
from cw.errors import PayloadUnavailable
from cw.wire import memfile

#: Job payloads of at least this many bytes are left in the client's
#: memory (when the master allows it): below it, the bytes cost less to
#: send than a memory file costs to make, map and close.
REFERENCE_ABOVE = 256 << 10


class ArgumentFiles:
    """
    The memory files holding this client's big job arguments, by job
    number (used by the submitting threads and the reactor thread).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: C{(descriptor, length)} by job number.
        self._files: dict[int, tuple[int, int]] = {}

    def __len__(self) -> int:
        return len(self._files)

    def leave(self, seq: int, payload: bytes | Segments) -> bytes | None:
        """
        Write job C{seq}'s C{payload} into a new sealed memory file and
        return the reference to send in its place; None if no file can be
        made (the bytes are sent as they are).
        """
        try:
            fd = memfile.create()
        except OSError:
            return None
        try:
            length = memfile.write_parts(fd, [payload])
            memfile.seal(fd)
            inode = os.fstat(fd).st_ino
        except OSError:
            os.close(fd)
            return None
        with self._lock:
            old = self._files.pop(seq, None)
            self._files[seq] = (fd, length)
        if old is not None:
            os.close(old[0])
        return reference(os.getpid(), fd, inode, length)

    def read(self, seq: int) -> memoryview:
        """
        Job C{seq}'s payload, as a read-only view of its file (nothing
        copied); L{PayloadUnavailable} if this client no longer holds it.
        """
        with self._lock:
            entry = self._files.get(seq)
            if entry is None:
                raise PayloadUnavailable(
                    f"the client no longer holds job {seq}'s argument (the job ended or was cancelled)"
                )
            return memfile.map_shared(*entry)

    def close(self, seqs: Iterable[int] | None = None) -> None:
        """Close the files of jobs C{seqs} (those it has; all of them by default)."""
        with self._lock:
            if seqs is None:
                closing, self._files = list(self._files.values()), {}
            else:
                closing = []
                for seq in seqs:
                    entry = self._files.pop(seq, None)
                    if entry is not None:
                        closing.append(entry)
        for fd, _ in closing:
            os.close(fd)

    def take_back(self, seq: int) -> bytes:
        """
        Job C{seq}'s payload as bytes, its file closed: for a master that
        takes no references (the client reconnected to one with C{--state}).
        """
        data = bytes(self.read(seq))
        self.close([seq])
        return data

    def descriptors(self) -> list[int]:
        """The descriptors of the files held (for tests)."""
        with self._lock:
            return [fd for fd, _ in self._files.values()]
