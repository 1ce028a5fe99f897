"""Grids: cells of a config with lists, their identities, and their grouping by structure.

Every list in a config is a grid axis and the sweep is the product of the axes. Cells
whose configs differ only in numbers (``BATCHABLE`` fields and the numeric parameters of
the attack and the rule) share one compiled program and are batched together; cells that
differ in anything else (attack, rule, model, dataset, ``n``, ...) form separate groups.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from fedjax_byz import attacks
from fedjax_byz.registry import ConfigError, is_int, is_number
from fedjax_byz.sim import config as config_lib
from fedjax_byz.sim.program import split_aggregator_params
from fedjax_byz.sim.run import BATCH_MODES, digest, structure_key

# Fields that never change the compiled program's shapes: a sweep may batch them.
BATCHABLE = frozenset(
    {
        "seed",
        "data.seed",
        "data.beta",
        "data.min_size",
        "data.s",
        "train.lr",
        "train.momentum",
        "train.weight_decay",
        "train.clip_norm",
        "server.lr",
        "server.momentum",
        "attack.num_byzantine",
        "aggregator.assumed_byzantine",
    }
)

SWEEP_DEFAULTS = {
    "mode": "auto",
    "vmap": None,
    "max_batch": None,
    "memory_fraction": 0.5,
    "devices": None,
    "threads": None,
}


@dataclasses.dataclass(frozen=True)
class Cell:
    """One experiment of the grid.

    Attributes:
      config: its validated config.
      grid: ``{dotted field: value}`` of the grid axes at this cell.
      key: a stable hash of the config, the cell's identity in the results store.
    """

    config: config_lib.Config
    grid: Mapping[str, Any]
    key: str


def cell_key(cfg: config_lib.Config) -> str:
    """A stable identity: the digest of the config's canonical JSON (``run.digest``)."""
    return digest(cfg.identity())[:16]


def split_options(raw: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Separates the ``sweep:`` section (how to run) from the experiment config."""
    raw = dict(raw)
    opts = dict(SWEEP_DEFAULTS)
    given = raw.pop("sweep", None) or {}
    if not isinstance(given, Mapping):
        raise ConfigError(f"sweep: expected a mapping of settings, got {given!r}.")
    for k, v in given.items():
        if k not in SWEEP_DEFAULTS:
            raise ConfigError(f"sweep.{k}: unknown setting; allowed: {sorted(SWEEP_DEFAULTS)}.")
        opts[k] = v
    if opts["mode"] not in BATCH_MODES:
        raise ConfigError(f"sweep.mode: must be one of {list(BATCH_MODES)}, got {opts['mode']!r}.")
    vmap, fraction = opts["vmap"], opts["memory_fraction"]
    if vmap is not None and not (isinstance(vmap, list) and all(isinstance(f, str) for f in vmap)):
        raise ConfigError(f"sweep.vmap: must be a list of dotted field names, got {vmap!r}.")
    for k in ("max_batch", "devices", "threads"):
        v = opts[k]
        if v is not None and not (is_int(v) and v >= 1):
            raise ConfigError(f"sweep.{k}: must be a positive integer or null, got {v!r}.")
    if not (is_number(fraction) and 0 < fraction <= 1):
        raise ConfigError(f"sweep.memory_fraction: must be in (0, 1], got {fraction!r}.")
    return raw, opts


def numeric_fields(cfg: config_lib.Config) -> set[str]:
    """The dotted fields of ``cfg`` a sweep may batch (``BATCHABLE`` plus numeric knobs)."""
    _, atk = attacks.ATTACKS.entry(cfg.attack.name).split(cfg.attack.params)
    _, agg = split_aggregator_params(cfg.aggregator.name, cfg.aggregator.params)
    return set(BATCHABLE) | {f"attack.{k}" for k in atk} | {f"aggregator.{k}" for k in agg}


def expand_cells(raw: Mapping[str, Any], vmap: list[str] | None = None) -> list[Cell]:
    """Every cell of the grid, validated (one clear error before anything compiles)."""
    cells, seen = [], {}
    for cell_raw, grid in config_lib.expand(raw):
        cfg = config_lib.from_dict(cell_raw)
        config_lib.validate(cfg)
        cell = Cell(cfg, grid, cell_key(cfg))
        if cell.key in seen:
            raise ConfigError(
                f"grid: two cells are the same experiment ({describe(seen[cell.key])} and "
                f"{describe(cell)}): a value listed twice, or a grid variant overriding "
                "another axis."
            )
        seen[cell.key] = cell
        cells.append(cell)
    if vmap is not None:
        allowed = numeric_fields(cells[0].config)
        for field in vmap:
            if field not in allowed:
                raise ConfigError(
                    f"sweep.vmap: {field!r} changes the program's structure and cannot be "
                    f"batched; batchable fields: {sorted(allowed)}."
                )
    return cells


def group_cells(
    cells: list[Cell], vmap: list[str] | None = None, branches: bool = False
) -> list[list[Cell]]:
    """Cells grouped by compiled structure, in grid order; with ``branches`` (cells run
    one after another), cells differing only in their attacks and rules share a group,
    whose program takes them as branches; with ``vmap`` given, cells that differ in a
    grid axis outside it go to different groups of the same structure."""
    groups: dict[tuple, list[Cell]] = {}
    for cell in cells:
        key = structure_key(cell.config, branches)
        if vmap is not None:
            fixed = tuple(
                (k, json.dumps(v, sort_keys=True, default=str))
                for k, v in cell.grid.items()
                if k not in vmap
            )
            key = (key, fixed)
        groups.setdefault(key, []).append(cell)
    return list(groups.values())


def describe(cell: Cell, width: int = 60) -> str:
    """A short label of a cell from its grid values."""
    parts = []
    for k, v in cell.grid.items():
        if isinstance(v, Mapping):
            v = ",".join(f"{a}={b}" for a, b in v.items())
        parts.append(f"{k}={v}")
    text = " ".join(parts) or cell.config.name
    return text if len(text) <= width else text[: width - 1] + "…"
