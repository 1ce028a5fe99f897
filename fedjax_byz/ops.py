"""Numerical kernels on the update matrix ``G: f32[n, d]`` shared by attacks and rules.

Conventions: rows are clients, ``mask: bool[n]`` selects rows, counts such as ``k`` may be
traced. Reductions over the client axis are written as matrix products (``w @ G``): on
XLA's CPU backend ``jnp.sum(G, 0)`` reads memory ~30x slower than the equivalent product,
and on a GPU the product is just as good.
"""

from __future__ import annotations

import functools

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

_HI = jax.lax.Precision.HIGHEST


def weighted_sum(w: ArrayLike, G: jax.Array) -> jax.Array:
    """``Σ_i w_i g_i`` as one matrix-vector product. ``w [n], G [n, d] -> [d]``."""
    return jnp.matmul(jnp.asarray(w, G.dtype), G, precision=_HI)


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


# XLA's CPU fusion stops fusing a comparator network over more than ~40 static slices of
# one operand (it judges the code duplication too high) and falls back to dozens of
# materialised passes; separate row buffers fuse into one loop. Past _NETWORK_MAX_N rows
# the network's compile time grows too large and ``jnp.sort`` is used instead.
_SLICES_FUSE_N = 32
_NETWORK_MAX_N = 128


def _rows(G: jax.Array) -> list[jax.Array]:
    rows = tuple(G[i] for i in range(G.shape[0]))
    if G.shape[0] > _SLICES_FUSE_N:
        rows = jax.lax.optimization_barrier(rows)
    return list(rows)


def sorted_rows(G: jax.Array) -> list[jax.Array]:
    """The order statistics of every coordinate: ``S_0 <= ... <= S_{n-1}``, each ``[d]``.

    For ``n <= 128`` this is a sorting network of elementwise ``min``/``max`` over the
    rows, which XLA fuses into one pass over ``G`` (and prunes to a selection network
    when only some order statistics are used); ``jnp.sort`` along the client axis is
    several times slower than numpy on CPU. Exact: it only moves values.
    """
    n = G.shape[0]
    if n > _NETWORK_MAX_N:
        return list(jnp.sort(G, axis=0))
    rows = _rows(G)
    for a, b in sorting_network(n):
        rows[a], rows[b] = jnp.minimum(rows[a], rows[b]), jnp.maximum(rows[a], rows[b])
    return rows


def sorted_by_key(keys: jax.Array, payload: jax.Array) -> list[jax.Array]:
    """Rows of ``payload`` reordered per coordinate by ascending ``(keys, payload)``.

    ``keys, payload: [n, d]``; returns ``n`` arrays ``[d]``: entry ``r`` is the payload
    with the ``r``-th smallest key in its coordinate, ties broken by the smaller payload.
    """
    n = keys.shape[0]
    if n > _NETWORK_MAX_N:
        order = jnp.lexsort((payload, keys), axis=0)
        return list(jnp.take_along_axis(payload, order, axis=0))
    ks, ps = _rows(keys), _rows(payload)
    for a, b in sorting_network(n):
        swap = (ks[a] > ks[b]) | ((ks[a] == ks[b]) & (ps[a] > ps[b]))
        ks[a], ks[b] = jnp.where(swap, ks[b], ks[a]), jnp.where(swap, ks[a], ks[b])
        ps[a], ps[b] = jnp.where(swap, ps[b], ps[a]), jnp.where(swap, ps[a], ps[b])
    return ps


def rank_sum(S: list[jax.Array], w: ArrayLike) -> jax.Array:
    """``Σ_r w_r S_r`` over order statistics ``S`` (from ``sorted_rows``). ``-> [d]``.

    A concrete (numpy) ``w`` skips its zero terms at trace time, so XLA keeps only the
    comparators those ranks need; a traced ``w`` selects with ``where`` so that
    ``w_r = 0`` never meets an infinite ``S_r``.
    """
    if isinstance(w, np.ndarray):
        terms = [float(wr) * s for wr, s in zip(w, S, strict=True) if wr != 0]
    else:
        w = jnp.asarray(w, S[0].dtype)
        terms = [jnp.where(w[r] != 0, w[r] * s, 0.0) for r, s in enumerate(S)]
    out = terms[0]
    for t in terms[1:]:
        out = out + t
    return out


