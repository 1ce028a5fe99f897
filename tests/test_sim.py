"""The simulator: local training semantics, the compiled round, determinism, bad input."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_byz as fb
from fedjax_byz import ops, sim
from fedjax_byz.attacks import ATTACKS, stateless
from fedjax_byz.sim.client import make_client_update, map_clients
from fedjax_byz.sweep import grid

try:  # tests/ as a package or as a plain directory on sys.path
    from tests import oracles_aggregators as rule_oracle
    from tests import oracles_attacks as attack_oracle
except ImportError:
    import oracles_aggregators as rule_oracle
    import oracles_attacks as attack_oracle

TINY = {
    "name": "tiny",
    "seed": 0,
    "data": {
        "source": "synthetic",
        "num_train": 240,
        "num_test": 60,
        "shape": [4, 4, 1],
        "num_clients": 6,
        "partition": "dirichlet",
        "beta": 0.5,
    },
    "model": {"name": "mlp", "hidden": [16]},
    "train": {"local_epochs": 1, "batch_size": 16, "lr": 0.1},
    "server": {"rounds": 4, "eval_every": 2},
    "attack": {"name": "none", "num_byzantine": 1},
    "aggregator": {"name": "mean"},
}


def tiny(**over):
    cfg = TINY
    for key, value in over.items():
        cfg = sim.config.set_path(cfg, key, value)
    return cfg


def _count_steps(count, *, batch_size, epochs=1, steps=None, parallelism=1, shared=False):
    """Runs local training with an 'optimizer' adding 1 per step: g = −(number of steps)."""
    ones = optax.GradientTransformation(
        lambda p: (), lambda g, s, p=None: (jax.tree.map(jnp.ones_like, g), s)
    )
    update = make_client_update(
        lambda p, x: x.reshape(x.shape[0], -1) * p["w"],
        lambda x: x,
        batch_size=batch_size,
        local_epochs=epochs,
        local_steps=steps,
        shared_first_step=shared,
    )
    counts = jnp.asarray(count, jnp.int32)
    m = counts.shape[0]
    x = jnp.ones((m, 7, 2))
    y = jnp.zeros((m, 7), jnp.int32)

    def one(i, key):
        return update({"w": jnp.zeros(())}, i, x, y, counts[i], key, ones, lambda v: v)[0]

    g = map_clients(one, (jnp.arange(m), jax.random.split(jax.random.key(0), m)), parallelism)
    return -np.asarray(ops.to_matrix(g)[0])[:, 0]


def test_update_rows_match_ravel_pytree():
    """Rows of the update matrix are in the order the server unravels the aggregate."""
    rng = np.random.default_rng(0)
    tree = {"b": rng.standard_normal((3, 4)), "a": {"k": rng.standard_normal((3, 2, 5))}}
    rows = jax.vmap(lambda t: jax.flatten_util.ravel_pytree(t)[0])(tree)
    np.testing.assert_array_equal(ops.to_matrix(tree)[0], rows)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("parallelism", [1, 2, 4])
def test_clients_with_fewer_examples_take_fewer_steps(parallelism, shared):
    kw = dict(batch_size=2, parallelism=parallelism, shared=shared)
    np.testing.assert_array_equal(_count_steps([0, 1, 3, 7], epochs=2, **kw), [0, 2, 4, 8])
    np.testing.assert_array_equal(_count_steps([0, 1, 3, 7], steps=5, **kw), [0, 5, 5, 5])
    np.testing.assert_array_equal(_count_steps([0, 1, 3, 7], steps=1, **kw), [0, 1, 1, 1])


@pytest.mark.parametrize(
    "steps",
    [
        {"local_epochs": 1, "local_steps": 1},
        {"local_epochs": 1, "local_steps": 3},
        {"local_epochs": 2, "local_steps": None},
    ],
)
def test_shared_first_step_trains_as_the_loop(steps):
    """Taking the first step outside the loops (from the shared weights) changes nothing:
    momentum, weight decay, clipping, an empty client and a short one included."""
    model = fb.models.get("mlp", 4, (3, 3, 1), hidden=[8])
    params = model.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 10, 3, 3, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 4, (4, 10)), jnp.int32)
    counts = jnp.asarray([0, 3, 10, 7])
    opt = sim.client.local_optimizer(0.1, 0.9, 1e-2, 0.5)

    def run(shared):
        update = make_client_update(
            model.apply, lambda v: v, batch_size=4, **steps, shared_first_step=shared
        )

        def one(i, key):
            return update(params, i, x, y, counts[i], key, opt, lambda v: v)

        keys = jax.random.split(jax.random.key(1), 4)
        g, loss = map_clients(one, (jnp.arange(4), keys), 4)
        return np.asarray(ops.to_matrix(g)[0]), np.asarray(loss)

    (g_loop, l_loop), (g_shared, l_shared) = run(False), run(True)
    assert np.all(g_loop[0] == 0) and np.all(np.abs(g_loop[1:]).sum(1) > 0)
    np.testing.assert_allclose(g_shared, g_loop, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(l_shared, l_loop, rtol=1e-6)


def test_a_run_matches_a_plain_per_client_loop():
    """End to end against an independent transcription of FedAvg under attack: a Python
    loop over rounds and clients doing PyTorch-style SGD in float64 numpy (clip at norm 1,
    weight decay, momentum; each batch holds all of the client's examples, so their
    order cannot matter), then the numpy oracles of ALIE and the trimmed mean, then the
    server's momentum step, from the run's initial weights and client data. Every
    round's update matrix and aggregate, as captured, match it."""
    rounds, steps, lr, mu, wd, clip = 3, 3, 0.1, 0.9, 1e-3, 1.0
    cfg = sim.from_dict(
        {
            **TINY,
            "train": {
                "local_steps": steps,
                "batch_size": 256,  # more than any client holds
                "lr": lr,
                "momentum": mu,
                "weight_decay": wd,
                "clip_norm": clip,
            },
            "server": {"rounds": rounds, "eval_every": 1, "lr": 0.5, "momentum": 0.5},
            "attack": {"name": "lie", "z": 1.5, "num_byzantine": 1},
            "aggregator": {"name": "trmean"},
            "diagnostics": {"capture_rounds": list(range(1, rounds + 1))},
        }
    )
    out = sim.simulate(cfg, progress=False)
    data = sim.client_data(cfg.data, sim.run.data_seed(cfg))
    model = fb.models.get("mlp", data.num_classes, data.x.shape[2:], hidden=[16])
    w, unravel = jax.flatten_util.ravel_pytree(sim.Batch([cfg]).init().params)
    w = np.asarray(w, np.float64)

    @jax.jit
    def grad(flat, x, y):  # the mean cross-entropy's gradient at the float32 weights
        loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
            model.apply(unravel(p), data.normalize(x)), y
        ).mean()
        return jax.grad(loss)(flat)

    n = cfg.data.num_clients
    byz = np.isin(np.arange(n), out["byzantine_clients"])
    x, y, counts = np.asarray(data.x), np.asarray(data.y), np.asarray(data.counts)
    velocity = np.zeros_like(w)
    for r in range(rounds):
        G = np.zeros((n, w.size))
        for i in range(n):
            local, buf = w.copy(), np.zeros_like(w)
            for _ in range(steps if counts[i] else 0):
                g = np.asarray(grad(local.astype(np.float32), x[i, : counts[i]], y[i, : counts[i]]))
                g = g * min(1.0, clip / np.linalg.norm(g)) + wd * local
                buf = mu * buf + g
                local = local - lr * buf
            G[i] = w - local
        G = attack_oracle.lie(G, byz, z=1.5)
        aggregate = rule_oracle.trmean(G, 1)[0]
        scale = np.abs(G).max()
        np.testing.assert_allclose(out["captures"]["updates"][r], G, rtol=0, atol=1e-4 * scale)
        np.testing.assert_allclose(out["captures"]["aggregate"][r], aggregate, atol=1e-4 * scale)
        velocity = 0.5 * velocity + aggregate
        w = w - 0.5 * velocity


