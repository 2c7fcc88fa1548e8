"""
The wire: AMP commands and argument types, streaming of large values,
authentication, addresses and secrets, heartbeats, batching.  Imports Twisted,
cw.core and cw.errors; never cw.master, cw.worker, cw.client or above.
"""
