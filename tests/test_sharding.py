"""Sharded runs: 8 simulated CPU devices give the numbers of one device.

The device count is fixed when JAX starts, so the sharded code runs in a subprocess
started with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``, which computes every
case unsharded and sharded and prints both.

Tolerance: aggregates and every per-round and per-evaluation metric agree to
``rtol=1e-5, atol=1e-6`` (the split changes only the order of float reductions in the
rule; observed differences are at most a few 1e-7).
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from fedjax_byz.registry import ConfigError
from fedjax_byz.sim import sharding

from .test_sim import TINY

RTOL, ATOL = 1e-5, 1e-6
CURVES = ("train_loss", "agg_norm", "agg_error", "byz_weight", "test_acc", "test_loss")

# Rule families (DESIGN.md): coordinate-wise, distance-based, SVD-based, and a
# pre-aggregator in front of a coordinate-wise rule.
FAMILIES = ("median", "trmean", "krum", "multikrum", "geomed", "monna", "cge", "dnc", "nnm+median")

# Column passes (ops.scan_columns) run per device when 8 divides d (304), and on the
# replicated matrix otherwise (301); the attacks that make such passes come along. The
# replicated fallback is one code path for every pass, so a few cases cover it.
ATTACKS = ("minmax", "minsum", "strike", "mimic", "fang")
FALLBACK = ("trmean", "dnc b=64", "minmax", "window_sum")

RULES_SCRIPT = r"""
import json, sys
import jax, numpy as np
from fedjax_byz import aggregators, attacks, ops
from fedjax_byz.sim import sharding

