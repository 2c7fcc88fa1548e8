"""
Addresses: how a user names a master, turned into Twisted endpoints.

A master address may be written as a host name (C{node12}), a host and port
(C{node12:6000}, C{[::1]:6000}) or a full Twisted endpoint description
(C{tcp:node12:6000}, C{unix:/run/cw.sock}, C{ssl:host=node12:port=6000}).
Listening addresses are endpoint descriptions (C{tcp:5494}) or a bare port.

Layer rule (cw.wire): imports Twisted, ampoule, cw.system, cw.core and cw.errors; nothing above.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable

from twisted.internet import defer, endpoints, error, threads
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamClientEndpoint, IStreamServerEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from cw.core.records import PORT
from cw.system import exit_with_status
from cw.wire.private import set_ssl_context_factory, ssl_context_factory

#: Endpoint types a client may name a master with.
CLIENT_PREFIXES = ("tcp:", "unix:", "ssl:", "tls:")

log = Logger()


def is_endpoint(address: str) -> bool:
    return address.startswith(CLIENT_PREFIXES)


def _bad(host: str) -> ValueError:
    return ValueError(
        f"bad master address {host!r}: expected HOST, HOST:PORT, [IPv6]:PORT or an"
        " endpoint description such as tcp:HOST:PORT or unix:PATH"
    )


def client_description(host: str | None = None, port: int | None = None) -> str:
    """
    The endpoint description for connecting to the master at C{host}
    (see the module docstring for the accepted forms) and C{port}.
    """
    host = host or "localhost"
    if is_endpoint(host):
        return host
    if host.startswith("["):
        name, bracket, rest = host[1:].partition("]")
        if not bracket or not name or (rest and not (rest[:1] == ":" and rest[1:].isdigit())):
            raise _bad(host)
        if rest:
            port = int(rest[1:])
        host = name
    elif host.count(":") == 1:
        name, _, port_text = host.partition(":")
        if not name or not port_text.isdigit():
            raise _bad(host)
        host, port = name, int(port_text)
    if port is None:
        port = PORT
    return "tcp:host=%s:port=%d" % (host.replace(":", r"\:"), port)


def client_endpoint(reactor, host: str | None = None, port: int | None = None) -> IStreamClientEndpoint:
    """A client endpoint for the master named by C{host} and C{port}."""
    return endpoints.clientFromString(reactor, client_description(host, port))


@implementer(IStreamClientEndpoint)
class FindingEndpoint:
    """
    A client endpoint for a master that may move: before each connection
    it asks C{find} (a L{cw.discovery.MasterSource}: an address file,
    SLURM), in a thread, where the master is now, and connects there; if
    C{find} knows no address at the moment, the last one found (or
    C{address}) is used.  Without C{find}, it always connects to
    C{address}.  C{on_found(description)} is told each address used.
    """

    def __init__(
        self,
        reactor,
        address: str | None,
        find: Callable[[], str | None] | None = None,
        on_found: Callable[[str], None] | None = None,
    ) -> None:
        self.reactor = reactor
        self.address = address
        self.find = find
        self.on_found = on_found

    def connect(self, factory):
        d = threads.deferToThread(self.find) if self.find is not None else defer.succeed(None)

        def found(address: str | None):
            if address:
                self.address = client_description(address)
            if self.address is None:
                raise error.ConnectError(string=f"{self.find} gives no master address yet")
            if self.on_found is not None:
                self.on_found(self.address)
            return endpoints.clientFromString(self.reactor, self.address).connect(factory)

        return d.addCallback(found)


def server_description(listen: str | int | None = None) -> str:
    """The endpoint description a master listens on (default C{tcp:5494})."""
    if listen is None:
        return "tcp:%d" % PORT
    listen = str(listen)
    if listen.isdigit():
        return "tcp:" + listen
    return listen


def server_endpoint(reactor, listen: str | int | None = None) -> IStreamServerEndpoint:
    """
    The endpoint a master listens on.  Besides Twisted's own parameters, an
    C{ssl:} description may name C{caCerts=FILE} (PEM): clients must then
    present a certificate signed by one of those CAs.
    """
    description = server_description(listen)
    match = _CA_CERTS.search(description) if description.startswith("ssl:") else None
    if match is None:
        return endpoints.serverFromString(reactor, description)
    # Imported here, not at the top: twisted.internet.ssl needs pyOpenSSL,
    # an optional dependency that only C{caCerts=} listening uses.
    from twisted.internet import ssl

    endpoint = endpoints.serverFromString(reactor, description[: match.start()] + description[match.end() :])
    base = ssl_context_factory(endpoint)
    try:
        with open(match.group(1), "rb") as f:
            authorities = ssl.Certificate.loadPEM(f.read())
    except OSError as e:
        raise ValueError(f"cannot read caCerts file {match.group(1)!r}: {e}") from None
    set_ssl_context_factory(
        endpoint,
        ssl.CertificateOptions(
            privateKey=base.privateKey,
            certificate=base.certificate,
            extraCertChain=base.extraCertChain,
            verify=True,
            requireCertificate=True,
            caCerts=[authorities.original],
        ),
    )
    return endpoint


_CA_CERTS = re.compile(r":caCerts=((?:[^:\\]|\\.)+)")


def describe_listening(port) -> str:
    """A client address for a listening port, e.g. C{tcp:127.0.0.1:5494}."""
    host = port.getHost()
    kind = getattr(host, "type", "")
    if kind in ("TCP", "TCP6"):
        name = host.host
        if name in ("0.0.0.0", ""):
            name = "127.0.0.1"
        elif name == "::":
            name = "::1"
        if ":" in name:
            return "tcp:host=%s:port=%d" % (name.replace(":", r"\:"), host.port)
        return "tcp:host=%s:port=%d" % (name, host.port)
    name = getattr(host, "name", None)
    if name is not None:
        return "unix:" + (name.decode() if isinstance(name, bytes) else name)
    return str(host)


def stop_reactor(reactor, status: int | None = None) -> None:
    """
    Stop C{reactor} now if it runs, else as soon as it starts: twistd starts
    services before the reactor runs, so a service that cannot listen at
    start-up must not wait for a reactor that is not running yet (the
    process would go on without it).  With C{status}, the process then
    exits with that status (L{exit_with_status}) rather than twistd's 0.
    """
    if status is not None:
        exit_with_status(status)
    if reactor.running:
        reactor.stop()
    else:
        reactor.callWhenRunning(reactor.stop)


def listen_failed(reactor, what: str, listen: str, option: str, failure) -> None:
    """
    C{what} (C{"cw master"}) could not listen on C{listen}: log one line
    naming the address, the reason and what to do, stop the reactor and
    exit with status 1.
    """
    reason = failure.getErrorMessage()
    if failure.check(CannotListenError) and failure.value.socketError is not None:
        reason = str(failure.value.socketError)
    log.error(
        "{what} could not listen on {listen} ({reason}): stop whatever uses that address"
        " or choose another with {option}",
        what=what,
        listen=listen,
        reason=reason,
        option=option,
    )
    stop_reactor(reactor, status=1)


#: TCP keepalive for connections without application heartbeats (clients):
#: probe after this many idle seconds, then every KEEPALIVE_INTERVAL, and
#: give up after KEEPALIVE_COUNT unanswered probes (about 25 s in all).
KEEPALIVE_IDLE = 10
KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 3


def no_delay(transport) -> bool:
    """
    Send small writes at once (C{TCP_NODELAY}): cw's boxes are small and
    each waits for an answer, which Nagle's algorithm would delay.  Returns
    False for transports that are not TCP sockets.
    """
    handle = getattr(transport, "getHandle", lambda: None)()
    if not isinstance(handle, socket.socket) or handle.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    handle.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return True


def enable_keepalive(transport) -> bool:
    """
    Turn on TCP keepalive for C{transport}, so that a peer that vanished
    without closing (a half-open link) is noticed within about 25 seconds.
    Returns False for transports that are not TCP sockets.
    """
    handle = getattr(transport, "getHandle", lambda: None)()
    if not isinstance(handle, socket.socket) or handle.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    handle.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
        ("TCP_KEEPCNT", KEEPALIVE_COUNT),
    ):
        option = getattr(socket, name, None)
        if option is not None:
            handle.setsockopt(socket.IPPROTO_TCP, option, value)
    return True
