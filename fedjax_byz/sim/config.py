"""Experiment configuration: YAML -> frozen dataclasses, validated before any compilation.

A config has the sections ``data``, ``model``, ``train`` (local training), ``server``,
``attack`` and ``aggregator``. Keys a section does not define are that section's
component's parameters: ``attack: {name: lie, num_byzantine: 4, z: 1.5}`` gives ``lie`` the
keyword ``z`` (``params: {...}`` is accepted too). A list anywhere is a grid (see
``expand``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from fedjax_byz import aggregators, attacks, data, models
from fedjax_byz.registry import ConfigError, is_int, is_number


class _Loader(yaml.SafeLoader):
    """The safe YAML loader, reading ``1e-3`` as a number (as YAML 1.2 does) rather than
    as the string YAML 1.1 makes of an exponent without a decimal point."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str, where: str) -> Any:
    """YAML text to plain values; a syntax error is one ``ConfigError`` naming ``where``."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({' '.join(str(e).split())}).") from None


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where client data comes from and how it is split.

    ``params`` go to the source (e.g. ``path`` for ``imagefolder``/``femnist``, ``name``
    for ``tfds``); ``beta`` and ``min_size`` (redraw until every client holds that many
    examples; 0: the plain draw, which may leave clients empty) are used by
    ``dirichlet``, ``s``/``shards_per_client`` by ``shards``; ``seed`` is the partition's
    seed (the run's seed when null).
    """

    source: str = "digits"
    partition: str = "iid"
    num_clients: int = 20
    beta: float = 0.5
    min_size: int = 0
    s: float = 0.5
    shards_per_client: int = 2
    seed: int | None = None
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str = "mlp"
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Local training: SGD with momentum, weight decay and gradient-norm clipping.

    Exactly one of ``local_epochs`` (E passes over the client's own examples) and
    ``local_steps`` (K mini-batch steps) is used; ``local_steps`` wins when set.
    ``clip_norm: null`` disables clipping.
    """

    local_epochs: int = 1
    local_steps: int | None = None
    batch_size: int = 32
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    clip_norm: float | None = None


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Rounds and the server's optimizer (``w ← w − lr·(momentum-averaged aggregate)``)."""

    rounds: int = 50
    lr: float = 1.0
    momentum: float = 0.0
    clients_per_round: int | None = None
    eval_every: int = 5


@dataclasses.dataclass(frozen=True)
class AttackConfig:
    name: str = "none"
    num_byzantine: int = 0
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class AggregatorConfig:
    """The server's rule and the number ``f`` of Byzantine clients it assumes each round.

    ``assumed_byzantine: null`` assumes the true number (``attack.num_byzantine``). With
    partial participation (``server.clients_per_round`` m < n) the rule still receives
    that number every round, the most Byzantine clients a round can hold (a round's
    actual count is not known to the server); set ``assumed_byzantine`` to assume fewer
    among the m sampled, e.g. ``f·m/n`` as the STRIKE paper's FEMNIST setting does.
    """

    name: str = "mean"
    assumed_byzantine: int | None = None
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class DiagnosticsConfig:
    """What to record beyond the metrics: ``capture_rounds`` lists the rounds (1-based)
    whose full update matrix, Byzantine mask, aggregate and rule weights are kept."""

    capture_rounds: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Config:
    """One experiment.

    ``client_parallelism`` is how many clients train at once: ``"auto"`` runs them all
    together (``vmap``) on accelerators and for dense models on a CPU, and convolutional
    models' clients one after another inside the compiled round on a CPU (``lax.map``,
    fastest there; see ``models.clients_at_once``); an integer chunks the clients.
    """

    name: str = "experiment"
    seed: int = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    server: ServerConfig = ServerConfig()
    attack: AttackConfig = AttackConfig()
    aggregator: AggregatorConfig = AggregatorConfig()
    diagnostics: DiagnosticsConfig = DiagnosticsConfig()
    client_parallelism: int | str = "auto"

    @property
    def participants(self) -> int:
        return self.server.clients_per_round or self.data.num_clients

    @property
    def assumed_byzantine(self) -> int:
        a = self.aggregator.assumed_byzantine
        return self.attack.num_byzantine if a is None else a

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def identity(self) -> dict[str, Any]:
        """``to_dict`` without the fields added after results stores existed, while they
        hold their defaults (``LATER_FIELDS``): what a result's identity is hashed from,
        so that stores written before a field existed keep their keys."""
        out = self.to_dict()
        for dotted, default in LATER_FIELDS.items():
            section, field = dotted.split(".")
            if out[section].get(field) == default:
                del out[section][field]
        return out


# Fields added to the config after results stores were written, with their defaults.
LATER_FIELDS = {"data.min_size": 0}


SECTIONS = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "server": ServerConfig,
    "attack": AttackConfig,
    "aggregator": AggregatorConfig,
    "diagnostics": DiagnosticsConfig,
}


