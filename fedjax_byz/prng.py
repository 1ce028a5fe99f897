"""JAX's Threefry-2x32 generator with its hash written out, so that XLA fuses a draw.

On CPU, JAX lowers the Threefry-2x32 hash (Salmon et al., "Parallel random numbers: as easy
as 1, 2, 3", SC 2011) as a ``while`` loop of five iterations over whole arrays, so a draw of
``d`` numbers passes over several ``[d]`` arrays at every iteration: 1M uniform floats took
4.1 ms here (Intel Xeon, 2 cores). Written out as its 20 rounds of additions, rotations and
xors, the hash is one elementwise fusion with the conversion to floats: 1.0 ms, and 1M
normal draws 4.8 -> 2.3 ms (the rest is ``erfinv``). ``fused(key)`` is the same key under
an implementation whose ``random_bits`` is that fusion: every ``jax.random`` sampler gives
exactly the numbers it gives for ``key`` (the same bits, then JAX's own transforms).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import random as jax_random

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))  # Threefry-2x32's rotation constants
_PARITY = np.uint32(0x1BD11BDA)  # the key schedule's constant
_THREEFRY = jax_random.threefry_prng_impl


def _threefry_2x32(k1, k2, x1, x2):
    """Threefry-2x32 with 20 rounds of the counters ``(x1, x2)`` under the key ``(k1, k2)``:
    four rounds ``x1 += x2; x2 = rotl(x2, R) ^ x1`` between key injections."""
    ks = (k1, k2, k1 ^ k2 ^ _PARITY)
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x1 = x1 + x2
            x2 = x1 ^ ((x2 << r) | (x2 >> (32 - r)))
        x1 = x1 + ks[(i + 1) % 3]
        x2 = x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x1, x2


def _random_bits(key: jax.Array, bit_width: int, shape: tuple[int, ...]) -> jax.Array:
    """JAX's partitionable Threefry bits: element ``j`` (row-major) hashes the 64-bit counter
    ``j``, as ``(hi, lo)`` words. Outside that scheme (``jax_threefry_partitionable`` off, or
    2³² elements or more) JAX's own lowering draws them."""
    size = math.prod(shape)
    if not jax.config.jax_threefry_partitionable or size >= 2**32:
        return _THREEFRY.random_bits(key, bit_width, shape)
    lo = jax.lax.iota(jnp.uint32, size).reshape(shape)  # [*shape]; the high words are 0
    bits1, bits2 = _threefry_2x32(key[0], key[1], jnp.zeros_like(lo), lo)
    if bit_width == 64:
        return (bits1.astype(jnp.uint64) << 32) | bits2.astype(jnp.uint64)
    return (bits1 ^ bits2).astype(f"uint{bit_width}")


_FUSED = jax_random.define_prng_impl(
    key_shape=_THREEFRY.key_shape,
    seed=_THREEFRY.seed,
    split=_THREEFRY.split,
    random_bits=_random_bits,
    fold_in=_THREEFRY.fold_in,
    name="threefry2x32_fused",
    tag="fry",
)


def fused(key: jax.Array) -> jax.Array:
    """``key`` (typed, or a raw ``uint32[2]``) as a key of the written-out hash where it is a
    Threefry-2x32 key; any other key unchanged. Draws from it equal draws from ``key``."""
    if jax.random.key_impl(key) != _THREEFRY.name:
        return key
    return jax.random.wrap_key_data(jax.random.key_data(key), impl=_FUSED)
