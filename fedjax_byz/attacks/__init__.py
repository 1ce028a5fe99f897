"""Byzantine attacks, by registry name; ``attack`` is the jitted public convenience."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_byz import aggregators
from fedjax_byz.attacks import adaptive, basic, byzmean, fang, mimic, search, statistical, strike
from fedjax_byz.attacks.base import Attack, AttackContext, replace_byzantine, stateless, switch
from fedjax_byz.registry import ConfigError, Registry

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackContext",
    "attack",
    "get",
    "names",
    "replace_byzantine",
    "stateless",
    "switch",
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


def byz_mask(byz, n: int) -> jax.Array:
    """``byz`` checked as the Byzantine mask of ``n`` clients: ``bool[n]`` (an integer
    array of zeros and ones is read as one). Raises ``ConfigError`` naming ``byz`` for
    another shape (e.g. a list of indices) or other values; a traced mask is checked for
    its shape and dtype only.
    """
    traced = isinstance(byz, jax.core.Tracer)
    if not traced:
        try:
            byz = np.asarray(byz)
        except ValueError:
            byz = np.asarray(byz, object)
    hint = "; to mark clients by index use np.isin(np.arange(n), indices)"
    if byz.shape != (n,) or byz.dtype.kind not in ("b", "i", "u"):
        got = f"shape {byz.shape}" if byz.shape != (n,) else f"dtype {byz.dtype}"
        raise ConfigError(
            f"byz: must be a bool mask of shape ({n},), True for Byzantine clients, "
            f"got {got}{hint}."
        )
    if byz.dtype.kind != "b" and not traced and not np.isin(byz, (0, 1)).all():
        raise ConfigError(
            f"byz: an integer mask must hold only 0 and 1, got values "
            f"{sorted(set(byz.tolist()))[:8]}{hint}."
        )
    return jnp.asarray(byz, bool)


def _rule(aggregator) -> tuple[str, dict[str, Any]]:
    """``(name, params)`` of ``attack``'s ``aggregator`` argument."""
    if isinstance(aggregator, str):
        return aggregator, {}
    if (
        isinstance(aggregator, tuple | list)
        and len(aggregator) == 2
        and isinstance(aggregator[0], str)
        and isinstance(aggregator[1], Mapping)
    ):
        return aggregator[0], dict(aggregator[1])
    raise ConfigError(
        f"aggregator: must be a rule name or a (name, params) pair, got {aggregator!r}."
    )


@functools.lru_cache(maxsize=32)  # each keeps its compiled programs (see sim.run.MAX_PROGRAMS)
def _jitted(name: str, static: tuple[tuple[str, Any], ...], aggregator: tuple | None):
    """The jitted attack; ``aggregator`` is None or ``(rule name, its static params)``."""

    def run(G, byz, key, numeric, agg_numeric):
        aggregate = None
        if aggregator is not None:
            agg_name, agg_static = aggregator
            rule = aggregators.get(agg_name, **dict(agg_static), **agg_numeric)
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
      byz: ``bool[n]`` Byzantine mask (``byz_mask``).
      key: PRNG key for randomized attacks; ``jax.random.key(0)`` when None.
      aggregator: registry name of the server's rule, for aggregation-aware attacks
        (it is run statelessly, assuming the true number of Byzantine clients), or a
        ``(name, params)`` pair. Its parameters are routed, split and checked as
        ``fb.aggregate`` does (``aggregators.prepare``); with a concrete ``byz`` the
        rule is also checked for ``n`` clients and ``f = Σ byz``.
      **hparams: override the paper defaults (e.g. ``z=1.5`` for ``lie``).

    Returns:
      Like ``updates``, with rows where ``byz`` is False unchanged.
    """
    G, unravel = aggregators.client_matrix(updates)
    n = G.shape[0]
    entry = ATTACKS.entry(name)
    entry.check_params(hparams, "attack")
    static, numeric = entry.split(hparams)
    byz = byz_mask(byz, n)
    rule, agg_numeric = None, {}
    if aggregator is not None:
        agg_name, agg_params = _rule(aggregator)
        f = None if isinstance(byz, jax.core.Tracer) else int(byz.sum())
        agg_static, agg_numeric = aggregators.prepare(agg_name, agg_params, n, f)
        rule = (agg_name, agg_static)
    defaults = entry.defaults
    numeric = {k: aggregators.as_param(v, defaults[k]) for k, v in numeric.items()}
    key = jax.random.key(0) if key is None else key
    out = _jitted(entry.name, tuple(sorted(static.items())), rule)(
        G, byz, key, numeric, agg_numeric
    )
    return unravel(out)
