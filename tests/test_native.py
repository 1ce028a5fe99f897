"""The native kernels (``fedjax_byz.native``) against float64 numpy, and their fallback."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_byz import native, ops

try:  # tests/ as a package or as a plain directory on sys.path
    from tests import oracles_aggregators as oracle
except ImportError:
    import oracles_aggregators as oracle

pytestmark = pytest.mark.skipif(
    not native.available(jnp.float32), reason="no C++ compiler for the native kernel"
)

# Shapes across the kernel's cases: rows that fill no, one or several register tiles (6 x 4
# with AVX-512, 4 x 3 without) and leave every remainder of rows, columns below one 8-float
# vector, with a tail, and over several chunks.
SHAPES = [(1, 1), (1, 9), (5, 7), (9, 50), (11, 203), (13, 1001), (16, 77)]
SHAPES += [(26, 40_003), (7, 16_384 * 3 + 8)]


def exact_gram(G, center=None):
    X = np.asarray(G, np.float64) - (0.0 if center is None else np.asarray(center, np.float64))
    return X @ X.T


def skewed(n, d, seed=0):
    """Rows sharing a large common component, as updates do: where centring matters."""
    rng = np.random.default_rng(seed + n + d)
    return (5.0 + rng.standard_t(3, (n, d))).astype(np.float32)


def exact_projections(G, center, v):
    X = np.asarray(G, np.float64) - (0.0 if center is None else np.asarray(center, np.float64))
    return X @ np.asarray(v, np.float64)


def assert_projections_close(got, G, center, v):
    """Within float32 rounding of the terms: relative to ``Σ_c |x_ic v_c|``."""
    X = np.asarray(G, np.float64) - (0.0 if center is None else np.asarray(center, np.float64))
    scale = np.abs(X) @ np.abs(np.asarray(v, np.float64))
    np.testing.assert_array_less(
        np.abs(got - exact_projections(G, center, v)), 1e-5 * scale + 1e-30
    )


@pytest.mark.parametrize("n, d", SHAPES)
@pytest.mark.parametrize("centre", ["none", "given", "weighted mean"])
@pytest.mark.parametrize("project", [False, True])
def test_gram_matches_float64(n, d, centre, project):
    G = skewed(n, d)
    w = np.random.default_rng(n).dirichlet(np.ones(n)).astype(np.float32)
    v = np.random.default_rng(d).standard_normal(d).astype(np.float32) if project else None
    c = {"none": None, "given": G[-1], "weighted mean": w @ G.astype(np.float64)}[centre]
    args = {"none": {}, "given": {"center": G[-1]}, "weighted mean": {"weights": w}}[centre]
    K, sq, proj = jax.jit(lambda G, a, v: native.gram(G, **a, project=v, threads=2))(G, args, v)
    want = exact_gram(G, c)
    scale = np.sqrt(np.outer(np.diag(want), np.diag(want))).max() or 1.0
    np.testing.assert_allclose(K, want, rtol=0, atol=2e-6 * scale)
    np.testing.assert_array_equal(K, K.T)
    np.testing.assert_allclose(sq, np.diag(exact_gram(G)), rtol=1e-6)
    if project:
        assert_projections_close(proj, G, c, v)
    else:
        np.testing.assert_array_equal(proj, np.zeros(n))


@pytest.mark.parametrize("n, d", SHAPES)
@pytest.mark.parametrize("centred", [False, True])
@pytest.mark.parametrize("project", [False, True])
def test_row_sq_dists_match_float64(n, d, centred, project):
    G = skewed(n, d)
    c = G[-1] + 0.5 if centred else None
    v = np.random.default_rng(d).standard_normal(d).astype(np.float32) if project else None
    sq, proj = jax.jit(lambda G, c, v: native.row_sq_dists(G, c, v, threads=2))(G, c, v)
    X = np.asarray(G, np.float64) - (0.0 if c is None else np.asarray(c, np.float64))
    np.testing.assert_allclose(sq, (X * X).sum(1), rtol=1e-6)
    if project:
        assert_projections_close(proj, G, c, v)
    else:
        np.testing.assert_array_equal(proj, np.zeros(n))


@pytest.mark.parametrize("n, d", SHAPES)
def test_moments_match_float64(n, d):
    G = skewed(n, d)
    rows = np.arange(n) % 3 != 0 if n > 1 else np.ones(n, bool)
    k = rows.sum()
    a, b = rows / max(k, 1), rows / max(k - 1, 1)
    mu, var = jax.jit(lambda G, a, b: native.moments(G, a, b, threads=2))(
        G, a.astype(np.float32), b.astype(np.float32)
    )
    H = np.asarray(G, np.float64)[rows]
    np.testing.assert_array_less(np.abs(mu - H.mean(0)), 1e-6 * np.abs(H).mean(0) + 1e-30)
    want = ((H - H.mean(0)) ** 2).sum(0) / max(k - 1, 1)
    np.testing.assert_allclose(var, want, rtol=1e-4, atol=1e-6 * want.max(initial=0))


DIRECTIONS = {  # name: (factor, sign, scale), u = scale · F ⊙ sign(μ − r)
    "-std": ("std", False, -1.0),
    "-mean": ("mean", False, -1.0),
    "-sign": ("one", True, -1.0),
    "skew": ("std", True, 1.0),
    "toward r": ("offset", False, -1.0),
}


@pytest.mark.parametrize("n, d", SHAPES)
@pytest.mark.parametrize("direction", list(DIRECTIONS))
@pytest.mark.parametrize("gram", [False, True])
def test_moment_products_match_float64(n, d, direction, gram):
    G = skewed(n, d)
    rows = np.arange(n) % 3 != 0 if n > 1 else np.ones(n, bool)
    k = rows.sum()
    a, b = (rows / max(k, 1)).astype(np.float32), (rows / max(k - 1, 1)).astype(np.float32)
    factor, sign, scale = DIRECTIONS[direction]
    r = G[-1] if direction in ("skew", "toward r") else None
    kernel = functools.partial(
        native.moment_products, factor=factor, sign=sign, scale=scale, gram=gram, threads=2
    )
    mu, u, second, xu = jax.jit(kernel)(G, a, b, r)
    H = np.asarray(G, np.float64)[rows]
    np.testing.assert_array_less(np.abs(mu - H.mean(0)), 1e-6 * np.abs(H).mean(0) + 1e-30)
    sigma = np.sqrt(((H - H.mean(0)) ** 2).sum(0) / max(k - 1, 1))
    # t = μ − r from the kernel's own μ: float64's may differ in sign where μ ≈ r
    t = np.asarray(mu, np.float64) - (0.0 if r is None else r)
    F = {"one": np.ones(d), "mean": H.mean(0), "std": sigma, "offset": t}[factor]
    want_u = scale * F * (np.sign(t) if sign else 1.0)
    np.testing.assert_allclose(u, want_u, rtol=1e-4, atol=1e-6 * np.abs(want_u).max(initial=0))
    want = exact_gram(G, mu)
    if gram:  # between the rows with a_i ≠ 0 only
        scale_K = np.sqrt(np.outer(np.diag(want), np.diag(want))).max() or 1.0
        masked = np.where(np.outer(rows, rows), want, 0.0)
        np.testing.assert_allclose(second, masked, rtol=0, atol=2e-6 * scale_K)
        np.testing.assert_array_equal(second[~np.outer(rows, rows)], 0.0)
        np.testing.assert_array_equal(second, second.T)
    else:
        np.testing.assert_allclose(second, np.diag(want), rtol=1e-6)
    assert_projections_close(xu, G, mu, u)


def test_empty_matrices_give_zeros():
    for n, d in [(3, 0), (0, 5), (0, 0)]:
        G = np.zeros((n, d), np.float32)
        v = np.ones(d, np.float32)
        K, sq, proj = jax.jit(lambda G, v: native.gram(G, project=v, threads=2))(G, v)
        rows, rows_proj = jax.jit(lambda G, v: native.row_sq_dists(G, v, v, threads=2))(G, v)
        ones = np.ones(n, np.float32)
        mu, var = native.moments(G, ones, ones, threads=2)
        for gram in (False, True):
            out = native.moment_products(
                G, ones, ones, factor="std", sign=False, scale=1.0, gram=gram, threads=2
            )
            np.testing.assert_array_equal(out[2], np.zeros((n, n) if gram else n))
            np.testing.assert_array_equal(out[3], np.zeros(n))
        np.testing.assert_array_equal(K, np.zeros((n, n)))
        for zeros in (sq, proj, rows, rows_proj):
            np.testing.assert_array_equal(zeros, np.zeros(n))
        np.testing.assert_array_equal(mu, np.zeros(d))
        np.testing.assert_array_equal(var, np.zeros(d))


def test_kernels_do_not_depend_on_the_thread_count():
    G = skewed(11, 16_384 * 5 + 3)
    v = G[2] - G[3]

    def run(kernel, threads, **args):
        out = jax.jit(lambda G: kernel(G, **args, threads=threads))(G)
        return np.concatenate([np.ravel(a) for a in out])

    K = [run(native.gram, t, center=G[0], project=v) for t in (1, 2, 7)]
    rows = [run(native.row_sq_dists, t, center=G[1], project=v) for t in (1, 5)]
    np.testing.assert_array_equal(*rows)
    a, b = np.full(11, 0.1, np.float32), np.full(11, 0.2, np.float32)
    np.testing.assert_array_equal(
        run(native.moments, 1, a=a, b=b), run(native.moments, 3, a=a, b=b)
    )
    products = [
        run(native.moment_products, t, a=a, b=b, factor="std", sign=True, scale=1.0, gram=g)
        for g in (False, True)
        for t in (1, 3)
    ]
    np.testing.assert_array_equal(products[0], products[1])
    np.testing.assert_array_equal(products[2], products[3])
    weighted = [run(native.gram, t, weights=G[:, 0]) for t in (1, 3)]
    np.testing.assert_array_equal(*weighted)
    np.testing.assert_array_equal(K[0], K[1])
    np.testing.assert_array_equal(K[0], K[2])


KERNELS = {  # name: kernel(G, per-matrix vector [d], per-matrix row weights [n]) -> tuple
    "gram centred": lambda G, c, w: native.gram(G, c, project=c[::-1], threads=2),
    "gram weighted": lambda G, c, w: native.gram(G, weights=w, threads=2),
    "row_sq_dists": lambda G, c, w: native.row_sq_dists(G, c, c[::-1], threads=2),
    "moments": lambda G, c, w: native.moments(G, w, 2 * w, threads=2),
    "moment_products": lambda G, c, w: native.moment_products(
        G, w, 2 * w, c, factor="std", sign=True, scale=1.0, gram=True, threads=2
    ),
}


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_kernels_under_vmap_loop_over_the_batch(kernel):
    """Under (nested) vmap one call loops over the batch in the kernel: every element's
    results equal the kernel's on that element alone, for batched and shared arguments."""
    Gs = np.stack([[skewed(6, 300, seed=3 * i + j) for j in range(3)] for i in range(2)])
    cs = Gs[..., 0, :] + 0.5  # [2, 3, d], one per matrix
    w = np.linspace(0.05, 0.3, 6).astype(np.float32)  # shared
    fn = KERNELS[kernel]
    batched = jax.jit(jax.vmap(jax.vmap(fn, (0, 0, None)), (0, 0, None)))
    assert "custom_call" in batched.lower(Gs, cs, w).as_text()
    assert "while" not in batched.lower(Gs, cs, w).as_text()  # no sequential loop
    out = batched(Gs, cs, w)
    for i, j in np.ndindex(2, 3):
        one = jax.jit(fn)(Gs[i, j], cs[i, j], w)
        for got, want in zip(out, one, strict=True):
            np.testing.assert_array_equal(got[i, j], want)


