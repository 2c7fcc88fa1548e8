"""
Tests of the benchmark's pure parts (C{bench/run.py}, loaded from the
checkout by path: C{bench} is not a package): a full run adds its section to
C{bench/RESULTS.md} above the earlier runs instead of replacing them; the
fake-worker rows report medians of alternating runs and judge the issue 18
target on the median of the pairs' ratios.
"""

from __future__ import annotations

import importlib.util
import os

from twisted.trial.unittest import SynchronousTestCase

from cw.test.procs import ROOT


def load_run():
    """C{bench/run.py} as a module."""
    spec = importlib.util.spec_from_file_location("cw_bench_run", os.path.join(ROOT, "bench", "run.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run = load_run()

EARLIER = """# cw benchmark

## 30 November 2026: issue 18

| measure | cw |
|---|--:|
| submit | 8,510 |

Notes.

## 25 November 2026

| measure | cw |
|---|--:|
| submit | 25,159 |
"""

NEW = "## 2026-12-01 10:00 UTC: `python bench/run.py`\n\n| measure | cw |\n|---|--:|\n| submit | 9,000 |\n"


class WithNewRunTests(SynchronousTestCase):
    def test_new_run_first_earlier_kept(self):
        """The new section comes right under the title; every earlier line follows, in order."""
        text = run.with_new_run(EARLIER, NEW)
        self.assertEqual(text, "# cw benchmark\n\n" + NEW + "\n" + EARLIER[len("# cw benchmark\n\n") :])
        self.assertEqual(text.count("# cw benchmark\n"), 1)

    def test_twice(self):
        """A second run goes above the first: three sections, newest first."""
        second = NEW.replace("2026-12-01", "2026-12-02")
        text = run.with_new_run(run.with_new_run(EARLIER, NEW), second)
        heads = [line for line in text.splitlines() if line.startswith("## ")]
        self.assertEqual(
            heads,
            [
                "## 2026-12-02 10:00 UTC: `python bench/run.py`",
                "## 2026-12-01 10:00 UTC: `python bench/run.py`",
                "## 30 November 2026: issue 18",
                "## 25 November 2026",
            ],
        )

    def test_no_file_yet(self):
        self.assertEqual(run.with_new_run("", NEW), "# cw benchmark\n\n" + NEW)

    def test_file_without_title(self):
        """Text above which no title stands is kept whole, below the new run."""
        text = run.with_new_run("old notes\n", NEW)
        self.assertEqual(text, "# cw benchmark\n\n" + NEW + "\nold notes\n")


class BigRowsTests(SynchronousTestCase):
    """The between-machines 1 GB rows give each process's CPU per GB and the rate it bounds."""

    CPU = {"master": 1.25, "worker": 0.8, "job": 0.5, "client": 1.0, "total": 3.6}

    def big(self) -> dict:
        return {
            "big": 10**9,
            "big_arg": 250.0,
            "big_res": 300.0,
            "big_arg_cpu": self.CPU,
            "big_res_cpu": self.CPU,
        }

    def test_rows(self):
        rows = {
            label: (unit, text)
            for label, unit, _, text in run.cw_only_rows(None, None, {"cw-big-remote": self.big()})
        }
        [cpu] = [row for label, row in rows.items() if label.startswith("... CPU per GB")]
        self.assertEqual(cpu, ("s", "1.25; 0.80; 0.50; 1.00; 3.60"))
        [rate] = [row for label, row in rows.items() if label.startswith("... rate if each process")]
        self.assertEqual(rate, ("MB/s", "800"))
        on_one = run.cw_only_rows(None, None, {"cw-big": self.big()})
        self.assertFalse([row for row in on_one if "CPU" in row[0]], "only between machines")

    def test_target_says_the_bound(self):
        lines = run.targets({}, None, {"cw-big-remote": self.big()})
        [argument] = [line for line in lines if "GB argument at 600 MB/s" in line]
        self.assertIn(
            "CPU 3.60 s per GB in all, the master 1.25 at most: 800 MB/s with a machine each", argument
        )


class FakeRowsTests(SynchronousTestCase):
    """The fake-worker rows: medians of alternating runs, the pairs' ratios and the master's CPU per job."""

    FAKE = {
        "connections": 2000,
        "jobs": 20_000,
        "pairs": 3,
        "few": {
            "connections": 2,
            "rates": [20_000.0, 10_000.0, 22_000.0],
            "cpu_s": [0.24, 0.30, 0.26],
            "boxes": [100, 120, 110],
            "lat_p50": 0.9,
            "lat_p99": 1.5,
        },
        "many": {
            "connections": 2000,
            "rates": [18_000.0, 9_000.0, 16_500.0],
            "cpu_s": [0.30, 0.40, 0.32],
            "boxes": [150, 200, 100],
            "lat_p50": 1.0,
            "lat_p99": 2.5,
        },
        "ratios": [0.9, 0.9, 0.75],
    }

    def test_rows(self):
        rows = {label: text for label, _, _, text in run.fake_rows(self.FAKE)}
        values = list(rows.values())
        self.assertEqual(values[:2], ["20,000", "16,500"])
        self.assertEqual(values[2], "0.90 (0.75-0.90)")
        self.assertEqual(values[3], "13.0 / 16.0")  # ms of master CPU per 1,000 jobs
        self.assertEqual(values[4], "182 / 133")
        self.assertEqual(values[5], "0.90; 1.50 / 1.00; 2.50")
        self.assertIn("median of the 3 pairs' ratios", list(rows)[2])

    def test_target_from_median_of_pairs(self):
        [line] = [t for t in run.targets({}, None, {}, self.FAKE) if "fake worker" in t]
        self.assertIn(": met (0.90)", line)
        low = {**self.FAKE, "ratios": [0.7, 0.9, 0.75]}
        [line] = [t for t in run.targets({}, None, {}, low) if "fake worker" in t]
        self.assertIn("**missed** (0.75)", line)

    def test_failed(self):
        failed = [("fake worker connections", "", True, "failed: boom")]
        self.assertEqual(run.fake_rows({"error": "boom"}), failed)

    def test_median(self):
        self.assertEqual(run.median([3.0, 1.0, 2.0]), 2.0)
        self.assertEqual(run.median([4.0, 1.0, 2.0, 3.0]), 2.5)