def sort_rows(G: jax.Array) -> jax.Array:
    """Sorts every coordinate over the client axis. ``[n, d] -> [n, d]`` ascending."""
    return jnp.stack(sorted_rows(G))


def median_weights(k: ArrayLike, n: int) -> jax.Array:
    """Rank weights of the median of the ``k`` smallest of ``n`` values (``k`` traced)."""
    r = jnp.arange(n)
    return 0.5 * ((r == (k - 1) // 2).astype(jnp.float32) + (r == k // 2))


def masked_median(G: jax.Array, mask: jax.Array) -> jax.Array:
    """Coordinate-wise median of the masked rows (mean of the two middle values).

    Unmasked rows are pushed to +inf, so the ``k = Σ mask`` smallest values per
    coordinate are the masked ones; ``k`` may be traced.
    """
    S = sorted_rows(jnp.where(mask[:, None], G, jnp.inf))
    return rank_sum(S, median_weights(mask.sum(), G.shape[0]))


_GRAM_BLOCK = 8192


def gram(G: jax.Array, center: jax.Array | None = None) -> jax.Array:
    """Inner products ``(G − c)(G − c)ᵀ`` (``c = 0`` by default). ``[n, d] -> [n, n]``.

    On CPU the product is accumulated over blocks of 8192 columns (each block centred
    and multiplied while it is in cache): XLA's CPU dot for a long contraction was 5x
    slower than this here. Other backends use one matmul.
    """
    n, d = G.shape
    center = jnp.zeros(d, G.dtype) if center is None else center
    nb = d // _GRAM_BLOCK
    if jax.default_backend() != "cpu" or nb < 2:
        Gc = G - center[None, :]
        return jnp.matmul(Gc, Gc.T, precision=_HI)

    def block(start, size):
        B = jax.lax.dynamic_slice(G, (0, start), (n, size))
        B = B - jax.lax.dynamic_slice(center, (start,), (size,))[None, :]
        return jnp.matmul(B, B.T, precision=_HI)

    K = jax.lax.fori_loop(
        0, nb, lambda b, K: K + block(b * _GRAM_BLOCK, _GRAM_BLOCK), jnp.zeros((n, n), G.dtype)
    )
    rest = d - nb * _GRAM_BLOCK
    return K + block(nb * _GRAM_BLOCK, rest) if rest else K


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


def centred_gram(G: jax.Array) -> jax.Array:
    """``(G − ḡ)(G − ḡ)ᵀ``, the Gram matrix of the rows centred on their mean ``ḡ``.

    Distances and any combination ``Σ_i α_i g_i`` with ``Σ α_i = 1`` are unchanged by the
    centring, which keeps float32 Gram entries small when rows share a large component.
    """
    return gram(G, weighted_sum(jnp.full(G.shape[0], 1.0 / G.shape[0]), G))


def ranks(scores: jax.Array) -> jax.Array:
    """Rank of each entry in ascending order (ties broken by index). ``[n] -> int32[n]``."""
    order = jnp.argsort(scores, stable=True)
    return jnp.zeros(scores.shape, jnp.int32).at[order].set(jnp.arange(scores.shape[0]))


def smallest_mask(scores: jax.Array, k: ArrayLike) -> jax.Array:
    """``bool[n]`` marking the ``k`` smallest scores; ``k`` may be traced."""
    return ranks(scores) < k


def row_norms(G: jax.Array) -> jax.Array:
    """Euclidean norm of every row. ``[n, d] -> [n]``."""
    return jnp.sqrt(jnp.einsum("nd,nd->n", G, G, precision=_HI))


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
        G = jnp.asarray(updates)
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
# by block in cache 6 ms. Passes that build centred rows, squares or Gram matrices
# therefore run over blocks of columns on CPU (about 2^17 elements, half an L2 cache).
_BLOCK_ELEMS = 2**17


def column_block(n: int, d: int) -> int:
    """Columns per block of ``scan_columns`` for an ``[n, d]`` matrix (``d`` off CPU)."""
    if jax.default_backend() != "cpu":
        return d
    return min(d, max(256, 1 << (_BLOCK_ELEMS // n).bit_length() - 1))


def scan_columns(fn, G: jax.Array, vectors=(), init=(), *, block: int | None = None):
    """One pass over the columns of ``G`` in blocks, folding ``fn`` over them.

    ``fn(B, vs, carry) -> (outs, carry)`` sees a block ``B [n, c]`` of columns, the matching
    slices ``vs`` of the ``[d]`` vectors in ``vectors`` and the running ``carry`` (any
    pytree of fixed shape, e.g. a Gram matrix being accumulated); it returns a tuple
    ``outs`` of per-column results (each ``[c]``) and the new carry. Blocks are visited in
    order (a ``fori_loop`` plus one ragged tail), so everything ``fn`` creates stays in
    cache. On accelerators (``column_block``) ``fn`` runs once on the whole matrix.

    Returns:
      ``(outs, carry)``: the per-column results assembled to ``[d]`` each, and the final
      carry.
    """
    n, d = G.shape
    c = column_block(n, d) if block is None else min(block, d)
    nb = d // c
    if nb <= 1 and c == d:
        return fn(G, tuple(vectors), init)

    def run(start, size, outs, carry):
        B = jax.lax.dynamic_slice(G, (0, start), (n, size))
        vs = tuple(jax.lax.dynamic_slice(v, (start,), (size,)) for v in vectors)
        o, carry = fn(B, vs, carry)
        outs = tuple(
            jax.lax.dynamic_update_slice(a, b, (start,)) for a, b in zip(outs, o, strict=True)
        )
        return outs, carry

    block_spec = jax.ShapeDtypeStruct((n, c), G.dtype)
    vec_specs = tuple(jax.ShapeDtypeStruct((c,), v.dtype) for v in vectors)
    out_specs, _ = jax.eval_shape(fn, block_spec, vec_specs, init)
    outs = tuple(jnp.zeros((d,), s.dtype) for s in out_specs)
    outs, carry = jax.lax.fori_loop(0, nb, lambda b, st: run(b * c, c, *st), (outs, init))
    if d > nb * c:
        outs, carry = run(nb * c, d - nb * c, outs, carry)
    return outs, carry


def masked_moments(
    B: jax.Array, mask: jax.Array, ddof: int = 1
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(μ, σ, B − μ)`` over the rows where ``mask``: coordinate-wise mean, standard
    deviation (``ddof=1`` by default) and the centred rows (all rows). ``-> [c], [c], [n, c]``.

    A kernel for one block of ``scan_columns``; ``masked_mean_std`` runs it over a matrix.
    """
    w = mask.astype(B.dtype)
    k = w.sum()
    mu = weighted_sum(w / jnp.maximum(k, 1.0), B)
    X = B - mu[None, :]
    sigma = jnp.sqrt(weighted_sum(w / jnp.maximum(k - ddof, 1.0), X * X))
    return mu, sigma, X


def masked_mean_std(G: jax.Array, mask: jax.Array, ddof: int = 1) -> tuple[jax.Array, jax.Array]:
    """Coordinate-wise mean and standard deviation of the masked rows in one blocked pass.

    Same values as ``masked_mean`` and ``masked_std`` (up to rounding), without the
    ``[n, d]`` temporary ``(G − μ)²``. ``-> [d], [d]``.
    """

    def fn(B, vs, carry):
        mu, sigma, _ = masked_moments(B, mask, ddof)
        return (mu, sigma), carry

    return scan_columns(fn, G)[0]
