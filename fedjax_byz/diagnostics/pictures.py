"""Pictures of captured rounds: LLE and PCA embeddings, and the skew of the projections.

The LLE view follows the STRIKE paper's appendix A (Figures 1, 2, 5, 6): locally linear
embedding (Roweis & Saul 2000; scikit-learn's ``LocallyLinearEmbedding``) of one round's
updates with ``k = 0.1·m`` neighbours, honest updates, Byzantine updates, their mean
(the optimal gradient) and the rule's aggregate drawn with distinct markers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedjax_byz.diagnostics.measures import projections

MARKERS = {
    "honest": dict(marker="o", s=18, c="tab:blue", alpha=0.7),
    "byzantine": dict(marker="x", s=40, c="tab:red"),
    "mean": dict(marker="*", s=220, c="tab:green", edgecolors="k", zorder=5),
    # hollow, so that the mean stays visible when the rule returns it (FedAvg)
    "aggregate": dict(
        marker="D", s=90, facecolors="none", edgecolors="k", linewidths=1.5, zorder=6
    ),
}


def _points(updates, byz, aggregate) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """All points to embed and the row indices of each kind."""
    G = np.asarray(updates, np.float64)
    byz = np.asarray(byz, bool)
    mean = G[~byz].mean(axis=0)
    X = np.vstack([G, mean[None], np.asarray(aggregate, np.float64)[None]])
    m = len(G)
    return X, {
        "honest": np.flatnonzero(~byz),
        "byzantine": np.flatnonzero(byz),
        "mean": np.array([m]),
        "aggregate": np.array([m + 1]),
    }


def embed(X: np.ndarray, method: str = "lle", seed: int = 0) -> np.ndarray:
    """2-D embedding of the rows of ``X``: ``"lle"`` (k = 0.1·m neighbours, at least 3)
    or ``"pca"``."""
    if method == "pca":
        Xc = X - X.mean(axis=0)
        _, _, vt = np.linalg.svd(Xc, full_matrices=False)
        return Xc @ vt[:2].T
    from sklearn.manifold import LocallyLinearEmbedding

    k = min(len(X) - 1, max(3, round(0.1 * len(X))))
    lle = LocallyLinearEmbedding(
        n_neighbors=k, n_components=2, random_state=seed, eigen_solver="dense"
    )
    return lle.fit_transform(X)


def plot_captures(captures: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """A figure of every captured round: LLE (top), PCA (middle) and the histogram of the
    honest projections ``p_i`` on ``u = median − mean`` (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    K = len(captures["rounds"])
    fig, axes = plt.subplots(3, K, figsize=(3.2 * K, 9), squeeze=False, layout="constrained")
    for k in range(K):
        X, kinds = _points(captures["updates"][k], captures["byz"][k], captures["aggregate"][k])
        for row, method in enumerate(("lle", "pca")):
            Z = embed(X, method)
            ax = axes[row, k]
            for kind, idx in kinds.items():
                if len(idx):
                    ax.scatter(Z[idx, 0], Z[idx, 1], label=kind, **MARKERS[kind])
            ax.set_title(f"round {int(captures['rounds'][k])} — {method.upper()}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        H = np.asarray(captures["updates"][k], np.float64)[~np.asarray(captures["byz"][k])]
        p = projections(H)
        ax = axes[2, k]
        ax.hist(p, bins=max(5, len(p) // 3), color="tab:blue", alpha=0.8)
        ax.axvline(p.mean(), color="tab:green", label="mean of p")
        ax.axvline(np.median(p), color="tab:orange", ls="--", label="median of p")
        ax.set_title("projections on u = median − mean", fontsize=8)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    h2, l2 = axes[2, 0].get_legend_handles_labels()
    fig.legend(handles + h2, labels + l2, loc="outside lower center", ncol=6, fontsize=8)
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
