"""
C{cw.slurm}: the public name of L{cw.launch.slurm} (the code lives there).

Importing C{cw.slurm} gives that very module, so every name (and every
patch a test makes) is shared; C{python -m cw.slurm} runs its C{main}.

Layer rule: above cw.launch, like cw.cli; imports only cw.launch.slurm.
"""

import sys

from cw.launch import slurm as _impl

if __name__ == "__main__":
    sys.exit(_impl.main())
sys.modules[__name__] = _impl
