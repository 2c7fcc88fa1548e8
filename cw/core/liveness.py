"""
Heartbeat bookkeeping, with no I/O.

  - L{Liveness} (the master's and the client's side): when each watched
    peer was last heard from and whether a heartbeat to it is unanswered.
    L{cw.wire.liveness.HeartbeatMonitor} runs the timer and sends the
    heartbeats; it asks L{Liveness.beat} which peers to ping and which have
    been silent too long.  Peers are any hashable objects (connections).
    Unit-tested in L{cw.test.core.test_master_core}.
  - L{MasterWatch} (the worker's side): whether the master, which sends the
    heartbeats, has gone silent; the worker runs its one timer as told
    (L{Recheck}) and drops the connection on L{MasterSilent}.  Unit-tested
    in L{cw.test.core.test_liveness}.

Time is always passed in.

Layer rule (cw.core): pure; imports only cw.core, cw.errors and the standard library (no Twisted, no I/O).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field


@dataclass
class PeerLiveness:
    """What is known of one watched peer."""

    #: When it was last heard from.
    last_heard: float
    #: A heartbeat is on its way and not answered yet.
    pinged: bool = False
    #: When something was last sent to it (only kept where it matters,
    #: L{Liveness.peers_watch}).
    last_sent: float = float("-inf")


@dataclass(frozen=True)
class Beat:
    """The decisions of one heartbeat tick."""

    #: Peers to send a heartbeat now.
    ping: list[Hashable] = field(default_factory=list)
    #: Peers heard from within the interval that still need a heartbeat to
    #: arrive (their own watch on this side counts them) but whose answer
    #: this side does not need: send it without asking for one.
    notify: list[Hashable] = field(default_factory=list)
    #: C{(peer, seconds silent)} for each peer unheard for longer than the timeout.
    silent: list[tuple[Hashable, float]] = field(default_factory=list)


class Liveness:
    """
    Which watched peers to ping and which are silent.  A peer is pinged
    once at a time (no second heartbeat while one is unanswered); one not
    heard from for longer than C{timeout} is reported at each tick until it
    is forgotten.  Anything from the peer counts as hearing from it.

    Heartbeats cost nothing where a peer is demonstrably alive (issue 18:
    they were the main per-connection cost of an idle master).  Given the
    C{interval} between ticks, a peer heard from within it needs no answer:
      - if C{peers_watch} (the peers watch this side with their own
        heartbeats and count anything from it as hearing from it, as
        clients do) and something was also sent to it within the
        interval (L{sent}), it is not pinged at all;
      - otherwise (workers arm and size their watch on the master from the
        heartbeats' arrivals, L{MasterWatch}) it gets a heartbeat that asks
        no answer (L{Beat.notify}).
    Either only where it would not be silent by the next tick if it were
    asked nothing now (its silence then plus the interval is under the
    timeout: a timeout under two intervals keeps every answer).  Whether a
    peer is silent depends only on when it was last heard from, so the
    bound on noticing a dead peer (C{timeout + interval}) is the same.
    """

    def __init__(self, timeout: float, interval: float = 0.0, peers_watch: bool = False) -> None:
        if timeout <= 0:
            raise ValueError("a heartbeat timeout must be positive")
        self.timeout = timeout
        #: Seconds between ticks; 0: every peer not silent is pinged.
        self.interval = interval
        self.peers_watch = peers_watch
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

    def sent(self, peer: Hashable, now: float) -> None:
        """Something went to C{peer} at C{now} (ignored for a peer not watched)."""
        state = self.peers.get(peer)
        if state is not None:
            state.last_sent = now

    def answered(self, peer: Hashable, now: float) -> None:
        """C{peer} answered its heartbeat (or the heartbeat failed) at C{now}."""
        state = self.peers.get(peer)
        if state is not None:
            state.pinged = False
            state.last_heard = now

    def last_heard(self, peer: Hashable) -> float | None:
        state = self.peers.get(peer)
        return None if state is None else state.last_heard

    def beat(self, now: float, waiting: Callable[[Hashable], bool] | None = None) -> Beat:
        """
        One tick at C{now}: the peers to ping, and those silent too long.

        A peer for which C{waiting(peer)} holds is not silent, whatever
        its silence, which is not its own: what is being sent to it is a
        box forwarded as it arrives that waits for its source, the peer
        having taken all of it so far, so a heartbeat to it waits behind
        that box (the source's own liveness bounds the wait); or this side
        has stopped reading from it (flow control,
        L{cw.core.flow.FlowControl.excused}), so it cannot be heard.  It
        counts as heard from at C{now}.  C{waiting} is asked only of peers
        silent too long.
        """
        beat = Beat()
        interval = self.interval
        peers_watch = self.peers_watch
        for peer, state in self.peers.items():
            silent = now - state.last_heard
            if silent > self.timeout:
                if waiting is not None and waiting(peer):
                    state.last_heard = now
                    continue
                beat.silent.append((peer, silent))
            elif state.pinged:
                continue
            elif silent < interval and silent + interval < self.timeout:
                if not peers_watch:
                    beat.notify.append(peer)
                elif now - state.last_sent >= interval:
                    state.pinged = True
                    beat.ping.append(peer)
            else:
                state.pinged = True
                beat.ping.append(peer)
        return beat


@dataclass(frozen=True)
class Recheck:
    """The master is not silent yet: look again in C{after} seconds."""

    after: float


@dataclass(frozen=True)
class MasterSilent:
    """Nothing came from the master for C{timeout} seconds: drop its connection."""

    timeout: float


class MasterWatch:
    """
    The worker's watchdog on its master's heartbeats.  It is armed from the
    second heartbeat on, once their interval is known; its timeout is then
    C{timeout} or three intervals, whichever is longer (a master that beats
    slowly is not dropped between two beats).  Anything from the master
    counts as a sign of life: its heartbeat may wait behind a big box it is
    sending.

    @param timeout: the least time without a word from the master before
        it counts as silent; 0: never.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        #: When the last heartbeat came (None: none yet on this connection).
        self.last_heartbeat: float | None = None
        #: The timeout in force, known from the second heartbeat on.
        self.current: float | None = None

    def reset(self) -> None:
        """A new (or no) connection: forget its heartbeats."""
        self.last_heartbeat = self.current = None

    def heartbeat(self, now: float) -> Recheck | None:
        """
        A heartbeat came at C{now}: when to check the master next (replacing
        any earlier check), or None while the watchdog is not armed.
        """
        if not self.timeout:
            return None
        last, self.last_heartbeat = self.last_heartbeat, now
        if last is None:
            return None
        self.current = max(self.timeout, 3 * (now - last))
        return Recheck(self.current)

    def check(self, now: float, last_heard: float) -> Recheck | MasterSilent | None:
        """
        The check asked for is due at C{now}; the master was last heard
        from at C{last_heard}.  None if the watchdog is not armed.
        """
        if self.current is None:
            return None
        silent = now - last_heard
        if silent < self.current:
            return Recheck(self.current - silent)
        return MasterSilent(self.current)
