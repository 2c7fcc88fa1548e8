"""
The master's web dashboard: a live HTML page, C{/api/status} (JSON) and
C{/metrics} (Prometheus text format), served by the master itself with
C{twisted.web} when it runs with C{--web ENDPOINT}.

The pure parts (the metrics text, the failure records, the token, the
listening description) are plain functions of their inputs so that they are
tested without a network.  L{WebDashboard} only listens and logs.

Protection: a dashboard bound to a loopback address answers anyone on this
machine, like C{cw status}.  Bound anywhere else, every request must carry
the dashboard token, an HMAC of the cw secret: as the password of HTTP
Basic authentication (any user name), as C{Authorization: Bearer TOKEN}, or
once as C{?token=TOKEN}, which sets a cookie and redirects to the page
without it.  The master logs the URL with the token when it starts.  Like
the rest of the master, the dashboard never unpickles anything: failures
are shown from their JSON error reports.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import re
import socket
import time
from collections import deque
from collections.abc import Iterable
from importlib import resources
from urllib.parse import parse_qs, urlencode

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource, server

from cw import protocol as P

log = Logger()

#: Failed results the dashboard remembers, newest last.
RECENT_FAILURES = 50
#: Longest traceback kept per failure, in characters (the tail is kept).
TRACEBACK_CHARS = 20_000
#: Name of the cookie that carries the token after a C{?token=} visit.
COOKIE = b"cw_dashboard"
#: Where the master serves its dashboard unless told otherwise.
DEFAULT_WEB = "tcp:8494"


def dashboard_token(secret: bytes) -> str:
    """
    The credential the dashboard asks for: C{HMAC-SHA256(secret,
    "cw-dashboard")} in hex.  Derived, so that the secret itself never
    travels in a URL, and it changes when the secret does.
    """
    return hmac.new(secret, b"cw-dashboard", hashlib.sha256).hexdigest()


def web_description(listen: str | int) -> str:
    """
    The endpoint description the dashboard listens on.  A bare port, and a
    C{tcp:} or C{ssl:} description that names no interface, get
    C{interface=127.0.0.1}: the dashboard is loopback-only unless told
    otherwise.
    """
    listen = str(listen)
    if listen.isdigit():
        listen = "tcp:" + listen
    if listen.startswith(("tcp:", "ssl:")) and not re.search(r"(^|:)interface=", listen):
        listen += ":interface=127.0.0.1"
    return listen


def is_loopback(host) -> bool:
    """True if a listening port's address (L{IAddress}) admits only this machine."""
    if getattr(host, "type", None) not in ("TCP", "TCP6"):
        return False  # a Unix socket may be reachable by other users: protect it
    try:
        return ipaddress.ip_address(host.host.split("%")[0]).is_loopback
    except ValueError:
        return False


class FailureLog:
    """
    Failed results as the master delivers them: a count since start and the
    last L{RECENT_FAILURES} reports (JSON-ready dicts), for the dashboard.
    """

    def __init__(self, size: int = RECENT_FAILURES, clock=time.time) -> None:
        self.failed = 0
        self.recent: deque[dict] = deque(maxlen=size)
        self._clock = clock

    def record(self, results: Iterable[P.Result]) -> None:
        """Note every result in C{results} that is not a success."""
        for result in results:
            if result.status == P.Outcome.OK:
                continue
            self.failed += 1
            report = P.read_error_report(result.payload)
            self.recent.append(
                {
                    "key": [result.client, result.seq],
                    "type": str(report.get("type", "Error")),
                    "message": str(report.get("message", ""))[:TRACEBACK_CHARS],
                    "traceback": str(report.get("traceback", ""))[-TRACEBACK_CHARS:],
                    "host": str(report.get("host", "")),
                    "pid": report.get("pid"),
                    "time": self._clock(),
                }
            )


def dashboard_status(master) -> dict:
    """C{master.status()} plus the failure count and the recent failures."""
    status = master.status()
    status["failed"] = master.failures.failed
    status["recent_failures"] = list(master.failures.recent)
    return status


def _label(value) -> str:
    text = str(value).replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")
    return f'"{text}"'


