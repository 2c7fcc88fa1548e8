"""
Which worker has been sent which client's context and function
definitions, with no I/O.

A client's context (working directory, C{sys.path}) and each function it
defines (L{P.DefineFunction}, opaque bytes) go to a worker once, before
the first of that client's jobs that needs them; when the client leaves,
the workers that had its context are told to forget it.  L{Routing} keeps
the contexts, the functions and what each worker was sent, and says what
to send (L{SendContext}, L{SendFunction}) before a batch of jobs.
Unit-tested in L{cw.test.core.test_master_core}.

Layer rule (cw.core): pure; imports only cw.core, cw.errors and the standard library (no Twisted, no I/O).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from cw.core.records import Job


@dataclass(frozen=True)
class SendContext:
    """Send a worker C{client}'s context (L{P.ClientContext})."""

    client: int
    context: dict


@dataclass(frozen=True)
class SendFunction:
    """Send a worker C{client}'s function C{key} (L{P.DefineFunction})."""

    client: int
    key: bytes
    function: bytes


class Routing:
    """Clients' contexts and functions, and which workers have them."""

    def __init__(self, max_payload: int) -> None:
        #: Largest function definition kept, in bytes.
        self.max_payload = max_payload
        self.contexts: dict[int, dict] = {}
        #: Each connected client's functions (opaque bytes) by key.
        self.functions: dict[int, dict[bytes, bytes]] = {}
        #: For each worker: the clients whose context it has, and the
        #: C{(client, key)} of the functions it has.
        self._contexts_sent: dict[int, set[int]] = {}
        self._functions_sent: dict[int, set[tuple[int, bytes]]] = {}

    def client_joined(self, client: int, context: dict) -> None:
        self.contexts[client] = context

    def client_left(self, client: int) -> list[int]:
        """Forget C{client}; return the workers that had its context (to tell them to forget it too)."""
        self.contexts.pop(client, None)
        functions = self.functions.pop(client, {})
        told = []
        for worker, contexts in self._contexts_sent.items():
            if client in contexts:
                contexts.discard(client)
                told.append(worker)
            sent = self._functions_sent[worker]
            for key in functions:
                sent.discard((client, key))
        return told

    def define(self, client: int, key: bytes, function: bytes) -> bool:
        """
        Keep C{client}'s function C{key} for its jobs that name it.  False
        (and not kept) if it is larger than C{max_payload}: those jobs
        then fail as naming an unknown function.
        """
        if len(function) > self.max_payload:
            return False
        self.functions.setdefault(client, {})[key] = function
        return True

    def defined(self, client: int, key: bytes) -> bool:
        return key in self.functions.get(client, {})

    def worker_joined(self, worker: int) -> None:
        self._contexts_sent[worker] = set()
        self._functions_sent[worker] = set()

    def worker_left(self, worker: int) -> None:
        self._contexts_sent.pop(worker, None)
        self._functions_sent.pop(worker, None)

    def before(self, worker: int, jobs: Iterable[Job]) -> list[SendContext | SendFunction]:
        """
        What C{worker} must be sent before C{jobs}: each context and
        function they need that it lacks, in the jobs' order.  Recorded as
        sent.
        """
        contexts = self._contexts_sent.setdefault(worker, set())
        functions = self._functions_sent.setdefault(worker, set())
        sends: list[SendContext | SendFunction] = []
        for job in jobs:
            if job.client not in contexts and job.client in self.contexts:
                contexts.add(job.client)
                sends.append(SendContext(job.client, self.contexts[job.client]))
            if job.func and (job.client, job.func) not in functions:
                function = self.functions.get(job.client, {}).get(job.func)
                if function is not None:
                    functions.add((job.client, job.func))
                    sends.append(SendFunction(job.client, job.func, function))
        return sends
