"""``simulate(config)``: one experiment from config to results, in compiled chunks."""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from fedjax_byz import data as data_lib
from fedjax_byz.sim.config import Config, DataConfig, from_dict, validate
from fedjax_byz.sim.program import HParams, StaticConfig, make_program


def enable_compilation_cache(path: str | None = None) -> None:
    """Turns on JAX's persistent compilation cache (``$FEDJAX_BYZ_CACHE/jax`` by default),
    so a rerun of the same structure does not recompile."""
    root = path or os.path.join(
        os.environ.get("FEDJAX_BYZ_CACHE", os.path.expanduser("~/.cache/fedjax_byz")), "jax"
    )
    jax.config.update("jax_compilation_cache_dir", root)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _freeze(x):
    if isinstance(x, Mapping):
        return tuple(sorted((k, _freeze(v)) for k, v in x.items()))
    if isinstance(x, list | tuple):
        return tuple(_freeze(v) for v in x)
    return x


@functools.lru_cache(maxsize=8)
def _client_data(key: tuple) -> data_lib.ClientData:
    dcfg, seed = dict(key[0]), key[1]
    params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(dcfg["params"]).items()}
    dataset = data_lib.load(dcfg["source"], **params)
    kw = {
        "dirichlet": {"beta": dcfg["beta"]},
        "shards": {"s": dcfg["s"], "shards_per_client": dcfg["shards_per_client"]},
        "natural": {"groups": dataset.groups},
    }.get(dcfg["partition"], {})
    parts = data_lib.partition(dcfg["partition"], dataset.y_train, dcfg["num_clients"], seed, **kw)
    return data_lib.ClientData.from_partition(dataset, parts)


def client_data(dcfg: DataConfig, seed: int) -> data_lib.ClientData:
    """Loads and partitions the data of ``dcfg`` (cached in memory across runs)."""
    return _client_data((_freeze(dcfg.__dict__), seed))


@functools.lru_cache(maxsize=32)
def _programs(static: StaticConfig):
    program = make_program(static)
    return program, jax.jit(program.init), {}


def _periods_per_chunk(total: int, target: int) -> int:
    """The largest divisor of ``total`` periods that is at most ``target``."""
    return max(d for d in range(1, min(total, target) + 1) if total % d == 0)


def compiled_run(static: StaticConfig, state, hp, data, periods: int):
    """The compiled ``run`` for these shapes (compiled once per process), and its compile time."""
    program, _, cache = _programs(static)
    spec = jax.tree.map(lambda a: (a.shape, str(a.dtype)), (state, hp, data))
    key = (periods, jax.tree.structure((state, hp, data)), tuple(jax.tree.leaves(spec)))
    if key not in cache:
        t0 = time.perf_counter()
        jitted = jax.jit(program.run, static_argnums=3, donate_argnums=0)
        cache[key] = (jitted.lower(state, hp, data, periods).compile(), time.perf_counter() - t0)
        return cache[key]
    return cache[key][0], 0.0


def simulate(
    config: Config | Mapping[str, Any],
    *,
    progress: bool = True,
    chunk_periods: int = 10,
) -> dict[str, Any]:
    """Runs one federated training experiment.

    Args:
      config: a ``Config`` or its plain-dict/YAML form (no grid lists).
      progress: show a progress bar.
      chunk_periods: evaluation periods per compiled call (between progress updates).

    Returns:
      A JSON-serialisable dict: ``config``; per round ``train_loss``, ``byz_weight`` (weight
      the rule gave Byzantine clients, NaN for coordinate-wise rules), ``agg_error``
      (‖aggregate − honest mean‖), ``agg_norm``, ``nonfinite`` (rows dropped); per
      evaluation ``eval_rounds``, ``test_acc``, ``test_loss``; ``final_acc``, ``best_acc``,
      ``compile_time``, ``wall_time`` (seconds), ``byzantine_clients``.
    """
    cfg = config if isinstance(config, Config) else from_dict(config)
    validate(cfg)
    data = client_data(cfg.data, cfg.seed)
    static = StaticConfig.from_config(cfg, data.num_classes, data.x.shape[2:])
    hp = HParams.from_config(cfg)
    _, init, _ = _programs(static)

    t_start = time.perf_counter()
    state = init(jax.random.key(cfg.seed), hp, data)
    total = cfg.server.rounds // cfg.server.eval_every
    periods = _periods_per_chunk(total, chunk_periods)
    run, compile_time = compiled_run(static, state, hp, data, periods)

    rounds, evals = [], []
    bar = _progress(cfg, progress)
    for _ in range(total // periods):
        state, (rm, em) = run(state, hp, data)
        rm, em = jax.device_get((rm, em))
        rounds.append(rm)
        evals.append(em)
        bar.update(periods * cfg.server.eval_every)
        bar.set_postfix(acc=f"{float(em['test_acc'][-1]):.3f}")
    bar.close()
    wall = time.perf_counter() - t_start

    cat = {k: np.concatenate([r[k] for r in rounds]) for k in rounds[0]}
    ev = {k: np.concatenate([e[k] for e in evals]) for k in evals[0]}
    acc = ev["test_acc"]
    return {
        "name": cfg.name,
        "config": cfg.to_dict(),
        **{k: v.tolist() for k, v in cat.items()},
        "eval_rounds": list(
            range(cfg.server.eval_every, cfg.server.rounds + 1, cfg.server.eval_every)
        ),
        "test_acc": acc.tolist(),
        "test_loss": ev["test_loss"].tolist(),
        "final_acc": float(acc[-1]),
        "best_acc": float(np.max(acc)),
        "final_loss": float(ev["test_loss"][-1]),
        "compile_time": compile_time,
        "wall_time": wall,
        "seconds_per_round": (wall - compile_time) / cfg.server.rounds,
        "byzantine_clients": np.flatnonzero(np.asarray(state.byz)).tolist(),
    }


def _progress(cfg: Config, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=cfg.server.rounds, desc=cfg.name, unit="round", disable=not enabled, leave=False
    )


def save_json(result: Mapping[str, Any], path: str | Path) -> None:
    """Writes ``result`` atomically as JSON (NaN written as null)."""
    import json

    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, Mapping):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        return x

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(clean(result), indent=1))
    os.replace(tmp, path)
