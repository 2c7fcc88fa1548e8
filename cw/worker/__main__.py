"""C{python -m cw.worker}: run a worker (twistd plugin C{cw-worker}) in this process."""

from cw.cli.twistd import worker_main

worker_main()