def test_clipping_as_optax_and_skipped_when_unbounded():
    """``clip_by_global_norm``: optax's arithmetic bit for bit under a finite bound (traced,
    per client under ``vmap``, batched bounds too); an infinite bound leaves every
    gradient as it is, even one whose norm overflows float32."""
    rng = np.random.default_rng(0)
    scale = np.arange(1, 6, dtype=np.float32)  # client i's norm grows with i
    tree = {
        "w": jnp.asarray(rng.standard_normal((5, 4, 3)) * scale[:, None, None], jnp.float32),
        "b": jnp.asarray(rng.standard_normal((5, 3)) * scale[:, None], jnp.float32),
    }
    ours = jax.jit(jax.vmap(lambda t, c: sim.client.clip_by_global_norm(c).update(t, ())[0]))
    ref = jax.jit(jax.vmap(lambda t, c: optax.clip_by_global_norm(c).update(t, ())[0]))
    for bounds in ([0.5, 3.0, 100.0, 2.0, 8.0], [0.5, 2.0, np.inf, 8.0, np.inf]):
        bounds = jnp.asarray(bounds, jnp.float32)
        finite = jnp.where(jnp.isinf(bounds), 1e30, bounds)  # optax: no clipping either
        jax.tree.map(np.testing.assert_array_equal, ours(tree, bounds), ref(tree, finite))
    one = jax.jit(lambda t, c: sim.client.clip_by_global_norm(c).update(t, ())[0])
    tree0 = jax.tree.map(lambda a: a[0], tree)
    jax.tree.map(np.testing.assert_array_equal, one(tree0, jnp.inf), tree0)
    huge = {"w": jnp.full((3,), 1e20, jnp.float32)}  # ‖w‖² overflows float32
    np.testing.assert_array_equal(one(huge, jnp.inf)["w"], huge["w"])
    assert np.isnan(optax.clip_by_global_norm(jnp.inf).update(huge, ())[0]["w"]).all()


