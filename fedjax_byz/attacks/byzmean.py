"""ByzMean, the hybrid attack of the SignGuard paper (Xu et al., Sec. III, Eq. 8)."""

from __future__ import annotations

import jax.numpy as jnp
from jax.typing import ArrayLike

from fedjax_byz import ops
from fedjax_byz.attacks.base import Attack, replace_byzantine
from fedjax_byz.attacks.statistical import lie


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
        f = ctx.f
        m1 = f // 2
        first = ctx.byz & (jnp.cumsum(ctx.byz) <= m1)
        honest_sum = ops.weighted_sum(ctx.honest, G)
        rest = ((G.shape[0] - m1) * t - honest_sum) / jnp.maximum(f - m1, 1).astype(G.dtype)
        return replace_byzantine(
            G, ctx.byz, jnp.where(first[:, None], t[None, :], rest[None, :])
        ), state

    return Attack(target.init, apply)


def byzmean(z: ArrayLike | None = None, *, knowledge: str = "omniscient") -> Attack:
    """ByzMean with the LIE target ``t = μ_R − z·σ_R``, the SignGuard paper's setting.

    Args:
      z: LIE strength for the target (``statistical.lie``); None uses Baruch et al.'s
        ``z_max`` (the SignGuard paper ran z = 0.3).
      knowledge: statistics over H (``"omniscient"``) or B (``"byzantine"``).

    Any other target: ``byzmean_of(attack)``.
    """
    return byzmean_of(lie(z, knowledge=knowledge))
