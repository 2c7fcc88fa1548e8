"""
The wire: AMP commands and argument types, streaming of large values,
authentication, addresses and secrets, heartbeats, batching.  Imports Twisted,
cw.system, cw.core and cw.errors; never cw.discovery, cw.master, cw.worker,
cw.client or above.
"""