@pytest.mark.parametrize(
    "fn", ["gram", "centred_gram", "row_sq_dists", "row_sq_norms", "products", "row products"]
)
def test_ops_are_native_and_agree_with_xla(monkeypatch, fn):
    G = jnp.asarray(skewed(9, 5000))
    w = jnp.linspace(0.0, 2.0 / 9, 9)
    c = w @ G
    v = G[0] - G[1]
    call = {
        "gram": lambda G: ops.gram(G, c),
        "centred_gram": lambda G: ops.centred_gram(G, w, sq_norms=True)[0],
        "row_sq_dists": lambda G: ops.row_sq_dists(G, c),
        "row_sq_norms": lambda G: ops.row_sq_norms(G),
        "products": lambda G: ops.centred_products(G, c, v),
        "row products": lambda G: ops.centred_products(G, c, v, gram_matrix=False),
    }

    def hlo():  # traced afresh: jit caches traces per function
        return jax.jit(lambda G: call[fn](G)).lower(G).as_text()

    targets = (native._TARGET, native._ROWS_TARGET)
    assert any(t in hlo() for t in targets)
    with_kernel = jax.tree.map(np.asarray, call[fn](G))
    monkeypatch.setattr(native, "available", lambda dtype: False)
    assert not any(t in hlo() for t in targets)
    without = jax.tree.map(np.asarray, call[fn](G))
    centre = None if fn == "row_sq_norms" else np.asarray(c, np.float64)
    want = exact_gram(G, centre)
    want = want if fn.endswith("gram") or fn == "products" else np.diag(want)
    if fn.endswith("products"):
        (xv, with_kernel), (xv_xla, without) = with_kernel, without
        assert_projections_close(xv, G, centre, v)
        assert_projections_close(xv_xla, G, centre, v)
    np.testing.assert_allclose(with_kernel, want, rtol=1e-6, atol=1e-3)
    np.testing.assert_allclose(without, want, rtol=1e-5, atol=1e-2)