def _number(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


def render_metrics(status: dict) -> str:
    """
    The Prometheus text exposition (format 0.0.4) of a L{dashboard_status}
    snapshot: cluster totals, then one series per worker and per client.
    """
    workers = status.get("workers", [])
    clients = status.get("clients", [])
    families: list[tuple[str, str, str, list[tuple[dict, object]]]] = [
        (
            "cw_uptime_seconds",
            "gauge",
            "Seconds since the master started.",
            [({}, status.get("uptime", 0.0))],
        ),
        (
            "cw_jobs_completed_total",
            "counter",
            "Jobs finished on a worker (succeeded or failed) since the master started.",
            [({}, status.get("completed", 0))],
        ),
        (
            "cw_jobs_failed_total",
            "counter",
            "Failed results delivered to clients since the master started.",
            [({}, status.get("failed", 0))],
        ),
        ("cw_jobs_queued", "gauge", "Jobs waiting for a worker.", [({}, status.get("queued", 0))]),
        (
            "cw_jobs_rate",
            "gauge",
            "Jobs completed per second over the last minute.",
            [({}, status.get("rate", 0.0))],
        ),
        ("cw_workers", "gauge", "Connected workers.", [({}, len(workers))]),
        ("cw_slots", "gauge", "Job slots on all workers.", [({}, sum(w["slots"] for w in workers))]),
        ("cw_slots_busy", "gauge", "Slots running a job.", [({}, sum(w["busy"] for w in workers))]),
        ("cw_clients", "gauge", "Connected clients.", [({}, len(clients))]),
    ]

    def per(items, field, key="id"):
        return [({"id": item[key], "peer": item["peer"]}, item[field]) for item in items]

    families += [
        ("cw_worker_slots", "gauge", "Job slots of a worker.", per(workers, "slots")),
        ("cw_worker_busy", "gauge", "Slots of a worker running a job.", per(workers, "busy")),
        ("cw_worker_held", "gauge", "Jobs a worker holds (running or prefetched).", per(workers, "held")),
        ("cw_worker_draining", "gauge", "1 if the worker is stopping.", per(workers, "draining")),
        ("cw_worker_jobs_completed_total", "counter", "Jobs a worker finished.", per(workers, "completed")),
        ("cw_worker_jobs_failed_total", "counter", "Jobs that failed on a worker.", per(workers, "failed")),
        ("cw_client_jobs_queued", "gauge", "Queued jobs of a client.", per(clients, "queued")),
        ("cw_client_jobs_running", "gauge", "Jobs of a client on workers.", per(clients, "running")),
        (
            "cw_client_jobs_completed_total",
            "counter",
            "Jobs of a client finished.",
            per(clients, "completed"),
        ),
    ]
    lines = []
    for name, kind, help_text, samples in families:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            text = ",".join(f"{k}={_label(v)}" for k, v in labels.items())
            lines.append(f"{name}{{{text}}} {_number(value)}" if text else f"{name} {_number(value)}")
    return "\n".join(lines) + "\n"


def page() -> bytes:
    """The dashboard's HTML page (self-contained: inline CSS and JS)."""
    return resources.files("cw").joinpath("dashboard.html").read_bytes()


class _Leaf(resource.Resource):
    isLeaf = True

    def __init__(self, master) -> None:
        super().__init__()
        self.master = master


class StatusResource(_Leaf):
    """C{/api/status}: L{dashboard_status} as JSON."""

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(dashboard_status(self.master)).encode()


class MetricsResource(_Leaf):
    """C{/metrics}: L{render_metrics} for Prometheus."""

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
        return render_metrics(dashboard_status(self.master)).encode()


class Dashboard(resource.Resource):
    """The page at C{/}, with C{/api/status} and C{/metrics} below it."""

    def __init__(self, master) -> None:
        super().__init__()
        api = resource.Resource()
        api.putChild(b"status", StatusResource(master))
        self.putChild(b"api", api)
        self.putChild(b"metrics", MetricsResource(master))

    def getChild(self, path: bytes, request):
        if path == b"":
            return self
        return super().getChild(path, request)

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return page()


class _Unauthorized(resource.Resource):
    isLeaf = True

    def render(self, request) -> bytes:
        request.setResponseCode(401)
        request.setHeader(b"www-authenticate", b'Basic realm="cw dashboard"')
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return (
            b"This cw dashboard needs its token: open the URL with ?token=... that the"
            b" master logged when it started, or use HTTP Basic authentication with the"
            b" token as password.\n"
        )


class _Admit(resource.Resource):
    """Answer a good C{?token=}: set the cookie, redirect to the URL without it."""

    isLeaf = True

    def __init__(self, token: str) -> None:
        super().__init__()
        self.token = token

    def render(self, request) -> bytes:
        request.addCookie(
            COOKIE,
            self.token.encode(),
            path=b"/",
            httpOnly=True,
            sameSite="strict",
            secure=request.isSecure(),
        )
        args = {k: v for k, v in request.args.items() if k != b"token"}
        location = request.path + (b"?" + urlencode(args, doseq=True).encode() if args else b"")
        request.redirect(location)
        return b""


class TokenGuard(resource.Resource):
    """
    Wraps a resource tree; while C{required} is true, refuses (401) every
    request that does not carry C{token} (see the module docstring).
    """

    def __init__(self, wrapped: resource.Resource, token: str | None, required: bool = True) -> None:
        super().__init__()
        self.wrapped = wrapped
        self.token = token
        self.required = required

    def _matches(self, offered: bytes | str | None) -> bool:
        if not offered or self.token is None:
            return False
        if isinstance(offered, str):
            offered = offered.encode("utf-8", "replace")
        return hmac.compare_digest(offered, self.token.encode())

    def _query_token(self, request) -> bytes | None:
        query = request.uri.partition(b"?")[2]
        values = parse_qs(query.decode("latin-1")).get("token")
        return values[0].encode("latin-1") if values else None

    def allowed(self, request) -> bool:
        """Does C{request} carry the token (Basic password, Bearer, or cookie)?"""
        if not self.required:
            return True
        header = request.getHeader(b"authorization") or b""
        scheme, _, credentials = header.partition(b" ")
        if scheme.lower() == b"bearer" and self._matches(credentials.strip()):
            return True
        if scheme.lower() == b"basic" and self._matches(request.getPassword()):
            return True
        return self._matches(request.getCookie(COOKIE))

    def getChildWithDefault(self, path: bytes, request):
        if self.required:
            query = self._query_token(request)
            if query is not None and self._matches(query):
                return _Admit(self.token)
            if not self.allowed(request):
                return _Unauthorized()
        return self.wrapped.getChildWithDefault(path, request)

    def render(self, request):  # only reached for an empty path, which trees never see
        return self.getChildWithDefault(b"", request).render(request)


class _QuietSite(server.Site):
    """A Site that does not log each request: the page polls every second."""

    def log(self, request) -> None:
        pass


def _url_host(host) -> str:
    name = host.host
    if name in ("0.0.0.0", "::", ""):
        name = socket.gethostname()
    return f"[{name}]" if ":" in name else name


class WebDashboard:
    """
    Serve L{Dashboard} for C{master} on C{listen} (see L{web_description}),
    protected by L{TokenGuard} unless bound to loopback.

    @param address_file: if given, the dashboard's URL (without the token)
        is written there once it listens, and removed on L{stop}.
    """

    def __init__(self, master, listen: str | int, address_file: str | None = None) -> None:
        self.master = master
        self.description = web_description(listen)
        self.address_file = address_file
        token = dashboard_token(master.secret) if master.secret is not None else None
        # Required until we know the port is loopback-only: never open by accident.
        self.guard = TokenGuard(Dashboard(master), token, required=token is not None)
        self.site = _QuietSite(self.guard)
        self.site.displayTracebacks = False
        self.site.noisy = False
        self.port = None
        self.url: str | None = None

    def start(self, reactor=None) -> defer.Deferred:
        """Listen; fires with the listening port.  A failure to listen stops the reactor."""
        from twisted.internet import endpoints

        if reactor is None:
            from twisted.internet import reactor
        d = defer.maybeDeferred(
            lambda: endpoints.serverFromString(reactor, self.description).listen(self.site)
        )
        d.addCallback(self._listening)

        def failed(failure):
            log.failure("cw dashboard could not listen on {listen}", failure, listen=self.description)
            if reactor.running:
                reactor.stop()

        d.addErrback(failed)
        return d

    def _listening(self, port):
        self.port = port
        host = port.getHost()
        loopback = is_loopback(host)
        scheme = "https" if self.description.startswith("ssl:") else "http"
        self.url = f"{scheme}://{_url_host(host)}:{host.port}/" if hasattr(host, "port") else str(host)
        if loopback:
            self.guard.required = False
            log.info("cw dashboard at {url} (this machine only)", url=self.url)
        elif self.guard.token is None:
            log.warn(
                "cw dashboard at {url} is open to anyone who can reach it (--insecure master)",
                url=self.url,
            )
        else:
            log.info(
                "cw dashboard at {url}?token={token} (the token is needed from other machines)",
                url=self.url,
                token=self.guard.token,
            )
        if self.address_file:
            tmp = f"{self.address_file}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.write(self.url + "\n")
            os.replace(tmp, self.address_file)
        return port

    def stop(self) -> defer.Deferred:
        """Stop listening and remove the address file."""
        if self.address_file:
            try:
                os.unlink(self.address_file)
            except FileNotFoundError:
                pass
        if self.port is None:
            return defer.succeed(None)
        return defer.maybeDeferred(self.port.stopListening)
