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
from fedjax_byz.aggregators.base import Aggregator, coordinate_rule, stateless


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

    def fn(G, ctx, fused_ops=0):
        n = G.shape[0]
        w = np.zeros(n)
        w[(n - 1) // 2] += 0.5
        w[n // 2] += 0.5
        return ops.sorted_sum(G, w, fused_ops=fused_ops)

    return coordinate_rule(fn)


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

    def fn(G, ctx, fused_ops=0):
        n = G.shape[0]
        w = trmean_weights(n, ctx.f)  # the server's rows are finite
        return ops.sorted_sum(G, w, finite=True, fused_ops=fused_ops)

    return coordinate_rule(fn)


# XLA's CPU backend compiles a fused loop of more than roughly 4,500 operations into
# unvectorised sub-functions, 30-40x slower (measured here: meamed at n = 110 runs in one
# vectorised loop, at n = 128 it took 1 s for d = 100k; per-row masks cost more than
# their count of jaxpr operations suggests). ``closest_mean`` estimates its loop (``_plan``)
# and stays under these budgets; splitting the loop into several blocked passes kept it
# fast but took minutes to compile at n = 100.
_FUSED_BUDGET = 4500
_MASKED_BUDGET = 4000


def _window_ops(n: int, kmin: int, starts: int, step: int) -> int:
    """Estimated operations of ``closest_mean`` past the sorting network: the window
    starts' shifts and exact comparisons, and the window sum."""
    return sum(ops.shift_sizes(n, kmin, starts, step)) + 12 * starts + 4 * n


def _plan(n: int, window_ops: int, masked: bool) -> str:
    """How ``closest_mean`` runs: ``"fused"`` (one pass with per-row masks),
    ``"materialized"`` (the masked matrix written once, then one pass) or ``"sort"``
    (``jnp.sort`` once), from the estimated jaxpr operations of the fused loop: the
    sorting network as min/max, the row reads and masks, and ``window_ops``
    (``_window_ops``)."""
    loop = ops.network_ops(n) + window_ops
    if loop + (6 * n if masked else 0) <= (_MASKED_BUDGET if masked else _FUSED_BUDGET):
        return "fused"
    return "materialized" if loop <= _FUSED_BUDGET else "sort"


def closest_mean(
    G: jax.Array,
    k,
    *,
    kmin: int,
    starts: int,
    step: int = 1,
    valid: jax.Array | None = None,
    below: jax.Array | None = None,
    fused_ops: int = 0,
) -> jax.Array:
    """Per coordinate, the mean of the ``k`` values closest to the median of the column,
    ties in distance going to the smaller value. ``-> [d]``.

    With ``S_0 <= ... <= S_{n−1}`` the sorted column (``ops.sorted_rows``), the ``k``
    values closest to the median ``m = (S_lo + S_hi)/2`` (``lo = (n−1)//2``,
    ``hi = n//2``) are consecutive in sorted order, a window ``S_c .. S_{c+k−1}``.
    Sliding it from start ``s`` to ``s + 1`` trades ``S_s`` for ``S_{s+k}``, which is
    strictly closer iff ``S_s + S_{s+k} < S_lo + S_hi``; these sums do not decrease
    with ``s``, so ``c`` is the number of starts where that holds, both sums compared
    exactly (``ops.two_sum``). No per-coordinate gather. Rows that must not count are
    pushed to ``±inf``, as many each way (``valid``, ``below``): the median of the rest
    stays at ``lo, hi``, windows reaching ``−inf`` always slide on and windows reaching
    ``+inf`` never do.

    On the native kernel (``ops.native_closest_mean``) where XLA's loop would be large
    (``ops.sorts_natively``: Meamed from n = 84, Bulyan from n = 71); there ``k`` is a
    number at run time and needs no shifter. Otherwise one fused pass over ``G`` when it
    fits XLA's CPU loop budget (``_plan``): with per-row masks, or on the masked matrix
    written once; past about n = 105 the columns are sorted once by ``jnp.sort`` instead
    (slower, never off the cliff).

    Args:
      G: ``[n, d]`` matrix, or ``ops.MixedRows`` (NNM's rows behind ``compose``).
      k: window size (traced), at least ``kmin`` (smaller values act as ``kmin``).
      kmin: static lower bound of ``k``.
      starts: static bound on the number of starts ``c`` can skip (``n − k`` at most).
      step: static; ``k − kmin`` is always a multiple of it.
      valid: optional ``bool[n]``, the rows that count (see ``ops.sorted_rows``).
      below: optional ``bool[n]``, rows outside ``valid`` pushed to ``−inf``.
      fused_ops: estimated operations of a producer of ``G``'s rows fused into the pass
        (``ops.sorted_sum``).
    """
    n = G.shape[0]
    k = jnp.maximum(k, kmin)
    window_ops = _window_ops(n, kmin, starts, step) + fused_ops
    loop = ops.network_ops(n, valid is not None) + window_ops
    if ops.sorts_natively(G, loop, fused_ops):
        return ops.native_closest_mean(G, k, starts=starts, valid=valid, below=below)
    G = ops.written(G)

    def count(S):
        two_m = ops.two_sum(S[(n - 1) // 2], S[n // 2])
        shifted = ops.shift_ranks(S, k, kmin, starts, step)
        c = jnp.zeros(S[0].shape, jnp.int32)
        for s in range(starts):
            c = c + ops.sum_less(ops.two_sum(S[s], shifted[s]), two_m).astype(jnp.int32)
        return c

    def window(S, c):
        out = jnp.zeros_like(S[0])
        for r, v in enumerate(S):
            out = out + jnp.where((r >= c) & (r < c + k), v, 0.0)
        return (out / k.astype(out.dtype))[0]

    plan = _plan(n, window_ops, valid is not None)
    if plan == "fused":
        S = ops.sorted_rows(G, valid, below, consumer_ops=window_ops)
        return window(S, count(S))
    if valid is not None:
        G = jnp.where(valid[:, None], G, ops.replaced_rows(n, valid, below)[1][:, None])
    if plan == "sort":
        S = jnp.sort(G, axis=0)
        S = [S[i : i + 1] for i in range(n)]
    else:
        S = ops.sorted_rows(G, consumer_ops=window_ops)
    return window(S, count(S))


def meamed() -> Aggregator:
    """Mean around the median (Xie, Koyejo & Gupta, "Generalized Byzantine-tolerant
    SGD", 2018).

    ``[Meamed_f(g)]_j = (1/(n−f)) Σ_{i=1}^{n−f} [g_{π_j(i)}]_j`` where ``π_j`` orders the
    clients by ``|[g_i]_j − Med_j|``: per coordinate, the average of the ``n − f`` values
    closest to the coordinate-wise median (``closest_mean``). Ties in distance go to the
    smaller value (ByzFL ``Meamed`` leaves them to ``argpartition``). Needs ``f < n/2``.
    """

    def fn(G, ctx, fused_ops=0):
        n = G.shape[0]
        fmax = (n - 1) // 2
        return closest_mean(G, n - ctx.f, kmin=n - fmax, starts=fmax, fused_ops=fused_ops)

    return coordinate_rule(fn)


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

    def fn(G, ctx, fused_ops=0):
        n = G.shape[0]
        order = jax.random.permutation(ctx.key, n)
        delivered = jnp.zeros(n, bool).at[order].set(jnp.arange(n) < n - ctx.f)
        w = trmean_weights(n, ctx.f, n - ctx.f)
        return ops.sorted_sum(G, w, delivered, fused_ops=fused_ops)

    return coordinate_rule(fn)
