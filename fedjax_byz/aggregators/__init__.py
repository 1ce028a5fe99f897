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
    no_weights,
    stateless,
)
from fedjax_byz.registry import ConfigError, Entry, Registry

__all__ = [
    "Aggregator",
    "AggregatorContext",
    "PreAggregator",
    "RULES",
    "PRE",
    "aggregate",
    "check",
    "compose",
    "get",
    "guard_nonfinite",
    "names",
    "no_weights",
    "pre_names",
    "stages",
    "stateless",
]

RULES = Registry("aggregator", traced=True)
PRE = Registry("pre-aggregator", traced=True)


def _half(n: int) -> int:
    """Largest f with f < n/2."""
    return (n - 1) // 2


RULES.register("mean", coordinate.mean, propagates_nonfinite=True)
RULES.register("median", coordinate.median, max_f=_half)
RULES.register("trmean", coordinate.trmean, max_f=_half)
RULES.register("meamed", coordinate.meamed, max_f=_half)
RULES.register("rbtm", coordinate.rbtm, max_f=lambda n: (n - 1) // 3)
RULES.register("krum", distance.krum, max_f=lambda n: n - 3)
RULES.register("multikrum", distance.multikrum, max_f=lambda n: n - 3)
RULES.register("bulyan", distance.bulyan, max_f=lambda n: (n - 3) // 4)
RULES.register("geomed", distance.geomed, static=("iters",), aliases=("rfa",))
RULES.register("cclip", distance.cclip, static=("iters",))
RULES.register("aksel", distance.aksel, static=("mode",))
RULES.register("monna", distance.monna, max_f=_half)
RULES.register("dnc", spectral.dnc, static=("b", "niters"), max_f=_half)
RULES.register("caf", spectral.caf, static=("max_iter",), max_f=_half)
RULES.register("mda", subset.mda, max_f=_half, max_n=subset.MAX_N["mda"])
RULES.register("smea", subset.smea, max_f=_half, max_n=subset.MAX_N["smea"])
_SG_STATIC = ("frac", "n_samples")
RULES.register("signguard", signguard.signguard, static=_SG_STATIC)
RULES.register("signguard-sim", signguard.signguard_sim, static=_SG_STATIC)
RULES.register("signguard-dist", signguard.signguard_dist, static=_SG_STATIC)
RULES.register("clippedclustering", clustering.clippedclustering, static=("history",))

PRE.register("bucketing", pre.bucketing, static=("s",))
PRE.register("nnm", pre.nnm, max_f=_half)
PRE.register("arc", pre.arc, max_f=_half)
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

    The rule is wrapped in ``guard_nonfinite``: non-finite client rows are rejected
    (zeroed and reported in ``aux["nonfinite"]``) before any stage sees them (for the
    mean, whose output is non-finite whenever a row is, only when its output is).
    """
    entries = stages(name)
    built = [e.factory(**p) for e, p in zip(entries, route_params(entries, params), strict=True)]
    if len(built) == 1:
        return guard_nonfinite(
            built[0], propagates=entries[0].meta.get("propagates_nonfinite", False)
        )
    return guard_nonfinite(compose(*built))


def check(
    name: str, n: int, f: int, params: Mapping[str, Any] | None = None, field: str = "aggregator"
) -> None:
    """Validates a rule for ``n`` clients and assumed ``f`` before any compilation."""
    entries = stages(name, field)
    routed = route_params(entries, params or {}, field)
    if not 0 <= f < n:
        raise ConfigError(
            f"{field}.f: the assumed number of Byzantine clients must be in "
            f"[0, {n - 1}] for n={n}, got {f}."
        )
    m = n
    for i, (e, p) in enumerate(zip(entries, routed, strict=True)):
        via = f" after {'+'.join(x.name for x in entries[:i])} ({m} rows)" if i else ""
        max_f = e.meta.get("max_f")
        if max_f is not None and f > max_f(m):
            raise ConfigError(
                f"{field}.f: {e.name!r} needs f <= {max_f(m)} for {m} rows{via}, "
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
            m = e.factory(**p).out_rows(m)


def _as_param(v):
    if isinstance(v, bool | str) or v is None:
        return v
    return jnp.asarray(v, jnp.int32 if isinstance(v, int) else jnp.float32)


@functools.cache
def _default_key() -> jax.Array:
    """``jax.random.key(0)``, made once (a new key is a dispatch, 0.3 ms a call here).

    Made eagerly even when first asked for inside a ``jit`` trace, so the cache never
    holds a tracer.
    """
    with jax.ensure_compile_time_eval():
        return jax.random.key(0)


@functools.lru_cache(maxsize=256)
def _jitted(name: str, static: tuple[tuple[str, Any], ...]):
    def run(G, f, key, numeric):
        agg = get(name, **dict(static), **numeric)
        ctx = AggregatorContext.create(f, key)
        out, _, aux = agg.update(G, agg.init(G.shape[1]), ctx)
        return out, aux

    return jax.jit(run)


def aggregate(name: str, updates, *, f, key=None, return_aux: bool = False, **hparams):
    """Aggregates client updates with a registered rule, statelessly.

    Args:
      name: registry name, e.g. ``"median"`` or ``"nnm+median"``.
      updates: ``f32[n, d]`` (numpy or jax) or a pytree whose leaves lead with ``n``.
      f: number of Byzantine clients the server assumes (int or traced int32).
      key: PRNG key for randomized rules; ``jax.random.key(0)`` when None.
      return_aux: also return the rule's ``aux`` (``aux["weights"]: f32[n]``).
      **hparams: override the paper defaults (e.g. ``tau=5.0`` for ``cclip``).

    Returns:
      The aggregate, ``f32[d]`` or one pytree like a single client's update.
    """
    G, unravel = ops.to_matrix(updates)
    entries = stages(name)
    routed = route_params(entries, hparams)
    if isinstance(f, int):
        check(name, G.shape[0], f, hparams)
    static, numeric = {}, {}
    for e, p in zip(entries, routed, strict=True):
        s, num = e.split(p)
        prefix = f"{e.name}." if len(entries) > 1 else ""
        static.update({prefix + k: v for k, v in s.items()})
        numeric.update({prefix + k: _as_param(v) for k, v in num.items()})
    key = _default_key() if key is None else key
    out, aux = _jitted(name, tuple(sorted(static.items())))(G, f, key, numeric)
    out = unravel(out)
    return (out, aux) if return_aux else out
