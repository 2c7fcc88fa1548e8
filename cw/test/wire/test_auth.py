"""
Unit tests of the handshake's pure parts (L{cw.wire.auth}): the proofs, the
session keys and the master's checks of a peer's proof, without sockets.
"""

from __future__ import annotations

import hashlib
import hmac

from twisted.internet import reactor, task
from twisted.internet.testing import StringTransport
from twisted.protocols import amp
from twisted.trial import unittest

from cw.errors import AuthenticationFailed
from cw.wire import auth as auth
from cw.wire.auth import (
    NONCE_BYTES,
    AuthGate,
    BoxMac,
    MasterAuth,
    master_proof,
    new_nonce,
    peer_proof,
    proof,
    session_keys,
)

SECRET = b"s" * 32
OTHER = b"o" * 32
PEER_NONCE = bytes(range(32))
MASTER_NONCE = bytes(range(32, 64))


def reference_proof(secret: bytes, domain: bytes, *parts: bytes) -> bytes:
    """The proof as the protocol defines it: HMAC-SHA256 of the domain, then each part behind its length."""
    message = domain + b"".join(len(p).to_bytes(4, "big") + p for p in parts)
    return hmac.new(secret, message, hashlib.sha256).digest()


class ProofTests(unittest.SynchronousTestCase):
    """The proofs bind the secret, the role and both nonces, in their places."""

    def test_construction(self):
        """A proof is HMAC-SHA256 over the domain and length-prefixed parts (the wire format)."""
        self.assertEqual(proof(SECRET, b"ab", b"c"), reference_proof(SECRET, b"cw-auth-1", b"ab", b"c"))
        self.assertEqual(
            master_proof(SECRET, "client", PEER_NONCE, MASTER_NONCE),
            reference_proof(SECRET, b"cw-auth-1", b"master", b"client", PEER_NONCE, MASTER_NONCE),
        )
        self.assertEqual(
            peer_proof(SECRET, "worker", PEER_NONCE, MASTER_NONCE),
            reference_proof(SECRET, b"cw-auth-1", b"worker", MASTER_NONCE, PEER_NONCE),
        )

    def test_parts_do_not_blur(self):
        """Moving bytes from one part to the next changes the proof."""
        self.assertNotEqual(proof(SECRET, b"ab", b"c"), proof(SECRET, b"a", b"bc"))
        self.assertNotEqual(proof(SECRET, b"", b"x"), proof(SECRET, b"x", b""))

    def test_everything_counts(self):
        """Another secret, role or nonce, or swapped nonces, give another proof."""
        args = ("client", PEER_NONCE, MASTER_NONCE)
        for make in (master_proof, peer_proof):
            mine = make(SECRET, *args)
            self.assertEqual(len(mine), 32)
            self.assertEqual(mine, make(SECRET, *args))
            self.assertNotEqual(mine, make(OTHER, *args))
            self.assertNotEqual(mine, make(SECRET, "worker", PEER_NONCE, MASTER_NONCE))
            self.assertNotEqual(mine, make(SECRET, "client", MASTER_NONCE, PEER_NONCE))
            self.assertNotEqual(mine, make(SECRET, "client", PEER_NONCE, new_nonce()))
            self.assertNotEqual(mine, make(SECRET, "client", new_nonce(), MASTER_NONCE))

    def test_master_proof_cannot_be_reflected(self):
        """
        The master's proof is not the peer's: a peer cannot pass the
        master's own proof back to it, whatever the role.
        """
        for role in ("client", "worker", "master"):
            self.assertNotEqual(
                master_proof(SECRET, role, PEER_NONCE, MASTER_NONCE),
                peer_proof(SECRET, role, PEER_NONCE, MASTER_NONCE),
            )
            self.assertNotEqual(
                master_proof(SECRET, role, PEER_NONCE, MASTER_NONCE),
                peer_proof(SECRET, role, MASTER_NONCE, PEER_NONCE),
            )

    def test_session_keys(self):
        """
        Session keys: one per direction, apart from the proofs (another
        domain), and bound to the secret, the role and both nonces.
        """
        up, down = session_keys(SECRET, "client", PEER_NONCE, MASTER_NONCE)
        self.assertNotEqual(up, down)
        parts = (b"client", PEER_NONCE, MASTER_NONCE)
        self.assertEqual(up, reference_proof(SECRET, b"cw-session-1", b"peer-to-master", *parts))
        self.assertEqual(down, reference_proof(SECRET, b"cw-session-1", b"master-to-peer", *parts))
        proofs = {
            master_proof(SECRET, "client", PEER_NONCE, MASTER_NONCE),
            peer_proof(SECRET, "client", PEER_NONCE, MASTER_NONCE),
        }
        self.assertFalse(proofs & {up, down})
        for other in (
            session_keys(OTHER, "client", PEER_NONCE, MASTER_NONCE),
            session_keys(SECRET, "worker", PEER_NONCE, MASTER_NONCE),
            session_keys(SECRET, "client", new_nonce(), MASTER_NONCE),
            session_keys(SECRET, "client", PEER_NONCE, new_nonce()),
        ):
            self.assertFalse({up, down} & set(other))

    def test_nonces_fresh(self):
        self.assertEqual(len(new_nonce()), NONCE_BYTES)
        self.assertNotEqual(new_nonce(), new_nonce())


def mac_value(signed: bytes, data: bytes) -> bytes:
    """The C{_mac} value (sequence number and digest) of a box L{BoxMac.sign} closed."""
    head = len(data) + len(auth._MAC_HEAD)
    return signed[head : len(signed) - len(auth._END)]


