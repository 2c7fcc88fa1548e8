"""Tests of the master (cw.master): faults, limits, the web dashboard."""
