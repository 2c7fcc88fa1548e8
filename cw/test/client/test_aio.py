"""
L{cw.aio.AsyncClusterExecutor} in real asyncio programs: each test runs a
plain C{asyncio.run} script (trial's own reactor runs in this process, so
the programs are processes of their own, as a user's would be) against a
real master and worker, and checks what the script printed.

The scripts run under C{python -W error::DeprecationWarning}: a deprecated
call in crochet or cw fails them.

The tests share one master with one worker of one job process, so that the
order jobs run in is their submission order: a job that was not withdrawn
would have run before the next one.
"""

from __future__ import annotations

import os
import textwrap

from twisted.internet import threads
from twisted.trial import unittest

from cw.test.procs import run_script, shared_cluster

#: A deprecated call fails the scripts.
STRICT = ("-W", "error::DeprecationWarning")

#: Shared by the scripts: what the program has left once its executor is
#: closed (threads other than the reactor's, tasks other than its own).
PRELUDE = """
import asyncio, os, sys, threading, time
from cw.aio import AsyncClusterExecutor
from cw.test.jobs import block_until, square, touch
from cw.test.procs import process_exists

ADDRESS = sys.argv[1]

def leftovers():
    # The reactor's threads (crochet's, and its thread pool's) are the
    # process's, shared by every cw client, and end with it.
    threads = [
        t.name for t in threading.enumerate()
        if t is not threading.main_thread()
        and not t.name.startswith(("Crochet", "PoolThread-twisted.internet.reactor"))
    ]
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    return threads, tasks
"""


