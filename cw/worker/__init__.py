"""
The worker: service, job pool, job child process, pipes and containment.
Imports cw.wire, cw.core, cw.discovery; never cw.master, cw.client, cw.launch
or cw.cli.
"""
