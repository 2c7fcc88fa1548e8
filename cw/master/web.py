"""
The master's web dashboard: a live HTML page, C{/api/status} (JSON) and
C{/metrics} (Prometheus text format), served by the master itself with
C{twisted.web} when it runs with C{--web ENDPOINT}.

The pure parts (the metrics text, the failure records, the token, the
C{Host} check, the listening description) are plain functions of their
inputs so that they are tested without a network.  L{WebDashboard} only
listens, writes its files and logs.

Protection, on every address, loopback included (Jupyter's rule): every
request must carry the dashboard token, an HMAC of the cw secret: as the
password of HTTP Basic authentication (any user name), as C{Authorization:
Bearer TOKEN}, or once as C{?token=TOKEN}, which sets a cookie and
redirects to the page without it.  C{--web-open} drops the token, for a
single-user machine.  Whatever the token, a request whose C{Host} header
names neither the bound address, C{localhost} nor a name given with
C{--web-host} gets 403, so that a web page cannot reach the dashboard
through DNS rebinding.  The token is never logged: the master writes it to
a file only its user can read (mode 0600, L{cw.wire.secret.write_private}) and
logs that file's path.  Like the rest of the master, the dashboard never
unpickles anything: failures are shown from their JSON error reports.

Layer rule (cw.master): imports cw.discovery and below; never cw.client, cw.worker, cw.launch or cw.cli.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import re
import shlex
import socket
import time
from collections import deque
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, urlencode

from twisted.internet import defer, endpoints
from twisted.logger import Logger
from twisted.web import resource, server

from cw.errors import ReportKind, SecretError
from cw.system import write_atomically
from cw.wire import commands as P
from cw.wire.address import listen_failed, stop_reactor
from cw.wire.secret import write_private

log = Logger(namespace="cw.web")  # the namespace of its log lines before the layers

#: Failed results the dashboard remembers, newest last.
RECENT_FAILURES = 50
#: Longest traceback kept per failure, in characters (the tail is kept).
TRACEBACK_CHARS = 20_000
#: Of a failed job's stdout and stderr, the dashboard keeps the last this
#: many lines, and at most this many characters of them.
OUTPUT_LINES = 20
OUTPUT_CHARS = 4_000
#: Name of the cookie that carries the token after a C{?token=} visit.
COOKIE = b"cw_dashboard"


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


def _ip(text: str) -> str | None:
    """C{text} as a normalized IP address, or None if it is not one."""
    try:
        return str(ipaddress.ip_address(text.split("%")[0]))
    except ValueError:
        return None


def _host_name(header: bytes) -> str:
    """The host part of a C{Host} header, lower case, without port or final dot."""
    text = header.decode("latin-1").strip().lower()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    return text.rstrip(".")


class HostCheck:
    """
    Which C{Host} headers the dashboard answers: the address it is bound
    to, C{localhost}, and C{names}; bound to every interface (C{0.0.0.0},
    C{::}), also this machine's host name and any IP address.  An IP
    address cannot be rebound by a foreign DNS server, so only names need
    the check.  A request without C{Host} (HTTP/1.0 tools) is let through:
    browsers always send one.

    @param bound: the listening address (L{IAddress}); a Unix socket's
        admits C{localhost} and C{names} only.
    """

    def __init__(self, bound, names: Iterable[str] = ()) -> None:
        self.names = {"localhost"} | {n.strip().lower().rstrip(".") for n in names if n.strip()}
        self.any_address = False
        address = _ip(getattr(bound, "host", None) or "")
        if address is not None:
            if ipaddress.ip_address(address).is_unspecified:
                self.any_address = True
                self.names.add(socket.gethostname().lower())
            else:
                self.names.add(address)

    def __call__(self, header: bytes | None) -> bool:
        """Is a request with this C{Host} header value to be answered?"""
        if header is None:
            return True
        name = _host_name(header)
        address = _ip(name)
        if address is not None:
            return self.any_address or address in self.names
        return name in self.names


def default_token_file(bound) -> Path:
    """
    Where the dashboard's token goes unless C{--web-token-file} says:
    C{$XDG_CACHE_HOME/cw} (else C{~/.cache/cw}), named after this host and
    the port (or, for a Unix socket, the master's pid).
    """
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    which = getattr(bound, "port", None) or f"pid{os.getpid()}"
    return Path(cache) / "cw" / f"dashboard-{socket.gethostname()}-{which}.token"


class FailureLog:
    """
    Failed results as the master delivers them: a count since start and the
    last L{RECENT_FAILURES} reports (JSON-ready dicts), for the dashboard,
    each with the last lines the job wrote to stdout and stderr
    (L{output_tail}).
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
                    "type": str(report.get("type", ReportKind.ERROR)),
                    "message": str(report.get("message", ""))[:TRACEBACK_CHARS],
                    "traceback": str(report.get("traceback", ""))[-TRACEBACK_CHARS:],
                    "host": str(report.get("host", "")),
                    "pid": report.get("pid"),
                    "time": self._clock(),
                    "stdout": output_tail(result.stdout),
                    "stderr": output_tail(result.stderr),
                }
            )


