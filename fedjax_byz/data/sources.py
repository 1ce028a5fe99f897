"""Where examples come from: bundled digits, image folders/zips, TFDS, LEAF FEMNIST, synthetic.

Every source returns a ``Dataset`` of numpy arrays (images as ``[N, H, W, C]``, uint8 or
float32) that the partitioners split among clients. Sources are registered by name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import uuid
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from fedjax_byz.registry import ConfigError, Registry

DATASETS = Registry("dataset")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled train/test split.

    Attributes:
      name: where it came from.
      x_train: ``[N, H, W, C]`` images (uint8 or float32).
      y_train: int32 ``[N]`` labels in ``[0, num_classes)``.
      x_test: ``[N_test, H, W, C]``.
      y_test: int32 ``[N_test]``.
      num_classes: number of classes ``C``.
      groups: int32 ``[N]`` natural client of every training example (e.g. the FEMNIST
        writer), or None when the source has none.
      mean: per-channel mean of the training pixels (float32 ``[C]``), for normalisation.
      std: per-channel standard deviation (float32 ``[C]``).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    groups: np.ndarray | None = None
    mean: np.ndarray = dataclasses.field(default=None)
    std: np.ndarray = dataclasses.field(default=None)

    def __post_init__(self):
        _check_labels(self)
        if self.mean is None:
            axes = tuple(range(self.x_train.ndim - 1))
            x = self.x_train.astype(np.float64)
            object.__setattr__(self, "mean", x.mean(axes).astype(np.float32))
            object.__setattr__(self, "std", np.maximum(x.std(axes), 1e-6).astype(np.float32))

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def _check_labels(ds: Dataset) -> None:
    """Raises ``ConfigError`` unless every train and test label lies in
    ``[0, num_classes)``: a label outside it trains on a garbage target or a NaN loss."""
    k = ds.num_classes
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ConfigError(f"data.num_classes: must be a positive integer, got {k!r}.")
    found = {
        split: (int(y.min()), int(y.max()))
        for split, y in (("y_train", np.asarray(ds.y_train)), ("y_test", np.asarray(ds.y_test)))
        if y.size
    }
    bad = {split: r for split, r in found.items() if r[0] < 0 or r[1] >= k}
    if bad:
        spans = ", ".join(f"{split} {lo}..{hi}" for split, (lo, hi) in found.items())
        raise ConfigError(
            f"data.num_classes: {ds.name!r} has num_classes={k}, so labels must lie in "
            f"0..{k - 1}, but its labels span {spans}."
        )


def _as_images(x: np.ndarray) -> np.ndarray:
    """Adds a channel axis to ``[N, H, W]`` grey images."""
    return x[..., None] if x.ndim == 3 else x


@DATASETS.register("digits")
def digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's bundled handwritten digits: 1,797 8×8 images, 10 classes.

    A stratified ``test_fraction`` is held out (seeded), the rest is for the clients.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = _as_images(bunch.images.astype(np.float32))
    y = bunch.target.astype(np.int32)
    xtr, xte, ytr, yte = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return Dataset("digits", xtr, ytr, xte, yte, 10)


@DATASETS.register("synthetic")
def synthetic(
    num_train: int = 1000,
    num_test: int = 200,
    num_classes: int = 10,
    shape: tuple[int, ...] = (8, 8, 1),
    separation: float = 2.0,
    seed: int = 0,
) -> Dataset:
    """Gaussian class clusters ``x = separation·μ_y + ε``, ``ε ~ N(0, I)``, for tests."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((num_classes, *shape)).astype(np.float32)

    def draw(m):
        y = rng.integers(0, num_classes, m).astype(np.int32)
        x = separation * centers[y] + rng.standard_normal((m, *shape)).astype(np.float32)
        return x, y

    (xtr, ytr), (xte, yte) = draw(num_train), draw(num_test)
    return Dataset("synthetic", xtr, ytr, xte, yte, num_classes)


SPLITS = ("train", "test")


