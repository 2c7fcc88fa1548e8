"""
Mutual authentication of cw connections on a shared secret.

The connecting peer (client or worker) and the master prove to each other
that they hold the same secret, with fresh nonces from both sides so that a
recorded exchange cannot be replayed and neither side can be impersonated:

    peer -> master   Challenge(role, nonce_p)
    master -> peer   nonce_m, HMAC(secret, "master" | role | nonce_p | nonce_m)
    peer -> master   Prove(HMAC(secret, role | nonce_m | nonce_p))

The peer checks the master's proof before it sends its own (so a fake
master learns nothing useful) and before it accepts any command from the
master; the master accepts nothing but this exchange until the peer's proof
checks out.  Comparisons are constant-time.  A peer whose check fails sends
an empty proof, so that the master too learns that the two ends hold
different secrets (and logs it).

A proof of the secret alone can be relayed: a man in the middle forwards
the handshake unchanged between a victim and the real master, then speaks
for itself.  So the handshake is bound to everything after it.  Both ends
derive one key per direction from the secret, the role and both nonces
(L{session_keys}); every later box, both ways, ends with a C{_mac} value:
the box's sequence number in its direction and a tag over the box's bytes
under a key for that box alone (L{BoxMac}: Poly1305 with a one-time key
per box, HMAC-SHA256 for small boxes).  A box with a wrong or missing MAC,
or out of sequence, ends the connection.  A relay can then only pass
bytes through unchanged.  This gives integrity and authenticity, not
secrecy: that is TLS's job (C{ssl:} addresses).

The Challenge carries the peer's protocol version and its answer the
master's (L{PROTOCOL_VERSION}): the two ends sign boxes the same way only
if they speak the same version, so a mismatch is refused there, with a
message saying so, rather than as a wrong MAC after the handshake.

L{AuthGate} is the part every cw AMP protocol shares: it refuses commands
before authentication, caps what an unauthenticated peer may send, and drops
a peer that does not authenticate in time.

Layer rule (cw.wire): imports Twisted, ampoule, cw.system, cw.core and cw.errors; nothing above.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.poly1305 import Poly1305
from twisted.internet import defer, error
from twisted.logger import Logger
from twisted.protocols import amp

from cw.core.config import AUTH_TIMEOUT as AUTH_TIMEOUT  # seconds a peer has to authenticate
from cw.core.records import PROTOCOL_VERSION
from cw.errors import AuthenticationFailed
from cw.wire.address import no_delay
from cw.wire.commands import Challenge, Prove
from cw.wire.private import current_box, expect_key, write_through

log = Logger(namespace="cw.auth")  # the namespace of its log lines before the layers

NONCE_BYTES = 32
#: Bytes an unauthenticated peer may send before it is dropped.
PREAUTH_BYTES = 16 * 1024

_DOMAIN = b"cw-auth-1"
_SESSION_DOMAIN = b"cw-session-1"
_BOX_DOMAIN = b"cw-box-1"

#: The roles a peer may authenticate as.
ROLES = frozenset({"client", "worker"})

#: The key of the MAC value that closes every box after the handshake.
MAC_KEY = b"_mac"
#: The key that voids a box: a box forwarded as it arrived
#: (L{cw.wire.forwarding}) whose source did not deliver it whole and
#: checked carries it, saying why, and is discarded by its receiver.
VOID_KEY = b"_void"
_SEQUENCE = struct.Struct("!Q")
_LENGTH = struct.Struct("!H")
#: Bytes of a box's tag (Poly1305's; HMAC-SHA256's cut to as many).
_TAG_BYTES = 16
#: Bytes of a C{_mac} value: the box's sequence number, then its tag.
MAC_BYTES = _SEQUENCE.size + _TAG_BYTES
#: Wire bytes of a box's C{_mac} key and of its value's length.
_MAC_HEAD = _LENGTH.pack(len(MAC_KEY)) + MAC_KEY + _LENGTH.pack(MAC_BYTES)
#: Wire bytes of the C{_mac} key.
_MAC_KEY_WIRE = _LENGTH.pack(len(MAC_KEY)) + MAC_KEY
#: Boxes of at most this many bytes are tagged with HMAC-SHA256, longer ones
#: with Poly1305: Poly1305 (as C{cryptography} wraps it) costs a few
#: microseconds to set up, more than HMAC-SHA256 takes for a few KiB.
SMALL_BOX = 4096
#: One-time Poly1305 keys made at a time (L{BoxMac.one_time_key}), and their size.
_KEYS_AT_ONCE = 64
_ONE_TIME_KEY = 32
_ZEROS = bytes(_KEYS_AT_ONCE * _ONE_TIME_KEY)
_SHA256_BLOCK = 64
#: The empty key that ends a box.
_END = _LENGTH.pack(0)

#: Seconds between two "wrong secret" warnings about the same address.
WRONG_SECRET_LOG_INTERVAL = 60.0
#: Longest wait, in seconds, of a worker whose secret keeps being refused.
REFUSED_RETRY_MAX = 60.0


def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def proof(secret: bytes, *parts: bytes, domain: bytes = _DOMAIN) -> bytes:
    """HMAC-SHA256 over the parts, each length-prefixed so none can blur into the next."""
    mac = hmac.new(secret, domain, hashlib.sha256)
    for part in parts:
        mac.update(len(part).to_bytes(4, "big"))
        mac.update(part)
    return mac.digest()


def master_proof(secret: bytes, role: str, peer_nonce: bytes, master_nonce: bytes) -> bytes:
    return proof(secret, b"master", role.encode(), peer_nonce, master_nonce)


def peer_proof(secret: bytes, role: str, peer_nonce: bytes, master_nonce: bytes) -> bytes:
    return proof(secret, role.encode(), master_nonce, peer_nonce)


def session_keys(secret: bytes, role: str, peer_nonce: bytes, master_nonce: bytes) -> tuple[bytes, bytes]:
    """
    The MAC keys of one authenticated connection: (peer to master, master
    to peer).  Fresh for every connection (both nonces), apart from the
    proofs (another domain), and one per direction, so that no box can be
    reflected back to its sender or replayed on another connection.
    """
    parts = (role.encode(), peer_nonce, master_nonce)
    return (
        proof(secret, b"peer-to-master", *parts, domain=_SESSION_DOMAIN),
        proof(secret, b"master-to-peer", *parts, domain=_SESSION_DOMAIN),
    )


class BoxMac:
    """
    The MACs of the boxes going one way on one connection.  A box's tag
    covers its wire bytes (every key and value before C{_mac}, with their
    length prefixes) and its sequence number n in this direction:

      - a box of more than L{SMALL_BOX} bytes: Poly1305 under a one-time
        key for box n alone (L{one_time_key});
      - a smaller one: HMAC-SHA256 (cut to 16 bytes, as RFC 4868 does)
        under a key of this direction for small boxes, over the bytes
        followed by n.

    Why this is sound.  Poly1305 is a one-time MAC: a tag under a key
    nobody knows can be forged with probability about 2^-100 per try, as
    long as no key tags two messages.  The keys here are the ChaCha20
    keystream (RFC 8439) under a key of this direction: box n's key is
    bytes 32(n mod 64) to 32(n mod 64) + 32 of the keystream with nonce
    n div 64 (counter from 0, so 2 KiB, never more, per nonce), which is
    RFC 8439's own derivation of its Poly1305 keys (the first 32 bytes of a
    nonce's keystream) with 64 keys taken from each nonce instead of one.
    ChaCha20 being a PRF, every box of every connection gets its own key,
    unrelated to any other; box n is tagged once, so its key is used once.
    A replayed or reordered box is checked under the key of the number
    that was due, not its own, and fails; a box reflected back to its
    sender is checked under the other direction's keys and fails.  The
    choice between Poly1305 and HMAC follows from the box's length, which
    the tag covers (both parse the bytes and their length prefixes the same
    way), so both ends choose alike without a word about it, and a tag of
    one kind never stands for the other: box n's HMAC key is not ChaCha20's
    and its one-time key is never revealed.  The two keys of a direction
    are HMAC-SHA256 of the session key under labels of their own.

    Why two kinds: Poly1305 ran at 9.4 GB/s here against HMAC-SHA256's
    1.7 GB/s, so a big payload, hashed four times on its way (client signs,
    master checks and signs again, worker checks), costs a fifth of the
    CPU; but C{cryptography}'s Poly1305 costs about 3.5 us to set up, more
    than HMAC takes for a small box, so the boxes of tiny jobs keep HMAC.
    Keys are made 64 at a time, one ChaCha20 call, and only for boxes
    that need one.

    The tag is fed piece by piece as the box is written or read (L{start},
    then C{update}), so a big box is never held twice for it: the first
    L{SMALL_BOX} bytes are kept until the box turns out longer, then
    Poly1305 takes them and every later piece as it comes.
    """

    def __init__(self, key: bytes) -> None:
        # HMAC-SHA256 as RFC 2104 defines it, from hashlib's objects: their
        # copies cost less than those of hmac's (the key is shorter than a block).
        small = proof(key, b"small boxes", domain=_BOX_DOMAIN).ljust(_SHA256_BLOCK, b"\0")
        self._inner = hashlib.sha256(bytes(byte ^ 0x36 for byte in small))
        self._outer = hashlib.sha256(bytes(byte ^ 0x5C for byte in small))
        self._stream_key = proof(key, b"one-time keys", domain=_BOX_DOMAIN)
        #: The nonce whose keys L{_keys} holds (-1: none yet).
        self._keys_of = -1
        self._keys = b""
        #: Sequence number of the next box.
        self.sequence = 0

    def one_time_key(self, sequence: int) -> bytes:
        """The Poly1305 key of box C{sequence} (see the class docstring)."""
        nonce, index = divmod(sequence, _KEYS_AT_ONCE)
        if nonce != self._keys_of:
            counter_and_nonce = bytes(4) + nonce.to_bytes(12, "little")
            cipher = Cipher(algorithms.ChaCha20(self._stream_key, counter_and_nonce), mode=None)
            self._keys = cipher.encryptor().update(_ZEROS)
            self._keys_of = nonce
        at = index * _ONE_TIME_KEY
        return self._keys[at : at + _ONE_TIME_KEY]

    def small_tag(self, data, sequence: int) -> bytes:
        """The tag of a box of at most L{SMALL_BOX} bytes C{data}, numbered C{sequence}."""
        inner = self._inner.copy()
        inner.update(data)
        inner.update(_SEQUENCE.pack(sequence))
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()[:_TAG_BYTES]

    def start(self) -> BoxTag:
        """The tag of the next box: C{update} it with the box's bytes."""
        return BoxTag(self, self.sequence)

    def trailer(self, mac: BoxTag) -> bytes:
        """
        The wire bytes that close a box whose bytes went into C{mac}: its
        C{_mac} key and value, then the empty key.  Numbers the box.
        """
        sequence = mac.sequence
        if sequence != self.sequence:
            raise RuntimeError(f"box {sequence} closed when box {self.sequence} was due")
        self.sequence += 1
        return b"".join([_MAC_HEAD, _SEQUENCE.pack(sequence), mac.tag(), _END])

    def sign(self, data) -> bytes:
        """C{data}, the wire bytes of a whole box without its end, closed by L{trailer}."""
        sequence = self.sequence
        self.sequence += 1
        if len(data) <= SMALL_BOX:
            tag = self.small_tag(data, sequence)
        else:
            tag = Poly1305.generate_tag(self.one_time_key(sequence), data)
        return b"".join([data, _MAC_HEAD, _SEQUENCE.pack(sequence), tag, _END])

    def check_small(self, data, value: bytes | None) -> bool:
        """
        Whether C{value} is the right C{_mac} value of the box due, a
        small box (at most L{SMALL_BOX} bytes) whose wire bytes before its
        C{_mac} key are C{data}, given whole; if so the next box is due.
        L{check} of the same box says the same in one step less (no
        L{BoxTag}); on False, ask L{check}, which says why (or takes a
        box too long for this).
        """
        if value is None or len(value) != MAC_BYTES or len(data) > SMALL_BOX:
            return False
        sequence = self.sequence
        if value[: _SEQUENCE.size] != _SEQUENCE.pack(sequence):
            return False
        if not hmac.compare_digest(self.small_tag(data, sequence), value[_SEQUENCE.size :]):
            return False
        self.sequence = sequence + 1
        return True

    def check(self, mac: BoxTag, value: bytes | None) -> str | None:
        """
        Check a received box whose bytes went into C{mac} against its
        C{_mac} C{value}; None if it is good (and the next is due), else
        why not.
        """
        if value is None:
            return "sent a box without a MAC (an older cw, or not the peer that authenticated)"
        if len(value) != MAC_BYTES:
            return "sent a malformed MAC"
        (number,) = _SEQUENCE.unpack(value[: _SEQUENCE.size])
        tag = value[_SEQUENCE.size :]
        good = hmac.compare_digest(mac.tag(), tag)
        if good and number == mac.sequence:
            self.sequence += 1
            return None
        if number != mac.sequence:
            replayed = mac.tag_as(number)
            if replayed is None:
                # Checked under the due box's one-time key: we cannot tell which.
                return (
                    f"sent box {number} out of sequence ({mac.sequence} was due) or a changed"
                    " box: replayed, reordered or forged"
                )
            if hmac.compare_digest(replayed, tag):
                return f"sent box {number} out of sequence ({mac.sequence} was due): replayed or reordered"
        return "sent a box with a wrong MAC (changed in transit, or not sent by the peer that authenticated)"


