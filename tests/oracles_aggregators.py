"""Plain-numpy (float64) loop transcriptions of every aggregation rule's formula.

Written from the papers' definitions (see each rule's docstring in
``fedjax_byz.aggregators``), not from the JAX code: loops over coordinates, rows and
subsets. Each returns the aggregate and, for rules that keep rows, the kept set.
"""

from __future__ import annotations

import itertools
import math

import numpy as np


def skewed_updates(rng: np.random.Generator, n: int, d: int, f: int) -> np.ndarray:
    """Skewed honest updates (two unequal clusters, heavy tails, a large shared offset)
    with ``f`` Byzantine rows first (half identical and far, the rest scaled copies)."""
    offset = 50.0 * rng.standard_normal(d)
    centres = rng.standard_normal((2, d)) * 3.0
    cluster = (rng.random(n) < 0.75).astype(int)
    G = offset + centres[cluster] + rng.standard_t(2.5, (n, d))
    far = offset - 8.0 * np.abs(rng.standard_normal(d))
    for i in range(f):
        G[i] = far if i % 2 == 0 else offset + (G[i] - offset) * -3.0
    return G.astype(np.float32)


def mean(G, f):
    return G.mean(0), set(range(len(G)))


def median(G, f):
    return np.array([_median(G[:, j]) for j in range(G.shape[1])]), None


