"""Distance-based rules: Krum, Multi-Krum, Bulyan, geometric median, centred clipping,
AKSEL, CGE (distance to the origin) and MoNNA.

Most of them are Gram-matrix rules in disguise: distances between rows, and between a
row and any combination ``z = Σ_i α_i g_i`` of rows, follow from ``K = G Gᵀ``
(``‖z − g_i‖² = αᵀKα − 2(Kα)_i + K_ii``), so an iterative rule runs on ``[n, n]`` and
reads the ``[n, d]`` matrix only for one Gram product and one final combination. Rows
are centred before the Gram product (see ``ops.pairwise_sq_dists``) to keep float32
distances accurate when updates share a large common component.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from fedjax_byz import ops
from fedjax_byz.aggregators import coordinate
from fedjax_byz.aggregators.base import Aggregator, gram_rule, stateless
from fedjax_byz.registry import ConfigError


def sq_dists_to_combination(K: jax.Array, alpha: jax.Array) -> jax.Array:
    """``‖Σ_j α_j g_j − g_i‖²`` for every row from the Gram matrix (``Σ α_j = 1``)."""
    Ka = K @ alpha
    return jnp.maximum(alpha @ Ka - 2.0 * Ka + jnp.diagonal(K), 0.0)


def krum_scores(D: jax.Array, f: ArrayLike, valid: jax.Array | None = None) -> jax.Array:
    """Krum scores from squared distances ``D: [n, n]``.

    ``score_i = Σ_{j ∈ N_i} ‖g_i − g_j‖²`` over the ``r − f − 2`` nearest other rows
    ``N_i`` among the ``r`` valid rows; invalid rows score +inf. ``f`` may be traced.
    The sums are by rank (``ops.sorted_row_sums``).
    """
    n = D.shape[0]
    valid = jnp.ones(n, bool) if valid is None else valid
    pair = valid[:, None] & valid[None, :] & ~jnp.eye(n, dtype=bool)
    D = jnp.where(pair, D, jnp.inf)
    nearest = (jnp.arange(n) < valid.sum() - f - 2).astype(D.dtype)  # [n] by rank
    return jnp.where(valid, ops.sorted_row_sums(D, nearest), jnp.inf)


def krum() -> Aggregator:
    """Krum (Blanchard, El Mhamdi, Guerraoui & Stainer, NeurIPS 2017).

    ``Krum(g) = g_{i*}``, ``i* = argmin_i Σ_{i→j} ‖g_i − g_j‖²`` where ``i → j`` ranges
    over the ``n − f − 2`` other rows nearest to ``g_i`` (the paper's count, also the
    SignGuard code's; ByzFL's and ByzPy's ``Krum`` sum over ``n − f − 1`` other rows, so
    their ``Krum(f)`` is ours with ``f − 1``: ``benchmarks/results/agreement.md``). Ties
    go to the lowest index.
    ``aux["weights"]`` is one-hot. Needs ``n − f − 2 >= 1``.
    """

    def weights(K, ctx):
        scores = krum_scores(ops.sq_dists_from_gram(K), ctx.f)
        return jax.nn.one_hot(jnp.argmin(scores), K.shape[0], dtype=K.dtype)

    return gram_rule(weights, combine=lambda w, G: G[jnp.argmax(w)])


def multikrum() -> Aggregator:
    """Multi-Krum (Blanchard et al., NeurIPS 2017), as in ByzFL ``MultiKrum``.

    The mean of the ``m = n − f`` rows with the smallest Krum scores, the scores being
    computed once on all rows: ``(1/m) Σ_{i ∈ M} g_i``. Ties go to the lowest index.
    """

    def weights(K, ctx):
        n = K.shape[0]
        scores = krum_scores(ops.sq_dists_from_gram(K), ctx.f)
        return ops.smallest_mask(scores, n - ctx.f) / jnp.asarray(n - ctx.f, K.dtype)

    return gram_rule(weights)


def bulyan() -> Aggregator:
    """Bulyan (El Mhamdi, Guerraoui & Rouault, "The hidden vulnerability of distributed
    learning in Byzantium", ICML 2018).

    1. Selection: ``θ = n − 2f`` rows, chosen one at a time by applying Krum to the rows
       not chosen yet (``r − f − 2`` neighbours among the ``r`` remaining).
    2. Aggregation: per coordinate, the mean of the ``β = θ − 2f`` chosen values closest
       to the coordinate-wise median of the chosen rows.

    ``aux["weights"]`` is uniform over the ``θ`` selected rows. Needs ``n >= 4f + 3``.
    """

    def fn(G, ctx):
        n, f = G.shape[0], ctx.f
        D = ops.pairwise_sq_dists(G)
        theta = n - 2 * f
        # Every row's distances sorted once; each round masks the chosen rows in that
        # order (O(n²) a round instead of a sort, O(n² log n)) and counts them along it
        # by a product with a triangle of ones (XLA's CPU cumsum was 2x slower).
        order = jnp.argsort(D, axis=1)
        Ds = jnp.take_along_axis(D, order, axis=1)
        other = order != jnp.arange(n)[:, None]
        upto = jnp.triu(jnp.ones((n, n), D.dtype))  # [l, j]: 1 where l <= j

        def pick(_, chosen):
            left = ~chosen
            near = left[order] & other & left[:, None]
            count = jnp.matmul(near.astype(D.dtype), upto, precision=jax.lax.Precision.HIGHEST)
            near &= count <= (left.sum() - f - 2).astype(D.dtype)
            scores = jnp.where(left, jnp.where(near, Ds, 0.0).sum(axis=1), jnp.inf)
            return chosen.at[jnp.argmin(scores)].set(True)

        chosen = jax.lax.fori_loop(0, theta, pick, jnp.zeros(n, bool))
        fmax = (n - 3) // 4
        rest = ~chosen  # 2f rows: f pushed to −inf, f to +inf, the median stays put
        below = rest & (jnp.cumsum(rest) <= f)
        out = coordinate.closest_mean(
            G, theta - 2 * f, kmin=n - 4 * fmax, starts=3 * fmax, step=4, valid=chosen, below=below
        )
        return out, chosen / jnp.asarray(theta, G.dtype)

    return stateless(fn)


def geomed(iters: int = 8, nu: ArrayLike = 1e-6) -> Aggregator:
    """Geometric median by smoothed Weiszfeld, RFA (Pillutla, Kakade & Harchaoui,
    "Robust aggregation for federated learning", IEEE TSP 2022).

    ``z ← Σ_i β_i g_i / Σ_i β_i`` with ``β_i = 1 / max(ν, ‖z − g_i‖)``, from the mean
    ``z = ḡ``, for ``T = iters`` iterations. Defaults ``T = 8`` (STRIKE paper, Table 4)
    and ``ν = 1e-6`` (RFA paper); ByzFL's ``GeometricMedian`` defaults to ``ν = 0.1,
    T = 3`` and starts from ``z = 0``, ByzPy's from the coordinate-wise median and runs to
    convergence (``benchmarks/results/agreement.md``). The iterates stay in the span of
    the rows and run on the Gram matrix. ``aux["weights"]`` are the final ``β_i / Σ β``.

    Args:
      iters: number of Weiszfeld steps ``T`` (static).
      nu: smoothing ``ν > 0`` (traced).
    """

    def weights(K, ctx):
        def step(_, alpha):
            beta = 1.0 / jnp.maximum(nu, jnp.sqrt(sq_dists_to_combination(K, alpha)))
            return beta / beta.sum()

        n = K.shape[0]
        return jax.lax.fori_loop(0, iters, step, jnp.full(n, 1.0 / n, K.dtype))

    return gram_rule(weights)


def cclip(tau: ArrayLike = 10.0, iters: int = 1) -> Aggregator:
    """Centred clipping (Karimireddy, He & Jaggi, "Learning from history for
    Byzantine robust optimization", ICML 2021).

    ``v ← v + (1/n) Σ_i (g_i − v) · min(1, τ / ‖g_i − v‖)``, ``L = iters`` times, from
    the rule's previous output ``v`` (its state; zero at the first round and in the
    stateless ``fb.aggregate``). Defaults ``τ = 10, L = 1`` (STRIKE paper, Table 4);
    ByzFL ``CenteredClipping`` defaults to ``τ = 100, L = 1``. ``aux["weights"]`` are
    the normalised coefficients of the rows in ``v − (1 − Σc) v_prev``.

    Every iterate is ``v = Σ_i c_i g_i + (1 − Σc) v_prev``, so its distances to the rows
    follow from the Gram matrix of ``G − v_prev``; with ``L = 1`` only the row norms of
    ``G − v_prev`` are needed (one pass, no Gram product).

    A row holding a NaN or an infinity, or too large to square (``‖g_i − v‖² = inf``),
    gets a NaN coefficient and makes ``v`` NaN, so ``fb.aggregate`` checks the rows
    (``base.guard_nonfinite``) only when the output is not finite.

    Args:
      tau: clipping radius ``τ`` (traced).
      iters: number of clipping steps ``L`` (static).
    """

    def init(d):
        return jnp.zeros(d, jnp.float32)

    def update(G, state, ctx):
        n = G.shape[0]
        v0 = state.astype(G.dtype)  # the state stays float32, the work runs in G's dtype

        def step(c, sq_dists):
            dist = jnp.sqrt(sq_dists)
            s = jnp.minimum(1.0, tau / jnp.maximum(dist, jnp.finfo(G.dtype).tiny))
            s = jnp.where(dist < jnp.inf, s, jnp.nan)  # see the docstring
            return c + (s - c * s.sum()) / n

        c = jnp.zeros(n, G.dtype)
        if iters == 1:
            c = step(c, ops.row_sq_dists(G, v0))
        else:
            K = ops.gram(G, v0)
            c = jax.lax.fori_loop(0, iters, lambda _, c: step(c, sq_dists_to_combination(K, c)), c)
        out = ops.weighted_sum(c, G) + (1.0 - c.sum()) * v0
        weights = c / jnp.maximum(c.sum(), jnp.finfo(G.dtype).tiny)
        return out, out.astype(state.dtype), {"weights": weights}

    return Aggregator(init, update)


def aksel(mode: str = "mid") -> Aggregator:
    """AKSEL (Boussetta, El-Mhamdi, Guerraoui, Maurer & Rouault, "AKSEL: fast
    Byzantine SGD", OPODIS 2020).

    ``r_i = ‖g_i − Med(g)‖²`` with ``Med`` the coordinate-wise median; the output is the
    mean of the rows with ``r_i <= Med(r_1, ..., r_n)`` (``mode="mid"``, the paper's
    rule) or of the ``n − f`` rows with the smallest ``r_i`` (``mode="n-f"``).

    Args:
      mode: ``"mid"`` or ``"n-f"`` (static).
    """
    if mode not in ("mid", "n-f"):
        raise ConfigError(f"aggregator.mode: 'aksel' needs 'mid' or 'n-f', got {mode!r}.")
    med = coordinate.median()

    def fn(G, ctx):
        n = G.shape[0]
        center, _, _ = med.update(G, (), ctx)
        r = ops.row_sq_dists(G, center)
        if mode == "mid":
            keep = r <= jnp.median(r)
        else:
            keep = ops.smallest_mask(r, n - ctx.f)
        w = keep / keep.sum().astype(G.dtype)
        return ops.weighted_sum(w, G), w

    return stateless(fn)


def cge() -> Aggregator:
    """CGE, comparative gradient elimination (Gupta, Liu & Vaidya, "Byzantine
    fault-tolerant distributed machine learning with norm-based comparative gradient
    elimination", DSN Workshops 2021).

    ``(1/(n−f)) Σ_{i ∈ S} g_i`` with ``S`` the ``n − f`` rows of smallest norm ``‖g_i‖``
    (ties to the lowest index), as ByzPy's ``ComparativeGradientElimination``; the paper
    sums them, the same up to the server's learning rate. Needs ``f < n/2``.
    """

    def fn(G, ctx):
        n = G.shape[0]
        w = ops.smallest_mask(ops.row_norms(G), n - ctx.f) / jnp.asarray(n - ctx.f, G.dtype)
        return ops.weighted_sum(w, G), w

    return stateless(fn)


def monna(idx: ArrayLike = 0) -> Aggregator:
    """MoNNA (Farhadkhani, Guerraoui, Gupta, Hoang, Pinot & Stephan, "Robust
    collaborative learning with linear gradient overhead", ICML 2023).

    ``(1/(n−f)) Σ_{i ∈ N_idx} g_i`` with ``N_idx`` the ``n − f`` rows nearest to the
    trusted row ``g_idx`` (itself included), as ByzFL ``MoNNA(f, idx)``. Ties go to the
    lowest index. Needs ``f < n/2``. Only the distances to ``g_idx`` are needed: one
    pass over the rows, no Gram matrix.

    Args:
      idx: index of the trusted row (traced; default 0).
    """

    def fn(G, ctx):
        n = G.shape[0]
        d2 = ops.row_sq_dists(G, G[idx])
        w = ops.smallest_mask(d2, n - ctx.f) / jnp.asarray(n - ctx.f, G.dtype)
        return ops.weighted_sum(w, G), w

    return stateless(fn)
