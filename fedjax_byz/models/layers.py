"""Layers whose formulation is chosen for the backend.

``Conv`` computes a convolution either with XLA's native convolution (``"xla"``) or as an
explicit patch matrix times the kernel (``"patches"``, im2col). On XLA's CPU backend the
native convolution is slow for the small-channel layers of federated-learning models,
and slower still when clients are vmapped (it becomes a grouped convolution); the patch
formulation turns every layer into a plain matrix product, measured 2-4x faster per
local step on this project's 2-core CPU (``benchmarks/round_speed.py``). On GPUs the
native convolution (cuDNN) is the right choice. ``impl="auto"`` picks ``"patches"`` on
CPU and ``"xla"`` elsewhere; both compute the same function with the same parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def resolve_impl(impl: str) -> str:
    """``"auto"`` -> ``"patches"`` on CPU, ``"xla"`` on accelerators."""
    if impl == "auto":
        return "patches" if jax.default_backend() == "cpu" else "xla"
    if impl not in ("patches", "xla"):
        raise ValueError(f"conv impl must be 'auto', 'patches' or 'xla', got {impl!r}")
    return impl


def _pad_amounts(padding: str | int, k: int) -> tuple[int, int]:
    if padding == "SAME":
        return (k - 1) // 2, k // 2
    if padding == "VALID":
        return 0, 0
    return int(padding), int(padding)


def patches(x: jax.Array, k: int, stride: int, padding: str | int) -> jax.Array:
    """im2col: ``[B, H, W, C] -> [B, H', W', k·k·C]``, ordered (row, column, channel).

    Built from ``k²`` strided slices so that the transpose (for the backward pass) is a
    sum of padded slices, which XLA fuses.
    """
    lo, hi = _pad_amounts(padding, k)
    if lo or hi:
        x = jnp.pad(x, ((0, 0), (lo, hi), (lo, hi), (0, 0)))
    _, H, W, C = x.shape
    Ho, Wo = (H - k) // stride + 1, (W - k) // stride + 1
    cols = [
        lax.slice(
            x,
            (0, i, j, 0),
            (x.shape[0], i + (Ho - 1) * stride + 1, j + (Wo - 1) * stride + 1, C),
            (1, stride, stride, 1),
        )
        for i in range(k)
        for j in range(k)
    ]
    return jnp.concatenate(cols, axis=-1)


class Conv(nn.Module):
    """2-D convolution (NHWC, square kernel) with a backend-chosen formulation.

    Parameters are named and initialised as in ``flax.linen.Conv`` (``kernel``
    ``[k, k, C_in, C_out]`` LeCun-normal, ``bias`` zeros).
    """

    features: int
    kernel_size: int
    strides: int = 1
    padding: str | int = "SAME"
    use_bias: bool = True
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features)
        )
        if resolve_impl(self.impl) == "patches":
            y = patches(x, k, self.strides, self.padding) @ kernel.reshape(-1, self.features)
        else:
            lo, hi = _pad_amounts(self.padding, k)
            y = lax.conv_general_dilated(
                x,
                kernel,
                (self.strides, self.strides),
                [(lo, hi), (lo, hi)],
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,))
            y = y + bias.reshape((1,) * (y.ndim - 1) + (-1,))
        return y


def max_pool(x: jax.Array, window: int = 2) -> jax.Array:
    """Non-overlapping max pooling (``window`` divides H and W; remainder dropped).

    The models pool before their ReLU: max and ReLU commute, values and gradients are the
    same (ties included), and the ReLU and its gradient then touch a quarter of the values
    (LeNet-5's local step 15% faster on this project's CPU).
    """
    B, H, W, C = x.shape
    H2, W2 = H // window, W // window
    x = x[:, : H2 * window, : W2 * window]
    return x.reshape(B, H2, window, W2, window, C).max(axis=(2, 4))


class MLPBlock(nn.Module):
    """Dense layers with ReLU between them."""

    widths: Sequence[int]

    @nn.compact
    def __call__(self, x):
        for w in self.widths:
            x = nn.relu(nn.Dense(w)(x))
        return x