def box_body(box):
    """
    The wire bytes of C{box} (an C{amp.AmpBox}) without the empty key that
    ends it: C{box.serialize()[:-2]}, made in one join (the hot boxes that
    get signed, L{BoxMac.sign}).  A box AMP would refuse to serialize
    (a C{str}, a key or value too long) goes to AMP, which raises as it does.
    """
    parts = []
    for key, value in sorted(box.items()):
        if (
            type(key) is not bytes
            or type(value) is not bytes
            or len(key) > amp.MAX_KEY_LENGTH
            or len(value) > amp.MAX_VALUE_LENGTH
        ):
            return memoryview(amp.AmpBox.serialize(box))[:-2]
        parts += (_LENGTH.pack(len(key)), key, _LENGTH.pack(len(value)), value)
    return b"".join(parts)


class BoxTag:
    """
    The tag of one box being written or read (see L{BoxMac}): fed with
    C{update}, read once with L{tag}.
    """

    __slots__ = ("_box_mac", "sequence", "_kept", "_poly")

    def __init__(self, box_mac: BoxMac, sequence: int) -> None:
        self._box_mac = box_mac
        #: The box's sequence number.
        self.sequence = sequence
        #: The box's bytes so far while they fit in L{SMALL_BOX}, else None.
        self._kept: bytearray | None = bytearray()
        #: Poly1305 once the box is longer than that.
        self._poly: Poly1305 | None = None

    def update(self, data) -> None:
        """The next bytes of the box (any bytes-like object; not kept beyond L{SMALL_BOX} bytes)."""
        poly = self._poly
        if poly is None:
            kept = self._kept
            if len(kept) + len(data) <= SMALL_BOX:
                kept += data
                return
            poly = self._poly = Poly1305(self._box_mac.one_time_key(self.sequence))
            poly.update(kept)
            self._kept = None
        poly.update(data)

    def item(self, data: bytes) -> None:
        """A key or value of the box: its length prefix, then its bytes (L{update} twice, in one call)."""
        kept = self._kept
        if kept is not None and len(kept) + len(data) < SMALL_BOX - 1:
            kept += _LENGTH.pack(len(data))
            kept += data
            return
        self.update(_LENGTH.pack(len(data)))
        self.update(data)

    def tag(self) -> bytes:
        """The box's tag, once all its bytes went in (once only for a big box)."""
        if self._poly is not None:
            return self._poly.finalize()
        return self._box_mac.small_tag(self._kept, self.sequence)

    def tag_as(self, sequence: int) -> bytes | None:
        """
        The tag the box would have if numbered C{sequence}, to tell a
        replayed box from a forged one; None for a big box (its bytes are
        gone).
        """
        if self._poly is not None:
            return None
        return self._box_mac.small_tag(self._kept, sequence)


