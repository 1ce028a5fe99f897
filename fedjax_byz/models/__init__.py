"""Models by registry name, used through pure ``init``/``apply`` functions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_byz.models import zoo
from fedjax_byz.registry import ConfigError, Registry

MODELS = Registry("model")
_MODULE = ("name", "parent")  # flax's own dataclass fields, not hyperparameters
# ``dense``: no convolutions, so its clients vectorise well on a CPU too (see
# ``clients_at_once``) and its rounds are too short to split over CPU devices (see
# ``sim.run.Batch``).
MODELS.register("mlp", zoo.MLP, static=("hidden",), hidden=_MODULE, dense=True)
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


def _initializes(module: nn.Module, input_shape: tuple[int, ...]) -> Exception | None:
    """None if ``module`` initialises on ``[1, *input_shape]`` inputs, else the error.

    Traced abstractly (``jax.eval_shape``): no parameter is allocated.
    """
    dummy = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    try:
        jax.eval_shape(module.init, jax.random.key(0), dummy)
    except Exception as e:  # returned, then raised as is or as the cause by the caller
        return e
    return None


def _smallest_side(module: nn.Module, channels: int, limit: int = 256) -> int | None:
    """The smallest ``s`` such that ``module`` takes ``s×s×channels`` inputs, or None."""
    if _initializes(module, (limit, limit, channels)) is not None:
        return None
    lo, hi = 1, limit  # hi works; find the first that does (sizes that work are upward-closed)
    while lo < hi:
        mid = (lo + hi) // 2
        if _initializes(module, (mid, mid, channels)) is None:
            hi = mid
        else:
            lo = mid + 1
    return lo


def get(name: str, num_classes: int, input_shape: tuple[int, ...], **params: Any) -> Model:
    """Builds the model ``name`` for inputs of ``input_shape`` (without batch axis).

    Raises:
      ConfigError: naming ``model.name`` when the model cannot take inputs of
        ``input_shape`` because they are too small (e.g. ``lenet5`` needs at least 12×12,
        ``alexnet`` 15×15, ``cnn`` and ``femnist_cnn`` 4×4); other failures of the
        model's initialisation propagate unchanged.
    """
    entry = MODELS.entry(name, "model.name")
    entry.check_params(params, "model")
    module = entry.factory(
        num_classes=num_classes,
        **{k: tuple(v) if isinstance(v, list) else v for k, v in params.items()},
    )
    input_shape = tuple(input_shape)
    error = _initializes(module, input_shape)
    if error is not None:
        side = _smallest_side(module, input_shape[-1]) if len(input_shape) == 3 else None
        if side is None or min(input_shape[:2]) >= side:
            raise error  # not (only) a matter of input size: the model's own failure
        raise ConfigError(
            f"model.name: inputs of shape {input_shape} are too small for {name!r}, which "
            f"needs images of at least {side}x{side}; use a larger dataset or a model for "
            f"small images (mlp, cnn)."
        ) from error
    dummy = jnp.zeros((1, *input_shape), jnp.float32)
    return Model(lambda key: module.init(key, dummy), module.apply, name)


def clients_at_once(name: str, participants: int, backend: str) -> int:
    """``client_parallelism: auto`` resolved: all ``participants`` at once (``vmap``) on
    accelerators and, on a CPU, for dense models (one matrix product over every client's
    batch in a round's first local step: 1.3-1.5x faster for the MLPs of
    ``benchmarks/round_speed.py``); convolutional models one after another on a CPU
    (``lax.map``: XLA's CPU convolutions and patch products run slower under ``vmap``)."""
    if backend != "cpu" or is_dense(name):
        return participants
    return 1


def is_dense(name: str) -> bool:
    """Whether model ``name`` has no convolutions (its ``dense`` mark in ``MODELS``)."""
    return MODELS.entry(name, "model.name").meta.get("dense", False)


def names() -> list[str]:
    return MODELS.names()
