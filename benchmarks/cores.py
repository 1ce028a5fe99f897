"""Timing a rule or an attack as a simulated round runs it on the CPU's cores as devices.

``fedjax-byz`` makes each core a JAX device (``fb.use_cpu_cores()``, called by a script
before JAX starts); a round then lays its update matrix out by columns over them
(``sharding.spread_columns``) and runs the attack's and the rule's column passes on each
device's own columns (``sharding.columns_split``). ``fb.aggregate`` and ``fb.attack`` on
a plain array run on one device.
"""

from __future__ import annotations

import jax
import numpy as np

from fedjax_byz.sim import sharding


def spread(G: np.ndarray, mesh) -> jax.Array:
    """``G [n, d]`` laid out as a round lays out its update matrix over ``mesh``."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    placed = sharding.place(G, replicated)
    return jax.block_until_ready(jax.jit(lambda G: sharding.spread_columns(G, mesh))(placed))


def on_columns(fn, mesh, **jit_kwargs):
    """``fn`` jitted with its column passes on each device's own columns."""

    def run(*args):
        with sharding.columns_split(mesh):
            return fn(*args)

    return jax.jit(run, **jit_kwargs)