def test_auto_client_parallelism():
    """Dense models vmap their clients on every backend, convolutional ones only off CPU."""
    assert fb.models.clients_at_once("mlp", 20, "cpu") == 20
    assert fb.models.clients_at_once("cnn", 20, "cpu") == 1
    assert fb.models.clients_at_once("cnn", 20, "gpu") == 20


@pytest.mark.parametrize("parallelism,shared", [(1, False), (3, False), (3, True)])
def test_padding_never_enters_training(parallelism, shared):
    """A client with 3 (or 2, 1) examples in a block of 9 trains only on its examples."""
    apply = lambda p, x: x.reshape(x.shape[0], -1) @ p["w"]  # noqa: E731
    update = make_client_update(
        apply, lambda x: x, batch_size=4, local_epochs=2, local_steps=None, shared_first_step=shared
    )
    counts = np.array([3, 2, 1])
    real = np.random.default_rng(0).standard_normal((3, 9, 5)).astype(np.float32)

    def run(pad_value):
        x = np.where(np.arange(9)[None, :, None] < counts[:, None, None], real, pad_value)
        x, y = jnp.asarray(x), jnp.zeros((3, 9), jnp.int32)

        def one(i, key):
            return update(
                {"w": jnp.full((5, 4), 0.1)},
                i,
                x,
                y,
                jnp.asarray(counts)[i],
                key,
                optax.sgd(0.1),
                lambda v: v,
            )[0]

        keys = jax.random.split(jax.random.key(1), 3)
        return np.asarray(ops.to_matrix(map_clients(one, (jnp.arange(3), keys), parallelism))[0])

    g_nan = run(np.nan)
    assert np.all(np.isfinite(g_nan)) and np.all(np.abs(g_nan).sum(1) > 0)
    np.testing.assert_array_equal(g_nan, run(1e6))


def test_local_steps_visit_the_same_batches_as_a_local_epoch():
    """K local steps read their batches by top-k, an epoch by a full sort: same order."""
    apply = lambda p, x: x.reshape(x.shape[0], -1) @ p["w"]  # noqa: E731
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 40, 3)), jnp.float32)
    y = jnp.asarray(np.random.default_rng(1).integers(0, 4, (2, 40)), jnp.int32)
    counts = jnp.asarray([8, 40])  # client 0: 2 batches of 4 in a block of 40

    def update(**steps):
        run = make_client_update(apply, lambda v: v, batch_size=4, **steps)
        return run(
            {"w": jnp.full((3, 4), 0.1)},
            0,
            x,
            y,
            counts[0],
            jax.random.key(3),
            optax.sgd(0.1),
            lambda v: v,
        )[0]["w"]

    np.testing.assert_array_equal(
        update(local_epochs=1, local_steps=None), update(local_epochs=1, local_steps=2)
    )


def test_simulate_is_deterministic_and_seeded():
    a = sim.simulate(tiny(), progress=False)
    b = sim.simulate(tiny(), progress=False)
    assert a["test_acc"] == b["test_acc"] and a["train_loss"] == b["train_loss"]
    c = sim.simulate(tiny(seed=1), progress=False)
    assert c["train_loss"] != a["train_loss"]
    assert len(a["test_acc"]) == 2 and len(a["train_loss"]) == 4
    assert len(a["byzantine_clients"]) == 1


def test_simulate_learns_on_separable_data():
    r = sim.simulate(tiny(**{"server.rounds": 10, "server.eval_every": 5}), progress=False)
    assert r["best_acc"] > 0.6  # 10 classes: chance is 0.1


