"""Reports of a results store: attack × defense tables, heatmaps and ablation plots.

The grid axes of the records decide the layout: ``seed`` axes are averaged (mean ± std),
``attack*`` axes label rows, ``aggregator*`` axes label columns, and every other axis
(β, f, n, a strength...) splits the records into panels and, when numeric, becomes the
x axis of an ablation plot. The reported number is the best test accuracy reached during
training (as in the STRIKE and SignGuard papers) unless ``metric`` says otherwise
(``final_acc``: the last evaluation's).

A report covers the records it is given; ``ResultStore.records`` gives those of the
folder's current sweep (``plan.json``), and the report says how many it left out. A cell
with fewer seeds than the others (a partial store, a diverged run) is marked ``n=k of N
seeds``; the row without attack is never bolded as the strongest attack.

Two more tables appear when the store allows them:

- **Attack impact** (SignGuard, Definition 3): the accuracy drop of each cell against the
  cell with no attack and mean aggregation and otherwise the same config (seed included).
  A grid holds that baseline when ``none`` is one of its attacks and ``mean`` one of its
  rules, e.g. ``attack: {name: [none, lie, minmax]}`` with
  ``aggregator: {name: [mean, median, signguard]}``.
- **Selection rates** (SignGuard, Table II): the fractions of honest and of Byzantine
  updates each rule kept (positive weight), averaged over the captured rounds
  (``diagnostics: {capture_rounds: [...]}``), for rules that weight whole rows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedjax_byz.registry import ConfigError

SEED_AXES = ("seed", "data.seed")
METRICS = ("best_acc", "final_acc")  # the accuracies a record holds
NO_ATTACK = "none"


def value_label(v: Any) -> str:
    """A short text for a grid value."""
    if isinstance(v, Mapping):
        return ", ".join(f"{k}={x}" for k, x in v.items())
    return str(v)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


class Layout:
    """How records map to rows (attacks), columns (defenses), panels and x values.

    Grid fields under ``attack`` label rows and those under ``aggregator`` label columns
    (a strength such as ``z`` or ``nu`` included); the number of Byzantine clients and
    every other field (β, ``n``, ...) split the records into panels, except a count that
    follows the defense (or the attack), e.g. one rule run with its own assumed ``f``,
    which labels that column (row). Every numeric field with several values is also the
    x axis of an ablation plot, its lines leaving out the fields that vary with it (``f``
    set together with ``n``).
    """

    COUNTS = ("attack.num_byzantine", "aggregator.assumed_byzantine")

    def __init__(self, records: Sequence[Mapping[str, Any]]):
        self.records = records
        axes = [
            a for a in dict.fromkeys(k for r in records for k in r["grid"]) if a not in SEED_AXES
        ]
        self.numeric_axes = []
        for a in axes:
            present = [r["grid"][a] for r in records if a in r["grid"]]
            if all(_is_number(v) for v in present) and len(set(present)) > 1:
                self.numeric_axes.append(a)
        self.row_axes = [a for a in axes if a.startswith("attack.") and a not in self.COUNTS]
        self.col_axes = [a for a in axes if a.startswith("aggregator.") and a not in self.COUNTS]
        for a in (a for a in self.COUNTS if a in axes):
            if self._determined(a, self.col):
                self.col_axes.append(a)
            elif self._determined(a, self.row):
                self.row_axes.append(a)
        self.other_axes = [a for a in axes if a not in self.row_axes and a not in self.col_axes]

    def _determined(self, axis: str, by) -> bool:
        """Whether ``axis``'s value is a function of ``by(record)`` over the records."""
        seen: dict[str, str] = {}
        for r in self.records:
            value = json.dumps(r["grid"].get(axis), default=str)
            if seen.setdefault(by(r), value) != value:
                return False
        return True

    def follows(self, axis: str) -> set[str]:
        """The other grid axes whose value is a function of ``axis``'s (set with it)."""
        key = lambda r: json.dumps(r["grid"].get(axis), default=str)  # noqa: E731
        others = self.row_axes + self.col_axes + self.other_axes
        return {a for a in others if a != axis and self._determined(a, key)}

    @staticmethod
    def _label(record, axes, section, skip) -> str:
        grid = record["grid"]
        name = grid.get(f"{section}.name", record["config"][section]["name"])
        extra = [
            f"{a.split('.', 1)[1]}={value_label(grid[a])}"
            for a in axes
            if a in grid and a != f"{section}.name" and a not in skip
        ]
        return f"{name}({', '.join(extra)})" if extra else str(name)

    def row(self, r, skip: Collection[str] = ()) -> str:
        return self._label(r, self.row_axes, "attack", skip)

    def col(self, r, skip: Collection[str] = ()) -> str:
        return self._label(r, self.col_axes, "aggregator", skip)

    def label(self, r) -> str:
        """``attack / defense / other grid values`` of a record."""
        rest = [f"{a}={json.loads(v)}" for a, v in self.panel(r) if v != "null"]
        return " / ".join([self.row(r), self.col(r), *rest])

    def panel(self, r, skip: Collection[str] = ()) -> tuple:
        return tuple(
            (a, json.dumps(r["grid"].get(a), default=str)) for a in self.other_axes if a not in skip
        )