def _image_entries(names: Iterable[str]) -> list[tuple[str, str, str]]:
    """The images that are decoded, as sorted ``(split, class, name)``.

    Only ``[prefix/]{train,test}/<class>/<file>.{png,jpg,jpeg}``: other folders (``val/``,
    ``README/``), macOS ``__MACOSX/`` entries and dot-files or dot-folders are left out.
    """
    out = []
    for name in names:
        parts = [q for q in name.split("/") if q not in ("", ".")]
        if len(parts) < 3 or any(q.startswith(".") or q == "__MACOSX" for q in parts):
            continue
        if parts[-3] in SPLITS and parts[-1].lower().endswith(IMAGE_SUFFIXES):
            out.append((parts[-3], parts[-2], name))
    return sorted(out)


def _writable(folder: Path) -> bool:
    """Whether to write a cache into ``folder``: we may, and its mode does not mark it
    read-only (root may write anywhere, yet a read-only shared data folder stays as is)."""
    return os.access(folder, os.W_OK) and bool(folder.stat().st_mode & 0o222)


def _cache_file(path: Path, entries: list[tuple[str, str, str]], cache_dir: str | None) -> Path:
    """``<data>.<hash>.npz`` beside the data when writable (``_writable``), else under the
    user's cache dir.

    A zip is keyed on its size and modification time; a directory's own ones do not change
    when the images inside it are overwritten, so it is keyed on the relative path, size
    and modification time of every image that is decoded.
    """
    if path.is_dir():
        tag = hashlib.sha1(f"{path.resolve()}:dir".encode())
        for _, _, name in entries:
            st = (path / name).stat()
            tag.update(f"\0{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    else:
        st = path.stat()
        tag = hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    name = f"{path.name}.{tag.hexdigest()[:10]}.npz"
    if cache_dir is None and _writable(path.parent):
        return path.parent / name
    root = Path(cache_dir or os.environ.get("FEDJAX_BYZ_CACHE", "~/.cache/fedjax_byz"))
    root = root.expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root / name


def _read_cache(cache: Path) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when there are none or they are incomplete (a cache
    written before the split check) or unreadable."""
    try:
        with np.load(cache) as z:
            arrays = dict(z)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None
    keys = {"classes", *(f"{a}_{s}" for a in "xy" for s in SPLITS)}
    return arrays if keys <= set(arrays) else None


def _write_cache(cache: Path, arrays: dict[str, np.ndarray]) -> None:
    """Writes ``arrays`` to a temporary file of its own, then renames it to ``cache``
    (atomic): processes decoding the same folder at once each write their own file, and
    the last rename wins with the same content."""
    tmp = cache.with_name(f".{cache.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, cache)
    finally:
        tmp.unlink(missing_ok=True)


def _read_image_folder(
    path: Path, entries: list[tuple[str, str, str]], read: Callable[[str], bytes]
) -> dict[str, np.ndarray]:
    """Decodes ``entries`` (from ``_image_entries``) to ``x_<split>``, ``y_<split>`` and
    ``classes``, the sorted union of the train and test class folders."""
    from PIL import Image

    if not entries:
        raise ConfigError(f"data.path: {path} holds no train|test/<class>/*.png|jpg images.")
    for split in SPLITS:
        if not any(s == split for s, _, _ in entries):
            raise ConfigError(f"data.path: {path} has no images in a {split!r} split folder.")
    classes = sorted({c for _, c, _ in entries})
    untrained = sorted(set(classes) - {c for s, c, _ in entries if s == "train"})
    if untrained:
        raise ConfigError(
            f"data.path: class folder(s) {untrained} of {path} have test images but no "
            "train images; every class needs train images."
        )
    label = {c: i for i, c in enumerate(classes)}
    first = None  # (name, shape) of the first image, which all others must match
    arrays = {"classes": np.array(classes)}
    for split in SPLITS:
        images, labels = [], []
        for _, c, name in (e for e in entries if e[0] == split):
            try:
                with Image.open(io.BytesIO(read(name))) as img:
                    x = np.asarray(img.convert("RGB"))
            except Exception as e:
                raise ConfigError(
                    f"data.path: cannot decode image {name!r} in {path} ({e})."
                ) from e
            if first is None:
                first = (name, x.shape)
            elif x.shape != first[1]:
                raise ConfigError(
                    f"data.path: image {name!r} in {path} is {x.shape[1]}x{x.shape[0]} "
                    f"(width x height) but {first[0]!r} is {first[1][1]}x{first[1][0]}; "
                    "all images must have the same size (resize them first)."
                )
            images.append(x)
            labels.append(label[c])
        arrays[f"x_{split}"] = np.stack(images).astype(np.uint8)
        arrays[f"y_{split}"] = np.array(labels, np.int32)
    return arrays


@DATASETS.register("imagefolder")
def imagefolder(path: str = "", grayscale: bool = False, cache_dir: str | None = None) -> Dataset:
    """Images laid out as ``train/<class>/*.jpg`` and ``test/<class>/*.jpg``.

    ``path`` is a directory or a ``.zip`` (e.g. ``../shared/datasets/cifar10_jpeg.zip``),
    possibly with a top folder above ``train/`` and ``test/``; other folders, ``__MACOSX/``
    and dot-files are ignored. Classes are the sorted union of the train and test class
    folder names; every class needs train images, and all images the same size. Images
    are decoded once and cached as arrays in ``<path>.<hash>.npz`` beside the data, or
    under ``cache_dir`` / ``$FEDJAX_BYZ_CACHE`` / ``~/.cache/fedjax_byz`` when that folder
    is read-only.
    """
    p = Path(path).expanduser()
    if not path or not p.exists():
        raise ConfigError(f"data.path: image folder or zip {path!r} does not exist.")
    with contextlib.ExitStack() as stack:
        if p.is_dir():
            names = [f.relative_to(p).as_posix() for f in p.rglob("*") if f.is_file()]

            def read(name):
                return (p / name).read_bytes()
        else:
            try:
                archive = stack.enter_context(zipfile.ZipFile(p))
            except zipfile.BadZipFile as e:
                raise ConfigError(f"data.path: {path!r} is neither a folder nor a zip.") from e
            names = [i.filename for i in archive.infolist() if not i.is_dir()]
            read = archive.read
        entries = _image_entries(names)
        cache = _cache_file(p, entries, cache_dir)
        arrays = _read_cache(cache)
        if arrays is None:
            arrays = _read_image_folder(p, entries, read)
            _write_cache(cache, arrays)
    x_tr, x_te = arrays["x_train"], arrays["x_test"]
    if grayscale:
        w = np.array([0.299, 0.587, 0.114], np.float32)
        x_tr, x_te = (np.round(x @ w)[..., None].astype(np.uint8) for x in (x_tr, x_te))
    return Dataset(p.stem, x_tr, arrays["y_train"], x_te, arrays["y_test"], len(arrays["classes"]))


@DATASETS.register("arrays")
def arrays(path: str = "") -> Dataset:
    """Your own arrays: a ``.npz`` holding ``x_train``, ``y_train``, ``x_test``, ``y_test``
    (images ``[N, H, W]`` or ``[N, H, W, C]``, integer labels) and optionally ``groups``
    (the natural client of every training example) and ``num_classes``."""
    p = Path(path).expanduser()
    if not path or not p.is_file():
        raise ConfigError(f"data.path: arrays file {path!r} does not exist.")
    with np.load(p) as z:
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in z.files]
        if missing:
            raise ConfigError(
                f"data.path: {path} lacks {missing}; it needs x_train, y_train, x_test, y_test."
            )
        y_tr, y_te = z["y_train"].astype(np.int32), z["y_test"].astype(np.int32)
        num_classes = (
            int(z["num_classes"])
            if "num_classes" in z.files
            else int(max(y_tr.max(), y_te.max()) + 1)
        )
        groups = z["groups"].astype(np.int32) if "groups" in z.files else None
        return Dataset(
            p.stem,
            _as_images(z["x_train"]),
            y_tr,
            _as_images(z["x_test"]),
            y_te,
            num_classes,
            groups,
        )


TFDS_NAMES = ("mnist", "fashion_mnist", "cifar10", "svhn_cropped", "emnist")


@DATASETS.register("tfds")
def tfds(name: str = "mnist", data_dir: str | None = None) -> Dataset:
    """A TensorFlow Datasets image classification set (``mnist``, ``fashion_mnist``,
    ``cifar10``, ``svhn_cropped``, ``emnist``), read whole into numpy.

    Uses ``tfds.data_source`` (random access to ArrayRecord files), which needs
    ``tensorflow-datasets`` but not TensorFlow: ``pip install 'fedjax_byz[tfds]'``. The
    first use downloads and prepares the dataset (internet or a prepared ``data_dir``);
    when that fails (offline), one ``ConfigError`` says how to provide it.
    """
    if name not in TFDS_NAMES:
        raise ConfigError(f"data.name: unknown TFDS dataset {name!r}; allowed: {TFDS_NAMES}.")
    try:
        import tensorflow_datasets as tfds_lib
    except ImportError as e:
        raise ConfigError(
            "data.source: 'tfds' needs tensorflow-datasets; "
            "install it with pip install 'fedjax_byz[tfds]'."
        ) from e

    builder = tfds_lib.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        try:
            builder.download_and_prepare()
        except Exception as e:
            root = builder.data_dir_root
            raise ConfigError(
                f"data.name: TFDS dataset {name!r} is not available offline in {root} and "
                f"could not be downloaded ({type(e).__name__}: {e}); download it first with "
                f"`tfds build {name} --data_dir {root}` on a machine with internet and copy "
                "the folder here, or set data.data_dir to a folder that holds it."
            ) from e

    def read(split):
        source = tfds_lib.data_source(name, split=split, data_dir=data_dir, download=False)
        examples = [source[i] for i in range(len(source))]
        x = np.stack([np.asarray(e["image"]) for e in examples])
        y = np.array([e["label"] for e in examples], np.int32)
        return _as_images(x), y

    (xtr, ytr), (xte, yte) = read("train"), read("test")
    num_classes = builder.info.features["label"].num_classes
    return Dataset(name, xtr, ytr, xte, yte, num_classes)


def _read_leaf(folder: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    xs, ys, users = [], [], []
    for file in sorted(folder.glob("*.json")):
        blob = json.loads(file.read_text())
        for user in blob["users"]:
            data = blob["user_data"][user]
            xs.append(np.asarray(data["x"], np.float32).reshape(-1, 28, 28, 1))
            ys.append(np.asarray(data["y"], np.int32))
            users.extend([user] * len(data["y"]))
    if not xs:
        raise ConfigError(f"data.path: no LEAF *.json files in {folder}.")
    return np.concatenate(xs), np.concatenate(ys), users


@DATASETS.register("femnist")
def femnist(path: str = "", num_classes: int = 62) -> Dataset:
    """LEAF FEMNIST (Caldas et al., 2018) from its JSON files, grouped by writer.

    ``path`` holds ``train/*.json`` and ``test/*.json`` as LEAF's preprocessing writes
    them (``{"users": [...], "user_data": {user: {"x": [[784 floats]], "y": [...]}}}``).
    ``groups`` maps every training example to its writer, for the ``natural`` partition.
    """
    root = Path(path).expanduser()
    if not path or not (root / "train").is_dir() or not (root / "test").is_dir():
        raise ConfigError(f"data.path: {path!r} must hold LEAF train/ and test/ folders.")
    xtr, ytr, users = _read_leaf(root / "train")
    xte, yte, _ = _read_leaf(root / "test")
    writers = {u: i for i, u in enumerate(dict.fromkeys(users))}
    groups = np.array([writers[u] for u in users], np.int32)
    return Dataset("femnist", xtr, ytr, xte, yte, num_classes, groups)


def load(source: str, **params) -> Dataset:
    """Loads the dataset registered as ``source`` with ``params``."""
    entry = DATASETS.entry(source, "data.source")
    entry.check_params(params, "data")
    return entry.factory(**params)
