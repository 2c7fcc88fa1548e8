"""
Square some numbers on a cw cluster with a ClientThread.

Each job gets a random id from cw.randid(); the callback receives
(jobid, result) for every job that succeeds, in the client thread, in the
order results come back (not the order of submission).

Usage: python examples/square.py [MASTER]

MASTER is a host name, HOST:PORT or an endpoint description such as
tcp:host=node12:port=5494; without it the client uses $CW_MASTER, else the
SLURM master if SLURM is in use, else localhost.
"""

import sys

import cw
from cw.client import ClientThread


def square(n):
    return n * n


def main(host=None, count=10):
    inputs = {}  # jobid -> the number that job squares

    def show(jobid, result):
        print(f"square({inputs[jobid]}) = {result}    [job {jobid:032x}]", flush=True)

    # Entering the block connects to the master (MasterUnavailable if none
    # answers); leaving it waits for the remaining jobs and disconnects.
    with ClientThread(show, host) as client:
        for n in range(count):
            jobid = cw.randid()
            inputs[jobid] = n
            client.submit(jobid, square, n)
        # Blocks until every job has finished and its callback has run;
        # a job that raised is re-raised here as cw.client.RemoteException.
        client.wait()
    print(f"{count} squares computed", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
