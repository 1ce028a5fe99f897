"""Robust aggregation rules and pre-aggregators, by registry name.

``get("nnm+median", **params)`` builds a rule, with pre-aggregators chained in front by
``+``; every keyword goes to the one stage whose factory takes it (``"nnm.f"``-style
qualified names resolve ties). ``aggregate`` is the stateless, jitted convenience of the
public surface.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_byz import ops
from fedjax_byz.aggregators import (
    clustering,
    coordinate,
    distance,
    pre,
    signguard,
    spectral,
    subset,
)
from fedjax_byz.aggregators.base import (
    Aggregator,
    AggregatorContext,
    PreAggregator,
    compose,
    guard_nonfinite,
    guard_parts,
    no_weights,
    stateless,
    switch,
)
from fedjax_byz.registry import ConfigError, Entry, Registry, is_int

__all__ = [
    "Aggregator",
    "AggregatorContext",
    "PreAggregator",
    "RULES",
    "PRE",
    "aggregate",
    "as_param",
    "check",
    "client_matrix",
    "compose",
    "concrete_f",
    "get",
    "guard_nonfinite",
    "names",
    "no_weights",
    "pre_names",
    "prepare",
    "route_params",
    "stages",
    "stateless",
    "switch",
]

RULES = Registry("aggregator", traced=True)
PRE = Registry("pre-aggregator", traced=True)


def _half(n: int) -> int:
    """Largest f with f < n/2."""
    return (n - 1) // 2


# ``max_f(n)``: the largest f a rule (or pre-aggregator) admits for n rows; ``needs``: the
# same bound as the error messages write it.
# ``squares=False``: the rule only orders and averages coordinates, so rows too large to
# square cannot overflow it (``base.guard_nonfinite``).
_HALF = {"max_f": _half, "needs": "f < n/2"}
RULES.register("mean", coordinate.mean, propagates_nonfinite=True, squares=False)
RULES.register("median", coordinate.median, squares=False, **_HALF)
RULES.register("trmean", coordinate.trmean, squares=False, **_HALF)
RULES.register("meamed", coordinate.meamed, squares=False, **_HALF)
RULES.register(
    "rbtm", coordinate.rbtm, max_f=lambda n: (n - 1) // 3, needs="n >= 3f + 1", squares=False
)
RULES.register("krum", distance.krum, max_f=lambda n: n - 3, needs="n >= f + 3")
RULES.register("multikrum", distance.multikrum, max_f=lambda n: n - 3, needs="n >= f + 3")
RULES.register("bulyan", distance.bulyan, max_f=lambda n: (n - 3) // 4, needs="n >= 4f + 3")
RULES.register("geomed", distance.geomed, static=("iters",), aliases=("rfa",))
RULES.register("cclip", distance.cclip, static=("iters",), propagates_nonfinite=True)
RULES.register("aksel", distance.aksel, static=("mode",))
RULES.register("monna", distance.monna, **_HALF)
RULES.register("cge", distance.cge, **_HALF)
RULES.register("dnc", spectral.dnc, static=("b", "niters"), **_HALF)
RULES.register("caf", spectral.caf, static=("max_iter",), **_HALF)
RULES.register("mda", subset.mda, max_n=subset.MAX_N["mda"], **_HALF)
RULES.register("smea", subset.smea, max_n=subset.MAX_N["smea"], **_HALF)
_SG_STATIC = ("frac", "n_samples")
RULES.register("signguard", signguard.signguard, static=_SG_STATIC)
RULES.register("signguard-sim", signguard.signguard_sim, static=_SG_STATIC)
RULES.register("signguard-dist", signguard.signguard_dist, static=_SG_STATIC)
RULES.register("clippedclustering", clustering.clippedclustering, static=("history",))

PRE.register("bucketing", pre.bucketing, static=("s",), squares=False)
PRE.register("nnm", pre.nnm, **_HALF)
PRE.register("arc", pre.arc, **_HALF)
PRE.register("clip", pre.clip)


def names() -> list[str]:
    """Registered aggregation rules (pre-aggregators are listed by ``pre_names``)."""
    return RULES.names(aliases=True)


def pre_names() -> list[str]:
    """Registered pre-aggregators, combined with a rule as ``"pre+rule"``."""
    return PRE.names(aliases=True)


def stages(name: str, field: str = "aggregator") -> list[Entry]:
    """The registry entries of ``"pre+...+rule"``; one clear error for unknown parts."""
    parts = str(name).split("+")
    return [PRE.entry(p, field) for p in parts[:-1]] + [RULES.entry(parts[-1], field)]


def route_params(
    entries: list[Entry], params: Mapping[str, Any], field: str = "aggregator"
) -> list[dict[str, Any]]:
    """Sends each keyword to the stage whose factory accepts it."""
    routed: list[dict[str, Any]] = [{} for _ in entries]
    for key, value in params.items():
        stage, _, short = key.rpartition(".")
        idx = [
            i
            for i, e in enumerate(entries)
            if short in e.defaults
            and (not stage or PRE.canonical(stage) == e.name or RULES.canonical(stage) == e.name)
        ]
        if not idx:
            allowed = sorted({k for e in entries for k in e.defaults})
            raise ConfigError(
                f"{field}.{key}: {'+'.join(e.name for e in entries)!r} has no such parameter; "
                f"allowed: {allowed or 'none'}."
            )
        if len(idx) > 1:
            options = [f"{entries[i].name}.{short}" for i in idx]
            raise ConfigError(
                f"{field}.{key}: {'+'.join(e.name for e in entries)!r} has this parameter in "
                f"more than one stage; use one of {options}."
            )
        routed[idx[0]][short] = value
    for e, p in zip(entries, routed, strict=True):
        e.check_params(p, field)
    return routed


def get(name: str, **params: Any) -> Aggregator:
    """Builds the rule ``name`` (``"pre+...+rule"`` allowed) with ``params``.

    The rule is wrapped in ``guard_nonfinite``: non-finite client rows, and for rules that
    square rows (registered without ``squares=False``) finite rows whose squared norm
    overflows (``base.overflowing_rows``), are rejected (zeroed and reported in
    ``aux["nonfinite"]``) before any stage sees them (for the mean and CClip, whose
    output is non-finite whenever a row is, only when their output is, and for the Gram
    rules, only when the rows' squared norms their Gram pass reports flag a row: one
    pass over the matrix fewer in clean rounds).
    """
    rule, guard = _unguarded(name, **params)
    return guard_nonfinite(rule, **guard)


def _unguarded(name: str, **params: Any) -> tuple[Aggregator, dict[str, bool]]:
    """The rule ``get`` builds, before ``guard_nonfinite``, and the guard's options."""
    entries = stages(name)
    built = [e.factory(**p) for e, p in zip(entries, route_params(entries, params), strict=True)]
    squares = any(e.meta.get("squares", True) for e in entries)
    if len(built) == 1:
        propagates = entries[0].meta.get("propagates_nonfinite", False)
        return built[0], {"propagates": propagates, "squares": squares}
    return compose(*built), {"propagates": False, "squares": squares}


