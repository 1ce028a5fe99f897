"""Mimic (Karimireddy, He & Jaggi, "Byzantine-robust learning on heterogeneous datasets via
bucketing", ICLR 2022)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from fedjax_byz import ops
from fedjax_byz.attacks.base import Attack, stateless


def principal_client(G: jax.Array, honest: jax.Array) -> jax.Array:
    """Index of the honest row farthest from μ_H along the top principal direction.

    With ``X`` the honest rows centred on μ_H (other rows zeroed) and ``v`` the top
    eigenvector of the ``[n, n]`` Gram matrix ``X Xᵀ`` (eigenvalue λ), the top principal
    direction is ``z = Xᵀv/√λ`` and the projections are ``⟨x_i, z⟩ = √λ·v_i``: one Gram
    product (accumulated with μ_H in one column-blocked pass) and an ``n × n``
    eigendecomposition, exact; no ``d × d`` or ``n × d`` SVD. The sign of ``z`` is
    arbitrary (Karimireddy et al.'s code fixes it by a random start of their power
    iteration), so the client with the largest ``|⟨x_i, z⟩|`` is chosen. ``-> int32``.
    """

    def fn(B, vs, K):
        _, _, X = ops.masked_moments(B, honest)
        return (), K + jnp.matmul(X, X.T, precision=lax.Precision.HIGHEST)

    n = G.shape[0]
    _, K = ops.scan_columns(fn, G, init=jnp.zeros((n, n), G.dtype))
    _, V = jnp.linalg.eigh(jnp.where(honest[:, None] & honest[None, :], K, 0.0))
    return jnp.argmax(jnp.where(honest, jnp.abs(V[:, -1]), -1.0)).astype(jnp.int32)


def mimic(client: ArrayLike | None = None) -> Attack:
    """Mimic: every Byzantine row copies one honest client's update.

    Over-representing one heterogeneous client biases the aggregate toward its data
    without sending anything an outlier detector can flag (Karimireddy et al., Sec. 4).

    Args:
      client: index (in ``[0, n)``, may be traced) of the client to copy, as ByzFL's
        ``Mimic(epsilon)``; it should be honest. None (default) picks, every round, the
        honest client with the largest projection on the top principal direction of the
        centred honest updates (``principal_client``). Karimireddy et al. estimate that
        direction by a running power iteration over warm-up rounds and then keep the
        client fixed; the per-round exact choice is this library's stateless version.
    """

    def fn(key, G, ctx):
        i = principal_client(G, ctx.honest) if client is None else client
        return jnp.take(G, i, axis=0)

    return stateless(fn)