def test_masked_mean_std_is_native_and_agrees_with_xla(monkeypatch):
    G = jnp.asarray(skewed(9, 5000))
    mask = jnp.arange(9) % 4 != 1
    run = jax.jit(lambda G: ops.masked_mean_std(G, mask))
    assert native._MOMENTS_TARGET in run.lower(G).as_text()
    with_kernel = run(G)
    monkeypatch.setattr(native, "available", lambda dtype: False)
    without = jax.jit(lambda G: ops.masked_mean_std(G, mask))(G)
    H = np.asarray(G, np.float64)[np.asarray(mask)]
    for got in (with_kernel, without):
        np.testing.assert_array_less(np.abs(got[0] - H.mean(0)), 1e-6 * np.abs(H).mean(0))
        np.testing.assert_allclose(got[1], H.std(0, ddof=1), rtol=1e-5)


@pytest.mark.parametrize("gram", [False, True])
def test_moment_products_are_one_native_call_and_agree_with_xla(monkeypatch, gram):
    G = jnp.asarray(skewed(9, 5000))
    mask = jnp.arange(9) % 4 != 1
    direction = ops.Direction("std", sign=True)

    def run():  # traced afresh: jit caches traces per function
        fn = jax.jit(lambda G, r: ops.moment_products(G, mask, direction, r, gram_matrix=gram))
        return fn, fn.lower(G, G[0]).as_text()

    fn, hlo = run()
    assert hlo.count("stablehlo.custom_call") == 1 and native._PRODUCTS_TARGET in hlo
    with_kernel = fn(G, G[0])
    monkeypatch.setattr(native, "available", lambda dtype: False)
    fn, hlo = run()
    assert native._PRODUCTS_TARGET not in hlo
    for got, want in zip(with_kernel, fn(G, G[0]), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_moment_products_direction_is_ops_direction_bit_for_bit():
    """The kernel's u is ``ops.Direction`` on the kernel's own moments, to the bit, with
    a NaN in a column and in the reference (sign(NaN) is NaN, as XLA's) and zeros."""
    G = skewed(6, 40)
    G[2, 5] = np.nan
    G[:, 9] = 1.0  # σ = 0, μ − r = 0 below
    r = G[0].copy()
    r[7] = np.nan
    mask = jnp.ones(6, bool)
    mu, sigma = ops.masked_mean_std(jnp.asarray(G), mask)
    for factor, sign, scale in DIRECTIONS.values():
        direction = ops.Direction(factor, sign, scale)
        got = jax.jit(ops.moment_products, static_argnums=2, static_argnames="gram_matrix")(
            G, mask, direction, r, gram_matrix=False
        )
        np.testing.assert_array_equal(got[0], mu)
        np.testing.assert_array_equal(got[1], direction(mu, sigma, r))


def test_direct_calls_refuse_when_the_kernels_are_unavailable(monkeypatch):
    """A direct call checks that the kernels are registered: where they cannot load, it
    says so instead of failing at run time with XLA's missing-handler error."""
    G = skewed(3, 20)
    np.testing.assert_allclose(native.row_sq_dists(G, threads=1)[0], (G * G).sum(1), rtol=1e-6)
    monkeypatch.setattr(native, "_registered", lambda: False)
    with pytest.raises(RuntimeError, match="unavailable"):
        native.gram(G, threads=1)


def test_build_is_cached_per_source_and_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDJAX_BYZ_CACHE", str(tmp_path))
    path = native._build()
    assert path.parent == tmp_path / "native" and path.suffix == ".so"
    stamp = path.stat().st_mtime_ns
    assert native._build() == path and path.stat().st_mtime_ns == stamp  # not rebuilt
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left


def sorted_columns(G, valid=None, fill=None):
    """Each column's values in increasing order, rows outside ``valid`` replaced by ``fill``."""
    G = np.asarray(G, np.float64)
    if valid is not None:
        G = np.where(np.asarray(valid)[:, None] > 0, G, np.asarray(fill)[:, None])
    return np.sort(G, axis=0)


def closest_mean_loop(G, k):
    """Per column, the mean of the k values closest to the median, ties in distance to
    the smaller value: Meamed's oracle with f = n − k."""
    return oracle.meamed(np.asarray(G), G.shape[0] - k)[0]


# Rows below, at and past one register group of 16 and Batcher's powers of two (past
# XLA's network's 128 too); columns below one vector, with a tail, and over several
# thread tasks.
SORT_SHAPES = [(1, 5), (2, 17), (5, 64), (16, 65), (17, 300), (33, 129), (100, 2051), (130, 70)]


@pytest.mark.parametrize("n, d", SORT_SHAPES)
@pytest.mark.parametrize("replaced", [False, True])
def test_sorted_sum_picks_order_statistics(n, d, replaced):
    """One-hot rank weights return the order statistics exactly (the first, the middle
    two, the last and a random one), on values with ties, with rows replaced by ±inf;
    random weights give the weighted sum of the ranks."""
    rng = np.random.default_rng(n * d)
    G = rng.integers(-3, 4, (n, d)).astype(np.float32) + rng.standard_normal((n, d)).astype(
        np.float32
    ) * (rng.random((n, d)) < 0.5)
    valid = fill = None
    if replaced:
        valid = (rng.random(n) < 0.7).astype(np.float32)
        fill = np.where(rng.random(n) < 0.5, -np.inf, np.inf).astype(np.float32)
    S = sorted_columns(G, valid, fill)
    run = jax.jit(lambda G, w: native.sorted_sum(G, w, valid, fill, threads=2))
    for r in sorted({0, (n - 1) // 2, n // 2, n - 1, rng.integers(n)}):
        np.testing.assert_array_equal(run(G, np.eye(n, dtype=np.float32)[r]), S[r])
    w = rng.random(n).astype(np.float32) * (np.isfinite(S).all(1))
    terms = w[:, None] * np.where(w[:, None] > 0, S, 0)
    assert np.all(np.abs(run(G, w) - terms.sum(0)) <= 1e-6 * np.abs(terms).sum(0))


@pytest.mark.parametrize("n, m", [(1, 1), (7, 5), (30, 30), (100, 100), (9, 131)])
def test_rows_by_rank_on_the_kernel_and_without(monkeypatch, n, m):
    """``sorted_row_sums``: each row's rank-weighted sum, +inf entries where the weight
    is 0; ``smallest_in_rows``: the k smallest entries of each row by its k-th smallest,
    every k, traced, on rows with many ties: the stable argsort's mask. On the sorting
    kernel, and without it (ranks)."""
    rng = np.random.default_rng(n + m)
    X = rng.integers(0, 4, (n, m)).astype(np.float32)
    X[: n // 2] += rng.standard_normal((n // 2, m)).astype(np.float32)
    order = np.argsort(np.argsort(X, axis=1, kind="stable"), axis=1, kind="stable")
    w = (rng.random(m) * (np.arange(m) < m - 1)).astype(np.float32)
    Xinf = np.where(order == m - 1, np.inf, X)  # each row's largest: weight 0
    want = (np.sort(X, axis=1)[:, : m - 1] * w[: m - 1]).sum(1)
    ks = sorted(k for k in {1, 2, m // 2, m - 1, m} if 1 <= k <= m)
    assert native._SORTED_SUM_TARGET in jax.jit(ops.smallest_in_rows).lower(X, 1).as_text()
    for available in (True, False):
        monkeypatch.setattr(native, "available", lambda dtype, a=available: a)
        sums = jax.jit(lambda X, w: ops.sorted_row_sums(X, w))  # traced afresh
        smallest = jax.jit(lambda X, k: ops.smallest_in_rows(X, k))
        np.testing.assert_allclose(sums(Xinf, w), want, rtol=1e-6, atol=1e-6)
        for k in ks:
            np.testing.assert_array_equal(smallest(X, jnp.int32(k)), order < k)


@pytest.mark.parametrize("n, d", SORT_SHAPES)
def test_closest_mean_is_the_window_nearest_the_median(n, d):
    rng = np.random.default_rng(n + d)
    G = rng.integers(-4, 5, (n, d)).astype(np.float32) * 0.5  # many ties in distance
    G[:, ::3] += rng.standard_t(2, (n, len(range(0, d, 3)))).astype(np.float32)
    for k in sorted({1, (n + 1) // 2, n - 1 or 1, n}):
        got = native.closest_mean(G, jnp.float32([k]), starts=n - k, threads=2)
        np.testing.assert_allclose(got, closest_mean_loop(G, k), rtol=1e-6, atol=1e-6)


def test_closest_mean_with_replaced_rows_is_bulyans_window():
    """Bulyan's form: f rows at −inf, f at +inf, the window among the others."""
    n, d, f = 23, 500, 4
    rng = np.random.default_rng(0)
    G = rng.standard_normal((n, d)).astype(np.float32)
    valid = np.ones(n, np.float32)
    valid[rng.choice(n, 2 * f, replace=False)] = 0
    fill = np.where(np.cumsum(valid == 0) <= f, -np.inf, np.inf).astype(np.float32)
    k = n - 4 * f
    got = native.closest_mean(G, jnp.float32([k]), valid, fill, starts=3 * f, threads=2)
    np.testing.assert_allclose(got, closest_mean_loop(G[valid > 0], k), rtol=1e-6, atol=1e-6)


def test_sorting_kernels_under_vmap_and_threads():
    Gs = np.stack([skewed(37, 700, seed=i) for i in range(3)])
    ks = jnp.float32([[10], [20], [37]])
    valid = np.ones((3, 37), np.float32)
    valid[:, 5] = 0
    fill = np.full((3, 37), np.inf, np.float32)
    w = np.zeros(37, np.float32)
    w[18] = 1

    def run(threads):
        closest = jax.vmap(lambda G, k: native.closest_mean(G, k, starts=20, threads=threads))
        summed = jax.vmap(lambda G, v, f: native.sorted_sum(G, w, v, f, threads=threads))
        return closest(Gs, ks), summed(Gs, valid, fill)

    batched = run(2)
    for i in range(3):
        np.testing.assert_array_equal(
            batched[0][i], native.closest_mean(Gs[i], ks[i], starts=20, threads=2)
        )
        np.testing.assert_array_equal(batched[1][i], sorted_columns(Gs[i], valid[i], fill[i])[18])
    for a, b in zip(batched, run(1), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("rule", ["meamed", "rbtm", "bulyan"])
def test_large_sorts_are_native_and_agree_with_xla(monkeypatch, rule):
    """Past ``ops._NATIVE_OPS`` (n = 100 here) the rules sort on the native kernel, and
    give XLA's network's result."""
    from fedjax_byz.aggregators import get
    from fedjax_byz.aggregators.base import AggregatorContext

    G = jnp.asarray(skewed(100, 300))
    f = 24 if rule == "bulyan" else 20

    def run():  # traced afresh
        agg = get(rule)
        fn = jax.jit(
            lambda G: agg.update(G, agg.init(300), AggregatorContext.create(f, jax.random.key(1)))[
                0
            ]
        )
        return fn(G), fn.lower(G).as_text()

    out, hlo = run()
    assert native._SORTED_SUM_TARGET in hlo or native._CLOSEST_TARGET in hlo
    monkeypatch.setattr(native, "available", lambda dtype: False)
    xla, hlo = run()
    assert native._SORTED_SUM_TARGET not in hlo and native._CLOSEST_TARGET not in hlo
    np.testing.assert_allclose(out, xla, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("n, p, d", [(1, 3, 40), (7, 7, 130), (20, 13, 257), (100, 100, 300)])
def test_sorting_kernels_form_mixed_rows(n, p, d):
    """``mix = M``: the kernels sort the rows ``M G`` (NNM's), formed in registers."""
    rng = np.random.default_rng(n * p)
    G = skewed(p, d)
    M = rng.dirichlet(np.ones(p), n).astype(np.float32)
    Y = M.astype(np.float64) @ G.astype(np.float64)
    S = np.sort(Y, axis=0)
    tol = 1e-5 * np.abs(G).max()
    for r in sorted({0, (n - 1) // 2, n - 1}):
        got = native.sorted_sum(G, np.eye(n, dtype=np.float32)[r], mix=M, threads=2)
        np.testing.assert_allclose(got, S[r], rtol=1e-5, atol=tol)
    k = (n + 1) // 2
    got = native.closest_mean(G, jnp.float32([k]), mix=M, starts=n - k, threads=2)
    np.testing.assert_allclose(got, closest_mean_loop(Y, k), rtol=1e-5, atol=tol)


@pytest.mark.parametrize("rule", ["median", "trmean", "meamed", "rbtm"])
def test_nnm_composites_mix_on_the_kernel_and_agree_with_xla(monkeypatch, rule):
    """NNM in front of a coordinate rule hands the rule ``ops.MixedRows``: one sorting
    kernel call, no ``[n, d]`` product in the program, XLA's blocked result."""
    from fedjax_byz.aggregators import _unguarded
    from fedjax_byz.aggregators.base import AggregatorContext

    n, d, f = 13, 3000, 3
    G = jnp.asarray(skewed(n, d))

    def run():  # traced afresh
        agg, _ = _unguarded(f"nnm+{rule}")  # the guard's rerun holds a zeroed copy
        ctx = AggregatorContext.create(f, jax.random.key(1))
        fn = jax.jit(lambda G: agg.update(G, agg.init(d), ctx)[0])
        return fn(G), fn.lower(G).compile()

    out, compiled = run()
    hlo = compiled.as_text()
    assert native._SORTED_SUM_TARGET in hlo or native._CLOSEST_TARGET in hlo
    assert compiled.memory_analysis().temp_size_in_bytes < G.nbytes
    monkeypatch.setattr(native, "available", lambda dtype: False)
    xla, _ = run()
    np.testing.assert_allclose(out, xla, rtol=1e-5, atol=1e-5 * float(jnp.abs(G).max()))


def test_mixed_rows_without_the_kernels_are_written(monkeypatch):
    from fedjax_byz.aggregators import coordinate

    G = jnp.asarray(skewed(9, 50))
    M = jnp.asarray(np.random.default_rng(1).dirichlet(np.ones(9), 7).astype(np.float32))
    w = np.eye(7)[3]

    def both():
        rows = ops.MixedRows(M, G)
        return ops.sorted_sum(rows, w), coordinate.closest_mean(rows, 4, kmin=4, starts=3)

    kernel = both()
    monkeypatch.setattr(native, "available", lambda dtype: False)
    for got, want in zip(kernel, both(), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    Y = np.asarray(M, np.float64) @ np.asarray(G, np.float64)
    np.testing.assert_allclose(kernel[0], np.sort(Y, 0)[3], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "args",
    [
        dict(mix=np.ones((3, 4), np.float32)),  # M's columns are not G's rows
        dict(valid=np.ones(5, np.float32)),  # valid without fill
        dict(valid=np.ones(4, np.float32), fill=np.ones(4, np.float32)),  # not [n]
    ],
)
def test_sorting_kernels_refuse_mismatched_arguments(args):
    G = skewed(5, 40)
    with pytest.raises(Exception, match="sorted_sum: X"):
        jax.block_until_ready(native.sorted_sum(G, np.ones(5, np.float32), threads=1, **args))
