"""Min-Max and Min-Sum (Shejwalkar & Houmansadr, NDSS 2021) and the scalar search they share
with STRIKE.

All three attacks send ``m(γ) = m₀ + γ·p`` with the largest γ ≥ 0 that keeps a distance
constraint. Squared distances to the rows are quadratics in γ,

    ‖m₀ + γ p − g_i‖² = a γ² + b_i γ + c_i,   a = ‖p‖², b_i = −2⟨x_i, p⟩, c_i = ‖x_i‖²,
    x_i = g_i − m₀,

so their coefficients (and the pairwise distances, from one Gram matrix of the centred
rows) are computed once with a few matrix products; every step of the search then costs
O(n) and never touches the ``[n, d]`` matrix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from fedjax_byz import ops
from fedjax_byz.attacks.base import Attack, stateless
from fedjax_byz.attacks.statistical import check_knowledge, known_rows, mean_std
from fedjax_byz.registry import ConfigError

DIRECTIONS = ("std", "unit", "sign")
MAX_ITER = 200  # doublings + bisections; each O(n). 2⁻²⁰⁰ covers float32's whole range.
_UNBOUNDED = 1e30  # a γ this large means the constraint never binds (p = 0).


class Quadratic(NamedTuple):
    """Squared distances ``a γ² + b γ + c`` from ``m₀ + γ p`` to every row. ``b, c: [n]``."""

    a: jax.Array
    b: jax.Array
    c: jax.Array

    def __call__(self, gamma: jax.Array) -> jax.Array:
        return (self.a * gamma + self.b) * gamma + self.c


def centred_gram(G: jax.Array, center: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``X = G − center`` and its Gram matrix ``X Xᵀ``. ``-> [n, d], [n, n]``.

    Centring on a point inside the cloud (a mean) before the product keeps the squared
    distances ``K_ii + K_jj − 2K_ij`` accurate in float32 when the updates share a large
    common component.
    """
    X = G - center[None, :]
    return X, ops.gram(X)


def quadratic(X: jax.Array, sq_norms: jax.Array, direction: jax.Array) -> Quadratic:
    """Coefficients of ``‖m₀ + γ p − g_i‖²`` from ``X = G − m₀``, ``‖x_i‖²`` and ``p``."""
    b = -2.0 * jnp.matmul(X, direction, precision=lax.Precision.HIGHEST)
    return Quadratic(jnp.vdot(direction, direction), b, sq_norms)


def largest_feasible(
    feasible: Callable[[jax.Array], jax.Array], init: ArrayLike, tol: ArrayLike
) -> jax.Array:
    """The largest γ ≥ 0 with ``feasible(γ)``, for a feasible set ``[0, γ*]``.

    STRIKE paper, Algorithm 2: starting from ``init``, γ is doubled until infeasible
    (bracket ``[0, hi]``), then the bracket ``[lo, hi]`` is bisected until
    ``hi − lo ≤ tol·hi`` (relative, so the result is within ``tol`` of γ* at any scale) or
    ``MAX_ITER`` evaluations. If ``init`` is infeasible the bisection of ``[0, init]``
    halves it first. Returns ``lo``, the largest γ *found feasible*, so the output never
    violates the constraint. One ``lax.while_loop``; ``init`` and ``tol`` may be traced.
    """
    init = jnp.asarray(init, jnp.float32)

    def cond(state):
        lo, hi, _, it = state
        still_open = jnp.where(jnp.isfinite(hi), hi - lo > tol * hi, lo < _UNBOUNDED)
        return (it < MAX_ITER) & still_open

    def body(state):
        lo, hi, x, it = state
        ok = feasible(x)
        lo = jnp.where(ok, x, lo)
        hi = jnp.where(ok, hi, x)
        x = jnp.where(jnp.isfinite(hi), 0.5 * (lo + hi), 2.0 * x)
        return lo, hi, x, it + 1

    zero = jnp.zeros((), jnp.float32)
    lo, _, _, _ = lax.while_loop(cond, body, (zero, jnp.asarray(jnp.inf), init, 0))
    return lo


def perturbation(mu: jax.Array, sigma: jax.Array, direction: str) -> jax.Array:
    """Shejwalkar & Houmansadr's ∇p: ``−σ`` ("std"), ``−μ/‖μ‖`` ("unit"), ``−sign(μ)`` ("sign")."""
    if direction == "std":
        return -sigma
    if direction == "unit":
        return -mu / jnp.maximum(jnp.linalg.norm(mu), jnp.finfo(mu.dtype).tiny)
    return -jnp.sign(mu)


