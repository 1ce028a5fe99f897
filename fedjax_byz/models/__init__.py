"""Models by registry name, used through pure ``init``/``apply`` functions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_byz.models import zoo
from fedjax_byz.registry import Registry

MODELS = Registry("model")
_MODULE = ("name", "parent")  # flax's own dataclass fields, not hyperparameters
MODELS.register("mlp", zoo.MLP, static=("hidden",), hidden=_MODULE)
MODELS.register("lenet5", zoo.LeNet5, static=("conv_impl",), hidden=_MODULE)
MODELS.register("cnn", zoo.CNN, static=("channels", "hidden", "conv_impl"), hidden=_MODULE)
MODELS.register("femnist_cnn", zoo.FEMNISTCNN, static=("conv_impl",), hidden=_MODULE)
MODELS.register("alexnet", zoo.AlexNet, static=("fc", "conv_impl"), hidden=_MODULE)
MODELS.register("resnet18", zoo.ResNet18, static=("widths", "groups", "conv_impl"), hidden=_MODULE)

Params = Any


class Model(NamedTuple):
    """A classifier as pure functions.

    Attributes:
      init: ``key -> params``.
      apply: ``(params, x[B, H, W, C]) -> logits[B, num_classes]``.
      name: registry name.
    """

    init: Callable[[jax.Array], Params]
    apply: Callable[[Params, jax.Array], jax.Array]
    name: str


def get(name: str, num_classes: int, input_shape: tuple[int, ...], **params: Any) -> Model:
    """Builds the model ``name`` for inputs of ``input_shape`` (without batch axis)."""
    entry = MODELS.entry(name, "model.name")
    entry.check_params(params, "model")
    module = entry.factory(
        num_classes=num_classes,
        **{k: tuple(v) if isinstance(v, list) else v for k, v in params.items()},
    )
    dummy = jnp.zeros((1, *input_shape), jnp.float32)
    return Model(lambda key: module.init(key, dummy), module.apply, name)


def names() -> list[str]:
    return MODELS.names()
