"""Name -> factory registries with validated lookup (the evosax pattern).

Every attack, aggregator, pre-aggregator, model, dataset and partitioner is a factory
registered under a lower-case name. A factory's keyword arguments are its
hyperparameters; those listed in ``static`` change the program's structure (shapes,
iteration counts, modes) and are Python values; for attacks and rules every other one
is a number that may be traced (so a sweep can ``vmap`` over it). Values are checked
against the kind of their default before anything compiles.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import types
from collections.abc import Callable, Mapping
from typing import Any


class ConfigError(ValueError):
    """A configuration value that cannot work, found before any compilation."""


_INTEGER_KINDS = ("i", "u")  # numpy dtype kinds
_NUMBER_KINDS = ("i", "u", "f")


def _dtype_kind(v: Any) -> str:
    """numpy's dtype kind of an array or array scalar (numpy, JAX, traced), else ``""``."""
    dtype = getattr(v, "dtype", None)
    return getattr(dtype, "kind", "")


def is_int(v: Any) -> bool:
    """A Python integer (not a bool) or an integer array (e.g. a traced ``f``)."""
    return (isinstance(v, int) and not isinstance(v, bool)) or _dtype_kind(v) in _INTEGER_KINDS


def is_number(v: Any) -> bool:
    """A Python or array number, not a bool."""
    python = isinstance(v, int | float) and not isinstance(v, bool)
    return python or _dtype_kind(v) in _NUMBER_KINDS


def is_positive_python_int(v: Any) -> bool:
    """A Python ``int`` (not a bool) ``>= 1``."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def expected_kind(
    default: Any, traced: bool = False, static: bool = False
) -> tuple[str, Callable[[Any], bool]]:
    """What a keyword accepts, judged by its default: ``(description, test)``. Integer
    lists (layer widths, shapes) hold positive integers; a ``None`` default takes a number
    or null when the keyword is ``traced`` (a number a sweep may batch), else anything.
    A ``static`` keyword with an integer default (an iteration count, a block or bucket
    size, a layer width) takes a positive Python ``int``, one with a float default a
    Python number: it shapes the program and is part of a compilation cache key, so it
    must be hashable (not a JAX array).
    """
    if default is None and traced:
        return "a number or null", lambda v: v is None or is_number(v)
    if isinstance(default, bool):
        return "true or false", lambda v: isinstance(v, bool)
    if isinstance(default, int) and static:
        return "a positive Python int (static, not an array)", is_positive_python_int
    if isinstance(default, float) and static:
        return (
            "a Python number (static, not an array)",
            lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        )
    if isinstance(default, int):
        return "an integer", is_int
    if isinstance(default, float):
        return "a number", is_number
    if isinstance(default, str):
        return "a string", lambda v: isinstance(v, str)
    if isinstance(default, tuple | list) and all(is_int(x) for x in default):
        return (
            "a list of positive integers",
            lambda v: isinstance(v, tuple | list) and all(is_int(x) and x > 0 for x in v),
        )
    return "any value", lambda v: True


@dataclasses.dataclass(frozen=True)
class Entry:
    """One registered factory.

    Attributes:
      name: registry key.
      factory: callable returning the object (``Attack``, ``Aggregator``, ...).
      static: keyword arguments that shape the program (never traced).
      meta: kind-specific facts (e.g. an aggregator's largest admissible ``f``).
      traced: whether the keywords outside ``static`` are numbers a sweep may trace.
    """

    name: str
    factory: Callable[..., Any]
    static: frozenset[str]
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    traced: bool = False

    @functools.cached_property
    def defaults(self) -> Mapping[str, Any]:
        """Keyword defaults of the factory, in signature order (read once: every eager
        call checks its keywords against them)."""
        sig = inspect.signature(self.factory)
        hidden = self.meta.get("hidden", ())
        return types.MappingProxyType(
            {
                k: p.default
                for k, p in sig.parameters.items()
                if p.default is not inspect.Parameter.empty and k not in hidden
            }
        )

    @property
    def doc(self) -> str:
        return (inspect.getdoc(self.factory) or "").split("\n")[0]

    def check_params(self, params: Mapping[str, Any], field: str) -> None:
        """Raises ``ConfigError`` naming ``field`` for keywords the factory lacks and for
        values of another kind than the keyword's default (see ``expected_kind``)."""
        defaults = self.defaults
        unknown = sorted(set(params) - set(defaults))
        if unknown:
            raise ConfigError(
                f"{field}.{unknown[0]}: {self.name!r} has no such parameter; "
                f"allowed: {sorted(defaults) or 'none'}."
            )
        for key, value in params.items():
            static = key in self.static
            kind, ok = expected_kind(defaults[key], self.traced and not static, static)
            if not ok(value):
                raise ConfigError(
                    f"{field}.{key}: {self.name!r} needs {kind} "
                    f"(default {defaults[key]!r}), got {value!r}."
                )

    def split(self, params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Splits ``params`` into (static, numeric) keyword dictionaries."""
        static = {k: v for k, v in params.items() if k in self.static}
        numeric = {k: v for k, v in params.items() if k not in self.static}
        return static, numeric


class Registry:
    """A name -> factory table.

    Args:
      kind: what the table holds, used in error messages ("attack", "aggregator").
      traced: whether the factories' keywords outside ``static`` are traced numbers
        (attacks and rules) rather than plain Python settings (datasets, partitioners).
    """

    def __init__(self, kind: str, traced: bool = False):
        self.kind = kind
        self.traced = traced
        self._entries: dict[str, Entry] = {}
        self._aliases: dict[str, str] = {}

    def register(
        self,
        name: str,
        factory: Callable[..., Any] | None = None,
        *,
        static: tuple[str, ...] = (),
        aliases: tuple[str, ...] = (),
        **meta: Any,
    ):
        """Registers ``factory`` under ``name``; usable as a decorator."""

        def add(fn):
            if name != name.lower() or "+" in name or name in self:
                raise ValueError(f"bad or duplicate {self.kind} name {name!r}")
            params = inspect.signature(fn).parameters
            missing = [s for s in static if s not in params]
            if missing:
                raise ValueError(f"{name}: static {missing} not in signature")
            self._entries[name] = Entry(name, fn, frozenset(static), meta, self.traced)
            for alias in aliases:
                self._aliases[alias] = name
            return fn

        return add(factory) if factory is not None else add

    def __contains__(self, name: str) -> bool:
        return name in self._entries or name in self._aliases

    def canonical(self, name: str) -> str:
        return self._aliases.get(name, name)

    def names(self, *, aliases: bool = False) -> list[str]:
        """Registered names, sorted (with aliases when asked)."""
        out = list(self._entries) + (list(self._aliases) if aliases else [])
        return sorted(out)

    def entry(self, name: str, field: str | None = None) -> Entry:
        """The entry for ``name``; one clear ``ConfigError`` if it is unknown."""
        if not isinstance(name, str) or name not in self:
            close = difflib.get_close_matches(str(name), self.names(aliases=True), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{field or self.kind}: unknown {self.kind} {name!r}{hint}; "
                f"allowed: {', '.join(self.names(aliases=True))}."
            )
        return self._entries[self.canonical(name)]

    def get(self, name: str, **params: Any) -> Any:
        """Builds the object registered as ``name`` with ``params``."""
        entry = self.entry(name)
        entry.check_params(params, self.kind)
        return entry.factory(**params)
