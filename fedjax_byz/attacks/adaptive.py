"""Adaptive attacks: calibrate an attack's strength every round against the server's rule.

ByzFL's ``Optimal_ALittleIsEnough`` / ``Optimal_InnerProductManipulation`` (Allouah et al.,
"Fixing by mixing", AISTATS 2023) and the calibration of Errami et al. ("Stress-Testing
Byzantine Defenses under Data Heterogeneity", Sec. 2) choose the strength that moves the
robust aggregate farthest from the honest mean.

Here the attack is a ``base.Family``: the work that does not depend on the strength (μ, σ,
the Gram matrix, the searches of Min-Max or STRIKE) is done once, then every strength of a
fixed grid is crafted and scored against the server's rule (``ctx.aggregate``) in one XLA
program: one ``vmap`` over the whole grid on accelerators, and on CPU a sequential
``lax.map``, one candidate at a time, because the rules' order-statistics kernels run much
slower batched on XLA's CPU backend: ``adaptive-lie`` against the trimmed mean with 20
candidates took 1155 ms as one ``vmap`` against 231 ms sequentially at n = 25, d = 500k,
and 853 against 336 ms at n = 100, d = 100k (``benchmarks/results/attack_speed.md``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from fedjax_byz import ops, registry
from fedjax_byz.attacks.base import Attack, Family, replace_byzantine, write_byzantine
from fedjax_byz.attacks.byzmean import byzmean_family
from fedjax_byz.attacks.search import shejwalkar_family
from fedjax_byz.attacks.statistical import ipm_family, lie_family
from fedjax_byz.attacks.strike import strike_family
from fedjax_byz.registry import ConfigError


def adaptive(
    family: Family,
    *,
    evals: int = 20,
    lo: ArrayLike = 0.0,
    hi: ArrayLike = 10.0,
    batch: int | None = None,
) -> Attack:
    """Wraps an attack ``Family`` with a per-round strength calibration.

    Every round, ``family(key, updates, ctx)`` does the strength-independent work once;
    then for each strength ``s`` of ``linspace(lo, hi, evals)`` the Byzantine rows are
    crafted at ``s`` and the server's rule aggregates the result; the strength maximising
    ``‖aggregate − μ_H‖₂`` (ByzFL's objective) is applied (ties: the smallest). Needs
    ``ctx.aggregate`` (``fb.attack(..., aggregator=...)`` or the simulator). Any
    ``build(strength) -> Attack`` is a family through
    ``lambda key, G, ctx: lambda s: build(s).apply(key, G, build(s).init(G.shape[1]), ctx)[0]``
    (then without the shared work).

    The calibration itself is omniscient, as ByzFL's: it runs the server's rule on the
    round's whole update matrix and scores against the honest mean, whatever
    ``knowledge`` the family's own statistics use.

    Args:
      family: ``base.Family``, e.g. ``statistical.lie_family()``.
      evals: grid size, static; 20 matches ByzFL's default evaluation budget.
      lo, hi: grid bounds (may be traced).
      batch: candidates evaluated together in one ``vmap`` (static); the grid is scanned
        in such chunks (``lax.map``). None: the whole grid in one ``vmap`` on
        accelerators, one candidate at a time on CPU (``_chunk``).
    """
    if batch is not None and not registry.is_positive_python_int(batch):
        raise ConfigError(
            f"attack.batch: candidates per vmap must be a positive Python int or null, "
            f"got {batch!r}."
        )

    def apply(key, G, state, ctx):
        if ctx.aggregate is None:
            raise ConfigError(
                "attack: adaptive attacks calibrate against the server's rule; pass "
                "aggregator=... (the simulator does this)."
            )
        mu = ops.masked_mean(G, ctx.honest)
        craft = family(key, G, ctx)

        def damage(s):
            crafted = replace_byzantine(G, ctx.byz, craft(s))
            return jnp.linalg.norm(ctx.aggregate(crafted) - mu)

        grid = jnp.linspace(lo, hi, evals, dtype=jnp.float32)
        scores = jax.lax.map(damage, grid, batch_size=_chunk(batch, evals))
        return write_byzantine(G, ctx.byz, craft(grid[jnp.argmax(scores)])), state

    return Attack(lambda d: (), apply)


def _chunk(batch: int | None, evals: int) -> int | None:
    """Candidates per ``vmap``: ``batch`` if given; else the whole grid in one ``vmap`` on
    accelerators, and one at a time (a sequential ``lax.map``) on CPU, where the batched
    rule was slower (module docstring)."""
    if batch is not None:
        return min(batch, evals)
    return None if jax.default_backend() == "cpu" else evals


def adaptive_lie(
    evals: int = 20,
    lo: ArrayLike = 0.0,
    hi: ArrayLike = 10.0,
    *,
    knowledge: str = "omniscient",
    batch: int | None = None,
) -> Attack:
    """ALIE with z calibrated on ``linspace(lo, hi, evals)`` (ByzFL's Optimal ALIE).

    Defaults: 20 evaluations (ByzFL) over z ∈ [0, 10], the range Errami et al. sweep.
    """
    return adaptive(lie_family(knowledge), evals=evals, lo=lo, hi=hi, batch=batch)


def adaptive_ipm(
    evals: int = 20,
    lo: ArrayLike = 0.0,
    hi: ArrayLike = 10.0,
    *,
    knowledge: str = "omniscient",
    batch: int | None = None,
) -> Attack:
    """IPM with ε calibrated on ``linspace(lo, hi, evals)`` (ByzFL's Optimal IPM).

    Defaults: 20 evaluations (ByzFL) over ε ∈ [0, 10], the range Errami et al. sweep.
    """
    return adaptive(ipm_family(knowledge), evals=evals, lo=lo, hi=hi, batch=batch)


def adaptive_strike(
    evals: int = 8,
    lo: ArrayLike = 0.25,
    hi: ArrayLike = 2.0,
    *,
    batch: int | None = None,
) -> Attack:
    """STRIKE with ν calibrated on ``linspace(lo, hi, evals)`` every round.

    Defaults: the STRIKE paper's sweep ν ∈ {0.25, 0.5, …, 2} (appendix D.1), which the
    paper tunes once per run rather than every round.
    """
    return adaptive(strike_family(), evals=evals, lo=lo, hi=hi, batch=batch)


def adaptive_minmax(
    evals: int = 20,
    lo: ArrayLike = 0.0,
    hi: ArrayLike = 1.0,
    *,
    direction: str = "std",
    knowledge: str = "omniscient",
    batch: int | None = None,
) -> Attack:
    """Min-Max with ν calibrated on ``linspace(lo, hi, evals)`` every round.

    The rows send ``μ_R + ν·γ·∇p`` (``search.minmax``: γ the largest value on Min-Max's
    constraint). Defaults: 20 evaluations (ByzFL's budget) over ν ∈ [0, 1], i.e. over the
    whole feasible set ``[0, γ]`` of Min-Max's constraint, so the update chosen still
    satisfies it; ``hi > 1`` lets the calibration leave it. Tuning the scale of ∇p against
    the known rule is Shejwalkar & Houmansadr's AGR-tailored attack, here restricted to
    Min-Max's feasible set.
    """
    family = shejwalkar_family("max", direction, knowledge=knowledge)
    return adaptive(family, evals=evals, lo=lo, hi=hi, batch=batch)


def adaptive_minsum(
    evals: int = 20,
    lo: ArrayLike = 0.0,
    hi: ArrayLike = 1.0,
    *,
    direction: str = "std",
    knowledge: str = "omniscient",
    batch: int | None = None,
) -> Attack:
    """Min-Sum with ν calibrated on ``linspace(lo, hi, evals)`` every round.

    As ``adaptive_minmax``, on Min-Sum's constraint (``search.minsum``).
    """
    family = shejwalkar_family("sum", direction, knowledge=knowledge)
    return adaptive(family, evals=evals, lo=lo, hi=hi, batch=batch)


def adaptive_byzmean(
    evals: int = 20,
    lo: ArrayLike = 0.0,
    hi: ArrayLike = 10.0,
    *,
    knowledge: str = "omniscient",
    batch: int | None = None,
) -> Attack:
    """ByzMean with its LIE target's z calibrated on ``linspace(lo, hi, evals)``."""
    return adaptive(byzmean_family(knowledge), evals=evals, lo=lo, hi=hi, batch=batch)
