"""Mimic (Karimireddy, He & Jaggi, "Byzantine-robust learning on heterogeneous datasets via
bucketing", ICLR 2022)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from fedjax_byz import ops
from fedjax_byz.attacks.base import Attack, rowwise

SQUARINGS = 40  # M ← M²: the top eigenvector dominates once (λ₂/λ₁)^(2^40) underflows.
_NO_DIRECTION = ops.Direction("one")  # moment_products' direction, unused here


def principal_client(G: jax.Array, honest: jax.Array) -> jax.Array:
    """Index of the honest row farthest from μ_H along the top principal direction.

    With ``X`` the honest rows centred on μ_H (other rows zeroed) and ``v`` the top
    eigenvector of the ``[n, n]`` Gram matrix ``K = X Xᵀ`` (eigenvalue λ), the top
    principal direction is ``z = Xᵀv/√λ`` and the projections are ``⟨x_i, z⟩ = √λ·v_i``, so
    the client is ``argmax_i v_i²``. ``K`` is the Gram matrix of the honest rows centred
    on μ_H, from one read of the matrix (``ops.moment_products``, which forms it between
    the honest rows only: at f = n/5, 64% of the products of all rows), with no
    ``d × d`` or ``n × d`` SVD. ``v vᵀ`` is then the limit of repeated squaring,
    ``M ← M²/tr(M²)`` from ``M = K/tr(K)``: after 40 squarings the other eigenvalues'
    weight ``(λ_k/λ)^(2^40)`` is below float32 resolution unless λ's lead is too (when the
    top direction is not determined by the data anyway), and ``v_i² = M_ii``. Forty
    ``n × n`` products in XLA replace LAPACK's ``eigh``, whose OpenBLAS threads, spinning
    after the call, made every later step several times slower on a 2-core CPU (35 ms →
    135 ms per call at n = 100, d = 100k). The sign of ``z`` is arbitrary (Karimireddy et
    al. fix it by the random start of their power iteration), so the farthest client on
    either side is chosen. ``-> int32``.
    """

    _, _, _, K = ops.moment_products(G, honest, _NO_DIRECTION)  # zero off the honest rows

    def unit_trace(M):
        return M / jnp.maximum(jnp.trace(M), jnp.finfo(M.dtype).tiny)

    def square(i, M):
        return unit_trace(jnp.matmul(M, M, precision=lax.Precision.HIGHEST))

    M = lax.fori_loop(0, SQUARINGS, square, unit_trace(K))
    return jnp.argmax(jnp.where(honest, jnp.diagonal(M), -1.0)).astype(jnp.int32)


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

    def make_row(G, ctx):
        i = principal_client(G, ctx.honest) if client is None else client
        copied = jax.lax.dynamic_index_in_dim(G, i, 0, keepdims=False)
        return lambda key, g: copied

    return rowwise(make_row)