def protocol_name(version: int | None) -> str:
    """A peer's protocol version for messages (None: one from before versions were exchanged here)."""
    return "6 or older" if version is None else str(version)


def refused_retry_delay(refusals: int, base: float) -> float:
    """
    Seconds to wait before trying again after C{refusals} (1 or more)
    handshakes in a row failed on a secret: C{base}, doubling each time, at
    most L{REFUSED_RETRY_MAX} (or C{base} if that is longer).
    """
    return min(base * 2 ** min(refusals - 1, 32), max(REFUSED_RETRY_MAX, base))


class WrongSecretLog:
    """
    Decides when the master warns that a peer holds another secret: once
    per address, then at most once every L{WRONG_SECRET_LOG_INTERVAL}
    seconds per address, counting the failures it kept quiet about.
    Remembers at most C{size} addresses.
    """

    def __init__(self, clock, interval: float = WRONG_SECRET_LOG_INTERVAL, size: int = 4096) -> None:
        self.clock = clock
        self.interval = interval
        self.size = size
        #: address -> [time of the last warning, failures since].
        self._seen: dict[str, list] = {}

    def failed(self, address: str) -> int | None:
        """
        A handshake from C{address} failed on the secret: None to stay
        quiet, else the number of failures since the last warning.
        """
        now = self.clock.seconds()
        seen = self._seen.get(address)
        if seen is not None and now - seen[0] < self.interval:
            seen[1] += 1
            return None
        quiet = seen[1] if seen is not None else 0
        self._seen.pop(address, None)
        if len(self._seen) >= self.size:
            del self._seen[next(iter(self._seen))]
        self._seen[address] = [now, 0]
        return quiet


