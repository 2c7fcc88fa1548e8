"""
twistd's C{usage.Options} built from a role's config dataclass
(L{cw.core.config}): C{optParameters} and C{optFlags} come from its fields,
and L{ConfigOptions.config} turns the parsed options back into one.

Layer rule (cw.wire): imports Twisted, ampoule, cw.system, cw.core and cw.errors; nothing above.
"""

from __future__ import annotations

from typing import Any

from twisted.python import usage

from cw.core.config import options
from cw.errors import OptionError


def twistd_parameters(config: type) -> tuple[list[list[Any]], list[list[Any]]]:
    """C{(optParameters, optFlags)} of C{usage.Options} for the fields of C{config}."""
    parameters: list[list[Any]] = []
    flags: list[list[Any]] = []
    for o in options(config):
        if o.kind is bool:
            flags.append([o.long, o.short, o.help])
        elif o.kind is tuple:
            continue  # repeatable: an opt_ method (see ConfigOptions)
        else:
            parameters.append([o.long, o.short, o.default, o.help, None if o.kind is str else o.kind])
    return parameters, flags


def _repeatable(name: str, help: str):
    """An C{opt_} method collecting every value of the option C{--name}."""

    def collect(self, value: str) -> None:
        self[name] = (*self.get(name, ()), value)

    collect.__doc__ = help
    return collect


class ConfigOptions(usage.Options):
    """
    Options of a role whose class attribute C{config_class} is its config
    dataclass: a subclass gets its C{optParameters} and C{optFlags} from
    it, and adds only its positional arguments and what its options make it
    do (C{postOptions}, calling this one first).  The values are checked by
    the config dataclass itself (L{cw.core.config.Checked}).
    """

    config_class: type

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "config_class" in cls.__dict__:
            cls.optParameters, cls.optFlags = twistd_parameters(cls.config_class)
            for o in options(cls.config_class):
                if o.kind is tuple:
                    setattr(cls, "opt_" + o.long.replace("-", "_"), _repeatable(o.long, o.help))

    def __init__(self) -> None:
        super().__init__()
        for o in options(self.config_class):
            if o.kind is tuple:
                self[o.long] = o.default

    def postOptions(self) -> None:
        """Check the values: a bad one is a L{usage.UsageError} with the config's one-line message."""
        try:
            self.config()
        except OptionError as e:
            raise usage.UsageError(str(e)) from None

    def config(self) -> Any:
        """The parsed options as an instance of C{config_class}."""
        values = {}
        for o in options(self.config_class):
            if o.kind is tuple:
                values[o.name] = tuple(self.get(o.long, o.default))
                continue
            value = self[o.long]
            values[o.name] = bool(value) if o.kind is bool else value
        return self.config_class(**values)
