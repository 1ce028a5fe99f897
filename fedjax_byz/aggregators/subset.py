"""Exact subset searches: Minimum-Diameter Averaging (MDA) and Smallest Maximum
Eigenvalue Averaging (SMEA).

Both pick the subset ``S`` of ``n − f`` rows minimising a spread measure and return its
mean. With ``f`` traced, every subset of ``{1..n}`` is scored (``2ⁿ`` of them) and the
best one of size ``n − f`` is kept, so these rules refuse large ``n`` (``MAX_N``).
Ties go to the subset whose bitmask (bit ``i`` for row ``i``) is smallest.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_byz import ops
from fedjax_byz.aggregators.base import Aggregator, gram_rule

MAX_N = {"mda": 20, "smea": 14}


def _masks(n: int) -> tuple[jax.Array, jax.Array]:
    """All subsets as ``int32[2ⁿ]`` bitmasks and their ``bool[2ⁿ, n]`` membership."""
    m = jnp.arange(2**n, dtype=jnp.int32)
    return m, ((m[:, None] >> jnp.arange(n, dtype=jnp.int32)[None, :]) & 1).astype(bool)


def _best_subset(score: jax.Array, members: jax.Array, size) -> jax.Array:
    """Membership ``bool[n]`` of the lowest-scoring subset with ``size`` rows."""
    ok = members.sum(axis=1) == size
    return members[jnp.argmin(jnp.where(ok, score, jnp.inf))]


def subset_diameters(D: jax.Array) -> jax.Array:
    """``max_{i,j ∈ S} D_ij`` for every bitmask ``S``, by doubling: ``O(n 2ⁿ)``.

    A mask with top bit ``b`` is ``{b} ∪ low``, and ``diam({b} ∪ low) =
    max(diam(low), max_{j ∈ low} D_bj)``; both tables grow one bit at a time.
    """
    n = D.shape[0]
    diam = jnp.zeros(1, D.dtype)
    for b in range(n):
        far = jnp.zeros(1, D.dtype)  # max_{j ∈ low} D_bj for every low < 2^b
        for j in range(b):
            far = jnp.concatenate([far, jnp.maximum(far, D[b, j])])
        diam = jnp.concatenate([diam, jnp.maximum(diam, far)])
    return diam


def mda() -> Aggregator:
    """Minimum-Diameter Averaging (El Mhamdi, Guerraoui, Guirguis, Hoang & Rouault,
    "Genuinely distributed Byzantine machine learning", PODC 2020).

    ``MDA_f(g) = (1/(n−f)) Σ_{i ∈ S*} g_i``, ``S* ∈ argmin_{|S| = n−f} max_{i,j ∈ S}
    ‖g_i − g_j‖``, as ByzFL ``MDA`` (which enumerates the same subsets). Needs
    ``f < n/2`` and ``n <= 20``.
    """

    def weights(K, ctx):
        n = K.shape[0]
        _, members = _masks(n)
        keep = _best_subset(subset_diameters(ops.sq_dists_from_gram(K)), members, n - ctx.f)
        return keep / jnp.asarray(n - ctx.f, K.dtype)

    return gram_rule(weights)


def smea() -> Aggregator:
    """Smallest Maximum Eigenvalue Averaging (Allouah, Guerraoui, Gupta, Pinot &
    Stephan, "On the privacy-robustness-utility trilemma in distributed learning",
    ICML 2023).

    ``S* ∈ argmin_{|S| = n−f} λ_max(Σ_S)``, ``Σ_S = (1/|S|) Σ_{i ∈ S} (g_i − μ_S)(g_i −
    μ_S)ᵀ``; the output is ``μ_{S*}``. ``λ_max(Σ_S)`` is computed exactly as the top
    eigenvalue of the subset's centred Gram matrix over ``|S|`` (ByzFL ``SMEA`` uses one
    power-iteration step from a random vector). Needs ``f < n/2`` and ``n <= 14``.
    """

    def weights(K, ctx):
        n, dtype = K.shape[0], K.dtype
        K = K.astype(jnp.promote_types(dtype, jnp.float32))  # eigvalsh takes no bfloat16
        _, members = _masks(n)
        m = members.astype(K.dtype)
        size = jnp.maximum(m.sum(axis=1), 1.0)
        P = jax.vmap(jnp.diag)(m) - m[:, :, None] * m[:, None, :] / size[:, None, None]
        lam = ops.eigh(P @ K @ P, vectors=False)[:, -1] / size
        return _best_subset(lam, members, n - ctx.f) / jnp.asarray(n - ctx.f, dtype)

    return gram_rule(weights)
