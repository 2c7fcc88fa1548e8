"""
Live output of running jobs at the client (C{echo=True},
C{forward_logging=LEVEL}): L{Echo} writes what jobs write to this
process's own standard output and standard error, each line prefixed with
the job and its host (C{[#12 node7] ...}), and hands their C{logging}
records to this process's C{logging} under C{cw.job.<their logger's name>}.
It runs in the delivery thread of a L{cw.client.ClusterExecutor}, which
feeds it the L{P.OutputNotice}s in the order they arrive, before the
results of their jobs.

Layer rule (cw.client): imports cw.discovery and below; never cw.master, cw.worker, cw.launch or cw.cli.
"""

from __future__ import annotations

import codecs
import logging
import sys

from cw.wire import commands as P


class Echo:
    """What running jobs write, shown as it arrives (see the module's docstring)."""

    def __init__(self) -> None:
        #: Per job and stream, the decoder of its bytes and the start of a
        #: line not yet ended: C{(seq, stream): (decoder, text, prefix)}.
        self._partial: dict[tuple[int, int], tuple[codecs.IncrementalDecoder, str, str]] = {}

    def show(self, label: str, host: str, output: P.Output) -> None:
        """Show one L{P.Output} record of the job C{label} (C{#12}) on C{host}."""
        prefix = f"[{label} {host}] "
        if output.stream == P.Stream.LOG:
            self._log(prefix, output.data)
            return
        key = (output.seq, output.stream)
        decoder, text, _ = self._partial.get(key) or (
            codecs.getincrementaldecoder("utf-8")("replace"),
            "",
            "",
        )
        text += decoder.decode(output.data)
        lines = text.split("\n")
        self._partial[key] = (decoder, lines.pop(), prefix)
        if lines:
            self._write(output.stream, "".join(f"{prefix}{line}\n" for line in lines))

    def finish(self, seq: int) -> None:
        """Job C{seq} ended: end the lines it left unfinished."""
        if not self._partial:
            return
        for stream in (P.Stream.STDOUT, P.Stream.STDERR):
            entry = self._partial.pop((seq, stream), None)
            if entry is None:
                continue
            decoder, text, prefix = entry
            text += decoder.decode(b"", final=True)
            if text:
                self._write(stream, f"{prefix}{text}\n")

    @staticmethod
    def _write(stream: int, text: str) -> None:
        out = sys.stdout if stream == P.Stream.STDOUT else sys.stderr
        if out is None:
            return
        try:
            out.write(text)
            out.flush()
        except (OSError, ValueError):
            pass  # this process's own stdout is closed: nothing to show it on

    @staticmethod
    def _log(prefix: str, data: bytes) -> None:
        entry = P.read_log_entry(data)
        if entry is None:
            return
        level = entry["level"]
        logger = logging.getLogger(f"cw.job.{entry.get('name') or 'root'}")
        if not logger.isEnabledFor(level):
            return
        created = entry.get("created")
        fields = {
            "name": logger.name,
            "levelno": level,
            "levelname": logging.getLevelName(level),
            "msg": prefix + str(entry.get("message", "")),
            "exc_text": entry.get("exc_text") or None,
        }
        if isinstance(created, (int, float)):
            fields["created"] = created
            fields["msecs"] = (created - int(created)) * 1000
        logger.handle(logging.makeLogRecord(fields))
