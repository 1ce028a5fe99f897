"""Sweep speed: seeds batched in one program, and a 7 × 7 × 3 grid against ByzFL's runner.

1. The quickstart model (digits, 20 clients, Dirichlet 0.5, MLP, 50 rounds): 8 seeds as
   one batched program (``fb.sweep``) vs 8 sequential ``fb.simulate`` runs, each in a
   fresh process with an empty compilation cache, wall time including compilation.
2. A grid of 7 attacks × 7 rules × 3 seeds on the same data for both: the bundled digits
   resized to 28×28 (written as MNIST IDX files for ByzFL's torchvision loader and as a
   ``.npz`` for us), 16 honest + 4 Byzantine clients, Dirichlet(0.5) split, a 784-100-10
   MLP (ByzFL's ``fc_mnist``), 200 steps of distributed SGD (one local step of batch 25,
   lr 0.1, no momentum, no weight decay), test accuracy every 50 steps. ByzFL's benchmark
   runner (``byzfl.benchmark.run_benchmark``, 2 parallel jobs on the 2 cores) against
   ``fb.sweep`` (on a CPU one compiled program for the whole grid: the cells run one after
   another, each attack and rule a branch chosen per cell, in one worker process per
   core), wall time including compilation.

    python benchmarks/sweep_speed.py     # in the benchmark environment (benchmarks/README.md)

Writes ``benchmarks/results/sweep_speed.md``.
"""

from __future__ import annotations

import datetime
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import cpu_name

OUT = Path(__file__).parent / "results" / "sweep_speed.md"
ATTACKS = [  # (ours, ByzFL)
    ({"name": "bitflip"}, {"name": "SignFlipping"}),
    ({"name": "labelflip"}, {"name": "LabelFlipping"}),
    ({"name": "gaussian", "sigma": 1.0}, {"name": "Gaussian", "parameters": {"sigma": 1.0}}),
    ({"name": "ipm", "eps": 2.0}, {"name": "InnerProductManipulation", "parameters": {"tau": 2.0}}),
    ({"name": "lie", "z": 1.5}, {"name": "ALittleIsEnough", "parameters": {"tau": 1.5}}),
    ({"name": "mimic"}, {"name": "Mimic"}),
    ({"name": "inf"}, {"name": "Inf"}),
]
RULES = [  # (ours, ByzFL)
    ({"name": "mean"}, {"name": "Average"}),
    ({"name": "median"}, {"name": "Median"}),
    ({"name": "trmean"}, {"name": "TrMean"}),
    (
        {"name": "geomed", "iters": 3, "nu": 0.1},
        {"name": "GeometricMedian", "parameters": {"nu": 0.1, "T": 3}},
    ),
    ({"name": "multikrum"}, {"name": "MultiKrum"}),
    ({"name": "cclip", "tau": 10.0}, {"name": "CenteredClipping", "parameters": {"tau": 10.0}}),
    ({"name": "meamed"}, {"name": "Meamed"}),
]
STEPS, EVAL, SEEDS, HONEST, BYZ, BATCH = 200, 50, 3, 16, 4, 25


def _run(code: str, env_extra: dict | None = None, cwd: str | None = None) -> float:
    """Seconds a fresh Python process takes to run ``code`` (empty compilation cache)."""
    cache = tempfile.mkdtemp(prefix="jaxcache-")
    env = dict(os.environ, FEDJAX_BYZ_CACHE=cache, **(env_extra or {}))
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", code], check=True, env=env, cwd=cwd, stdout=subprocess.DEVNULL
    )
    return time.perf_counter() - t


