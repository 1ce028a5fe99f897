"""Every aggregation rule against its numpy oracle, plus properties and the contract."""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_byz as fb
from fedjax_byz import ops
from fedjax_byz.aggregators import (
    AggregatorContext,
    check,
    clustering,
    compose,
    coordinate,
    distance,
    get,
    pre,
    signguard,
    spectral,
)
from fedjax_byz.registry import ConfigError

try:  # tests/ as a package or as a plain directory on sys.path
    from tests import oracles_aggregators as oracle
except ImportError:
    import oracles_aggregators as oracle

SIZES = [(7, 5, 1), (12, 9, 3), (25, 6, 5)]
PROPS = (11, 6, 2)  # one shape for the property and contract tests: one compile per rule
SMALL = [(6, 4, 1), (9, 5, 2)]  # exact subset searches
KEY = jax.random.key(3)


def updates(n, d, f, seed=0):
    return oracle.skewed_updates(np.random.default_rng(seed + 101 * n + d), n, d, f)


def run(name, G, f, key=KEY, **hp):
    """The public entry point with ``f`` traced (an int32 array, not a Python int)."""
    return fb.aggregate(name, G, f=jnp.int32(f), key=key, return_aux=True, **hp)


def assert_close(out, ref, G):
    scale = np.abs(G).max()
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=2e-5, atol=2e-5 * scale)


def kept(aux):
    w = np.asarray(aux["weights"])
    return set(np.flatnonzero(w > 0).tolist())


def assert_weights(aux, ref_kept):
    w = np.asarray(aux["weights"])
    np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-5)
    assert (w >= 0).all()
    assert kept(aux) == ref_kept


# ---------------------------------------------------------------- oracle comparisons
# Rules with order statistics (a sorting network per n) run at every size; the mean and
# the Gram-space rules, whose code does not depend on n, at fewer.
ORACLES = {
    "mean": (oracle.mean, SIZES[2:]),
    "median": (oracle.median, SIZES),
    "trmean": (oracle.trmean, SIZES),
    "meamed": (oracle.meamed, SIZES),
    "bulyan": (oracle.bulyan, SIZES),
    "aksel": (oracle.aksel, SIZES[1:]),
    "krum": (oracle.krum, SIZES[1:]),
    "multikrum": (oracle.multikrum, SIZES[1:]),
    "monna": (oracle.monna, SIZES[1:]),
    "cge": (oracle.cge, SIZES[1:]),
    "geomed": (oracle.geomed, SIZES[1:]),
    "cclip": (oracle.cclip, SIZES[1:]),
    "caf": (oracle.caf, SIZES[1:]),
}
CASES = [(name, *size) for name, (_, sizes) in ORACLES.items() for size in sizes]


