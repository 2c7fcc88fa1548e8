"""
The pure core: records and their framing, the fair queue, the scheduler and the
decisions on limits and validation.  No Twisted, no sockets, no clock: imports
only the standard library, cw.errors and itself.
"""
