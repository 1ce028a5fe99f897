"""fedjax_byz: a vectorized JAX simulator for Byzantine-robust federated learning."""

from fedjax_byz import aggregators, attacks, data, models, sim
from fedjax_byz.aggregators import aggregate
from fedjax_byz.attacks import attack
from fedjax_byz.host_memory import reuse_host_memory
from fedjax_byz.registry import ConfigError
from fedjax_byz.sim import simulate
from fedjax_byz.sim.sharding import use_cpu_cores
from fedjax_byz.sweep import load_results, sweep

__all__ = [
    "ConfigError",
    "aggregate",
    "aggregators",
    "attack",
    "attacks",
    "data",
    "load_results",
    "models",
    "reuse_host_memory",
    "sim",
    "simulate",
    "sweep",
    "use_cpu_cores",
]
__version__ = "0.1.0"
