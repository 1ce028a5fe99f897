"""``fedjax-byz``: run experiments and list what is registered."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from fedjax_byz.registry import ConfigError
from fedjax_byz.sim.config import parse_yaml
from fedjax_byz.sim.sharding import use_cpu_cores
from fedjax_byz.sweep.report import Layout


def plot_accuracy(results: list[dict[str, Any]], path: Path, title: str) -> None:
    """Test accuracy against round, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    layout = Layout(results)
    # colour by attack, line style by rule: no two lines of a grid look alike
    rows = list(dict.fromkeys(layout.row(r) for r in results))
    cols = list(dict.fromkeys(layout.col(r) for r in results))
    for r in results:
        ax.plot(
            r["eval_rounds"],
            [100 * a for a in r["test_acc"]],
            color=f"C{rows.index(layout.row(r)) % 10}",
            linestyle=("-", "--", ":", "-.")[cols.index(layout.col(r)) % 4],
            label=layout.label(r),
        )
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(results) > 1:
        ax.legend(fontsize=7, ncol=2 if len(results) > 8 else 1)
    fig.savefig(path, dpi=150)
    plt.close(fig)


def _overrides(items: list[str] | None) -> dict[str, Any]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set: expected KEY=VALUE, got {item!r}.")
        out[key] = parse_yaml(value, f"--set {key}")
    return out


def _run_dir(args, overrides: dict[str, Any]) -> Path:
    """``--out``, or ``runs/<name>`` with the name the overrides leave."""
    from fedjax_byz.sim.config import load_yaml

    name = overrides.get("name") or load_yaml(args.config, args.profile).get("name", "experiment")
    return _out_dir(args.out or Path("runs") / str(name))


def _out_dir(path: str | Path) -> Path:
    """``path`` as an output folder; one clear error when a file is in the way."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out: {str(path)!r} is a file; give a folder.")
    return path


def _sweep(args, overrides: dict[str, Any] | None = None):
    """Runs ``args.config`` with ``overrides`` (default: the parsed ``--set`` values)."""
    from fedjax_byz.sweep.runner import sweep

    if args.distributed:
        from fedjax_byz.sim.sharding import initialize_distributed

        initialize_distributed()
    overrides = _overrides(args.set) if overrides is None else overrides
    out = _run_dir(args, overrides)
    records = sweep(
        args.config,
        out=out,
        profile=args.profile,
        overrides=overrides,
        progress=not args.quiet,
        ray=getattr(args, "ray", None),
    )
    return records, out


def cmd_run(args) -> int:
    """Runs a config (every cell of its grid), prints a table, writes JSON and a plot."""
    from fedjax_byz import sim
    from fedjax_byz.sweep.report import summary

    records, out = _sweep(args)
    table = summary(records)
    name = records[0]["name"]
    print(f"\n{name}: {len(records)} run(s), results in {out}/\n\n{table}\n")
    sim.save_json({"name": name, "runs": records}, out / "results.json")
    (out / "summary.md").write_text(f"# {name}\n\n{table}\n")
    plot_accuracy(records, out / "accuracy.png", name)
    return 0


def cmd_sweep(args) -> int:
    """Runs a grid (batched, resumable) and writes its report."""
    from fedjax_byz.sweep.report import write_report

    records, out = _sweep(args)
    path = write_report(records, out / "report")
    print(f"\n{path.read_text()}\nresults: {out / 'results.jsonl'}; report: {path}")
    return 0


def cmd_report(args) -> int:
    """Writes tables and plots of an existing results store."""
    from fedjax_byz.sweep.report import write_report
    from fedjax_byz.sweep.store import ResultStore

    src = Path(args.results)
    store_path = src / "results.jsonl" if src.is_dir() else src
    if not store_path.exists():
        raise ConfigError(f"results: no results store at {str(store_path)!r}.")
    records = ResultStore(store_path).records()
    path = write_report(
        records, _out_dir(args.out or store_path.parent / "report"), metric=args.metric
    )
    print(f"{path.read_text()}\nreport: {path}")
    return 0


def cmd_skew(args) -> int:
    """Runs a config capturing chosen rounds; draws LLE/PCA pictures and skew measures."""
    import numpy as np

    from fedjax_byz.diagnostics import capture_measures, plot_captures
    from fedjax_byz.sim.config import load_yaml

    raw = load_yaml(args.config, args.profile)
    sets = _overrides(args.set)
    rounds = sets.get("server.rounds", (raw.get("server") or {}).get("rounds", 50))
    if "diagnostics.capture_rounds" not in sets and not (raw.get("diagnostics") or {}).get(
        "capture_rounds"
    ):
        picks = np.linspace(1, rounds, args.rounds).round().astype(int)
        sets["diagnostics.capture_rounds"] = sorted({int(r) for r in picks})
    else:
        print("skew: capturing the config's diagnostics.capture_rounds (--rounds unused).")
    records, out = _sweep(args, sets)
    layout = Layout(records)
    lines = [
        "| cell | round | skew (moment) | skew (median) | mean–mode distance | κ | "
        "honest kept | Byzantine kept |",
        "|---" * 8 + "|",
    ]
    for r in records:
        label = layout.label(r)
        with np.load(out / r["captures"]) as z:
            png = plot_captures(dict(z), out / "skew" / f"{r['key']}.png", label)
            diag = capture_measures(dict(z))
        for k, rnd in enumerate(diag["rounds"]):
            vals = [
                diag[m][k]
                for m in (
                    "skew_moment",
                    "skew_median",
                    "mode_distance",
                    "kappa",
                    "honest_kept",
                    "byzantine_kept",
                )
            ]
            cells = " | ".join("n/a" if v is None or v != v else f"{v:.3f}" for v in vals)
            lines.append(f"| {label} | {rnd} | {cells} |")
        print(f"{label}: {png}")
    table = "\n".join(lines)
    (out / "skew" / "measures.md").write_text(table + "\n")
    print(f"\n{table}\n\npictures and measures in {out / 'skew'}/")
    return 0


def cmd_kappa(args) -> int:
    """Captures a no-attack run's updates; κ of every rule × attack on them."""
    from fedjax_byz.diagnostics.robustness import kappa_report

    overrides = _overrides(args.set)
    path = kappa_report(
        args.config,
        out=_run_dir(args, overrides),
        profile=args.profile,
        overrides=overrides,
        progress=not args.quiet,
    )
    print(f"\n{path.read_text()}\nκ table: {path}")
    return 0


