"""
Command lines: cw, cw-slurm and the twistd entry points of master and worker.
The top layer: nothing in cw imports it (but the __main__ modules).
"""
