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
from twisted.protocols import amp
from twisted.python.failure import Failure

from cw.core.payload import Segments
from cw.errors import BadCommand
from cw.wire.commands import CHUNK, Blob, Encoded
from cw.wire.private import (
    CheckedAnswers,
    command_named,
    connection_failed,
    emit,
    python_identifier,
    responder_for,
    send_command,
    serialized_responder,
)

#: Per command class and schema (C{"arguments"} or C{"response"}): how
#: L{parse_plain} reads it, or None where it cannot (see L{_plain_schema}).
_PLAIN: dict[tuple[type, str], tuple | None] = {}

#: The keys AMP itself puts in a box beside a command's arguments.
_PROTOCOL_KEYS = (amp.COMMAND, amp.ASK, amp.ANSWER)


def _plain_schema(command: type[amp.Command], which: str) -> tuple | None:
    """
    C{(wire name, Python name, decode or None, optional, argument)} for
    each argument of C{command}'s schema C{which} (C{"arguments"} or
    C{"response"}), if every one is a L{Blob} or an L{Encoded} that reads
    and writes its value as they do; else None (AMP's path).
    """
    key = (command, which)
    if key in _PLAIN:
        return _PLAIN[key]
    plain: tuple | None = ()
    for name, kind in getattr(command, which):
        kind_type = type(kind)
        if (
            not isinstance(kind, Blob)
            or kind_type._take is not Blob._take
            or kind_type._put is not Blob._put
            or kind_type.toBox not in (Blob.toBox, Encoded.toBox)
        ):
            plain = None
            break
        if type(kind) is Blob:
            decode = None
        elif isinstance(kind, Encoded) and type(kind).fromBox is Encoded.fromBox:
            decode = kind.decode
        else:
            plain = None
            break
        plain += ((name, python_identifier(name), decode, kind.optional, kind),)
    _PLAIN[key] = plain
    return plain


def parse_plain(command: type[amp.Command], which: str, box) -> dict | None:
    """
    The arguments of C{command}'s schema C{which} (C{"arguments"} or
    C{"response"}) read from C{box} as AMP's C{parseArguments} / C{parseResponse} read them,
    for the hot commands' boxes (issue 18): each argument's value whole
    under its own key (no chunks), nothing else in the box but AMP's own
    keys.  Each value goes through the same C{decode} as AMP's path, so it
    raises the same errors.  None, having decoded nothing, for any other
    box or schema: let AMP parse it.
    """
    plain = _plain_schema(command, which)
    if plain is None:
        return None
    present = 0
    for name, _, _, optional, _ in plain:
        if name in box:
            present += 1
        elif not optional:
            return None  # AMP's parse raises (KeyError), as it does
    for key in _PROTOCOL_KEYS:
        if key in box:
            present += 1
    if present != len(box):
        return None  # chunks, size hints or other keys: AMP's path
    arguments = {}
    for name, identifier, decode, _, _ in plain:
        value = box.get(name)
        if value is None or decode is None:
            arguments[identifier] = value
        else:
            arguments[identifier] = decode(value)
    return arguments


def fill_plain(command: type[amp.Command], which: str, values: dict, box) -> bool:
    """
    Put C{values}, the arguments of C{command}'s schema C{which}
    (C{"arguments"} or C{"response"}) by Python name, into C{box} as
    AMP's C{toBox} of each puts them (the hot commands, issue 18): the
    same parts of each value (C{parts}, the same errors), a value that
    fits in one key put there as it is, a longer one chunked by the
    argument itself.  False, having put nothing, for a schema of other
    kinds: let AMP make the box.
    """
    plain = _plain_schema(command, which)
    if plain is None:
        return False
    for name, identifier, decode, optional, kind in plain:
        value = values.get(identifier)
        if value is None and optional:
            continue  # left out: the receiver sees None
        if decode is not None:
            parts = kind.parts(value) or [b""]
        else:
            parts = (value.parts or [b""]) if isinstance(value, Segments) else [value]
        if len(parts) == 1 and type(parts[0]) is bytes and len(parts[0]) <= CHUNK:
            box[name] = parts[0]
        else:
            kind._put(name, box, parts)
    return True


def parse_arguments(command: type[amp.Command], box, proto) -> dict:
    """C{command.parseArguments(box, proto)}, by L{parse_plain} where it can."""
    arguments = parse_plain(command, "arguments", box)
    return arguments if arguments is not None else command.parseArguments(box, proto)


def parse_response(box, command: type[amp.Command], proto) -> dict:
    """C{command.parseResponse(box, proto)}, by L{parse_plain} where it can."""
    response = parse_plain(command, "response", box)
    return response if response is not None else command.parseResponse(box, proto)


#: Per command class: the Python names of its arguments, and of those it requires (L{LeanCalls}).
_SIGNATURES: dict[type, tuple[frozenset, frozenset]] = {}


def _signature(command: type[amp.Command]) -> tuple[frozenset, frozenset]:
    signature = _SIGNATURES.get(command)
    if signature is None:
        names = frozenset(python_identifier(name) for name, _ in command.arguments)
        required = frozenset(python_identifier(name) for name, kind in command.arguments if not kind.optional)
        signature = _SIGNATURES[command] = (names, required)
    return signature


def _massage_error(failure, command: type[amp.Command]):
    """An error answer to C{command} as the exception it declares for it (as AMP's C{callRemote} does)."""
    failure.trap(amp.RemoteAmpError)
    error = failure.value
    return Failure(command.reverseErrors.get(error.errorCode, amp.UnknownRemoteError)(error.description))


