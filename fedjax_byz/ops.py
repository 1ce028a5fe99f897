"""Numerical kernels on the update matrix ``G: f32[n, d]`` shared by attacks and rules.

Conventions: rows are clients, ``mask: bool[n]`` selects rows, counts such as ``k`` may be
traced. Reductions over the client axis are written as matrix products (``w @ G``): on
XLA's CPU backend ``jnp.sum(G, 0)`` reads memory ~30x slower than the equivalent product,
and on a GPU the product is just as good.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from fedjax_byz import native

_HI = jax.lax.Precision.HIGHEST


def weighted_sum(w: ArrayLike, G: jax.Array) -> jax.Array:
    """``Σ_i w_i g_i`` as one matrix-vector product. ``w [n], G [n, d] -> [d]``."""
    return jnp.matmul(jnp.asarray(w, G.dtype), G, precision=_HI)


def row_sums(X: jax.Array) -> jax.Array:
    """``Σ_j X_ij`` for every row as one matrix-vector product ``X @ 1``, which XLA's CPU
    backend runs faster than the row reduction. ``[n, c] -> [n]``."""
    return jnp.matmul(X, jnp.ones(X.shape[1], X.dtype), precision=_HI)


def masked_mean(G: jax.Array, mask: jax.Array) -> jax.Array:
    """Coordinate-wise mean of the rows where ``mask`` is True. ``-> [d]``."""
    w = mask.astype(G.dtype)
    return weighted_sum(w / jnp.maximum(w.sum(), 1.0), G)


def masked_std(
    G: jax.Array, mask: jax.Array, mean: jax.Array | None = None, ddof: int = 1
) -> jax.Array:
    """Coordinate-wise standard deviation of the masked rows (``ddof=1`` by default)."""
    w = mask.astype(G.dtype)
    mean = masked_mean(G, mask) if mean is None else mean
    var = weighted_sum(w, jnp.square(G - mean[None, :])) / jnp.maximum(w.sum() - ddof, 1.0)
    return jnp.sqrt(var)


@functools.cache
def sorting_network(n: int) -> tuple[tuple[int, int], ...]:
    """Batcher's odd-even merge sorting network for ``n`` inputs, as comparator pairs.

    Each pair ``(a, b)`` with ``a < b`` puts the smaller value in ``a``; applying the
    pairs in order sorts any ``n`` inputs (Knuth, TAOCP vol. 3, 5.3.4). Pairs that would
    touch an index ``>= n`` are dropped, which leaves a valid network for any ``n``.
    """
    pairs = []
    p = 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return tuple(pairs)


# Past _NETWORK_MAX_N rows the network's compile time grows too large and ``jnp.sort`` is
# used instead.
_NETWORK_MAX_N = 128

# A comparator written as compare-and-select (one compare, two selects) ran 1.7-2x faster
# here than as ``minimum``/``maximum``, which are one operation each but propagate NaN at
# a cost of several instructions in XLA's CPU code (median at (100, 100k): 5.5 against
# 10 ms; trimmed mean 6.8 against 13.4). XLA's CPU backend compiles a fused loop of a few
# thousand operations or more into unvectorised sub-functions, 30-40x slower (see
# ``aggregators.coordinate._FUSED_BUDGET``; a trimmed mean at n = 100 whose fused loop had
# 4,317 HLO operations took 60 ms, one of 3,914 ran fast), so ``sorted_rows`` writes as many
# comparators as compare-and-select as keep its estimate of the loop within
# _SELECT_BUDGET, and the others as min/max.
_SELECT_BUDGET = 3900


# Where XLA's fused loop (``sorted_rows`` with its consumer) is estimated past _NATIVE_OPS
# operations, the native kernel (``native.sorted_sum``, ``native.closest_mean``) sorts
# faster: measured here, RB-TM at 100 x 100k 8.3 -> 5.7 ms, Meamed 13.4 -> 6.2, Bulyan's
# window 25 -> 4.8, and at n = 128, past the network's limit, Meamed 975 -> 7.6. Below it,
# XLA's network, its values held in registers, was faster (median at 25 x 500k: 2.8
# against 5.0 ms; Meamed at 80 x 120k, an estimated 3,138 operations: 5.9 against 6.2).
_NATIVE_OPS = 3300


def network_ops(n: int, masked: bool = False) -> int:
    """Estimated operations of ``sorted_rows``' fused loop before its consumer: the
    network as min/max, the row reads and, for ``masked`` rows, their replacement."""
    return 2 * len(sorting_network(n)) + (5 if masked else 2) * n


def sorts_natively(G, loop_ops: int, fused_ops: int = 0) -> bool:
    """Whether a sort of ``G``'s columns whose fused loop is estimated at ``loop_ops``
    operations runs on the native kernels (``_NATIVE_OPS``), as ``MixedRows`` always do
    where the kernels are available. Never under a fused producer (``fused_ops > 0``,
    ``base.compose``): the kernel would need the mapped matrix written whole."""
    large = isinstance(G, MixedRows) or (fused_ops == 0 and loop_ops > _NATIVE_OPS)
    return large and native.available(G.dtype)


class MixedRows(NamedTuple):
    """The rows ``M G`` (``M [m, n]``, ``G [n, d]``, shape ``[m, d]``) as ``sorted_sum``
    and ``native_closest_mean`` take them: the native kernels form them column by column
    and never write them (NNM in front of a coordinate rule, ``base.compose``); without
    the kernels they are written (``rows``)."""

    M: jax.Array
    G: jax.Array

    @property
    def shape(self) -> tuple[int, int]:
        return self.M.shape[0], self.G.shape[1]

    @property
    def dtype(self):
        return self.G.dtype

    def rows(self) -> jax.Array:
        return jnp.matmul(self.M, self.G, precision=_HI)


def written(G) -> jax.Array:
    """``G``, or the rows of ``MixedRows`` written out (where no native kernel sorts)."""
    return G.rows() if isinstance(G, MixedRows) else G


def _unmixed(G) -> tuple[jax.Array, jax.Array | None]:
    """``(G, None)``, or ``(G, M)`` for ``MixedRows(M, G)``."""
    return (G.G, G.M) if isinstance(G, MixedRows) else (G, None)


def sorted_rows(
    G: jax.Array,
    valid: jax.Array | None = None,
    below: jax.Array | None = None,
    *,
    consumer_ops: int = 0,
) -> list[jax.Array]:
    """The order statistics of every coordinate: ``S_0 <= ... <= S_{n-1}``, each ``[1, d]``.

    For ``n <= 128`` this is a sorting network over the rows, which XLA fuses into one
    pass over ``G`` (and prunes to a selection network when only some order statistics
    are used); ``jnp.sort`` along the client axis is several times slower than numpy on
    CPU. Exact: it only moves values (a NaN is moved, not spread; the server drops
    non-finite rows before a rule sees them).

    Rows are kept ``[1, d]`` (``G[i:i+1]``) rather than ``[d]``: on XLA's CPU backend a
    reshape between the network and a consumer that reads an order statistic more than
    once makes the fusion pass split the network into dozens of fusions that each
    recompute it.

    Args:
      G: ``[n, d]`` matrix.
      valid: optional ``bool[n]``; rows outside it are pushed to ``+inf`` (they sort
        last, after the ``Σ valid`` values that count) ...
      below: optional ``bool[n]``: ... or to ``−inf`` where ``below`` is True (they sort
        first; pushing as many rows each way keeps the median of the valid values at
        the static ranks ``(n − 1) // 2`` and ``n // 2``).
      consumer_ops: estimated operations of what consumes ``S`` in the same fused loop
        (see ``_SELECT_BUDGET``; ``sorted_sum``).
    """
    G = written(G)
    n = G.shape[0]
    fill = None if valid is None else replaced_rows(n, valid, below)[1]
    if n > _NETWORK_MAX_N:
        S = jnp.sort(G if fill is None else jnp.where(valid[:, None], G, fill[:, None]), axis=0)
        return [S[i : i + 1] for i in range(n)]
    rows = [G[i : i + 1] for i in range(n)]
    if fill is not None:
        rows = [jnp.where(valid[i], r, fill[i]) for i, r in enumerate(rows)]
    pairs = sorting_network(n)
    loop = network_ops(n, fill is not None) + consumer_ops
    selects = _SELECT_BUDGET - loop  # each compare-and-select adds one operation
    for t, (a, b) in enumerate(pairs):
        x, y = rows[a], rows[b]
        if t < selects:
            lower = x < y
            rows[a], rows[b] = jnp.where(lower, x, y), jnp.where(lower, y, x)
        else:
            rows[a], rows[b] = jnp.minimum(x, y), jnp.maximum(x, y)
    return rows


def sorted_sum(
    G: jax.Array,
    w: ArrayLike,
    valid: jax.Array | None = None,
    *,
    finite: bool = False,
    fused_ops: int = 0,
) -> jax.Array:
    """``Σ_r w_r S_r`` per coordinate, ``S = sorted_rows(G, valid)``, in one fused pass.
    ``G``: ``[n, d]``, or ``MixedRows``. ``-> [d]``.

    A concrete (numpy) ``w`` skips its zero terms at trace time, so XLA keeps only the
    comparators those ranks need; a traced ``w`` selects with ``where`` so that
    ``w_r = 0`` never meets an infinite ``S_r``, unless ``finite`` says ``S`` has none
    (finite rows and no ``valid``): then plain products, which leave room in the fused
    loop for faster comparators (trimmed mean at (100, 100k): 7.5 against 10.6 ms here).
    ``fused_ops``: estimated operations of a producer of ``G``'s rows that XLA fuses into
    the same loop (a pre-aggregator's row map, ``base.compose``), counted in the loop's
    budget (``sorted_rows``). Where that loop would be large, the native kernel sorts
    instead (``sorts_natively``, ``native.sorted_sum``).
    """
    n = G.shape[0]
    static = isinstance(w, np.ndarray)
    ranks = [r for r in range(n) if w[r] != 0] if static else range(n)
    consumer_ops = (2 if static else 4 if finite else 8) * len(ranks) + fused_ops
    if sorts_natively(G, network_ops(n, valid is not None) + consumer_ops, fused_ops):
        X, M = _unmixed(G)
        rows = (jnp.asarray(w, G.dtype), M, *replaced_rows(n, valid))
        return _native(_native_sorted_sum, X, (), rows, summed=False)[0]
    S = sorted_rows(G, valid, consumer_ops=consumer_ops)
    if static:
        terms = [float(w[r]) * S[r] for r in ranks]
    else:
        w = jnp.asarray(w, G.dtype)
        terms = [
            w[r] * s if finite else jnp.where(w[r] != 0, w[r] * s, 0.0) for r, s in enumerate(S)
        ]
    out = terms[0]
    for t in terms[1:]:
        out = out + t
    return out[0]


def replaced_rows(n: int, valid=None, below=None) -> tuple[jax.Array | None, jax.Array | None]:
    """``sorted_rows``' replacement of the rows outside ``valid`` for the native kernels:
    ``(valid, fill)`` as ``f32[n]``, the fill ``−inf`` where ``below`` else ``+inf``, or
    ``(None, None)`` without ``valid``."""
    if valid is None:
        return None, None
    fill = jnp.full(n, jnp.inf) if below is None else jnp.where(below, -jnp.inf, jnp.inf)
    return valid.astype(jnp.float32), fill


def native_closest_mean(
    G: jax.Array, k: ArrayLike, *, starts: int, valid=None, below=None
) -> jax.Array:
    """``aggregators.coordinate.closest_mean`` on the native kernel
    (``native.closest_mean``), on all cores or on each CPU device's own columns: per
    coordinate, the mean of the ``k`` values (traced) closest to the median, the window's
    start counted over ``starts`` positions, rows replaced as in ``sorted_rows``.
    ``-> [d]``."""
    X, M = _unmixed(G)
    rows = (jnp.asarray(k, jnp.float32)[None], M, *replaced_rows(G.shape[0], valid, below))
    return _native(
        functools.partial(_native_closest_mean, starts=starts), X, (), rows, summed=False
    )[0]


def shift_ranks(
    S: list[jax.Array], k: ArrayLike, kmin: int, count: int, step: int = 1
) -> list[jax.Array]:
    """``R_s = S_{s+k}`` for ``s < count`` (``+inf`` past ``S_{n-1}``), ``k`` traced.

    A barrel shifter: ``k − kmin`` (clamped to ``[0, n − kmin]``, a multiple of ``step``)
    is applied one bit at a time as a static shift under a scalar ``where``, about
    ``count · log₂((n − kmin)/step + 1)`` selects per coordinate (``shift_sizes``)
    instead of a gather (which XLA's CPU backend does badly) or ``count · (n − kmin)``.
    """
    n = len(S)
    inf = jnp.full_like(S[0], jnp.inf)
    units = jnp.clip(k - kmin, 0, n - kmin) // step
    shifts = _shifts(n, kmin, step)
    A = [S[j] if j < n else inf for j in range(kmin, kmin + count + sum(shifts))]
    for b, size in zip(shifts, shift_sizes(n, kmin, count, step), strict=True):
        on = (units & (b // step)) != 0
        A = [jnp.where(on, A[i + b], A[i]) for i in range(size)]
    return A


def _shifts(n: int, kmin: int, step: int) -> list[int]:
    return [step << b for b in range(((n - kmin) // step).bit_length())]


def shift_sizes(n: int, kmin: int, count: int, step: int = 1) -> list[int]:
    """Entries ``shift_ranks`` keeps after each of its stages (its cost in selects)."""
    shifts = _shifts(n, kmin, step)
    return [count + sum(shifts[i + 1 :]) for i in range(len(shifts))]


def two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Knuth's TwoSum: ``(s, e)`` with ``s = fl(a + b)`` and ``a + b = s + e`` exactly.

    Comparing ``(s, e)`` pairs lexicographically (``sum_less``) compares exact sums of
    two floats (no overflow assumed), which a rounded ``a + b < c + d`` does not.
    """
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def sum_less(x: tuple[jax.Array, jax.Array], y: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Exact ``a + b < c + d`` from ``x = two_sum(a, b)``, ``y = two_sum(c, d)``."""
    return (x[0] < y[0]) | ((x[0] == y[0]) & (x[1] < y[1]))


def median_weights(k: ArrayLike, n: int) -> jax.Array:
    """Rank weights of the median of the ``k`` smallest of ``n`` values (``k`` traced)."""
    r = jnp.arange(n)
    return 0.5 * ((r == (k - 1) // 2).astype(jnp.float32) + (r == k // 2))


def masked_median(G: jax.Array, mask: jax.Array) -> jax.Array:
    """Coordinate-wise median of the masked rows (mean of the two middle values).

    Unmasked rows are pushed to +inf, so the ``k = Σ mask`` smallest values per
    coordinate are the masked ones; ``k`` may be traced.
    """
    return sorted_sum(G, median_weights(mask.sum(), G.shape[0]), mask)


def gram(G: jax.Array, center: jax.Array | None = None, *, sq_norms: bool = False):
    """Inner products ``(G − c)(G − c)ᵀ`` (``c = 0`` by default). ``[n, d] -> [n, n]``;
    with ``sq_norms``, also the rows' squared norms ``‖g_i‖²`` (``row_sq_norms``).

    On CPU, for float32, by the native kernel (``fedjax_byz.native``: register tiles on
    every core, 2.5x faster than XLA's dot here), on each device's own columns where
    they are split over CPU devices. Otherwise accumulated over column blocks
    (``scan_columns``): each block is centred and multiplied while it is in cache; XLA's
    CPU dot for one long contraction was 5x slower than that here. Other backends use
    one matmul.
    """
    if native.available(G.dtype):
        K, sq, _ = _native(_native_gram, G, (center, None))
    else:
        n, d = G.shape
        c = jnp.zeros(d, G.dtype) if center is None else center

        def fn(B, vs, K):
            return (), K + block_gram(B - vs[0][None, :])

        K = scan_columns(fn, G, (c,), jnp.zeros((n, n), G.dtype))[1]
        sq = row_sq_norms(G) if sq_norms else None
    return (K, sq) if sq_norms else K


def centred_gram(G: jax.Array, weights: ArrayLike | None = None, *, sq_norms: bool = False):
    """``(G − ḡ)(G − ḡ)ᵀ``, the Gram matrix of the rows centred on their mean ``ḡ``, or on
    their weighted mean ``ḡ = Σ_i w_i g_i`` given ``weights [n]``. ``[n, d] -> [n, n]``;
    with ``sq_norms``, also the rows' uncentred squared norms ``‖g_i‖²`` (``[n]``, in the
    accumulation dtype of ``row_sq_norms``).

    Distances and any combination ``Σ_i α_i g_i`` with ``Σ α_i = 1`` are unchanged by the
    centring, which keeps float32 Gram entries small when rows share a large component.
    The native kernel computes ``ḡ`` and the norms block by block as it goes (no pass of
    their own).
    """
    n = G.shape[0]
    weights = jnp.full(n, 1.0 / n, G.dtype) if weights is None else jnp.asarray(weights, G.dtype)
    if not native.available(G.dtype):
        return gram(G, weighted_sum(weights, G), sq_norms=sq_norms)
    K, sq, _ = _native(_native_gram, G, (None, None), weights)
    return (K, sq) if sq_norms else K


def centred_products(G: jax.Array, center: jax.Array, v: jax.Array, *, gram_matrix: bool = True):
    """For ``x_i = g_i − c``: the projections ``⟨x_i, v⟩`` and either the Gram matrix
    ``X Xᵀ`` (``gram_matrix``) or the squared norms ``‖x_i‖²``, in one pass over ``G``.
    ``[n, d], [d], [d] -> ([n], [n, n] | [n])``.

    On CPU, for float32, by the native kernels (the Gram kernel or the row pass, each with
    the projections on the side); otherwise accumulated over column blocks
    (``scan_columns``), ``block_gram`` or ``row_sums`` adding each block's share.
    """
    if native.available(G.dtype):
        if gram_matrix:
            K, _, xv = _native(_native_gram, G, (center, v))
            return xv, K
        xx, xv = _native(_native_rows, G, (center, v))
        return xv, xx

    def fn(B, vs, carry):
        X = B - vs[0][None, :]
        xv, second = carry
        xv = xv + jnp.matmul(X, vs[1], precision=_HI)
        return (), (xv, second + (block_gram(X) if gram_matrix else row_sums(X * X)))

    n = G.shape[0]
    init = jnp.zeros(n, G.dtype), jnp.zeros((n, n) if gram_matrix else n, G.dtype)
    return scan_columns(fn, G, (center, v), init, wide=not gram_matrix)[1]


def row_sq_norms(G: jax.Array) -> jax.Array:
    """``‖g_i‖²`` for every row, accumulated in at least float32. ``[n, d] -> [n]``.

    One pass: on CPU, for float32, the native row pass on every core; otherwise a
    row-batched dot product, which ran at the speed of the ``G @ 1`` row sums here and
    2-4x faster than a column-blocked ``scan_columns`` pass (25 x 500k: 2.2 ms against
    9.8 ms; 10 x 2M: 4.2 against 8.5 ms).
    """
    if native.available(G.dtype):
        return _native(_native_rows, G, (None, None))[0]
    acc = jnp.promote_types(G.dtype, jnp.float32)
    return jnp.einsum("nd,nd->n", G, G, precision=_HI, preferred_element_type=acc)


# The native kernels as ``_native`` kernels: ``(G, columns, rows, *, threads)``.
def _native_gram(G, columns, weights, *, threads):
    center, project = columns
    return native.gram(G, center, weights, project, threads=threads)


def _native_rows(G, columns, rows, *, threads):
    center, project = columns
    return native.row_sq_dists(G, center, project, threads=threads)


def _native_moments(G, columns, weights, *, threads):
    a, b = weights
    return native.moments(G, a, b, threads=threads)


def _native_moment_products(G, columns, weights, *, direction, gram, threads):
    (reference,), (a, b) = columns, weights
    f, sign, scale = direction
    return native.moment_products(
        G, a, b, reference, factor=f, sign=sign, scale=scale, gram=gram, threads=threads
    )


def _native_sorted_sum(G, columns, rows, *, threads):
    w, mix, valid, fill = rows
    return (native.sorted_sum(G, w, valid, fill, mix=mix, threads=threads),)


def _native_closest_mean(G, columns, rows, *, starts, threads):
    k, mix, valid, fill = rows
    return (native.closest_mean(G, k, valid, fill, mix=mix, starts=starts, threads=threads),)


def _native(kernel, G: jax.Array, columns=(), rows=None, *, summed: bool | tuple = True):
    """``kernel(G, columns, rows, threads=...)`` on all cores, or on each CPU device's own
    columns (``sim.sharding.column_devices``). ``columns``: ``[d]`` vectors (or None) split
    with the columns; ``rows``: vectors kept whole on every device, or None. Its results
    are sums over the columns of ``G`` (``summed``: added up over the devices), or
    ``[d]`` vectors (assembled from the devices' columns); a tuple says which, result by
    result."""
    from fedjax_byz.sim.sharding import CLIENTS, column_devices, cpu_cores  # sim imports ops

    mesh = column_devices(G.shape[1])
    if mesh is None:
        return kernel(G, columns, rows, threads=cpu_cores())
    threads = max(1, cpu_cores() // mesh.shape[CLIENTS])
    P = jax.sharding.PartitionSpec
    out = jax.eval_shape(lambda: kernel(G, columns, rows, threads=1))
    flags = summed if isinstance(summed, tuple) else (summed,) * len(out)

    def local(G, columns, rows):
        out = kernel(G, columns, rows, threads=threads)
        return tuple(jax.lax.psum(o, CLIENTS) if s else o for o, s in zip(out, flags, strict=True))

    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(None, CLIENTS), P(CLIENTS), P()),
        out_specs=tuple(P() if s else P(CLIENTS) for s in flags),
        check_vma=False,
    )(G, columns, rows)


# XLA's CPU dot (Eigen, built for 8-float AVX registers) multiplies rows in panels of 24
# and runs any remainder on a slower path, and a dot of a few rows is slower still; XLA's
# own matrix-vector kernel runs on both cores. Measured here per 2048-column block of
# the Gram product: a [25, c] block at 36 GFLOP/s as one dot, 51 as a [24, c] dot plus
# one row; n = 50 as 48 + 2 rows in two dots 133 ms, in one dot 126, as 48 rows plus two
# row products 110 (d = 1M); n = 10 in one dot 28 ms, as ten row products 14 (d = 2M).
_PANEL_ROWS = 24


def block_gram(X: jax.Array) -> jax.Array:
    """``X Xᵀ`` for one column block ``X [n, c]`` (a kernel for ``scan_columns``).

    On CPU, with ``X = [H; T]`` split after the last whole panel of 24 rows, it is
    assembled from ``H Hᵀ`` (one dot) and ``t Xᵀ`` for each row ``t`` of ``T`` (a
    matrix-vector product each). ``-> [n, n]``.
    """
    n = X.shape[0]
    h = n - n % _PANEL_ROWS
    if h == n or jax.default_backend() != "cpu":
        return jnp.matmul(X, X.T, precision=_HI)
    TX = jnp.stack([jnp.matmul(t, X.T, precision=_HI) for t in X[h:]])  # [n - h, n]
    if h == 0:
        return TX
    HH = jnp.matmul(X[:h], X[:h].T, precision=_HI)  # [h, h]
    return jnp.concatenate([jnp.concatenate([HH, TX[:, :h].T], axis=1), TX], axis=0)


def row_sq_dists(G: jax.Array, center: jax.Array) -> jax.Array:
    """``‖g_i − c‖²`` for every row. ``[n, d], [d] -> [n]``.

    On CPU, for float32, the native row pass on every core (``fedjax_byz.native``).
    Otherwise accumulated over column blocks (``scan_columns``): on CPU the loop boundary
    makes XLA compute ``c`` once. Written as one reduction, a fused producer of ``c`` (the
    sorting network of a median) was fused into the row reduction and recomputed once per
    row, 10x slower here at (25, 500k). Each block's squares are summed by ``row_sums``
    (25 x 500k: 5.4 against 8.0 ms with the row reduction, 10 x 2M: 9.5 against 12.2 ms).
    """
    if native.available(G.dtype):
        return _native(_native_rows, G, (center, None))[0]

    def fn(B, vs, r):
        X = B - vs[0][None, :]
        return (), r + row_sums(X * X)

    return scan_columns(fn, G, (center,), jnp.zeros(G.shape[0], G.dtype), wide=True)[1]


def sq_dists_from_gram(K: jax.Array) -> jax.Array:
    """Squared distances ``‖g_i − g_j‖²`` from a Gram matrix, clipped at 0, exact 0 diagonal."""
    sq = jnp.diagonal(K)
    D = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * K, 0.0)
    return jnp.where(jnp.eye(K.shape[0], dtype=bool), 0.0, D)


def pairwise_sq_dists(G: jax.Array) -> jax.Array:
    """``‖g_i − g_j‖²`` for all pairs via one Gram product. ``[n, d] -> [n, n]``.

    Rows are centred on their mean first, which leaves distances unchanged and keeps the
    Gram formulation accurate when updates share a large common component.
    """
    return sq_dists_from_gram(centred_gram(G))


# Up to this many entries ``ranks`` counts instead of sorting.
_COUNT_MAX_N = 256


def ranks(scores: jax.Array) -> jax.Array:
    """Rank of each entry in ascending order, ties broken by index and NaN last: the
    order of ``jnp.argsort(scores, stable=True)``. ``[n] -> int32[n]``.

    Up to ``_COUNT_MAX_N`` entries, entry ``i``'s rank is the count of entries that come
    before it, ``n²`` comparisons in one fused loop (a vmapped batch of rows too): the
    rows of a 100 x 100 matrix took 1.1 ms by XLA's CPU sort, 0.46 ms counted (Intel Xeon,
    2 cores). Past that by ``jnp.argsort``.
    """
    n = scores.shape[0]
    if n > _COUNT_MAX_N:
        order = jnp.argsort(scores, stable=True)
        return jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    x, y = scores[:, None], scores[None, :]  # [n, 1] entry i, [1, n] entry j
    nan_x, nan_y = jnp.isnan(x), jnp.isnan(y)
    less = (y < x) | (nan_x & ~nan_y)
    tie = (y == x) | (nan_x & nan_y)
    index = jnp.arange(n)
    before = less | (tie & (index[None, :] < index[:, None]))  # [n, n]: j comes before i
    return before.sum(axis=1, dtype=jnp.int32)


def smallest_mask(scores: jax.Array, k: ArrayLike) -> jax.Array:
    """``bool[n]`` marking the ``k`` smallest scores; ``k`` may be traced."""
    return ranks(scores) < k


def sorted_row_sums(X: jax.Array, w: jax.Array) -> jax.Array:
    """``Σ_r w_r S_ir`` for each row, ``S_i`` row ``i`` of ``X`` sorted ascending (a
    finite ``X`` where ``w_r != 0``); ``w`` may be traced. ``[n, m], [m] -> [n]``.

    With the native kernels, the sorting kernel on ``Xᵀ``'s columns, always (at n = 100:
    0.04 ms against 0.3 ms counting ranks): XLA's own network, where ``sorted_sum``
    would choose it, is fused into every elementwise consumer of the sums and computed
    again for each element (Multi-Krum's selection of rows by score: 4 ms). Without
    them, each entry's rank among its row (``ranks``) picks its weight.
    """
    if native.available(X.dtype):
        rows = (jnp.asarray(w, X.dtype), None, None, None)
        return _native(_native_sorted_sum, X.T, (), rows, summed=False)[0]
    r = jax.vmap(ranks)(X)  # [n, m]
    return jnp.where(w[r] != 0, w[r] * X, 0.0).sum(axis=1)


def smallest_in_rows(X: jax.Array, k: ArrayLike) -> jax.Array:
    """``bool[n, m]`` marking the ``k`` smallest entries of each row of a finite ``X``
    (``1 <= k <= m``, may be traced), ties to the lowest index: ``smallest_mask`` on
    every row, from each row's ``k``-th smallest entry (``sorted_row_sums``) in O(n m)
    more (NNM's neighbours at n = 100: 0.36 -> 0.07 ms here)."""
    rank = (jnp.arange(X.shape[1]) == k - 1).astype(X.dtype)
    kth = sorted_row_sums(X, rank)[:, None]  # [n, 1]
    less, tie = X < kth, X == kth
    room = k - less.sum(axis=1, keepdims=True)  # the ties to take, by index
    return less | (tie & (jnp.cumsum(tie, axis=1) <= room))


def eigh(A: jax.Array, vectors: bool = True):
    """``jnp.linalg.eigh(A)`` (or ``eigvalsh`` without ``vectors``) for symmetric
    ``A [..., m, m]``, one matrix per LAPACK call on CPU.

    jaxlib 0.10's CPU LAPACK kernels split a large enough batch of matrices over XLA's
    pool of CPU threads and block until it is done; inside a loop or a ``cond`` (a round,
    the server's guard) on two or more CPU devices, every pool thread can be such a
    blocked call and the program deadlocks (reproduced here: SMEA's 1,024 eigenvalue
    problems at n = 10 on the 2 cores as devices, and 32 per device at m = 50 in a
    loop). So on CPU the matrices are decomposed one after another (``lax.map``), also
    under ``vmap`` (a sweep over cells batches the rule's calls): the ``custom_vmap``
    rule maps instead of batching. Accelerators take the whole batch in one call.
    """
    if jax.default_backend() != "cpu":
        return jnp.linalg.eigh(A) if vectors else jnp.linalg.eigvalsh(A)
    fn = _eigh_one if vectors else _eigvalsh_one
    for _ in A.shape[:-2]:  # each batch axis a vmap, which the rule turns into a map
        fn = jax.vmap(fn)
    return fn(A)


def _one_at_a_time(decompose):
    """``decompose`` of one matrix; under ``vmap``, a ``lax.map`` over the batch."""
    fn = jax.custom_batching.custom_vmap(decompose)

    @fn.def_vmap
    def rule(axis_size, in_batched, A):  # A, the only argument, is batched
        out = jax.lax.map(fn, A)
        return out, jax.tree.map(lambda _: True, out)

    return fn


_eigh_one = _one_at_a_time(lambda A: jnp.linalg.eigh(A))
_eigvalsh_one = _one_at_a_time(lambda A: jnp.linalg.eigvalsh(A))


def row_norms(G: jax.Array) -> jax.Array:
    """Euclidean norm of every row (``row_sq_norms``). ``[n, d] -> [n]``."""
    return jnp.sqrt(row_sq_norms(G)).astype(G.dtype)


def to_matrix(updates):
    """Flattens client updates to ``f32[n, d]``.

    Args:
      updates: an ``[n, d]`` array, or a pytree whose leaves share a leading axis ``n``.

    Returns:
      ``(G, unravel)`` where ``unravel`` maps a ``[d]`` or ``[n, d]`` array back to the
      input's structure (without or with the client axis).
    """
    leaves = jax.tree.leaves(updates)
    if len(leaves) == 1 and not isinstance(updates, dict | list | tuple):
        G = updates if isinstance(updates, jax.Array) else jnp.asarray(updates)
        if G.ndim != 2:
            raise ValueError(f"updates: expected an [n, d] matrix, got shape {G.shape}")
        return G, lambda x: x
    row0 = jax.tree.map(lambda a: a[0], updates)
    _, unravel_one = jax.flatten_util.ravel_pytree(row0)
    G = jax.vmap(lambda u: jax.flatten_util.ravel_pytree(u)[0])(updates)

    def unravel(x):
        return unravel_one(x) if x.ndim == 1 else jax.vmap(unravel_one)(x)

    return G, unravel


# Column-blocked passes. XLA's CPU backend allocates every [n, d] temporary afresh on each
# call, and first-touching those pages costs more than the arithmetic: computing μ and σ as
# ``w @ G`` and ``w @ (G − μ)²`` took 23 ms at n=25, d=500k here, the same work done block
# by block in cache 6 ms. Passes run over blocks of 2048 columns on CPU (fewer past
# n = 256, so that a block stays within 2 MiB): Gram products and matrix-vector products
# on a block ran at XLA's best speed there (n = 25, 50, 100; 512 to 8192 columns tried).
# ``wide`` blocks of about 2^20 elements serve passes of elementwise work and row sums
# (moments, row distances): each loop step costs ~13 µs here, and XLA runs an elementwise
# fusion that large on both cores (μ and σ at 25 x 500k: 8.7 ms in blocks of 2048 columns,
# 5.5 in blocks of 32768; row distances 5.8 and 4.2; likewise at n = 50, 100, 200 with
# 16384, 8192, 4096 columns), while passes with a product by a vector or a Gram product
# per block ran up to 2x slower in them.
_BLOCK_COLS = 2048
_BLOCK_ELEMS = 2**19
_WIDE_ELEMS = 2**20


def column_block(n: int, d: int, *, wide: bool = False) -> int:
    """Columns per block of ``scan_columns`` for an ``[n, d]`` matrix (``d`` off CPU)."""
    if jax.default_backend() != "cpu":
        return d
    if wide:
        return min(d, max(256, 1 << (_WIDE_ELEMS // n).bit_length() - 1))
    return min(d, _BLOCK_COLS, max(256, 1 << (_BLOCK_ELEMS // n).bit_length() - 1))


def scan_columns(fn, G: jax.Array, vectors=(), init=(), *, wide: bool = False):
    """One pass over the columns of ``G`` in blocks, folding ``fn`` over them.

    ``fn(B, vs, carry) -> (outs, carry)`` sees a block ``B [n, c]`` of columns, the matching
    slices ``vs`` of the ``[d]`` vectors in ``vectors`` and the running ``carry``, a sum
    over blocks (``carry + this block's share``, from ``init``; e.g. a Gram matrix being
    accumulated); it returns a tuple ``outs`` of per-column results (each ``[c]``) and the
    new carry. Blocks are visited in order (a ``fori_loop`` plus one ragged tail), so
    everything ``fn`` creates stays in cache. The loop also slices the tail, for use
    after it: sliced outside, XLA fused the producers of ``G`` and of the vectors into
    ``fn``'s elementwise work on the tail, a median's sorting network then ran once per
    row (AKSEL's distances to the median at 100 x 100k: 22 ms against 13) and the
    bucketing's row gathers were materialised apart (its Gram matrix: 30 against 13 ms).
    Blocks are sized by ``column_block`` (``wide`` for elementwise work and row sums);
    on accelerators ``fn`` runs once on the whole matrix. Where ``G``'s
    columns are split over CPU devices (``sim.sharding.column_devices``), each device
    scans its own columns and the carries are summed across them.

    Returns:
      ``(outs, carry)``: the per-column results assembled to ``[d]`` each, and the final
      carry.
    """
    from fedjax_byz.sim.sharding import CLIENTS, column_devices  # sim imports ops

    mesh = column_devices(G.shape[1])
    if mesh is None:
        return _scan_blocks(fn, G, tuple(vectors), init, wide)
    zero = jax.tree.map(jnp.zeros_like, init)

    def local(G, vectors):
        outs, carry = _scan_blocks(fn, G, vectors, zero, wide)
        return outs, jax.lax.psum(carry, CLIENTS)

    P = jax.sharding.PartitionSpec
    outs, carry = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(None, CLIENTS), P(CLIENTS)),
        out_specs=(P(CLIENTS), P()),
        check_vma=False,
    )(G, tuple(vectors))
    return outs, jax.tree.map(jnp.add, init, carry)


def window_sum(fn, G: jax.Array, start: jax.Array, size: int):
    """A sum over the columns ``[start, start + size)`` of ``G``, ``start`` traced.

    ``fn(B, w)`` sees a block ``B [n, c]`` of columns and ``w: [c]``, 1 on the block's
    columns inside the window and 0 elsewhere, and returns the block's share of the sum
    (e.g. ``B @ w``); the shares are added. Blocks of ``column_block`` columns, as in
    ``scan_columns``: the window sliced as one array is a fresh ``[n, size]`` buffer
    (SignGuard's sign counts on 10% of 50 x 1M: 37 ms sliced, 3.8 ms blocked here). Where
    ``G``'s columns are split over CPU devices (``sim.sharding.column_devices``), each
    device sums the part of the window it holds and the sums are added across devices
    (XLA gathered a sliced window to one device: 97 ms on 2 devices against 6.7).
    """
    from fedjax_byz.sim.sharding import CLIENTS, column_devices  # sim imports ops

    mesh = column_devices(G.shape[1])
    if mesh is None:
        return _window_blocks(fn, G, start, size)

    def local(G, start):
        offset = jax.lax.axis_index(CLIENTS) * G.shape[1]
        return jax.lax.psum(_window_blocks(fn, G, start - offset, size), CLIENTS)

    P = jax.sharding.PartitionSpec
    return jax.shard_map(
        local, mesh=mesh, in_specs=(P(None, CLIENTS), P()), out_specs=P(), check_vma=False
    )(G, start)


def _window_blocks(fn, G: jax.Array, start: jax.Array, size: int):
    """``window_sum`` on the columns at hand (the window may start or end outside them)."""
    n, d = G.shape
    c = min(column_block(n, d), size, d)
    lo, hi = jnp.clip(start, 0, d), jnp.clip(start + size, 0, d)

    def body(b, total):
        first = lo + b * c  # the block's first column in the window; it may end past hi
        at = jnp.minimum(first, d - c)
        cols = at + jnp.arange(c)
        w = ((cols >= first) & (cols < hi)).astype(G.dtype)
        share = fn(jax.lax.dynamic_slice(G, (0, at), (n, c)), w)
        return jax.tree.map(jnp.add, total, share)

    spec = jax.eval_shape(fn, jax.ShapeDtypeStruct((n, c), G.dtype), jnp.zeros(c, G.dtype))
    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), spec)
    return jax.lax.fori_loop(0, (hi - lo + c - 1) // c, body, zero)


def _scan_blocks(fn, G: jax.Array, vectors: tuple, init, wide: bool):
    """``scan_columns`` on the columns at hand."""
    n, d = G.shape
    c = column_block(n, d, wide=wide)
    nb = d // c
    if nb <= 1 and c == d:
        return fn(G, vectors, init)

    tail = d - nb * c

    def run(B, vs, start, outs, carry):
        o, carry = fn(B, vs, carry)
        outs = tuple(
            jax.lax.dynamic_update_slice(a, b, (start,)) for a, b in zip(outs, o, strict=True)
        )
        return outs, carry

    def sliced(start, size):
        return tuple(jax.lax.dynamic_slice(v, (start,), (size,)) for v in vectors)

    def body(b, st):  # also slices the tail, for after the loop: see the docstring
        outs, carry, last = st
        B = jax.lax.dynamic_slice(G, (0, b * c), (n, c))
        outs, carry = run(B, sliced(b * c, c), b * c, outs, carry)
        if tail:
            B_tail = jax.lax.cond(
                b == nb - 1,
                lambda: jax.lax.dynamic_slice(G, (0, nb * c), (n, tail)),
                lambda: last[0],
            )
            # the vectors' tail is sliced at every step (a few floats): under a cond, a
            # vector that XLA sinks into the loop (a broadcast) was rebuilt at every step
            last = (B_tail, sliced(jnp.minimum((b + 1) * c, d - tail), tail))
        return outs, carry, last

    block_spec = jax.ShapeDtypeStruct((n, c), G.dtype)
    vec_specs = tuple(jax.ShapeDtypeStruct((c,), v.dtype) for v in vectors)
    out_specs, _ = jax.eval_shape(fn, block_spec, vec_specs, init)
    outs = tuple(jnp.zeros((d,), s.dtype) for s in out_specs)
    last = (jnp.zeros((n, tail), G.dtype), sliced(0, tail))
    outs, carry, last = jax.lax.fori_loop(0, nb, body, (outs, init, last))
    if tail:
        outs, carry = run(*last, nb * c, outs, carry)
    return outs, carry


def _moment_weights(mask: jax.Array, dtype, ddof: int) -> tuple[jax.Array, jax.Array]:
    """The row weights of the masked mean and variance: ``mask/k``, ``mask/(k − ddof)``."""
    w = mask.astype(dtype)
    k = w.sum()
    return w / jnp.maximum(k, 1.0), w / jnp.maximum(k - ddof, 1.0)


def masked_mean_std(G: jax.Array, mask: jax.Array, ddof: int = 1) -> tuple[jax.Array, jax.Array]:
    """Coordinate-wise mean and standard deviation of the masked rows in one blocked pass.

    Same values as ``masked_mean`` and ``masked_std`` (up to rounding), without the
    ``[n, d]`` temporary ``(G − μ)²``: on CPU, for float32, the native kernel on every
    core; otherwise ``μ = aᵀB`` and ``σ² = bᵀ(B − μ)²`` block by block (``scan_columns``).
    ``-> [d], [d]``.
    """
    a, b = _moment_weights(mask, G.dtype, ddof)
    if native.available(G.dtype):
        mu, var = _native(_native_moments, G, (), (a, b), summed=False)
        return mu, jnp.sqrt(var)

    def fn(B, vs, carry):
        mu = weighted_sum(a, B)
        return (mu, jnp.sqrt(weighted_sum(b, jnp.square(B - mu[None, :])))), carry

    return scan_columns(fn, G, wide=True)[0]


class Direction(NamedTuple):
    """A coordinate-wise direction made from the moments of some rows,

        u = scale · F ⊙ sign(μ − r),   F = 1 (``"one"``), μ (``"mean"``), σ (``"std"``)
                                          or μ − r (``"offset"``),

    the sign only where ``sign`` (``r`` a reference vector, zero without one): the search
    attacks' directions (Min-Max's −σ, −μ, −sign(μ); STRIKE's g_med − ḡ and
    sign(ḡ_S − ḡ) ⊙ σ_S)."""

    factor: str = "std"
    sign: bool = False
    scale: float = 1.0

    def __call__(self, mu: jax.Array, sigma: jax.Array, reference: jax.Array | None = None):
        t = mu if reference is None else mu - reference
        F = {"one": jnp.ones_like(mu), "mean": mu, "std": sigma, "offset": t}[self.factor]
        return self.scale * (F * jnp.sign(t) if self.sign else F)


def moment_products(
    G: jax.Array,
    mask: jax.Array,
    direction: Direction,
    reference: jax.Array | None = None,
    *,
    ddof: int = 1,
    gram_matrix: bool = True,
):
    """``masked_mean_std`` and then ``centred_products`` on the mean and a direction: ``μ``,
    ``u = direction(μ, σ, reference)``, and for ``x_i = g_i − μ`` the projections
    ``⟨x_i, u⟩`` with ``X Xᵀ`` between the masked rows (``gram_matrix``; zero where either
    row is not masked) or ``‖x_i‖²``. ``-> ([d], [d], [n], [n, n] | [n])``.

    On CPU, for float32, one native kernel reads ``G`` once: each block of columns gets
    its moments, its direction and its share of the products while it is in cache (the
    two calls read it twice). Otherwise the two calls.
    """
    if native.available(G.dtype):
        kernel = functools.partial(_native_moment_products, direction=direction, gram=gram_matrix)
        weights = _moment_weights(mask, G.dtype, ddof)
        mu, u, second, xu = _native(
            kernel, G, (reference,), weights, summed=(False, False, True, True)
        )
        return mu, u, xu, second
    mu, sigma = masked_mean_std(G, mask, ddof)
    u = direction(mu, sigma, reference)
    xu, second = centred_products(G, mu, u, gram_matrix=gram_matrix)
    if gram_matrix:
        second = jnp.where(mask[:, None] & mask[None, :], second, 0.0)
    return mu, u, xu, second