def cmd_list(args) -> int:
    from fedjax_byz import aggregators, attacks, data, models

    sections = [
        ("attacks", attacks.ATTACKS),
        ("aggregators", aggregators.RULES),
        ("pre-aggregators (combine as 'pre+rule')", aggregators.PRE),
        ("datasets", data.DATASETS),
        ("partitioners", data.PARTITIONERS),
        ("models", models.MODELS),
    ]
    for title, registry in sections:
        print(f"{title}:")
        aliases = {}
        for alias in registry.names(aliases=True):
            if alias not in registry.names():
                aliases.setdefault(registry.canonical(alias), []).append(alias)
        for name in registry.names():
            entry = registry.entry(name)
            defaults = {k: v for k, v in entry.defaults.items() if k not in ("num_classes",)}
            params = ", ".join(f"{k}={v!r}" for k, v in defaults.items())
            alias = f" (alias {', '.join(aliases[name])})" if name in aliases else ""
            print(f"  {name}{alias}({params})\n      {entry.doc}")
        print()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedjax-byz", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, text in (
        ("run", cmd_run, "run a config (every cell of its grid); table, JSON and a plot"),
        ("sweep", cmd_sweep, "run a grid batched and resumably; tables, heatmaps, ablations"),
        ("skew", cmd_skew, "capture rounds of a run: LLE/PCA pictures, skew and robustness"),
        ("kappa", cmd_kappa, "empirical κ of every rule × attack on a run's captured updates"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("config")
        cmd.add_argument("--out", help="output folder (default runs/<name>)")
        cmd.add_argument("--profile", help="apply the config's profiles.<name> (e.g. cpu)")
        cmd.add_argument(
            "--set",
            action="append",
            metavar="KEY=VALUE",
            help="override a setting, e.g. --set server.rounds=10",
        )
        cmd.add_argument("--quiet", action="store_true", help="no progress bars")
        cmd.add_argument(
            "--distributed",
            action="store_true",
            help="join a multi-host JAX job first (jax.distributed.initialize)",
        )
        if name == "sweep":
            cmd.add_argument(
                "--ray",
                metavar="ADDRESS",
                help="run the batches on a Ray cluster (auto, ray://HOST:PORT, or local)",
            )
        if name == "skew":
            cmd.add_argument(
                "--rounds",
                type=int,
                default=6,
                help="how many evenly spaced rounds to capture (default 6)",
            )
        cmd.set_defaults(fn=fn)
    rep = sub.add_parser("report", help="tables and plots of a results store")
    rep.add_argument("results", help="a sweep folder or its results.jsonl")
    rep.add_argument("--out", help="output folder (default <results>/report)")
    rep.add_argument("--metric", default="best_acc", help="best_acc (default) or final_acc")
    rep.set_defaults(fn=cmd_report)
    lst = sub.add_parser("list", help="list attacks, aggregators, datasets, models, partitioners")
    lst.set_defaults(fn=cmd_list)
    args = parser.parse_args(argv)
    use_cpu_cores()  # before any JAX operation: a CPU's cores become devices
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "\ninterrupted: finished cells and checkpoints are saved; "
            "run the same command again to resume.",
            file=sys.stderr,
            flush=True,
        )
        sys.stdout.flush()
        os._exit(130)  # without waiting for a program still compiling in the background


if __name__ == "__main__":
    sys.exit(main())
