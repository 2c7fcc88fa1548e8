"""
Heartbeats: noticing a peer that is connected but no longer there.

A TCP connection to a process that hangs, is stopped (SIGSTOP, ^Z) or sits
behind a link that went quiet may stay open for ever: the kernel still
answers keepalive probes for a stopped process.  So cw's peers check each
other at the application level, with one mechanism:

  - L{HeartbeatMonitor} (its bookkeeping in L{cw.core.liveness.Liveness})
    sends each watched connection a L{P.Heartbeat}
    every C{interval} seconds (one at a time: no second ping while one is
    unanswered) and calls C{on_silent} for a connection it has not heard
    from for longer than C{timeout}.  Its bound: silence is noticed within
    C{timeout + interval} seconds.
  - L{SignsOfLife} is the protocol side: every byte received from the peer
    counts as hearing from it, not only heartbeat answers, so a peer busy
    sending a large box (whose answer waits behind it) is not taken for a
    silent one.  So does the peer taking in a large box this side streams
    to it (L{cw.wire.streaming.StreamingSender.stream_drained}): a heartbeat
    sent meanwhile waits behind that box, and the peer, busy receiving it,
    sends nothing, for as long as a slow link needs.  A peer that stops
    reading stops taking it in once the kernels' socket buffers are full.

The master watches its workers and its clients with one monitor each, and
each client watches its master (L{cw.client.Session}); the peers answer
L{P.Heartbeat} with an empty box.

Layer rule (cw.wire): imports Twisted, ampoule, cw.system, cw.core and cw.errors; nothing above.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import task

from cw.core.liveness import Liveness
from cw.wire import commands as P


class SignsOfLife:
    """
    Mixin for the AMP protocols that a L{HeartbeatMonitor} watches (listed
    before C{amp.AMP}): any data from the peer is a sign of life.
    """

    #: The monitor watching this connection, told of all data received.
    heartbeat_monitor: HeartbeatMonitor | None = None
    #: For a connection watched by hand (the worker's watchdog on its
    #: master): when data last came, by C{liveness_clock}, if that is set.
    last_heard: float = 0.0
    liveness_clock: Any = None

    def dataReceived(self, data):
        self.heard_from_peer()
        super().dataReceived(data)

    def sendBox(self, box):
        super().sendBox(box)
        monitor = self.heartbeat_monitor
        if monitor is not None and monitor.liveness.peers_watch:
            monitor.sent(self)

    def stream_drained(self) -> None:
        """The peer took in a piece of a box streamed to it (L{cw.wire.streaming}): it is alive."""
        self.heard_from_peer()

    def heard_from_peer(self) -> None:
        """The peer is alive now."""
        clock = self.liveness_clock
        if clock is not None:
            self.last_heard = clock.seconds()
        monitor = self.heartbeat_monitor
        if monitor is not None:
            monitor.heard(self)


#: Heartbeats sent per turn of the reactor: a tick with more peers to ping
#: sends the rest on the next turns.  Their answers (and any other traffic)
#: then come in between: 10,000 connections pinged at once held 10,000
#: unanswered calls alive together, long enough for the garbage collector
#: to walk them into its oldest generation and fully collect a heap of a
#: few hundred thousand objects every other tick, and stalled jobs behind
#: the whole burst.
PINGS_PER_TURN = 200


class HeartbeatMonitor:
    """
    Ping connections every C{interval} seconds and report those silent for
    longer than C{timeout} to C{on_silent(proto, seconds)}, once per check
    until they are forgotten (the caller usually closes the connection,
    and forgets it when it is lost).  Which to ping and which are silent is
    decided by L{Liveness}; this class runs the timer and sends.

    A watched protocol needs C{callRemote}; with L{SignsOfLife} any data
    it receives counts as hearing from the peer, and anything else that
    shows the peer is alive may call L{heard}.
    """

    def __init__(
        self,
        clock,
        interval: float,
        timeout: float,
        on_silent: Callable[[Any, float], None],
        waiting: Callable[[Any], bool] | None = None,
        peers_watch: bool = False,
    ) -> None:
        if interval <= 0 or timeout <= 0:
            raise ValueError("a heartbeat interval and timeout must be positive")
        self.clock = clock
        self.interval = interval
        #: C{peers_watch}: the peers ping this side themselves and count
        #: anything from it as a sign of life (L{Liveness}); then what is
        #: sent to them is noted (L{SignsOfLife.sendBox}).
        self.liveness = Liveness(timeout, interval, peers_watch)
        self.on_silent = on_silent
        #: Whether what is sent to a connection waits for another source
        #: (e.g. L{cw.wire.streaming.StreamingSender.waiting_on_relay}):
        #: then it is not silent (L{Liveness.beat}).
        self.waiting = waiting
        self._loop: task.LoopingCall | None = None
        #: The call that sends the rest of a tick's heartbeats (L{PINGS_PER_TURN}).
        self._rest = None

    @property
    def timeout(self) -> float:
        return self.liveness.timeout

    def watch(self, proto) -> None:
        """Start watching C{proto}: it counts as heard from now."""
        proto.heartbeat_monitor = self
        self.liveness.watch(proto, self.clock.seconds())

    def forget(self, proto) -> None:
        self.liveness.forget(proto)
        if getattr(proto, "heartbeat_monitor", None) is self:
            proto.heartbeat_monitor = None

    def heard(self, proto) -> None:
        """Something came from C{proto}'s peer just now."""
        self.liveness.heard(proto, self.clock.seconds())

    def sent(self, proto) -> None:
        """Something went to C{proto}'s peer just now."""
        self.liveness.sent(proto, self.clock.seconds())

    def start(self) -> None:
        if self._loop is None:
            self._loop = task.LoopingCall(self._beat)
            self._loop.clock = self.clock
            self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._rest is not None and self._rest.active():
            self._rest.cancel()
        self._rest = None

    def _beat(self) -> None:
        beat = self.liveness.beat(self.clock.seconds(), self.waiting)
        # Heard from within the interval (notify): the answer is not needed,
        # only the heartbeat's arrival (L{cw.core.liveness.MasterWatch}).
        sends = [(proto, P.HeartbeatNotice) for proto in beat.notify]
        sends.extend((proto, P.Heartbeat) for proto in beat.ping)
        self._ping(sends, 0)
        for proto, silent in beat.silent:
            self.on_silent(proto, silent)

    def _ping(self, peers: list, start: int) -> None:
        """
        Send heartbeats (C{(proto, command)} in C{peers}) from C{start} on:
        L{PINGS_PER_TURN} now, the rest next turn.
        """
        self._rest = None
        watched = self.liveness.peers
        for proto, command in peers[start : start + PINGS_PER_TURN]:
            if proto not in watched:
                continue  # forgotten since the tick (its connection was lost)
            d = proto.callRemote(command)
            if not command.requiresAnswer:
                continue
            # Any answer, even an error, comes from a live peer; a lost
            # connection is reported (and forgotten) by its owner.
            d.addBoth(self._answered, proto)
        if start + PINGS_PER_TURN < len(peers) and self._loop is not None:  # not stopped meanwhile
            self._rest = self.clock.callLater(0, self._ping, peers, start + PINGS_PER_TURN)

    def _answered(self, _answer, proto) -> None:
        self.liveness.answered(proto, self.clock.seconds())
