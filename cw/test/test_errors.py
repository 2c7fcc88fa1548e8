"""
Tests of L{cw.errors.ReportKind}: the kinds of error report cw makes are
one typed set whose wire values never change.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

import cw
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
                "ARGUMENT_UNAVAILABLE": "ArgumentUnavailable",
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


def report_kind_literals(source: str) -> list[int]:
    """Lines of C{source} that spell a report kind as a string (outside C{__all__})."""
    kinds = {kind.value for kind in ReportKind} - {ReportKind.ERROR.value}
    tree = ast.parse(source)
    exported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "__all__" for target in node.targets
        ):
            exported.update(id(constant) for constant in ast.walk(node.value))
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and node.value in kinds and id(node) not in exported
    ]


class OnePlaceTests(SynchronousTestCase):
    def test_kinds_spelled_only_in_errors(self):
        """Outside cw.errors, cw names report kinds by ReportKind, never by their strings."""
        root = Path(cw.__file__).parent
        spelled = {}
        for path in sorted(root.rglob("*.py")):
            if "test" in path.relative_to(root).parts or path == root / "errors.py":
                continue
            lines = report_kind_literals(path.read_text())
            if lines:
                spelled[str(path.relative_to(root))] = lines
        self.assertEqual(spelled, {})

    def test_literal_found(self):
        source = '__all__ = ["WorkerLost"]\nkind = "JobTimeout"\nother = "Error"\n'
        self.assertEqual(report_kind_literals(source), [2])
