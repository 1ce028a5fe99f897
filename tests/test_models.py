"""Models: shapes, and the two convolution formulations computing the same function."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_byz import ConfigError, models
from fedjax_byz.models.layers import Conv, max_pool


@pytest.mark.parametrize(
    "name,shape,params",
    [
        ("mlp", (8, 8, 1), {}),
        ("lenet5", (28, 28, 1), {}),
        ("cnn", (32, 32, 3), {}),
        ("femnist_cnn", (28, 28, 1), {}),
        ("alexnet", (32, 32, 3), {"fc": 64}),
        ("resnet18", (32, 32, 3), {"widths": (8, 16, 16, 16)}),
    ],
)
def test_models_map_images_to_logits(name, shape, params):
    model = models.get(name, 7, shape, **params)
    p = jax.jit(model.init)(jax.random.key(0))  # jitted: op by op, resnet18 took 28 s
    logits = jax.jit(model.apply)(p, jnp.ones((3, *shape)))
    assert logits.shape == (3, 7)
    assert np.all(np.isfinite(logits))


@pytest.mark.parametrize(
    "k,stride,padding", [(5, 1, "SAME"), (5, 1, "VALID"), (3, 2, 1), (1, 2, 0), (3, 1, "SAME")]
)
def test_patch_convolution_equals_xla_convolution(k, stride, padding):
    x = jax.random.normal(jax.random.key(1), (2, 9, 9, 3))
    conv_p = Conv(4, k, strides=stride, padding=padding, impl="patches")
    conv_x = Conv(4, k, strides=stride, padding=padding, impl="xla")
    params = conv_p.init(jax.random.key(0), x)
    params = jax.tree.map(lambda a: a + 0.1, params)  # non-zero bias too
    y_p, y_x = conv_p.apply(params, x), conv_x.apply(params, x)
    np.testing.assert_allclose(y_p, y_x, rtol=1e-5, atol=1e-5)

    def loss(p, conv):
        return jnp.sum(jnp.sin(conv.apply(p, x)))

    g_p, g_x = jax.grad(loss)(params, conv_p), jax.grad(loss)(params, conv_x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), g_p, g_x)


def test_pooling_before_relu_gives_the_same_values_and_gradients_with_ties():
    # rounded values: ties inside windows, exact zeros, all-negative windows
    x = jnp.round(2 * jax.random.normal(jax.random.key(0), (3, 8, 8, 4)))
    g = jax.random.normal(jax.random.key(1), (3, 4, 4, 4))
    before, vjp_before = jax.vjp(lambda x: jax.nn.relu(max_pool(x)), x)
    after, vjp_after = jax.vjp(lambda x: max_pool(jax.nn.relu(x)), x)
    np.testing.assert_array_equal(before, after)
    np.testing.assert_array_equal(vjp_before(g)[0], vjp_after(g)[0])
    assert float(jnp.mean(x == 0)) > 0.1  # the ties the claim is about


def test_unknown_model():
    with pytest.raises(ValueError, match="model.name"):
        models.get("vgg", 10, (8, 8, 1))


@pytest.mark.parametrize(
    "name,smallest,params",
    [("lenet5", 12, {}), ("alexnet", 15, {"fc": 16}), ("cnn", 4, {}), ("femnist_cnn", 4, {})],
)
def test_inputs_too_small_for_the_model(name, smallest, params):
    jax.eval_shape(models.get(name, 10, (smallest, smallest, 1), **params).init, jax.random.key(0))
    shape = (smallest - 1, smallest + 5, 1)
    # Used to be a ZeroDivisionError from flax's initialiser at init.
    pattern = rf"model.name: .*{re.escape(str(shape))}.*too small for '{name}'"
    with pytest.raises(ConfigError, match=pattern) as e:
        models.get(name, 10, shape, **params)
    assert f"at least {smallest}x{smallest}" in str(e.value)
    assert isinstance(e.value.__cause__, ZeroDivisionError)  # the original kept as the cause


def test_model_errors_unrelated_to_input_size_propagate():
    with pytest.raises(ValueError, match="groups") as e:  # 3 does not divide 8 channels
        models.get("resnet18", 10, (8, 8, 1), widths=(8, 8, 8, 8), groups=3)
    assert not isinstance(e.value, ConfigError)
