"""
Use a cw cluster as a concurrent.futures Executor.

Shows submit() with as_completed() (results in the order jobs finish),
map() (results in the order of the inputs) and how a job's exception
reaches the client: as its own class, which is also a RemoteException.

Usage: python examples/executor.py [MASTER]

MASTER is a host name, HOST:PORT or an endpoint description; without it
the client uses $CW_MASTER, else the SLURM master if SLURM is in use, else
localhost.
"""

import os
import random
import socket
import sys
import time
from concurrent.futures import as_completed

from cw.client import ClusterExecutor, RemoteException


def slow_square(n):
    """Square n after a short random nap; also say where the job ran."""
    time.sleep(random.uniform(0.0, 0.3))
    return n * n, f"{socket.gethostname()}:{os.getpid()}"


def reciprocal(x):
    return 1 / x


def main(host=None):
    with ClusterExecutor(host) as ex:
        status = ex.status()
        slots = sum(w["slots"] for w in status["workers"])
        print(f"master has {len(status['workers'])} workers with {slots} slots", flush=True)

        # Results as they complete.
        futures = {ex.submit(slow_square, n): n for n in range(8)}
        for future in as_completed(futures):
            value, where = future.result()
            print(f"done: {futures[future]}^2 = {value}  (ran in {where})", flush=True)

        # map() yields results in the order of its inputs.
        squares = [value for value, _ in ex.map(slow_square, range(8))]
        print(f"map, in order: {squares}", flush=True)

        # A job that raises: future.result() raises the job's exception, an
        # instance of both ZeroDivisionError and RemoteException.
        try:
            ex.submit(reciprocal, 0).result()
        except ZeroDivisionError as e:
            assert isinstance(e, RemoteException)
            print(f"remote failure: {e.type}: {e.message} (on {e.host}, pid {e.pid})", flush=True)
    # Leaving the block waits for outstanding jobs and disconnects.


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
