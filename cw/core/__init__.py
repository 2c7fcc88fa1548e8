"""
The pure core: records and their framing, the fair queue, the scheduler, the
worker's state machine (L{cw.core.worker_state}) and the
decisions on limits and validation.  No Twisted, no sockets, no clock: imports
only the standard library, cw.errors and itself.
"""
