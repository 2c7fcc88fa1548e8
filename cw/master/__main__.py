"""C{python -m cw.master}: run a master (twistd plugin C{cw-master}) in this process."""

from cw.cli.twistd import master_main

master_main()