def check_oracle(name, n, d, f):
    if name == "bulyan":
        f = min(f, (n - 3) // 4)
    G = updates(n, d, f)
    out, aux = run(name, G, f)
    ref, ref_kept = ORACLES[name][0](G, f)
    assert_close(out, ref, G)
    if ref_kept is not None:
        assert_weights(aux, ref_kept)


@pytest.mark.parametrize("name,n,d,f", CASES)
def test_rules_match_oracle(name, n, d, f):
    check_oracle(name, n, d, f)


@pytest.mark.slow
@pytest.mark.parametrize("n,f", [(50, 10), (100, 20)])
@pytest.mark.parametrize("name", ["median", "trmean", "meamed", "bulyan"])
def test_order_statistics_at_benchmark_sizes(name, n, f):
    check_oracle(name, n, 64, f)


@pytest.mark.parametrize("n,d,f", SIZES[:2])
def test_knobs_match_oracle(n, d, f):
    G = updates(n, d, f, seed=5)
    out, _ = run("geomed", G, f, iters=3, nu=0.1)
    assert_close(out, oracle.geomed(G, f, iters=3, nu=0.1)[0], G)
    out, _ = run("cclip", G, f, tau=2.0, iters=3)
    assert_close(out, oracle.cclip(G, f, tau=2.0, iters=3)[0], G)
    out, aux = run("aksel", G, f, mode="n-f")
    ref, ref_kept = oracle.aksel(G, f, mode="n-f")
    assert_close(out, ref, G)
    assert_weights(aux, ref_kept)
    out, aux = run("monna", G, f, idx=2)
    ref, ref_kept = oracle.monna(G, f, idx=2)
    assert_close(out, ref, G)
    assert_weights(aux, ref_kept)


def test_cclip_starts_from_its_state():
    G = updates(9, 6, 2)
    rule = get("cclip", iters=2)
    ctx = AggregatorContext.create(2)
    v1, s1, _ = rule.update(jnp.asarray(G), rule.init(6), ctx)
    v2, _, _ = rule.update(jnp.asarray(G), s1, ctx)
    v_ref = oracle.cclip(G, 2, iters=2)[0]
    assert_close(v1, v_ref, G)
    assert_close(v2, oracle.cclip(G, 2, iters=2, v=v_ref)[0], G)


@pytest.mark.parametrize("n,d,f", SMALL)
@pytest.mark.parametrize("name", ["mda", "smea"])
def test_subset_rules_match_oracle(name, n, d, f):
    G = updates(n, d, f)
    out, aux = run(name, G, f)
    ref, ref_kept = getattr(oracle, name)(G, f)
    assert_close(out, ref, G)
    assert_weights(aux, ref_kept)


@pytest.mark.parametrize("n,d,f", SIZES)
def test_rbtm_matches_oracle(n, d, f):
    f = min(f, (n - 1) // 3)
    G = updates(n, d, f)
    out, _ = run("rbtm", G, f)
    delivered = np.asarray(jax.random.permutation(KEY, n))[: n - f]
    assert_close(out, oracle.rbtm(G, f, delivered)[0], G)


@pytest.mark.parametrize("n,f,niters,c", [(7, 1, 1, 1.0), (12, 3, 2, 1.5), (25, 5, 2, 1.0)])
def test_dnc_matches_oracle(n, f, niters, c):
    G = updates(n, 40, f)
    b = 7
    coords = [
        np.asarray(spectral.sample_coordinates(jax.random.fold_in(KEY, t), 40, b))
        for t in range(niters)
    ]
    out, aux = run("dnc", G, f, b=b, niters=niters, c=c)
    ref, ref_kept = oracle.dnc(G, f, coords, c=c)
    assert_close(out, ref, G)
    assert_weights(aux, ref_kept)
    if n == 12:
        out, aux = run("dnc", G, f, b=1000)  # b >= d: every coordinate
        ref, ref_kept = oracle.dnc(G, f, [np.arange(40)])
        assert_close(out, ref, G)
        assert_weights(aux, ref_kept)


@pytest.mark.parametrize("n,b", [(7, 40), (25, 7), (50, 300)])
def test_top_direction_scores_match_svd(n, b):
    X = updates(n, b, n // 5)
    Xc = X - X.mean(0)
    v = np.linalg.svd(Xc.astype(np.float64), full_matrices=False)[2][0]
    ref = np.square(Xc @ v)
    out = np.asarray(jax.jit(spectral.top_direction_scores)(jnp.asarray(X)))
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-4 * ref.max())


def test_eigh_decomposes_one_matrix_per_lapack_call():
    # batched (SMEA's subsets) and under vmap (a sweep over cells): one matrix per call on
    # CPU, so that no call can block the thread pool (ops.eigh); numbers as jnp.linalg's
    B = jax.random.normal(KEY, (3, 4, 6, 6))
    A = B @ jnp.swapaxes(B, -1, -2)

    def both(a):  # [4, 6, 6]
        lam, U = ops.eigh(a)
        return lam, U, ops.eigh(a, vectors=False)

    fn = jax.jit(jax.vmap(both))
    lam, U, vals = fn(A)
    ref = np.linalg.eigvalsh(np.asarray(A, np.float64))
    np.testing.assert_allclose(lam, ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(vals, ref, rtol=1e-4, atol=1e-4)
    rebuilt = np.einsum("...ij,...j,...kj->...ik", U, lam, U)
    np.testing.assert_allclose(rebuilt, A, rtol=1e-4, atol=1e-4)
    calls = re.findall(
        r"custom_call @lapack_\w+.*?num_batch_dims = \"(\d+)\"", fn.lower(A).as_text()
    )
    assert len(calls) == 2 and set(calls) == {"0"}


def test_sample_coordinates_are_distinct_and_uniform():
    draws = jax.vmap(lambda k: spectral.sample_coordinates(k, 10, 4))(jax.random.split(KEY, 4000))
    draws = np.asarray(draws)
    assert all(len(set(r)) == 4 for r in draws)
    assert draws.min() >= 0 and draws.max() < 10
    freq = np.bincount(draws.ravel(), minlength=10) / draws.size
    np.testing.assert_allclose(freq, 0.1, atol=0.01)


@pytest.mark.parametrize("kind,n,d,f", [(None, 25, 80, 5), ("sim", 12, 60, 3), ("dist", 25, 80, 5)])
def test_signguard_matches_oracle(kind, n, d, f):
    G = updates(n, d, f)
    G[f:, : d // 2] = np.where(np.abs(G[f:, : d // 2]) < 49, 0.0, G[f:, : d // 2])
    name = "signguard" if kind is None else f"signguard-{kind}"
    out, aux = run(name, G, f)
    m = int(0.1 * d)
    start = int(jax.random.randint(jax.random.split(KEY)[0], (), 0, d - m + 1))
    ref, ref_kept = oracle.signguard(G, start, m, kind)
    assert_close(out, ref, G)
    assert_weights(aux, ref_kept)


def test_mean_shift_matches_sklearn_alone_and_vmapped():
    """Labels as scikit-learn's ``MeanShift(bin_seeding=True, cluster_all=False)`` on
    clustered points with outliers, one set at a time and under ``vmap`` (each seed stops
    on its own; the batched loop runs until the slowest)."""
    from sklearn.cluster import MeanShift

    rng = np.random.default_rng(0)
    sets = []
    for _ in range(4):
        centres = rng.uniform(0, 1, (3, 3))
        X = centres[rng.integers(0, 3, 40)] + 0.2 * rng.standard_normal((40, 3))
        X[:4] = rng.uniform(-1, 2, (4, 3))
        sets.append(X.astype(np.float32))
    bw = 0.35  # several shifts to converge: 1 or 3 steps give other labels here
    want = [
        MeanShift(bandwidth=bw, bin_seeding=True, cluster_all=False).fit(X).labels_ for X in sets
    ]
    for X, w in zip(sets, want, strict=True):
        np.testing.assert_array_equal(clustering.mean_shift(jnp.asarray(X), bw), w)
    got = jax.jit(jax.vmap(lambda X: clustering.mean_shift(X, bw)))(jnp.asarray(np.stack(sets)))
    np.testing.assert_array_equal(got, np.stack(want))


@pytest.mark.parametrize("n", [2, 7, 30, 50, 64])
def test_bandwidth_and_median_of_others_by_rank(n):
    """``estimate_bandwidth`` as scikit-learn's on all rows (``n_samples >= n``), and
    SignGuard's median over the other rows as numpy's, on values with ties."""
    from sklearn.cluster import estimate_bandwidth

    rng = np.random.default_rng(n)
    X = rng.integers(0, 3, (n, 4)).astype(np.float32) + 0.1 * rng.standard_normal((n, 4))
    X = X.astype(np.float32)
    for q in (0.1, 0.5, 1.0):
        got = clustering.estimate_bandwidth(jnp.asarray(X), KEY, q, n_samples=64)
        np.testing.assert_allclose(got, estimate_bandwidth(X, quantile=q), rtol=1e-5)
    S = rng.integers(0, 4, (n, n)).astype(np.float32)
    off = [np.delete(S[i], i) for i in range(n)]
    np.testing.assert_array_equal(jax.jit(signguard._median_others)(S), np.median(off, axis=1))


@pytest.mark.parametrize("n,d,f", SIZES)
def test_clippedclustering_matches_oracle(n, d, f):
    G = updates(n, d, f)
    out, aux = run("clippedclustering", G, f)
    ref, ref_kept = oracle.clippedclustering(G, f)
    assert_close(out, ref, G)
    assert_weights(aux, ref_kept)


# ---------------------------------------------------------------- pre-aggregators
def pre_apply(p, G, f, key=KEY):
    ctx = AggregatorContext.create(f, key)
    out, _, mixing = jax.jit(p.update)(jnp.asarray(G), p.init(G.shape[1]), ctx)
    return out, mixing


@pytest.mark.parametrize("n,d,f", SIZES[1:])
def test_pre_aggregators_match_oracle(n, d, f):
    G = updates(n, d, f)
    for s in (2, 3):
        out, mixing = pre_apply(pre.bucketing(s), G, f)
        perm = np.asarray(jax.random.permutation(KEY, n))
        assert_close(out, oracle.bucketing(G, perm, s), G)
        np.testing.assert_allclose(np.asarray(mixing).sum(1), 1.0, rtol=1e-6)
    out, mixing = pre_apply(pre.nnm(), G, f)
    assert_close(out, oracle.nnm(G, f), G)
    np.testing.assert_allclose(np.asarray(mixing) @ G, out, rtol=1e-5, atol=1e-4)
    assert_close(pre_apply(pre.arc(), G, f)[0], oracle.arc(G, f), G)
    assert_close(pre_apply(pre.clip(3.0), G, f)[0], oracle.clip(G, 3.0), G)


def test_composites_route_keywords_and_weights():
    n, d, f = 12, 7, 3
    G = updates(n, d, f)
    out, aux = run("nnm+multikrum", G, f)
    Y = oracle.nnm(G, f)
    ref, _ = oracle.multikrum(Y, f)
    assert_close(out, ref, G)
    np.testing.assert_allclose(np.asarray(aux["weights"]).sum(), 1.0, rtol=1e-5)
    out, _ = run("bucketing+cclip", G, f, s=3, tau=1.0)
    Y = oracle.bucketing(G, np.asarray(jax.random.permutation(jax.random.fold_in(KEY, 0), n)), 3)
    assert_close(out, oracle.cclip(Y, f, tau=1.0)[0], G)
    out, _ = run("arc+trmean", G, f)
    assert_close(out, oracle.trmean(oracle.arc(G, f), f)[0], G)


def pre_aggregated(G, f):
    """Each pre-aggregator's oracle output, with the key ``run`` gives the first stage of
    a composite and the default knobs (``clip``'s radius 2)."""
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(KEY, 0), len(G)))
    return {
        "bucketing": oracle.bucketing(G, perm, 2),
        "nnm": oracle.nnm(G, f),
        "arc": oracle.arc(G, f),
        "clip": oracle.clip(G, 2.0),
    }


@pytest.mark.parametrize("rule", ["median", "trmean", "meamed", "rbtm"])
def test_coordinate_rules_behind_pre_aggregators_match_oracle(rule):
    """A coordinate-wise rule behind a pre-aggregator runs on the mapped rows one column
    block at a time (``base.compose``): two whole blocks and a ragged tail here."""
    n, f = 13, 2
    d = 2 * ops.column_block(n, 10**6) + 5
    G = updates(n, d, f)
    for name, Y in pre_aggregated(G, f).items():
        out, aux = run(f"{name}+{rule}", G, f)
        if rule == "rbtm":
            m = len(Y)
            ref = oracle.rbtm(Y, f, np.asarray(jax.random.permutation(KEY, m))[: m - f])[0]
        else:
            ref = getattr(oracle, rule)(Y, f)[0]
        assert_close(out, ref, G)
        assert np.isnan(aux["weights"]).all() and aux["weights"].shape == (n,)


@pytest.mark.parametrize(
    "name,n,d,f",
    [(r, 12, 9, 3) for r in ("krum", "multikrum", "geomed")]
    + [(r, *SMALL[1]) for r in ("mda", "smea")],
)
def test_nnm_before_gram_rules_matches_oracle(name, n, d, f):
    """NNM in front of a Gram-space rule runs on Gram matrices (``base.compose``): the
    rule's oracle on the mixed rows, and weights that rebuild the aggregate."""
    G = updates(n, d, f)
    out, aux = run(f"nnm+{name}", G, f)
    assert_close(out, getattr(oracle, name)(oracle.nnm(G, f), f)[0], G)
    w = np.asarray(aux["weights"], np.float64)
    np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-5)
    np.testing.assert_allclose(w @ G, np.asarray(out), rtol=1e-5, atol=1e-5 * np.abs(G).max())


def test_bucketing_then_nnm_then_krum():
    """A pre-aggregator before the fused NNM stage: its output feeds NNM's Gram matrix,
    the weights map back through both mixings, and the state keeps its structure."""
    n, d, f = 12, 9, 2
    G = updates(n, d, f)
    out, aux = run("bucketing+nnm+krum", G, f)
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(KEY, 0), n))
    Y = oracle.nnm(oracle.bucketing(G, perm, 2), f)
    assert_close(out, oracle.krum(Y, f)[0], G)
    w = np.asarray(aux["weights"], np.float64)
    np.testing.assert_allclose(w @ G, np.asarray(out), rtol=1e-5, atol=1e-5 * np.abs(G).max())
    rule = get("bucketing+nnm+krum")
    state = rule.update(jnp.asarray(G), rule.init(d), AggregatorContext.create(f, KEY))[1]
    chex.assert_trees_all_equal_structs(state, rule.init(d))