def quickstart_seeds(tmp: Path) -> tuple[float, float]:
    """(batched seconds, sequential seconds) for 8 seeds of the quickstart model."""
    base = {
        "data": {"source": "digits", "partition": "dirichlet", "beta": 0.5, "num_clients": 20},
        "model": {"name": "mlp", "hidden": [64]},
        "train": {"local_epochs": 1, "batch_size": 32, "lr": 0.1, "momentum": 0.5},
        "server": {"rounds": 50, "eval_every": 10},
        "attack": {"name": "bitflip", "num_byzantine": 4},
        "aggregator": {"name": "median"},
    }
    batched = dict(base, seed=list(range(8)))
    code_b = (
        f"import fedjax_byz as fb; fb.sweep({batched!r}, out={str(tmp / 'b')!r}, "
        "progress=False, log=None)"
    )
    t_batched = _run(code_b)
    t_seq = sum(
        _run(f"import fedjax_byz as fb; fb.simulate({dict(base, seed=s)!r}, progress=False)")
        for s in range(8)
    )
    return t_batched, t_seq


def write_digits28(root: Path) -> Path:
    """Digits resized to 28×28 as MNIST IDX files (for torchvision) and as our .npz."""
    from PIL import Image

    from fedjax_byz import data

    ds = data.load("digits")

    def up(x):
        imgs = [
            Image.fromarray(np.uint8(np.clip(a[..., 0] * 16, 0, 255))).resize((28, 28)) for a in x
        ]
        return np.stack([np.asarray(i) for i in imgs]).astype(np.uint8)

    xtr, xte = up(ds.x_train), up(ds.x_test)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, x, y in (("train", xtr, ds.y_train), ("t10k", xte, ds.y_test)):
        with open(raw / f"{split}-images-idx3-ubyte", "wb") as f:
            f.write(struct.pack(">IIII", 2051, len(x), 28, 28) + x.tobytes())
        with open(raw / f"{split}-labels-idx1-ubyte", "wb") as f:
            f.write(struct.pack(">II", 2049, len(y)) + y.astype(np.uint8).tobytes())
    path = root / "digits28.npz"
    np.savez(path, x_train=xtr, y_train=ds.y_train, x_test=xte, y_test=ds.y_test)
    return path


def ours_grid(npz: Path, tmp: Path) -> tuple[float, float, float, int, int]:
    """(wall seconds, summed compile seconds, summed run seconds, programs, batches) of
    the grid's sweep."""
    cfg = {
        "name": "grid",
        "seed": list(range(SEEDS)),
        "data": {
            "source": "arrays",
            "path": str(npz),
            "partition": "dirichlet",
            "beta": 0.5,
            "num_clients": HONEST + BYZ,
        },
        "model": {"name": "mlp", "hidden": [100]},
        "train": {"local_steps": 1, "batch_size": BATCH, "lr": 0.1},
        "server": {"rounds": STEPS, "eval_every": EVAL},
        "attack": {"num_byzantine": BYZ, "grid": [a for a, _ in ATTACKS]},
        "aggregator": {"grid": [r for r, _ in RULES]},
    }
    wall = _run(
        f"import fedjax_byz as fb; fb.sweep({cfg!r}, out={str(tmp / 'grid')!r}, "
        "progress=False, log=None)"
    )
    records = [json.loads(line) for line in (tmp / "grid" / "results.jsonl").open()]
    per_batch = {r["batch"]: r for r in records}.values()
    compile_s = sum(r["compile_time"] for r in per_batch)
    run_s = sum(r["wall_time"] for r in per_batch)
    programs = len({r["program"] for r in records})
    return wall, compile_s, run_s, programs, len(per_batch)


def byzfl_grid(data_folder: Path, tmp: Path) -> float:
    config = {
        "benchmark_config": {
            "training_algorithm": {"name": "DSGD", "parameters": {}},
            "nb_steps": STEPS,
            "device": "cpu",
            "training_seed": 0,
            "nb_training_seeds": SEEDS,
            "nb_honest_clients": HONEST,
            "f": BYZ,
            "data_distribution_seed": 0,
            "nb_data_distribution_seeds": 1,
            "size_train_set": 1.0,
            "data_distribution": [{"name": "dirichlet_niid", "distribution_parameter": 0.5}],
        },
        "model": {
            "name": "fc_mnist",
            "dataset_name": "mnist",
            "nb_labels": 10,
            "loss": "NLLLoss",
            "learning_rate": 0.1,
            "learning_rate_decay": 1.0,
            "milestones": [],
        },
        "aggregator": [r for _, r in RULES],
        "pre_aggregators": [],
        "honest_clients": {"momentum": 0.0, "weight_decay": 0.0, "batch_size": BATCH},
        "attack": [a for _, a in ATTACKS],
        "evaluation_and_results": {
            "evaluation_delta": EVAL,
            "batch_size_evaluation": 128,
            "evaluate_on_test": True,
            "store_per_client_metrics": False,
            "store_models": False,
            "data_folder": str(data_folder),
            "results_directory": str(tmp / "byzfl_results"),
        },
    }
    work = tmp / "byzfl"
    work.mkdir()
    (work / "config.json").write_text(json.dumps(config))
    return _run(
        "from byzfl.benchmark import run_benchmark; run_benchmark(nb_jobs=2)",
        env_extra={"OMP_NUM_THREADS": "1"},
        cwd=str(work),
    )


