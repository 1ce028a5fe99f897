"""Byzantine attacks, by registry name; ``attack`` is the jitted public convenience."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from fedjax_byz import ops
from fedjax_byz.attacks import adaptive, basic, byzmean, fang, mimic, search, statistical, strike
from fedjax_byz.attacks.base import Attack, AttackContext, replace_byzantine, stateless
from fedjax_byz.registry import Registry

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackContext",
    "attack",
    "get",
    "names",
    "replace_byzantine",
    "stateless",
]

ATTACKS = Registry("attack", traced=True)
ATTACKS.register("none", basic.none)
ATTACKS.register("bitflip", basic.bitflip, aliases=("signflip",))
ATTACKS.register("labelflip", basic.labelflip)
ATTACKS.register("gaussian", basic.gaussian)
ATTACKS.register("noise", basic.noise)
ATTACKS.register("zero", basic.zero)
ATTACKS.register("nan", basic.nan)
ATTACKS.register("inf", basic.inf)
ATTACKS.register("lie", statistical.lie, static=("knowledge",), aliases=("alie",))
ATTACKS.register("ipm", statistical.ipm, static=("knowledge",))
ATTACKS.register("minmax", search.minmax, static=("direction", "knowledge"))
ATTACKS.register("minsum", search.minsum, static=("direction", "knowledge"))
ATTACKS.register("mimic", mimic.mimic)
ATTACKS.register("byzmean", byzmean.byzmean, static=("knowledge",))
ATTACKS.register("strike", strike.strike)
ATTACKS.register("fang", fang.fang, static=("rule",))
ATTACKS.register("adaptive-lie", adaptive.adaptive_lie, static=("evals", "knowledge", "batch"))
ATTACKS.register("adaptive-ipm", adaptive.adaptive_ipm, static=("evals", "knowledge", "batch"))
ATTACKS.register("adaptive-strike", adaptive.adaptive_strike, static=("evals", "batch"))
ATTACKS.register(
    "adaptive-minmax",
    adaptive.adaptive_minmax,
    static=("evals", "direction", "knowledge", "batch"),
)
ATTACKS.register(
    "adaptive-minsum",
    adaptive.adaptive_minsum,
    static=("evals", "direction", "knowledge", "batch"),
)
ATTACKS.register(
    "adaptive-byzmean", adaptive.adaptive_byzmean, static=("evals", "knowledge", "batch")
)


def names() -> list[str]:
    """Registered attack names (aliases included)."""
    return ATTACKS.names(aliases=True)


def get(name: str, **params: Any) -> Attack:
    """Builds the attack registered as ``name``."""
    return ATTACKS.get(name, **params)


def _as_param(v):
    if isinstance(v, bool | str) or v is None:
        return v
    return jnp.asarray(v, jnp.int32 if isinstance(v, int) else jnp.float32)


@functools.lru_cache(maxsize=256)
def _jitted(name: str, static: tuple[tuple[str, Any], ...], aggregator: str | None):
    from fedjax_byz import aggregators

    def run(G, byz, key, numeric, agg_params):
        aggregate = None
        if aggregator is not None:
            rule = aggregators.get(aggregator, **agg_params)
            actx = aggregators.AggregatorContext.create(byz.sum(), key)

            def aggregate(U):
                return rule.update(U, rule.init(U.shape[1]), actx)[0]

        atk = get(name, **dict(static), **numeric)
        ctx = AttackContext.create(byz, aggregate=aggregate)
        return atk.apply(key, G, atk.init(G.shape[1]), ctx)[0]

    return jax.jit(run)


def attack(name: str, updates, byz, *, key=None, aggregator=None, **hparams):
    """Replaces the Byzantine rows of ``updates`` with the attack ``name``.

    Args:
      name: registry name, e.g. ``"lie"``.
      updates: ``f32[n, d]`` honest updates of every client (numpy or jax), or a pytree
        whose leaves lead with ``n``.
      byz: ``bool[n]`` Byzantine mask.
      key: PRNG key for randomized attacks; ``jax.random.key(0)`` when None.
      aggregator: registry name of the server's rule, for aggregation-aware attacks
        (it is run statelessly, assuming the true number of Byzantine clients), or a
        ``(name, params)`` pair.
      **hparams: override the paper defaults (e.g. ``z=1.5`` for ``lie``).

    Returns:
      Like ``updates``, with rows where ``byz`` is False unchanged.
    """
    G, unravel = ops.to_matrix(updates)
    entry = ATTACKS.entry(name)
    entry.check_params(hparams, "attack")
    static, numeric = entry.split(hparams)
    agg_name, agg_params = (
        (aggregator, {}) if isinstance(aggregator, str) or aggregator is None else aggregator
    )
    key = jax.random.key(0) if key is None else key
    run = _jitted(entry.name, tuple(sorted(static.items())), agg_name)
    out = run(
        G,
        jnp.asarray(byz, bool),
        key,
        {k: _as_param(v) for k, v in numeric.items()},
        {k: _as_param(v) for k, v in dict(agg_params).items()},
    )
    return unravel(out)