@pytest.mark.parametrize("b", [7, 1000])
def test_dnc_behind_pre_aggregators_matches_oracle(b):
    """DnC behind a pre-aggregator reads only its sampled columns of the mapped rows and
    weights the input rows (``Aggregator.sampled_weights``): the oracle on the mapped
    rows, weights that rebuild the aggregate, and no ``[m, d]`` mapped matrix when
    ``b < d``."""
    n, d, f = 12, 40, 2
    G = updates(n, d, f)
    coords = [np.asarray(spectral.sample_coordinates(jax.random.fold_in(KEY, 0), d, b))]
    coords = coords if b < d else [np.arange(d)]
    for name, Y in pre_aggregated(G, f).items():
        out, aux = run(f"{name}+dnc", G, f, b=b)
        assert_close(out, oracle.dnc(Y, f, coords)[0], G)
        if name in ("bucketing", "nnm"):  # attribution: the mixing (rescalings: identity)
            w = np.asarray(aux["weights"], np.float64)
            np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-5)
            np.testing.assert_allclose(w @ G, out, rtol=1e-5, atol=1e-5 * np.abs(G).max())
    rule = get("bucketing+dnc", b=b)
    jaxpr = str(jax.make_jaxpr(rule.update)(G, rule.init(d), AggregatorContext.create(f)))
    assert (f"f32[{n // 2},{d}]" in jaxpr) == (b >= d)


