"""Attacks built from statistics of the honest updates (μ_H, σ_H)."""

from __future__ import annotations

import jax.numpy as jnp
from jax.scipy.special import ndtri
from jax.typing import ArrayLike

from fedjax_byz import ops
from fedjax_byz.attacks.base import Attack, stateless


def lie_default_z(n: ArrayLike, f: ArrayLike) -> jnp.ndarray:
    """Baruch et al.'s ``z_max``: ``s = ⌊n/2 + 1⌋ − f``, ``z = Φ⁻¹((n − s)/n)``."""
    s = jnp.floor(n / 2 + 1) - f
    return ndtri((n - s) / n)


def lie(z: ArrayLike | None = None) -> Attack:
    """A Little Is Enough (Baruch et al., NeurIPS 2019): send ``μ_H − z·σ_H``.

    μ_H and σ_H (ddof=1) are the coordinate-wise mean and standard deviation of the
    honest updates. ``z=None`` uses the paper's ``z_max`` (``lie_default_z``); the STRIKE
    paper's Table 3 uses z = 1.5.
    """

    def fn(key, G, ctx):
        mu = ops.masked_mean(G, ctx.honest)
        sigma = ops.masked_std(G, ctx.honest, mu)
        zz = lie_default_z(G.shape[0], ctx.f) if z is None else z
        return mu - zz * sigma

    return stateless(fn)


def ipm(eps: ArrayLike = 0.1) -> Attack:
    """Inner Product Manipulation (Xie et al., UAI 2020): send ``−ε·μ_H``; ε = 0.1."""
    return stateless(lambda key, G, ctx: -eps * ops.masked_mean(G, ctx.honest))