def secret_source(secret: bytes) -> str:
    """Where C{secret} came from, for messages: its file if known."""
    path = getattr(secret, "path", None)
    return f"secret file {path}" if path else "the secret it was given"


class AuthGate:
    """
    Mixin for L{amp.AMP} subclasses: until C{self.authenticated} is true,
    only the commands named in C{open_commands} are dispatched, at most
    L{PREAUTH_BYTES} may arrive, and the peer has L{AUTH_TIMEOUT} seconds.

    Anything else closes the connection with a log line naming the peer.
    A protocol built with C{secret=None} (C{--insecure}) starts out
    authenticated.

    Once the handshake has agreed on keys (L{start_session}), every box sent
    is closed with its MAC and every box received must carry a good one
    (see the module docstring).  Boxes that L{cw.wire.streaming.StreamingSender}
    writes piece by piece are signed as they are written (L{box_signer}).
    """

    authenticated = False
    open_commands: frozenset[bytes] = frozenset()
    #: Largest box (bytes of values) accepted, authenticated or not.
    max_box_bytes = 1 << 62
    _box_bytes = 0
    preauth_bytes = PREAUTH_BYTES
    auth_timeout = AUTH_TIMEOUT
    _received = 0
    _auth_timer = None
    #: MACs of the boxes sent and received, once the session started.
    box_signer: BoxMac | None = None
    _box_checker: BoxMac | None = None
    #: The hash of the box being received, and its C{_mac} value.
    _box_hash = None
    _box_mac: bytes | None = None
    _reading_mac = False
    #: Why this side dropped the connection (see L{reject}), for messages.
    rejected: str | None = None

    def connectionMade(self):
        no_delay(self.transport)
        super().connectionMade()

    def peer_description(self) -> str:
        peer = self.transport.getPeer() if self.transport else None
        host = getattr(peer, "host", None)
        return f"{host}:{peer.port}" if host and hasattr(peer, "port") else str(peer)

    def reject(self, why: str, abort: bool = True) -> None:
        """
        Log why and drop the connection: at once (C{abort}), or after what
        was already written, such as an error answer, has been sent.
        """
        if self.transport is None or getattr(self.transport, "disconnecting", False):
            return
        log.warn("{peer}: dropping the connection: {why}", peer=self.peer_description(), why=why)
        self.rejected = why
        self.paused = True  # parse nothing more of what is buffered
        if abort:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    def start_auth_timer(self, clock) -> None:
        if not self.authenticated:
            self._auth_timer = clock.callLater(
                self.auth_timeout,
                self.reject,
                f"did not authenticate within {self.auth_timeout:g} s",
            )

    def mark_authenticated(self) -> None:
        self.authenticated = True
        if self._auth_timer is not None and self._auth_timer.active():
            self._auth_timer.cancel()
        self._auth_timer = None

    def start_session(self, send_key: bytes, receive_key: bytes) -> None:
        """
        From now on, sign every box sent with C{send_key} and accept only
        boxes signed with C{receive_key} (see L{session_keys}).  Called
        between boxes: right after sending the last unsigned box (the
        connecting side's L{Prove}), or before answering it (the master).
        """
        self.box_signer = BoxMac(send_key)
        self._box_checker = BoxMac(receive_key)

    def box_bytes(self, box) -> bytes:
        """
        C{box}'s wire bytes as L{sendBox} writes them: signed and numbered
        once the session has started, so boxes must be written in the order
        this is called.
        """
        signer = self.box_signer
        if signer is None:
            return box.serialize()
        return signer.sign(box_body(box))

    def sendBox(self, box):
        if self.box_signer is None:
            return super().sendBox(box)
        if self.transport is None:
            raise error.ConnectionLost()
        data = self.box_bytes(box)
        if not write_through(self.transport, data):
            self.transport.write(data)

    def dataReceived(self, data: bytes) -> None:
        if not self.authenticated:
            self._received += len(data)
            if self._received > self.preauth_bytes:
                self.reject(f"sent over {self.preauth_bytes} bytes without authenticating")
                return
        super().dataReceived(data)

    def proto_value(self, string: bytes):
        # Count each box's bytes as they arrive, so an oversized box is refused
        # before it has been buffered whole.
        self._box_bytes += len(string)
        if self._box_bytes > self.max_box_bytes:
            self.reject(f"sent a message of over {self.max_box_bytes:,} bytes")
            return "value"
        if self._box_hash is not None:
            if self._reading_mac:
                # The MAC closes the box: keep it out of the box and the hash.
                self._reading_mac = False
                self._box_mac = string
                return expect_key(self)
            self._box_hash.item(string)
        return super().proto_value(string)

    def chunk_started(self, length: int) -> bool:
        # A chunk read straight into its buffer (L{cw.wire.streaming.ChunkReceiver}):
        # counted and hashed as C{proto_value} counts and hashes other values.
        self._box_bytes += length
        if self._box_bytes > self.max_box_bytes:
            self.reject(f"sent a message of over {self.max_box_bytes:,} bytes")
            return False
        if self._box_hash is not None:
            self._box_hash.update(_LENGTH.pack(length))
        return super().chunk_started(length)

    def chunk_piece(self, piece) -> None:
        if self._box_hash is not None:
            self._box_hash.update(piece)
        super().chunk_piece(piece)

    def whole_box(self, box, wire, last: int) -> bool:
        # A box that arrived whole (L{cw.wire.streaming.ChunkReceiver}): counted
        # and its MAC checked as the key-by-key parse would (the MAC over
        # every byte before the C{_mac} key, which must come last), in one
        # pass.  Anything amiss is left to that parse, which refuses it.
        if len(wire) > self.max_box_bytes:
            return False
        checker = self._box_checker
        if checker is not None:
            if wire[last : last + len(_MAC_KEY_WIRE)] != _MAC_KEY_WIRE or len(box) < 2:
                return False
            value = box.pop(MAC_KEY)
            if not checker.check_small(wire[:last], value):
                mac = checker.start()
                mac.update(wire[:last])
                why = checker.check(mac, value)
                if why is not None:
                    self.reject(why)
                    return True
        if VOID_KEY in box:
            # (A forwarded box holds a chunked value, never parsed here;
            # but a voided box is never dispatched, whatever its form.)
            self._voided(box)
            return True
        self._box_bytes = 0
        return super().whole_box(box, wire, last)

    def proto_key(self, string: bytes):
        checker = self._box_checker
        if checker is not None:
            if self._box_hash is None:
                self._box_hash = checker.start()
            if not string:
                mac, value = self._box_hash, self._box_mac
                self._box_hash = self._box_mac = None
                why = checker.check(mac, value)
                if why is not None:
                    self.reject(why)
                    return "init"
                if VOID_KEY in current_box(self):
                    return self._voided(current_box(self))
            elif self._box_mac is not None:
                self.reject("sent more of a box after its MAC")
                return "init"
            elif string == MAC_KEY:
                self._reading_mac = True
            else:
                self._box_hash.item(string)
        if not string:
            self._box_bytes = 0
            if checker is None and VOID_KEY in current_box(self):
                return self._voided(current_box(self))
        return super().proto_key(string)

    def _voided(self, box) -> str:
        """
        Discard the box just ended, which its sender voided (L{VOID_KEY}):
        a box forwarded as it arrived whose source failed (see
        L{cw.wire.forwarding}).  Nothing of it is dispatched; the
        connection goes on.
        """
        self._box_bytes = 0
        why = box.get(VOID_KEY, b"")
        log.info(
            "{peer}: discarded a box its sender voided: {why}",
            peer=self.peer_description(),
            why=repr(bytes(why[:200]))[2:-1],
        )
        discard = getattr(self, "discard_assembly", None)
        if discard is not None:
            discard()
        return "init"

    def locateResponder(self, name: bytes):
        if not self.authenticated and name not in self.open_commands:
            self.reject(f"sent {name.decode('ascii', 'replace')!r} before authenticating")
            # The connection is gone: answer nothing, log no "unhandled command".
            return lambda box: defer.Deferred()
        return super().locateResponder(name)

    def connectionLost(self, reason):
        if self._auth_timer is not None and self._auth_timer.active():
            self._auth_timer.cancel()
        super().connectionLost(reason)


