"""Running experiments: one config (``simulate``) or a batch of same-structure configs.

A batch shares one compiled program: its configs differ only in numbers (seeds, learning
rates, true and assumed ``f``, attack and rule knobs, the partition), which are stacked
and mapped over with ``vmap`` (or ``lax.map``). Runs advance in jitted chunks of a few
evaluation periods, called from Python for the progress bar and, optionally, a
checkpoint after every chunk from which an interrupted run resumes.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh

from fedjax_byz import data as data_lib
from fedjax_byz import models
from fedjax_byz.registry import ConfigError
from fedjax_byz.sim import sharding
from fedjax_byz.sim.config import Config, DataConfig, check_files, from_dict, grid_axes, validate
from fedjax_byz.sim.program import (
    HParams,
    StaticConfig,
    aggregator_branch,
    attack_branch,
    make_program,
)

BATCH_MODES = ("auto", "vmap", "map")


def enable_compilation_cache(path: str | None = None) -> None:
    """Turns on JAX's persistent compilation cache (``$FEDJAX_BYZ_CACHE/jax`` by default),
    so a rerun of the same structure does not recompile."""
    root = path or os.path.join(
        os.environ.get("FEDJAX_BYZ_CACHE", os.path.expanduser("~/.cache/fedjax_byz")), "jax"
    )
    jax.config.update("jax_compilation_cache_dir", root)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def freeze(x):
    """A hashable copy of nested mappings and lists."""
    if isinstance(x, Mapping):
        return tuple(sorted((k, freeze(v)) for k, v in x.items()))
    if isinstance(x, list | tuple):
        return tuple(freeze(v) for v in x)
    return x


def _thaw(x):
    return list(x) if isinstance(x, tuple) else x


@functools.lru_cache(maxsize=4)
def _dataset(source: str, params: tuple) -> data_lib.Dataset:
    return data_lib.load(source, **{k: _thaw(v) for k, v in params})


@functools.lru_cache(maxsize=16)
def _parts(dkey: tuple, seed: int) -> tuple[np.ndarray, ...]:
    d = dict(dkey)
    dataset = _dataset(d["source"], d["params"])
    kw = {
        "dirichlet": {"beta": d["beta"], "min_size": d["min_size"]},
        "shards": {"s": d["s"], "shards_per_client": d["shards_per_client"]},
        "natural": {"groups": dataset.groups},
    }.get(d["partition"], {})
    return tuple(data_lib.partition(d["partition"], dataset.y_train, d["num_clients"], seed, **kw))


def partition_of(dcfg: DataConfig, seed: int) -> tuple[np.ndarray, ...]:
    """The clients' example indices for ``dcfg`` and partition ``seed`` (cached)."""
    return _parts(freeze(dcfg.__dict__), seed)


@functools.lru_cache(maxsize=8)
def _client_data(dkey: tuple, seed: int, m_max: int | None) -> data_lib.ClientData:
    d = dict(dkey)
    return data_lib.ClientData.from_partition(
        _dataset(d["source"], d["params"]), list(_parts(dkey, seed)), m_max
    )


def client_data(dcfg: DataConfig, seed: int, m_max: int | None = None) -> data_lib.ClientData:
    """Loads and partitions the data of ``dcfg`` (cached in memory across runs)."""
    return _client_data(freeze(dcfg.__dict__), seed, m_max)


def data_seed(cfg: Config) -> int:
    """The partition seed: ``data.seed``, or the run's seed when it is unset."""
    return cfg.seed if cfg.data.seed is None else cfg.data.seed


@functools.lru_cache(maxsize=32)
def _program(static: StaticConfig, mesh: Mesh | None):
    return make_program(static, mesh)


def periods_per_chunk(total: int, target: int) -> int:
    """The largest divisor of ``total`` periods that is at most ``target``."""
    return max(d for d in range(1, min(total, target) + 1) if total % d == 0)


def batch_mode(mode: str) -> str:
    """``"auto"`` resolved: ``"map"`` on the CPUs of one process (XLA's CPU backend runs a
    batch of small programs one after another faster than vectorised: 1.5x on the digits
    MLP grid of ``benchmarks/sweep_speed.py``, as the clients inside a round, see
    ``client_parallelism``; several CPU devices, ``sharding.use_cpu_cores``, split each
    run's clients instead), else ``"vmap"`` (and the batch axis spread over devices)."""
    if mode != "auto":
        return mode
    local_cpu = jax.default_backend() == "cpu" and jax.process_count() == 1
    return "map" if local_cpu else "vmap"


