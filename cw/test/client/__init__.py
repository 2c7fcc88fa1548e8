"""Tests of the client (cw.client): session, executor, maps, payloads."""