def _min_rows(max_f) -> int:
    """The fewest rows for which ``max_f`` admits ``f = 0``."""
    return next(m for m in range(1, 1 << 16) if max_f(m) >= 0)


def check(
    name: str,
    n: int,
    f: int | None,
    params: Mapping[str, Any] | None = None,
    field: str = "aggregator",
) -> list[dict[str, Any]]:
    """Validates a rule for ``n`` clients and assumed ``f`` before any compilation.

    Routes and checks ``params`` (``route_params``), builds every stage (which checks
    static values such as SignGuard's ``frac``) and checks ``n`` and ``f`` against the
    bound of every stage, on the rows that stage receives (``f = None``, a traced ``f``:
    ``n`` only). Returns the parameters routed to the stages.
    """
    entries = stages(name, field)
    routed = route_params(entries, params or {}, field)
    built = [e.factory(**p) for e, p in zip(entries, routed, strict=True)]
    if n < 1:
        raise ConfigError(f"{field}: needs at least one client, got n={n}.")
    if f is not None and not 0 <= f < n:
        raise ConfigError(
            f"{field}.f: the assumed number of Byzantine clients must be in "
            f"[0, {n - 1}] for n={n}, got {f}."
        )
    m = n
    for i, (e, stage) in enumerate(zip(entries, built, strict=True)):
        via = f" after {'+'.join(x.name for x in entries[:i])}" if i else ""
        max_f = e.meta.get("max_f")
        needs = f" ({e.meta['needs']})" if "needs" in e.meta else ""
        if max_f is not None and max_f(m) < 0:
            raise ConfigError(
                f"{field}: {e.name!r} needs at least {_min_rows(max_f)} rows{needs}, "
                f"got {m}{via}; use more clients."
            )
        if max_f is not None and f is not None and f > max_f(m):
            raise ConfigError(
                f"{field}.f: {e.name!r} needs f <= {max_f(m)} for {m} rows{via}{needs}, "
                f"got f={f}; lower the assumed f or use more clients."
            )
        max_n = e.meta.get("max_n")
        if max_n is not None and m > max_n:
            raise ConfigError(
                f"{field}: {e.name!r} is an exact search over all subsets of the rows and "
                f"allows at most {max_n} rows, got {m}{via}; use fewer clients or "
                "another rule (e.g. 'multikrum')."
            )
        if i < len(entries) - 1:
            m = stage.out_rows(m)
    return routed


