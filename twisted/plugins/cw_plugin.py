"""
twistd plugins for cw: C{twistd -n cw-master} and C{twistd -n cw-worker}.

The modules named here are imported only when their plugin is run, so that
listing plugins (C{twistd --help}) stays cheap and installs no reactor.
"""

from twisted.application.service import ServiceMaker

cw_master = ServiceMaker(
    "cw master",
    "cw.master.service",
    "A cw master: queues jobs from clients and routes them to workers.",
    "cw-master",
)

cw_worker = ServiceMaker(
    "cw worker",
    "cw.worker.service",
    "A cw worker: runs jobs from a cw master in child processes.",
    "cw-worker",
)
