"""The models of the reference papers, as flax modules on NHWC images."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from fedjax_byz.models.layers import Conv, MLPBlock, max_pool


def _flatten(x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0], -1)


class MLP(nn.Module):
    """Fully connected network: flatten, ``hidden`` ReLU layers, linear classifier."""

    num_classes: int
    hidden: Sequence[int] = (128,)

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.num_classes)(MLPBlock(self.hidden)(_flatten(x)))


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al., 1998) for 28×28 / 32×32 inputs, ReLU and max pooling.

    conv 6@5×5 (same) → pool → conv 16@5×5 (valid) → pool → 120 → 84 → classes.
    """

    num_classes: int
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        x = nn.relu(max_pool(Conv(6, 5, padding="SAME", impl=self.conv_impl)(x)))
        x = nn.relu(max_pool(Conv(16, 5, padding="VALID", impl=self.conv_impl)(x)))
        return nn.Dense(self.num_classes)(MLPBlock((120, 84))(_flatten(x)))


class CNN(nn.Module):
    """A small two-block CNN for CPU-scaled runs on 8×8 to 32×32 images.

    conv ``c1``@3×3 → pool → conv ``c2``@3×3 → pool → ``hidden`` → classes.
    """

    num_classes: int
    channels: Sequence[int] = (32, 64)
    hidden: int = 128
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        for c in self.channels:
            x = nn.relu(max_pool(Conv(c, 3, impl=self.conv_impl)(x)))
        return nn.Dense(self.num_classes)(MLPBlock((self.hidden,))(_flatten(x)))


class FEMNISTCNN(nn.Module):
    """The FEMNIST CNN of LEAF (Caldas et al., 2018) for 28×28 inputs.

    conv 32@5×5 → pool → conv 64@5×5 → pool → 2048 → classes (62 for FEMNIST).
    """

    num_classes: int = 62
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        x = nn.relu(max_pool(Conv(32, 5, impl=self.conv_impl)(x)))
        x = nn.relu(max_pool(Conv(64, 5, impl=self.conv_impl)(x)))
        return nn.Dense(self.num_classes)(MLPBlock((2048,))(_flatten(x)))


class AlexNet(nn.Module):
    """AlexNet for 32×32 inputs, as used for CIFAR-10 by Shejwalkar & Houmansadr (NDSS
    2021) and the STRIKE paper (Table 5).

    conv 64@3×3/2 → pool → 192@3×3 → pool → 384@3×3 → 256@3×3 → 256@3×3 → pool →
    ``fc``·2 → classes. Dropout is left out so that local training is deterministic.
    """

    num_classes: int = 10
    fc: int = 4096
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        def conv(c, stride=1):
            return Conv(c, 3, strides=stride, padding=1, impl=self.conv_impl)

        x = nn.relu(max_pool(conv(64, 2)(x)))
        x = nn.relu(max_pool(conv(192)(x)))
        x = nn.relu(conv(384)(x))
        x = nn.relu(conv(256)(x))
        x = nn.relu(max_pool(conv(256)(x)))
        return nn.Dense(self.num_classes)(MLPBlock((self.fc, self.fc))(_flatten(x)))


class ResidualBlock(nn.Module):
    """Basic ResNet block with GroupNorm."""

    channels: int
    stride: int
    groups: int
    conv_impl: str

    @nn.compact
    def __call__(self, x):
        def conv(c, k, stride):
            pad = (k - 1) // 2
            return Conv(c, k, strides=stride, padding=pad, use_bias=False, impl=self.conv_impl)

        y = nn.relu(nn.GroupNorm(self.groups)(conv(self.channels, 3, self.stride)(x)))
        y = nn.GroupNorm(self.groups)(conv(self.channels, 3, 1)(y))
        if self.stride != 1 or x.shape[-1] != self.channels:
            x = nn.GroupNorm(self.groups)(conv(self.channels, 1, self.stride)(x))
        return nn.relu(x + y)


class ResNet18(nn.Module):
    """ResNet-18 (He et al., 2016), CIFAR stem (3×3 conv, no max pool), GroupNorm.

    Batch normalisation keeps running statistics that would have to be averaged across
    clients and mixes examples within a batch; GroupNorm (Wu & He, 2018; recommended for
    non-IID federated learning by Hsieh et al., ICML 2020) is stateless, so a vmapped
    client is a pure function of its own examples.
    """

    num_classes: int = 10
    widths: Sequence[int] = (64, 128, 256, 512)
    groups: int = 2
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        x = Conv(self.widths[0], 3, padding=1, use_bias=False, impl=self.conv_impl)(x)
        x = nn.relu(nn.GroupNorm(self.groups)(x))
        for i, c in enumerate(self.widths):
            for j in range(2):
                stride = 2 if i > 0 and j == 0 else 1
                x = ResidualBlock(c, stride, self.groups, self.conv_impl)(x)
        x = x.mean(axis=(1, 2))
        return nn.Dense(self.num_classes)(x)