def test_nnm_before_gram_rule_does_not_form_mixed_rows():
    """No ``[n, d]`` product (the mixed rows ``W G``) in the fused composite's program;
    the unfused composition, checked the same way, has one."""
    n, d, f = 12, 9, 3
    G = jnp.asarray(updates(n, d, f))
    ctx = AggregatorContext.create(f)
    mixed_rows = re.compile(rf"f32\[{n},{d}\] = dot_general")
    unfused = pre.nnm()._replace(gram_mixing=None)
    for nnm, formed in ((pre.nnm(), False), (unfused, True)):
        rule = compose(nnm, distance.geomed())
        jaxpr = str(jax.make_jaxpr(rule.update)(G, rule.init(d), ctx))
        assert bool(mixed_rows.search(jaxpr)) == formed
        out = jax.jit(rule.update)(G, rule.init(d), ctx)[0]
        assert_close(out, oracle.geomed(oracle.nnm(np.asarray(G), f), f)[0], np.asarray(G))


# ---------------------------------------------------------------- properties
DETERMINISTIC = [
    "mean",
    "median",
    "trmean",
    "meamed",
    "krum",
    "multikrum",
    "bulyan",
    "geomed",
    "cclip",
    "aksel",
    "cge",
    "caf",
    "mda",
    "smea",
    "clippedclustering",
    "nnm+median",
]
EQUIVARIANT = [
    "mean",
    "median",
    "trmean",
    "meamed",
    "krum",
    "multikrum",
    "bulyan",
    "geomed",
    "aksel",
    "monna",
    "dnc",
    "caf",
    "mda",
    "smea",
    "nnm+median",
    "nnm+geomed",
]


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_permutation_invariance(name):
    n, d, f = PROPS
    G = updates(n, d, f)
    perm = np.random.default_rng(0).permutation(n)
    a, aux_a = run(name, G, f)
    b, aux_b = run(name, G[perm], f)
    assert_close(b, np.asarray(a, np.float64), G)
    if not np.isnan(aux_a["weights"]).any():
        np.testing.assert_allclose(aux_b["weights"], np.asarray(aux_a["weights"])[perm], atol=1e-5)


@pytest.mark.parametrize("name", EQUIVARIANT)
def test_translation_equivariance(name):
    n, d, f = PROPS
    G = updates(n, d, f)
    t = np.random.default_rng(1).standard_normal(d).astype(np.float32) * 20
    a, _ = run(name, G, f)
    b, _ = run(name, G + t, f)
    np.testing.assert_allclose(b, np.asarray(a) + t, rtol=1e-4, atol=1e-3)


def test_trmean_with_f_zero_is_mean_and_bucketing_s1_is_identity():
    G = updates(12, 8, 0)
    chex.assert_trees_all_close(run("trmean", G, 0)[0], run("mean", G, 0)[0], rtol=1e-6)
    out, mixing = pre_apply(pre.bucketing(1), G, 0)
    perm = np.asarray(jax.random.permutation(KEY, 12))
    np.testing.assert_array_equal(np.asarray(out), G[perm])
    np.testing.assert_array_equal(np.asarray(mixing), np.eye(12)[perm])


@pytest.mark.parametrize("name", ["median", "trmean", "meamed", "rbtm"])
def test_coordinate_rules_stay_in_honest_range(name):
    n, d, f = 13, 40, 4
    G = updates(n, d, f)
    G[:f] = 1e6 * np.sign(np.random.default_rng(2).standard_normal((f, d)))
    out = np.asarray(run(name, G, f)[0])
    honest = G[f:]
    assert (out >= honest.min(0) - 1e-3).all() and (out <= honest.max(0) + 1e-3).all()


# ---------------------------------------------------------------- contract
def count_traces(name, **static):
    calls = []
    rule = get(name, **static)

    def agg(G, f, knobs):
        calls.append(1)
        rebuilt = get(name, **static, **knobs)
        ctx = AggregatorContext.create(f, KEY)
        return rebuilt.update(G, rebuilt.init(G.shape[1]), ctx)[0]

    del rule
    return calls, agg


@pytest.mark.parametrize(
    "name,knobs",
    [
        ("trmean", {}),
        ("krum", {}),
        ("bulyan", {}),
        ("geomed", {"nu": [1e-6, 1e-3, 0.1]}),
        ("cclip", {"tau": [1.0, 10.0, 100.0]}),
        ("dnc", {"c": [1.0, 1.5, 2.0]}),
        ("signguard", {"lower": [0.1, 0.2, 0.3], "upper": [2.0, 3.0, 4.0]}),
        ("nnm+median", {}),
        ("mda", {}),
    ],
)
def test_vmap_over_f_and_knobs_compiles_once(name, knobs):
    G = jnp.asarray(updates(11, 6, 2))
    calls, agg = count_traces(name)
    fs = jnp.array([0, 1, 2], jnp.int32)
    ks = {k: jnp.asarray(v, jnp.float32) for k, v in knobs.items()}
    fn = jax.jit(jax.vmap(agg, in_axes=(None, 0, 0)))
    out1 = fn(G, fs, ks)
    out2 = fn(G, fs[::-1], {k: v[::-1] for k, v in ks.items()})
    assert len(calls) == 1
    chex.assert_shape(out1, (3, 6))
    chex.assert_tree_all_finite((out1, out2))
    np.testing.assert_allclose(out1[0], out2[2], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", fb.aggregators.names())
def test_every_rule_rejects_nonfinite_rows(name):
    n, d, f = PROPS
    G = updates(n, d, f)
    assert not run(name, G, f)[1]["nonfinite"].any()
    G[3, 2] = np.nan
    G[5, 0] = np.inf
    out, aux = run(name, G, f)
    chex.assert_tree_all_finite(out)
    np.testing.assert_array_equal(np.flatnonzero(aux["nonfinite"]), [3, 5])
    w = np.asarray(aux["weights"])
    if not np.isnan(w).any():
        np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-5)


