"""The native kernels (``fedjax_byz.native``) against float64 numpy, and their fallback."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_byz import native, ops

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


@pytest.mark.parametrize("n, d", SHAPES)
@pytest.mark.parametrize("centre", ["none", "given", "weighted mean"])
def test_gram_matches_float64(n, d, centre):
    G = skewed(n, d)
    w = np.random.default_rng(n).dirichlet(np.ones(n)).astype(np.float32)
    c = {"none": None, "given": G[-1], "weighted mean": w @ G.astype(np.float64)}[centre]
    args = {"none": {}, "given": {"center": G[-1]}, "weighted mean": {"weights": w}}[centre]
    K, sq = jax.jit(lambda G, a: native.gram(G, **a, threads=2))(G, args)
    want = exact_gram(G, c)
    scale = np.sqrt(np.outer(np.diag(want), np.diag(want))).max() or 1.0
    np.testing.assert_allclose(K, want, rtol=0, atol=2e-6 * scale)
    np.testing.assert_array_equal(K, K.T)
    np.testing.assert_allclose(sq, np.diag(exact_gram(G)), rtol=1e-6)


@pytest.mark.parametrize("n, d", SHAPES)
@pytest.mark.parametrize("centred", [False, True])
def test_row_sq_dists_match_float64(n, d, centred):
    G = skewed(n, d)
    c = G[-1] + 0.5 if centred else None
    got = jax.jit(lambda G, c: native.row_sq_dists(G, c, threads=2))(G, c)
    X = np.asarray(G, np.float64) - (0.0 if c is None else np.asarray(c, np.float64))
    np.testing.assert_allclose(got, (X * X).sum(1), rtol=1e-6)


def test_empty_matrices_give_zeros():
    for n, d in [(3, 0), (0, 5), (0, 0)]:
        G = np.zeros((n, d), np.float32)
        K, sq = jax.jit(lambda G: native.gram(G, threads=2))(G)
        rows = jax.jit(lambda G: native.row_sq_dists(G, threads=2))(G)
        np.testing.assert_array_equal(K, np.zeros((n, n)))
        np.testing.assert_array_equal(sq, np.zeros(n))
        np.testing.assert_array_equal(rows, np.zeros(n))


def test_gram_does_not_depend_on_the_thread_count():
    G = skewed(11, 16_384 * 5 + 3)

    def run(threads, **centre):
        Ksq = jax.jit(lambda G: native.gram(G, **centre, threads=threads))(G)
        return np.concatenate([np.ravel(a) for a in Ksq])

    K = [run(t, center=G[0]) for t in (1, 2, 7)]
    rows = [jax.jit(lambda G, t=t: native.row_sq_dists(G, G[1], threads=t))(G) for t in (1, 5)]
    np.testing.assert_array_equal(*rows)
    np.testing.assert_array_equal(run(1, weights=G[:, 0]), run(3, weights=G[:, 0]))
    np.testing.assert_array_equal(K[0], K[1])
    np.testing.assert_array_equal(K[0], K[2])


def test_gram_under_vmap():
    Gs = np.stack([skewed(6, 300, seed=s) for s in range(3)])
    K = jax.jit(jax.vmap(lambda G: native.gram(G, weights=jnp.full(6, 1 / 6), threads=2)[0]))(Gs)
    for G, k in zip(Gs, K, strict=True):
        np.testing.assert_allclose(k, exact_gram(G, G.mean(0)), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("fn", ["gram", "centred_gram", "row_sq_dists", "row_sq_norms"])
def test_ops_gram_is_native_and_agrees_with_the_xla_product(monkeypatch, fn):
    G = jnp.asarray(skewed(9, 5000))
    w = jnp.linspace(0.0, 2.0 / 9, 9)
    c = w @ G
    call = {
        "gram": lambda G: ops.gram(G, c),
        "centred_gram": lambda G: ops.centred_gram(G, w, sq_norms=True)[0],
        "row_sq_dists": lambda G: ops.row_sq_dists(G, c),
        "row_sq_norms": lambda G: ops.row_sq_norms(G),
    }

    def hlo():  # traced afresh: jit caches traces per function
        return jax.jit(lambda G: call[fn](G)).lower(G).as_text()

    targets = (native._TARGET, native._ROWS_TARGET)
    assert any(t in hlo() for t in targets)
    with_kernel = np.asarray(call[fn](G))
    monkeypatch.setattr(native, "available", lambda dtype: False)
    assert not any(t in hlo() for t in targets)
    without = np.asarray(call[fn](G))
    centre = None if fn == "row_sq_norms" else np.asarray(c, np.float64)
    want = exact_gram(G, centre)
    want = want if fn.endswith("gram") else np.diag(want)
    np.testing.assert_allclose(with_kernel, want, rtol=1e-6, atol=1e-3)
    np.testing.assert_allclose(without, want, rtol=1e-5, atol=1e-2)


def test_direct_calls_refuse_when_the_kernels_are_unavailable(monkeypatch):
    """A direct call checks that the kernels are registered: where they cannot load, it
    says so instead of failing at run time with XLA's missing-handler error."""
    G = skewed(3, 20)
    np.testing.assert_allclose(native.row_sq_dists(G, threads=1), (G * G).sum(1), rtol=1e-6)
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