def test_round_batches_over_hyperparameters_with_vmap():
    """Two learning rates in one vmapped program equal two separate runs."""
    cfgs = [sim.from_dict(tiny(**{"train.lr": lr})) for lr in (0.05, 0.2)]
    data = sim.client_data(cfgs[0].data, 0)
    static = sim.StaticConfig.from_config(cfgs[0], data.num_classes, data.x.shape[2:])
    program = sim.make_program(static)
    hps = [sim.HParams.from_config(c) for c in cfgs]
    hp = jax.tree.map(lambda *a: jnp.stack(a), *hps)
    key = jax.random.key(0)
    state = jax.vmap(program.init, (None, 0, None))(key, hp, data)
    start = jnp.zeros((), jnp.int32)
    run = jax.jit(jax.vmap(program.run, (0, 0, None, None, None)), static_argnums=4)
    _, (rm, em) = run(state, hp, data, start, 2)
    for i, h in enumerate(hps):
        s_i = program.init(key, h, data)
        _, (rm_i, em_i) = jax.jit(program.run, static_argnums=4)(s_i, h, data, start, 2)
        np.testing.assert_allclose(em["test_acc"][i], em_i["test_acc"], atol=1e-6)
        np.testing.assert_allclose(rm["train_loss"][i], rm_i["train_loss"], rtol=1e-4)


def test_labelflip_only_touches_byzantine_clients():
    none = sim.simulate(tiny(**{"attack.num_byzantine": 0}), progress=False)
    flip0 = sim.simulate(
        tiny(**{"attack.name": "labelflip", "attack.num_byzantine": 0}), progress=False
    )
    assert none["train_loss"] == flip0["train_loss"]
    flip = sim.simulate(
        tiny(**{"attack.name": "labelflip", "attack.num_byzantine": 2}), progress=False
    )
    assert flip["train_loss"] != none["train_loss"]


def test_nonfinite_updates_are_dropped_and_counted():
    name = "test-nan-rows"
    if name not in ATTACKS:
        ATTACKS.register(name, lambda: stateless(lambda key, G, ctx: jnp.full(G.shape, jnp.nan)))
    r = sim.simulate(tiny(**{"attack.name": name, "attack.num_byzantine": 2}), progress=False)
    assert r["nonfinite"] == [2.0] * 4 or r["nonfinite"] == [2] * 4
    assert all(np.isfinite(r["test_loss"]))


def test_partial_participation():
    r = sim.simulate(tiny(**{"server.clients_per_round": 3}), progress=False)
    full = sim.simulate(tiny(), progress=False)
    assert r["train_loss"] != full["train_loss"]
    assert all(np.isfinite(r["test_acc"]))


def test_empty_clients_are_counted_and_report_no_training_loss():
    skewed = {"data.partition": "dirichlet", "data.beta": 0.02, "data.num_clients": 40}
    r = sim.simulate(tiny(**skewed), progress=False)
    counts = np.asarray(sim.client_data(sim.from_dict(tiny(**skewed)).data, 0).counts)
    assert r["empty_clients"] == int((counts == 0).sum()) > 0
    # the training loss averages the clients that trained: near ln 10 at the first round
    # (counting the 16 empty clients as 0 would give about 1.5)
    assert r["train_loss"][0] > 2.0
    full = sim.simulate(tiny(**{"data.min_size": 30}), progress=False)
    counts = np.asarray(
        sim.client_data(sim.from_dict(tiny(**{"data.min_size": 30})).data, 0).counts
    )
    assert full["empty_clients"] == 0 and counts.min() >= 30


def test_cell_keys_of_older_stores_are_kept():
    """A config's identity leaves out fields added later while they hold their default,
    so results stores written before them keep their keys (hash taken before min_size)."""
    cfg = sim.from_dict(
        {
            "data": {"partition": "dirichlet", "beta": 0.1, "num_clients": 30},
            "attack": {"name": "lie", "num_byzantine": 3, "z": 1.5},
            "aggregator": {"name": "krum"},
        }
    )
    assert grid.cell_key(cfg) == "793b1a4e4980c44e"


def test_byzantine_weight_is_nan_every_round_for_coordinate_rules():
    """trmean gives no per-client weights: NaN in every round, also in rounds that sample
    no Byzantine client (a NaN weight times a False mask was folded into 0 there)."""
    over = {"aggregator.name": "trmean", "server.clients_per_round": 3, "server.rounds": 6}
    r = sim.simulate(tiny(**over, **{"server.eval_every": 3}), progress=False)
    assert all(w is None or np.isnan(w) for w in r["byz_weight"]), r["byz_weight"]