@pytest.mark.parametrize("name", ["mean", "cclip", "krum", "median", "nnm+median", "bucketing+dnc"])
def test_eager_and_traced_guards_agree(name):
    """The eager ``aggregate`` runs the rule, then the guarded rerun only when a row
    needs it (two programs, ``base.guard_parts``); under ``jit`` it is one program with
    the rerun in a branch. Both reject the same rows and return the same aggregate, and
    the eager first program holds no copy of the matrix (the rerun's zeroed rows, which
    XLA's CPU runtime would allocate on every call). ``d`` is wide enough that a composite's
    column block (``ops.scan_columns``) is smaller than the matrix."""
    n, d, f = 11, 400_000, 2
    traced = jax.jit(lambda G: fb.aggregate(name, G, f=f, key=KEY, return_aux=True))
    G = updates(n, d, f)
    for bad in ([], [6], [1, 8]):
        H = G.copy()
        H[bad, 3] = np.nan
        (out, aux), (ref, ref_aux) = run(name, H, f), traced(H)
        np.testing.assert_array_equal(np.flatnonzero(aux["nonfinite"]), bad)
        np.testing.assert_array_equal(aux["nonfinite"], ref_aux["nonfinite"])
        np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    static, numeric = fb.aggregators.prepare(name, {}, n, f)
    programs = fb.aggregators._jitted(name, static)
    assert programs["first"]._cache_size() and programs["checked"]._cache_size()  # ran
    compiled = programs["first"].lower(jnp.asarray(G), jnp.int32(f), KEY, numeric).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < G.nbytes


@pytest.mark.parametrize("name", ["cclip", "krum", "median", "nnm+median"])
def test_guard_stays_a_branch_under_vmap(name):
    """Under ``vmap`` (a sweep) the guard's predicate is taken for the whole batch
    (``any_in_batch``), so its rerun stays a branch, not a select that runs it for every
    element; each element still gets its own rows' guarded aggregate, in nested vmaps
    too."""
    n, d, f = 11, 64, 2
    agg = get(name)
    ctx = AggregatorContext.create(f, KEY)

    def one(G):
        return agg.update(G, agg.init(d), ctx)[0]

    Gs = np.stack([updates(n, d, f, seed=s) for s in range(4)])
    Gs[2, 5, 1] = np.inf
    batched = jax.jit(jax.vmap(one))
    assert "conditional" in batched.lower(Gs).compile().as_text()
    ref = np.stack([one(G) for G in Gs])
    np.testing.assert_allclose(batched(Gs), ref, rtol=1e-5, atol=1e-5)
    nested = jax.jit(jax.vmap(jax.vmap(one)))(Gs.reshape(2, 2, n, d)).reshape(4, d)
    np.testing.assert_allclose(nested, ref, rtol=1e-5, atol=1e-5)


COORDINATE_ONLY = ["mean", "median", "trmean", "meamed", "rbtm", "bucketing+median"]


@pytest.mark.parametrize(
    "name",
    [
        *(r for r in fb.aggregators.names() if r not in COORDINATE_ONLY),
        "nnm+median",
        "bucketing+krum",
    ],
)
def test_rules_that_square_rows_reject_rows_whose_norm_overflows(name):
    """A finite row of 1e20 entries (squared norm past float32) is rejected like a NaN
    row: the rule sees zeros there (was: NaN for geomed, the huge row kept by Multi-Krum,
    DnC, MDA, SMEA, CAF, NNM, bucketing and Bulyan, ``nonfinite`` all False)."""
    n, d, f = PROPS
    G = updates(n, d, f)
    G[4] = 1e20
    out, aux = run(name, G, f)
    zeroed = G.copy()
    zeroed[4] = 0.0
    ref, ref_aux = run(name, zeroed, f)
    np.testing.assert_array_equal(np.flatnonzero(aux["nonfinite"]), [4])
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(aux["weights"], ref_aux["weights"])
    assert not ref_aux["nonfinite"].any()


@pytest.mark.parametrize("name", COORDINATE_ONLY)
def test_coordinate_rules_keep_huge_finite_rows(name):
    """Rules that only order and average coordinates never square a row: a finite 1e20
    row is an outlier like any other (robust rules ignore it), not a rejected row."""
    n, d, f = PROPS
    G = updates(n, d, f)
    G[4] = 1e20
    out, aux = run(name, G, f)
    assert not aux["nonfinite"].any() and np.isfinite(out).all()
    if name != "mean":
        honest = np.delete(G, 4, axis=0)
        assert (out <= honest.max(0) + 1e-6).all() and (out >= honest.min(0) - 1e-6).all()


def test_overflow_bound_and_huge_rounds():
    """``overflowing_rows`` flags ‖g‖² > max/(4n) (a margin for sums over rows); a round
    whose every row is past it is rejected whole (was NaN for SignGuard and ARC), one
    just below it aggregates finitely, in proportion."""
    n, d = 11, 40
    big = np.sqrt(np.finfo(np.float32).max / (4 * n) / d)  # ‖g‖² at the bound
    G = np.full((n, d), 0.5 * big, np.float32)
    G[2] *= 4.0
    G[5, 0] = np.nan
    flags = fb.aggregators.base.overflowing_rows(jnp.asarray(G))
    np.testing.assert_array_equal(np.flatnonzero(flags), [2, 5])
    H = updates(n, d, 2) + 1.0
    for name in ["signguard", "signguard-sim", "arc+trmean", "krum", "geomed", "caf"]:
        out, aux = run(name, H * np.float32(1e20), 2)
        assert aux["nonfinite"].all() and np.isfinite(out).all(), name
        scale = np.float32(0.1 * big / np.abs(H).max())
        out, aux = run(name, H * scale, 2)
        assert not aux["nonfinite"].any(), name
        chex.assert_trees_all_close(out / scale, run(name, H, 2)[0], rtol=1e-4, atol=1e-4)


REPORTING = {
    "krum": distance.krum,
    "multikrum": distance.multikrum,
    "geomed": distance.geomed,
    "caf": spectral.caf,
    "signguard": signguard.signguard,
    "signguard-sim": signguard.signguard_sim,
    "signguard-dist": signguard.signguard_dist,
}


@pytest.mark.parametrize("name", sorted(REPORTING))
def test_rules_reject_an_overflowing_row_from_the_norms_they_report(name):
    """Gram rules and SignGuard report ‖g_i‖² from their own pass (``reports_sq_norms``)
    and the guard rejects from them exactly the rows ``overflowing_rows`` flags: here one
    finite row past the bound whose centred Gram entries stay finite, and one NaN row."""
    n, d, f = PROPS
    assert REPORTING[name]().reports_sq_norms
    G = updates(n, d, f)
    bound = np.finfo(np.float32).max / (4 * n)
    G[3] = np.sqrt(2 * bound / d)  # ‖g_3‖² = 2 x the bound
    for rows in ([3], [3, 7]):
        H = G.copy()
        H[7] = G[7] if rows == [3] else np.nan
        out, aux = run(name, H, f)
        np.testing.assert_array_equal(np.flatnonzero(aux["nonfinite"]), rows)
        zeroed = np.where(np.isin(np.arange(n), rows)[:, None], 0.0, H).astype(np.float32)
        # to rounding: without the native kernels XLA may fuse the guard's zeroing into
        # the blocked Gram product, and geomed and CAF iterate on it
        assert_close(out, run(name, zeroed, f)[0], zeroed)


