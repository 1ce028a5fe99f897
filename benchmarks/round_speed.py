"""Seconds per federated round: fedjax_byz vs a sequential per-client PyTorch loop.

Both do the same work: ``n`` clients each start from the global model and run local SGD
(batch 32, one local step or one local epoch over their own examples) on the same model,
then the server averages the updates and steps. The FLOP rate is the model's own
forward+backward FLOPs (XLA's count for the standard convolution) times the examples
processed, divided by the round time, against this machine's sgemm peak measured in the
same run.

    pip install -e '.[bench]'          # adds torch==2.13.0 (CPU)
    python benchmarks/round_speed.py   # writes benchmarks/results/round_speed.md

Quick check: ``python benchmarks/round_speed.py --quick``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from machine import cpu_name

from fedjax_byz import data as data_lib
from fedjax_byz import models, sim
from fedjax_byz.sim import sharding

BATCH = 32
# XLA's experimental YNNPACK fusion of dots (jaxlib 0.10.2), measured as an opt-in below.
YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT"
OUT = Path(__file__).parent / "results" / "round_speed.md"


def sgemm_peak(size: int = 2048, reps: int = 5) -> float:
    """Best-of ``reps`` GFLOP/s of a float32 ``size²`` matrix product (numpy/BLAS)."""
    a = np.random.default_rng(0).standard_normal((size, size), np.float32)
    best = np.inf
    for _ in range(reps):
        t = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best / 1e9


def model_flops(name: str, input_shape, num_classes: int) -> float:
    """XLA's FLOP count for one example's forward + backward (standard convolutions)."""
    params = {"conv_impl": "xla"} if name != "mlp" else {"hidden": (128,)}
    model = models.get(name, num_classes, input_shape, **params)
    p = model.init(jax.random.key(0))
    x = jnp.zeros((1, *input_shape))

    def loss(p):
        return model.apply(p, x).sum()

    cost = jax.jit(jax.grad(loss)).lower(p).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


def dataset_for(model: str) -> data_lib.Dataset:
    if model == "mlp":
        return data_lib.load("digits")
    return data_lib.load("synthetic", num_train=60000, num_test=100, shape=(28, 28, 1))


def jax_round(model, n, mode, ds, parallelism="auto", devices=None) -> tuple[float, float, int]:
    """(seconds per round, compile seconds, examples per round) for fedjax_byz, the clients
    split over ``devices`` (``None``: the library's choice, ``sim.simulate``)."""
    train = {"batch_size": BATCH, "lr": 0.05}
    train.update({"local_steps": 1} if mode == "step" else {"local_epochs": 1})
    rounds = 20 if model == "mlp" or mode == "step" else 2
    cfg = {
        "name": f"{model}-{n}-{mode}",
        "data": {
            "source": "synthetic" if model != "mlp" else "digits",
            "num_clients": n,
            **(
                {}
                if model == "mlp"
                else {"num_train": 60000, "num_test": 100, "shape": [28, 28, 1]}
            ),
        },
        "model": {"name": model, **({"hidden": [128]} if model == "mlp" else {})},
        "train": train,
        "server": {"rounds": rounds, "eval_every": rounds},
        "client_parallelism": parallelism,
    }
    first = sim.simulate(cfg, progress=False, devices=devices)
    second = sim.simulate(cfg, progress=False, devices=devices)
    counts = np.asarray(sim.client_data(sim.from_dict(cfg).data, 0).counts)
    examples = int(np.minimum(counts, BATCH).sum()) if mode == "step" else int(counts.sum())
    return second["wall_time"] / rounds, first["compile_time"], examples


def torch_round(model_name, n, mode, ds, reps: int = 2) -> float:
    """Seconds per round of the usual PyTorch simulation: one client after another."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.set_num_threads(2)
    C = ds.num_classes
    if model_name == "mlp":
        net = nn.Sequential(
            nn.Flatten(), nn.Linear(int(np.prod(ds.input_shape)), 128), nn.ReLU(), nn.Linear(128, C)
        )
    else:
        net = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(400, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, C),
        )
    parts = data_lib.partition("iid", ds.y_train, n, 0)
    x_all = torch.from_numpy(np.moveaxis((ds.x_train - ds.mean) / ds.std, -1, 1).copy())
    y_all = torch.from_numpy(ds.y_train.astype(np.int64))
    global_state = {k: v.clone() for k, v in net.state_dict().items()}
    flat = lambda m: torch.cat([p.detach().reshape(-1) for p in m.parameters()])  # noqa: E731
    gen = torch.Generator().manual_seed(0)

    def one_round():
        w0 = flat(net)
        updates = []
        for idx in parts:
            net.load_state_dict(global_state)
            opt = torch.optim.SGD(net.parameters(), lr=0.05)
            idx = torch.from_numpy(idx)[torch.randperm(len(idx), generator=gen)]
            batches = [idx[:BATCH]] if mode == "step" else list(torch.split(idx, BATCH))
            for b in batches:
                opt.zero_grad()
                F.cross_entropy(net(x_all[b]), y_all[b]).backward()
                opt.step()
            updates.append(w0 - flat(net))
        g = torch.stack(updates).mean(0)
        torch.nn.utils.vector_to_parameters(w0 - g, net.parameters())
        global_state.update({k: v.clone() for k, v in net.state_dict().items()})

    one_round()
    t = time.perf_counter()
    for _ in range(reps):
        one_round()
    return (time.perf_counter() - t) / reps


def lenet_in_child(flags: str) -> dict[str, float]:
    """LeNet-5 seconds per round at n = 50 (``step``, ``epoch``) in a fresh process with
    ``flags`` added to ``XLA_FLAGS`` (read once, when JAX starts)."""
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip())
    out = subprocess.run(
        [sys.executable, __file__, "--lenet50"], env=env, check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="n=50 only, print, no file")
    parser.add_argument("--lenet50", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sharding.use_cpu_cores()  # as `fedjax-byz` does: each core a device
    if args.lenet50:
        ds = dataset_for("lenet5")
        times = {mode: jax_round("lenet5", 50, mode, ds)[0] for mode in ("step", "epoch")}
        print(json.dumps(times))
        return
    import torch

    peak = sgemm_peak()
    clients = (50,) if args.quick else (10, 50, 100)
    rows = []
    for model in ("mlp", "lenet5"):
        ds = dataset_for(model)
        flops = model_flops(model, ds.input_shape, ds.num_classes)
        for mode in ("step", "epoch"):
            for n in clients:
                ours, compile_s, examples = jax_round(model, n, mode, ds)
                ref = torch_round(model, n, mode, ds, reps=1 if mode == "epoch" else 3)
                rate = flops * examples / ours / 1e9
                dev = 1 if models.is_dense(model) else jax.device_count()
                rows.append(
                    (model, mode, n, dev, ours, compile_s, ref, ref / ours, rate, rate / peak)
                )
                print(
                    f"{model:7s} {mode:5s} n={n:3d}  ours {ours:8.4f}s (compile {compile_s:5.1f}s)"
                    f"  torch {ref:8.4f}s  speedup {ref / ours:5.1f}x  {rate:5.1f} GFLOP/s "
                    f"({100 * rate / peak:.0f}% of peak)",
                    flush=True,
                )
    # The CPU choice of client_parallelism ("auto": all clients vmapped for the MLP, one
    # after another for LeNet-5) against the others, one local step.
    choice = []
    for model in ("mlp", "lenet5"):
        ds = dataset_for(model)
        for cp in (1, 5, 50):
            ours, compile_s, _ = jax_round(model, 50, "step", ds, parallelism=cp)
            choice.append((model, cp, ours, compile_s))
            print(f"{model:7s} client_parallelism={cp:2d}  {ours:8.4f}s", flush=True)
    # LeNet-5 with every client on one device, against the cores as devices (above).
    ds = dataset_for("lenet5")
    single = {mode: jax_round("lenet5", 50, mode, ds, devices=1)[0] for mode in ("step", "epoch")}
    print(f"lenet5 n=50 on one device: {single}", flush=True)
    flagged = {"default": lenet_in_child(""), "ynn": lenet_in_child(YNN_FLAG)}
    print(f"lenet5 n=50 in child processes: {flagged}", flush=True)
    if args.quick:
        return
    lines = [
        "# Round speed: fedjax_byz vs a sequential PyTorch loop",
        "",
        f"Generated by `python benchmarks/round_speed.py` on {datetime.date.today()} "
        f"({cpu_name()}, {jax.device_count()} {jax.default_backend()} devices: one per core, "
        f"jax {jax.__version__}, torch {torch.__version__} with 2 threads). "
        f"sgemm peak measured in the same run: {peak:.1f} GFLOP/s.",
        "",
        "One round = every client trains locally from the global model (batch 32, SGD), "
        "then the server averages and steps. `step` = 1 local step per client; `epoch` = "
        "1 local epoch over the client's own examples (MLP: the 1,437 digits training "
        "images split IID; LeNet-5: 60,000 synthetic 28×28 images split IID). Times are "
        "steady-state seconds per round (compile time listed apart, paid once per "
        "structure). `devices`: the CPU devices a round's clients are split over, as "
        "`fedjax-byz` runs them (`fb.use_cpu_cores()` makes each core a device; "
        "LeNet-5's clients are split over them, the MLP's stay on one: "
        "`sim.run.Batch`). GFLOP/s counts the model's forward+backward FLOPs per example "
        "(XLA's count for standard convolutions) times the examples processed.",
        "",
        "| model | local work | n | devices | fedjax_byz s/round | compile s | "
        "PyTorch s/round | speedup | GFLOP/s | % of sgemm peak |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, mode, n, dev, ours, comp, ref, ratio, rate, frac in rows:
        lines.append(
            f"| {model} | {mode} | {n} | {dev} | {ours:.4f} | {comp:.1f} | {ref:.4f} | "
            f"**{ratio:.2f}x** | {rate:.1f} | {100 * frac:.0f}% |"
        )
    ratio = {(m, mode, n): r for m, mode, n, _, _, _, _, r, _, _ in rows}
    torch_lenet = {mode: ref for m, mode, n, _, _, _, ref, *_ in rows if m == "lenet5" and n == 50}
    lenet = {mode: ours for m, mode, n, _, ours, *_ in rows if m == "lenet5" and n == 50}
    lines += [
        "",
        "Targets on this CPU at n = 50: the MLP round at least 10x faster than the PyTorch "
        f"loop (here {ratio['mlp', 'step', 50]:.2f}x with one local step, "
        f"{ratio['mlp', 'epoch', 50]:.2f}x with one local epoch); the CNN round at least 1.5x "
        f"(here {ratio['lenet5', 'step', 50]:.2f}x and {ratio['lenet5', 'epoch', 50]:.2f}x).",
        "",
        "## One device against the cores as devices",
        "",
        "LeNet-5, n = 50: every client on one device (`devices=1`: XLA's CPU backend then "
        "runs the round mostly on one core) against the clients split over the "
        f"{jax.device_count()} cores (the table above).",
        "",
        "| local work | one device s/round | cores as devices s/round | PyTorch s/round | "
        "speedup on one device |",
        "|---|---|---|---|---|",
        *(
            f"| {mode} | {single[mode]:.4f} | {lenet[mode]:.4f} | {torch_lenet[mode]:.4f} | "
            f"**{torch_lenet[mode] / single[mode]:.2f}x** |"
            for mode in ("step", "epoch")
        ),
        "",
        "## How many clients train at once on a CPU",
        "",
        "`client_parallelism` (n = 50, one local step): 1 runs the clients one after "
        "another inside the compiled round (`lax.map`), 5 vmaps chunks of 5, 50 vmaps all "
        "of them. `auto` picks all of them on an accelerator and, on a CPU, for dense "
        "models (the MLP), and 1 for convolutional models on a CPU "
        "(`models.clients_at_once`). LeNet-5 runs on the cores as devices, so each "
        "device applies the setting to its share of the clients.",
        "",
        "| model | client_parallelism | s/round | compile s |",
        "|---|---|---|---|",
    ]
    lines += [f"| {m} | {cp} | {t:.4f} | {c:.1f} |" for m, cp, t, c in choice]
    lines += [
        "",
        "## Opt-in: XLA's experimental YNNPACK dot fusion",
        "",
        f"LeNet-5, n = 50 (cores as devices), each in a fresh process: as above, and with "
        f"`XLA_FLAGS={YNN_FLAG}` "
        "(an experimental flag of jaxlib 0.10.2 that hands the patch products to "
        "YNNPACK; gradients equal to float32 round-off here). The library does not set it: "
        "an XLA_FLAGS entry that a later jaxlib does not know aborts the process at start.",
        "",
        "| local work | default s/round | with the flag | PyTorch s/round | "
        "speedup with the flag |",
        "|---|---|---|---|---|",
    ]
    for mode in ("step", "epoch"):
        base, ynn = flagged["default"][mode], flagged["ynn"][mode]
        lines.append(
            f"| {mode} | {base:.4f} | {ynn:.4f} | {torch_lenet[mode]:.4f} | "
            f"**{torch_lenet[mode] / ynn:.2f}x** |"
        )
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
