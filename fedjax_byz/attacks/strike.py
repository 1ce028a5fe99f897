"""STRIKE, the two-stage skew-aware attack (Liu et al., the gradient-skew paper, code at
github.com/YuchenLiu-a/byzantine_skew; ``shared/papers/strike-gradient-skew.txt``)."""

from __future__ import annotations

import jax.numpy as jnp
from jax.typing import ArrayLike

from fedjax_byz import ops
from fedjax_byz.attacks.base import Attack, Family, at_strength
from fedjax_byz.attacks.search import centred_pass, diameter_sq, largest_feasible

# The directions, as ops.Direction with the reference r: u = g_med − ḡ (Eq. 6, r = g_med)
# and s = sign(ḡ_S − ḡ) ⊙ σ_S (Eq. 12, r = ḡ).
TOWARD_MEDIAN = ops.Direction("offset", scale=-1.0)
SKEW = ops.Direction("std", sign=True)


def skewed_rows(G, honest, f):
    """Stage 1 (Eqs. 6–8): ``ḡ = μ_H`` and the ``n − 2f`` honest rows farthest along
    ``g_med − ḡ``.

    ``u = g_med − ḡ`` (Eq. 6, ``g_med`` the coordinate-wise median of H),
    ``p_i = ⟨g_i, u/‖u‖⟩`` (Eq. 7); S is the ``n − 2f`` honest rows with the largest
    ``p_i`` (Eq. 8; at least one), ranked by ``⟨g_i − ḡ, u⟩``, which orders the rows as
    ``p_i`` does and avoids cancellation; ``ḡ``, ``u`` and these from one read of the matrix
    after the median's (``ops.moment_products``). Ties go to the lower index.
    ``-> ([d], bool[n])``.
    """
    g_med = ops.masked_median(G, honest)
    mu, _, proj, _ = ops.moment_products(G, honest, TOWARD_MEDIAN, g_med, gram_matrix=False)
    k = jnp.maximum(G.shape[0] - 2 * f, 1)
    return mu, ops.smallest_mask(jnp.where(honest, -proj, jnp.inf), k)


def strike(nu: ArrayLike = 1.0, *, tol: ArrayLike = 1e-5) -> Attack:
    """STRIKE (Algorithm 1): hide the Byzantine rows inside the skewed honest rows.

    With S from stage 1 (``skewed_rows``), ``ḡ_S`` and ``σ_S`` (ddof=1) the mean and
    standard deviation over S, every Byzantine row sends

        g_b = ḡ_S + ν·α·s,   s = sign(ḡ_S − ḡ) ⊙ σ_S                        (Eq. 12)

    where α is the largest value with

        max_{i∈S} ‖ḡ_S + α·s − g_i‖ ≤ max_{i,j∈S} ‖g_i − g_j‖                  (Eq. 13)

    found by Algorithm 2 (α = 1 doubled until infeasible, then bisection) on quadratics
    precomputed with ``ḡ_S``, ``σ_S`` and the Gram matrix in one pass
    (``search.centred_pass``, ``search.largest_feasible``).

    Args:
      nu: ν, attack strength (may be traced); 1 by default (the paper's recommendation,
        appendix D.2; it sweeps ν ∈ {0.25, 0.5, …, 2}).
      tol: relative bisection tolerance on α. The paper stops after 8 bisections ("error
        of α within 1%"); each step here is O(n), so the default is 1e-5.

    The paper is inconsistent in two places; this follows its main text: S has ``n − 2f``
    rows (Eq. 8, as ``ḡ_S = Σ_{i∈S} g_i/(n − 2f)`` in Algorithm 1 requires, where the
    algorithm's prose says ``n − f``) and the direction is ``sign(ḡ_S − ḡ)`` (Eq. 12 and
    Algorithm 1; Eqs. 13–14 write ``sign(ḡ_S)``). The attackers know the honest updates
    only (the paper's threat model, Sec. 2.2).
    """

    return at_strength(strike_family(tol), nu)


def strike_family(tol: ArrayLike = 1e-5) -> Family:
    """STRIKE as a ``Family``: stage 1, the pass over S and the search for α once, then
    ``ν -> ḡ_S + ν·α·s``."""

    def family(key, G, ctx):
        mu, S = skewed_rows(G, ctx.honest, ctx.f)
        cp = centred_pass(G, S, SKEW, mu)
        bound = diameter_sq(cp.gram, S)
        q = cp.quadratic

        def feasible(alpha):
            return jnp.max(jnp.where(S, q(alpha), -jnp.inf)) <= bound

        alpha = largest_feasible(feasible, 1.0, tol)
        return lambda nu: cp.mean + nu * alpha * cp.direction

    return family
