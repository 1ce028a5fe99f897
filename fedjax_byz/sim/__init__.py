"""The simulator: configs, the compiled round program, and ``simulate``."""

from fedjax_byz.sim.config import Config, expand, from_dict, load_yaml, validate
from fedjax_byz.sim.program import HParams, ServerState, StaticConfig, make_program
from fedjax_byz.sim.run import (
    Batch,
    client_data,
    enable_compilation_cache,
    run_batch,
    save_json,
    simulate,
    structure_key,
)

__all__ = [
    "Batch",
    "Config",
    "HParams",
    "ServerState",
    "StaticConfig",
    "client_data",
    "enable_compilation_cache",
    "expand",
    "from_dict",
    "load_yaml",
    "make_program",
    "run_batch",
    "save_json",
    "simulate",
    "structure_key",
    "validate",
]