class AsyncioTests(unittest.TestCase):
    timeout = 180
    maxDiff = None

    def run_program(self, source: str, first: str = "") -> str:
        """
        Run PRELUDE + C{source} (after C{first}, if given) against the shared
        cluster; its output, once it exited cleanly.
        """

        def run():
            address = shared_cluster("aio", slots=(1,)).address
            program = textwrap.dedent(first) + PRELUDE + textwrap.dedent(source)
            return run_script(self, program, address, python_options=STRICT)

        def check(result):
            self.assertEqual((result.returncode, result.stderr), (0, ""), f"stdout:\n{result.stdout}")
            return result.stdout

        return threads.deferToThread(run).addCallback(check)

    def test_ten_thousand_jobs(self):
        """
        10,000 tiny jobs through C{submit} and C{gather}, then C{map} with a
        buffer and C{map_unordered} over an async generator: every result
        right; once the executor is closed no thread of its own and no task
        is left, and a second C{asyncio.run} works the same.
        """
        d = self.run_program(
            """
            async def numbers(n):
                for i in range(n):
                    yield i

            async def main():
                async with AsyncClusterExecutor(ADDRESS) as ex:
                    results = await asyncio.gather(*(ex.submit(square, i) for i in range(10_000)))
                    print("gather", results == [i * i for i in range(10_000)])
                    mapped = [r async for r in ex.map(square, range(2_000), buffersize=50)]
                    print("map", mapped == [i * i for i in range(2_000)])
                    unordered = [r async for r in ex.map_unordered(square, numbers(500))]
                    print("unordered", sorted(unordered) == [i * i for i in range(500)])
                    slots = sum(w["slots"] for w in (await ex.status())["workers"])
                    print("slots", slots)
                print("leftovers", leftovers())

            asyncio.run(main())

            async def again():
                async with AsyncClusterExecutor(ADDRESS) as ex:
                    print("again", await ex.submit(square, 12))
                print("leftovers", leftovers())

            asyncio.run(again())
            """
        )

        def check(out):
            self.assertEqual(
                out.splitlines(),
                [
                    "gather True",
                    "map True",
                    "unordered True",
                    "slots 1",
                    "leftovers ([], [])",
                    "again 144",
                    "leftovers ([], [])",
                ],
            )

        return d.addCallback(check)

    def test_exceptions_keep_their_type(self):
        """A job's exception reaches the awaiting task as its own class; a failing map raises it."""
        d = self.run_program(
            """
            from cw.errors import RemoteException

            def fail(x):
                if x == 3:
                    raise KeyError(x)
                return x

            async def main():
                async with AsyncClusterExecutor(ADDRESS) as ex:
                    try:
                        await ex.submit(fail, 3)
                    except KeyError as e:
                        print("submit", isinstance(e, RemoteException), e.args)
                    seen = []
                    try:
                        async for r in ex.map(fail, range(6)):
                            seen.append(r)
                    except KeyError as e:
                        print("map", seen, e.args)

            asyncio.run(main())
            """
        )
        return d.addCallback(self.assertEqual, "submit True (3,)\nmap [0, 1, 2] (3,)\n")

    def test_cancel_awaiting_task(self):
        """
        Cancelling a task that awaits a queued job withdraws the job, and one
        that awaits a running job kills its process: neither ever gets to
        its marker file (the single job process runs jobs in submission
        order, so a job left in place would have run before the last one).
        """
        queued = os.path.abspath(self.mktemp())
        started = os.path.abspath(self.mktemp())
        release = os.path.abspath(self.mktemp())
        finished = os.path.abspath(self.mktemp())
        d = self.run_program(
            f"""
            def run_then_mark(started, release, finished):
                block_until(release, started)
                touch(finished)

            async def main():
                async with AsyncClusterExecutor(ADDRESS) as ex:
                    blocker = asyncio.create_task(ex.submit(block_until, {release!r}))
                    doomed = asyncio.create_task(ex.submit(touch, {queued!r}))
                    await asyncio.sleep(0)  # both submitted
                    doomed.cancel()
                    try:
                        await doomed
                    except asyncio.CancelledError:
                        print("queued job cancelled")
                    touch({release!r})
                    print(await blocker)
                    os.unlink({release!r})
                    running = asyncio.create_task(
                        ex.submit(run_then_mark, {started!r}, {release!r}, {finished!r})
                    )
                    deadline = time.monotonic() + 60
                    while not os.path.exists({started!r}):
                        assert time.monotonic() < deadline, "the job never started"
                        await asyncio.sleep(0.01)
                    running.cancel()
                    try:
                        await running
                    except asyncio.CancelledError:
                        print("running job cancelled")
                    # Released only once its process is gone (if it is not
                    # killed, it finishes, the check below fails).
                    pid = int(open({started!r}).read())
                    deadline = time.monotonic() + 20
                    while process_exists(pid) and time.monotonic() < deadline:
                        await asyncio.sleep(0.01)
                    touch({release!r})
                    print(await ex.submit(square, 3))
                    print("queued ran", os.path.exists({queued!r}))
                    print("running finished", os.path.exists({finished!r}))
                print("leftovers", leftovers())

            asyncio.run(main())
            """
        )
        return d.addCallback(
            self.assertEqual,
            "queued job cancelled\nreleased\nrunning job cancelled\n9\n"
            "queued ran False\nrunning finished False\nleftovers ([], [])\n",
        )

    def test_server_keeps_answering(self):
        """
        An asyncio echo server in the same loop answers its clients while
        jobs are submitted and their results awaited: echoes come back
        while each job runs, not only between results.  Each job holds its
        job process until the program has had its echoes while that job
        was running (so no count depends on how fast the machine is); in a
        loop blocked while the results are awaited they never come, and the
        job gives up after 30 s.
        """
        base = os.path.abspath(self.mktemp())
        d = self.run_program(
            f"""
            JOBS = 8
            started = [{base!r} + ".started.%d" % i for i in range(JOBS)]
            release = [{base!r} + ".release.%d" % i for i in range(JOBS)]
            handlers = []

            async def echo(reader, writer):
                handlers.append(asyncio.current_task())
                while line := await reader.readline():
                    writer.write(line)
                    await writer.drain()
                writer.close()

            async def main():
                server = await asyncio.start_server(echo, "127.0.0.1", 0)
                port = server.sockets[0].getsockname()[1]
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                events = []  # one entry per job: its echoes came back while it ran

                async def ping_while_each_job_runs():
                    try:
                        for i in range(JOBS):
                            deadline = time.monotonic() + 60
                            while not os.path.exists(started[i]):
                                assert time.monotonic() < deadline, f"job {{i}} never started"
                                await asyncio.sleep(0.01)
                            for n in range(3):
                                writer.write(b"%d\\n" % n)
                                line = await asyncio.wait_for(reader.readline(), 60)
                                assert line == b"%d\\n" % n, line
                            events.append(f"echoes{{i}}")
                            touch(release[i])
                    finally:
                        for path in release:  # a failure here ends the jobs
                            touch(path)

                pinger = asyncio.create_task(ping_while_each_job_runs())
                async with AsyncClusterExecutor(ADDRESS) as ex:
                    results = [r async for r in ex.map(block_until, release, started, [30] * JOBS)]
                await pinger
                writer.close()
                await writer.wait_closed()
                server.close()
                await server.wait_closed()
                await asyncio.gather(*handlers)
                print(results == ["released"] * JOBS, " ".join(events))
                print("leftovers", leftovers())

            asyncio.run(main())
            """
        )
        echoes = " ".join(f"echoes{i}" for i in range(8))
        return d.addCallback(self.assertEqual, f"True {echoes}\nleftovers ([], [])\n")

    def test_twisted_asyncio_reactor(self):
        """
        In a Twisted program running on asyncio (Twisted's asyncio reactor
        drives the loop), the executor uses that reactor, in the loop's own
        thread: no reactor thread of cw's is started.
        """
        d = self.run_program(
            """
            from twisted.internet import defer, task


            async def main():
                async with AsyncClusterExecutor(ADDRESS) as ex:
                    print(await asyncio.gather(*(ex.submit(square, i) for i in range(5))))
                    print([r async for r in ex.map(square, range(5))])
                print("crochet", [t.name for t in threading.enumerate() if "Crochet" in t.name])

            task.react(lambda reactor: defer.Deferred.fromFuture(asyncio.ensure_future(main())))
            """,
            first="""
            import asyncio
            from twisted.internet import asyncioreactor
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            asyncioreactor.install(loop)
            """,
        )
        return d.addCallback(self.assertEqual, "[0, 1, 4, 9, 16]\n[0, 1, 4, 9, 16]\ncrochet []\n")