def output_tail(data: bytes, lines: int = OUTPUT_LINES, chars: int = OUTPUT_CHARS) -> str:
    """
    The last C{lines} lines of a job's output (bytes of text, as its result
    carries it; never unpickled), at most C{chars} characters of them.
    """
    if not data:
        return ""
    text = str(bytes(data[-4 * chars :]), "utf-8", "replace")
    return "".join(text.splitlines(keepends=True)[-lines:])[-chars:]


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
            "cw_jobs_unschedulable",
            "gauge",
            "Queued jobs that no connected worker could run.",
            [({}, status.get("unschedulable", 0))],
        ),
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

    # One sample per pool, labelled with its name when there are several.
    pools = [p for p in (status.get("pools") or [status.get("pool")]) if p]
    if pools:

        def each(key: str) -> list:
            return [({"pool": p["name"]} if p.get("name") else {}, p[key]) for p in pools]

        families += [
            ("cw_pool_target_workers", "gauge", "Workers the adaptive pool wants.", each("target")),
            ("cw_pool_running_workers", "gauge", "The pool's running launches.", each("running")),
            ("cw_pool_pending_workers", "gauge", "The pool's launches queued.", each("pending")),
            ("cw_pool_draining_workers", "gauge", "The pool's draining launches.", each("draining")),
            ("cw_pool_min_workers", "gauge", "The pool's lower bound.", each("min_workers")),
            ("cw_pool_max_workers", "gauge", "The pool's upper bound.", each("max_workers")),
        ]
        calls = [
            ({**({"pool": p["name"]} if p.get("name") else {}), "command": k}, v)
            for p in pools
            for k, v in sorted((p.get("calls") or {}).items())
        ]
        if calls:
            families.append(("cw_pool_slurm_calls_total", "counter", "SLURM commands the pool ran.", calls))
    state = status.get("state")
    if state:
        families += [
            ("cw_state_bytes", "gauge", "Bytes of the state file (--state).", [({}, state["bytes"])]),
            (
                "cw_stored_results",
                "gauge",
                "Results waiting in the state file for absent clients.",
                [({}, state["stored_results"])],
            ),
            (
                "cw_stored_results_bytes",
                "gauge",
                "Bytes of the results waiting for absent clients.",
                [({}, state["stored_results_bytes"])],
            ),
            (
                "cw_stored_results_dropped_total",
                "counter",
                "Stored results dropped over --max-stored-results-bytes.",
                [({}, state["dropped_results"])],
            ),
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
    return resources.files("cw.master").joinpath("dashboard.html").read_bytes()


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


class _Refusal(resource.Resource):
    """A refused request: HTTP C{code} with a plain-text C{text} saying what to do."""

    isLeaf = True

    def __init__(self, code: int, text: bytes, headers: dict[bytes, bytes] = {}) -> None:
        super().__init__()
        self.code = code
        self.text = text
        self.headers = headers

    def render(self, request) -> bytes:
        request.setResponseCode(self.code)
        for name, value in self.headers.items():
            request.setHeader(name, value)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return self.text


def _unauthorized() -> _Refusal:
    return _Refusal(
        401,
        b"This cw dashboard needs its token: the master's log names the file that"
        b" holds it (readable only by the master's user).  Open this URL with"
        b" ?token=TOKEN, or give the token as the password (any user name).\n",
        {b"www-authenticate": b'Basic realm="cw dashboard"'},
    )


def _forbidden() -> _Refusal:
    return _Refusal(
        403,
        b"This cw dashboard does not answer to this host name (a defence against DNS"
        b" rebinding); use the address the master logged, or start it with"
        b" --web-host NAME.\n",
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
    Wraps a resource tree; refuses (403) every request whose C{Host} header
    C{hosts} rejects (all of them while C{hosts} is None: not listening
    yet), then, while C{required} is true, (401) every request that does
    not carry C{token} (see the module docstring).
    """

    def __init__(
        self,
        wrapped: resource.Resource,
        token: str | None,
        required: bool = True,
        hosts: HostCheck | None = None,
    ) -> None:
        super().__init__()
        self.wrapped = wrapped
        self.token = token
        self.required = required
        self.hosts = hosts

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
        if self.hosts is None or not self.hosts(request.getHeader(b"host")):
            return _forbidden()
        if self.required:
            query = self._query_token(request)
            if query is not None and self._matches(query):
                return _Admit(self.token)
            if not self.allowed(request):
                return _unauthorized()
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
    behind L{TokenGuard}.

    @param address_file: if given, the dashboard's URL (without the token;
        for a Unix socket, C{unix:PATH}) is written there once it listens,
        and removed on L{stop}.
    @param token_file: where to write the token (mode 0600) once it
        listens; default L{default_token_file}.  Removed on L{stop}.
    @param open_access: serve without the token (C{--web-open}).
    @param hosts: more names to accept in the C{Host} header (L{HostCheck}).
    """

    def __init__(
        self,
        master,
        listen: str | int,
        address_file: str | None = None,
        token_file: str | None = None,
        open_access: bool = False,
        hosts: Iterable[str] = (),
    ) -> None:
        self.master = master
        self.description = web_description(listen)
        self.address_file = address_file
        self.token_file: Path | None = Path(token_file) if token_file else None
        self.hosts = list(hosts)
        token = dashboard_token(master.secret) if master.secret is not None else None
        self.guard = TokenGuard(Dashboard(master), token, required=token is not None and not open_access)
        self.site = _QuietSite(self.guard)
        self.site.displayTracebacks = False
        self.site.noisy = False
        self.port = None
        self.url: str | None = None
        self._wrote_token = False

    def start(self, reactor) -> defer.Deferred:
        """
        Listen with C{reactor}; fires with the listening port.  A failure to
        listen, or to write the token file, stops the reactor.
        """
        d = defer.maybeDeferred(
            lambda: endpoints.serverFromString(reactor, self.description).listen(self.site)
        )
        d.addCallback(self._listening)

        def failed(failure):
            if failure.check(SecretError):
                log.error("cw dashboard: {error}", error=str(failure.value))
                stop_reactor(reactor, status=1)
            else:
                listen_failed(reactor, "cw dashboard", self.description, "--web", failure)

        d.addErrback(failed)
        return d

    def _listening(self, port):
        self.port = port
        host = port.getHost()
        self.guard.hosts = HostCheck(host, self.hosts)
        token = self.guard.token if self.guard.required else None
        if token is not None:
            if self.token_file is None:
                self.token_file = default_token_file(host)
            write_private(
                self.token_file,
                (token + "\n").encode(),
                what="dashboard token file",
                elsewhere="or name another file with --web-token-file",
            )
            self._wrote_token = True
        if hasattr(host, "port"):
            scheme = "https" if self.description.startswith("ssl:") else "http"
            self.url = f"{scheme}://{_url_host(host)}:{host.port}/"
        else:
            self.url = "unix:" + os.fsdecode(host.name)
        self._log_address(host, token is not None)
        if self.address_file:
            write_atomically(self.address_file, self.url + "\n")
        return port

    def _log_address(self, host, needs_token: bool) -> None:
        """One log line saying where the dashboard is and how to get in; never the token."""
        if not hasattr(host, "port"):
            path = shlex.quote(os.fsdecode(host.name))
            if needs_token:
                header = f'-H "Authorization: Bearer $(cat {shlex.quote(str(self.token_file))})" '
            else:
                header = ""
            log.info(
                "cw dashboard on Unix socket {path}; query it with:"
                " curl --unix-socket {path} {header}http://localhost/api/status",
                path=path,
                header=header,
            )
        elif needs_token:
            log.info(
                "cw dashboard at {url} ; it asks for the token in {file} (readable only by"
                " you): open {url}?token=TOKEN, or give TOKEN as the password when asked",
                url=self.url,
                file=str(self.token_file),
            )
        elif self.guard.token is None:
            log.warn(
                "cw dashboard at {url} is open to anyone who can reach it (--insecure master)",
                url=self.url,
            )
        elif is_loopback(host):
            log.info("cw dashboard at {url} (--web-open: any user of this machine can read it)", url=self.url)
        else:
            log.warn("cw dashboard at {url} is open to anyone who can reach it (--web-open)", url=self.url)

    def stop(self) -> defer.Deferred:
        """Stop listening and remove the address and token files."""
        files = [self.address_file, self.token_file if self._wrote_token else None]
        for name in files:
            if name:
                try:
                    os.unlink(name)
                except FileNotFoundError:
                    pass
        if self.port is None:
            return defer.succeed(None)
        return defer.maybeDeferred(self.port.stopListening)
