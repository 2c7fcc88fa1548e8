"""
Tests for L{cw.discovery}'s master sources: how a client or worker finds its
master again before each reconnection (an address file, CW_MASTER, SLURM),
and that an address given outright is retried as given.
"""

from __future__ import annotations

import os

from twisted.trial import unittest

from cw import discovery


class MasterSourceTests(unittest.SynchronousTestCase):
    def setUp(self):
        env = {k: v for k, v in os.environ.items() if k != "CW_MASTER"}
        self.patch(os, "environ", {**env, "CW_BACKEND": "local"})
        self.path = os.path.abspath(self.mktemp())

    def write(self, text: str) -> None:
        with open(self.path, "w") as f:
            f.write(text)

    def test_address_file_read_each_time(self):
        source = discovery.master_source(f"file:{self.path}")
        self.assertIn(self.path, str(source))
        self.assertIsNone(source(), "no file yet")
        self.write("tcp:host=127.0.0.1:port=6001\n")
        self.assertEqual(source(), "tcp:host=127.0.0.1:port=6001")
        self.write("tcp:host=127.0.0.1:port=6002\n")
        self.assertEqual(source(), "tcp:host=127.0.0.1:port=6002")
        self.write("")
        self.assertIsNone(source(), "an empty file names no master")

    def test_address_file_in_cw_master(self):
        os.environ["CW_MASTER"] = f"file:{self.path}"
        self.write("node3:7000")
        self.assertEqual(discovery.master_source(None)(), "node3:7000")
        self.assertEqual(discovery.default_host(None), f"file:{self.path}")
        self.assertTrue(discovery.is_address_file(discovery.default_host(None)))

    def test_given_address_retried_as_given(self):
        self.assertIsNone(discovery.master_source("node3:7000"))
        os.environ["CW_MASTER"] = "node4"
        self.assertIsNone(discovery.master_source(None))
        self.assertIsNone(discovery.master_source("localhost"))

    def test_slurm_looked_up_again(self):
        os.environ["CW_BACKEND"] = "slurm"
        answers = [None, {"address": "node9:6000"}, {"address": "node2:6001"}]
        self.patch(discovery, "master_info", lambda cluster=None: answers.pop(0))
        source = discovery.master_source(None)
        self.assertIn("master.json", str(source))
        self.assertEqual([source(), source(), source()], [None, "node9:6000", "node2:6001"])

    def test_slurm_error_is_no_answer(self):
        def down(cluster=None):
            raise discovery.SlurmError("squeue did not answer")

        self.patch(discovery, "master_info", down)
        self.assertIsNone(discovery.slurm_source("c")())