def _median(x):
    s = sorted(x)
    n = len(s)
    return s[(n - 1) // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def trmean(G, f):
    n = len(G)
    return np.array([np.mean(sorted(G[:, j])[f : n - f]) for j in range(G.shape[1])]), None


def meamed(G, f):
    n, d = G.shape
    G = G.astype(np.float64)
    out = np.empty(d)
    for j in range(d):
        m = _median(G[:, j])
        vals = sorted(G[:, j], key=lambda x: (abs(x - m), x))
        out[j] = np.mean(vals[: n - f])
    return out, None


def rbtm(G, f, delivered):
    """Trimmed mean (f per side) of the delivered rows."""
    return trmean(G[sorted(delivered)], f)[0], None


def _sqd(a, b):
    return float(np.sum((np.asarray(a, np.float64) - b) ** 2))


def krum_scores(G, f, rows=None):
    rows = list(range(len(G))) if rows is None else rows
    r = len(rows)
    scores = {}
    for i in rows:
        ds = sorted(_sqd(G[i], G[j]) for j in rows if j != i)
        scores[i] = sum(ds[: max(r - f - 2, 0)])
    return scores


def krum(G, f):
    s = krum_scores(G, f)
    best = min(s, key=lambda i: (s[i], i))
    return G[best].astype(np.float64), {best}


def multikrum(G, f):
    s = krum_scores(G, f)
    kept = sorted(s, key=lambda i: (s[i], i))[: len(G) - f]
    return G[kept].mean(0), set(kept)


def bulyan(G, f):
    n, d = G.shape
    theta = n - 2 * f
    remaining, chosen = list(range(n)), []
    for _ in range(theta):
        s = krum_scores(G, f, remaining)
        best = min(s, key=lambda i: (s[i], i))
        chosen.append(best)
        remaining.remove(best)
    beta = theta - 2 * f
    out = np.empty(d)
    for j in range(d):
        col = G[chosen, j].astype(np.float64)
        m = _median(col)
        out[j] = np.mean(sorted(col, key=lambda x: (abs(x - m), x))[:beta])
    return out, set(chosen)


def geomed(G, f, iters=8, nu=1e-6):
    X = G.astype(np.float64)
    z = X.mean(0)
    for _ in range(iters):
        beta = np.array([1.0 / max(nu, np.linalg.norm(z - x)) for x in X])
        z = (beta[:, None] * X).sum(0) / beta.sum()
    return z, None


def cclip(G, f, tau=10.0, iters=1, v=None):
    X = G.astype(np.float64)
    v = np.zeros(X.shape[1]) if v is None else v
    for _ in range(iters):
        step = np.zeros_like(v)
        for x in X:
            r = np.linalg.norm(x - v)
            step += (x - v) * min(1.0, tau / r if r > 0 else 1.0)
        v = v + step / len(X)
    return v, None


def coord_median(G):
    return np.array([_median(G[:, j]) for j in range(G.shape[1])])


def aksel(G, f, mode="mid"):
    m = coord_median(G.astype(np.float64))
    r = [_sqd(x, m) for x in G]
    if mode == "mid":
        kept = [i for i in range(len(G)) if r[i] <= _median(r)]
    else:
        kept = sorted(range(len(G)), key=lambda i: (r[i], i))[: len(G) - f]
    return G[kept].mean(0), set(kept)


def monna(G, f, idx=0):
    kept = sorted(range(len(G)), key=lambda i: (_sqd(G[i], G[idx]), i))[: len(G) - f]
    return G[kept].mean(0), set(kept)


def cge(G, f):
    kept = sorted(range(len(G)), key=lambda i: (_sqd(G[i], 0.0), i))[: len(G) - f]
    return G[kept].mean(0), set(kept)


def dnc(G, f, coords_per_iter, c=1.0):
    n = len(G)
    good = set(range(n))
    for coords in coords_per_iter:
        X = G[:, coords].astype(np.float64)
        Xc = X - X.mean(0)
        v = np.linalg.svd(Xc, full_matrices=False)[2][0]
        s = [float(np.dot(x, v)) ** 2 for x in Xc]
        good &= set(sorted(range(n), key=lambda i: (s[i], i))[: n - math.floor(c * f)])
    return G[sorted(good)].mean(0), good


def _top_cov(X, c):
    mu = (c[:, None] * X).sum(0) / c.sum()
    D = X - mu
    cov = sum(ci * np.outer(x, x) for ci, x in zip(c, D, strict=True)) / c.sum()
    lam, V = np.linalg.eigh(cov)
    return mu, lam[-1], V[:, -1], D


def caf(G, f):
    X = G.astype(np.float64)
    n = len(X)
    c = np.ones(n)
    best_mu, best_lam = X.mean(0), np.inf
    while c.sum() > n - 2 * f:
        mu, lam, v, D = _top_cov(X, c)
        if lam < best_lam:
            best_mu, best_lam = mu, lam
        tau = (D @ v) ** 2
        if tau.max() == 0:
            break
        c = c * (1 - tau / tau.max())
    return best_mu, None


def _subsets_by_mask(n, k):
    """Subsets of size k in increasing bitmask order (the rules' tie order)."""
    subs = list(itertools.combinations(range(n), k))
    return sorted(subs, key=lambda s: sum(1 << i for i in s))


def mda(G, f):
    n = len(G)
    best, best_diam = None, np.inf
    for S in _subsets_by_mask(n, n - f):
        diam = max((_sqd(G[i], G[j]) for i, j in itertools.combinations(S, 2)), default=0.0)
        if diam < best_diam:
            best, best_diam = S, diam
    return G[list(best)].mean(0), set(best)


def smea(G, f):
    n = len(G)
    best, best_lam = None, np.inf
    for S in _subsets_by_mask(n, n - f):
        X = G[list(S)].astype(np.float64)
        lam = np.linalg.eigvalsh(np.cov(X.T, bias=True))[-1]
        if lam < best_lam:
            best, best_lam = S, lam
    return G[list(best)].mean(0), set(best)


def signguard(G, start, m, kind=None, lower=0.1, upper=3.0):
    """Algorithm 2 of the SignGuard paper with scikit-learn's Mean-Shift."""
    from sklearn.cluster import MeanShift, estimate_bandwidth

    X = G.astype(np.float64)
    n = len(X)
    norms = np.linalg.norm(X, axis=1)
    M = np.median(norms)
    s1 = {i for i in range(n) if lower <= norms[i] / M <= upper}
    block = X[:, start : start + m]
    feats = np.array([[np.mean(b > 0), np.mean(b == 0), np.mean(b < 0)] for b in block])
    feats = feats / (feats.max(0) + 1e-8)
    if kind == "sim":
        cos = np.array([[x @ y / (np.linalg.norm(x) * np.linalg.norm(y)) for y in X] for x in X])
        s = np.array([np.median(np.delete(cos[i], i)) for i in range(n)])
        extra = np.clip(s, 0, np.median(s)) / (5 * np.median(s) + 1e-8)
        feats = np.column_stack([feats, extra])
    elif kind == "dist":
        dist = np.array([[np.linalg.norm(x - y) for y in X] for x in X])
        s = np.array([np.median(np.delete(dist[i], i)) for i in range(n)])
        feats = np.column_stack([feats, (s >= 1.1 * np.median(s)) / 5.0])
    bw = estimate_bandwidth(feats, quantile=0.5, n_samples=50)
    labels = MeanShift(bandwidth=bw, bin_seeding=True, cluster_all=False).fit(feats).labels_
    sizes = [np.sum(labels == k) for k in range(labels.max() + 1)]
    s2 = {i for i in range(n) if labels[i] == int(np.argmax(sizes))}
    kept = sorted(s1 & s2)
    out = sum(X[i] * min(1.0, M / norms[i]) for i in kept) / max(len(kept), 1)
    return out, set(kept)


def clippedclustering(G, f):
    from sklearn.cluster import AgglomerativeClustering

    X = G.astype(np.float64)
    n = len(X)
    norms = np.linalg.norm(X, axis=1)
    tau = np.median(norms)
    clipped = [x * min(1.0, tau / r) for x, r in zip(X, norms, strict=True)]
    dist = np.array([[1 - x @ y / (np.linalg.norm(x) * np.linalg.norm(y)) for y in X] for x in X])
    np.fill_diagonal(dist, 0.0)
    labels = AgglomerativeClustering(metric="precomputed", linkage="average", n_clusters=2)
    labels = labels.fit(dist).labels_
    sizes = [np.sum(labels == k) for k in (0, 1)]
    big = labels[0] if sizes[0] == sizes[1] else int(np.argmax(sizes))
    kept = [i for i in range(n) if labels[i] == big]
    return np.mean([clipped[i] for i in kept], 0), set(kept)


def bucketing(G, perm, s):
    n = len(G)
    return np.array([G[perm[b : b + s]].mean(0) for b in range(0, n, s)])


def nnm(G, f):
    n = len(G)
    out = []
    for i in range(n):
        near = sorted(range(n), key=lambda j: (_sqd(G[i], G[j]), j))[: n - f]
        out.append(G[near].astype(np.float64).mean(0))
    return np.array(out)


def arc(G, f):
    n = len(G)
    k = math.floor(2 * f / n * (n - f))
    norms = np.linalg.norm(G.astype(np.float64), axis=1)
    order = sorted(range(n), key=lambda i: (-norms[i], i))
    out = G.astype(np.float64).copy()
    if k > 0:
        C = norms[order[k]]
        for i in order[:k]:
            out[i] *= C / norms[i]
    return out


def clip(G, c=2.0):
    X = G.astype(np.float64)
    return np.array([x * min(1.0, c / np.linalg.norm(x)) for x in X])
