"""
How a client shows itself: the plain C{repr} of an executor, and the HTML
table Jupyter displays for it (master, workers, slots, queue, dashboard).
Pure: given the facts, it makes text; L{cw.client.executor} gathers them.

Layer rule (cw.client): imports cw.discovery and below; never cw.master, cw.worker, cw.launch or cw.cli.
"""

from __future__ import annotations

from html import escape
from typing import Any


def executor_text(kind: str, address: str, state: str, outstanding: int) -> str:
    """The C{repr} of an executor: no question to the master, so it never blocks."""
    return f"<{kind} {address} {state}, {outstanding} jobs outstanding>"


def executor_html(
    kind: str, address: str, state: str, outstanding: int, status: dict | None, error: str | None = None
) -> str:
    """
    The HTML Jupyter shows for an executor: what its C{repr} says, and from
    the master's C{status} snapshot (if it answered) its workers, slots,
    queue and dashboard link; else C{error}.
    """
    rows: list[tuple[str, Any]] = [("Master", escape(address)), ("Connection", escape(state))]
    rows.append(("Jobs outstanding", outstanding))
    if status is not None:
        workers = status.get("workers", [])
        draining = sum(1 for w in workers if w.get("draining"))
        slots = sum(w.get("slots", 0) for w in workers)
        busy = sum(w.get("busy", 0) for w in workers)
        rows.append(("Workers", f"{len(workers)}" + (f" ({draining} draining)" if draining else "")))
        rows.append(("Slots", f"{slots} ({busy} busy)"))
        rows.append(("Queued on the master", status.get("queued", 0)))
        rows.append(("Completed", status.get("completed", 0)))
        rows.append(("Clients", len(status.get("clients", []))))
        dashboard = status.get("dashboard")
        if dashboard:
            if dashboard.startswith(("http://", "https://")):
                link = f'<a href="{escape(dashboard)}" target="_blank">{escape(dashboard)}</a>'
            else:
                link = escape(dashboard)
            rows.append(("Dashboard", link))
    elif error:
        rows.append(("Status", escape(error)))
    body = "".join(
        f'<tr><th style="text-align: left">{name}</th><td style="text-align: left">{value}</td></tr>'
        for name, value in rows
    )
    return f"<div><strong>{escape(kind)}</strong><table>{body}</table></div>"