def as_param(value: Any, default: Any = None) -> Any:
    """A numeric hyperparameter as the array a jitted program takes.

    Integers (a Python ``int``, NumPy or JAX integer scalars and arrays, integer tracers)
    become ``int32``, so indices such as MoNNA's ``idx`` or Mimic's ``client`` stay
    integers under ``jit`` and ``vmap``, except for a keyword whose ``default`` is a
    float (``z=1`` then runs the program of ``z=1.5``); other numbers become
    ``float32``. Bools, strings and None are returned as they are. Shared by
    ``aggregate`` and ``attacks.attack``.
    """
    if isinstance(value, bool | str) or value is None:
        return value
    float_default = isinstance(default, float)
    return jnp.asarray(value, jnp.int32 if is_int(value) and not float_default else jnp.float32)


def concrete_f(f: Any, field: str = "f") -> int | None:
    """``f`` as a Python int when it is concrete, None when it is traced.

    Raises ``ConfigError`` naming ``field`` unless ``f`` is an integer scalar (a Python
    ``int``, a NumPy or JAX integer scalar, or a traced integer).
    """
    if isinstance(f, bool) or not is_int(f) or np.ndim(f) != 0:
        raise ConfigError(
            f"{field}: the number of Byzantine clients the server assumes must be an "
            f"integer scalar, got {f!r}."
        )
    return None if isinstance(f, jax.core.Tracer) else int(f)


def prepare(
    name: str, params: Mapping[str, Any], n: int, f: int | None, field: str = "aggregator"
) -> tuple[tuple[tuple[str, Any], ...], dict[str, Any]]:
    """Checks and splits the parameters of the rule ``name`` for a jitted call.

    Checks the rule for ``n`` rows and, when concrete (not None), ``f`` (``check``:
    routes ``params`` to the stages and builds them). Used by ``aggregate`` and by
    ``attacks.attack(..., aggregator=...)``.

    Returns:
      ``(static, numeric)``: the static keywords as a sorted tuple of ``(key, value)``
      pairs (hashable: part of the jitted function's cache key) and the numeric ones as
      arrays (``as_param``); keys are qualified by stage (``"nnm.f"``) for composites,
      as ``get`` takes them.
    """
    entries = stages(name, field)
    routed = check(name, n, f, params, field)
    static, numeric = {}, {}
    for e, p in zip(entries, routed, strict=True):
        s, num = e.split(p)
        prefix = f"{e.name}." if len(entries) > 1 else ""
        defaults = e.defaults
        static.update({prefix + k: v for k, v in s.items()})
        numeric.update({prefix + k: as_param(v, defaults[k]) for k, v in num.items()})
    return tuple(sorted(static.items())), numeric