def _check(direction: str, knowledge: str) -> None:
    if direction not in DIRECTIONS:
        raise ConfigError(
            f"attack.params.direction: must be one of {list(DIRECTIONS)}, got {direction!r}."
        )
    check_knowledge(knowledge)


def _shejwalkar(objective: str, direction, gamma_init, tol, knowledge) -> Attack:
    _check(direction, knowledge)

    def fn(key, G, ctx):
        rows = known_rows(ctx, knowledge)
        mu, sigma = mean_std(G, rows)
        p = perturbation(mu, sigma, direction)
        if objective == "max":
            X, K = centred_gram(G, mu)
            q = quadratic(X, jnp.diagonal(K), p)
            pair = rows[:, None] & rows[None, :]
            bound = jnp.max(jnp.where(pair, ops.sq_dists_from_gram(K), 0.0))

            def feasible(gamma):
                return jnp.max(jnp.where(rows, q(gamma), -jnp.inf)) <= bound

        else:
            X = G - mu[None, :]
            q = quadratic(X, jnp.einsum("nd,nd->n", X, X, precision=lax.Precision.HIGHEST), p)
            w = rows.astype(G.dtype)
            k = w.sum()
            # Σ_{j∈R} ‖g_i − g_j‖² = k‖x_i‖² + Σ_j ‖x_j‖² − 2⟨x_i, Σ_j x_j⟩ and Σ_{j∈R} x_j = 0
            # because x is centred on μ_R: the bound needs no Gram matrix.
            bound = jnp.max(jnp.where(rows, k * q.c + jnp.vdot(w, q.c), -jnp.inf))

            def feasible(gamma):
                return jnp.vdot(w, q(gamma)) <= bound

        gamma = largest_feasible(feasible, gamma_init, tol)
        return mu + gamma * p

    return stateless(fn)


def minmax(
    direction: str = "std",
    *,
    gamma_init: ArrayLike = 10.0,
    tol: ArrayLike = 1e-5,
    knowledge: str = "omniscient",
) -> Attack:
    """Min-Max (Shejwalkar & Houmansadr, NDSS 2021, Eq. 14 of the SignGuard paper).

    Every Byzantine row sends ``m = μ_R + γ·∇p`` with the largest γ such that

        max_{i∈R} ‖m − g_i‖ ≤ max_{i,j∈R} ‖g_i − g_j‖

    (plain distances, i.e. the malicious update is no farther from any known update than
    the known updates are from each other).

    Args:
      direction: ∇p, ``"std"`` (−σ_R, the default of Shejwalkar & Houmansadr and of the
        STRIKE paper's Table 3), ``"unit"`` (−μ_R/‖μ_R‖) or ``"sign"`` (−sign(μ_R)).
      gamma_init: first γ tried, 10 (Table 3 of the STRIKE paper).
      tol: relative tolerance on γ, 1e-5 (their τ, applied relative to γ here).
      knowledge: R = H (``"omniscient"``, their "full knowledge") or B (``"byzantine"``,
        their "partial knowledge": the attackers' own honest updates).

    The search is ``largest_feasible`` (doubling, then bisection) on precomputed
    quadratics, so the output sits on its constraint to within ``tol``; Shejwalkar &
    Houmansadr's own loop (γ ± step/2 from γ_init) cannot return γ > 2·γ_init and stops
    on an absolute step of 1e-5.
    """
    return _shejwalkar("max", direction, gamma_init, tol, knowledge)


def minsum(
    direction: str = "std",
    *,
    gamma_init: ArrayLike = 10.0,
    tol: ArrayLike = 1e-5,
    knowledge: str = "omniscient",
) -> Attack:
    """Min-Sum (Shejwalkar & Houmansadr, NDSS 2021, Eq. 15 of the SignGuard paper).

    Every Byzantine row sends ``m = μ_R + γ·∇p`` with the largest γ such that

        Σ_{i∈R} ‖m − g_i‖² ≤ max_{i∈R} Σ_{j∈R} ‖g_i − g_j‖²

    (squared distances, as in their paper and code). Arguments as in ``minmax``; the
    defaults (∇p = −σ, γ_init = 10, τ = 1e-5) are the STRIKE paper's Table 3.
    """
    return _shejwalkar("sum", direction, gamma_init, tol, knowledge)