n, f = 12, 2
mesh = sharding.make_mesh(batch=1)
byz = np.arange(n) < f
fallback = json.loads(sys.argv[3])
out = {}
for d in (301, 304):
    G = np.random.default_rng(d).standard_normal((n, d)).astype(np.float32)
    G[:f] += 3.0

    def split(fn):
        def run(G):
            with sharding.columns_split(mesh):
                return fn(sharding.spread_columns(G, mesh))
        return run

    fns = {}
    for name, hparams in json.loads(sys.argv[1]):
        rule = aggregators.get(name, **hparams)
        ctx = aggregators.AggregatorContext.create(f=f, key=jax.random.key(1))
        label = name + "".join(f" {k}={v}" for k, v in hparams.items())
        fns[label] = lambda G, rule=rule: rule.update(G, rule.init(d), ctx)[0]
    for name in json.loads(sys.argv[2]):
        fns[name] = lambda G, name=name: attacks.attack(name, G, byz)
    start = jax.numpy.asarray(d // 3)
    fns["window_sum"] = lambda G: ops.window_sum(lambda B, w: B @ w, G, start, d // 2)
    for name, fn in fns.items():
        if d % 8 and name not in fallback:
            continue
        plain, sharded = jax.jit(fn)(G), jax.jit(split(fn))(G)
        assert len(sharded.sharding.device_set) == 8
        out[f"{name}@{d}"] = [np.asarray(plain).tolist(), np.asarray(sharded).tolist()]
print("RESULT" + json.dumps(out))
"""

SIM_SCRIPT = r"""
import json, sys
from fedjax_byz.sim.config import from_dict
from fedjax_byz.sim.run import Batch, run_batch

out = {}
for name, cfgs, mode in json.loads(sys.argv[1]):
    cfgs = [from_dict(c) for c in cfgs]
    runs = {}
    for devices in (1, 8):
        batch = Batch(cfgs, mode, devices=devices)
        records = run_batch(batch, progress=False)
        curves = [{k: r[k] for k in sys.argv[2].split(",")} for r in records]
        runs[devices] = {"mesh": batch.mesh and dict(batch.mesh.shape), "curves": curves}
    out[name] = runs
print("RESULT" + json.dumps(out))
"""


DISTRIBUTED_SCRIPT = r"""
import json, sys
from fedjax_byz.sim import sharding
from fedjax_byz.sim.config import from_dict
from fedjax_byz.sim.run import Batch, run_batch

port, pid, cfgs = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
sharding.initialize_distributed(
    coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid
)
batch = Batch([from_dict(c) for c in cfgs])
curves = [{k: r[k] for k in sys.argv[4].split(",")} for r in run_batch(batch, progress=False)]
print("RESULT" + json.dumps({"mesh": dict(batch.mesh.shape), "curves": curves}))
"""


CORES_SCRIPT = r"""
import json, os, sys
import fedjax_byz as fb
from fedjax_byz.sim.config import from_dict
from fedjax_byz.sim.run import Batch, batch_mode, run_batch

took = fb.use_cpu_cores(3)
import jax
count = jax.device_count()
late = fb.use_cpu_cores(2)  # JAX has started: nothing changes
out = {"took": took, "count": count, "late": late, "mode": batch_mode("auto")}
out["blas_threads"] = os.environ.get("OPENBLAS_NUM_THREADS")
if count == 3:
    conv, dense = (from_dict(c) for c in json.loads(sys.argv[1]))
    out["dense_mesh"] = Batch([dense]).mesh is None
    out["pair_threads"] = Batch([conv, conv]).threads
    runs = {}
    for devices in (None, 1):
        batch = Batch([conv], devices=devices)
        records = run_batch(batch, progress=False)
        curves = [{k: r[k] for k in sys.argv[2].split(",")} for r in records]
        runs[str(devices or 3)] = {"mesh": batch.mesh and dict(batch.mesh.shape), "curves": curves}
    out["runs"] = runs
print("RESULT" + json.dumps(out))
"""


def _in_subprocess(script: str, *args: str, devices: int | None = 8) -> dict:
    """``script``'s RESULT in a process whose XLA_FLAGS fix ``devices`` CPU devices (not
    set when ``None``)."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    if devices is None:
        env.pop("XLA_FLAGS")
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=900,  # a deadlock fails the test
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


def _config(rule: str, **over) -> dict:
    return {
        **TINY,
        "attack": {"name": "lie", "num_byzantine": 1},
        "aggregator": {"name": rule},
        **over,
    }


def _simulate_both(cases: list) -> dict:
    """``[(name, [config, ...], mode), ...]`` run on 1 and on 8 simulated devices."""
    return _in_subprocess(SIM_SCRIPT, json.dumps(cases), ",".join(CURVES))


def _assert_same_runs(runs: dict, mesh: dict) -> None:
    """``runs``: ``{"1": one device, "<k>": k devices}``, each ``{"mesh", "curves"}``."""
    split = next(v for k, v in runs.items() if k != "1")
    assert runs["1"]["mesh"] is None and split["mesh"] == mesh
    for one, many in zip(runs["1"]["curves"], split["curves"], strict=True):
        for k in CURVES:
            a, b = np.asarray(one[k], float), np.asarray(many[k], float)
            np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL, err_msg=k)


def test_rules_and_attacks_on_column_sharded_updates_match_one_device():
    # DnC with b < d samples columns from every device, SignGuard counts signs on a block of
    # consecutive columns over several devices (ops.window_sum), bucketing gathers rows
    # whose columns lie on every device.
    rules = [(name, {}) for name in FAMILIES] + [("dnc", {"b": 64}), ("signguard", {})]
    rules.append(("bucketing+trmean", {}))
    out = _in_subprocess(RULES_SCRIPT, json.dumps(rules), json.dumps(ATTACKS), json.dumps(FALLBACK))
    assert len(out) == len(rules) + len(ATTACKS) + 1 + len(FALLBACK)
    for name, (plain, split) in out.items():
        np.testing.assert_allclose(split, plain, rtol=RTOL, atol=ATOL, err_msg=name)


LAPACK_SCRIPT = r"""
import jax, numpy as np
import fedjax_byz as fb
from fedjax_byz.sim import sharding

mesh = sharding.make_mesh(batch=1)
G = np.random.default_rng(0).standard_normal((10, 100_000)).astype(np.float32)
with sharding.columns_split(mesh):
    run = jax.jit(lambda G: fb.aggregate("smea", G, f=2))
    out = run(sharding.spread_columns(jax.numpy.asarray(G), mesh))
np.testing.assert_allclose(out, fb.aggregate("smea", G, f=2), rtol=1e-5, atol=1e-6)
print("RESULT{}")
"""


