"""Scaling: devices, memory per client, and a sweep on a local Ray cluster.

1. **Devices.** ``experiments/scale_1000_clients.yaml`` (1,000 clients, 100 sampled per
   round, 8×8 digits-sized data, MLP) for ``--rounds`` rounds, unsharded on 1 CPU device
   and sharded over 8 simulated CPU devices (``XLA_FLAGS=
   --xla_force_host_platform_device_count=8``): one run (its 100 clients split over the
   devices) and a sweep batch of 8 seeds (one seed per device). Each in a fresh process;
   seconds per round exclude compilation.
2. **Memory.** The compiled program's bytes (``memory_analysis``) for the same model and
   60 examples per client as the number of clients ``n`` and of participants ``m`` vary
   (the experiment's Dirichlet split pads every client to the largest one), with clients
   trained one after
   another (``client_parallelism: 1``, the CPU default) and all at once (``= m``, the
   accelerator default): the data grows with ``n``, the work with ``m`` only.
3. **Ray.** A grid of 2 attacks × 2 rules × 2 seeds (4 programs, the seeds batched) on
   bundled digits, 20 clients, 30 rounds: ``fb.sweep`` in one process against
   ``fb.sweep(..., ray="local")`` on a local Ray cluster of 2 CPUs, each with an empty
   compilation cache; wall time including Ray's start and every compilation.

    nice -n 19 python benchmarks/scaling.py [--rounds 20]

Writes ``benchmarks/results/scaling.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_name

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "scaling.md"
SCALE = ROOT / "experiments" / "scale_1000_clients.yaml"
MIB = 2**20

RAY_GRID = {
    "name": "scaling_ray",
    "seed": [0, 1],
    "data": {"source": "digits", "partition": "dirichlet", "beta": 0.5, "num_clients": 20},
    "model": {"name": "mlp", "hidden": [64]},
    "server": {"rounds": 30, "eval_every": 10},
    "attack": {"num_byzantine": 4, "grid": [{"name": "lie", "z": 1.5}, {"name": "bitflip"}]},
    "aggregator": {"name": ["median", "krum"]},
}


def _scale_cfgs(rounds: int, seeds: int, **over):
    from fedjax_byz.sim.config import from_dict, load_yaml, set_path

    raw = load_yaml(SCALE)
    raw = set_path(raw, "server.rounds", rounds)
    raw = set_path(raw, "server.eval_every", rounds)
    for k, v in over.items():
        raw = set_path(raw, k, v)
    return [from_dict(dict(raw, seed=s)) for s in range(seeds)]


def child_devices(rounds: int, seeds: int) -> dict:
    """One batch of ``seeds`` cells on every device JAX sees; timings per round."""
    import jax

    from fedjax_byz.sim.run import Batch, run_batch

    batch = Batch(_scale_cfgs(rounds, seeds), "vmap")  # cells over devices, as on GPUs
    records = run_batch(batch, progress=False)
    r = records[0]
    return {
        "devices": jax.device_count(),
        "mesh": None if batch.mesh is None else dict(batch.mesh.shape),
        "compile_s": r["compile_time"],
        "s_per_round": r["seconds_per_round"],
        "clients_per_s": seeds * batch.static.participants / r["seconds_per_round"],
        "best_acc": [x["best_acc"] for x in records],
    }


def child_memory() -> list[dict]:
    """Compiled bytes for a range of ``n`` (clients) and ``m`` (participants)."""
    import jax
    from jax.flatten_util import ravel_pytree

    from fedjax_byz.sim.run import Batch

    rows = []
    for n, m in ((100, 100), (1000, 10), (1000, 100), (1000, 1000)):
        for cp in (1, m):
            over = {
                "data.num_clients": n,
                "data.num_train": 60 * n,  # 60 examples per client, as in the experiment
                "server.clients_per_round": m,
                "client_parallelism": cp,
                "attack.num_byzantine": n // 10,
                "aggregator.assumed_byzantine": m // 10,
            }
            batch = Batch(_scale_cfgs(10, 1, **over))
            compiled, _ = batch.compile(batch.init(), 1)
            mem = compiled.memory_analysis()
            rows.append(
                {
                    "n": n,
                    "m": m,
                    "parallel": cp,
                    "data": sum(a.nbytes for a in jax.tree.leaves(batch.data)),
                    "arguments": mem.argument_size_in_bytes,
                    "temporaries": mem.temp_size_in_bytes,
                    "d": ravel_pytree(batch.program.model.init(jax.random.key(0)))[0].size,
                }
            )
    return rows


def child_ray(ray: bool, out: str) -> dict:
    import fedjax_byz as fb

    t0 = time.perf_counter()
    if ray:
        import ray as ray_lib

        ray_lib.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    records = fb.sweep(RAY_GRID, out=out, progress=False, log=None, ray="local" if ray else None)
    return {"wall_s": time.perf_counter() - t0, "cells": len(records)}


def _child(name: str, *args: str, devices: int = 1) -> dict | list:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env["FEDJAX_BYZ_CACHE"] = tempfile.mkdtemp(prefix="scaling-cache-")  # cold compiles
    proc = subprocess.run(
        [sys.executable, __file__, "--child", name, *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _load() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def report(rounds: int) -> str:
    lines = [
        "# Scaling",
        "",
        f"`nice -n 19 python benchmarks/scaling.py --rounds {rounds}` on "
        f"{cpu_name()}, {os.cpu_count()} cores, "
        f"{datetime.date.today()}; load average before: {_load()} (the machine is shared).",
        "",
        "## 1. One run and a sweep batch on 1 vs 8 (simulated) devices",
        "",
        f"`experiments/scale_1000_clients.yaml`, {rounds} rounds; 8 simulated devices share "
        f"the same {os.cpu_count()} cores, so this measures the overhead of the split, not a "
        "speed-up (see docs/scaling.md for the arithmetic on real devices).",
        "",
        "| case | devices | mesh (batch × clients) | compile (s) | s / round | "
        "client updates / s | best acc |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, seeds in (("one run, 100 of 1,000 clients", 1), ("sweep batch of 8 seeds", 8)):
        for devices in (1, 8):
            r = _child("devices", str(rounds), str(seeds), devices=devices)
            mesh = "—" if r["mesh"] is None else f"{r['mesh']['batch']} × {r['mesh']['clients']}"
            acc = ", ".join(f"{100 * a:.1f}" for a in r["best_acc"][:2])
            lines.append(
                f"| {label} | {devices} | {mesh} | {r['compile_s']:.1f} | "
                f"{r['s_per_round']:.3f} | {r['clients_per_s']:.0f} | "
                f"{acc}{' …' if seeds > 2 else ''} |"
            )
    lines += [
        "",
        "## 2. Compiled memory against clients n and participants m (1 device)",
        "",
        "Same model, 60 examples per client (Dirichlet split, padded to the largest client); "
        "`parallel` is how many clients train at once (1: one after another, the CPU "
        "default; m: all at once, the accelerator default).",
        "",
        "| n | m | parallel | client data (MiB) | arguments (MiB) | temporaries (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    mem = _child("memory")
    for r in mem:
        lines.append(
            f"| {r['n']} | {r['m']} | {r['parallel']} | {r['data'] / MIB:.1f} | "
            f"{r['arguments'] / MIB:.1f} | {r['temporaries'] / MIB:.1f} |"
        )
    lines += ["", f"d = {mem[0]['d']} parameters.", ""]
    lines += [
        "## 3. A sweep in one process vs on a local Ray cluster (2 CPUs)",
        "",
        "8 cells (2 attacks × 2 rules × 2 seeds, 4 programs), digits, 20 clients, 30 rounds; "
        "wall time from a cold compilation cache, including Ray's start.",
        "",
        "| runner | wall (s) |",
        "|---|---|",
    ]
    for ray in (False, True):
        with tempfile.TemporaryDirectory() as out:
            r = _child("ray", str(int(ray)), out)
        lines.append(f"| {'Ray, 2 workers' if ray else 'one process'} | {r['wall_s']:.1f} |")
    lines += ["", f"Load average after: {_load()}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, *rest = args.child
        if name == "devices":
            out = child_devices(int(rest[0]), int(rest[1]))
        elif name == "memory":
            out = child_memory()
        else:
            out = child_ray(bool(int(rest[0])), rest[1])
        print(json.dumps(out))
        return
    text = report(args.rounds)
    OUT.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
