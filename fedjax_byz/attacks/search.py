"""Min-Max and Min-Sum (Shejwalkar & Houmansadr, NDSS 2021) and the scalar search they share
with STRIKE.

All three attacks send ``m(γ) = m₀ + γ·p`` with the largest γ ≥ 0 that keeps a distance
constraint. Squared distances to the rows are quadratics in γ,

    ‖m₀ + γ p − g_i‖² = a γ² + b_i γ + c_i,   a = ‖p‖², b_i = −2⟨x_i, p⟩, c_i = ‖x_i‖²,
    x_i = g_i − m₀,

so their coefficients, μ and σ, and the pairwise distances (from the Gram matrix of the
centred rows) are computed together, in one read of the matrix on CPU (``centred_pass``);
every step of the search then costs O(n) and never touches the ``[n, d]`` matrix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from fedjax_byz import ops
from fedjax_byz.attacks.base import Attack, Family, at_strength
from fedjax_byz.attacks.statistical import check_knowledge, known_rows
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


class CentredPass(NamedTuple):
    """What ``centred_pass`` returns.

    Attributes:
      mean: ``μ_R [d]``.
      direction: ``p [d]``.
      quadratic: ``‖μ_R + γ p − g_i‖²`` for every row.
      gram: ``X Xᵀ [n, n]`` of the centred rows ``X = G − μ_R`` (None unless asked for).
    """

    mean: jax.Array
    direction: jax.Array
    quadratic: Quadratic
    gram: jax.Array | None


def centred_pass(
    G: jax.Array,
    rows: jax.Array,
    direction: ops.Direction,
    reference: jax.Array | None = None,
    *,
    unit: bool = False,
    gram: bool = True,
) -> CentredPass:
    """Everything a search needs, in one read of ``G`` on CPU (``ops.moment_products``).

    With ``μ_R``, ``σ_R`` the mean and standard deviation (ddof=1) of the rows ``rows``,
    ``x_i = g_i − μ_R`` and the coordinate-wise direction ``u = direction(μ_R, σ_R,
    reference)`` (``p = u/‖u‖`` when ``unit``, else ``p = u``): ``‖u‖²``, ``⟨x_i, u⟩`` and,
    with ``gram``, ``X Xᵀ`` (whose diagonal is ``‖x_i‖²``), else ``‖x_i‖²``. Centring on
    ``μ_R`` keeps these float32 sums accurate when the updates share a large common
    component.
    """
    mu, u, xu, second = ops.moment_products(G, rows, direction, reference, gram_matrix=gram)
    uu = jnp.vdot(u, u)
    scale = lax.rsqrt(jnp.maximum(uu, jnp.finfo(G.dtype).tiny)) if unit else 1.0
    q = Quadratic(scale * scale * uu, -2.0 * scale * xu, jnp.diagonal(second) if gram else second)
    return CentredPass(mu, scale * u, q, second if gram else None)


def diameter_sq(K: jax.Array, rows: jax.Array) -> jax.Array:
    """``max_{i,j∈R} ‖g_i − g_j‖²`` from a Gram matrix (of any centring)."""
    return jnp.max(jnp.where(rows[:, None] & rows[None, :], ops.sq_dists_from_gram(K), 0.0))


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


def perturbation(direction: str) -> ops.Direction:
    """Shejwalkar & Houmansadr's ∇p as a coordinate-wise direction from (μ, σ): ``−σ``
    ("std"), ``−μ`` ("unit", normalised afterwards: ``−μ/‖μ‖``) or ``−sign(μ)`` ("sign")."""
    return {
        "std": ops.Direction("std", scale=-1.0),
        "unit": ops.Direction("mean", scale=-1.0),
        "sign": ops.Direction("one", sign=True, scale=-1.0),
    }[direction]


def _check(direction: str, knowledge: str) -> None:
    if direction not in DIRECTIONS:
        raise ConfigError(
            f"attack.params.direction: must be one of {list(DIRECTIONS)}, got {direction!r}."
        )
    check_knowledge(knowledge)


def shejwalkar_family(
    objective: str,
    direction: str = "std",
    *,
    gamma_init: ArrayLike = 10.0,
    tol: ArrayLike = 1e-5,
    knowledge: str = "omniscient",
) -> Family:
    """Min-Max (``objective="max"``) or Min-Sum (``"sum"``) as a ``Family``: the pass and
    the search for γ once, then ``ν -> μ_R + ν·γ·∇p``. Arguments as in ``minmax``."""
    _check(direction, knowledge)

    def family(key, G, ctx):
        rows = known_rows(ctx, knowledge)
        cp = centred_pass(
            G, rows, perturbation(direction), unit=direction == "unit", gram=objective == "max"
        )
        q = cp.quadratic
        if objective == "max":
            bound = diameter_sq(cp.gram, rows)

            def feasible(gamma):
                return jnp.max(jnp.where(rows, q(gamma), -jnp.inf)) <= bound

        else:
            w = rows.astype(G.dtype)
            # Σ_{j∈R} ‖g_i − g_j‖² = k‖x_i‖² + Σ_j ‖x_j‖² − 2⟨x_i, Σ_j x_j⟩ and Σ_{j∈R} x_j = 0
            # because x is centred on μ_R: the bound needs no Gram matrix.
            bound = jnp.max(jnp.where(rows, w.sum() * q.c + jnp.vdot(w, q.c), -jnp.inf))

            def feasible(gamma):
                return jnp.vdot(w, q(gamma)) <= bound

        gamma = largest_feasible(feasible, gamma_init, tol)
        return lambda nu: cp.mean + nu * gamma * cp.direction

    return family


def minmax(
    direction: str = "std",
    *,
    nu: ArrayLike = 1.0,
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
      nu: ν, a multiplier on the γ found (may be traced): the rows send ``μ_R + ν·γ·∇p``.
        1 (the default) is Shejwalkar & Houmansadr's attack, on its constraint; ν < 1 stays
        inside it. ``adaptive-minmax`` calibrates ν against the server's rule, as STRIKE's
        ν scales its α.
      gamma_init: first γ tried, 10 (Table 3 of the STRIKE paper).
      tol: relative tolerance on γ, 1e-5 (their τ, applied relative to γ here).
      knowledge: R = H (``"omniscient"``, their "full knowledge") or B (``"byzantine"``,
        their "partial knowledge": the attackers' own honest updates).

    The search is ``largest_feasible`` (doubling, then bisection) on precomputed
    quadratics, so the output sits on its constraint to within ``tol``; Shejwalkar &
    Houmansadr's own loop (γ ± step/2 from γ_init) cannot return γ > 2·γ_init and stops
    on an absolute step of 1e-5.
    """
    family = shejwalkar_family(
        "max", direction, gamma_init=gamma_init, tol=tol, knowledge=knowledge
    )
    return at_strength(family, nu)


def minsum(
    direction: str = "std",
    *,
    nu: ArrayLike = 1.0,
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
    family = shejwalkar_family(
        "sum", direction, gamma_init=gamma_init, tol=tol, knowledge=knowledge
    )
    return at_strength(family, nu)
