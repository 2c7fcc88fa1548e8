"""
Tests for L{cw.core.seqset.SeqSet}: it behaves as a set of ints, and costs
about a bit per number for a client's mostly consecutive job numbers.
"""

from __future__ import annotations

import random
import tracemalloc

from twisted.trial.unittest import SynchronousTestCase

from cw.core.seqset import WINDOW, SeqSet


class SeqSetTests(SynchronousTestCase):
    def check_against_set(self, seed: int, far: float) -> None:
        rng = random.Random(seed)
        mine, model = SeqSet(), set()
        nxt = 0
        for _ in range(5_000):
            op = rng.random()
            if op < 0.5:
                if rng.random() < far:
                    seq = rng.choice(
                        [rng.randrange(0, 50), nxt + WINDOW + rng.randrange(100), rng.randrange(10**12)]
                    )
                else:
                    seq, nxt = nxt, nxt + 1
                mine.add(seq)
                model.add(seq)
            elif op < 0.9 and model:
                seq = min(model) if rng.random() < 0.7 else rng.choice(tuple(model))
                mine.discard(seq)
                model.discard(seq)
            elif op < 0.995:
                gone = rng.randrange(0, nxt + 10)
                mine.discard(gone)
                model.discard(gone)
            else:
                wanted = set(rng.sample(sorted(model), min(5, len(model))))
                mine -= wanted
                model -= wanted
            probe = rng.randrange(0, nxt + 10)
            self.assertEqual(probe in mine, probe in model)
            self.assertEqual(len(mine), len(model))
        for seq in model:
            self.assertIn(seq, mine)
        self.assertEqual(sorted(mine), sorted(model))
        self.assertEqual(mine, model)
        mine.clear()
        self.assertEqual(len(mine), 0)
        self.assertNotIn(0, mine)

    def test_consecutive(self):
        """Mostly consecutive numbers leaving mostly in order: the same answers as a set."""
        for seed in range(5):
            self.check_against_set(seed, 0.0)

    def test_far_and_low_numbers(self):
        """Numbers below the base or beyond the window are kept all the same."""
        for seed in range(5):
            self.check_against_set(seed, 0.1)

    def test_a_bit_per_number(self):
        """200,000 consecutive numbers cost well under a byte each (a set: about 40)."""
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            seqs = SeqSet()
            for seq in range(1, 200_001):
                seqs.add(seq)
            used = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        self.assertEqual(len(seqs), 200_000)
        self.assertLess(used, 200_000)
        for seq in range(1, 199_001):
            seqs.discard(seq)
        self.assertEqual(len(seqs), 1000)
        self.assertLess(len(seqs._bits), 10_000, "the bytes of numbers gone are dropped")
