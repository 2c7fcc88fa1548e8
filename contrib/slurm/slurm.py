#!/usr/bin/env python3
"""
slurm.py: start, stop or inspect a cw cluster running as SLURM jobs.

The original command, kept for its users: the same as the C{cw-slurm}
console script (L{cw.cli.slurm}); run C{slurm.py --help} for its options.

    ./slurm.py -n 32 start      # a master job (cmaster), 32 workers (cworkers)
    ./slurm.py status
    ./slurm.py stop
"""

import os
import sys

if __name__ == "__main__":
    # Run from a checkout without installing: find the cw package two levels up.
    sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from cw.cli.slurm import main

    sys.exit(main())
