"""ByzMean, the hybrid attack of the SignGuard paper (Xu et al., Sec. III, Eq. 8)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from fedjax_byz import ops
from fedjax_byz.attacks.base import Attack, AttackContext, Family, at_strength, replace_byzantine
from fedjax_byz.attacks.statistical import lie_family


def _rows_around(t: jax.Array, honest_sum: jax.Array, n: int, ctx: AttackContext) -> jax.Array:
    """Eq. 8: the first ``m₁ = ⌊f/2⌋`` Byzantine rows send ``t``, the others
    ``((n − m₁)·t − Σ_{i∈H} g_i)/m₂``. ``-> [n, d]`` (read on Byzantine rows only)."""
    f = ctx.f
    m1 = f // 2
    first = ctx.byz & (jnp.cumsum(ctx.byz) <= m1)
    rest = ((n - m1) * t - honest_sum) / jnp.maximum(f - m1, 1).astype(t.dtype)
    return jnp.where(first[:, None], t[None, :], rest[None, :])


def byzmean_of(target: Attack) -> Attack:
    """ByzMean around any attack: the mean of all ``n`` rows becomes the target exactly.

    With f Byzantine clients split as ``m₁ = ⌊f/2⌋`` and ``m₂ = f − m₁`` (the SignGuard
    paper's ``m₁ = ⌊0.5m⌋``), the first ``m₁`` Byzantine rows (by index) send the target
    ``t`` and the other ``m₂`` send

        g_{m₂} = ((n − m₁)·t − Σ_{i∈H} g_i) / m₂                                (Eq. 8)

    so that ``(1/n) Σ_i g_i = t``. ``t`` is the row ``target`` crafts for the first
    Byzantine client.
    """

    def apply(key, G, state, ctx):
        crafted, state = target.apply(key, G, state, ctx)
        t = jnp.take(crafted, jnp.argmax(ctx.byz), axis=0)
        honest_sum = ops.weighted_sum(ctx.honest, G)
        return replace_byzantine(G, ctx.byz, _rows_around(t, honest_sum, G.shape[0], ctx)), state

    return Attack(target.init, apply)


def byzmean(z: ArrayLike | None = None, *, knowledge: str = "omniscient") -> Attack:
    """ByzMean with the LIE target ``t = μ_R − z·σ_R``, the SignGuard paper's setting.

    Args:
      z: LIE strength for the target (``statistical.lie``); None uses Baruch et al.'s
        ``z_max`` (``statistical.lie_default_z``: ``z = Φ⁻¹((n − s)/n)``,
        ``s = max(⌊n/2 + 1⌋ − f, 1)``, finite with a Byzantine majority too); the
        SignGuard paper ran z = 0.3.
      knowledge: statistics over H (``"omniscient"``) or B (``"byzantine"``: also the
        honest sum of Eq. 8, estimated as ``|H|·μ_B``).

    Any other target: ``byzmean_of(attack)``.
    """
    return at_strength(byzmean_family(knowledge), z)


def known_honest_sum(G: jax.Array, ctx: AttackContext, knowledge: str) -> jax.Array:
    """``Σ_{i∈H} g_i`` as the attacker knows it: exact when omniscient; with only the
    Byzantine clients' own honest updates, ``|H|·μ_B`` (their mean standing in for the
    honest clients'). ``-> [d]``."""
    if knowledge == "omniscient":
        return ops.weighted_sum(ctx.honest, G)
    w = ctx.byz.astype(G.dtype)
    return ops.weighted_sum(w * (ctx.honest.sum() / jnp.maximum(w.sum(), 1.0)), G)


def byzmean_family(knowledge: str = "omniscient") -> Family:
    """ByzMean around ALIE as a ``Family``: ``μ_R``, ``σ_R`` and ``Σ_{i∈H} g_i`` once, then
    ``z ->`` the Eq. 8 rows around ``t = μ_R − z·σ_R`` (``known_honest_sum``: with
    ``knowledge="byzantine"`` the honest sum is estimated, so the mean is ``t`` only
    approximately)."""
    lie_craft = lie_family(knowledge)

    def family(key, G, ctx):
        target = lie_craft(key, G, ctx)
        honest_sum = known_honest_sum(G, ctx, knowledge)
        return lambda z: _rows_around(target(z), honest_sum, G.shape[0], ctx)

    return family
