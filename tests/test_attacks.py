"""Attack library: every attack against its numpy oracle, the papers' properties, and the
registry-wide contract (jit with traced f and strength, vmap without retracing, honest rows
bit-identical)."""

from __future__ import annotations

import statistics

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_byz as fb
from fedjax_byz import attacks, ops
from fedjax_byz.attacks import AttackContext
from fedjax_byz.registry import ConfigError
from tests import oracles_attacks as O

SHAPES = [(8, 12), (13, 31), (20, 7)]
KINDS = ("mixture", "heavy", "offset")


def skewed(seed: int, n: int, d: int, kind: str) -> np.ndarray:
    """Random skewed updates: a dense off-centre cluster plus heavy-tailed stragglers."""
    rng = np.random.default_rng(seed)
    k = max(2, (3 * n) // 5)
    base = rng.standard_normal(d)
    if kind == "mixture":
        dense = base + 1.5 + 0.2 * rng.standard_normal((k, d))
        tail = base + rng.standard_t(2, size=(n - k, d))
    elif kind == "heavy":
        dense = np.exp(rng.standard_normal((k, d))) - 1.0
        tail = rng.standard_cauchy((n - k, d)) * 0.5
    else:  # a large common component: float32 cancellation trap
        dense = 300.0 + base + 0.1 * rng.standard_normal((k, d))
        tail = 300.0 + base + 2.0 * rng.standard_normal((n - k, d))
    G = np.concatenate([dense, tail])
    return G[rng.permutation(n)].astype(np.float32)


def byz_mask(seed: int, n: int, f: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 1000)
    mask = np.zeros(n, bool)
    mask[rng.choice(n, f, replace=False)] = True
    return mask


def cases():
    """(G, byz) pairs over shapes, skew kinds and Byzantine counts (f traced: one compile)."""
    out = []
    for s, (n, d) in enumerate(SHAPES):
        for k, kind in enumerate(KINDS):
            f = [1, (n - 1) // 4, (n - 1) // 2 - 1][k]
            out.append((skewed(10 * s + k, n, d, kind), byz_mask(10 * s + k, n, f)))
    return out


CASES = cases()


def run(name, G, byz, **params):
    return np.asarray(fb.attack(name, G, byz, key=jax.random.key(3), **params))


def check_honest(out, G, byz):
    assert np.array_equal(out[~byz], G[~byz]), "honest rows changed"


# --- oracles -------------------------------------------------------------------------------

ORACLE_CASES = [
    ("lie", {}, lambda G, b: O.lie(G, b)),
    ("lie", {"z": 1.5}, lambda G, b: O.lie(G, b, 1.5)),
    ("lie", {"z": 8.0, "knowledge": "byzantine"}, lambda G, b: O.lie(G, b, 8.0, "byzantine")),
    ("ipm", {}, lambda G, b: O.ipm(G, b)),
    ("ipm", {"eps": 2.5, "knowledge": "byzantine"}, lambda G, b: O.ipm(G, b, 2.5, "byzantine")),
    ("bitflip", {}, lambda G, b: O.fill(G, b, lambda i: -G[i])),
    ("mimic", {}, lambda G, b: O.mimic(G, b)),
    ("byzmean", {"z": 0.3}, lambda G, b: O.byzmean(G, b, O.lie_vector(G, b, 0.3))),
    ("byzmean", {}, lambda G, b: O.byzmean(G, b, O.lie_vector(G, b))),
]


@pytest.mark.parametrize(
    ("name", "params", "oracle"), ORACLE_CASES, ids=[f"{n}-{p}" for n, p, _ in ORACLE_CASES]
)
def test_closed_form_attacks_match_oracle(name, params, oracle):
    for G, byz in CASES:
        out = run(name, G, byz, **params)
        check_honest(out, G, byz)
        want = oracle(G.astype(np.float64), byz)
        scale = np.abs(G).max()
        np.testing.assert_allclose(out, want, rtol=2e-4, atol=2e-5 * scale, err_msg=name)


def constraint_ratio(kind, m, G, rows):
    """LHS / RHS of a constraint in float64 (1 means on the boundary)."""
    m, G = m.astype(np.float64), G.astype(np.float64)
    D = np.array([[O.dist(G[i], G[j]) for j in rows] for i in rows])
    if kind == "max":
        return max(O.dist(m, G[i]) for i in rows) / D.max()
    return sum(O.dist(m, G[i]) ** 2 for i in rows) / (D**2).sum(1).max()


@pytest.mark.parametrize("direction", ["std", "unit", "sign"])
@pytest.mark.parametrize("knowledge", ["omniscient", "byzantine"])
@pytest.mark.parametrize("name", ["minmax", "minsum"])
def test_minmax_minsum_on_constraint_and_match_oracle(name, direction, knowledge):
    oracle = O.minmax if name == "minmax" else O.minsum
    for G, byz in CASES:
        if knowledge == "byzantine" and byz.sum() < 2:
            continue  # σ over one row is 0 and the constraint is a single point
        out = run(name, G, byz, direction=direction, knowledge=knowledge)
        check_honest(out, G, byz)
        rows = O.rows(byz, knowledge)
        m = out[np.argmax(byz)]
        ratio = constraint_ratio(name[3:], m, G, rows)
        assert 0.99 <= ratio <= 1 + 1e-4, (name, direction, ratio)
        want = oracle(G.astype(np.float64), byz, direction, knowledge)
        scale = np.abs(G).max()
        np.testing.assert_allclose(out, want, rtol=1e-3, atol=1e-4 * scale)


def test_minmax_beyond_twice_gamma_init():
    # A γ* far above 2·γ_init (Shejwalkar & Houmansadr's loop cap) is still reached.
    G, byz = CASES[0]
    out = run("minmax", G, byz, gamma_init=0.01)
    assert O.minmax_gamma(G.astype(np.float64), byz) > 0.02
    ratio = constraint_ratio("max", out[np.argmax(byz)], G, O.rows(byz))
    assert 0.99 <= ratio <= 1 + 1e-4


@pytest.mark.parametrize("nu", [0.25, 1.0, 2.0])
def test_strike_matches_oracle_and_sits_on_constraint(nu):
    for G, byz in CASES:
        out = run("strike", G, byz, nu=nu)
        check_honest(out, G, byz)
        G64 = G.astype(np.float64)
        S, g_S, s, alpha = O.strike_parts(G64, byz)
        if nu == 1.0:  # Eq. 13: the Byzantine row sits on the diameter constraint over S
            ratio = constraint_ratio("max", out[np.argmax(byz)], G, S)
            assert 0.99 <= ratio <= 1 + 1e-4, ratio
        np.testing.assert_allclose(
            out, O.strike(G64, byz, nu), rtol=1e-3, atol=1e-4 * np.abs(G).max()
        )


def test_strike_selects_the_skewed_cluster():
    # Honest rows: a dense cluster away from the mean plus a spread tail. S must be the
    # dense cluster's side (Eq. 6–8), and the Byzantine row lies near it.
    rng = np.random.default_rng(0)
    n, d, f = 20, 30, 4
    dense = 1.0 + 0.05 * rng.standard_normal((10, d))
    tail = -2.0 + rng.standard_normal((6, d))
    G = np.concatenate([dense, tail, np.zeros((f, d))]).astype(np.float32)
    byz = np.arange(n) >= n - f
    S, *_ = O.strike_parts(G.astype(np.float64), byz)
    assert len(S) == n - 2 * f and set(range(10)) <= set(S)
    out = run("strike", G, byz)
    assert np.linalg.norm(out[-1] - dense.mean(0)) < np.linalg.norm(out[-1] - G[:16].mean(0))


def test_column_blocked_passes_match_oracles():
    # d spans several column blocks of ops.scan_columns plus a ragged tail, narrow and
    # wide (the small cases above fit in one block), on updates with a large common
    # component.
    n, d = 20, 70000
    for wide in (False, True):
        c = ops.column_block(n, d, wide=wide)
        assert d // c >= 2 and d % c
    G = skewed(7, n, d, "offset")
    byz = byz_mask(7, n, 4)
    G64 = G.astype(np.float64)
    H = O.rows(byz)
    mu, sigma = ops.masked_mean_std(jnp.asarray(G), jnp.asarray(~byz))
    np.testing.assert_allclose(mu, O.mean(G64, H), rtol=1e-6)
    np.testing.assert_allclose(sigma, O.std(G64, H), rtol=1e-4)
    tol = {"rtol": 1e-3, "atol": 1e-4 * np.abs(G).max()}
    np.testing.assert_allclose(run("lie", G, byz, z=1.5), O.lie(G64, byz, 1.5), **tol)
    for name, oracle in [("minmax", O.minmax), ("minsum", O.minsum)]:
        np.testing.assert_allclose(run(name, G, byz), oracle(G64, byz, "std", "omniscient"), **tol)
    np.testing.assert_allclose(
        run("minmax", G, byz, direction="unit"), O.minmax(G64, byz, "unit"), **tol
    )
    # STRIKE's sign(ḡ_S − ḡ) is float32 noise where ḡ_S and ḡ agree to float32 precision.
    _, g_S, _, _ = O.strike_parts(G64, byz)
    sure = np.abs(g_S - O.mean(G64, H)) > 1e-6 * np.abs(G).max()
    np.testing.assert_allclose(run("strike", G, byz)[:, sure], O.strike(G64, byz)[:, sure], **tol)
    assert np.array_equal(run("mimic", G, byz)[byz][0], G[O.mimic_client(G64, byz)])
    lam = O.fang_krum_lambda(G64, byz, O.mean(G64, H))
    np.testing.assert_allclose(run("fang", G, byz, rule="krum")[byz][0], -lam * np.sign(mu), 1e-4)
    cols = np.arange(0, d, 37)  # Fang's trmean attack, checked on columns from every block
    keys = [jax.random.fold_in(jax.random.key(3), i) for i in range(n)]
    u = np.stack([jax.random.uniform(k, (d,), jnp.float32) for k in keys])[:, cols]
    want = O.fang_trmean(G64[:, cols], byz, O.mean(G64, H)[cols], u.astype(np.float64))
    np.testing.assert_allclose(run("fang", G, byz)[:, cols], want, **tol)


def test_byzmean_mean_equals_target():
    for G, byz in CASES:
        for z in (0.3, 5.0):
            out = run("byzmean", G, byz, z=z)
            target = run("lie", G, byz, z=z)[np.argmax(byz)]
            np.testing.assert_allclose(
                out.astype(np.float64).mean(0), target, rtol=1e-4, atol=1e-4 * np.abs(G).max()
            )


def test_byzmean_with_byzantine_knowledge_uses_only_byzantine_rows():
    """Eq. 8's honest sum is estimated as |H|·μ_B: the crafted rows depend on the
    Byzantine clients' own updates only (they used the true honest sum before)."""
    rng = np.random.default_rng(3)
    n, d, f = 12, 30, 5
    G = rng.normal(0.5, 1.0, (n, d)).astype(np.float32)
    byz = np.arange(n) < f
    out = np.asarray(fb.attack("byzmean", G, byz, z=0.3, knowledge="byzantine"))
    moved = G.copy()
    moved[~byz] += rng.normal(0, 3.0, (n - f, d)).astype(np.float32)
    again = np.asarray(fb.attack("byzmean", moved, byz, z=0.3, knowledge="byzantine"))
    np.testing.assert_allclose(out[byz], again[byz], rtol=1e-5, atol=1e-5)
    mu_b, sd_b = G[byz].mean(0), G[byz].std(0, ddof=1)
    t, m1 = mu_b - 0.3 * sd_b, f // 2
    rest = ((n - m1) * t - (n - f) * mu_b) / (f - m1)
    np.testing.assert_allclose(out[:m1], np.tile(t, (m1, 1)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out[m1:f], np.tile(rest, (f - m1, 1)), rtol=1e-4, atol=1e-4)


def test_byzmean_of_any_target_and_roles():
    G, byz = CASES[4]
    f = int(byz.sum())
    target = attacks.get("ipm", eps=3.0)
    atk = attacks.byzmean.byzmean_of(target)
    out = np.asarray(atk.apply(jax.random.key(0), jnp.asarray(G), (), AttackContext.create(byz))[0])
    t = -3.0 * G[~byz].astype(np.float64).mean(0)
    np.testing.assert_allclose(out.astype(np.float64).mean(0), t, rtol=1e-4, atol=1e-3)
    B = np.flatnonzero(byz)
    np.testing.assert_allclose(out[B[: f // 2]], np.broadcast_to(t, (f // 2, G.shape[1])), 1e-5)


def test_mimic_copies_the_principal_client_bit_for_bit():
    for G, byz in CASES:
        out = run("mimic", G, byz)
        j = O.mimic_client(G.astype(np.float64), byz)
        assert not byz[j]
        for i in np.flatnonzero(byz):
            assert np.array_equal(out[i], G[j])
    G, byz = CASES[1]
    out = run("mimic", G, byz, client=int(np.flatnonzero(~byz)[2]))
    assert np.array_equal(out[np.argmax(byz)], G[np.flatnonzero(~byz)[2]])


def test_fang_trmean_matches_oracle_with_the_same_draws():
    for G, byz in CASES:
        for agg in (None, "median"):
            out = np.asarray(fb.attack("fang", G, byz, key=jax.random.key(5), aggregator=agg))
            check_honest(out, G, byz)
            # Row i draws from fold_in(key, i) (attacks.base.byzantine_rows).
            keys = [jax.random.fold_in(jax.random.key(5), i) for i in range(len(G))]
            u = np.stack([jax.random.uniform(k, G.shape[1:], jnp.float32) for k in keys])
            G64 = G.astype(np.float64)
            direc = np.median(G64, 0) if agg == "median" else O.mean(G64, O.rows(byz))
            want = O.fang_trmean(G64, byz, direc, u.astype(np.float64))
            np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5 * np.abs(G).max())


def test_fang_trmean_lies_beyond_the_honest_range():
    G, byz = CASES[3]
    out = run("fang", G, byz)
    s = np.sign(G[~byz].mean(0))
    lo, hi = G[~byz].min(0), G[~byz].max(0)
    B = out[byz]
    assert np.all(np.where(s > 0, B <= lo + 1e-6, B >= hi - 1e-6))


def test_fang_krum_matches_oracle():
    for G, byz in CASES:
        n, f = len(byz), int(byz.sum())
        if n - 2 * f - 1 < 1:
            continue
        out = run("fang", G, byz, rule="krum")
        check_honest(out, G, byz)
        G64 = G.astype(np.float64)
        direc = O.mean(G64, O.rows(byz))
        lam = O.fang_krum_lambda(G64, byz, direc)
        np.testing.assert_allclose(
            out[byz], np.broadcast_to(-lam * np.sign(direc), out[byz].shape), rtol=1e-4
        )


@pytest.mark.parametrize("seed", range(6))
def test_fang_krum_matches_oracle_with_tied_rows(seed):
    """Krum's check at each λ comes from sorted honest distances, not from Krum on the
    attacked matrix: the same λ as the oracle's Krum, also where honest rows coincide
    (tied distances and scores) and at several f."""
    rng = np.random.default_rng(seed)
    n, d = int(rng.integers(7, 16)), int(rng.integers(4, 40))
    f = int(rng.integers(1, (n - 1) // 2))
    G = (0.3 * rng.standard_normal((n, d)) + rng.standard_normal(d)).astype(np.float32)
    G[1 : 1 + n // 3] = G[0]  # tied rows
    byz = rng.permutation(n) < f
    out = run("fang", G, byz, rule="krum")
    G64 = G.astype(np.float64)
    direc = O.mean(G64, O.rows(byz))
    lam = O.fang_krum_lambda(G64, byz, direc)
    np.testing.assert_allclose(out[byz][0], -lam * np.sign(direc), rtol=1e-4)


def test_fang_krum_fools_the_real_krum():
    # Where the halving succeeds (λ above the threshold), the server's Krum returns the
    # Byzantine vector itself; with f = 1 the lone copy is never selected (λ < 1e-5).
    for G, byz in [CASES[4], CASES[7], CASES[0]]:
        out = run("fang", G, byz, rule="krum", aggregator="krum")
        agg = np.asarray(fb.aggregate("krum", out, f=int(byz.sum())))
        lam = np.abs(out[np.argmax(byz)]).max()
        assert np.array_equal(agg, out[np.argmax(byz)]) == (lam >= 1e-5)
        assert (lam >= 1e-5) == (byz.sum() > 1)


def test_adaptive_lie_matches_grid_oracle():
    for G, byz in CASES[:6]:
        f = int(byz.sum())
        out = run("adaptive-lie", G, byz, aggregator="trmean", evals=7, lo=0.0, hi=6.0)
        check_honest(out, G, byz)
        G64 = G.astype(np.float64)
        mu = O.mean(G64, O.rows(byz))
        scores = [
            np.linalg.norm(O.trmean(O.lie(G64, byz, z), f) - mu) for z in np.linspace(0, 6, 7)
        ]
        z = np.linspace(0, 6, 7)[int(np.argmax(scores))]
        np.testing.assert_allclose(out, O.lie(G64, byz, z), rtol=2e-4, atol=2e-5 * np.abs(G).max())


@pytest.mark.parametrize("name", ["minmax", "minsum"])
def test_adaptive_minmax_minsum_match_oracle_and_maximise_the_damage(name):
    # ν scales the γ on the constraint; the oracle searches γ in float64 and applies the
    # grid against a numpy trimmed mean. The chosen ν is also the one, among the grid,
    # whose attacked aggregate (the real trmean rule) lies farthest from μ_H.
    oracle = O.minmax_gamma if name == "minmax" else O.minsum_gamma
    grid = np.linspace(0.0, 2.0, 5)
    G, byz = CASES[4]
    f = int(byz.sum())
    out = run(f"adaptive-{name}", G, byz, aggregator="trmean", evals=5, lo=0.0, hi=2.0)
    check_honest(out, G, byz)
    G64 = G.astype(np.float64)
    H = O.rows(byz)
    mu, p, gamma = O.mean(G64, H), O.direction(G64, H, "std"), oracle(G64, byz)
    crafted = [O.fill(G64, byz, lambda i, m=mu + nu * gamma * p: m) for nu in grid]
    scores = [np.linalg.norm(O.trmean(U, f) - mu) for U in crafted]
    want = crafted[int(np.argmax(scores))]
    np.testing.assert_allclose(out, want, rtol=1e-3, atol=1e-4 * np.abs(G).max())
    ours = [run(name, G, byz, nu=nu) for nu in grid]
    damage = [np.linalg.norm(fb.aggregate("trmean", U, f=f) - mu) for U in ours]
    np.testing.assert_array_equal(out, ours[int(np.argmax(damage))])


def test_minmax_nu_scales_gamma():
    G, byz = CASES[1]
    G64 = G.astype(np.float64)
    H = O.rows(byz)
    want = O.mean(G64, H) + 0.5 * O.minmax_gamma(G64, byz) * O.direction(G64, H, "std")
    out = run("minmax", G, byz, nu=0.5)
    np.testing.assert_allclose(out[byz][0], want, rtol=1e-3, atol=1e-4 * np.abs(G).max())


@pytest.mark.parametrize("batch", [4, 7])
def test_adaptive_vmap_mode_matches_the_sequential_map(batch):
    # On CPU the grid runs one candidate at a time by default; ``batch`` evaluates it in
    # vmapped chunks (the whole grid in one vmap when batch = evals, the accelerator
    # default). Both must choose the same strength.
    G, byz = CASES[4]
    kw = {"aggregator": "trmean", "evals": 7, "lo": 0.0, "hi": 6.0}
    np.testing.assert_array_equal(
        run("adaptive-lie", G, byz, batch=batch, **kw), run("adaptive-lie", G, byz, **kw)
    )


def test_adaptive_needs_the_server_rule():
    G, byz = CASES[0]
    with pytest.raises(ConfigError, match="aggregator"):
        run("adaptive-ipm", G, byz)


# --- contract ------------------------------------------------------------------------------

AGGREGATION_AWARE = {name for name in attacks.names() if name.startswith("adaptive-")}


@pytest.mark.parametrize("name", attacks.names())
def test_every_attack_contract(name):
    """Shape, dtype, honest rows bit-identical, finite (except nan/inf), pytrees."""
    agg = "trmean" if name in AGGREGATION_AWARE else None
    for G, byz in CASES[:3]:
        out = run(name, G, byz, aggregator=agg)
        chex.assert_shape(out, G.shape)
        assert out.dtype == G.dtype
        check_honest(out, G, byz)
        if name not in ("nan", "inf"):
            assert np.isfinite(out).all(), name
    G, byz = CASES[0]
    tree = {"w": G[:, :5].reshape(len(G), 5, 1), "b": G[:, 5:]}
    out = fb.attack(name, tree, byz, key=jax.random.key(3), aggregator=agg)
    chex.assert_trees_all_equal_shapes(out, tree)
    np.testing.assert_array_equal(np.asarray(out["b"])[~byz], G[~byz, 5:])


def test_fedjax_attack_compiles_once_for_new_f_and_strengths():
    n, d = SHAPES[1]
    G = skewed(1, n, d, "mixture")
    for name, knob in [("lie", "z"), ("strike", "nu"), ("minmax", "gamma_init")]:
        fb.attack(name, G, byz_mask(0, n, 1), **{knob: 1.0})
        jitted = attacks._jitted(name, (), None)
        before = jitted._cache_size()
        for f, s in [(2, 0.5), (4, 2.0), (5, 3.0)]:
            fb.attack(name, G, byz_mask(f, n, f), **{knob: s})
        assert jitted._cache_size() == before, name


STRENGTHS = {
    "lie": ("z", [0.0, 1.5, 8.0]),
    "ipm": ("eps", [0.1, 2.5, 10.0]),
    "gaussian": ("sigma", [0.1, 0.5, 2.0]),
    "noise": ("sigma", [0.1, 0.5, 2.0]),
    "strike": ("nu", [0.25, 1.0, 2.0]),
    "byzmean": ("z", [0.3, 1.0, 5.0]),
    "minmax": ("gamma_init", [1.0, 10.0, 30.0]),
    "minsum": ("nu", [0.5, 1.0, 1.5]),
    "fang": ("b", [1.5, 2.0, 4.0]),
    "adaptive-lie": ("hi", [2.0, 5.0, 10.0]),
    "adaptive-strike": ("hi", [1.0, 1.5, 2.0]),
    "adaptive-minmax": ("hi", [0.5, 1.0, 2.0]),
}


@pytest.mark.parametrize("name", sorted(STRENGTHS))
def test_vmap_over_strength_and_f_traces_once(name):
    knob, values = STRENGTHS[name]
    n, d = SHAPES[0]
    G = jnp.asarray(skewed(2, n, d, "mixture"))
    key = jax.random.key(1)
    traces = []
    rule = fb.aggregators.get("trmean")

    def attack(byz, s):
        traces.append(1)
        atk = attacks.get(name, **{knob: s})
        actx = fb.aggregators.AggregatorContext.create(byz.sum())
        ctx = AttackContext.create(byz, aggregate=lambda U: rule.update(U, (), actx)[0])
        return atk.apply(key, G, atk.init(d), ctx)[0]

    over_s = jax.jit(jax.vmap(attack, in_axes=(None, 0)))
    over_f = jax.jit(jax.vmap(attack, in_axes=(0, None)))
    masks = jnp.asarray(np.stack([byz_mask(f, n, f) for f in (1, 2, 3)]))
    grid = jnp.asarray(values, jnp.float32)
    a = over_s(masks[1], grid)
    over_s(masks[2], grid * 0.9)
    b = over_f(masks, grid[1])
    over_f(masks[::-1], grid[0])
    assert len(traces) == 2, traces  # one trace per vmapped program, none on new values
    # vmapped results agree with one-at-a-time calls.
    single = jax.jit(attack)
    for i, s in enumerate(values):
        np.testing.assert_allclose(a[i], single(masks[1], jnp.float32(s)), rtol=1e-5, atol=1e-5)
    for i in range(3):
        np.testing.assert_allclose(b[i], single(masks[i], grid[1]), rtol=1e-5, atol=1e-5)


def test_noise_and_gaussian_draws():
    n, d = 6, 20000
    G = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    byz = np.arange(n) < 2
    g = run("gaussian", G, byz, sigma=0.7)
    z = run("noise", G, byz, sigma=0.7)
    np.testing.assert_allclose(z[byz] - G[byz], g[byz], atol=1e-5)
    assert abs(g[byz].std() - 0.7) < 0.01 and abs(g[byz].mean()) < 0.01
    for i in np.flatnonzero(byz):  # the documented draw (XLA may fold σ into its √2)
        draw = jax.random.normal(jax.random.fold_in(jax.random.key(3), i), (d,))
        np.testing.assert_allclose(g[i], 0.7 * np.asarray(draw), rtol=1e-6, atol=0)
    assert not np.allclose(g[0], g[1])


def test_degenerate_attacks():
    G, byz = CASES[0]
    assert (run("zero", G, byz)[byz] == 0).all()
    assert np.isnan(run("nan", G, byz)[byz]).all()
    assert np.isposinf(run("inf", G, byz)[byz]).all()
    np.testing.assert_array_equal(run("signflip", G, byz), run("bitflip", G, byz))
    np.testing.assert_array_equal(run("none", G, byz), G)


def test_f_zero_leaves_everything_untouched():
    G, _ = CASES[1]
    byz = np.zeros(len(G), bool)
    for name in ("lie", "minmax", "minsum", "strike", "mimic", "byzmean", "fang"):
        np.testing.assert_array_equal(run(name, G, byz), G)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("lie", {"knowledge": "partial"}),
        ("minmax", {"direction": "l2"}),
        ("fang", {"rule": "bulyan"}),
    ],
)
def test_bad_static_params_raise_config_error(name, params):
    G, byz = CASES[0]
    with pytest.raises(ConfigError, match=next(iter(params))):
        run(name, G, byz, **params)


def test_default_z_stays_finite_with_a_byzantine_majority():
    """Baruch et al.'s s = ⌊n/2 + 1⌋ − f is clamped to 1 (was: z = Φ⁻¹(1) = inf, or NaN,
    for f >= ⌊n/2 + 1⌋, rows the server then zeroed silently)."""
    n = 10
    G = skewed(5, n, 8, "mixture")
    for f in (5, 6, 7, 9):
        byz = np.arange(n) < f
        s = max(n // 2 + 1 - f, 1)
        z = statistics.NormalDist().inv_cdf((n - s) / n)
        want = O.lie_vector(G.astype(np.float64), byz, z)
        lie = run("lie", G, byz)
        assert np.isfinite(lie).all(), f
        np.testing.assert_allclose(lie[byz], np.broadcast_to(want, lie[byz].shape), rtol=1e-4)
        assert np.isfinite(run("byzmean", G, byz)).all(), f
    np.testing.assert_allclose(
        attacks.statistical.lie_default_z(n, jnp.int32(7)),
        statistics.NormalDist().inv_cdf(0.9),
        rtol=1e-6,
    )


def test_integer_hyperparameters_stay_integers():
    """mimic's client as a NumPy or JAX integer, also under vmap (was cast to float32:
    the index failed inside jit)."""
    G, byz = CASES[1]
    j = int(np.flatnonzero(~byz)[2])
    want = G[j]
    for client in (j, np.int64(j), jnp.int32(j), np.uint8(j)):
        np.testing.assert_array_equal(run("mimic", G, byz, client=client)[np.argmax(byz)], want)
    honest = jnp.asarray(np.flatnonzero(~byz)[:3])
    outs = jax.vmap(lambda c: fb.attack("mimic", G, byz, client=c))(honest)
    for c, out in zip(np.asarray(honest), np.asarray(outs), strict=True):
        np.testing.assert_array_equal(out[np.argmax(byz)], G[c])


def manual(name, G, byz, rule, params, **hparams):
    """The attack against ``aggregators.get(rule, **params)`` with an explicit context."""
    key = jax.random.key(3)
    agg = fb.aggregators.get(rule, **params)
    actx = fb.aggregators.AggregatorContext.create(int(byz.sum()), key)
    ctx = AttackContext.create(
        byz, aggregate=lambda U: agg.update(U, agg.init(U.shape[1]), actx)[0]
    )
    atk = attacks.get(name, **hparams)
    return np.asarray(atk.apply(key, jnp.asarray(G), atk.init(G.shape[1]), ctx)[0])


@pytest.mark.parametrize(
    ("rule", "params"),
    [
        ("dnc", {"b": 8}),
        ("aksel", {"mode": "n-f"}),
        ("bucketing+median", {"s": 3}),
        ("nnm+geomed", {"iters": 2, "nu": 0.1}),
    ],
)
def test_aggregator_static_params_reach_the_rule(rule, params):
    """A rule's static parameters in ``aggregator=(name, params)`` are static (were traced:
    TracerBoolConversionError, TypeError, ConcretizationTypeError)."""
    G, byz = CASES[3]
    out = run("adaptive-lie", G, byz, aggregator=(rule, params), evals=4)
    check_honest(out, G, byz)
    want = manual("adaptive-lie", G, byz, rule, params, evals=4)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_aggregator_is_checked_for_the_true_f():
    G = skewed(0, 10, 6, "mixture")
    byz = np.arange(10) < 4
    with pytest.raises(ConfigError, match=r"^aggregator\.f: 'bulyan' needs f <= 1"):
        fb.attack("adaptive-lie", G, byz, aggregator="bulyan")
    with pytest.raises(ConfigError, match=r"^aggregator\.b: .*positive Python int"):
        fb.attack("adaptive-lie", G, byz, aggregator=("dnc", {"b": 0}))
    with pytest.raises(ConfigError, match=r"^aggregator: must be a rule name or a \(name, params"):
        fb.attack("adaptive-lie", G, byz, aggregator=("dnc", 8))
    # Under jit the mask is traced: no count to check, the rule still runs.
    out = jax.jit(lambda b: fb.attack("fang", G, b, aggregator="median"))(np.arange(10) < 2)
    np.testing.assert_array_equal(out, fb.attack("fang", G, np.arange(10) < 2, aggregator="median"))


def test_bad_arguments_name_their_field():
    G, byz = CASES[0]
    n = len(G)
    for bad in (np.zeros(n + 1, bool), [0, 1], np.flatnonzero(byz), np.zeros((n, 1), bool)):
        with pytest.raises(ConfigError, match=rf"^byz: must be a bool mask of shape \({n},\)"):
            fb.attack("lie", G, bad)
    with pytest.raises(ConfigError, match=r"^byz: .*dtype float"):
        fb.attack("lie", G, byz.astype(np.float32))
    with pytest.raises(ConfigError, match=r"^byz: an integer mask must hold only 0 and 1"):
        fb.attack("lie", G, byz * 2)
    np.testing.assert_array_equal(run("lie", G, byz.astype(np.int32)), run("lie", G, byz))
    np.testing.assert_array_equal(run("lie", G, byz.tolist()), run("lie", G, byz))
    for kw in ({"evals": 0}, {"evals": 2.0}, {"evals": jnp.int32(4)}):
        with pytest.raises(ConfigError, match=r"^attack\.evals: .*positive Python int"):
            fb.attack("adaptive-lie", G, byz, aggregator="trmean", **kw)
    with pytest.raises(ConfigError, match=r"^attack\.batch: "):
        fb.attack("adaptive-lie", G, byz, aggregator="trmean", batch=0)
    with pytest.raises(ConfigError, match=r"^updates: .*np\.stack"):
        fb.attack("none", list(G), byz)
    with pytest.raises(ConfigError, match=r"^updates: "):
        fb.attack("none", G[:0], byz[:0])


def test_x64_keeps_float32():
    """Under x64, the default z (ALIE, ByzMean) stayed float64 and promoted the rows; no
    dtype-promotion warnings (errors in this suite) either."""
    G, byz = CASES[0]
    with jax.enable_x64(True):
        for name in ("lie", "byzmean", "strike", "minmax", "mimic"):
            out = fb.attack(name, G, byz)
            assert out.dtype == jnp.float32, name
            np.testing.assert_allclose(out, run(name, G, byz), rtol=1e-5, atol=1e-5)


def test_bfloat16_updates_stay_bfloat16():
    """Crafted rows are cast to the updates' dtype where they replace the Byzantine rows
    (lie, byzmean, minmax, minsum, strike and the adaptive attacks returned float32)."""
    G, byz = CASES[0]
    B = jnp.asarray(G, jnp.bfloat16)
    for name in ("lie", "byzmean", "minmax", "minsum", "strike", "ipm", "adaptive-lie"):
        agg = "trmean" if name.startswith("adaptive") else None
        out = fb.attack(name, B, byz, aggregator=agg)
        assert out.dtype == jnp.bfloat16, name
        assert np.array_equal(np.asarray(out)[~byz], np.asarray(B)[~byz]), name
        ref = run(name, np.asarray(B, np.float32), byz, aggregator=agg)
        np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=0.05, atol=0.05)


def test_labelflip_relabels():
    atk = attacks.get("labelflip")
    np.testing.assert_array_equal(atk.relabel(jnp.arange(10), 10), 9 - np.arange(10))


def test_switch_runs_the_chosen_attack():
    """``switch``: the attack at a traced index, as if called alone; label flipping where
    the chosen attack flips labels."""
    rng = np.random.default_rng(0)
    G = jnp.asarray(rng.standard_normal((8, 5)), jnp.float32)
    byz = jnp.arange(8) < 2
    chosen = [attacks.get("lie", z=1.0), attacks.get("labelflip"), attacks.get("gaussian")]
    ctx = AttackContext.create(byz)
    key = jax.random.key(1)
    y = jnp.arange(10) % 4

    @jax.jit
    def run(k):
        attack = attacks.switch(k, chosen)
        return attack.apply(key, G, attack.init(5), ctx)[0], attack.relabel(y, 4)

    for k, alone in enumerate(chosen):
        out, labels = run(jnp.int32(k))
        want = jax.jit(lambda a=alone: a.apply(key, G, a.init(5), ctx)[0])()
        np.testing.assert_array_equal(out, want)
        flipped = alone.relabel(y, 4) if alone.relabel is not None else y
        np.testing.assert_array_equal(labels, flipped)
    assert attacks.switch(jnp.int32(0), chosen[::2]).relabel is None
