"""
Unit tests of the handshake's pure parts (L{cw.wire.auth}): the proofs, the
session keys and the master's checks of a peer's proof, without sockets.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.poly1305 import Poly1305
from twisted.internet import reactor, task
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols import amp
from twisted.test.iosim import connectedServerAndClient
from twisted.trial import unittest

from cw.errors import AuthenticationFailed
from cw.test.peers import GatedAMP
from cw.wire import auth as auth
from cw.wire.auth import (
    NONCE_BYTES,
    AuthGate,
    BoxMac,
    MasterAuth,
    authenticate,
    master_proof,
    new_nonce,
    peer_proof,
    proof,
    session_keys,
)
from cw.wire.commands import PROTOCOL_VERSION, Prove

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

    def signed(self, data: bytes, pieces: int = 1) -> bytes:
        """
        C{data} closed by the sender's MAC, fed in C{pieces} pieces of
        uneven sizes (as L{cw.wire.streaming.StreamingSender} feeds a box
        it writes piece by piece) or whole (L{BoxMac.sign}).
        """
        if pieces == 1:
            return self.sender.sign(data)
        mac = self.sender.start()
        cuts = sorted({len(data) * k * k // (pieces * pieces) for k in range(pieces + 1)})
        for start, end in zip(cuts, cuts[1:], strict=False):
            mac.update(memoryview(data)[start:end])
        return data + self.sender.trailer(mac)

    def test_pieces_make_no_difference(self):
        """
        Fed in one piece or many, either side of L{SMALL_BOX} and across
        it, a box gets the same MAC: the receiver, fed as its reads cut
        the box, checks what the sender wrote piece by piece.
        """
        for size in (0, 1, 200, auth.SMALL_BOX - 1, auth.SMALL_BOX, auth.SMALL_BOX + 1, 70_001):
            data = os.urandom(size)
            whole, other = BoxMac(b"k" * 32), BoxMac(b"k" * 32)
            self.assertEqual(whole.sign(data), other.sign(data))
            for pieces in (1, 3, 7):
                value = mac_value(self.signed(data, pieces), data)
                mac = self.receiver.start()
                for at in range(0, size, 1000):
                    mac.update(data[at : at + 1000])
                self.assertIsNone(self.receiver.check(mac, value), (size, pieces))

    def test_construction(self):
        """
        A box of more than L{SMALL_BOX} bytes is tagged with Poly1305 under
        the one-time key of its number, a smaller one with HMAC-SHA256
        (cut to 16 bytes) over its bytes and number, as the docstring of
        L{BoxMac} says; the one-time keys are ChaCha20's keystream, 64 from
        each nonce, all different.
        """
        box_key, _ = session_keys(SECRET, "client", PEER_NONCE, MASTER_NONCE)
        stream_key = proof(box_key, b"one-time keys", domain=b"cw-box-1")
        small_key = proof(box_key, b"small boxes", domain=b"cw-box-1")
        keys = [self.sender.one_time_key(n) for n in range(200)]
        self.assertEqual(len(set(keys)), 200)
        self.assertEqual({len(key) for key in keys}, {32})
        stream = Cipher(algorithms.ChaCha20(stream_key, bytes(4) + (2).to_bytes(12, "little")), None)
        self.assertEqual(b"".join(keys[128:192]), stream.encryptor().update(bytes(64 * 32)))
        for _ in range(3):
            self.sender.sign(b"x")
        big, small = os.urandom(auth.SMALL_BOX + 1), os.urandom(auth.SMALL_BOX)
        self.assertEqual(
            mac_value(self.sender.sign(big), big),
            (3).to_bytes(8, "big") + Poly1305.generate_tag(keys[3], big),
        )
        self.assertEqual(
            mac_value(self.sender.sign(small), small),
            (4).to_bytes(8, "big")
            + hmac.new(small_key, small + (4).to_bytes(8, "big"), hashlib.sha256).digest()[:16],
        )

    def test_flipped_bit_anywhere_refused(self):
        """
        One bit flipped anywhere in a box, big (Poly1305) or small (HMAC),
        in its tag or in its number: refused.
        """
        for size in (auth.SMALL_BOX * 3 + 17, 300):
            data = os.urandom(size)
            value = mac_value(self.sender.sign(data), data)
            for at in range(size):
                changed = bytearray(data)
                changed[at] ^= 1 << (at % 8)
                self.assertIn("wrong MAC", self.check(bytes(changed), value), (size, at))
            for at in range(len(value)):
                changed = bytearray(value)
                changed[at] ^= 1 << (at % 8)
                why = self.check(data, bytes(changed))
                self.assertIsNotNone(why, (size, at))
                if at >= 8:  # the tag; a changed number is out of sequence
                    self.assertIn("wrong MAC", why, (size, at))
            self.assertIsNone(self.check(data, value))

    def test_replayed_under_another_number_refused(self):
        """
        A box, big or small, replayed later with its own number is refused
        as out of sequence; with its number changed to the one due (so the
        sequence looks right), as a wrong MAC, and with any other number,
        refused too: its tag holds only for the number it was signed with.
        """
        for size in (auth.SMALL_BOX * 2, 100):
            data = os.urandom(size)
            value = mac_value(self.sender.sign(data), data)
            self.assertIsNone(self.check(data, value))
            self.assertIn("out of sequence", self.check(data, value))
            due = self.receiver.sequence.to_bytes(8, "big")
            self.assertIn("wrong MAC", self.check(data, due + value[8:]))
            ahead = (self.receiver.sequence + 1).to_bytes(8, "big")
            self.assertIsNotNone(self.check(data, ahead + value[8:]))
            # The sender's next box is still good.
            follow = b"next"
            self.sender.sequence = self.receiver.sequence
            self.assertIsNone(self.check(follow, mac_value(self.sender.sign(follow), follow)))

    def test_truncated_mac_refused(self):
        """A MAC cut short (or grown), of a big box or a small one, is refused as malformed."""
        for size in (auth.SMALL_BOX + 1, 10):
            data = os.urandom(size)
            value = mac_value(self.sender.sign(data), data)
            for cut in (value[:-1], value[:8], value[:-8], b"", value + b"\0"):
                self.assertIn("malformed", self.check(data, cut))
            self.assertIsNone(self.check(data, value))

    def test_directions_do_not_verify_each_other(self):
        """
        The two directions of a connection have different keys: a box
        signed one way, big or small, fails the other way's check under
        the same number.
        """
        up, down = session_keys(SECRET, "client", PEER_NONCE, MASTER_NONCE)
        for size in (auth.SMALL_BOX * 2, 100):
            data = os.urandom(size)
            signed = BoxMac(up).sign(data)
            for key, good in ((down, False), (up, True)):
                receiver = BoxMac(key)
                mac = receiver.start()
                mac.update(data)
                why = receiver.check(mac, mac_value(signed, data))
                if good:
                    self.assertIsNone(why)
                else:
                    self.assertIn("wrong MAC", why)


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
        answer = side.challenge(role="worker", nonce=PEER_NONCE, version=PROTOCOL_VERSION)
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
            mine = side.challenge(role="client", nonce=PEER_NONCE, version=PROTOCOL_VERSION)["nonce"]
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
        side.challenge(role="client", nonce=PEER_NONCE, version=PROTOCOL_VERSION)
        self.assertRaises(AuthenticationFailed, side.challenge, role="client", nonce=PEER_NONCE)
        self.assertTrue(transport.disconnecting)

    def test_insecure_master_refuses_challenge(self):
        side, _ = self.connect()
        side.secret = None
        self.assertRaises(AuthenticationFailed, side.challenge, role="client", nonce=PEER_NONCE)


class OldChallenge(amp.Command):
    """L{Challenge} as cw spoke it before protocol 7: no versions either way."""

    commandName = b"Challenge"
    arguments = [(b"role", amp.Unicode()), (b"nonce", amp.String())]
    response = [(b"nonce", amp.String()), (b"proof", amp.String())]
    errors = {AuthenticationFailed: b"AUTHENTICATION_FAILED"}


class OldMasterSide(amp.AMP):
    """A master of protocol 6: it answers the Challenge as before, without its version."""

    @OldChallenge.responder
    def challenge(self, role, nonce):
        self.challenged = True
        return {"nonce": MASTER_NONCE, "proof": master_proof(SECRET, role, nonce, MASTER_NONCE)}

    @Prove.responder
    def prove(self, proof):
        self.proved = True
        return {}


class ProtocolVersionTests(unittest.SynchronousTestCase):
    """
    The two ends of a connection sign boxes alike only if they speak the
    same protocol version: the handshake says so, both ways, in words.
    """

    def connect(self, server: amp.AMP, client: amp.AMP):
        _, _, pump = connectedServerAndClient(lambda: server, lambda: client, clock=Clock())
        return pump

    def test_old_peer_refused_with_a_message(self):
        """
        A peer from before protocol 7 (a Challenge without a version)
        gets an error that names both versions and says what to do; the
        master hangs up once the error is written.
        """
        clock = Clock()
        master, peer = FakeMasterSide(), GatedAMP()
        master.auth_clock = clock
        pump = self.connect(master, peer)
        answers: list = []
        # Caught before the answer arrives (AMP drops an answer nobody waits on).
        peer.callRemote(OldChallenge, role="worker", nonce=PEER_NONCE).addBoth(answers.append)
        pump.flush()
        (answer,) = answers
        self.assertIsInstance(answer.value, AuthenticationFailed)
        message = str(answer.value)
        self.assertEqual(
            message,
            f"master speaks cw protocol {PROTOCOL_VERSION}, peer speaks 6 or older:"
            " install the same cw version everywhere",
        )
        self.assertFalse(master.transport.disconnecting)
        clock.advance(0)
        self.assertTrue(master.transport.disconnecting)
        self.assertIn("peer speaks 6 or older", master.rejected)

    def test_other_version_refused(self):
        """A Challenge with another version is refused the same way."""
        for version in (PROTOCOL_VERSION - 1, PROTOCOL_VERSION + 1):
            side = FakeMasterSide()
            side.makeConnection(StringTransport())
            side.auth_clock = Clock()
            with self.assertRaises(AuthenticationFailed) as caught:
                side.challenge(role="client", nonce=PEER_NONCE, version=version)
            self.assertIn(f"peer speaks {version}: install the same cw version", str(caught.exception))
            self.assertIsNone(side._challenge)

    def test_old_master_refused_with_a_message(self):
        """
        A master from before protocol 7 (its answer carries no version):
        the peer gives up before it proves anything or signs a box, with a
        message naming the master and both versions.
        """
        master, peer = OldMasterSide(), GatedAMP()
        pump = self.connect(master, peer)
        done = authenticate(peer, SECRET, "worker", "old.example:5494")
        pump.flush()
        message = str(self.failureResultOf(done, AuthenticationFailed).value)
        self.assertEqual(
            message,
            "the cw master at old.example:5494 speaks cw protocol 6 or older, this worker speaks"
            f" {PROTOCOL_VERSION}: install the same cw version everywhere",
        )
        self.assertTrue(master.challenged)
        self.assertFalse(hasattr(master, "proved"))
        self.assertIsNone(peer.box_signer)


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