@defer.inlineCallbacks
def authenticate(proto: AuthGate, secret: bytes | None, role: str, address: str):
    """
    Run the connecting side of the handshake on C{proto}; mark it
    authenticated and start its session (L{AuthGate.start_session}), or
    fail with L{AuthenticationFailed}.  With C{secret=None} (insecure)
    nothing is exchanged and nothing is signed.
    """
    if secret is None:
        proto.mark_authenticated()
        return
    mine = new_nonce()
    try:
        answer = yield proto.callRemote(Challenge, role=role, nonce=mine, version=PROTOCOL_VERSION)
    except (AuthenticationFailed, amp.RemoteAmpError) as e:
        # Whatever the peer said is unauthenticated: quoted (repr), never raw.
        raise AuthenticationFailed(
            f"the cw master at {address} refused to authenticate: {str(e)!r}"
        ) from None
    if answer.get("version") != PROTOCOL_VERSION:
        # It would take every box this side signs for a forgery.
        raise AuthenticationFailed(
            f"the cw master at {address} speaks cw protocol {protocol_name(answer.get('version'))},"
            f" this {role} speaks {PROTOCOL_VERSION}: install the same cw version everywhere"
        )
    theirs = answer["nonce"]
    if len(theirs) != NONCE_BYTES or not hmac.compare_digest(
        answer["proof"], master_proof(secret, role, mine, theirs)
    ):
        # Tell the master too (an empty proof reveals nothing), so that it
        # logs the mismatch; then give up whatever it answers.
        proto.callRemote(Prove, proof=b"").addErrback(lambda _: None)
        raise AuthenticationFailed(
            f"the cw master at {address} and this {role} hold different secrets"
            f" (this {role} used {secret_source(secret)}).  Either side may have the"
            " wrong one: give both the same secret file (--secret-file /"
            f" CW_SECRET_FILE), or check that {address} is your cw master"
        )
    signed = proto.callRemote(Prove, proof=peer_proof(secret, role, mine, theirs))
    # Everything after this Prove is signed, its answer included.
    proto.start_session(*session_keys(secret, role, mine, theirs))
    try:
        yield signed
    except AuthenticationFailed:
        raise AuthenticationFailed(
            f"the cw master at {address} refused this {role}'s proof of the secret"
            f" ({secret_source(secret)}); use the master's secret file"
            " (--secret-file / CW_SECRET_FILE)"
        ) from None
    proto.mark_authenticated()


