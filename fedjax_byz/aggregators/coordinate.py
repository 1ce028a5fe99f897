"""Coordinate-wise rules: mean, median, trimmed mean."""

from __future__ import annotations

import jax.numpy as jnp

from fedjax_byz import ops
from fedjax_byz.aggregators.base import Aggregator, no_weights, stateless


def mean() -> Aggregator:
    """Plain average ``(1/n) Σ_i g_i`` (FedAvg with equal weights; not robust)."""

    def fn(G, ctx):
        n = G.shape[0]
        w = jnp.full((n,), 1.0 / n, G.dtype)
        return ops.weighted_sum(w, G), w

    return stateless(fn)


def median() -> Aggregator:
    """Coordinate-wise median (Yin et al., ICML 2018).

    ``[Med(g_1, ..., g_n)]_j``, the mean of the two middle values when ``n`` is even.
    """

    def fn(G, ctx):
        n = G.shape[0]
        S = ops.sort_rows(G)
        return 0.5 * (S[(n - 1) // 2] + S[n // 2]), no_weights(n)

    return stateless(fn)


def trmean() -> Aggregator:
    """Coordinate-wise trimmed mean (Yin et al., ICML 2018).

    Per coordinate, drops the ``f`` largest and ``f`` smallest values and averages the
    other ``n − 2f``: ``(1/(n−2f)) Σ_{i=f}^{n−f−1} [sort(g)_i]_j``; ``f`` is the number
    the server assumes (traced).
    """

    def fn(G, ctx):
        n = G.shape[0]
        S = ops.sort_rows(G)
        rank = jnp.arange(n)
        keep = (rank >= ctx.f) & (rank < n - ctx.f)
        w = keep.astype(G.dtype) / jnp.maximum(n - 2 * ctx.f, 1)
        return ops.weighted_sum(w, S), no_weights(n)

    return stateless(fn)