def test_concrete_f_is_validated_whatever_its_type():
    """f given as a NumPy or JAX scalar is checked like a Python int (was: bulyan with
    np.int64(9) returned -inf, trmean with jnp.int32(30) zeros, np.int64(-1) ran)."""
    G = updates(11, 4, 0)
    with pytest.raises(ConfigError, match=r"^aggregator\.f: 'bulyan' needs f <= 2"):
        fb.aggregate("bulyan", G, f=np.int64(9))
    with pytest.raises(ConfigError, match=r"^aggregator\.f: .*\[0, 10\].*got 30"):
        fb.aggregate("trmean", G, f=jnp.int32(30))
    with pytest.raises(ConfigError, match=r"^aggregator\.f: .*got -1"):
        fb.aggregate("median", G, f=np.int64(-1))
    for bad in (2.0, np.float32(2), "2", None, True, np.array([1, 2])):
        with pytest.raises(ConfigError, match=r"^f: .*integer"):
            fb.aggregate("median", G, f=bad)
    np.testing.assert_array_equal(
        fb.aggregate("trmean", G, f=np.int64(2)), fb.aggregate("trmean", G, f=2)
    )
    # A traced f is not checked (a sweep over it compiles once) but must be an integer.
    traced = jax.jit(lambda f: fb.aggregate("trmean", G, f=f))(jnp.int32(2))
    np.testing.assert_array_equal(traced, fb.aggregate("trmean", G, f=2))
    with pytest.raises(ConfigError, match=r"^f: "):
        jax.jit(lambda f: fb.aggregate("trmean", G, f=f))(jnp.float32(2))


def test_integer_hyperparameters_stay_integers():
    """monna's idx as a NumPy or JAX integer, and vmapped (was cast to float32: fails)."""
    n, d, f = PROPS
    G = updates(n, d, f)
    ref = np.asarray(fb.aggregate("monna", G, f=f, idx=3))
    for idx in (np.int64(3), jnp.int32(3), np.int16(3)):
        np.testing.assert_array_equal(fb.aggregate("monna", G, f=f, idx=idx), ref)
    outs = jax.vmap(lambda i: fb.aggregate("monna", G, f=f, idx=i))(jnp.arange(2, 5))
    np.testing.assert_allclose(outs[1], ref, rtol=1e-6)
    assert fb.aggregators.as_param(np.int64(3)).dtype == jnp.int32
    assert fb.aggregators.as_param(3, 1.0).dtype == jnp.float32  # a float keyword: z=1


def test_signguard_under_x64():
    """SignGuard's Mean-Shift counted in int64 under x64 (scan carry int32: TypeError);
    every rule keeps float32 in and out, without dtype-promotion warnings (errors here)."""
    G = updates(9, 6, 2)
    with jax.enable_x64(True):
        for name in [
            "signguard",
            "signguard-sim",
            "signguard-dist",
            "clippedclustering",
            "multikrum",
            "dnc",
            "bucketing+krum",
        ]:
            out, aux = fb.aggregate(name, G, f=2, return_aux=True)
            assert out.dtype == jnp.float32, name
            chex.assert_tree_all_finite(out)


def test_bfloat16_updates():
    """bf16 in, bf16 out: DnC and SMEA decompose in float32 (LAPACK takes no bf16);
    CClip's blocked pass runs in G's dtype (its float32 state broke the loop carry past
    2048 columns)."""
    G = updates(9, 2 * 2048 + 3, 2)
    B = jnp.asarray(G, jnp.bfloat16)
    for name in ["dnc", "smea", "cclip", "caf", "multikrum"]:
        out = fb.aggregate(name, B[:, :40] if name == "smea" else B, f=2)
        ref = fb.aggregate(name, jnp.asarray(B[:, :40] if name == "smea" else B, jnp.float32), f=2)
        assert out.dtype == jnp.bfloat16, name
        np.testing.assert_allclose(
            np.asarray(out, np.float32), ref, rtol=2e-2, atol=2e-2 * np.abs(G).max()
        )
    rule = get("cclip")
    state = rule.init(B.shape[1])
    _, state, _ = rule.update(B, state, AggregatorContext.create(2, KEY))
    assert state.dtype == jnp.float32  # the state keeps init's dtype (a scan carry)


@pytest.mark.parametrize("name", fb.aggregators.names())
def test_pytrees_round_trip(name):
    n, d, f = PROPS
    G = updates(n, d, f)
    tree = {"w": G[:, :4].reshape(n, 2, 2), "b": G[:, 4:]}
    out = run(name, tree, f)[0]
    flat = run(name, G, f)[0]
    chex.assert_trees_all_close(
        jnp.concatenate([out["b"], out["w"].ravel()]), jnp.concatenate([flat[4:], flat[:4]])
    )


def test_bad_configs_fail_before_compiling():
    with pytest.raises(ConfigError, match="bulyan.*f <= 2"):
        check("bulyan", 12, 3)
    with pytest.raises(ConfigError, match="krum"):
        check("krum", 5, 3)
    with pytest.raises(ConfigError, match="at most 20 rows"):
        check("mda", 25, 2)
    with pytest.raises(ConfigError, match="'nnm' needs f <= 4"):
        check("nnm+mean", 10, 5)
    with pytest.raises(ConfigError, match="rbtm"):
        fb.aggregate("rbtm", updates(9, 3, 0), f=3)
    with pytest.raises(ConfigError, match="unknown"):
        check("bucketing+krumm", 10, 1)
    check("bucketing+mda", 40, 4)  # 20 buckets after bucketing
    with pytest.raises(ConfigError, match=r"^aggregator\.tau: 'nnm\+median' has no such param"):
        check("nnm+median", 10, 1, {"tau": 1.0})
    with pytest.raises(ConfigError, match=r"^aggregator\.c: .*more than one stage.*'dnc\.c'"):
        check("clip+dnc", 10, 1, {"c": 1.0})
    check("clip+dnc", 10, 1, {"dnc.c": 1.0, "clip.c": 3.0})


