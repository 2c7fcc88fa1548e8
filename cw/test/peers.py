"""
Helpers for tests that speak cw's protocol by hand: a bare authenticating
AMP peer, and payloads whose corruption shows.
"""

from __future__ import annotations

from twisted.protocols import amp

from cw.wire.auth import AuthGate


class GatedAMP(AuthGate, amp.AMP):
    """A bare AMP peer that can run the client side of the handshake (L{cw.wire.auth.authenticate})."""


def pattern(size: int) -> bytes:
    """
    C{size} bytes repeating with period 251, which divides neither AMP's
    value limit nor a power of two: consecutive chunks differ, so lost,
    repeated or misordered chunks show.
    """
    return (bytes(range(251)) * (size // 251 + 1))[:size]
