"""ByzMean, the hybrid attack of the SignGuard paper (Xu et al., Sec. III, Eq. 8)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from fedjax_byz import ops
from fedjax_byz.attacks.base import Attack, AttackContext, Family, at_strength, replace_byzantine
from fedjax_byz.attacks.statistical import check_knowledge, known_rows, lie_craft, mean_std


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


def byzmean_family(knowledge: str = "omniscient") -> Family:
    """ByzMean around ALIE as a ``Family``: ``μ_R`` and ``σ_R`` once (one read of the
    matrix), then ``z ->`` the Eq. 8 rows around ``t = μ_R − z·σ_R``.

    The honest sum of Eq. 8 is ``|H|·μ_R``: ``Σ_{i∈H} g_i`` itself when omniscient (up to
    rounding); with ``knowledge="byzantine"`` an estimate, the Byzantine clients' own mean
    standing in for the honest clients', so the mean is ``t`` only approximately.
    """
    check_knowledge(knowledge)

    def family(key, G, ctx):
        mu, sigma = mean_std(G, known_rows(ctx, knowledge))
        target = lie_craft(mu, sigma, G.shape[0], ctx.f)
        honest_sum = ctx.honest.sum().astype(G.dtype) * mu
        return lambda z: _rows_around(target(z), honest_sum, G.shape[0], ctx)

    return family
