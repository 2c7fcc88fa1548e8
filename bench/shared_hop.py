"""
The hop between a worker and its job process alone: one big argument, then
one big result, through the pipe and through shared memory
(L{cw.worker.shared}), alternating, in a worker's job pool in this process
(no master, no client).  Prints the rates in MB/s, median and each run.

    python bench/shared_hop.py              # 50 MB, 6 rounds
    python bench/shared_hop.py 1e9 2        # 1 GB, 2 rounds
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from twisted.internet import defer, reactor

from cw.wire import commands as P
from cw.wire import pickling
from cw.worker.child import JobChild
from cw.worker.pool import BatchCall, JobPool
from cw.worker.service import JobStarter, job_process_env


def job(seq: int, func, *args) -> P.Job:
    return P.Job(1, seq, pickling.dumps(pickling.call_value(func, args, {})))


@defer.inlineCallbacks
def one_round(pool: JobPool, mode: str, size: int, rates: dict):
    for link in pool.processes:
        link.shares = mode == "shm"
        link._close_reply()  # a new one, made as the mode says
    blob = os.urandom(size)
    sent = job(1, len, blob)
    del blob
    start = time.perf_counter()
    answer = yield pool.doWork(P.RunBatch, jobs=[sent], _cw_call=BatchCall())
    rates[mode]["argument"].append(size / 1e6 / (time.perf_counter() - start))
    assert pickling.loads(answer["results"][0].payload) == size
    del answer, sent
    start = time.perf_counter()
    answer = yield pool.doWork(P.RunBatch, jobs=[job(2, bytes, size)], _cw_call=BatchCall())
    assert len(answer["results"][0].payload) >= size
    rates[mode]["result"].append(size / 1e6 / (time.perf_counter() - start))


@defer.inlineCallbacks
def main(size: int, rounds: int):
    pool = JobPool(
        JobChild,
        min=1,
        max=1,
        maxIdle=3600,
        recycleAfter=0,
        starter=JobStarter(job_process_env(), reactor),
        ampChildArgs=("0",),
        clock=reactor,
    )
    rates = {mode: {"argument": [], "result": []} for mode in ("pipe", "shm")}
    try:
        yield pool.start()
        yield pool.doWork(P.RunBatch, jobs=[job(0, len, b"")], _cw_call=BatchCall())
        for i in range(rounds):
            for mode in ("pipe", "shm") if i % 2 == 0 else ("shm", "pipe"):
                yield one_round(pool, mode, size, rates)
        for mode, figures in rates.items():
            for what, values in figures.items():
                runs = ", ".join(f"{v:.0f}" for v in values)
                median = statistics.median(values)
                print(f"{mode:4} {size / 1e6:g} MB {what:8}: median {median:.0f} MB/s ({runs})")
    finally:
        yield pool.stop()
        reactor.stop()


if __name__ == "__main__":
    size = int(float(sys.argv[1])) if len(sys.argv) > 1 else 50_000_000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 6
    reactor.callWhenRunning(main, size, rounds)
    reactor.run()
