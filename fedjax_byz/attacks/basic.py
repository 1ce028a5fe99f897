"""Attacks that need no statistics of the honest updates.

Defaults follow the SignGuard paper (Xu et al., "SignGuard: Byzantine-robust federated
learning through collaborative malicious gradient filtering", Sec. V-A): random and
noise attacks with σ = 0.5, sign flipping without scaling, label flipping ``l -> C−1−l``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from fedjax_byz.attacks.base import Attack, rowwise, stateless


def none() -> Attack:
    """No attack: Byzantine clients send their honest updates (the baseline)."""
    return stateless(lambda key, G, ctx: G)


def bitflip() -> Attack:
    """Sign flipping: each Byzantine client sends ``−g_i``, its own honest update negated.

    SignGuard paper ("Sign-flipping", ``g_m = −g_b``) and STRIKE paper (appendix D.1,
    "BitFlip", ``−∇L_i(w^t)``). ByzFL's ``SignFlipping`` differs: every Byzantine client
    sends the negated *mean* of the honest updates, ``−μ_H`` (use ``ipm`` with ε = 1).
    Registered alias: ``signflip``.
    """
    return stateless(lambda key, G, ctx: -G)


def labelflip() -> Attack:
    """Data-level label flipping: Byzantine clients train on ``y -> C − 1 − y``.

    The update matrix is left as trained; the poisoning happens in local training
    (STRIKE paper, appendix D.1, "LabelFlip"; SignGuard paper, Sec. V-A).
    """
    return none()._replace(relabel=lambda y, num_classes: num_classes - 1 - y)


def gaussian(sigma: ArrayLike = 0.5) -> Attack:
    """Random attack: every Byzantine row is independent noise ``N(0, σ² I)``.

    Args:
      sigma: noise scale; 0.5 as in the SignGuard paper ("Random Attack", Sec. V-A).

    Row ``i`` is ``σ·jax.random.normal(fold_in(key, i), (d,))``, drawn for the Byzantine
    rows only (``base.byzantine_rows``).
    """
    return rowwise(lambda G, ctx: lambda k, g: sigma * jax.random.normal(k, g.shape, g.dtype))


def noise(sigma: ArrayLike = 0.5) -> Attack:
    """Noise attack: each Byzantine client sends ``g_i + N(0, σ² I)``, its own update plus noise.

    Args:
      sigma: noise scale; 0.5 as in the SignGuard paper ("Noise Attack", Sec. V-A).

    The noise of row ``i`` is the draw ``gaussian`` makes for row ``i`` with the same key.
    """
    return rowwise(lambda G, ctx: lambda k, g: g + sigma * jax.random.normal(k, g.shape, g.dtype))


def _constant(value: float) -> Attack:
    return stateless(lambda key, G, ctx: jnp.full(G.shape[1:], value, G.dtype))


def zero() -> Attack:
    """Byzantine rows are all zeros (a crashed or silent client)."""
    return _constant(0.0)


def nan() -> Attack:
    """Byzantine rows are all NaN (a numerical fault; tests the server's non-finite guard)."""
    return _constant(float("nan"))


def inf() -> Attack:
    """Byzantine rows are all +inf (an overflow; ByzFL's ``Inf`` attack)."""
    return _constant(float("inf"))