def client_matrix(updates: Any, field: str = "updates"):
    """``ops.to_matrix`` for the public entry points, with one clear ``ConfigError`` for
    what cannot be client updates: a list or tuple of per-client vectors (all its leaves
    1-D or scalars, which would be read as a pytree whose leaves lead with ``d``), leaves
    without a common leading client axis, a matrix of another rank, no clients or no
    coordinates.

    Returns:
      ``(G, unravel)`` as ``ops.to_matrix``.
    """
    leaves = jax.tree.leaves(updates)
    if isinstance(updates, list | tuple) and all(np.ndim(x) <= 1 for x in leaves):
        raise ConfigError(
            f"{field}: got a {type(updates).__name__} of {len(updates)} per-client vectors; "
            "pass one [n, d] array (e.g. np.stack(updates)) or a pytree whose every leaf "
            "leads with the client axis n."
        )
    if not leaves:
        raise ConfigError(f"{field}: got no arrays; pass an [n, d] array or a pytree of them.")
    if len(leaves) > 1 or isinstance(updates, dict | list | tuple):
        leading = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
        if len(leading) != 1 or None in leading:
            raise ConfigError(
                f"{field}: every leaf of the pytree must lead with the client axis n, got "
                f"leaves of shapes {sorted({np.shape(x) for x in leaves})}."
            )
    try:
        G, unravel = ops.to_matrix(updates)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if G.shape[0] == 0 or G.shape[1] == 0:
        raise ConfigError(
            f"{field}: needs at least one client and one coordinate, got shape {G.shape}."
        )
    return G, unravel


@functools.cache
def _default_key() -> jax.Array:
    """``jax.random.key(0)``, made once (a new key is a dispatch, 0.3 ms a call here).

    Made eagerly even when first asked for inside a ``jit`` trace, so the cache never
    holds a tracer.
    """
    with jax.ensure_compile_time_eval():
        return jax.random.key(0)


@functools.lru_cache(maxsize=32)  # each keeps its compiled programs (see sim.run.MAX_PROGRAMS)
def _jitted(name: str, static: tuple[tuple[str, Any], ...]):
    """``aggregate``'s programs ``(G, f, key, numeric) -> ...``: ``first`` and ``checked``
    (``base.guard_parts``) for concrete inputs, and the guarded rule in one program for
    traced ones. Each compiles on its first call."""

    def program(part):
        def run(G, f, key, numeric):
            rule, guard = _unguarded(name, **dict(static), **numeric)
            ctx = AggregatorContext.create(f, key)
            state = rule.init(G.shape[1])
            if part == "guarded":
                out, _, aux = guard_nonfinite(rule, **guard).update(G, state, ctx)
                return out, aux
            first, checked = guard_parts(rule, **guard)
            if part == "first":
                (out, _, aux), suspect = first(G, state, ctx)
                return out, aux, suspect
            out, _, aux = checked(G, state, ctx)
            return out, aux

        return jax.jit(run)

    return {part: program(part) for part in ("first", "checked", "guarded")}


def aggregate(name: str, updates, *, f, key=None, return_aux: bool = False, **hparams):
    """Aggregates client updates with a registered rule, statelessly.

    Args:
      name: registry name, e.g. ``"median"`` or ``"nnm+median"``.
      updates: ``f32[n, d]`` (numpy or jax) or a pytree whose leaves lead with ``n``
        (not a list of per-client vectors: ``client_matrix``).
      f: number of Byzantine clients the server assumes: an integer scalar (Python,
        NumPy or JAX), checked against the rule when concrete (``check``), or a traced
        integer (not checked; a sweep over it compiles once).
      key: PRNG key for randomized rules; ``jax.random.key(0)`` when None.
      return_aux: also return the rule's ``aux`` (``aux["weights"]: f32[n]``).
      **hparams: override the paper defaults (e.g. ``tau=5.0`` for ``cclip``).

    Returns:
      The aggregate, ``f32[d]`` or one pytree like a single client's update. With
      concrete inputs the call waits for it: it runs the rule, and the guarded rerun
      (``guard_nonfinite``) only when the host sees that a row needs it; under ``jit``
      both are one program.
    """
    G, unravel = client_matrix(updates)
    static, numeric = prepare(name, hparams, G.shape[0], concrete_f(f))
    key = _default_key() if key is None else key
    programs = _jitted(name, static)
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((G, f, key, numeric))):
        out, aux = programs["guarded"](G, f, key, numeric)
    else:  # the zeroed copy of a guarded rerun only where a row needs it (guard_parts)
        out, aux, suspect = programs["first"](G, f, key, numeric)
        if suspect:
            out, aux = programs["checked"](G, f, key, numeric)
    out = unravel(out)
    return (out, aux) if return_aux else out
