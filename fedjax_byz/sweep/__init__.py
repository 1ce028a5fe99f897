"""Sweeps: grids compiled once per structure, batched, stored resumably, reported."""

from fedjax_byz.sweep.grid import BATCHABLE, Cell, expand_cells, group_cells
from fedjax_byz.sweep.runner import sweep
from fedjax_byz.sweep.store import ResultStore, load_results

__all__ = [
    "BATCHABLE",
    "Cell",
    "ResultStore",
    "expand_cells",
    "group_cells",
    "load_results",
    "sweep",
]