def test_byzantine_weight_is_recorded_for_weighting_rules():
    r = sim.simulate(tiny(**{"attack.num_byzantine": 2}), progress=False)
    np.testing.assert_allclose(r["byz_weight"], [2 / 6] * 4, rtol=1e-6)  # mean: 1/n each


@pytest.mark.parametrize(
    "over,field",
    [
        ({"attack.name": "lei"}, "attack.name"),
        ({"aggregator.name": "medain"}, "aggregator"),
        ({"attack.num_byzantine": 3, "aggregator.name": "median"}, "aggregator.f"),
        ({"aggregator.name": "trmean", "aggregator.assumed_byzantine": 3}, "aggregator.f"),
        ({"data.beta": 0.0}, "data.beta"),
        ({"server.clients_per_round": 7}, "server.clients_per_round"),
        ({"data": {"source": "imagefolder", "path": "/no/such.zip"}}, "data.path"),
        ({"data.num_tset": 5}, "data.num_tset"),
        ({"attack.z": 1.0}, "attack.z"),
        ({"train.lr": -1.0}, "train.lr"),
        ({"server.eval_every": 3}, "server.eval_every"),
        ({"model.name": "vgg"}, "model.name"),
        ({"trian.lr": 0.1}, "trian"),
        ({"server.rouds": 3}, "server.rouds"),
        ({"train.lr": "fast"}, "train.lr"),
        ({"server.rounds": None}, "server.rounds"),
        ({"train.batch_size": 16.5}, "train.batch_size"),
        ({"attack.num_byzantine": 1.5}, "attack.num_byzantine"),
        ({"model.hidden": 16}, "model.hidden"),
        ({"model.hidden": [0]}, "model.hidden"),
        ({"seed": -1}, "seed"),
        ({"name": 5}, "name"),
        ({"attack": {"name": "lie", "num_byzantine": 1, "z": "big"}}, "attack.z"),
        ({"aggregator": {"name": "nnm+cclip", "tau": "big"}}, "aggregator.tau"),
        ({"aggregator": {"name": "geomed", "iters": 2.5}}, "aggregator.iters"),
        ({"data": {"partition": "shards", "shards_per_client": 0}}, "data.shards_per_client"),
        ({"seed": [0, 1]}, "seed"),
    ],
)
def test_bad_input_fails_before_compiling(monkeypatch, over, field):
    def no_compile(*a, **k):
        raise AssertionError("compiled before validating")

    monkeypatch.setattr(sim.run, "make_program", no_compile)
    sim.run._program.cache_clear()
    with pytest.raises(fb.ConfigError) as err:
        sim.simulate(tiny(**over), progress=False)
    assert str(err.value).startswith(field), str(err.value)
    assert "\n" not in str(err.value)


def test_capture_rounds_keep_the_update_matrix():
    cfg = tiny(
        **{
            "diagnostics.capture_rounds": [1, 3],
            "attack.name": "bitflip",
            "attack.num_byzantine": 2,
            "server.clients_per_round": 4,
        }
    )
    r = sim.simulate(cfg, progress=False)
    caps = r["captures"]
    assert caps["updates"].shape[:2] == (2, 4) and list(caps["rounds"]) == [1, 3]
    # the mean rule's aggregate is the mean of the captured rows; the mask matches clients
    np.testing.assert_allclose(caps["aggregate"], caps["updates"].mean(1), rtol=1e-5, atol=1e-7)
    byz_clients = set(r["byzantine_clients"])
    for k in range(2):
        assert [c in byz_clients for c in caps["clients"][k]] == list(caps["byz"][k])
    assert not np.allclose(caps["updates"][0], caps["updates"][1])
    with pytest.raises(fb.ConfigError, match="diagnostics.capture_rounds"):
        sim.simulate(tiny(**{"diagnostics.capture_rounds": [5]}), progress=False)


def test_a_session_keeps_a_bounded_number_of_compiled_programs(monkeypatch):
    """Each compiled program holds hundreds of memory mappings (a process may have 65,530):
    only the most recently used ``MAX_PROGRAMS`` are kept."""
    monkeypatch.setattr(sim.run, "MAX_PROGRAMS", 2)
    monkeypatch.setattr(sim.run, "_COMPILED", type(sim.run._COMPILED)())
    for rule in ("mean", "median", "trmean"):
        fb.simulate(tiny(**{"aggregator.name": rule}), progress=False)
    kept = [key[0].aggregators[0].name for key in sim.run._COMPILED]
    assert kept == ["median", "trmean"]
