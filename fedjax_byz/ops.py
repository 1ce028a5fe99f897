"""Numerical kernels on the update matrix ``G: f32[n, d]`` shared by attacks and rules.

Conventions: rows are clients, ``mask: bool[n]`` selects rows, counts such as ``k`` may be
traced. Reductions over the client axis are written as matrix products (``w @ G``): on
XLA's CPU backend ``jnp.sum(G, 0)`` reads memory ~30x slower than the equivalent product,
and on a GPU the product is just as good.
"""

from __future__ import annotations

import jax
import jax.flatten_util
import jax.numpy as jnp
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


def sort_rows(G: jax.Array) -> jax.Array:
    """Sorts every coordinate over the client axis. ``[n, d] -> [n, d]`` ascending."""
    return jnp.sort(G, axis=0)


def masked_median(G: jax.Array, mask: jax.Array) -> jax.Array:
    """Coordinate-wise median of the masked rows (mean of the two middle values).

    Unmasked rows are pushed to +inf, so the ``k = Σ mask`` smallest values per
    coordinate are the masked ones; ``k`` may be traced.
    """
    k = mask.sum()
    S = sort_rows(jnp.where(mask[:, None], G, jnp.inf))
    lo = jnp.take(S, (k - 1) // 2, axis=0)
    hi = jnp.take(S, k // 2, axis=0)
    return 0.5 * (lo + hi)


def gram(G: jax.Array) -> jax.Array:
    """Inner products ``G Gᵀ``. ``[n, d] -> [n, n]``."""
    return jnp.matmul(G, G.T, precision=_HI)


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
    Gc = G - weighted_sum(jnp.full(G.shape[0], 1.0 / G.shape[0]), G)[None, :]
    return sq_dists_from_gram(gram(Gc))


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
