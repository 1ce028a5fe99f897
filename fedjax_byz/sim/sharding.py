"""One program over many devices: a sweep's batch axis and a round's client axis.

The devices form a two-axis ``Mesh``: ``batch`` splits the cells of a vmapped sweep batch
(independent runs: no communication but the metrics), ``clients`` splits the participants
of every round. Local training runs under ``shard_map``, each device training its own
slice of the participants one after another (their data-dependent loops stay local); the
update matrix ``f32[m, d]`` is then laid out by columns, so coordinate-wise rules sort
their own coordinates on each device and distance-based and spectral rules reduce partial
Gram matrices across devices (XLA inserts the collectives). With one device there is no
mesh and the program is the unsharded one.

Multi-host: call ``initialize_distributed()`` first in every process; ``jax.devices()``
then lists every host's devices and the same mesh spans them.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fedjax_byz.registry import ConfigError

BATCH, CLIENTS = "batch", "clients"


def initialize_distributed(**kwargs: Any) -> None:
    """Joins a multi-host job: ``jax.distributed.initialize(**kwargs)`` (coordinator address,
    process count and id; detected automatically under SLURM, Open MPI and on TPU pods).
    Call it before anything touches a device."""
    jax.distributed.initialize(**kwargs)


def cpu_cores() -> int:
    """The CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def use_cpu_cores(count: int | None = None) -> bool:
    """Makes JAX's CPU backend ``count`` devices (default: the cores this process may
    use), one per core, so that a run on a CPU splits every round's clients over them.

    XLA's CPU backend runs a program's small operations on one core: a round of LeNet-5
    clients one after another (``client_parallelism``) ran 1.8x faster or more split over
    two devices on this project's 2-core CPU (``benchmarks/round_speed.py``). It takes
    effect only before JAX's first operation and not where ``XLA_FLAGS`` already sets
    ``--xla_force_host_platform_device_count``; ``fedjax-byz`` calls it at start. Returns
    whether it took effect.

    It also makes the LAPACK kernels of JAX's CPU backend (SciPy's OpenBLAS, loaded at
    JAX's first linear-algebra call) single-threaded unless ``OPENBLAS_NUM_THREADS`` is
    set: its threads contended with XLA's and, with several devices, with the other
    devices' copies of the same call (DnC's SVD of a 100 x 1000 sample: 15 ms on one
    device, 28 ms on two, 9 ms on either with one thread).
    """
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return False
    try:
        jax.config.update("jax_num_cpu_devices", cpu_cores() if count is None else count)
    except RuntimeError:  # JAX has started: its devices are fixed
        return False
    return True


def make_mesh(batch: int, devices: int | None = None) -> Mesh | None:
    """The ``(batch, clients)`` mesh over the first ``devices`` devices (all by default).

    The batch axis gets ``gcd(batch, devices)`` devices (so it divides the cells evenly),
    the client axis the rest. Returns ``None`` for a single device.
    """
    available = jax.device_count()
    count = available if devices is None else devices
    if not (isinstance(count, int) and 1 <= count <= available):
        raise ConfigError(
            f"devices (sweep.devices in a config): must be null (all) or an integer between "
            f"1 and the {available} device(s) JAX sees, got {devices!r}."
        )
    if count == 1:
        return None
    b = math.gcd(batch, count)
    return Mesh(np.asarray(jax.devices()[:count]).reshape(b, count // b), (BATCH, CLIENTS))


def batch_sharding(mesh: Mesh | None, batched: bool) -> NamedSharding | None:
    """Leading axis split over ``batch`` (or replicated when not batched)."""
    if mesh is None:
        return None
    return NamedSharding(mesh, P(BATCH) if batched else P())


def over_clients(fn: Callable, shared: Any, per_client: Any, mesh: Mesh | None) -> Any:
    """``fn(shared, per_client)`` with the leading client axis ``m`` of ``per_client`` (and
    of every output) split over the mesh's ``clients`` devices.

    Each device runs ``fn`` on its own ``⌈m / k⌉`` clients; ``shared`` (model, numbers,
    data) is replicated. When ``k`` does not divide ``m`` the first clients are repeated to
    fill the last slots and their results dropped. ``check_vma`` is off: a client's loops
    carry values that start replicated and become per-device.
    """
    if mesh is None:
        return fn(shared, per_client)
    k = mesh.shape[CLIENTS]
    m = jax.tree.leaves(per_client)[0].shape[0]
    take = jnp.arange(-(-m // k) * k) % m
    padded = jax.tree.map(lambda a: a[take], per_client)
    out = jax.shard_map(
        fn, mesh=mesh, in_specs=(P(), P(CLIENTS)), out_specs=P(CLIENTS), check_vma=False
    )(shared, padded)
    return jax.tree.map(lambda a: a[:m], out)


def spread_columns(updates: jax.Array, mesh: Mesh | None) -> jax.Array:
    """The update matrix ``[m, d]`` laid out by columns over the ``clients`` devices (on
    CPU devices only when they divide ``d``, else replicated: see ``column_devices``)."""
    if mesh is None:
        return updates
    uneven = updates.shape[1] % mesh.shape[CLIENTS] and jax.default_backend() == "cpu"
    spec = P() if uneven else P(None, CLIENTS)
    return jax.lax.with_sharding_constraint(updates, NamedSharding(mesh, spec))


def columns_split(mesh: Mesh | None):
    """Context for the attack and the rule of a round whose update matrix
    ``spread_columns`` laid out: column passes (``ops.scan_columns``) then run on each
    device's own columns (``column_devices``)."""
    if mesh is None:
        return contextlib.nullcontext()
    return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def column_devices(d: int):
    """Inside ``columns_split``, the (abstract) mesh whose ``clients`` CPU devices each
    hold a slice of the ``d`` columns ``spread_columns`` laid out; else ``None``.

    XLA partitions a loop over column blocks of such a matrix by gathering the whole
    matrix on every device first (krum 5x slower on 2 CPU devices than on one);
    ``ops.scan_columns`` runs a ``shard_map`` over this mesh instead, each device on its
    own columns.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if jax.default_backend() != "cpu" or mesh.empty or CLIENTS not in mesh.shape:
        return None
    k = mesh.shape[CLIENTS]
    if k == 1 or mesh.shape.get(BATCH, 1) != 1 or d % k:
        return None
    return mesh


def place(tree: Any, sharding: NamedSharding | None) -> Any:
    """Host or device arrays as global arrays with ``sharding`` (every process passes the
    same full values, as every process of a multi-host run builds the same batch)."""
    if sharding is None:
        return tree
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree.map(lambda a: _global(a, sharding), tree)


def _global(a: jax.Array, sharding: NamedSharding) -> jax.Array:
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
        data = _global(jax.random.key_data(a), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(a))
    host = np.asarray(a)
    return jax.make_array_from_callback(host.shape, sharding, lambda i: host[i])


def fetch(tree: Any) -> Any:
    """Arrays to host numpy, gathered from every process in a multi-host run."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)
