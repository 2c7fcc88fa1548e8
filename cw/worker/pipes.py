"""
Faster pipes between a worker and its job processes.

Twisted reads a child process's pipe 8 KiB at a time
(L{twisted.internet.fdesc.readFromFD}), and a Linux pipe holds 64 KiB.  A
job's payload of hundreds of megabytes then crosses in hundreds of
thousands of reads, each handed to AMP, which copies its partial buffer
each time.  L{bulk_pipe_reads} makes this process read
its pipes up to L{READ_SIZE} at a time, and L{widen_pipe} lets a pipe hold
L{PIPE_SIZE}; worker and job process both use them (the worker's sockets
are not affected: TCP reads have their own size).

Layer rule (cw.worker): imports cw.discovery and below; never cw.client, cw.master, cw.launch or cw.cli.
"""

from __future__ import annotations

import errno
import fcntl
import os

from twisted.internet import main

from cw.wire.private import replace_pipe_reads

#: Bytes read from a pipe at once.
READ_SIZE = 1 << 16

#: Bytes a pipe may hold (Linux caps this at /proc/sys/fs/pipe-max-size).
PIPE_SIZE = 1 << 20

_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def _do_read(self):
    try:
        output = os.read(self.fd, READ_SIZE)
    except OSError as e:
        if e.args[0] in (errno.EAGAIN, errno.EINTR):
            return None
        return main.CONNECTION_LOST
    if not output:
        return main.CONNECTION_DONE
    self.dataReceived(output)
    return None


def bulk_pipe_reads() -> None:
    """Read every child-process pipe of this process up to L{READ_SIZE} at a time."""
    replace_pipe_reads(_do_read)


def widen_pipe(fd: int) -> bool:
    """Let the pipe behind C{fd} hold L{PIPE_SIZE} bytes; False if refused."""
    try:
        fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        return False
    return True