def default_threads() -> int:
    """Cells a ``"map"`` batch runs at once, one per thread: the CPU cores this process may
    use. XLA's CPU backend runs a small program mostly on one core; two threads ran the
    digits MLP grid of ``benchmarks/sweep_speed.py`` 1.1-1.5x faster than one here."""
    return sharding.cpu_cores()


def _stack(trees: Sequence[Any]) -> Any:
    return jax.tree.map(lambda *a: jnp.stack(a), *trees)


def _take(tree, index: np.ndarray):
    return jax.tree.map(lambda x: x[index], tree)


class Batch:
    """Configs sharing one program, with their stacked numbers and data.

    Args:
      cfgs: configs of the same structure (``structure_key``; in ``"map"`` mode their
        attacks and rules may differ: the program takes them as branches); one config
        runs unbatched.
      mode: ``"vmap"`` vectorises the configs, ``"map"`` runs them one after another in
        the same compiled program, ``"auto"`` (``batch_mode``) picks ``"map"`` on the CPUs
        of one process and ``"vmap"`` otherwise.
      devices: how many devices to spread the batch over (``None``: every device JAX
        sees, except that in ``"map"`` mode on CPU devices a dense model's clients stay
        on one); see ``sharding.make_mesh`` and ``sharding.use_cpu_cores``.
      group: configs whose attacks and rules the program takes as branches (default
        ``cfgs``): a sweep passes a batch's whole group, so its batches share a program.
      threads: in ``"map"`` mode, how many cells run at once, each thread running its
        share of the cells one after another in the same compiled program (``None``:
        ``default_threads()`` divided by the devices each cell runs on). The shares are
        equal: a short one repeats its last cell, and the copy's results are dropped.
      size: in ``"map"`` mode, run as a batch of at least this many cells, the last one
        repeated (its copies' results dropped): batches of a few sizes then share one
        compiled program.
    """

    def __init__(
        self,
        cfgs: Sequence[Config],
        mode: str = "auto",
        devices: int | None = None,
        group: Sequence[Config] | None = None,
        threads: int | None = None,
        size: int | None = None,
    ):
        if mode not in BATCH_MODES:
            raise ValueError(f"batch mode must be one of {BATCH_MODES}, got {mode!r}")
        if threads is not None and not (isinstance(threads, int) and threads >= 1):
            raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
        mode = batch_mode(mode)
        self.cfgs = list(cfgs)
        for cfg in self.cfgs:
            validate(cfg)
            check_files(cfg)
        group = self.cfgs if group is None else list(group)
        keys = {structure_key(c, branches=mode == "map") for c in self.cfgs + group}
        if len(keys) != 1:
            raise ValueError("a batch must hold configs of one structure")
        self.mode = mode
        cfg0 = self.cfgs[0]
        self.batched = len(self.cfgs) > 1
        runs = max(len(self.cfgs), size or 0) if mode == "map" and self.batched else len(self.cfgs)
        # Every batch of a group runs one compiled program, so the data's shapes follow
        # the group: each client's block padded to the largest of the group's partitions,
        # and the partitions stacked whenever the group has several (in "map" mode, one
        # slot per distinct partition, as many slots as the group has, up to the cells
        # run; spare slots repeat the last partition).

        def data_key(c: Config) -> tuple:
            return freeze(c.data.__dict__), data_seed(c)

        first: dict[tuple, Config] = {}  # each partition's first config, in order
        for c in self.cfgs + group:
            first.setdefault(data_key(c), c)
        data_keys = [data_key(c) for c in self.cfgs]
        distinct = list(dict.fromkeys(data_keys))
        several = len(first) > 1
        m_max = None
        if several:
            m_max = max(max(len(p) for p in partition_of(c.data, k[1])) for k, c in first.items())
        datas = [client_data(first[k].data, k[1], m_max) for k in distinct]
        self.data_axis = 0 if several and self.batched else None
        self.data_index = np.asarray([distinct.index(k) for k in data_keys], np.int32)
        if self.data_axis is None:
            self.data = datas[0]
        elif mode == "vmap":
            self.data = _stack([datas[i] for i in self.data_index])
        else:
            spare = datas[-1:] * (min(len(first), runs) - len(datas))
            self.data = (_stack(datas + spare), jnp.asarray(self.data_index))
        self.num_classes = datas[0].num_classes
        self.static = StaticConfig.from_config(group, self.num_classes, datas[0].x.shape[2:])
        cpu_map = mode == "map" and jax.default_backend() == "cpu"
        if devices is None and cpu_map and models.is_dense(cfg0.model.name):
            devices = 1  # a dense model's round is shorter than an exchange between devices
        self.mesh = sharding.make_mesh(len(self.cfgs) if mode == "vmap" else 1, devices)
        self.program = _program(self.static, self.mesh)
        hps = [HParams.from_config(c, self.static) for c in self.cfgs]
        keys = [jax.random.key(c.seed) for c in self.cfgs]
        self.hp = self.place(_stack(hps) if self.batched else hps[0])
        self.keys = self.place(jnp.stack(keys) if self.batched else keys[0])
        self.data = sharding.place(
            self.data, sharding.batch_sharding(self.mesh, self.data_axis is not None)
        )
        self.counts = np.stack([np.asarray(d.counts) for d in datas])[self.data_index]  # [cells, n]
        self.rounds = cfg0.server.rounds
        self.eval_every = cfg0.server.eval_every
        if threads is None:  # the cores left to each thread's devices
            threads = max(1, default_threads() // (1 if self.mesh is None else self.mesh.size))
        self.threads = min(threads, len(self.cfgs)) if mode == "map" and self.batched else 1
        # Thread t runs cells t, t + threads, ...: neighbouring cells (one attack under
        # several rules, say) tend to cost alike, so dealing them out balances the threads.
        # A short share (or a batch run as ``size`` cells) repeats the last cell.
        share = -(-runs // self.threads)
        cells = np.arange(share * self.threads).reshape(share, self.threads).T
        self._shares = np.minimum(cells, len(self.cfgs) - 1)  # [threads, share]
        self._joined = cells.reshape(-1).argsort()[: len(self.cfgs)]  # cell -> position
        self._whole = self._shares.size == len(self.cfgs) and self.threads == 1

    @property
    def _spec(self) -> tuple:
        return (self.static, self.mode, self.batched, self.data_axis, self.mesh)

    def place(self, tree):
        """``tree`` (leading batch axis when batched) laid out on the batch's devices."""
        return sharding.place(tree, sharding.batch_sharding(self.mesh, self.batched))

    def init(self):
        """The stacked initial states (model, optimizer, rule and attack states, mask)."""
        return _jitted_init(*self._spec)(self.keys, self.hp, self.data)

    def shares(self, state) -> list[tuple]:
        """``(state, hp, data)`` of each thread's cells (the whole batch with one thread)."""
        return [self._share(state, cells) for cells in self._shares]

    def _share(self, state, cells: np.ndarray) -> tuple:
        if self._whole:
            return state, self.hp, self.data
        if self.data_axis is None:
            data = self.data
        else:
            distinct, index = self.data
            data = distinct, index[cells]
        return _take(state, cells), _take(self.hp, cells), data

    def join(self, parts: Sequence[Any]) -> Any:
        """The threads' per-cell results (leading axis ``share``) as one batch's, in order."""
        if self._whole:
            return parts[0]
        return jax.tree.map(lambda *a: jnp.concatenate(a)[self._joined], *parts)

    def compile(self, state, periods: int):
        """The compiled chunk ``(state, hp, data, start) -> (state, metrics)`` for one
        thread's share of the cells (``shares``), and the seconds its compilation took
        (compiled once per process; the persistent cache may shorten it)."""
        state, hp, data = self._share(state, self._shares[0])
        shapes = jax.tree.map(lambda a: (a.shape, str(a.dtype)), (state, hp, data))
        key = (*self._spec, periods, jax.tree.structure(shapes), tuple(jax.tree.leaves(shapes)))
        if key in _COMPILED:
            _COMPILED.move_to_end(key)
            return _COMPILED[key]
        program = _program(self.static, self.mesh)
        run = _over_batch(
            lambda s, hp, d, start: program.run(s, hp, d, start, periods), *self._spec[1:]
        )
        t0 = time.perf_counter()
        start = jnp.zeros((), jnp.int32)
        out = sharding.batch_sharding(self.mesh, self.batched)
        jitted = jax.jit(run, donate_argnums=0, out_shardings=out)
        compiled = jitted.lower(state, hp, data, start).compile()
        _COMPILED[key] = (compiled, time.perf_counter() - t0)
        while len(_COMPILED) > MAX_PROGRAMS:
            _COMPILED.popitem(last=False)
        return _COMPILED[key]


# Compiled programs kept for reuse in this process, least recently used dropped first. On
# XLA's CPU backend every compiled program holds ~700 memory mappings of JIT code (a
# digits MLP program) and Linux allows 65,530 per process (``vm.max_map_count``): keeping
# every program of a long session crashed LLVM ("Cannot allocate memory") after ~90.
MAX_PROGRAMS = 8
_COMPILED: collections.OrderedDict[tuple, Any] = collections.OrderedDict()


def _over_batch(fn, mode: str, batched: bool, data_axis: int | None, mesh: Mesh | None):
    """``fn(a, hp, data, *rest)`` mapped over the batch axis of ``a`` and ``hp`` (and of
    ``data`` when ``data_axis`` is 0; ``rest`` is shared): ``vmap`` (split over the mesh's
    ``batch`` devices), or ``lax.map`` in ``"map"`` mode."""
    if not batched:
        return fn
    spmd = None if mesh is None else sharding.BATCH

    def mapped(a, hp, data, *rest):
        one = lambda a, hp, data: fn(a, hp, data, *rest)  # noqa: E731
        if mode == "vmap":
            return jax.vmap(one, in_axes=(0, 0, data_axis), spmd_axis_name=spmd)(a, hp, data)
        if data_axis is None:
            return lax.map(lambda t: one(t[0], t[1], data), (a, hp))
        distinct, index = data  # see ``Batch``

        def cell(t):
            return one(t[0], t[1], jax.tree.map(lambda x: x[t[2]], distinct))

        return lax.map(cell, (a, hp, index))

    return mapped


@functools.lru_cache(maxsize=MAX_PROGRAMS)
def _jitted_init(
    static: StaticConfig, mode: str, batched: bool, data_axis: int | None, mesh: Mesh | None
):
    init = _over_batch(_program(static, mesh).init, mode, batched, data_axis, mesh)
    return jax.jit(init, out_shardings=sharding.batch_sharding(mesh, batched))


def structure_key(cfg: Config, branches: bool = False) -> tuple:
    """What must be equal for configs to share a compiled program: everything but the
    numbers that ``HParams`` carries and the partition's seed and parameters; with
    ``branches``, but the attack and the rule too, which a program running its configs
    one after another takes as branches (``StaticConfig``)."""
    d, t = cfg.data, cfg.train
    return (
        (d.source, freeze(d.params), d.partition, d.num_clients),
        (cfg.model.name, freeze(cfg.model.params)),
        (t.local_epochs, t.local_steps, t.batch_size),
        (cfg.server.rounds, cfg.server.eval_every, cfg.participants),
        None if branches else (attack_branch(cfg), aggregator_branch(cfg)),
        cfg.client_parallelism,
    )


def _key_data(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(sharding.fetch(x))


def digest(x: Any) -> str:
    """SHA-1 of ``x``'s canonical JSON (``clean_json``, sorted keys): the identity of
    configs (``Config.identity()`` dicts) in sweep cell keys and checkpoints."""
    blob = json.dumps(clean_json(x), sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()


def checkpoint_identity(cfgs: Sequence[Config]) -> str:
    """What a checkpoint's state depends on: the digest of the batch's configs, in order."""
    return digest([c.identity() for c in cfgs])


def save_checkpoint(
    path: Path, state, done: int, rounds: list, evals: list, *, identity: str, periods: int
) -> None:
    """Writes the run's state after ``done`` evaluation periods (chunks of ``periods``) and
    its metrics so far, atomically, with the ``identity`` of the configs it belongs to."""
    leaves = [_key_data(x) for x in jax.tree.leaves(state)]
    arrays = {f"leaf{i}": a for i, a in enumerate(leaves)}
    for name, parts in (("rounds", rounds), ("evals", evals)):
        for k in parts[0] if parts else ():
            arrays[f"{name}/{k}"] = np.concatenate([np.asarray(p[k]) for p in parts], axis=-1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, identity=np.str_(identity), done=done, periods=periods, **arrays)
    os.replace(tmp, path)


def load_checkpoint(path: Path, like, identity: str):
    """``(state, done, periods, rounds, evals)`` from ``save_checkpoint``: the state after
    ``done`` evaluation periods, run in chunks of ``periods``; ``like`` gives the structure.

    Raises:
      ConfigError: the checkpoint belongs to other configs than ``identity``'s (or was
        written without one, by an older version).
    """
    with np.load(path) as z:
        if "identity" not in z.files:
            raise ConfigError(
                f"checkpoint: {str(path)!r} names no config (an older version wrote it), so "
                "it may belong to another config; remove it to start this run afresh."
            )
        if str(z["identity"]) != identity:
            raise ConfigError(
                f"checkpoint: {str(path)!r} belongs to another config (its state and curves "
                "are not this run's); remove it or give this run another checkpoint path."
            )
        leaves = jax.tree.leaves(like)
        restored = []
        for i, ref in enumerate(leaves):
            a = z[f"leaf{i}"]
            if jnp.issubdtype(ref.dtype, jax.dtypes.prng_key):
                restored.append(jax.random.wrap_key_data(a, impl=jax.random.key_impl(ref)))
            else:
                restored.append(jnp.asarray(a, ref.dtype))
        state = jax.tree.unflatten(jax.tree.structure(like), restored)
        rounds = {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith("rounds/")}
        evals = {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith("evals/")}
        done, periods = int(z["done"]), int(z["periods"])
        return state, done, periods, ([rounds] if rounds else []), ([evals] if evals else [])


def run_batch(
    batch: Batch,
    *,
    progress: bool = True,
    chunk_periods: int = 10,
    checkpoint: str | Path | None = None,
    label: str | None = None,
) -> list[dict[str, Any]]:
    """Runs every config of ``batch``; one result dict per config (see ``simulate``).

    With ``checkpoint``, the state is saved there after every chunk, and a run that finds
    a checkpoint resumes from it (the file is removed once the batch finishes). The
    checkpoint names the configs it belongs to (``checkpoint_identity``): another batch's
    is refused with a ``ConfigError``. One written with another ``chunk_periods`` resumes
    where it stopped, in the new chunks when they divide what it has done, else in its own.
    """
    t_start = time.perf_counter()
    total = batch.rounds // batch.eval_every
    periods = periods_per_chunk(total, chunk_periods)
    state = batch.init()
    start, rounds, evals = 0, [], []  # start: evaluation periods done
    ckpt = Path(checkpoint) if checkpoint is not None else None
    identity = checkpoint_identity(batch.cfgs) if ckpt is not None else ""
    if ckpt is not None and ckpt.exists():
        state, start, saved_periods, rounds, evals = load_checkpoint(ckpt, state, identity)
        state = batch.place(state)
        if start % periods:  # its chunks divide both what is done and what is left
            periods = saved_periods
    t_compile = time.perf_counter()
    run, compile_time = batch.compile(state, periods)
    compile_spent = time.perf_counter() - t_compile  # 0 when compiled earlier

    from tqdm.auto import tqdm

    bar = tqdm(
        total=batch.rounds,
        initial=start * batch.eval_every,
        unit="round",
        desc=label or batch.cfgs[0].name,
        disable=not progress,
        leave=False,
    )
    shares = batch.shares(state)  # [(state, hp, data)] of each thread's cells
    with ThreadPoolExecutor(batch.threads) as pool:
        for done in range(start, total, periods):
            first = jnp.asarray(done * batch.eval_every, jnp.int32)
            outs = [f.result() for f in [pool.submit(run, *share, first) for share in shares]]
            shares = [(out[0], *share[1:]) for out, share in zip(outs, shares, strict=True)]
            rm, em = batch.join([sharding.fetch(out[1]) for out in outs])
            rounds.append(rm)
            evals.append(em)
            if ckpt is not None:
                state = batch.join([share[0] for share in shares])
                save_checkpoint(
                    ckpt, state, done + periods, rounds, evals, identity=identity, periods=periods
                )
            bar.update(periods * batch.eval_every)
            bar.set_postfix(acc=f"{float(np.mean(em['test_acc'][..., -1])):.3f}")
    bar.close()
    state = batch.join([share[0] for share in shares])
    wall = time.perf_counter() - t_start

    curves = {k: np.concatenate([np.asarray(r[k]) for r in rounds], axis=-1) for k in rounds[0]}
    curves.update({k: np.concatenate([np.asarray(e[k]) for e in evals], axis=-1) for k in evals[0]})
    curves["byz"], captures = sharding.fetch((state.byz, state.captures))
    if not batch.batched:
        curves = {k: v[None] for k, v in curves.items()}
        captures = {k: v[None] for k, v in captures.items()}
    results = []
    for i, cfg in enumerate(batch.cfgs):
        cell = {k: v[i] for k, v in curves.items()}
        cell_counts = batch.counts[i]
        acc = cell["test_acc"]
        results.append(
            {
                "name": cfg.name,
                "config": cfg.to_dict(),
                **{k: v.tolist() for k, v in cell.items() if k != "byz"},
                "eval_rounds": list(range(batch.eval_every, batch.rounds + 1, batch.eval_every)),
                "final_acc": float(acc[-1]),
                "best_acc": float(np.max(acc)),
                "final_loss": float(cell["test_loss"][-1]),
                "compile_time": compile_time,
                "wall_time": wall,
                "seconds_per_round": (wall - compile_spent) / batch.rounds,
                "batch_size": len(batch.cfgs),
                "byzantine_clients": np.flatnonzero(cell["byz"]).tolist(),
                "empty_clients": int(np.sum(cell_counts == 0)),
            }
        )
        if captures:
            results[-1]["captures"] = {
                "rounds": np.asarray(batch.static.capture_rounds),
                **{k: np.asarray(v[i]) for k, v in captures.items()},
            }
    if ckpt is not None and ckpt.exists():
        ckpt.unlink()
    return results


def simulate(
    config: Config | Mapping[str, Any],
    *,
    progress: bool = True,
    chunk_periods: int = 10,
    checkpoint: str | Path | None = None,
    devices: int | None = None,
) -> dict[str, Any]:
    """Runs one federated training experiment.

    Args:
      config: a ``Config`` or its plain-dict/YAML form (no grid lists).
      progress: show a progress bar.
      chunk_periods: evaluation periods per compiled call (between progress updates).
      checkpoint: a file to save the state to after every chunk and resume from.
      devices: how many devices to split the round's clients over (``None``: all that
        JAX sees, one for a dense model on CPU devices; the numbers match one device's up
        to float reduction order). On a CPU, call ``fb.use_cpu_cores()`` first (before
        any JAX operation) to make each core a device.

    Returns:
      A JSON-serialisable dict: ``config``; per round ``train_loss``, ``byz_weight`` (weight
      the rule gave Byzantine clients, NaN for coordinate-wise rules), ``agg_error``
      (‖aggregate − honest mean‖), ``agg_norm``, ``nonfinite`` (rows dropped); per
      evaluation ``eval_rounds``, ``test_acc``, ``test_loss``; ``final_acc``, ``best_acc``,
      ``compile_time`` (seconds the program took to compile, paid once per structure: a
      program reused from this process's cache reports that first compile),
      ``wall_time`` (seconds), ``byzantine_clients``, ``empty_clients``
      (clients the partition gave no example: they send zero updates); with
      ``diagnostics.capture_rounds``, ``captures``: numpy arrays ``rounds [K]``,
      ``updates [K, m, d]`` (the rows the rule received), ``byz [K, m]``, ``clients [K, m]``
      (which clients took part), ``aggregate [K, d]``, ``weights [K, m]``.
    """
    if not isinstance(config, Config):
        axes = grid_axes(config)
        if axes:
            raise ConfigError(
                f"{'.'.join(axes[0][0])}: a list makes a grid, and simulate runs one "
                "experiment; run grids with fb.sweep (or `fedjax-byz sweep`)."
            )
    cfg = config if isinstance(config, Config) else from_dict(config)
    return run_batch(
        Batch([cfg], devices=devices),
        progress=progress,
        chunk_periods=chunk_periods,
        checkpoint=checkpoint,
    )[0]


def save_json(result: Mapping[str, Any], path: str | Path) -> None:
    """Writes ``result`` atomically as JSON (NaN written as null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(clean_json(result), indent=1))
    os.replace(tmp, path)


def clean_json(x):
    """``x`` with non-finite floats as None (strict JSON)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Mapping):
        return {k: clean_json(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [clean_json(v) for v in x]
    return x
