"""Coordinate-wise rules: mean, median, trimmed mean, mean around the median, RB-TM.

Every rule here works on each coordinate ``j`` separately, on the order statistics
``S_0 <= ... <= S_{n-1}`` of ``{[g_i]_j}`` computed by ``ops.sorted_rows`` (a sorting
network fused into one pass over the matrix). They keep values, not rows, so their
``aux["weights"]`` is NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

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
    """Coordinate-wise median (Yin et al., "Byzantine-robust distributed learning:
    towards optimal statistical rates", ICML 2018).

    ``[Med(g_1, ..., g_n)]_j = S_{(n-1)/2}`` for odd ``n`` and ``(S_{n/2-1} + S_{n/2})/2``
    for even ``n`` (numpy's and ByzFL's convention). Needs ``f < n/2``.
    """

    def fn(G, ctx):
        n = G.shape[0]
        w = np.zeros(n)
        w[(n - 1) // 2] += 0.5
        w[n // 2] += 0.5
        return ops.rank_sum(ops.sorted_rows(G), w), no_weights(n)

    return stateless(fn)


def trmean_weights(n: int, f, q=None) -> jax.Array:
    """Rank weights over ``n`` ranks of the trimmed mean of the ``q`` smallest values
    (all ``n`` by default): ``1/(q−2f)`` on ranks ``f .. q−f−1``, zero elsewhere."""
    q = n if q is None else q
    r = jnp.arange(n)
    keep = (r >= f) & (r < q - f)
    return keep / jnp.maximum(q - 2 * f, 1).astype(jnp.float32)


def trmean() -> Aggregator:
    """Coordinate-wise trimmed mean (Yin et al., ICML 2018).

    Per coordinate, drops the ``f`` largest and ``f`` smallest values and averages the
    other ``n − 2f``: ``(1/(n−2f)) Σ_{r=f}^{n−f−1} S_r``, with ``f`` the number the server
    assumes (traced). ``f = 0`` is the mean. Matches ByzFL ``TrMean(f)``; needs
    ``f < n/2``.
    """

    def fn(G, ctx):
        n = G.shape[0]
        return ops.rank_sum(ops.sorted_rows(G), trmean_weights(n, ctx.f)), no_weights(n)

    return stateless(fn)


def closest_mean(S: list[jax.Array], q, k, *, kmin: int, starts: int) -> jax.Array:
    """Per coordinate, the mean of the ``k`` of the ``q`` smallest order statistics
    closest to their median, ties in distance going to the smaller value. ``-> [d]``.

    The ``k`` values closest to the median ``m`` are consecutive in sorted order, a
    window ``S_c .. S_{c+k−1}``. Sliding it from start ``s`` to ``s + 1`` trades ``S_s``
    for ``S_{s+k}``, which is strictly closer iff ``S_s + S_{s+k} < 2m``; these sums do
    not decrease with ``s``, so ``c = #{s : S_s + S_{s+k} < S_lo + S_hi}`` (``lo, hi``
    the median ranks of the ``q``), with both sums compared exactly (``ops.two_sum``).
    One pass over the sorted values, no per-coordinate gather.

    Args:
      S: order statistics from ``ops.sorted_rows``; ranks ``>= q`` hold ``+inf``.
      q: number of values that count (static or traced).
      k: window size (traced), at least ``kmin`` (smaller values act as ``kmin``).
      kmin: static lower bound of ``k``.
      starts: static bound on the number of window starts ``q − k + 1`` minus one.
    """
    k = jnp.maximum(k, kmin)
    lo, hi = (q - 1) // 2, q // 2
    pick = (lambda r: S[r]) if isinstance(q, int) else (lambda r: ops.rank_select(S, r))
    two_m = ops.two_sum(pick(lo), pick(hi))
    shifted = ops.shift_ranks(S, k, kmin, starts)
    c = jnp.zeros(S[0].shape, jnp.int32)
    for s in range(starts):
        c = c + ops.sum_less(ops.two_sum(S[s], shifted[s]), two_m).astype(jnp.int32)
    out = jnp.zeros_like(S[0])
    for r, v in enumerate(S):
        out = out + jnp.where((r >= c) & (r < c + k), v, 0.0)
    return ops.materialize(out / k.astype(out.dtype))


def meamed() -> Aggregator:
    """Mean around the median (Xie, Koyejo & Gupta, "Generalized Byzantine-tolerant
    SGD", 2018).

    ``[Meamed_f(g)]_j = (1/(n−f)) Σ_{i=1}^{n−f} [g_{π_j(i)}]_j`` where ``π_j`` orders the
    clients by ``|[g_i]_j − Med_j|``: per coordinate, the average of the ``n − f`` values
    closest to the coordinate-wise median (``closest_mean``). Ties in distance go to the
    smaller value (ByzFL ``Meamed`` leaves them to ``argpartition``). Needs ``f < n/2``.
    """

    def fn(G, ctx):
        n = G.shape[0]
        fmax = (n - 1) // 2
        out = closest_mean(ops.sorted_rows(G), n, n - ctx.f, kmin=n - fmax, starts=fmax)
        return out, no_weights(n)

    return stateless(fn)


def rbtm() -> Aggregator:
    """Reliable-broadcast trimmed mean, RB-TM (El-Mhamdi, Farhadkhani, Guerraoui,
    Guirguis, Hoang & Rouault, "Collaborative learning in the jungle", NeurIPS 2021,
    Section 5; evaluated as "RBTM" in the STRIKE paper, Table 1).

    In RB-TM every node reliably broadcasts its vector, waits for the first
    ``q = n − f`` vectors delivered (it cannot wait for the ``f`` that may never come)
    and takes their coordinate-wise trimmed mean, dropping the ``f`` largest and ``f``
    smallest values: ``(1/(q−2f)) Σ_{r=f}^{q−f−1} S^Q_r`` over the delivered set ``Q``.
    The simulated server has every row, so asynchrony is modelled by a uniformly random
    delivery order drawn from ``ctx.key`` each round. Needs ``n >= 3f + 1``, the
    optimal resilience proved in the paper.
    """

    def fn(G, ctx):
        n = G.shape[0]
        order = jax.random.permutation(ctx.key, n)
        delivered = jnp.zeros(n, bool).at[order].set(jnp.arange(n) < n - ctx.f)
        S = ops.sorted_rows(G, delivered)
        return ops.rank_sum(S, trmean_weights(n, ctx.f, n - ctx.f)), no_weights(n)

    return stateless(fn)
