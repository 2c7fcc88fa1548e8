"""C{python -m cw.cli}: the C{cw} command."""

import sys

from cw.cli.cw import main

sys.exit(main())
