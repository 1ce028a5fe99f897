"""Attacks built from coordinate-wise statistics of known updates (μ, σ).

Notation: H = honest rows (``~byz``), B = Byzantine rows. μ_R and σ_R are the
coordinate-wise mean and standard deviation (ddof=1) of the rows R the attackers know:
``knowledge="omniscient"`` (R = H, every honest update; the default, as in Baruch et al.
and Xie et al.) or ``"byzantine"`` (R = B, the Byzantine clients' own honest updates:
the "non-omniscient" column of Table 3 of Errami et al., "Stress-Testing Byzantine
Defenses under Data Heterogeneity").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtri
from jax.typing import ArrayLike

from fedjax_byz import ops
from fedjax_byz.attacks.base import Attack, AttackContext, Craft, Family, at_strength
from fedjax_byz.registry import ConfigError

KNOWLEDGE = ("omniscient", "byzantine")


def check_knowledge(knowledge: str) -> None:
    """Raises ``ConfigError`` unless ``knowledge`` is one of ``KNOWLEDGE``."""
    if knowledge not in KNOWLEDGE:
        raise ConfigError(
            f"attack.params.knowledge: must be one of {list(KNOWLEDGE)}, got {knowledge!r}."
        )


def known_rows(ctx: AttackContext, knowledge: str) -> jax.Array:
    """``bool[n]``: the rows whose honest updates the attackers use (H or B)."""
    return ctx.honest if knowledge == "omniscient" else ctx.byz


def mean_std(G: jax.Array, rows: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(μ_R, σ_R)`` of the rows ``rows`` of ``G [n, d]``, σ with ddof=1. ``-> [d], [d]``.

    One column-blocked pass (``ops.masked_mean_std``).
    """
    return ops.masked_mean_std(G, rows, ddof=1)


def lie_default_z(n: int, f: ArrayLike) -> jax.Array:
    """Baruch et al.'s ``z_max``: ``s = max(⌊n/2 + 1⌋ − f, 1)``, ``z = Φ⁻¹((n − s)/n)``.

    ``s`` is the number of honest clients the attackers must win over to hold a
    majority; Baruch et al. define it for ``f < ⌊n/2 + 1⌋``. With a Byzantine majority
    their ``s`` would be 0 or negative and ``z`` infinite or NaN; it is clamped to 1 here,
    which keeps ``z`` finite (``Φ⁻¹((n − 1)/n)``, for ``n >= 2``). float32 (also
    with ``jax_enable_x64``; ``n`` static, ``f`` may be traced).

    (The SignGuard paper's Eq. 2 states a different variant, ``Φ(z) < (n − ⌊n/2 + 1⌋) /
    (n − f)``; pass ``z`` explicitly to use it.)
    """
    s = jnp.maximum(n // 2 + 1 - jnp.asarray(f, jnp.int32), 1)
    return ndtri((n - s).astype(jnp.float32) / jnp.float32(n))


def lie(z: ArrayLike | None = None, *, knowledge: str = "omniscient") -> Attack:
    """A Little Is Enough (Baruch et al., NeurIPS 2019): every Byzantine row sends ``μ_R − z·σ_R``.

    Args:
      z: attack strength (may be traced). None uses Baruch et al.'s ``z_max``
        (``lie_default_z(n, f)``: ``z = Φ⁻¹((n − s)/n)``, ``s = max(⌊n/2 + 1⌋ − f, 1)``,
        clamped so that a Byzantine majority keeps a finite z). Published settings: 1.5
        (STRIKE paper, Table 3), 0.3 (SignGuard paper), 0–10 calibrated for
        heterogeneity (Errami et al.; z = 8).
      knowledge: ``"omniscient"`` (statistics over H) or ``"byzantine"`` (over B); see
        the module docstring.

    The minus sign follows the issue's definition, the SignGuard paper (Eq. 1), the
    STRIKE paper (appendix D.1) and Errami et al. (Table 3); ByzFL's ``ALittleIsEnough``
    sends ``μ + τσ`` (equal to ``z = −τ`` here). σ uses ddof=1, as ByzFL does.
    """
    return at_strength(lie_family(knowledge), z)


def lie_family(knowledge: str = "omniscient") -> Family:
    """ALIE as a ``Family``: ``μ_R, σ_R`` once, then ``z -> μ_R − z·σ_R`` (None: z_max)."""
    check_knowledge(knowledge)

    def family(key, G, ctx):
        return lie_craft(*mean_std(G, known_rows(ctx, knowledge)), G.shape[0], ctx.f)

    return family


def lie_craft(mu: jax.Array, sigma: jax.Array, n: int, f: ArrayLike) -> Craft:
    """``z -> μ_R − z·σ_R`` from the moments (z None: ``lie_default_z(n, f)``)."""

    def craft(z):
        return mu - (lie_default_z(n, f) if z is None else z) * sigma

    return craft


def ipm(eps: ArrayLike = 0.1, *, knowledge: str = "omniscient") -> Attack:
    """Inner Product Manipulation (Xie et al., UAI 2020): every Byzantine row sends ``−ε·μ_R``.

    Args:
      eps: ε, attack strength (may be traced); 0.1 as in Xie et al. and the STRIKE paper
        (Table 3); Errami et al. calibrate ε = 2.5 for heterogeneous data; ByzFL's
        ``InnerProductManipulation`` defaults to τ = 2.
      knowledge: ``"omniscient"`` (μ over H) or ``"byzantine"`` (over B, Errami et al.
        Table 3).
    """
    return at_strength(ipm_family(knowledge), eps)


def ipm_family(knowledge: str = "omniscient") -> Family:
    """IPM as a ``Family``: ``μ_R`` once, then ``ε -> −ε·μ_R``."""
    check_knowledge(knowledge)

    def family(key, G, ctx):
        mu = ops.masked_mean(G, known_rows(ctx, knowledge))
        return lambda eps: -eps * mu

    return family
