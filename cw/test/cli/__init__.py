"""Tests of the command lines (cw, cw-slurm), secret files and installation."""
