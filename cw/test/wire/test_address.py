"""
Tests for L{cw.wire.address}: how master addresses become endpoint descriptions.

Descriptions are also fed to Twisted's own parser (with a L{MemoryReactor},
so nothing connects or listens) to check that they mean what they should.
"""

from __future__ import annotations

from twisted.internet import endpoints
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from cw.core.records import PORT
from cw.wire.address import (
    client_description,
    client_endpoint,
    describe_listening,
    server_description,
    server_endpoint,
)


def tcp_target(description: str) -> tuple[str, int]:
    """The host and port that Twisted connects to for C{description}."""
    return connected_to(endpoints.clientFromString, description)


def connected_to(make_endpoint, description):
    """Where an endpoint made by C{make_endpoint(reactor, description)} connects (or listens)."""
    reactor = MemoryReactor()
    endpoint = make_endpoint(reactor, description)
    if hasattr(endpoint, "connect"):
        endpoint.connect(Factory.forProtocol(Protocol))
        calls = reactor.tcpClients or reactor.unixClients
    else:
        endpoint.listen(Factory.forProtocol(Protocol))
        calls = reactor.tcpServers or reactor.unixServers
    (call,) = calls
    if calls is reactor.unixClients or calls is reactor.unixServers:
        return call[0]  # the path
    if calls is reactor.tcpServers:
        return call[0], call[3]  # port, interface
    return call[0], call[1]  # host, port


class FakePort:
    """A listening port as far as L{describe_listening} looks at it."""

    def __init__(self, address):
        self.address = address

    def getHost(self):
        return self.address


class ClientDescriptionTests(SynchronousTestCase):
    """L{client_description} accepts the address forms users write."""

    def test_default(self):
        self.assertEqual(client_description(), "tcp:host=localhost:port=%d" % PORT)
        self.assertEqual(tcp_target(client_description(None)), ("localhost", PORT))

    def test_host(self):
        self.assertEqual(client_description("node12"), "tcp:host=node12:port=5494")

    def test_host_and_port_argument(self):
        self.assertEqual(tcp_target(client_description("node12", 6000)), ("node12", 6000))

    def test_host_with_port(self):
        self.assertEqual(client_description("node12:6000"), "tcp:host=node12:port=6000")
        self.assertEqual(tcp_target(client_description("node12:6000")), ("node12", 6000))

    def test_port_in_address_wins(self):
        self.assertEqual(tcp_target(client_description("node12:6000", 7000)), ("node12", 6000))

    def test_ip_address(self):
        self.assertEqual(tcp_target(client_description("10.0.0.5:6001")), ("10.0.0.5", 6001))

    def test_bracketed_ipv6_with_port(self):
        self.assertEqual(tcp_target(client_description("[::1]:6000")), ("::1", 6000))

    def test_bracketed_ipv6_without_port(self):
        self.assertEqual(tcp_target(client_description("[fe80::1]")), ("fe80::1", PORT))
        self.assertEqual(tcp_target(client_description("[::1]", 6001)), ("::1", 6001))

    def test_bad_port(self):
        for address in ["node12:http", "node12:", "node12:60a0", "node12:-1"]:
            self.assertRaises(ValueError, client_description, address)

    def test_bad_port_message_names_address(self):
        error = self.assertRaises(ValueError, client_description, "node12:http")
        self.assertIn("'node12:http'", str(error))

    def test_bad_bracketed_port(self):
        self.assertRaises(ValueError, client_description, "[::1]:http")

    def test_endpoints_pass_through(self):
        for description in [
            "tcp:node12:6000",
            "tcp:host=node12:port=6000",
            "unix:/run/cw.sock",
            "ssl:host=node12:port=6000",
        ]:
            self.assertEqual(client_description(description), description)
            self.assertEqual(client_description(description, 7000), description)

    def test_client_endpoint(self):
        self.assertEqual(connected_to(client_endpoint, "node12:6000"), ("node12", 6000))

    def test_unix_client_endpoint(self):
        self.assertEqual(connected_to(client_endpoint, "unix:/run/cw.sock"), "/run/cw.sock")


class ServerDescriptionTests(SynchronousTestCase):
    """L{server_description} names where a master listens."""

    def test_default(self):
        self.assertEqual(server_description(), "tcp:5494")

    def test_bare_port(self):
        self.assertEqual(server_description(6000), "tcp:6000")
        self.assertEqual(server_description("6000"), "tcp:6000")

    def test_any_port(self):
        self.assertEqual(server_description(0), "tcp:0")

    def test_endpoint_passes_through(self):
        for description in ["tcp:5494:interface=127.0.0.1", "unix:/run/cw.sock", "tcp6:6000"]:
            self.assertEqual(server_description(description), description)

    def test_server_endpoint(self):
        self.assertEqual(connected_to(server_endpoint, 6000), (6000, ""))


class DescribeListeningTests(SynchronousTestCase):
    """L{describe_listening} gives an address that clients can connect to."""

    def test_ipv4_wildcard(self):
        address = describe_listening(FakePort(IPv4Address("TCP", "0.0.0.0", 5494)))
        self.assertEqual(address, "tcp:host=127.0.0.1:port=5494")

    def test_ipv4_interface(self):
        address = describe_listening(FakePort(IPv4Address("TCP", "10.1.2.3", 6000)))
        self.assertEqual(tcp_target(address), ("10.1.2.3", 6000))

    def test_ipv6_wildcard(self):
        address = describe_listening(FakePort(IPv6Address("TCP", "::", 6000)))
        self.assertEqual(tcp_target(address), ("::1", 6000))

    def test_ipv6_interface(self):
        address = describe_listening(FakePort(IPv6Address("TCP", "fe80::2", 6000)))
        self.assertEqual(tcp_target(address), ("fe80::2", 6000))

    def test_unix(self):
        address = describe_listening(FakePort(UNIXAddress(b"/run/cw.sock")))
        self.assertEqual(address, "unix:/run/cw.sock")
        self.assertEqual(client_description(address), address)
