"""
Tests of L{cw.errors.ReportKind}: the kinds of error report cw makes are
one typed set whose wire values never change.
"""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from cw.core.records import error_report, read_error_report
from cw.errors import REPORT_TYPES, JobTimeout, ReportKind, WorkerLost


class ReportKindTests(SynchronousTestCase):
    def test_wire_values(self):
        """The values are the protocol's strings: changing one breaks older peers."""
        self.assertEqual(
            {kind.name: kind.value for kind in ReportKind},
            {
                "WORKER_LOST": "WorkerLost",
                "JOB_TIMEOUT": "JobTimeout",
                "JOB_PROCESS_DIED": "JobProcessDied",
                "PAYLOAD_TOO_LARGE": "PayloadTooLarge",
                "UNKNOWN_FUNCTION": "UnknownFunction",
                "UNSCHEDULABLE": "Unschedulable",
                "INCOMPATIBLE_WORKER": "IncompatibleWorker",
                "DUPLICATE_JOB": "DuplicateJob",
                "ERROR": "Error",
            },
        )

    def test_report_carries_the_plain_string(self):
        raw = json.loads(error_report(ReportKind.WORKER_LOST, "lost"))
        self.assertIs(type(raw["type"]), str)
        self.assertEqual(raw["type"], "WorkerLost")
        self.assertEqual(str(ReportKind.JOB_TIMEOUT), "JobTimeout")

    def test_read_back_compares_and_looks_up(self):
        """A report read from the wire (plain strings) matches the kinds and finds their classes."""
        report = read_error_report(error_report(ReportKind.JOB_TIMEOUT, "slow"))
        self.assertEqual(report["type"], ReportKind.JOB_TIMEOUT)
        self.assertIs(REPORT_TYPES.get(report["type"]), JobTimeout)
        self.assertIs(REPORT_TYPES.get("WorkerLost"), WorkerLost)
        self.assertEqual(read_error_report(b"\xff")["type"], ReportKind.ERROR)
