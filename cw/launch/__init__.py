"""
Starting clusters: local processes (the cw.mp API), SLURM jobs (cw.slurm)
and the choice between them.  Imports cw.client and below; never cw.cli.
"""
