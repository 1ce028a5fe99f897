"""SignGuard and its -Sim / -Dist variants (Xu, Huang, Wang & Hu, "SignGuard:
Byzantine-robust federated learning through collaborative malicious gradient
filtering", IEEE ICDCS 2022; Algorithms 1-2 of ``shared/papers/signguard.txt``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from fedjax_byz import ops
from fedjax_byz.aggregators import clustering
from fedjax_byz.aggregators.base import Aggregator
from fedjax_byz.registry import ConfigError


def sign_features(G: jax.Array, key: jax.Array, frac: float) -> jax.Array:
    """Fractions of positive, zero and negative entries of each row on a random block of
    ``⌊frac·d⌋`` consecutive coordinates, each divided by its maximum over rows.
    ``-> [n, 3]``."""
    n, d = G.shape
    m = max(1, int(frac * d))
    start = jax.random.randint(key, (), 0, d - m + 1)

    def counts(B, w):  # positive and negative entries of each row in the window
        hi = jax.lax.Precision.HIGHEST
        return tuple(jnp.matmul(jnp.where(s, 1.0, 0.0), w, precision=hi) for s in (B > 0, B < 0))

    pos, neg = ops.window_sum(counts, G, start, m)
    feats = jnp.stack([pos, m - pos - neg, neg], 1) / m
    return feats / (feats.max(axis=0, keepdims=True) + 1e-8)


def _median_others(S: jax.Array) -> jax.Array:
    """Median over ``j ≠ i`` of ``S_ij`` for every row ``i``, by rank
    (``ops.sorted_row_sums``: at n = 100, 0.05 against 0.9 ms for ``jnp.nanmedian`` here)."""
    n = S.shape[0]
    off = jnp.where(jnp.eye(n, dtype=bool), jnp.inf, S)  # the diagonal sorts last
    return ops.sorted_row_sums(off, ops.median_weights(n - 1, n))


def similarity_feature(K: jax.Array, norms: jax.Array, kind: str) -> jax.Array:
    """The extra feature of SignGuard-Sim (``kind="sim"``) or -Dist (``"dist"``).

    The reference "correct" gradient is the median over the other rows (the paper's
    stateless option): ``s_i = Med_{j≠i} cos(g_i, g_j)`` mapped to ``clip(s_i, 0, Med(s))
    / (5 Med(s))``, or ``s_i = Med_{j≠i} ‖g_i − g_j‖`` mapped to ``[s_i >= 1.1 Med(s)] /
    5``, the transforms of the authors' code.
    """
    tiny = jnp.finfo(K.dtype).tiny
    if kind == "sim":
        s = _median_others(K / jnp.maximum(norms[:, None] * norms[None, :], tiny))
        med = jnp.median(s)
        return jnp.clip(s, 0.0, med) / (5 * med + 1e-8)
    s = _median_others(jnp.sqrt(ops.sq_dists_from_gram(K)))
    return (s >= 1.1 * jnp.median(s)) / 5.0


def _signguard(
    kind: str | None, lower: ArrayLike, upper: ArrayLike, frac: float, n_samples: int
) -> Aggregator:
    if not 0 < frac <= 1:
        raise ConfigError(
            f"aggregator.frac: SignGuard's fraction of coordinates must be in (0, 1], got {frac!r}."
        )

    def update(G, state, ctx):
        key_block, key_bw = jax.random.split(ctx.key)
        if kind == "sim":  # cosines: the Gram matrix
            K, sq = ops.gram(G, sq_norms=True)
        elif kind == "dist":  # distances from the centred Gram matrix (accurate in float32)
            K, sq = ops.centred_gram(G, sq_norms=True)
        else:
            K, sq = None, ops.row_sq_norms(G)
        norms = jnp.sqrt(sq).astype(G.dtype)
        M = jnp.median(norms)
        ratio = norms / M
        s1 = (ratio >= lower) & (ratio <= upper)
        X = sign_features(G, key_block, frac)
        if kind is not None:
            X = jnp.concatenate([X, similarity_feature(K, norms, kind)[:, None]], axis=1)
        bw = clustering.estimate_bandwidth(X, key_bw, 0.5, n_samples)
        s2 = clustering.largest_cluster(clustering.mean_shift(X, bw))
        keep = s1 & s2
        w = keep / jnp.maximum(keep.sum(), 1).astype(G.dtype)
        scale = jnp.minimum(1.0, M / jnp.maximum(norms, jnp.finfo(G.dtype).tiny))
        return ops.weighted_sum(w * scale, G), state, {"weights": w, "sq_norms": sq}

    return Aggregator(lambda d: (), update, reports_sq_norms=True)


_DOC = """{title} (Xu et al., ICDCS 2022, Algorithm 2).

    1. Norm filter: ``S_1 = {{i : L <= ‖g_i‖ / M <= R}}``, ``M = Med(‖g_1‖, ..., ‖g_n‖)``.
    2. Sign clustering: features of every row = fractions of positive, zero and
       negative entries on a random ``frac`` of the coordinates (a random block of
       consecutive coordinates, as the authors' code samples them){extra}; Mean-Shift
       (``clustering.mean_shift``, bandwidth by ``clustering.estimate_bandwidth`` with
       quantile 0.5 on ``n_samples`` rows, as the authors' code); ``S_2`` = the largest
       cluster.
    3. ``g̃ = (1/|S'|) Σ_{{i ∈ S'}} g_i · min(1, M / ‖g_i‖)`` over ``S' = S_1 ∩ S_2``
       (zero when ``S'`` is empty).

    Defaults ``L = 0.1, R = 3.0`` and 10% of coordinates (paper, Section V-A). The rule
    does not use ``f``. ``aux["weights"]`` is uniform over ``S'``.

    Args:
      lower: ``L`` (traced).
      upper: ``R`` (traced).
      frac: fraction of coordinates for the sign statistics, in ``(0, 1]`` (static).
      n_samples: rows used to estimate the Mean-Shift bandwidth (static).
    """


def signguard(
    lower: ArrayLike = 0.1, upper: ArrayLike = 3.0, frac: float = 0.1, n_samples: int = 50
) -> Aggregator:
    return _signguard(None, lower, upper, frac, n_samples)


def signguard_sim(
    lower: ArrayLike = 0.1, upper: ArrayLike = 3.0, frac: float = 0.1, n_samples: int = 50
) -> Aggregator:
    return _signguard("sim", lower, upper, frac, n_samples)


def signguard_dist(
    lower: ArrayLike = 0.1, upper: ArrayLike = 3.0, frac: float = 0.1, n_samples: int = 50
) -> Aggregator:
    return _signguard("dist", lower, upper, frac, n_samples)


signguard.__doc__ = _DOC.format(title="SignGuard: sign statistics only", extra="")
signguard_sim.__doc__ = _DOC.format(
    title="SignGuard-Sim: sign statistics plus cosine similarity",
    extra=", plus ``similarity_feature(kind='sim')``",
)
signguard_dist.__doc__ = _DOC.format(
    title="SignGuard-Dist: sign statistics plus Euclidean distance",
    extra=", plus ``similarity_feature(kind='dist')``",
)
