"""Tests of the worker (cw.worker): job children, the pool, containment."""
