"""
C{python -m cw.worker}: run a worker (twistd plugin C{cw-worker}) in this process.

An entry point above every layer: imports only cw.cli.twistd.
"""

from cw.cli.twistd import worker_main

worker_main()