class LeanCalls:
    """
    Mixin for L{amp.AMP} subclasses (listed before it): C{callRemote}
    builds the command's box itself, without AMP's command instance and
    its checks of the arguments made twice (issue 18: every box of a lone
    job's round trip).  The box on the wire, the answer and the errors are
    AMP's; a call with arguments AMP would refuse goes through AMP, which
    refuses it as it does.
    """

    def callRemote(self, command, *a, **kw):
        names, required = _signature(command)
        if a or not names.issuperset(kw) or not required.issubset(kw):
            return super().callRemote(command, *a, **kw)
        box = command.commandType()
        if not fill_plain(command, "arguments", kw, box):
            for name, argument in command.arguments:
                argument.toBox(name, box, kw, self)
        if command.requiresAnswer:
            d = send_command(self, command.commandName, box)
            d.addCallback(parse_response, command, self)
            d.addErrback(_massage_error, command)
            return d
        if connection_failed(self):
            return None  # as AMP: nothing more goes out on a lost connection
        box[amp.COMMAND] = command.commandName
        self.sendBox(box)
        return None


#: No outcome waiting (see L{LeanAnswers}).
_NO_OUTCOME = object()


class LeanAnswers:
    """
    Mixin for L{amp.AMP} subclasses (listed before it): a command that asks
    for an answer and whose responder returns its answer at once (a
    C{dict}) is answered straight away, without the Deferreds and wrapping
    closures of AMP's general path (issue 18: the job process's answer to
    L{cw.wire.commands.RunBatch}, on every lone job's round trip).  Any
    other outcome (an error, a Deferred, arguments that do not parse, an
    answer that does not serialize) goes through AMP's general path with
    that outcome, so that errors are answered and logged exactly as AMP
    does; the responder is never called twice.
    """

    _lean_outcome = _NO_OUTCOME

    def ampBoxReceived(self, box) -> None:
        ask = box.get(amp.ASK)
        name = box.get(amp.COMMAND)
        found = responder_for(self, name) if ask is not None and name is not None else None
        if found is None or amp.ANSWER in box or amp.ERROR in box:
            super().ampBoxReceived(box)
            return
        command, function = found
        try:
            outcome = function(self, **parse_arguments(command, box, self))
            if type(outcome) is dict:
                answer = command.responseType()  # (a QuitBox closes the connection once sent)
                if not fill_plain(command, "response", outcome, answer):
                    answer = command.makeResponse(outcome, self)
                answer[amp.ANSWER] = ask
        except Exception:
            outcome = Failure()
        if type(outcome) is dict:
            emit(self, answer)
            return
        self._lean_outcome = outcome
        try:
            super().ampBoxReceived(box)
        finally:
            self._lean_outcome = _NO_OUTCOME

    def locateResponder(self, name: bytes):
        outcome = self._lean_outcome
        found = responder_for(self, name) if outcome is not _NO_OUTCOME else None
        if found is None:
            return super().locateResponder(name)
        return serialized_responder(self, lambda **_: outcome, found[0])


class CheckedCommands(LeanCalls, CheckedAnswers):
    """
    Mixin for L{amp.AMP} subclasses that also mix in
    L{cw.wire.auth.AuthGate} (for C{reject}), listed before C{amp.AMP}: a
    command whose arguments do not parse, or whose responder raises
    L{BadCommand} (the checks of L{cw.core.validation}), drops the
    connection with one log line; so do boxes AMP itself would choke on
    (L{CheckedAnswers}).

    Commands that want no answer (the hot ones: jobs and results) take a
    lean path both ways (issue 18, a lone job's round trip): received, they
    are parsed and their responder called at once, without the Deferreds,
    the wrapping closures and the answer box (never sent) that AMP's
    general path makes for every box; sent, see L{LeanCalls}.  What a peer
    sees, and what a malformed box or a failing responder does, is the same.
    """

    def ampBoxReceived(self, box) -> None:
        lean = amp.ASK not in box and amp.ANSWER not in box and amp.ERROR not in box
        if not lean or not getattr(self, "authenticated", True):
            super().ampBoxReceived(box)
            return
        name = box.get(amp.COMMAND)
        found = responder_for(self, name) if name is not None else None
        if found is None:
            super().ampBoxReceived(box)
            return
        command, function = found
        try:
            arguments = parse_arguments(command, box, self)
        except Exception as e:
            self._refuse_box(name, box, e)
            return
        try:
            answer = function(self, **arguments)
        except BadCommand as e:
            self.reject(f"sent a malformed {name.decode('ascii', 'replace')!r}: {e}")
            return
        except Exception:
            self.unhandledError(Failure())
            return
        if type(answer) is not dict and isinstance(answer, defer.Deferred):  # (dict: no ABC check)
            answer.addErrback(self._malformed, name).addErrback(self.unhandledError)

    def _malformed(self, failure, name: bytes):
        failure.trap(BadCommand)
        self.reject(f"sent a malformed {name.decode('ascii', 'replace')!r}: {failure.value}")
        return defer.Deferred()  # the connection is gone: answer nothing

    def _refuse_box(self, name: bytes, box, e: Exception) -> None:
        """Drop the connection: command C{name}'s arguments in C{box} do not parse (C{e})."""
        field = self._bad_argument(name, box)
        command = name.decode("ascii", "replace")
        self.reject(f"sent a malformed {command!r}: {field}: {e.__class__.__name__}: {e}")

    def locateResponder(self, name: bytes):
        responder = super().locateResponder(name)
        if responder is None:
            return None

        def checked(box):
            try:
                answer = responder(box)
            except Exception as e:
                # Raised while parsing the box's arguments (before the responder runs).
                self._refuse_box(name, box, e)
                return defer.Deferred()
            if isinstance(answer, defer.Deferred):
                answer.addErrback(self._malformed, name)
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
