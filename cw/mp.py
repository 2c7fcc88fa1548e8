"""
C{cw.mp}: the public name of L{cw.launch.local} (the code lives there).

Importing C{cw.mp} gives that very module, so every name (and every
patch a test makes) is shared; C{python -m cw.mp} runs its C{main}.

Layer rule: above cw.launch, like cw.cli; imports only cw.launch.local.
"""

import sys

from cw.launch import local as _impl

if __name__ == "__main__":
    sys.exit(_impl.main())
sys.modules[__name__] = _impl
