"""Attacks that need no statistics of the honest updates."""

from __future__ import annotations

import jax
from jax.typing import ArrayLike

from fedjax_byz.attacks.base import Attack, stateless


def none() -> Attack:
    """No attack: Byzantine clients send their honest updates (the baseline)."""
    return stateless(lambda key, G, ctx: G)


def bitflip() -> Attack:
    """Each Byzantine client sends the negation of its own honest update, ``−g_i``."""
    return stateless(lambda key, G, ctx: -G)


def labelflip() -> Attack:
    """Data-level label flipping: Byzantine clients train on ``y -> C − 1 − y``.

    The update matrix is left as trained; the poisoning happens in local training
    (STRIKE paper, appendix D.1, "LabelFlip").
    """
    return none()._replace(relabel=lambda y, num_classes: num_classes - 1 - y)


def gaussian(sigma: ArrayLike = 0.5) -> Attack:
    """Byzantine rows are pure noise ``N(0, σ² I)``; σ = 0.5 by default."""

    def fn(key, G, ctx):
        return sigma * jax.random.normal(key, G.shape, G.dtype)

    return stateless(fn)
