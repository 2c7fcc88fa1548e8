"""
Heartbeats: noticing a peer that is connected but no longer there.

A TCP connection to a process that hangs, is stopped (SIGSTOP, ^Z) or sits
behind a link that went quiet may stay open for ever: the kernel still
answers keepalive probes for a stopped process.  So cw's peers check each
other at the application level, with one mechanism:

  - L{HeartbeatMonitor} sends each watched connection a L{P.Heartbeat}
    every C{interval} seconds (one at a time: no second ping while one is
    unanswered) and calls C{on_silent} for a connection it has not heard
    from for longer than C{timeout}.  Its bound: silence is noticed within
    C{timeout + interval} seconds.
  - L{SignsOfLife} is the protocol side: every byte received from the peer
    counts as hearing from it, not only heartbeat answers, so a peer busy
    sending a large box (whose answer waits behind it) is not taken for a
    silent one.

The master watches its workers and its clients with one monitor each, and
each client watches its master (L{cw.client.Session}); the peers answer
L{P.Heartbeat} with an empty box.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import task

from cw.wire import commands as P


class SignsOfLife:
    """
    Mixin for the AMP protocols that a L{HeartbeatMonitor} watches (listed
    before C{amp.AMP}): any data from the peer is a sign of life.
    """

    #: When the peer was last heard from (by the monitor's clock).
    last_heard: float = 0.0
    #: A heartbeat is on its way and not answered yet.
    heartbeat_pending: bool = False
    #: The watching monitor's clock; None while not watched.
    liveness_clock: Any = None

    def dataReceived(self, data):
        clock = self.liveness_clock
        if clock is not None:
            self.last_heard = clock.seconds()
        super().dataReceived(data)


class HeartbeatMonitor:
    """
    Ping connections every C{interval} seconds and report those silent for
    longer than C{timeout} to C{on_silent(proto, seconds)}, once per check
    until they are forgotten (the caller usually closes the connection,
    and forgets it when it is lost).

    A watched protocol needs C{callRemote} and the attributes of
    L{SignsOfLife} (which also sets L{SignsOfLife.last_heard} on data);
    anything else that shows the peer is alive may set C{last_heard} too.
    """

    def __init__(
        self,
        clock,
        interval: float,
        timeout: float,
        on_silent: Callable[[Any, float], None],
    ) -> None:
        if interval <= 0 or timeout <= 0:
            raise ValueError("a heartbeat interval and timeout must be positive")
        self.clock = clock
        self.interval = interval
        self.timeout = timeout
        self.on_silent = on_silent
        self.peers: dict[Any, None] = {}
        self._loop: task.LoopingCall | None = None

    def watch(self, proto) -> None:
        """Start watching C{proto}: it counts as heard from now."""
        proto.liveness_clock = self.clock
        proto.last_heard = self.clock.seconds()
        proto.heartbeat_pending = False
        self.peers[proto] = None

    def forget(self, proto) -> None:
        self.peers.pop(proto, None)

    def start(self) -> None:
        if self._loop is None:
            self._loop = task.LoopingCall(self._beat)
            self._loop.clock = self.clock
            self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def _beat(self) -> None:
        now = self.clock.seconds()
        for proto in list(self.peers):
            silent = now - proto.last_heard
            if silent > self.timeout:
                self.on_silent(proto, silent)
            elif not proto.heartbeat_pending:
                proto.heartbeat_pending = True
                d = proto.callRemote(P.Heartbeat)
                # Any answer, even an error, comes from a live peer; a lost
                # connection is reported (and forgotten) by its owner.
                d.addBoth(self._answered, proto)

    def _answered(self, _answer, proto) -> None:
        proto.heartbeat_pending = False
        if proto in self.peers:
            proto.last_heard = self.clock.seconds()