def _plain(x):
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, tuple | list):
        return [_plain(v) for v in x]
    return x


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _section(name: str, cls, raw: Any):
    if raw is None:
        return cls()
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{name}: expected a mapping of settings, got {raw!r}.")
    fields = _fields(cls)
    raw = {k: v for k, v in raw.items() if not (k == "grid" and v is None)}
    known = {k: v for k, v in raw.items() if k in fields and k != "params"}
    # a component parameter set to null is unset (e.g. a profile dropping an inherited path)
    extra = {k: v for k, v in raw.items() if k not in fields and v is not None}
    if "params" in fields:
        params = dict(raw.get("params") or {})
        params.update(extra)
        known["params"] = params
    elif extra:
        key = sorted(extra)[0]
        raise ConfigError(f"{name}.{key}: unknown setting; allowed: {sorted(fields)}.")
    for key, value in known.items():
        _check_type(f"{name}.{key}", value, fields[key].type)
    return cls(**known)


_KINDS = {
    "int": ("an integer", is_int),
    "float": ("a number", is_number),
    "str": ("a string", lambda v: isinstance(v, str)),
    "tuple[int, ...]": (
        "a list of integers",
        lambda v: isinstance(v, list | tuple) and all(is_int(x) for x in v),
    ),
}


def _check_type(field: str, value: Any, annotation: str) -> None:
    """One ``ConfigError`` when ``value`` is not of the field's annotated type (``int``,
    ``float`` (an integer is a number too), ``str``, a list of integers, ``... | None``)."""
    optional = annotation.endswith(" | None")
    kind = _KINDS.get(annotation.removesuffix(" | None"))
    if kind is None or (value is None and optional):
        return
    if value is None or not kind[1](value):
        null = " or null" if optional else ""
        raise ConfigError(f"{field}: must be {kind[0]}{null}, got {value!r}.")


