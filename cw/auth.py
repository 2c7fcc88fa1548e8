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
checks out.  Comparisons are constant-time.

L{AuthGate} is the part every cw AMP protocol shares: it refuses commands
before authentication, caps what an unauthenticated peer may send, and drops
a peer that does not authenticate in time.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from twisted.internet import defer
from twisted.logger import Logger
from twisted.protocols import amp

log = Logger()

NONCE_BYTES = 32
#: Bytes an unauthenticated peer may send before it is dropped.
PREAUTH_BYTES = 16 * 1024
#: Seconds a peer has to authenticate.
AUTH_TIMEOUT = 10.0

_DOMAIN = b"cw-auth-1"


class AuthenticationFailed(Exception):
    """The other side does not hold the same secret (or refused to check)."""


class Challenge(amp.Command):
    """Start the handshake: the peer's role and nonce."""

    arguments = [(b"role", amp.Unicode()), (b"nonce", amp.String())]
    response = [(b"nonce", amp.String()), (b"proof", amp.String())]
    errors = {AuthenticationFailed: b"AUTHENTICATION_FAILED"}


class Prove(amp.Command):
    """Finish the handshake: the peer's proof over both nonces."""

    arguments = [(b"proof", amp.String())]
    response: list = []
    errors = {AuthenticationFailed: b"AUTHENTICATION_FAILED"}


def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def proof(secret: bytes, *parts: bytes) -> bytes:
    """HMAC-SHA256 over the parts, each length-prefixed so none can blur into the next."""
    mac = hmac.new(secret, _DOMAIN, hashlib.sha256)
    for part in parts:
        mac.update(len(part).to_bytes(4, "big"))
        mac.update(part)
    return mac.digest()


def master_proof(secret: bytes, role: str, peer_nonce: bytes, master_nonce: bytes) -> bytes:
    return proof(secret, b"master", role.encode(), peer_nonce, master_nonce)


def peer_proof(secret: bytes, role: str, peer_nonce: bytes, master_nonce: bytes) -> bytes:
    return proof(secret, role.encode(), master_nonce, peer_nonce)


class AuthGate:
    """
    Mixin for L{amp.AMP} subclasses: until C{self.authenticated} is true,
    only the commands named in C{open_commands} are dispatched, at most
    L{PREAUTH_BYTES} may arrive, and the peer has L{AUTH_TIMEOUT} seconds.

    Anything else closes the connection with a log line naming the peer.
    A protocol built with C{secret=None} (C{--insecure}) starts out
    authenticated.
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

    def connectionMade(self):
        from cw.address import no_delay

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
        log.warn("Dropping connection from {peer}: {why}", peer=self.peer_description(), why=why)
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
        return super().proto_value(string)

    def proto_key(self, string: bytes):
        if not string:
            self._box_bytes = 0
        return super().proto_key(string)

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
def authenticate(proto: amp.AMP, secret: bytes | None, role: str, address: str):
    """
    Run the connecting side of the handshake on C{proto}; mark it
    authenticated or fail with L{AuthenticationFailed}.  With C{secret=None}
    (insecure) nothing is exchanged.
    """
    if secret is None:
        proto.mark_authenticated()
        return
    mine = new_nonce()
    try:
        answer = yield proto.callRemote(Challenge, role=role, nonce=mine)
    except AuthenticationFailed as e:
        raise AuthenticationFailed(f"the cw master at {address} refused to authenticate: {e}") from None
    theirs = answer["nonce"]
    if len(theirs) != NONCE_BYTES or not hmac.compare_digest(
        answer["proof"], master_proof(secret, role, mine, theirs)
    ):
        raise AuthenticationFailed(
            f"the cw master at {address} does not hold this secret: it is an impostor"
            " or uses another secret file (check --secret-file / CW_SECRET_FILE)"
        )
    try:
        yield proto.callRemote(Prove, proof=peer_proof(secret, role, mine, theirs))
    except AuthenticationFailed:
        raise AuthenticationFailed(
            f"the cw master at {address} rejected this {role}'s secret; use the"
            " master's secret file (--secret-file / CW_SECRET_FILE)"
        ) from None
    proto.mark_authenticated()


class MasterAuth(amp.CommandLocator):
    """
    The master's side of the handshake, for one connection: a mixin for the
    master's protocol next to L{AuthGate}.  Needs C{self.secret}.
    """

    open_commands = frozenset([b"Challenge", b"Prove"])
    secret: bytes | None = None
    _challenge: tuple[str, bytes, bytes] | None = None

    @Challenge.responder
    def challenge(self, role, nonce):
        if self.secret is None:
            raise AuthenticationFailed(
                "this master runs with --insecure; connect with insecure=True (CW_INSECURE=1)"
            )
        if self._challenge is not None or len(nonce) != NONCE_BYTES:
            self.reject("sent a malformed or repeated Challenge")
            raise AuthenticationFailed("malformed challenge")
        mine = new_nonce()
        self._challenge = (role, nonce, mine)
        return {"nonce": mine, "proof": master_proof(self.secret, role, nonce, mine)}

    @Prove.responder
    def prove(self, proof):
        if self._challenge is None or self.authenticated:
            self.reject("sent Prove out of turn")
            raise AuthenticationFailed("no challenge")
        role, theirs, mine = self._challenge
        if not hmac.compare_digest(proof, peer_proof(self.secret, role, theirs, mine)):
            log.warn(
                "Authentication failed for a {role} from {peer}: wrong secret",
                role=role,
                peer=self.peer_description(),
            )
            from twisted.internet import reactor

            reactor.callLater(0, self.reject, "failed authentication", abort=False)
            raise AuthenticationFailed("wrong secret")
        self.mark_authenticated()
        return {}
