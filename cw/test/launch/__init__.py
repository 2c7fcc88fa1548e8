"""Tests of the launchers (cw.launch, cw.mp, cw.slurm)."""
