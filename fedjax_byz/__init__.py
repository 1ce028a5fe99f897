"""fedjax_byz: a vectorized JAX simulator for Byzantine-robust federated learning."""

from fedjax_byz import aggregators, attacks
from fedjax_byz.aggregators import aggregate
from fedjax_byz.attacks import attack
from fedjax_byz.registry import ConfigError

__all__ = ["ConfigError", "aggregate", "aggregators", "attack", "attacks"]
__version__ = "0.1.0"
