"""``ClientData``: every client's examples as one padded block the simulator vmaps over."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fedjax_byz.data.sources import Dataset


class ClientData(struct.PyTreeNode):
    """Clients' training examples padded to a common length, plus the test set.

    Attributes:
      x: ``[n, m_max, H, W, C]`` examples (uint8 or float32); rows past ``counts[i]`` are
        padding that no client ever trains on.
      y: int32 ``[n, m_max]`` labels (padding is 0).
      counts: int32 ``[n]`` number of real examples per client.
      x_test: ``[N_test, H, W, C]`` held-out examples for evaluation.
      y_test: int32 ``[N_test]``.
      mean: float32 ``[C]`` normalisation mean applied to every input.
      std: float32 ``[C]`` normalisation scale.
      num_classes: number of classes (static).
    """

    x: jax.Array
    y: jax.Array
    counts: jax.Array
    x_test: jax.Array
    y_test: jax.Array
    mean: jax.Array
    std: jax.Array
    num_classes: int = struct.field(pytree_node=False)

    @classmethod
    def from_partition(
        cls, dataset: Dataset, parts: list[np.ndarray], m_max: int | None = None
    ) -> ClientData:
        """Pads ``dataset``'s training examples, split as ``parts``, into blocks.

        ``m_max`` (default: the largest client) lets several partitions share shapes.
        """
        counts = np.array([len(p) for p in parts], np.int32)
        m = max(int(counts.max()), 1) if m_max is None else m_max
        if m < counts.max():
            raise ValueError(f"m_max={m} is below the largest client ({counts.max()})")
        n = len(parts)
        x = np.zeros((n, m, *dataset.input_shape), dataset.x_train.dtype)
        y = np.zeros((n, m), np.int32)
        for i, p in enumerate(parts):
            x[i, : len(p)] = dataset.x_train[p]
            y[i, : len(p)] = dataset.y_train[p]
        return cls(
            jnp.asarray(x),
            jnp.asarray(y),
            jnp.asarray(counts),
            jnp.asarray(dataset.x_test),
            jnp.asarray(dataset.y_test, jnp.int32),
            jnp.asarray(dataset.mean),
            jnp.asarray(dataset.std),
            dataset.num_classes,
        )

    @property
    def num_clients(self) -> int:
        return self.x.shape[0]

    def normalize(self, x: jax.Array) -> jax.Array:
        """Examples as float32, standardised per channel."""
        shape = (1,) * (x.ndim - 1) + (-1,)
        return (x.astype(jnp.float32) - self.mean.reshape(shape)) / self.std.reshape(shape)

    def label_histogram(self) -> np.ndarray:
        """``[n, num_classes]`` example counts per client and class (padding excluded)."""
        y, counts = np.asarray(self.y), np.asarray(self.counts)
        valid = np.arange(y.shape[1])[None, :] < counts[:, None]
        return np.stack(
            [np.bincount(y[i][valid[i]], minlength=self.num_classes) for i in range(len(y))]
        )