def _stats(values: Sequence[float]) -> tuple[float, float, int]:
    a = np.asarray([v for v in values if v is not None and math.isfinite(v)], float)
    if not len(a):
        return math.nan, math.nan, 0
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0, len(a)


def aggregate_table(records, layout: Layout, metric: str = "best_acc"):
    """``{panel: (rows, cols, {(row, col): (mean, std, count)})}`` in grid order."""
    panels: dict[tuple, dict] = {}
    for r in records:
        cell = panels.setdefault(layout.panel(r), {}).setdefault((layout.row(r), layout.col(r)), [])
        cell.append(r[metric])
    out = {}
    for p, cells in panels.items():
        rows = list(dict.fromkeys(k[0] for k in cells))
        cols = list(dict.fromkeys(k[1] for k in cells))
        out[p] = (rows, cols, {k: _stats(v) for k, v in cells.items()})
    return out


def _panel_title(panel: tuple) -> str:
    return ", ".join(f"{a} = {json.loads(v)}" for a, v in panel if v != "null") or "all"


def _strongest(rows, cols, stats, strongest, never_bold) -> dict[str, float | None]:
    """Per column, the ``strongest`` mean of the attacked rows (None: nothing to bold)."""
    if len(rows) < 2:
        return dict.fromkeys(cols)
    return {
        c: strongest(
            (
                stats[r, c][0]
                for r in rows
                if r not in never_bold and (r, c) in stats and math.isfinite(stats[r, c][0])
            ),
            default=None,
        )
        for c in cols
    }


def _partial(k: int, seeds: int | None) -> str:
    """`` (n=k of N seeds)`` for a cell averaged over fewer seeds than ``seeds``."""
    if seeds is None or k >= seeds:
        return ""
    return f" (n={k} of {seeds} seed{'s' if seeds > 1 else ''})"


PARTIAL_NOTE = (
    "(n=k of N seeds): mean over the k seeds with a finite result; the others are missing "
    "from the store or diverged."
)


