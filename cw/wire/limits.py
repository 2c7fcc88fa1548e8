"""
File descriptors, and the connections that may wait to authenticate.

Every connection costs the master a descriptor.  Idle connections that
never authenticate must not be able to use them all up, or legitimate
clients and workers are refused (C{accept} fails with C{EMFILE}).  So:

  - master and worker raise their soft C{RLIMIT_NOFILE} to the hard limit
    at start (L{raise_descriptor_limit}), and log it;
  - at most C{max_pending} connections may wait to authenticate at once,
    by default 1024 or a quarter of the descriptor limit if that is less
    (L{default_max_pending}); a larger C{--max-pending} is cut down to that
    quarter, so unauthenticated peers can never hold more than a quarter
    of the master's descriptors;
  - at most C{per_address} of them may come from one source address.

Like OpenSSH's C{MaxStartups}, unauthenticated connections are dropped
early, long before descriptors run out, and an authenticated connection is
never dropped to make room.  Unlike it, the connection dropped is the one
that has waited longest (of the same address when that address is over its
share, else of the address with most waiting), not the new one: a peer
that authenticates promptly then always gets in, even from the address of
a flood (on a shared login node every user's client comes from the same
address).  L{Admission} makes these decisions without I/O.

Layer rule (cw.wire): imports Twisted, ampoule, cw.system, cw.core and cw.errors; nothing above.
"""

from __future__ import annotations

import resource

from twisted.logger import Logger

from cw.core.limits import UNLIMITED

log = Logger(namespace="cw.limits")  # the namespace of its log lines before the layers


def raise_descriptor_limit() -> tuple[int, int]:
    """
    Raise the soft C{RLIMIT_NOFILE} to the hard limit; return the limits
    before and after.  A refusal (some sandboxes) keeps the old limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = UNLIMITED if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft, soft
        return soft, target
    return soft, soft


def log_descriptor_limit(who: str) -> int:
    """Raise this process's descriptor limit to the hard limit, log it, and return it."""
    before, after = raise_descriptor_limit()
    if after > before:
        log.info("cw {who}: file descriptor limit raised from {b} to {a}", who=who, b=before, a=after)
    else:
        log.info("cw {who}: file descriptor limit {a} (the hard limit)", who=who, a=after)
    return after


def descriptor_limit() -> int:
    """The current soft C{RLIMIT_NOFILE}."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return UNLIMITED if soft == resource.RLIM_INFINITY else soft