def test_bad_arguments_name_their_field():
    G = updates(10, 6, 1)
    # Static integers are positive Python ints (hashable cache keys).
    for name, kw in [
        ("geomed", {"iters": 0}),
        ("geomed", {"iters": 3.5}),
        ("geomed", {"iters": jnp.int32(3)}),
        ("dnc", {"b": -5}),
        ("dnc", {"niters": 0}),
        ("bucketing+median", {"s": 0}),
        ("signguard", {"n_samples": 0}),
        ("caf", {"max_iter": 0}),
        ("clippedclustering", {"history": 0}),
        ("cclip", {"iters": 0}),
    ]:
        key = next(iter(kw))
        with pytest.raises(ConfigError, match=rf"^aggregator\.{key}: .*positive Python int"):
            fb.aggregate(name, G, f=1, **kw)
    for frac in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match=r"^aggregator\.frac: .*\(0, 1\]"):
            fb.aggregate("signguard", G, f=1, frac=frac)
        with pytest.raises(ConfigError, match=r"^aggregator\.frac"):
            check("signguard-sim", 10, 1, {"frac": frac})
    fb.aggregate("signguard", G, f=1, frac=1.0)
    with pytest.raises(ConfigError, match=r"^aggregator\.frac: .*Python number"):
        fb.aggregate("signguard", G, f=1, frac=jnp.float32(0.5))  # static: hashable
    with pytest.raises(ConfigError, match=r"^aggregator\.mode: 'aksel' needs 'mid' or 'n-f'"):
        check("aksel", 10, 1, {"mode": "foo"})
    # Too few rows for any f: the message says how many are needed.
    with pytest.raises(ConfigError, match=r"'krum' needs at least 3 rows \(n >= f \+ 3\), got 1"):
        fb.aggregate("krum", G[:1], f=0)
    with pytest.raises(ConfigError, match=r"'bulyan' needs at least 3 rows .*got 2"):
        fb.aggregate("bulyan", G[:2], f=0)
    with pytest.raises(ConfigError, match=r"'krum' needs at least 3 rows .*got 2 after bucketing"):
        fb.aggregate("bucketing+krum", G[:4], f=0)
    with pytest.raises(ConfigError, match=r"^updates: .*got shape \(0, 6\)"):
        fb.aggregate("mean", G[:0], f=0)
    with pytest.raises(ConfigError, match=r"^updates: .*got shape \(10, 0\)"):
        fb.aggregate("median", G[:, :0], f=0)
    with pytest.raises(ConfigError, match=r"^updates: expected an \[n, d\] matrix"):
        fb.aggregate("median", G[0], f=0)
    # A list of per-client vectors is not a pytree of [n, ...] leaves.
    for rows in ([g for g in G], tuple(G), G.tolist()):
        with pytest.raises(ConfigError, match=r"^updates: .*np\.stack"):
            fb.aggregate("mean", rows, f=0)
    with pytest.raises(ConfigError, match=r"^updates: every leaf .*client axis"):
        fb.aggregate("mean", {"a": G, "b": G[:3]}, f=0)
    tree = fb.aggregate("mean", [G[:, :2], G[:, 2:]], f=0)  # a list of [n, k] leaves is fine
    np.testing.assert_allclose(np.concatenate(tree), G.mean(0), rtol=1e-6)


# ---------------------------------------------------------------- kernels
@pytest.mark.parametrize(
    "n,consumer_ops",  # comparators as compare-and-select, min/max, or some of each
    [(1, 0), (2, 0), (3, 0), (13, 0), (47, 0), (47, 10_000), (100, 1000), (129, 0)],
)
def test_sorting_network_sorts(n, consumer_ops):
    x = np.random.default_rng(n).integers(-3, 4, (n, 17)).astype(np.float32)
    if n <= 13:  # every order statistic as an output compiles slowly past that
        got = jax.jit(lambda x: jnp.concatenate(ops.sorted_rows(x, consumer_ops=consumer_ops)))(x)
        np.testing.assert_array_equal(got, np.sort(x, 0))
    # Σ_r r·S_r is exact here and, by the rearrangement inequality, largest only when S
    # is sorted (up to equal values): one fused output checks the whole network.
    valid = np.arange(n) % 3 != 1
    w = np.arange(n) * (np.arange(n) < valid.sum())

    def ranked(x, v):  # the rows pushed out (+inf) have weight 0
        S = ops.sorted_rows(x, v, consumer_ops=consumer_ops)
        return sum((float(w[r]) * S[r] for r in range(n) if w[r]), jnp.zeros_like(S[0]))[0]

    got = jax.jit(ranked)(x, valid)
    np.testing.assert_array_equal(got, w[: valid.sum()] @ np.sort(x[valid], 0))


