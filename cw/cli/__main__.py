"""
C{python -m cw.cli}: the C{cw} command.

Layer rule (cw.cli): the top layer; may import any of cw, and nothing in cw imports it.
"""

import sys

from cw.cli.cw import main

sys.exit(main())
