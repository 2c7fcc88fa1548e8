"""
C{python -m cw.master}: run a master (twistd plugin C{cw-master}) in this process.

An entry point above every layer: imports only cw.cli.twistd.
"""

from cw.cli.twistd import master_main

master_main()
