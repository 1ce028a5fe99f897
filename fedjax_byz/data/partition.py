"""Partitioners: pure functions ``(labels, n, seed, ...) -> list of n index arrays``.

Every training example goes to exactly one client (``natural`` may leave writers out
when fewer clients than writers are asked for); the same arguments give the same split.
Each partitioner checks its own parameters and raises ``ConfigError`` naming the
``data.*`` field, so direct calls are validated too.
"""

from __future__ import annotations

import numpy as np

from fedjax_byz.registry import ConfigError, Registry

PARTITIONERS = Registry("partition")


def _split_by_fractions(idx: np.ndarray, fractions: np.ndarray) -> list[np.ndarray]:
    """Cuts ``idx`` into ``len(fractions)`` consecutive pieces of those shares."""
    cuts = np.round(np.cumsum(fractions)[:-1] * len(idx)).astype(int)
    return np.split(idx, cuts)


def _gather(pieces: list[list[np.ndarray]], n: int) -> list[np.ndarray]:
    return [np.sort(np.concatenate([p[i] for p in pieces])).astype(np.int64) for i in range(n)]


@PARTITIONERS.register("iid")
def iid(labels: np.ndarray, n: int, seed: int = 0) -> list[np.ndarray]:
    """Uniformly shuffled, equal-size (±1) shards."""
    rng = np.random.default_rng(seed)
    return [np.sort(p) for p in np.array_split(rng.permutation(len(labels)), n)]


MAX_DRAWS = 1000  # redraws allowed to meet ``min_size`` before giving up


@PARTITIONERS.register("dirichlet")
def dirichlet(
    labels: np.ndarray, n: int, seed: int = 0, beta: float = 0.5, min_size: int = 0
) -> list[np.ndarray]:
    """Label skew by a Dirichlet draw per class (STRIKE paper, appendix D.1).

    For each class ``c`` draw ``q_c ~ Dir_n(β)`` and give client ``i`` a ``(q_c)_i`` share of
    class ``c``'s examples. Small β concentrates every class on few clients; β → ∞
    approaches IID. Clients may receive no example at small β (they then send zero
    updates, which distance-based rules such as Krum may prefer); ``min_size > 0`` redraws
    the whole split until every client holds at least that many examples (the NIID-Bench
    convention, Li et al. 2022), ``0`` (default) keeps the first draw.
    """
    if not (np.isfinite(beta) and beta > 0):
        raise ConfigError(
            f"data.beta: the Dirichlet concentration must be a finite number > 0 "
            f"(β → ∞ is IID: use partition 'iid'), got {beta}."
        )
    if isinstance(min_size, bool) or not isinstance(min_size, int | np.integer) or min_size < 0:
        raise ConfigError(f"data.min_size: must be an integer >= 0, got {min_size!r}.")
    if n * min_size > len(labels):
        raise ConfigError(
            f"data.min_size: {n} clients of at least {min_size} examples need "
            f"{n * min_size}, the data has {len(labels)}."
        )
    rng = np.random.default_rng(seed)
    for _ in range(MAX_DRAWS):
        pieces = []
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            pieces.append(_split_by_fractions(idx, rng.dirichlet(np.full(n, beta))))
        parts = _gather(pieces, n)
        if min(len(p) for p in parts) >= min_size:
            return parts
    raise ConfigError(
        f"data.min_size: no Dirichlet(β={beta}) split of {len(labels)} examples over {n} "
        f"clients gave every client {min_size} examples in {MAX_DRAWS} draws; lower "
        "min_size, raise β or use fewer clients."
    )


@PARTITIONERS.register("shards")
def shards(
    labels: np.ndarray, n: int, seed: int = 0, s: float = 0.5, shards_per_client: int = 2
) -> list[np.ndarray]:
    """SignGuard paper's non-IID split (Section V-B): an ``s`` share spread IID, the rest
    sorted by label into ``n·shards_per_client`` shards, each client taking
    ``shards_per_client`` of them at random. Smaller ``s`` is more skewed.
    """
    if not 0 <= s <= 1:  # also rejects NaN
        raise ConfigError(f"data.s: the IID share must be in [0, 1], got {s}.")
    if (
        isinstance(shards_per_client, bool)
        or not isinstance(shards_per_client, int | np.integer)
        or shards_per_client < 1
    ):
        raise ConfigError(
            f"data.shards_per_client: must be an integer >= 1, got {shards_per_client!r}."
        )
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(labels))
    cut = int(round(s * len(labels)))
    iid_part = np.array_split(perm[:cut], n)
    rest = perm[cut:]
    rest = rest[np.argsort(labels[rest], kind="stable")]
    shard_list = np.array_split(rest, n * shards_per_client)
    owner = rng.permutation(n * shards_per_client) % n
    sharded = [
        np.concatenate([shard_list[j] for j in np.flatnonzero(owner == i)]) for i in range(n)
    ]
    return _gather([iid_part, sharded], n)


@PARTITIONERS.register("natural")
def natural(
    labels: np.ndarray, n: int, seed: int = 0, groups: np.ndarray | None = None
) -> list[np.ndarray]:
    """The source's own clients (e.g. FEMNIST writers); ``n`` of them, chosen at random
    (seeded) when the source has more."""
    if groups is None:
        raise ConfigError(
            "data.partition: 'natural' needs a source with natural clients "
            "(femnist); use iid, dirichlet or shards."
        )
    ids = np.unique(groups)
    if n > len(ids):
        raise ConfigError(
            f"data.num_clients: the source has {len(ids)} natural clients, asked for {n}."
        )
    chosen = np.sort(np.random.default_rng(seed).choice(ids, n, replace=False))
    return [np.flatnonzero(groups == g) for g in chosen]


def partition(name: str, labels: np.ndarray, n: int, seed: int = 0, **params) -> list[np.ndarray]:
    """Splits ``labels``' examples among ``n`` clients with the partitioner ``name``."""
    entry = PARTITIONERS.entry(name, "data.partition")
    entry.check_params(params, "data")
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ConfigError(f"data.num_clients: must be a positive integer, got {n!r}.")
    return entry.factory(np.asarray(labels), n, seed, **params)
