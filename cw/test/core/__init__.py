"""Unit tests of the pure core (cw.core): no reactor, no sockets."""
