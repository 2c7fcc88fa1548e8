"""
L{SeqSet}: a set of job numbers that costs a bit per number where they are
mostly consecutive (as a client's job numbers are), so that the master's
record of a client's live jobs does not add tens of bytes to every queued
job.

Layer rule (cw.core): pure; imports only cw.core, cw.errors and the standard library (no Twisted, no I/O).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Set

#: Numbers up to this far above the bitmap's base are kept in the bitmap
#: (at most 16 MiB); others (far ahead, or below the base) in a plain set.
WINDOW = 1 << 27


class SeqSet(Set):
    """
    A set of non-negative integers: a bitmap from a base, whose leading
    empty bytes are dropped as the lowest numbers leave, and a plain set for
    numbers outside the bitmap's window.  A L{Set} (it compares equal to
    a set of the same numbers) with C{add}, C{discard}, C{clear} and
    C{-=}.
    """

    __slots__ = ("_base", "_bits", "_low", "_in_bits", "_other")

    def __init__(self) -> None:
        self._base = 0
        self._bits = bytearray()
        #: Index of the first byte of L{_bits} that may be nonzero.
        self._low = 0
        self._in_bits = 0
        self._other: set[int] = set()

    def __iter__(self) -> Iterator[int]:
        for byte in range(self._low, len(self._bits)):
            value = self._bits[byte]
            for bit in range(8):
                if value & (1 << bit):
                    yield self._base + 8 * byte + bit
        yield from self._other

    def __len__(self) -> int:
        return self._in_bits + len(self._other)

    def __contains__(self, seq: int) -> bool:
        i = seq - self._base
        if 0 <= i < 8 * len(self._bits) and self._bits[i >> 3] & (1 << (i & 7)):
            return True
        return bool(self._other) and seq in self._other

    def add(self, seq: int) -> None:
        if seq in self:
            return
        if not self._in_bits:
            self._base, self._bits, self._low = seq & ~7, bytearray(), 0
        i = seq - self._base
        if not 0 <= i < WINDOW:
            self._other.add(seq)
            return
        byte = i >> 3
        if byte >= len(self._bits):
            self._bits.extend(bytes(max(byte + 1 - len(self._bits), len(self._bits))))
        self._bits[byte] |= 1 << (i & 7)
        self._in_bits += 1
        self._low = min(self._low, byte)

    def discard(self, seq: int) -> None:
        i = seq - self._base
        byte, bit = i >> 3, 1 << (i & 7)
        if not (0 <= i < 8 * len(self._bits) and self._bits[byte] & bit):
            self._other.discard(seq)
            return
        self._bits[byte] &= ~bit
        self._in_bits -= 1
        if not self._in_bits:
            self._bits, self._low = bytearray(), 0
            return
        bits = self._bits
        while not bits[self._low]:
            self._low += 1
        if self._low > 4096 and 2 * self._low > len(bits):
            del bits[: self._low]
            self._base += 8 * self._low
            self._low = 0

    def clear(self) -> None:
        self._base, self._bits, self._low, self._in_bits = 0, bytearray(), 0, 0
        self._other.clear()

    def __isub__(self, seqs: Iterable[int]) -> SeqSet:  # type: ignore[misc]
        for seq in seqs:
            self.discard(seq)
        return self