@pytest.mark.parametrize("n", [1, 2, 7, 100, 257])  # 257: past the count, by argsort
def test_ranks_follow_the_stable_argsort(n):
    rng = np.random.default_rng(n)
    x = rng.integers(-3, 4, (5, n)).astype(np.float32)  # many ties
    x[0, rng.random(n) < 0.3] = np.nan
    x[1, rng.random(n) < 0.3] = np.inf
    x[1, rng.random(n) < 0.3] = -np.inf
    x[2] = np.where(rng.random(n) < 0.5, 0.0, -0.0)  # equal, as argsort takes them
    x[3] = rng.standard_normal(n)
    expected = np.argsort(np.argsort(x, axis=1, kind="stable"), axis=1, kind="stable")
    np.testing.assert_array_equal(jax.jit(jax.vmap(ops.ranks))(x), expected)
    k = jnp.int32(n // 3)  # traced
    np.testing.assert_array_equal(ops.smallest_mask(x[3], k), expected[3] < n // 3)


def test_shift_ranks():
    n, kmin, count = 9, 4, 3
    S = [jnp.full((1, 2), float(r)) for r in range(n)]
    for step in (1, 2):
        for k in range(kmin, n + 1, step):
            got = np.concatenate(ops.shift_ranks(S, jnp.int32(k), kmin, count, step))[:, 0]
            ref = [s + k if s + k < n else np.inf for s in range(count)]
            np.testing.assert_array_equal(got, ref)


def test_closest_mean_ties_and_rounding():
    """Every f at once (vmap), on values with many ties, against the float64 oracle;
    and sums that round to the same float32 (exact comparison needed)."""
    n = 12
    G = np.random.default_rng(0).integers(-3, 4, (n, 40)).astype(np.float32)
    fs = np.arange((n - 1) // 2 + 1)
    out = jax.jit(jax.vmap(lambda f: run("meamed", G, f)[0]))(jnp.asarray(fs, jnp.int32))
    for f, o in zip(fs, np.asarray(out), strict=True):
        np.testing.assert_allclose(o, oracle.meamed(G, f)[0], rtol=1e-6)
    big = np.float32(2**24)
    G = np.array([[big - 3], [big], [big + 2]], np.float32)
    assert (G[0] + G[2])[0] == 2 * big  # float32 rounding ties big - 3 with big + 2
    ref = oracle.meamed(G, 1)[0]  # keeps big and big + 2: mean big + 1
    np.testing.assert_allclose(run("meamed", G, 1)[0], ref, atol=1.0)  # big - 2 if wrong


@pytest.mark.parametrize("plan", ["materialized", "sort"])
@pytest.mark.parametrize("name", ["meamed", "bulyan"])
def test_closest_mean_past_the_fusion_budget(name, plan, monkeypatch):
    """The plans used for large n: the masked matrix written first, or jnp.sort."""
    monkeypatch.setattr(coordinate, "_plan", lambda *args: plan)
    n, d, f = 13, 2 * 2048 + 3, 2  # several column blocks
    G = updates(n, d, f)
    rule = get(name)
    fn = jax.jit(lambda G, f: rule.update(G, (), AggregatorContext.create(f, KEY))[0])
    ref, _ = getattr(oracle, name)(G, f)
    assert_close(fn(jnp.asarray(G), jnp.int32(f)), ref, G)


@pytest.mark.parametrize("n", [3, 24, 27, 50])
def test_blocked_kernels(n):
    """The column-blocked Gram product (one dot for n = 24; rows past the last whole
    panel of 24 multiplied one by one for n = 3, 27, 50) and row distances (in wide
    blocks), d past two blocks of either size."""
    rng = np.random.default_rng(0)
    G = rng.standard_normal((n, 2 * ops.column_block(n, 10**9, wide=True) + 5)).astype(np.float32)
    c = rng.standard_normal(G.shape[1]).astype(np.float32)
    X = G.astype(np.float64) - c
    np.testing.assert_allclose(ops.gram(jnp.asarray(G), jnp.asarray(c)), X @ X.T, rtol=1e-5)
    np.testing.assert_allclose(
        ops.row_sq_dists(jnp.asarray(G), jnp.asarray(c)), (X**2).sum(1), rtol=1e-5
    )


@pytest.mark.parametrize(
    ("start", "size"), [(0, 5000), (1234, 2100), (4999, 1), (700, 4300), (2048, 2048)]
)
def test_window_sum(start, size):
    """Sums over a window of columns with a traced start, in ragged column blocks."""
    G = np.random.default_rng(start).standard_normal((7, 5000)).astype(np.float32)
    fn = jax.jit(lambda G, s: ops.window_sum(lambda B, w: (B @ w, (B > 0) @ w), G, s, size))
    total, positive = fn(jnp.asarray(G), jnp.int32(start))
    window = G[:, start : start + size].astype(np.float64)
    np.testing.assert_allclose(total, window.sum(1), rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(positive, (window > 0).sum(1))


def test_window_sum_vmapped_over_starts():
    """Under ``vmap`` each start has its own number of blocks (a batched trip count), as
    SignGuard's features are over a batch of keys."""
    G = np.random.default_rng(1).standard_normal((5, 5000)).astype(np.float32)
    starts = np.array([0, 1500, 2047, 2900])
    fn = jax.jit(jax.vmap(lambda s: ops.window_sum(lambda B, w: B @ w, jnp.asarray(G), s, 2100)))
    got = fn(jnp.asarray(starts, jnp.int32))
    want = [G[:, s : s + 2100].astype(np.float64).sum(1) for s in starts]
    np.testing.assert_allclose(got, np.stack(want), rtol=1e-5, atol=1e-3)


def test_masked_median():
    x = np.random.default_rng(0).standard_normal((9, 5)).astype(np.float32)
    mask = np.array([1, 0, 1, 1, 0, 1, 1, 1, 0], bool)
    got = jax.jit(ops.masked_median)(jnp.asarray(x), jnp.asarray(mask))
    np.testing.assert_allclose(got, np.median(x[mask], 0), rtol=1e-6)


def test_aggregate_inside_jit_then_eagerly():
    """The public ``fb.aggregate`` traced under ``jit`` before any eager call (its cached
    default key must not be a tracer) and then called eagerly."""
    fb.aggregators._default_key.cache_clear()
    G = jnp.asarray(updates(9, 5, 1))
    inside = jax.jit(lambda G: fb.aggregate("krum", G, f=2))(G)
    np.testing.assert_array_equal(inside, fb.aggregate("krum", G, f=2))


def test_switch_runs_the_chosen_rule_with_its_own_state():
    """``switch``: the rule at a traced index, as if called alone; the others' states pass
    through untouched; aux keeps the keys every rule has."""
    G = jnp.asarray(updates(9, 6, 2))
    rules = [get("cclip", tau=0.5), get("median"), get("bucketing+krum")]
    rule = fb.aggregators.switch(jnp.int32(0), rules)
    state0 = rule.init(6)
    ctx = AggregatorContext.create(2, jax.random.key(3))

    @jax.jit
    def run(k, state):
        return fb.aggregators.switch(k, rules).update(G, state, ctx)

    for k, alone in enumerate(rules):
        out, state, aux = run(jnp.int32(k), state0)
        want, want_state, want_aux = jax.jit(alone.update)(G, state0[k], ctx)
        np.testing.assert_array_equal(out, want)
        chex.assert_trees_all_equal(state[k], want_state)
        chex.assert_trees_all_equal(
            [s for i, s in enumerate(state) if i != k], [s for i, s in enumerate(state0) if i != k]
        )
        assert set(aux) == {"weights", "nonfinite"}
        np.testing.assert_array_equal(aux["weights"], want_aux["weights"])
    assert fb.aggregators.switch(jnp.int32(0), rules[:1]) is rules[0]
