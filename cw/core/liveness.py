"""
Heartbeat bookkeeping, with no I/O: when each watched peer was last heard
from and whether a heartbeat to it is unanswered.

L{cw.wire.liveness.HeartbeatMonitor} runs the timer and sends the
heartbeats; it asks L{Liveness.beat} which peers to ping and which have
been silent too long.  Peers are any hashable objects (connections);
time is always passed in.  Unit-tested in L{cw.test.core.test_master_core}.

Layer rule (cw.core): pure; imports only cw.core, cw.errors and the standard library (no Twisted, no I/O).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field


@dataclass
class PeerLiveness:
    """What is known of one watched peer."""

    #: When it was last heard from.
    last_heard: float
    #: A heartbeat is on its way and not answered yet.
    pinged: bool = False


@dataclass(frozen=True)
class Beat:
    """The decisions of one heartbeat tick."""

    #: Peers to send a heartbeat now.
    ping: list[Hashable] = field(default_factory=list)
    #: C{(peer, seconds silent)} for each peer unheard for longer than the timeout.
    silent: list[tuple[Hashable, float]] = field(default_factory=list)


class Liveness:
    """
    Which watched peers to ping and which are silent.  A peer is pinged
    once at a time (no second heartbeat while one is unanswered); one not
    heard from for longer than C{timeout} is reported at each tick until it
    is forgotten.  Anything from the peer counts as hearing from it.
    """

    def __init__(self, timeout: float) -> None:
        if timeout <= 0:
            raise ValueError("a heartbeat timeout must be positive")
        self.timeout = timeout
        self.peers: dict[Hashable, PeerLiveness] = {}

    def watch(self, peer: Hashable, now: float) -> None:
        """Start watching C{peer}: it counts as heard from at C{now}."""
        self.peers[peer] = PeerLiveness(now)

    def forget(self, peer: Hashable) -> None:
        self.peers.pop(peer, None)

    def heard(self, peer: Hashable, now: float) -> None:
        """Something came from C{peer} at C{now} (ignored for a peer not watched)."""
        state = self.peers.get(peer)
        if state is not None:
            state.last_heard = now

    def answered(self, peer: Hashable, now: float) -> None:
        """C{peer} answered its heartbeat (or the heartbeat failed) at C{now}."""
        state = self.peers.get(peer)
        if state is not None:
            state.pinged = False
            state.last_heard = now

    def last_heard(self, peer: Hashable) -> float | None:
        state = self.peers.get(peer)
        return None if state is None else state.last_heard

    def beat(self, now: float) -> Beat:
        """One tick at C{now}: the peers to ping, and those silent too long."""
        beat = Beat()
        for peer, state in self.peers.items():
            silent = now - state.last_heard
            if silent > self.timeout:
                beat.silent.append((peer, silent))
            elif not state.pinged:
                state.pinged = True
                beat.ping.append(peer)
        return beat