class MasterAuth(amp.CommandLocator):
    """
    The master's side of the handshake, for one connection: a mixin for the
    master's protocol next to L{AuthGate}.  Needs C{self.secret} and
    C{self.auth_clock}.
    """

    open_commands = frozenset([b"Challenge", b"Prove"])
    secret: bytes | None = None
    _challenge: tuple[str, bytes, bytes] | None = None
    #: Rate-limits the "wrong secret" warnings (None: warn every time).
    wrong_secrets: WrongSecretLog | None = None
    #: The clock (C{IReactorTime}) on whose next turn a refused proof hangs
    #: up, once its error answer is written; the master's clock.
    auth_clock = None

    @Challenge.responder
    def challenge(self, role, nonce, version=None):
        if self.secret is None:
            raise AuthenticationFailed(
                "this master runs with --insecure; connect with insecure=True (CW_INSECURE=1)"
            )
        if self._challenge is not None or len(nonce) != NONCE_BYTES:
            self.reject("sent a malformed or repeated Challenge")
            raise AuthenticationFailed("malformed challenge")
        if role not in ROLES:
            # Unauthenticated input: logged with repr, never raw.
            self.reject(f"sent a Challenge for the unknown role {role!r}")
            raise AuthenticationFailed("unknown role")
        if version != PROTOCOL_VERSION:
            # Its boxes would fail their MACs: say why while both still understand each other.
            why = (
                f"master speaks cw protocol {PROTOCOL_VERSION}, peer speaks {protocol_name(version)}:"
                " install the same cw version everywhere"
            )
            self.auth_clock.callLater(0, self.reject, f"refused: {why}", abort=False)
            raise AuthenticationFailed(why)
        mine = new_nonce()
        self._challenge = (role, nonce, mine)
        return {
            "nonce": mine,
            "proof": master_proof(self.secret, role, nonce, mine),
            "version": PROTOCOL_VERSION,
        }

    @Prove.responder
    def prove(self, proof):
        if self._challenge is None or self.authenticated:
            self.reject("sent Prove out of turn")
            raise AuthenticationFailed("no challenge")
        role, theirs, mine = self._challenge
        if not hmac.compare_digest(proof, peer_proof(self.secret, role, theirs, mine)):
            self._wrong_secret(role)
            self.auth_clock.callLater(0, self.reject, "failed authentication", abort=False)
            raise AuthenticationFailed("wrong secret")
        self.start_session(*reversed(session_keys(self.secret, role, theirs, mine)))
        self.mark_authenticated()
        return {}

    def _wrong_secret(self, role: str) -> None:
        """Warn that a peer holds another secret: once per address, then rate-limited."""
        peer = self.transport.getPeer() if self.transport else None
        host = str(getattr(peer, "host", None) or peer)
        quiet = 0 if self.wrong_secrets is None else self.wrong_secrets.failed(host)
        if quiet is None:
            return
        log.warn(
            "{peer}: a {role} failed to authenticate: it holds a different secret from this"
            " master's ({source}); give both the same secret file.{since}  Further failures"
            " from {host} are logged at most every {interval:g} s",
            peer=self.peer_description(),
            role=role,
            source=secret_source(self.secret),
            since=f"  {quiet} more failed since the last warning." if quiet else "",
            host=host,
            interval=WRONG_SECRET_LOG_INTERVAL if self.wrong_secrets is None else self.wrong_secrets.interval,
        )
