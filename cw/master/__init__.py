"""
The master: service (queue, routing through the scheduler), its protocol
adapter and the web dashboard.  Imports cw.wire, cw.core, cw.discovery;
never cw.worker, cw.client, cw.launch or cw.cli.
"""