class BoxMacTests(unittest.SynchronousTestCase):
    """Every box after the handshake is numbered and signed; the receiver checks both."""

    def setUp(self):
        key, _ = session_keys(SECRET, "client", PEER_NONCE, MASTER_NONCE)
        self.sender, self.receiver = BoxMac(key), BoxMac(key)

    def check(self, data: bytes, value: bytes) -> str | None:
        mac = self.receiver.start()
        mac.update(data)
        return self.receiver.check(mac, value)

    def test_sequence(self):
        """
        Boxes are numbered from 0; each is accepted once, in order: a box
        replayed later, or one skipped, is refused.
        """
        boxes = [(b"box %d" % n, self.sender.sign(b"box %d" % n)) for n in range(4)]
        values = [mac_value(signed, data) for data, signed in boxes]
        self.assertEqual(values[0][:8], bytes(8))
        self.assertEqual(values[3][:8], (3).to_bytes(8, "big"))
        for (data, _), value in zip(boxes[:3], values[:3], strict=True):
            self.assertIsNone(self.check(data, value))
        self.assertIn("out of sequence", self.check(boxes[1][0], values[1]))
        self.assertIsNone(self.check(boxes[3][0], values[3]))

    def test_changed_box_refused(self):
        data = b"some box"
        value = mac_value(self.sender.sign(data), data)
        self.assertIn("wrong MAC", self.check(b"some bot", value))
        self.assertIn("malformed", self.check(data, value[:-1]))
        self.assertIn("without a MAC", self.check(data, None))
        self.assertIsNone(self.check(data, value))


class FakeMasterSide(MasterAuth, AuthGate, amp.AMP):
    """The master's side of the handshake on an in-memory transport."""

    secret = SECRET
    auth_clock = reactor


class MasterAuthTests(unittest.TestCase):
    """The master's checks of the peer's half of the handshake."""

    def connect(self) -> tuple[FakeMasterSide, StringTransport]:
        side = FakeMasterSide()
        transport = StringTransport()
        side.makeConnection(transport)
        return side, transport

    def settle(self):
        """Let the master's deferred hang-up run (it is scheduled, not immediate)."""
        return task.deferLater(reactor, 0, lambda: None)

    def test_right_proof_authenticates(self):
        side, transport = self.connect()
        answer = side.challenge(role="worker", nonce=PEER_NONCE)
        self.assertEqual(len(answer["nonce"]), NONCE_BYTES)
        self.assertEqual(answer["proof"], master_proof(SECRET, "worker", PEER_NONCE, answer["nonce"]))
        self.assertEqual(side.prove(proof=peer_proof(SECRET, "worker", PEER_NONCE, answer["nonce"])), {})
        self.assertTrue(side.authenticated)
        self.assertFalse(transport.disconnecting)

    def test_wrong_proofs_refused(self):
        """
        A proof from another secret, for another role, over other nonces,
        empty, or the master's own proof reflected: refused, and the
        connection is closed.
        """
        wrong = [
            lambda mine: peer_proof(OTHER, "client", PEER_NONCE, mine),
            lambda mine: peer_proof(SECRET, "worker", PEER_NONCE, mine),
            lambda mine: peer_proof(SECRET, "client", mine, PEER_NONCE),
            lambda mine: b"",
            lambda mine: master_proof(SECRET, "client", PEER_NONCE, mine),
        ]
        sides = []
        for make in wrong:
            side, transport = self.connect()
            mine = side.challenge(role="client", nonce=PEER_NONCE)["nonce"]
            self.assertRaises(AuthenticationFailed, side.prove, proof=make(mine))
            self.assertFalse(side.authenticated)
            sides.append(transport)

        def closed(_):
            self.assertEqual([t.disconnecting for t in sides], [True] * len(sides))

        return self.settle().addCallback(closed)

    def test_prove_without_challenge_refused(self):
        side, transport = self.connect()
        self.assertRaises(AuthenticationFailed, side.prove, proof=b"x" * 32)
        self.assertFalse(side.authenticated)
        self.assertTrue(transport.disconnecting)

    def test_bad_challenges_refused(self):
        """A short nonce, an unknown role or a second Challenge closes the connection."""
        for role, nonce in (("client", b"short"), ("master", PEER_NONCE)):
            side, transport = self.connect()
            self.assertRaises(AuthenticationFailed, side.challenge, role=role, nonce=nonce)
            self.assertTrue(transport.disconnecting)
        side, transport = self.connect()
        side.challenge(role="client", nonce=PEER_NONCE)
        self.assertRaises(AuthenticationFailed, side.challenge, role="client", nonce=PEER_NONCE)
        self.assertTrue(transport.disconnecting)

    def test_insecure_master_refuses_challenge(self):
        side, _ = self.connect()
        side.secret = None
        self.assertRaises(AuthenticationFailed, side.challenge, role="client", nonce=PEER_NONCE)


class PreauthTests(unittest.SynchronousTestCase):
    """What an unauthenticated peer may send before it is dropped."""

    def test_preauth_bytes(self):
        """
        PREAUTH_BYTES of a box still being received pass; one byte more and
        the connection is dropped.
        """
        side, transport = FakeMasterSide(), StringTransport()
        side.makeConnection(transport)
        head = b"\x00\x03key\xff\xff"  # a key, then a value far longer than what follows
        side.dataReceived(head + b"x" * (auth.PREAUTH_BYTES - len(head)))
        self.assertFalse(transport.disconnecting)
        side.dataReceived(b"x")
        self.assertTrue(transport.disconnecting)