def main():
    import byzfl
    import jax

    from fedjax_byz.sim.run import default_threads

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        t_batch, t_seq = quickstart_seeds(tmp)
        print(
            f"8 seeds: batched {t_batch:.1f}s, sequential {t_seq:.1f}s ({t_seq / t_batch:.1f}x)",
            flush=True,
        )
        npz = write_digits28(tmp)
        t_ours, t_compile, t_runs, programs, batches = ours_grid(npz, tmp)
        print(f"7x7x3 grid: fedjax_byz {t_ours:.1f}s", flush=True)
        t_ref = byzfl_grid(tmp, tmp)
        print(f"7x7x3 grid: ByzFL {t_ref:.1f}s ({t_ref / t_ours:.1f}x)", flush=True)
    load = os.getloadavg()[0]
    seed_rounds = len(RULES) * len(ATTACKS) * SEEDS * STEPS
    lines = [
        "# Sweep speed",
        "",
        f"Generated by `python benchmarks/sweep_speed.py` on {datetime.date.today()} "
        f"({cpu_name()}, {os.cpu_count()} cores, load average {load:.1f} at the end; "
        f"jax {jax.__version__}, byzfl {getattr(byzfl, '__version__', '0.0.11')}). Wall "
        "times of fresh processes, compilation included (each starts with an empty "
        "persistent compilation cache; a sweep's workers load what its planning compiled).",
        "",
        "| what | fedjax_byz | reference | speed-up | target |",
        "|---|---|---|---|---|",
        f"| quickstart model, 8 seeds (50 rounds, 20 clients) | {t_batch:.1f} s batched "
        f"in one program | {t_seq:.1f} s as 8 sequential runs of ours | "
        f"**{t_seq / t_batch:.1f}x** | ≥ 4x |",
        f"| 7 attacks × 7 rules × 3 seeds on digits (200 steps, 20 clients) | {t_ours:.1f} s "
        f"(`fb.sweep`, {programs} program(s)) | {t_ref:.1f} s (ByzFL `run_benchmark`, 2 jobs) | "
        f"**{t_ref / t_ours:.1f}x** | ≥ 10x, and < 600 s |",
        "",
        "The grid: attacks "
        + ", ".join(a["name"] for a, _ in ATTACKS)
        + "; rules "
        + ", ".join(r["name"] for r, _ in RULES)
        + ". Both sides run distributed SGD with "
        "the same model, data, clients, batch, learning rate and evaluation period; ByzFL "
        "computes gradients only for its 16 honest clients, we compute all 20 (attacks "
        "may use the Byzantine clients' honest updates).",
        "",
        f"Where our time goes: {programs} compiled program(s) for the 49 attack × rule "
        f"pairs (each attack and rule a branch chosen per cell), compiled while planning "
        f"and loaded by the workers in {t_compile:.0f} s, and {batches} batch(es) that ran "
        f"{t_runs:.0f} s in all on "
        f"{default_threads()} worker process(es): "
        f"{1000 * t_runs / seed_rounds:.1f} ms per seed-round in a worker. ByzFL takes "
        f"{2 * t_ref * STEPS / seed_rounds:.1f} core-seconds per run, "
        f"{2000 * t_ref / seed_rounds:.0f} ms per step.",
    ]
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