def from_dict(raw: Mapping[str, Any]) -> Config:
    """Builds a ``Config`` from plain values (one grid cell: no lists where numbers go)."""
    raw = {k: v for k, v in (raw or {}).items() if not (k == "grid" and v is None)}
    top = _fields(Config)
    for key in raw:
        if key not in top and key != "profiles":
            raise ConfigError(f"{key}: unknown section; allowed: {sorted(top)}.")
    kwargs = {k: _section(k, cls, raw.get(k)) for k, cls in SECTIONS.items()}
    for key in ("name", "seed", "client_parallelism"):
        if key in raw:
            _check_type(key, raw[key], top[key].type)
            kwargs[key] = raw[key]
    return Config(**kwargs)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML config with its ``extends:`` chain merged in (paths relative to the file)."""
    if not path.exists():
        raise ConfigError(f"config: file {str(path)!r} does not exist.")
    if path.resolve() in seen:
        chain = " -> ".join(str(p) for p in (*seen, path.resolve()))
        raise ConfigError(f"extends: the chain of configs loops ({chain}).")
    raw = parse_yaml(path.read_text(), f"config {path}") or {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config: {path} must hold a mapping of sections.")
    parent = raw.pop("extends", None)
    if not parent:
        return dict(raw)
    return merge(_read_yaml(path.parent / parent, (*seen, path.resolve())), raw)


def load_yaml(path: str | Path, profile: str | None = None) -> dict[str, Any]:
    """Reads a YAML config.

    ``extends: other.yaml`` starts from another file (deep-merged, this file winning);
    ``profile`` then overlays ``profiles: {name: {...}}`` (e.g. ``cpu``: the scaled-down
    version of a paper's setting).
    """
    return apply_profile(_read_yaml(Path(path)), profile, str(path))


def apply_profile(raw: Mapping[str, Any], profile: str | None, where: str) -> dict[str, Any]:
    """``raw`` without its ``profiles:``, overlaid with the one named ``profile`` (if any)."""
    raw = dict(raw)
    profiles = raw.pop("profiles", None) or {}
    if not isinstance(profiles, Mapping) or not all(
        isinstance(p, Mapping) for p in profiles.values()
    ):
        raise ConfigError(
            f"profiles: {where} must map profile names to settings "
            f"(e.g. profiles: {{cpu: {{server: {{rounds: 10}}}}}}), got {profiles!r}."
        )
    if profile is None:
        return raw
    if profile not in profiles:
        raise ConfigError(
            f"profile: {where} has no profile {profile!r}; allowed: {sorted(profiles) or 'none'}."
        )
    return merge(raw, profiles[profile])


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merges ``over`` into ``base`` (mappings merge, everything else replaces)."""
    out = dict(base)
    for k, v in (over or {}).items():
        out[k] = (
            merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
        )
    return out


def set_path(raw: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """Returns ``raw`` with ``a.b.c = value`` (for ``--set`` on the command line); the
    sections along the path are copied, ``raw`` is left as it was."""
    keys = dotted.split(".")
    out = node = dict(raw)
    for depth, key in enumerate(keys[:-1]):
        inner = node.get(key) or {}
        if not isinstance(inner, Mapping):
            where = ".".join(keys[: depth + 1])
            raise ConfigError(f"{dotted}: {where} holds {inner!r}, not a section of settings.")
        node[key] = node = dict(inner)
    node[keys[-1]] = value
    return out


# Settings whose value is itself a list; a list of lists makes them a grid axis.
LIST_VALUED = frozenset({"hidden", "channels", "widths", "shape", "capture_rounds"})


def grid_axes(raw: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[tuple, list]]:
    """Every ``(path, values)`` where the config holds a list, i.e. a grid axis."""
    axes = []
    for k, v in raw.items():
        path = (*prefix, k)
        if isinstance(v, Mapping):
            axes += grid_axes(v, path)
        elif isinstance(v, list):
            if k in LIST_VALUED and not (v and isinstance(v[0], list)):
                continue
            if not v:
                raise ConfigError(f"{'.'.join(path)}: an empty list gives an empty grid.")
            if path == ("name",):
                raise ConfigError(f"name: the experiment's name is one string, got {v!r}.")
            if k == "grid":  # variants may hold grids of their own: take their union
                v = [c for x in v for c, _ in (expand(x) if isinstance(x, Mapping) else [(x, 0)])]
            axes.append((path, v))
    return axes


def _get(raw: Mapping[str, Any], path: tuple) -> Any:
    for k in path:
        raw = raw.get(k) or {}
    return raw


def expand(raw: Mapping[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The grid's cells: ``[(cell_raw, {dotted.field: value}), ...]`` in product order.

    A ``grid:`` key is a list of partial settings, each merged where it stands (a union of
    variants sharing the other settings): in a section,
    ``attack: {num_byzantine: 4, grid: [{name: lie, z: 1.5}, {name: ipm, eps: 0.1}]}``;
    at the top, variants spanning sections, e.g. ``grid: [{data: {num_clients: 10},
    attack: {num_byzantine: 2}}, ...]``. ``grid: null`` removes an inherited grid.
    """
    axes = grid_axes(raw)
    cells = []
    for values in itertools.product(*(v for _, v in axes)):
        cell = dict(raw)
        variants = []
        for (path, _), value in zip(axes, values, strict=True):
            if path[-1] == "grid":
                variants.append((path[:-1], value))
            else:
                cell = set_path(cell, ".".join(path), value)
        for section, value in variants:
            where = ".".join((*section, "grid"))
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}: items must be mappings of settings, got {value!r}.")
            body = merge({k: v for k, v in _get(cell, section).items() if k != "grid"}, value)
            cell = set_path(cell, ".".join(section), body) if section else body
        label = {}
        for (path, _), value in zip(axes, values, strict=True):
            label.update(_flatten(value, path[:-1] if path[-1] == "grid" else path))
        cells.append((cell, label))
    return cells


def _flatten(value: Any, prefix: tuple[str, ...]) -> dict[str, Any]:
    """``{dotted.path: leaf}`` of a grid value (mappings spread into their fields)."""
    if not isinstance(value, Mapping):
        return {".".join(prefix): value}
    out = {}
    for k, v in value.items():
        out.update(_flatten(v, (*prefix, k)))
    return out


def check_files(cfg: Config) -> None:
    """Raises one ``ConfigError`` when a file or folder the config reads is missing (kept
    apart from ``validate``, which judges settings alone)."""
    source = data.DATASETS.entry(cfg.data.source, "data.source")
    if "path" in source.defaults:
        path = cfg.data.params.get("path", "")
        _require(
            bool(path) and Path(path).expanduser().exists(),
            "data.path",
            f"the {cfg.data.source!r} source reads a file or folder that does not exist: {path!r}.",
        )


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{field}: {message}")


def validate(cfg: Config) -> None:
    """Raises one ``ConfigError`` for the first setting that cannot work."""
    d, t, s, a = cfg.data, cfg.train, cfg.server, cfg.attack
    _require(cfg.seed >= 0, "seed", f"must be >= 0, got {cfg.seed}.")
    _require(d.seed is None or d.seed >= 0, "data.seed", f"must be >= 0 or null, got {d.seed}.")
    data.DATASETS.entry(d.source, "data.source").check_params(d.params, "data")
    data.PARTITIONERS.entry(d.partition, "data.partition")
    _require(
        isinstance(d.num_clients, int) and d.num_clients >= 1,
        "data.num_clients",
        f"must be a positive integer, got {d.num_clients!r}.",
    )
    if d.partition == "dirichlet":
        _require(
            0 < d.beta < math.inf,
            "data.beta",
            f"the Dirichlet concentration must be a finite number > 0, got {d.beta}.",
        )
        _require(d.min_size >= 0, "data.min_size", f"must be >= 0, got {d.min_size}.")
    if d.partition == "shards":
        _require(0 <= d.s <= 1, "data.s", f"the IID share must be in [0, 1], got {d.s}.")
        _require(
            d.shards_per_client >= 1,
            "data.shards_per_client",
            f"must be >= 1, got {d.shards_per_client}.",
        )
    models.MODELS.entry(cfg.model.name, "model.name").check_params(cfg.model.params, "model")
    _require(t.batch_size >= 1, "train.batch_size", f"must be >= 1, got {t.batch_size}.")
    if t.local_steps is None:
        _require(
            t.local_epochs >= 1,
            "train.local_epochs",
            f"must be >= 1, got {t.local_epochs} (or set train.local_steps).",
        )
    else:
        _require(t.local_steps >= 1, "train.local_steps", f"must be >= 1, got {t.local_steps}.")
    _require(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}.")
    _require(0 <= t.momentum < 1, "train.momentum", f"must be in [0, 1), got {t.momentum}.")
    _require(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}.")
    _require(
        t.clip_norm is None or t.clip_norm > 0,
        "train.clip_norm",
        f"must be > 0 or null (no clipping), got {t.clip_norm}.",
    )
    _require(s.rounds >= 1, "server.rounds", f"must be >= 1, got {s.rounds}.")
    _require(
        s.eval_every >= 1 and s.rounds % s.eval_every == 0,
        "server.eval_every",
        f"must be a positive divisor of server.rounds ({s.rounds}), got {s.eval_every}.",
    )
    _require(s.lr > 0, "server.lr", f"must be > 0, got {s.lr}.")
    _require(0 <= s.momentum < 1, "server.momentum", f"must be in [0, 1), got {s.momentum}.")
    m = s.clients_per_round
    _require(
        m is None or 1 <= m <= d.num_clients,
        "server.clients_per_round",
        f"must be between 1 and data.num_clients ({d.num_clients}), got {m}.",
    )
    attacks.ATTACKS.entry(a.name, "attack.name").check_params(a.params, "attack")
    _require(
        0 <= a.num_byzantine < d.num_clients,
        "attack.num_byzantine",
        f"must be in [0, {d.num_clients - 1}] for {d.num_clients} clients, got {a.num_byzantine}.",
    )
    try:
        aggregators.check(
            cfg.aggregator.name,
            cfg.participants,
            cfg.assumed_byzantine,
            cfg.aggregator.params,
            "aggregator",
        )
    except ConfigError as e:
        if cfg.participants == d.num_clients or cfg.aggregator.assumed_byzantine is not None:
            raise
        raise ConfigError(
            f"{str(e).rstrip('.')}; with {cfg.participants} of {d.num_clients} clients per "
            f"round the rule assumes all {a.num_byzantine} Byzantine clients may be sampled: "
            "set aggregator.assumed_byzantine for the sampled clients."
        ) from None
    caps = cfg.diagnostics.capture_rounds
    _require(
        all(isinstance(c, int) and 1 <= c <= s.rounds for c in caps),
        "diagnostics.capture_rounds",
        f"must be round numbers between 1 and server.rounds ({s.rounds}), got {list(caps)}.",
    )
    cp = cfg.client_parallelism
    _require(
        cp == "auto" or (isinstance(cp, int) and cp >= 1),
        "client_parallelism",
        f"must be 'auto' or a positive integer, got {cp!r}.",
    )


def local_steps_max(cfg: Config, m_max: int) -> int:
    """Most local steps any client takes (the static trip-count bound)."""
    t = cfg.train
    return t.local_steps or t.local_epochs * math.ceil(max(m_max, 1) / t.batch_size)
