"""``prng.fused``: the same draws as JAX's Threefry keys, with the hash written out."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_byz import prng

SAMPLERS = {
    "bits8": lambda k, s: jax.random.bits(k, s, jnp.uint8),
    "bits16": lambda k, s: jax.random.bits(k, s, jnp.uint16),
    "bits32": lambda k, s: jax.random.bits(k, s, jnp.uint32),
    "uniform": lambda k, s: jax.random.uniform(k, s, minval=-2.0, maxval=3.0),
    "normal": lambda k, s: jax.random.normal(k, s),
    "normal_bf16": lambda k, s: jax.random.normal(k, s, jnp.bfloat16),
    "randint": lambda k, s: jax.random.randint(k, s, -5, 1000),
    "bernoulli": lambda k, s: jax.random.bernoulli(k, 0.3, s),
    "split_then_normal": lambda k, s: jax.random.normal(jax.random.split(k, 3)[2], s),
    "fold_in_then_uniform": lambda k, s: jax.random.uniform(jax.random.fold_in(k, 7), s),
}
SHAPES = [(1,), (13,), (4, 1000), (2, 3, 5)]


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_fused_keys_draw_the_same_numbers(sampler):
    draw = SAMPLERS[sampler]
    for seed, shape in enumerate(SHAPES):
        key = jax.random.key(seed)
        expected = np.asarray(draw(key, shape))
        fused = jax.jit(lambda k, s=shape: draw(prng.fused(k), s))(key)
        np.testing.assert_array_equal(fused, expected)
        raw = jax.random.PRNGKey(seed)  # a legacy uint32[2] key
        np.testing.assert_array_equal(draw(prng.fused(raw), shape), expected)


def test_fused_keys_under_vmap_and_permutation():
    keys = jax.random.split(jax.random.key(11), 5)
    expected = jax.vmap(lambda k: jax.random.normal(k, (300,)))(keys)
    fused = jax.vmap(lambda k: jax.random.normal(prng.fused(k), (300,)))(keys)
    np.testing.assert_array_equal(fused, expected)
    key = keys[0]
    np.testing.assert_array_equal(
        jax.random.permutation(prng.fused(key), 1000), jax.random.permutation(key, 1000)
    )


def test_the_written_out_hash_is_one_fusion():
    # What makes it fast on CPU: no `while` loop over the arrays.
    def hlo(k):
        return jax.jit(lambda k: jax.random.normal(k, (4096,))).lower(k).compile().as_text()

    key = jax.random.key(0)
    assert "while" not in hlo(prng.fused(key))
    if jax.default_backend() == "cpu":
        assert "while" in hlo(key)  # JAX's own CPU lowering, which this module replaces


def test_other_generators_and_the_original_scheme_pass_through():
    rbg = jax.random.key(0, impl="rbg")
    assert prng.fused(rbg) is rbg
    key = jax.random.key(5)
    with jax.threefry_partitionable(False):
        expected = jax.random.normal(key, (257,))
        np.testing.assert_array_equal(jax.random.normal(prng.fused(key), (257,)), expected)
    assert not np.array_equal(expected, jax.random.normal(key, (257,)))
