"""
Helpers for tests that speak cw's protocol by hand: a bare authenticating
AMP peer, an in-memory connection to a master (L{twisted.test.iosim}: no
process, no socket), and payloads whose corruption shows.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump, connectedServerAndClient

from cw.master.protocol import MasterProtocol
from cw.wire.auth import AuthGate, authenticate


class GatedAMP(AuthGate, amp.AMP):
    """A bare AMP peer that can run the client side of the handshake (L{cw.wire.auth.authenticate})."""


def pattern(size: int) -> bytes:
    """
    C{size} bytes repeating with period 251, which divides neither AMP's
    value limit nor a power of two: consecutive chunks differ, so lost,
    repeated or misordered chunks show.
    """
    return (bytes(range(251)) * (size // 251 + 1))[:size]


def connect_to_master(master, peer: amp.AMP) -> tuple[MasterProtocol, IOPump]:
    """
    Connect C{peer} to a new L{MasterProtocol} of C{master} (a
    L{cw.master.service.Master} on a C{Clock}) in memory, as if from
    127.0.0.1:40000 to 127.0.0.1:5494; return the master's side and the
    pump that moves bytes between them (C{pump.flush()}).
    """
    master_address = IPv4Address("TCP", "127.0.0.1", 5494)
    peer_address = IPv4Address("TCP", "127.0.0.1", 40000)
    _, server, pump = connectedServerAndClient(
        lambda: MasterProtocol(master),
        lambda: peer,
        clientTransportFactory=lambda p: FakeTransport(p, False, peer_address, master_address),
        serverTransportFactory=lambda p: FakeTransport(p, True, master_address, peer_address),
        clock=master.clock,
    )
    return server, pump


def authenticated_to_master(master, peer: AuthGate, role: str) -> tuple[MasterProtocol, IOPump]:
    """L{connect_to_master}, then the real handshake as C{role} with the master's secret."""
    server, pump = connect_to_master(master, peer)
    outcome: list = []
    done = authenticate(peer, master.secret, role, "memory")
    if done is not None:  # None: an --insecure master, nothing to exchange
        done.addBoth(outcome.append)
        pump.flush()
        if not outcome:
            raise AssertionError(f"the handshake as {role} did not finish")
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()
    return server, pump
