"""Name -> factory registries with validated lookup (the evosax pattern).

Every attack, aggregator, pre-aggregator, model, dataset and partitioner is a factory
registered under a lower-case name. A factory's keyword arguments are its
hyperparameters; those listed in ``static`` change the program's structure (shapes,
iteration counts, modes) and are Python values, every other one is a number that may
be traced (so a sweep can ``vmap`` over it).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from collections.abc import Callable, Mapping
from typing import Any


class ConfigError(ValueError):
    """A configuration value that cannot work, found before any compilation."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One registered factory.

    Attributes:
      name: registry key.
      factory: callable returning the object (``Attack``, ``Aggregator``, ...).
      static: keyword arguments that shape the program (never traced).
      meta: kind-specific facts (e.g. an aggregator's largest admissible ``f``).
    """

    name: str
    factory: Callable[..., Any]
    static: frozenset[str]
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def defaults(self) -> dict[str, Any]:
        """Keyword defaults of the factory, in signature order."""
        sig = inspect.signature(self.factory)
        hidden = self.meta.get("hidden", ())
        return {
            k: p.default
            for k, p in sig.parameters.items()
            if p.default is not inspect.Parameter.empty and k not in hidden
        }

    @property
    def doc(self) -> str:
        return (inspect.getdoc(self.factory) or "").split("\n")[0]

    def check_params(self, params: Mapping[str, Any], field: str) -> None:
        """Raises ``ConfigError`` naming ``field`` for keywords the factory lacks."""
        allowed = set(self.defaults)
        unknown = sorted(set(params) - allowed)
        if unknown:
            raise ConfigError(
                f"{field}.{unknown[0]}: {self.name!r} has no such parameter; "
                f"allowed: {sorted(allowed) or 'none'}."
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
    """

    def __init__(self, kind: str):
        self.kind = kind
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
            self._entries[name] = Entry(name, fn, frozenset(static), meta)
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
