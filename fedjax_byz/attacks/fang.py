"""Fang et al.'s full-knowledge local model poisoning attacks ("Local model poisoning attacks
to Byzantine-robust federated learning", USENIX Security 2020), in update space.

A client's update is ``g_i = w − w_i``, so Fang et al.'s local model ``w_i`` is ``w − g_i``,
the distance ``D(w_i, w_Re)`` to the global model is ``‖g_i‖`` and their crafted model
``w_Re − λ·s`` (s the sign of the global model's change) is the update ``−λ·sign(ĝ)``,
where ĝ is the aggregate the server would compute without the attack.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from fedjax_byz import ops
from fedjax_byz.aggregators.distance import krum_scores
from fedjax_byz.attacks.base import Attack, AttackContext, stateless
from fedjax_byz.attacks.search import MAX_ITER, centred_gram, quadratic
from fedjax_byz.registry import ConfigError

RULES = ("trmean", "median", "krum")


def unattacked_aggregate(G: jax.Array, ctx: AttackContext) -> jax.Array:
    """ĝ: the server's rule on the before-attack updates of all clients (Fang et al.'s full
    knowledge), or μ_H when the rule is not known (as Shejwalkar & Houmansadr's code does)."""
    if ctx.aggregate is not None:
        return ctx.aggregate(G)
    return ops.masked_mean(G, ctx.honest)


def _masked_extreme(G: jax.Array, rows: jax.Array, op, fill: float) -> jax.Array:
    """Coordinate-wise ``op`` (max/min) over the selected rows, as one fused pass over G."""
    out = jnp.full(G.shape[1:], fill, G.dtype)
    for i in range(G.shape[0]):
        out = op(out, jnp.where(rows[i], G[i], fill))
    return out


def _trmean_attack(b: ArrayLike) -> Attack:
    def fn(key, G, ctx):
        s = jnp.sign(unattacked_aggregate(G, ctx))
        g_max = _masked_extreme(G, ctx.honest, jnp.maximum, -jnp.inf)
        g_min = _masked_extreme(G, ctx.honest, jnp.minimum, jnp.inf)
        # s_j > 0: push coordinate j's aggregate down, below the smallest honest value;
        # otherwise up, above the largest. The far end scales the edge by b or 1/b.
        edge = jnp.where(s > 0, g_min, g_max)
        grow = (s > 0) == (edge <= 0)
        far = jnp.where(grow, b * edge, edge / b)
        u = jax.random.uniform(key, G.shape, G.dtype)
        return edge[None, :] + u * (far - edge)[None, :]

    return stateless(fn)


def _krum_attack(threshold: ArrayLike) -> Attack:
    def fn(key, G, ctx):
        n, d = G.shape
        honest, byz, f = ctx.honest, ctx.byz, ctx.f
        s = jnp.sign(unattacked_aggregate(G, ctx))
        _, K = centred_gram(G, ops.masked_mean(G, honest))
        D = ops.sq_dists_from_gram(K)
        # λ's upper bound (Fang et al., Sec. 4.2): Σ over the n − f − 2 nearest honest rows
        # (Krum's score over the |H| = n − f honest rows with f = 0, on plain distances).
        near = krum_scores(jnp.sqrt(D), 0, valid=honest)
        sqrt_d = jnp.sqrt(jnp.asarray(d, G.dtype))
        lam0 = (
            jnp.min(jnp.where(honest, near, jnp.inf)) / (jnp.maximum(n - 2 * f - 1, 1) * sqrt_d)
            + jnp.max(jnp.where(honest, ops.row_norms(G), 0.0)) / sqrt_d
        )
        # ‖−λ s − g_i‖² as a quadratic in λ: Krum's scores cost O(n²) per λ.
        q = quadratic(G, jnp.square(ops.row_norms(G)), -s)

        def krum_picks_byzantine(lam):
            e = q(lam)
            A = jnp.where(
                byz[:, None] & byz[None, :],
                0.0,
                jnp.where(byz[:, None], e[None, :], jnp.where(byz[None, :], e[:, None], D)),
            )
            return byz[jnp.argmin(krum_scores(A, f))]

        def cond(state):
            lam, it = state
            return (lam >= threshold) & ~krum_picks_byzantine(lam) & (it < MAX_ITER)

        lam, _ = lax.while_loop(cond, lambda st: (0.5 * st[0], st[1] + 1), (lam0, 0))
        return -lam * s

    return stateless(fn)


def fang(rule: str = "trmean", *, b: ArrayLike = 2.0, threshold: ArrayLike = 1e-5) -> Attack:
    """Fang et al.'s full-knowledge attack tailored to ``rule``.

    ``rule="trmean"`` or ``"median"`` (their Sec. 4.3; the same attack serves both): with
    ĝ the unattacked aggregate (``unattacked_aggregate``), ``g_max,j`` / ``g_min,j`` the
    coordinate-wise extremes of the honest updates, every Byzantine row draws, for each
    coordinate j independently and uniformly,

        in [b·g_min,j, g_min,j] (g_min,j ≤ 0) or [g_min,j/b, g_min,j] (g_min,j > 0)   if ĝ_j > 0,
        in [g_max,j, b·g_max,j] (g_max,j > 0) or [g_max,j, g_max,j/b] (g_max,j ≤ 0)   otherwise,

    i.e. just beyond the honest range on the side opposite to the server's step.

    ``rule="krum"`` (their Sec. 4.2): every Byzantine row sends ``−λ·sign(ĝ)`` with λ
    halved from the upper bound

        λ₀ = min_{i∈H} Σ_{l∈Γ̃_i} ‖g_l − g_i‖ / ((n − 2f − 1)√d) + max_{i∈H} ‖g_i‖ / √d

    (Γ̃_i: the n − f − 2 honest updates nearest to g_i) until Krum (Blanchard et al.,
    score = sum of squared distances to the n − f − 2 nearest other rows, f the true
    count) selects a Byzantine row, or λ < ``threshold``. The check uses Krum's scores
    computed from precomputed inner products, O(n²) per halving.

    Args:
      rule: the rule attacked (static): ``"trmean"``, ``"median"`` or ``"krum"``.
      b: Fang et al.'s b = 2 (trmean/median).
      threshold: smallest λ tried, 1e-5 as in Fang et al. (krum).

    ĝ is the server's own rule on the before-attack updates when the rule is known
    (``aggregator=``; Fang et al.'s full knowledge), else μ_H (Shejwalkar & Houmansadr's
    re-implementation); its sign gives the direction.
    """
    if rule not in RULES:
        raise ConfigError(f"attack.params.rule: must be one of {list(RULES)}, got {rule!r}.")
    return _krum_attack(threshold) if rule == "krum" else _trmean_attack(b)
