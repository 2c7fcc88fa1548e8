"""
Tests of L{cw.wire.options}: twistd's options of master and worker are
built from their config dataclasses, and the services from the parsed result.
"""

from __future__ import annotations

import dataclasses

from twisted.internet import task
from twisted.python import usage
from twisted.trial import unittest

from cw.core.config import MasterConfig, WorkerConfig, options
from cw.master import service as master
from cw.worker import service as worker


class GeneratedOptionsTests(unittest.TestCase):
    def test_every_field_is_an_option(self):
        """Each field is a twistd option of the same name, default and help."""
        for config, cls in ((MasterConfig, master.Options), (WorkerConfig, worker.Options)):
            text = str(cls())
            parsed = cls()
            for o in options(config):
                self.assertIn(f"--{o.long}", text)
                if o.kind is not bool:
                    self.assertEqual(parsed[o.long], o.default, o.long)

    def test_master_config(self):
        """Parsed master options become a MasterConfig, and the service is built from it."""
        options_ = master.Options()
        options_.parseOptions(
            ["--insecure", "--prefetch=4", "--port", "tcp:0", "--web-host", "a,b", "--web", "tcp:0"]
        )
        config = options_.config()
        self.assertEqual(
            config,
            dataclasses.replace(
                MasterConfig(), insecure=True, prefetch=4, port="tcp:0", web_host="a,b", web="tcp:0"
            ),
        )
        service = master.MasterService.from_config(config, None, task.Clock())
        self.assertEqual(service.listen, "tcp:0")
        self.assertEqual(service.master.scheduler.prefetch, 4)
        self.assertIsNone(service.master.secret)

    def test_worker_config(self):
        """Parsed worker options become a WorkerConfig, and the service is built from it."""
        options_ = worker.Options()
        options_.parseOptions(["--insecure", "--procs", "3", "--master-timeout=7", "node1"])
        config = options_.config()
        self.assertEqual(
            config,
            dataclasses.replace(WorkerConfig(), insecure=True, procs=3, master_timeout=7.0, master="node1"),
        )
        service = worker.WorkerService.from_config(config, None, task.Clock())
        self.assertEqual((service.procs, service.master_timeout), (3, 7.0))
        self.assertRaises(usage.UsageError, worker.Options().parseOptions, ["--insecure", "--procs", "0"])

    def test_checks_are_the_configs(self):
        """A bad value is a UsageError with the config's own one-line message."""
        for cls, argv, message in [
            (master.Options, ["--max-attempts", "0"], "--max-attempts must be at least 1"),
            (master.Options, ["--heartbeat=-1"], "--heartbeat must not be negative"),
            (master.Options, ["--web-open"], "--web-open needs --web"),
            (worker.Options, ["--procs", "0"], "--procs must be at least 1"),
        ]:
            e = self.assertRaises(usage.UsageError, cls().parseOptions, ["--insecure", *argv])
            self.assertEqual(str(e), message)

    def test_worker_resources(self):
        """--cpus, --memory, --gpus and the repeatable --resource and --tag make the worker's capacity."""
        options_ = worker.Options()
        options_.parseOptions(
            ["--insecure", "--cpus", "2", "--memory", "1G", "--gpus", "0,1", "--tag", "a", "--tag", "b"]
            + ["--resource", "licenses=2", "node1"]
        )
        config = options_.config()
        self.assertEqual((config.tag, config.resource, config.gpus), (("a", "b"), ("licenses=2",), "0,1"))
        service = worker.WorkerService.from_config(config, None, task.Clock())
        self.assertEqual(
            service.capacity.to_json(),
            {"cpus": 2, "memory": 1 << 30, "gpus": ["0", "1"], "custom": {"licenses": 2}, "tags": ["a", "b"]},
        )
        for bad in (["--memory", "lots"], ["--gpus", "0,0"], ["--resource", "x"], ["--tag", "a b"]):
            error = self.assertRaises(usage.UsageError, worker.Options().parseOptions, ["--insecure", *bad])
            self.assertIn(bad[0], str(error) + bad[0] * (bad[0] == "--tag"))
