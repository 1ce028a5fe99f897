"""``sweep``: a grid, compiled once per structure, batched to fit memory, resumable.

Plan: expand the grid (validating every cell), group cells by structure, and split each
group into batches whose compiled program fits the memory budget (measured with
``memory_analysis()`` of the compiled batch); on a CPU, in ``map`` mode, the batches of
a big enough sweep run in worker processes, one per core (``worker_count``). Groups are
planned in order, each while the one before runs (planning compiles the program the run
then reuses), and every group's batches are added to ``plan.json`` as they are planned; a
rerun reuses them, so an interrupted sweep recomputes exactly the batches it had not
finished, with the same batch composition, and produces the same records. Every batch's
records are added to the store atomically as soon as it finishes; a batch interrupted
midway resumes from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import queue
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import numpy as np

from fedjax_byz.diagnostics.measures import capture_measures
from fedjax_byz.sim import config as config_lib
from fedjax_byz.sim.run import (
    Batch,
    batch_mode,
    default_threads,
    enable_compilation_cache,
    periods_per_chunk,
    run_batch,
)
from fedjax_byz.sweep.grid import Cell, describe, expand_cells, group_cells, split_options
from fedjax_byz.sweep.store import ResultStore
from fedjax_byz.sweep.workers import Worker


def memory_budget(fraction: float) -> int:
    """Bytes a batch may use: ``fraction`` of the device memory (host RAM on CPU)."""
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(fraction * stats["bytes_limit"])
    return int(fraction * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def program_bytes(compiled) -> int:
    """Peak bytes of a compiled program: arguments, outputs and temporaries."""
    m = compiled.memory_analysis()
    if m is None:
        return 0
    return int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )


def plan_batches(
    cells: list[Cell],
    opts: Mapping[str, Any],
    budget: int,
    chunk_periods: int,
    workers: int = 1,
    group: list[Cell] | None = None,
) -> list[list[Cell]]:
    """Splits ``cells`` of ``group`` (default: all of it; the group shapes the program)
    into batches that fit ``budget`` bytes (one trial compile, of the first batch). For
    ``workers`` processes running at once, into at least that many, the cells dealt out
    in turn: neighbouring cells (one attack under several rules, say) tend to cost alike,
    so the workers finish together."""
    group = cells if group is None else group
    size = len(cells) if opts["max_batch"] is None else min(len(cells), opts["max_batch"])
    size = min(size, -(-len(cells) // workers))
    threads = 1 if workers > 1 else opts["threads"]

    def split(size: int) -> list[list[Cell]]:
        if workers == 1:
            return [cells[i : i + size] for i in range(0, len(cells), size)]
        count = max(min(workers, len(cells)), -(-len(cells) // size))
        return [cells[i::count] for i in range(count)]

    while size > 1:
        configs = [c.config for c in split(size)[0]]
        batch = Batch(configs, opts["mode"], opts["devices"], [c.config for c in group], threads)
        compiled, _ = batch.compile(batch.init(), _periods(batch, chunk_periods))
        need = workers * batch.threads * program_bytes(compiled)  # all of them at once
        if need <= budget:
            break
        size = max(1, min(size - 1, int(size * budget / need)))
    return split(size)


def _periods(batch: Batch, chunk_periods: int) -> int:
    return periods_per_chunk(batch.rounds // batch.eval_every, chunk_periods)


def _load_plan(path: Path, cells: dict[str, Cell]) -> dict[str, list[list[Cell]]]:
    """The batches of ``plan.json`` by their first cell's key; none if the grid lost a
    cell they name (groups the file does not cover are planned afresh)."""
    if not path.exists():
        return {}
    keys = json.loads(path.read_text())["batches"]
    if any(k not in cells for b in keys for k in b):
        return {}
    return {b[0]: [cells[k] for k in b] for b in keys}


def _save_plan(out: Path, cells: list[Cell], batches: list[list[Cell]]) -> None:
    """``plan.json``: the grid's cell keys (what a report of the folder covers) and the
    batches planned so far."""
    _write_json(
        out / "plan.json",
        {"cells": [c.key for c in cells], "batches": [[c.key for c in b] for b in batches]},
    )


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


@dataclasses.dataclass(frozen=True)
class Plan:
    """A sweep's cells, compiled groups and batches, and where its results go.

    ``batches`` grows group by group while ``planned_groups`` plans; ``plan_sweep``
    returns it complete unless asked not to.
    """

    out: Path
    cells: list[Cell]
    groups: list[list[Cell]]
    batches: list[list[Cell]]
    opts: Mapping[str, Any]
    chunk_periods: int
    saved: dict[str, list[list[Cell]]]  # plan.json's batches by their first cell's key
    workers: int = 1  # processes the batches run in (``worker_count``)
    # how many cells each batch runs as: a batch one cell short of the largest of its
    # group left to run (cells dealt to worker processes) repeats a cell, as one cell run
    # twice costs less than another compilation
    runs: list[int] = dataclasses.field(default_factory=list)

    @property
    def store(self) -> ResultStore:
        """The results store, read afresh (other processes may have added to it)."""
        return ResultStore(self.out / "results.jsonl")

    def pending(self, among: list[int] | None = None) -> list[int]:
        """Indices of the batches (of ``among``, default all) with a cell not in the store."""
        store = self.store
        among = range(len(self.batches)) if among is None else among
        return [b for b in among if any(c.key not in store for c in self.batches[b])]


# A worker process costs ~3-4 s here (Python and JAX start, the program's cache load, its
# small compilations): the quickstart's 8 seeds (8,000 client-rounds) took 9.4 s in one
# process and 17.4 s in two workers. A sweep left to choose (``threads: null``) starts
# workers only for at least this much training (the digits grid of
# ``benchmarks/sweep_speed.py``: 588,000).
WORKER_MIN_CLIENT_ROUNDS = 100_000


def worker_count(opts: Mapping[str, Any], cells: list[Cell]) -> int:
    """Processes a sweep runs its batches in: in ``map`` mode on a CPU, ``sweep.threads``,
    each pinned to a core of its own (see ``sweep.workers`` for why); with ``threads:
    null``, one per core (``default_threads``) for sweeps of at least
    ``WORKER_MIN_CLIENT_ROUNDS`` client-rounds, else 1. Otherwise 1 (the sweep's own
    process)."""
    if batch_mode(opts["mode"]) != "map" or jax.default_backend() != "cpu":
        return 1
    if opts["threads"] is not None:
        return opts["threads"]
    work = sum(c.config.server.rounds * c.config.participants for c in cells)
    return default_threads() if work >= WORKER_MIN_CLIENT_ROUNDS else 1


def _group_batches(plan: Plan, group: list[Cell]) -> list[list[Cell]]:
    """``group``'s batches: those of ``plan.json`` that hold its cells, and, for its cells
    that are neither in one of them nor finished (a grid grown by a seed, say), batches
    planned now (compiling the group's program, which the run then reuses). Finished cells
    never run again, and a group with nothing left to run is not compiled."""
    members = {c.key for c in group}
    saved = [b for b in plan.saved.values() if b[0].key in members]
    covered = {c.key for b in saved for c in b}
    store = plan.store
    rest = [c for c in group if c.key not in covered and c.key not in store]
    if not rest:
        return saved
    budget = memory_budget(plan.opts["memory_fraction"])
    return saved + plan_batches(rest, plan.opts, budget, plan.chunk_periods, plan.workers, group)


def planned_groups(plan: Plan) -> Iterator[list[int]]:
    """Plans ``plan``'s groups in order, adding their batches to ``plan.batches`` and to
    ``plan.json``, and yields each group's batch indices. A thread plans (and so compiles)
    the next group while the caller runs the current one."""
    groups = plan.groups
    with ThreadPoolExecutor(max_workers=1) as pool:
        ahead = pool.submit(_group_batches, plan, groups[0])
        for i in range(len(groups)):
            batches = ahead.result()
            if i + 1 < len(groups):
                ahead = pool.submit(_group_batches, plan, groups[i + 1])
            first = len(plan.batches)
            store = plan.store
            largest = max(
                (len(b) for b in batches if any(c.key not in store for c in b)), default=0
            )
            plan.runs.extend(largest if largest - len(b) == 1 else len(b) for b in batches)
            plan.batches.extend(batches)
            _save_plan(plan.out, plan.cells, plan.batches)
            yield list(range(first, len(plan.batches)))


def plan_sweep(
    config: str | Path | Mapping[str, Any],
    *,
    out: str | Path | None = None,
    profile: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    chunk_periods: int = 10,
    log=print,
    complete: bool = True,
    branches: bool = True,
) -> Plan:
    """Expands and groups the grid and plans its batches (reusing ``plan.json``); with
    ``complete=False`` the batches are left for ``planned_groups`` to plan. With
    ``branches``, cells run one after another (``map`` mode) that differ only in attack
    and rule share a group (one program, each attack and rule a branch); a Ray sweep
    keeps them apart, so they run as parallel tasks."""
    if isinstance(config, str | Path):
        raw = config_lib.load_yaml(config, profile)
    else:
        raw = config_lib.apply_profile(config, profile, "config")
    for key, value in (overrides or {}).items():
        raw = config_lib.set_path(raw, key, value)
    raw, opts = split_options(raw)
    cells = expand_cells(raw, opts["vmap"])
    for cell in cells:
        config_lib.check_files(cell.config)
    mapped = batch_mode(opts["mode"]) == "map"
    groups = group_cells(cells, opts["vmap"], branches and mapped)
    name = cells[0].config.name
    out = Path(out or Path("runs") / name)
    out.mkdir(parents=True, exist_ok=True)
    enable_compilation_cache()
    saved = _load_plan(out / "plan.json", {c.key: c for c in cells})
    _save_plan(out, cells, list(saved.values()))  # the folder now describes this grid
    workers = worker_count(opts, cells) if branches else 1  # a Ray sweep: its own tasks
    plan = Plan(out, cells, groups, [], opts, chunk_periods, saved, workers)
    done = sum(c.key in plan.store for c in cells)
    log(
        f"{name}: {len(cells)} cells in {len(groups)} compiled program(s); {done} already finished."
    )
    for i, g in enumerate(groups):
        log(f"  program {i + 1}: {len(g)} cell(s), e.g. {describe(g[0])}")
    if complete:
        for _ in planned_groups(plan):
            pass
        log(summary(plan))
    return plan


def summary(plan: Plan) -> str:
    """How the sweep was split: cells, compiled programs, batches."""
    return (
        f"{plan.cells[0].config.name}: {len(plan.cells)} cells in {len(plan.groups)} compiled "
        f"program(s), {len(plan.batches)} batch(es)."
    )


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def memory_line(batch: Batch, compiled, budget: int) -> str:
    """The compiled program's memory per device, before it runs (``threads`` copies of it
    in ``map`` mode, each running a share of the cells; the client data counted each time)."""
    m = compiled.memory_analysis()
    data = sum(a.nbytes for a in jax.tree.leaves(batch.data))
    devices = 1 if batch.mesh is None else batch.mesh.size
    if m is None:
        return f"memory estimate: unavailable on this backend (data {_mib(data)})"
    return (
        f"memory estimate per device: {_mib(batch.threads * program_bytes(compiled))} of a "
        f"{_mib(budget)} budget (per thread: arguments {_mib(m.argument_size_in_bytes)}, of "
        f"which client data {_mib(data)}; temporaries {_mib(m.temp_size_in_bytes)}); "
        f"{batch.static.participants} of {batch.static.num_clients} clients per round, "
        f"{len(batch.cfgs)} cell(s), {devices} device(s), {batch.threads} thread(s)"
    )


def run_planned_batch(
    plan: Plan,
    b: int,
    *,
    progress: bool = True,
    chunk_periods: int = 10,
    log=print,
    threads: int | None = None,
) -> None:
    """Runs batch ``b`` of ``plan`` (resuming its checkpoint) and adds its records to the
    store; prints the compiled program's memory estimate before the first round.
    ``threads`` overrides ``sweep.threads`` (a Ray task runs on one CPU)."""
    log = log or (lambda *a, **k: None)
    batch_cells = plan.batches[b]
    program = next(i for i, g in enumerate(plan.groups) if batch_cells[0] in g)
    label = f"program {program + 1}/{len(plan.groups)}, batch {b + 1} ({len(batch_cells)} cells)"
    keys = hashlib.sha1(" ".join(c.key for c in batch_cells).encode()).hexdigest()[:16]
    t0 = time.perf_counter()
    group = plan.groups[program]
    batch = Batch(
        [c.config for c in batch_cells],
        plan.opts["mode"],
        plan.opts["devices"],
        group=[c.config for c in group],
        threads=plan.opts["threads"] if threads is None else threads,
        size=plan.runs[b],
    )
    compiled, _ = batch.compile(batch.init(), _periods(batch, chunk_periods))
    log(f"{label}: {memory_line(batch, compiled, memory_budget(plan.opts['memory_fraction']))}")
    results = run_batch(
        batch,
        progress=progress,
        chunk_periods=chunk_periods,
        checkpoint=plan.out / "checkpoints" / f"batch-{keys}.npz",  # named by its cells
        label=label,
    )
    for c, r in zip(batch_cells, results, strict=True):
        if "captures" in r:  # big arrays go beside the store, the record keeps the path
            path = plan.out / "captures" / f"{c.key}.npz"
            path.parent.mkdir(exist_ok=True)
            np.savez(path, **r["captures"])
            r["diagnostics"] = capture_measures(r["captures"])
            r["captures"] = str(path.relative_to(plan.out))
    store = plan.store
    store.add(
        dict(r, key=c.key, grid=dict(c.grid), program=program, batch=b)
        for c, r in zip(batch_cells, results, strict=True)
    )
    log(
        f"{label}: {time.perf_counter() - t0:.1f}s, "
        f"compile {results[0]['compile_time']:.1f}s; {len(store)}/{len(plan.cells)} cells done"
    )


def run_batch_task(plan: Plan, b: int, chunk_periods: int) -> int:
    """Batch ``b`` of ``plan`` in a worker process (the sweep's own, or a Ray task), its
    records to the store; returns ``b``."""
    enable_compilation_cache()
    run_planned_batch(plan, b, progress=False, chunk_periods=chunk_periods, log=None, threads=1)
    return b


def run_in_processes(plan: Plan, *, progress: bool = True, chunk_periods: int = 10, log=print):
    """Plans the groups in order and runs their pending batches in ``plan.workers`` worker
    processes (``sweep.workers``), each on one core, while the next group compiles here
    (the workers then load it from the persistent cache). A progress bar counts finished
    cells."""
    from tqdm.auto import tqdm

    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    store = plan.store
    done = sum(c.key in store for c in plan.cells)
    bar = tqdm(
        total=len(plan.cells),
        initial=done,
        unit="cell",
        desc=plan.cells[0].config.name,
        disable=not progress,
    )
    t0 = time.perf_counter()
    tasks: queue.Queue = queue.Queue()

    def drive(core: int) -> None:
        # started now, to import while the first group compiles here; none when all is done
        worker = Worker(core) if done < len(plan.cells) else None
        try:
            while (task := tasks.get()) is not None:
                b, pickled = task
                worker.run(pickled)
                bar.update(len(plan.batches[b]))
                log(f"batch {b + 1}/{len(plan.batches)} done ({time.perf_counter() - t0:.1f}s)")
        finally:
            if worker is not None:
                worker.close()

    with ThreadPoolExecutor(plan.workers) as pool:
        drivers = [pool.submit(drive, cores[i % len(cores)]) for i in range(plan.workers)]
        try:
            for batches in planned_groups(plan):
                for b in plan.pending(batches):
                    tasks.put((b, pickle.dumps((plan, b, chunk_periods))))
        finally:  # the workers finish what they hold, also when planning fails
            for _ in drivers:
                tasks.put(None)
        for d in drivers:
            d.result()  # a worker's error, raised here
    bar.close()


def sweep(
    config: str | Path | Mapping[str, Any],
    *,
    out: str | Path | None = None,
    profile: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    progress: bool = True,
    chunk_periods: int = 10,
    log=print,
    ray: str | None = None,
) -> list[dict[str, Any]]:
    """Runs every cell of a grid config; returns the store's records.

    Args:
      config: a YAML path or a plain dict whose lists are grid axes; an optional
        ``sweep:`` section sets ``mode`` (``auto`` | ``vmap`` | ``map``, see
        ``sim.run.batch_mode``), ``vmap`` (the only fields to batch), ``max_batch``,
        ``memory_fraction``, ``devices`` (how many local devices a batch is split
        over; null: all) and ``threads`` (in ``map`` mode on a CPU, how many cells run
        at once, each batch in one of that many worker processes, ``worker_count``; null:
        one per CPU core, ``sim.run.default_threads``).
      out: the sweep's folder (``results.jsonl``, ``plan.json``, ``checkpoints/``);
        default ``runs/<name>``.
      profile: a ``profiles:`` entry of the config to overlay (e.g. ``cpu``).
      overrides: ``{dotted.field: value}`` applied last.
      progress: progress bars.
      chunk_periods: evaluation periods per compiled call (and per checkpoint).
      log: where to print the plan and progress lines (None: silent).
      ray: a Ray cluster address (``auto``, ``ray://host:10001``, or ``local`` to start
        one here): the batches run as Ray tasks (``sweep.cluster``); ``out`` must be on a
        file system every worker sees.
    """
    log = log or (lambda *a, **k: None)
    if ray is not None:  # before planning compiles anything: Ray forks its processes
        from fedjax_byz.sweep.cluster import connect, run_on_ray

        connect(ray)
    plan = plan_sweep(
        config,
        out=out,
        profile=profile,
        overrides=overrides,
        chunk_periods=chunk_periods,
        log=log,
        complete=ray is not None,
        branches=ray is None,
    )
    if ray is not None:
        run_on_ray(plan, ray, chunk_periods=chunk_periods, log=log)
    else:
        if plan.workers > 1:
            run_in_processes(plan, progress=progress, chunk_periods=chunk_periods, log=log)
        else:  # each group runs while the next one compiles
            for batches in planned_groups(plan):
                for b in plan.pending(batches):
                    run_planned_batch(
                        plan, b, progress=progress, chunk_periods=chunk_periods, log=log
                    )
        log(summary(plan))
    store = plan.store
    return [store.get(c.key) for c in plan.cells]