def markdown_table(
    rows,
    cols,
    stats,
    scale: float = 100.0,
    strongest=min,
    *,
    seeds: int | None = None,
    never_bold=(NO_ATTACK,),
) -> str:
    """attack × defense, mean ± std, the strongest attack against each rule in bold: the
    ``strongest`` (``min`` for accuracy, ``max`` for attack impact) value of its column
    among the rows not in ``never_bold`` (the row without attack). A cell averaged over
    fewer than ``seeds`` seeds is marked ``n=k of N seeds`` and a note follows the table."""
    lines = ["| attack \\ defense | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    worst = _strongest(rows, cols, stats, strongest, never_bold)
    partial = False
    for r in rows:
        cells = []
        for c in cols:
            if (r, c) not in stats:
                cells.append("")
                continue
            m, s, k = stats[r, c]
            text = f"{scale * m:.1f} ± {scale * s:.1f}" if k > 1 else f"{scale * m:.1f}"
            if r not in never_bold and worst[c] is not None and m == worst[c]:
                text = f"**{text}**"
            note = _partial(k, seeds)
            partial |= bool(note)
            cells.append(text + note)
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    if partial:
        lines += ["", PARTIAL_NOTE]
    return "\n".join(lines)


def latex_table(
    rows, cols, stats, scale: float = 100.0, *, seeds: int | None = None, never_bold=(NO_ATTACK,)
) -> str:
    """The same table as a LaTeX ``tabular`` (booktabs)."""

    def esc(t):
        return t.replace("_", r"\_").replace("%", r"\%")

    worst = _strongest(rows, cols, stats, min, never_bold)
    lines = [
        r"\begin{tabular}{l" + "c" * len(cols) + "}",
        r"\toprule",
        "Attack & " + " & ".join(esc(c) for c in cols) + r" \\",
        r"\midrule",
    ]
    for r in rows:
        cells = []
        for c in cols:
            if (r, c) not in stats:
                cells.append("")
                continue
            m, s, k = stats[r, c]
            text = f"{scale * m:.1f}" + (rf" $\pm$ {scale * s:.1f}" if k > 1 else "")
            if r not in never_bold and worst[c] is not None and m == worst[c]:
                text = rf"\textbf{{{text}}}"
            cells.append(text + _partial(k, seeds))
        lines.append(esc(r) + " & " + " & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def heatmap(
    rows, cols, stats, path: Path, title: str, scale: float = 100.0, *, seeds: int | None = None
) -> None:
    """attack × defense heatmap of the mean accuracy (``n=k`` under cells averaged over
    fewer than ``seeds`` seeds)."""
    plt = _plt()
    grid = np.array([[stats.get((r, c), (math.nan,))[0] * scale for c in cols] for r in rows])
    fig, ax = plt.subplots(
        figsize=(2.5 + 1.1 * len(cols), 1.5 + 0.4 * len(rows)), layout="constrained"
    )
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=scale, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for i in range(len(rows)):
        for j in range(len(cols)):
            if math.isfinite(grid[i, j]):
                k = stats[rows[i], cols[j]][2]
                partial = f"\nn={k}" if seeds is not None and k < seeds else ""
                ax.text(j, i, f"{grid[i, j]:.1f}{partial}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="test accuracy (%)")
    ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=150)
    plt.close(fig)


def ablation_plot(
    records, layout: Layout, axis: str, path: Path, metric: str, scale: float = 100.0
) -> None:
    """Mean ± std of ``metric`` against a numeric grid ``axis``: one subplot per defense,
    one line per attack and other panel values (the layout of the papers' figures)."""
    plt = _plt()
    panels: dict[str, dict[str, dict[float, list[float]]]] = {}
    skip = {axis} | layout.follows(axis)
    for r in records:
        if axis not in r["grid"]:
            continue
        rest = [f"{a}={json.loads(v)}" for a, v in layout.panel(r, skip=skip) if v != "null"]
        name = " / ".join([layout.row(r, skip=skip), *rest])
        lines = panels.setdefault(layout.col(r, skip=skip), {})
        lines.setdefault(name, {}).setdefault(float(r["grid"][axis]), []).append(r[metric])
    cols = min(len(panels), 4)
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(
        nrows,
        cols,
        figsize=(3.6 * cols, 3.2 * nrows + 1.0),
        sharey=True,
        squeeze=False,
        layout="constrained",
    )
    for ax, (title, lines) in zip(axes.flat, panels.items(), strict=False):
        for name, points in lines.items():
            xs = sorted(points)
            st = [_stats(points[x]) for x in xs]
            m = np.array([s[0] for s in st]) * scale
            sd = np.array([s[1] for s in st]) * scale
            ax.errorbar(xs, m, yerr=sd, marker="o", markersize=3, capsize=2, label=name)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(axis)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel(f"{metric.replace('_', ' ')} (%)")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    # as many legend columns as fit the figure's width (7-pt text: ~0.06 in a character)
    fit = int(fig.get_figwidth() // (0.06 * max(map(len, labels), default=1) + 0.5))
    fig.legend(
        handles,
        labels,
        loc="outside lower center",
        fontsize=7,
        ncol=max(1, min(4, len(labels), fit)),
    )
    fig.savefig(path, dpi=150)
    plt.close(fig)


# Config sections that do not change what the attack-impact baseline must share.
IMPACT_FREE = ("name", "attack", "aggregator", "diagnostics", "client_parallelism")


def _is_baseline(r: Mapping[str, Any]) -> bool:
    return r["config"]["attack"]["name"] == "none" and r["config"]["aggregator"]["name"] == "mean"


def _setting(r: Mapping[str, Any]) -> str:
    """A record's config without its attack and rule: what its baseline shares."""
    return json.dumps(
        {k: v for k, v in r["config"].items() if k not in IMPACT_FREE}, sort_keys=True
    )


def attack_impact(
    records: Sequence[Mapping[str, Any]], metric: str = "best_acc"
) -> list[float | None]:
    """SignGuard's attack impact (Definition 3) of every record: ``metric`` of the baseline
    (no attack, mean aggregation, otherwise the same config and seed) minus the record's;
    None where the records hold no such baseline. The baseline's number of Byzantine
    clients does not matter: with no attack they send honest updates, and the mean does
    not depend on who they are."""
    base = {}
    for r in records:
        if _is_baseline(r):
            base.setdefault(_setting(r), r[metric])
    out = []
    for r in records:
        b = base.get(_setting(r))
        out.append(None if b is None or r[metric] is None else b - r[metric])
    return out


def selection_rates(r: Mapping[str, Any]) -> tuple[float, float]:
    """``(honest, Byzantine)`` fractions of updates a record's rule kept, averaged over its
    captured rounds (SignGuard's Table II); NaN without captures or row weights."""
    diag = r.get("diagnostics") or {}
    return _stats(diag.get("honest_kept", []))[0], _stats(diag.get("byzantine_kept", []))[0]


def selection_table(records: Sequence[Mapping[str, Any]], layout: Layout) -> dict[tuple, str]:
    """``{panel: markdown}`` attack × rule tables of ``H / B`` selection rates (mean over
    captured rounds and seeds); only records whose rule weights whole rows."""
    panels: dict[tuple, dict] = {}
    for r in records:
        h, b = selection_rates(r)
        if math.isfinite(h):
            cell = panels.setdefault(layout.panel(r), {})
            cell.setdefault((layout.row(r), layout.col(r)), []).append((h, b))
    out = {}
    for p, cells in panels.items():
        rows = list(dict.fromkeys(k[0] for k in cells))
        cols = list(dict.fromkeys(k[1] for k in cells))
        lines = [
            "| attack \\ defense | " + " | ".join(cols) + " |",
            "|---" * (len(cols) + 1) + "|",
        ]
        for row in rows:
            texts = []
            for c in cols:
                if (row, c) not in cells:
                    texts.append("")
                    continue
                h, b = (_stats(v)[0] for v in zip(*cells[row, c], strict=True))
                texts.append(f"{h:.3f} / " + ("–" if math.isnan(b) else f"{b:.3f}"))
            lines.append(f"| {row} | " + " | ".join(texts) + " |")
        out[p] = "\n".join(lines)
    return out


def check_records(records: Sequence[Mapping[str, Any]], metric: str = "best_acc") -> None:
    """Raises ``ConfigError`` unless ``metric`` is an accuracy every record holds and there
    are records to report (``records`` from ``ResultStore.records`` name their file)."""
    if metric not in METRICS:
        raise ConfigError(
            f"--metric: {metric!r} is not a reported accuracy; allowed: {', '.join(METRICS)}."
        )
    path = getattr(records, "path", None)
    where = f"{str(path)!r}" if path is not None else "the records"
    if not records:
        left_out = getattr(records, "left_out", 0)
        if left_out:
            raise ConfigError(
                f"results: {where} holds no record of the folder's current sweep (plan.json); "
                f"its {left_out} record(s) are of an earlier sweep into the folder."
            )
        raise ConfigError(
            f"results: {where} holds no records; expected one JSON record per line, as a "
            "sweep writes to its results.jsonl."
        )
    lacking = sum(metric not in r for r in records)
    if lacking:
        raise ConfigError(f"--metric: {metric!r} is missing from {lacking} record(s) of {where}.")


def _seed_count(records: Sequence[Mapping[str, Any]]) -> int:
    """How many seed combinations (``seed``, ``data.seed``) the records hold."""
    return len({json.dumps([r["grid"].get(a) for a in SEED_AXES]) for r in records})


def _unattacked(records: Sequence[Mapping[str, Any]], layout: Layout) -> set[str]:
    """Row labels of the records without attack: never the strongest attack."""
    return {layout.row(r) for r in records if r["config"]["attack"]["name"] == NO_ATTACK}


def summary(records: Sequence[Mapping[str, Any]], metric: str = "best_acc") -> str:
    """The markdown tables of ``records``: per panel, attack × defense tables of ``metric``,
    of the attack impact (when the baseline cells are there) and of the selection rates
    (when rounds were captured)."""
    check_records(records, metric)
    layout = Layout(records)
    seeds = _seed_count(records)
    never = _unattacked(records, layout)
    name = metric.replace("_", " ")
    md = [
        f"{name} (%), mean ± std over {seeds} seed(s); "
        "bold: the strongest attack against each defense (lowest accuracy; never the "
        "row without attack).",
        "",
    ]
    left_out, missing = getattr(records, "left_out", 0), getattr(records, "missing", 0)
    if left_out:
        md += [
            f"{left_out} record(s) of the results store left out: they are no cell of the "
            "folder's current sweep (plan.json), e.g. runs of an earlier config or grid.",
            "",
        ]
    if missing:
        md += [f"{missing} cell(s) of the current sweep have no record yet.", ""]
    for panel, (rows, cols, stats) in aggregate_table(records, layout, metric).items():
        if panel:
            md += [f"**{_panel_title(panel)}**", ""]
        md += [markdown_table(rows, cols, stats, seeds=seeds, never_bold=never), ""]
    impact = attack_impact(records, metric)
    attacked = [r for r in records if r["config"]["attack"]["name"] != NO_ATTACK]
    with_impact = [
        dict(r, attack_impact=v) for r, v in zip(records, impact, strict=True) if v is not None
    ]
    if any(r["config"]["attack"]["name"] != NO_ATTACK for r in with_impact):
        md += [
            f"Attack impact (SignGuard, Definition 3): {name} of the no-attack, "
            f"mean-aggregation run minus {name}, in points; bold: the largest drop against "
            "each defense.",
            "",
        ]
        for panel, (rows, cols, stats) in aggregate_table(
            with_impact, layout, "attack_impact"
        ).items():
            if panel:
                md += [f"**{_panel_title(panel)}**", ""]
            table = markdown_table(rows, cols, stats, strongest=max, seeds=seeds, never_bold=never)
            md += [table, ""]
    elif attacked:
        md += [
            "Attack impact (SignGuard, Definition 3) needs the no-attack, mean-aggregation "
            "run of the same setting: add `none` to the attacks and `mean` to the rules.",
            "",
        ]
    selection = selection_table(records, layout)
    if selection:
        md += [
            "Selection rates (SignGuard, Table II): fraction of honest / Byzantine updates "
            "each rule kept, mean over the captured rounds.",
            "",
        ]
        for panel, table in selection.items():
            if panel:
                md += [f"**{_panel_title(panel)}**", ""]
            md += [table, ""]
    return "\n".join(md)


def write_report(
    records: Sequence[Mapping[str, Any]],
    out: str | Path,
    metric: str = "best_acc",
    title: str | None = None,
) -> Path:
    """Writes ``report.md``, ``report.tex``, one heatmap per panel and one ablation plot per
    numeric axis into ``out``; returns the markdown file.

    Raises:
      ConfigError: ``metric`` is not one of ``METRICS``, or there are no records.
    """
    check_records(records, metric)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    layout = Layout(records)
    seeds = _seed_count(records)
    never = _unattacked(records, layout)
    md = [f"# {title or records[0]['name']}", "", summary(records, metric)]
    tex = []
    for i, (panel, (rows, cols, stats)) in enumerate(
        aggregate_table(records, layout, metric).items()
    ):
        head = _panel_title(panel)
        tex += [f"% {head}", latex_table(rows, cols, stats, seeds=seeds, never_bold=never), ""]
        png = out / f"heatmap_{i}.png"
        heatmap(rows, cols, stats, png, head, seeds=seeds)
        md += [f"![heatmap: {head}]({png.name})", ""]
    for axis in layout.numeric_axes:
        png = out / f"ablation_{axis.replace('.', '_')}.png"
        ablation_plot(records, layout, axis, png, metric)
        md += [f"## {metric.replace('_', ' ')} vs {axis}", "", f"![ablation]({png.name})", ""]
    (out / "report.tex").write_text("\n".join(tex))
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path
