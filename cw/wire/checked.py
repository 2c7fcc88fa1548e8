"""
Commands from a peer that is authenticated but not trusted to be bug-free
(an older or broken master, client or worker): each side checks every
field it receives (L{cw.core.validation}), and a malformed box or field
ends that one connection with one log line naming the peer, the command
and the field, never an unhandled error deep inside.

Layer rule (cw.wire): imports Twisted, ampoule, cw.system, cw.core and cw.errors; nothing above.
"""

from __future__ import annotations

from twisted.internet import defer

from cw.errors import BadCommand
from cw.wire.private import CheckedAnswers, command_named


class CheckedCommands(CheckedAnswers):
    """
    Mixin for L{amp.AMP} subclasses that also mix in
    L{cw.wire.auth.AuthGate} (for C{reject}), listed before C{amp.AMP}: a
    command whose arguments do not parse, or whose responder raises
    L{BadCommand} (the checks of L{cw.core.validation}), drops the
    connection with one log line; so do boxes AMP itself would choke on
    (L{CheckedAnswers}).
    """

    def locateResponder(self, name: bytes):
        responder = super().locateResponder(name)
        if responder is None:
            return None
        command = name.decode("ascii", "replace")

        def malformed(failure):
            failure.trap(BadCommand)
            self.reject(f"sent a malformed {command!r}: {failure.value}")
            return defer.Deferred()  # the connection is gone: answer nothing

        def checked(box):
            try:
                answer = responder(box)
            except Exception as e:
                # Raised while parsing the box's arguments (before the responder runs).
                field = self._bad_argument(name, box)
                self.reject(f"sent a malformed {command!r}: {field}: {e.__class__.__name__}: {e}")
                return defer.Deferred()
            if isinstance(answer, defer.Deferred):
                answer.addErrback(malformed)
            return answer

        return checked

    def malformed_box(self, why: str) -> None:
        """An answer to no question, or a box that is no command (L{CheckedAnswers})."""
        self.reject(why)

    def _bad_argument(self, name: bytes, box) -> str:
        """Which argument of command C{name} in C{box} does not parse, for the log."""
        for argument, kind in command_named(self, name).arguments:
            try:
                kind.fromBox(argument, dict(box), {}, self)
            except Exception:
                return argument.decode("ascii", "replace")
        return "the box"