def test_batched_lapack_calls_on_the_cores_as_devices_do_not_deadlock():
    # SMEA's 1,024 eigenvalue problems under the guard's cond, one device per thread of
    # XLA's pool (one per core): jaxlib's batched LAPACK kernels had blocked every pool
    # thread (ops.eigh; it hung on the 2 cores here)
    _in_subprocess(LAPACK_SCRIPT, devices=min(max(2, sharding.cpu_cores()), 16))


def test_sharded_sweep_batch_matches_one_device():
    # 2 cells x 3 sampled clients of 6: the cell axis takes 2 devices, the clients 4 (one
    # slot padded); training under shard_map, DnC's eigh on column-sharded updates.
    server = dict(TINY["server"], clients_per_round=3)
    cells = [_config("dnc", seed=s, server=server) for s in (0, 1)]
    out = _simulate_both([("sweep", cells, "vmap")])
    _assert_same_runs(out["sweep"], {"batch": 2, "clients": 4})


@pytest.mark.slow
def test_sharded_runs_match_one_device_every_family_and_map_mode():
    data = dict(TINY["data"], num_clients=16)
    cases = [(rule, [_config(rule, data=data)], "vmap") for rule in FAMILIES]
    # geomed at its default ν = 1e-6 reaches an iterate within float32 resolution of a
    # client's update, where 1/‖z − g_i‖ amplifies reduction-order differences (here
    # 4% in the aggregate's norm after one round); ν = 1e-2 keeps it well conditioned.
    cases[FAMILIES.index("geomed")][1][0]["aggregator"]["nu"] = 1e-2
    cases.append(("map", [_config("trmean", seed=s) for s in (0, 1, 2)], "map"))
    out = _simulate_both(cases)
    for name, _, _ in cases:
        _assert_same_runs(out[name], {"batch": 1, "clients": 8})


@pytest.mark.slow
def test_two_processes_with_jax_distributed_match_one_device():
    # 2 processes x 4 CPU devices joined by jax.distributed (gloo collectives)
    from fedjax_byz.sim.config import from_dict
    from fedjax_byz.sim.run import Batch, run_batch

    cells = [_config("trmean", seed=s) for s in (0, 1)]
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = str(sock.getsockname()[1])
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    args = [json.dumps(cells), ",".join(CURVES)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", DISTRIBUTED_SCRIPT, port, str(pid), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for pid in (0, 1)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    one = run_batch(Batch([from_dict(c) for c in cells]), progress=False)
    for proc, (stdout, stderr) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, stderr[-3000:]
        line = next(x for x in stdout.splitlines() if x.startswith("RESULT"))
        split = json.loads(line[len("RESULT") :])
        runs = {"1": {"mesh": None, "curves": one}, "8": split}
        _assert_same_runs(runs, {"batch": 2, "clients": 4})


def test_use_cpu_cores_splits_convolutional_runs_over_the_cores():
    # hidden 17: 3 divides d (1,077), so krum's column passes run per device
    conv = _config("krum", model={"name": "cnn", "channels": [4, 8], "hidden": 17})
    conv["data"] = dict(TINY["data"], shape=[8, 8, 1])
    cfgs = json.dumps([conv, _config("krum")])
    out = _in_subprocess(CORES_SCRIPT, cfgs, ",".join(CURVES), devices=None)
    assert (out["took"], out["count"], out["late"], out["mode"]) == (True, 3, False, "map")
    assert out["blas_threads"] == os.environ.get("OPENBLAS_NUM_THREADS", "1")
    assert out["dense_mesh"]  # a dense model's clients stay on one device
    assert out["pair_threads"] == max(1, sharding.cpu_cores() // 3)  # cores per 3 devices
    _assert_same_runs(out["runs"], {"batch": 1, "clients": 3})
    # XLA_FLAGS fixing the device count wins
    fixed = _in_subprocess(CORES_SCRIPT, cfgs, ",".join(CURVES), devices=1)
    assert (fixed["took"], fixed["count"]) == (False, 1)


def test_mesh_splits_cells_then_clients():
    assert sharding.make_mesh(batch=4, devices=1) is None
    for bad in (0, 10_000):
        with pytest.raises(ConfigError, match=r"^devices \(sweep.devices .*\): must be null"):
            sharding.make_mesh(batch=1, devices=bad)
