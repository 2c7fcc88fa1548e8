"""Tests of the wire (cw.wire): commands, framing, streaming, addresses, MACs."""
