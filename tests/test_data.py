"""Data sources, partitioners and the padded ClientData block."""

import json
import os
import zipfile

import numpy as np
import pytest
from PIL import Image

from fedjax_byz import ConfigError
from fedjax_byz import data as data_lib

LABELS = np.repeat(np.arange(10), 100)  # 1,000 examples, 10 balanced classes


def _check_exact_cover(parts, total):
    allidx = np.concatenate(parts)
    assert len(allidx) == total
    np.testing.assert_array_equal(np.sort(allidx), np.arange(total))


@pytest.mark.parametrize(
    "name,params",
    [
        ("iid", {}),
        ("dirichlet", {"beta": 0.1}),
        ("dirichlet", {"beta": 5.0}),
        ("shards", {"s": 0.3}),
        ("shards", {"s": 0.0, "shards_per_client": 3}),
    ],
)
def test_partition_assigns_every_example_once_and_is_reproducible(name, params):
    parts = data_lib.partition(name, LABELS, 20, seed=3, **params)
    assert len(parts) == 20
    _check_exact_cover(parts, len(LABELS))
    again = data_lib.partition(name, LABELS, 20, seed=3, **params)
    for a, b in zip(parts, again, strict=True):
        np.testing.assert_array_equal(a, b)
    other = data_lib.partition(name, LABELS, 20, seed=4, **params)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def _top_class_share(parts):
    shares = [np.bincount(LABELS[p], minlength=10).max() / len(p) for p in parts if len(p)]
    return float(np.mean(shares))


def test_dirichlet_skew_follows_beta():
    skewed = _top_class_share(data_lib.partition("dirichlet", LABELS, 10, 0, beta=0.05))
    mild = _top_class_share(data_lib.partition("dirichlet", LABELS, 10, 0, beta=1000.0))
    assert skewed > 0.5  # a client's data is dominated by one class
    assert mild < 0.2  # close to the uniform 0.1


def test_dirichlet_min_size_redraws_until_no_client_is_small():
    plain = data_lib.partition("dirichlet", LABELS, 40, 0, beta=0.07)
    assert min(len(p) for p in plain) == 0  # the plain draw leaves clients empty here
    first = data_lib.partition("dirichlet", LABELS, 40, 0, beta=0.07, min_size=0)
    assert all(np.array_equal(a, b) for a, b in zip(plain, first, strict=True))
    parts = data_lib.partition("dirichlet", LABELS, 40, 0, beta=0.07, min_size=3)
    assert min(len(p) for p in parts) >= 3
    _check_exact_cover(parts, len(LABELS))
    again = data_lib.partition("dirichlet", LABELS, 40, 0, beta=0.07, min_size=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    for impossible in (len(LABELS), 20):  # more than the data holds; no draw reaches it
        with pytest.raises(ConfigError, match="data.min_size"):
            data_lib.partition("dirichlet", LABELS, 40, 0, beta=0.07, min_size=impossible)
    with pytest.raises(ConfigError, match="data.min_size"):
        data_lib.partition("dirichlet", LABELS, 40, 0, beta=0.07, min_size=-1)


def test_shards_without_iid_share_gives_few_labels_per_client():
    parts = data_lib.partition("shards", LABELS, 10, 0, s=0.0)
    labels_per_client = [len(np.unique(LABELS[p])) for p in parts]
    assert max(labels_per_client) <= 2 * 2  # 2 shards, each spanning at most 2 labels
    iid_parts = data_lib.partition("shards", LABELS, 10, 0, s=1.0)
    assert min(len(np.unique(LABELS[p])) for p in iid_parts) >= 8


def test_natural_partition_keeps_groups():
    groups = np.repeat(np.arange(5), 200)
    parts = data_lib.partition("natural", LABELS, 5, 0, groups=groups)
    assert sorted(len(np.unique(groups[p])) for p in parts) == [1] * 5
    _check_exact_cover(parts, len(LABELS))
    with pytest.raises(ConfigError, match="data.num_clients"):
        data_lib.partition("natural", LABELS, 6, 0, groups=groups)
    with pytest.raises(ConfigError, match="data.partition"):
        data_lib.partition("natural", LABELS, 5, 0)


def test_partition_bad_input():
    with pytest.raises(ConfigError, match="data.beta"):
        data_lib.partition("dirichlet", LABELS, 10, 0, beta=0.0)
    for beta in (float("inf"), float("nan"), -1.0):  # inf used to give NaN shares
        with pytest.raises(ConfigError, match="data.beta: .*finite number > 0"):
            data_lib.partition("dirichlet", LABELS, 10, 0, beta=beta)
        with pytest.raises(ConfigError, match="data.beta"):  # the partitioner itself checks
            data_lib.PARTITIONERS.entry("dirichlet").factory(LABELS, 10, 0, beta=beta)
    for share in (float("nan"), float("inf"), -0.1, 1.5):
        with pytest.raises(ConfigError, match=r"data.s: .*in \[0, 1\]"):
            data_lib.partition("shards", LABELS, 10, 0, s=share)
    for k in (0, -2):  # used to be numpy's "number sections must be larger than 0"
        with pytest.raises(ConfigError, match="data.shards_per_client: must be an integer >= 1"):
            data_lib.partition("shards", LABELS, 10, 0, shards_per_client=k)
    with pytest.raises(ConfigError, match="data.num_clients"):
        data_lib.partition("iid", LABELS, 0, 0)
    with pytest.raises(ConfigError, match="unknown partition 'dirichlt'.*dirichlet"):
        data_lib.partition("dirichlt", LABELS, 10, 0)


def test_client_data_pads_and_counts():
    ds = data_lib.load("synthetic", num_train=50, num_test=10, shape=(4, 4, 1))
    parts = [np.arange(0, 3), np.arange(3, 50)]
    cd = data_lib.ClientData.from_partition(ds, parts)
    assert cd.x.shape == (2, 47, 4, 4, 1)
    np.testing.assert_array_equal(cd.counts, [3, 47])
    np.testing.assert_array_equal(cd.x[0, :3], ds.x_train[:3])
    assert not np.any(np.asarray(cd.x[0, 3:]))
    hist = cd.label_histogram()
    assert hist.sum() == 50


def test_digits_source():
    ds = data_lib.load("digits")
    assert ds.x_train.shape[1:] == (8, 8, 1) and ds.num_classes == 10
    assert len(ds.x_train) + len(ds.x_test) == 1797


def _write_images(root, fmt):
    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("test", 2)):
        for cls in ("cat", "ant"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                img = rng.integers(0, 255, (6, 5, 3), dtype=np.uint8)
                Image.fromarray(img).save(folder / f"{i}.{fmt}")


@pytest.mark.parametrize("as_zip", [False, True])
def test_imagefolder_dir_and_zip_with_cache(tmp_path, as_zip):
    root = tmp_path / "imgs"
    _write_images(root, "png")
    path = root
    if as_zip:
        path = tmp_path / "imgs.zip"
        with zipfile.ZipFile(path, "w") as z:
            for f in root.rglob("*.png"):
                z.write(f, f.relative_to(root).as_posix())
    ds = data_lib.load("imagefolder", path=str(path))
    assert ds.x_train.shape == (6, 6, 5, 3) and ds.x_train.dtype == np.uint8
    assert ds.num_classes == 2
    np.testing.assert_array_equal(np.bincount(ds.y_train), [3, 3])  # 'ant' = 0, 'cat' = 1
    png = np.asarray(Image.open(root / "train" / "ant" / "0.png"))
    np.testing.assert_array_equal(ds.x_train[0], png)  # lossless PNG round trip
    caches = list(tmp_path.glob("*.npz"))
    assert len(caches) == 1  # decoded once, cached beside the data
    again = data_lib.load("imagefolder", path=str(path))
    np.testing.assert_array_equal(again.x_test, ds.x_test)


def test_imagefolder_read_only_folder_uses_cache_dir(tmp_path, monkeypatch):
    root = tmp_path / "imgs"
    _write_images(root, "jpg")
    monkeypatch.setattr(data_lib.sources.os, "access", lambda *a: False)
    ds = data_lib.load("imagefolder", path=str(root), cache_dir=str(tmp_path / "cache"))
    assert ds.x_test.shape == (4, 6, 5, 3)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1


def test_imagefolder_never_writes_into_a_read_only_folder(tmp_path, monkeypatch):
    """Even as root (who may write anywhere) a folder whose mode is read-only, like the
    shared datasets folder, gets no cache file: it goes to $FEDJAX_BYZ_CACHE."""
    shared = tmp_path / "shared"
    _write_images(shared / "imgs", "png")
    shared.chmod(0o555)
    monkeypatch.setenv("FEDJAX_BYZ_CACHE", str(tmp_path / "cache"))
    try:
        data_lib.load("imagefolder", path=str(shared / "imgs"))
        assert sorted(p.name for p in shared.iterdir()) == ["imgs"]
        assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    finally:
        shared.chmod(0o755)


def test_imagefolder_missing_path():
    with pytest.raises(ConfigError, match="data.path"):
        data_lib.load("imagefolder", path="/nonexistent/cifar.zip")


def test_femnist_leaf_json(tmp_path):
    rng = np.random.default_rng(0)
    for split, per_user in (("train", 4), ("test", 2)):
        (tmp_path / split).mkdir()
        users = ["f0001_00", "f0002_11", "f0003_22"]
        blob = {
            "users": users,
            "num_samples": [per_user] * 3,
            "user_data": {
                u: {
                    "x": rng.random((per_user, 784)).round(3).tolist(),
                    "y": rng.integers(0, 62, per_user).tolist(),
                }
                for u in users
            },
        }
        (tmp_path / split / "all_data_0.json").write_text(json.dumps(blob))
    ds = data_lib.load("femnist", path=str(tmp_path))
    assert ds.x_train.shape == (12, 28, 28, 1) and ds.num_classes == 62
    np.testing.assert_array_equal(ds.groups, np.repeat([0, 1, 2], 4))
    parts = data_lib.partition("natural", ds.y_train, 3, 0, groups=ds.groups)
    assert [len(p) for p in parts] == [4, 4, 4]


def test_tfds_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        for name, shape, classes in (
            ("mnist", (28, 28, 1), 10),
            ("cifar10", (32, 32, 3), 10),
            ("emnist", (28, 28, 1), 62),
        ):
            ds = data_lib.load("tfds", name=name)
            assert ds.x_train.shape == (12, *shape) and ds.x_train.dtype == np.uint8
            assert ds.num_classes == classes and ds.y_train.dtype == np.int32
    with pytest.raises(ConfigError, match="data.name"):
        data_lib.load("tfds", name="imagenet")


def test_arrays_source(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "mine.npz"
    np.savez(
        path,
        x_train=rng.random((30, 5, 5)).astype(np.float32),
        y_train=rng.integers(0, 3, 30),
        x_test=rng.random((6, 5, 5)).astype(np.float32),
        y_test=rng.integers(0, 3, 6),
        groups=np.repeat(np.arange(3), 10),
    )
    ds = data_lib.load("arrays", path=str(path))
    assert ds.x_train.shape == (30, 5, 5, 1) and ds.num_classes == 3
    assert len(data_lib.partition("natural", ds.y_train, 3, 0, groups=ds.groups)) == 3
    np.savez(path, x_train=np.zeros((2, 3, 3)))
    with pytest.raises(ConfigError, match="data.path.*lacks"):
        data_lib.load("arrays", path=str(path))


def _png(path, shape=(6, 5, 3), value=None, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, shape, dtype=np.uint8) if value is None else np.full(shape, value)
    Image.fromarray(img.astype(np.uint8)).save(path)


def test_imagefolder_dir_cache_sees_overwritten_and_added_images(tmp_path):
    root = tmp_path / "imgs"
    _write_images(root, "png")
    first = data_lib.load("imagefolder", path=str(root))
    assert len(first.x_train) == 6
    # Overwrite an image (its folder's and the top folder's size and mtime stay the same)...
    target = root / "train" / "ant" / "0.png"
    _png(target, value=7)
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a later mtime, surely
    again = data_lib.load("imagefolder", path=str(root))
    assert np.all(again.x_train[0] == 7)  # not the stale cached pixels
    # ... and add one.
    _png(root / "train" / "cat" / "9.png")
    added = data_lib.load("imagefolder", path=str(root))
    assert len(added.x_train) == 7
    np.testing.assert_array_equal(np.bincount(added.y_train), [3, 4])


def test_imagefolder_concurrent_cache_writes_are_harmless(tmp_path, monkeypatch):
    root = tmp_path / "imgs"
    _write_images(root, "png")
    real_savez, nested = np.savez, []

    def savez(file, *args, **kwargs):
        real_savez(file, *args, **kwargs)
        if not nested:  # another process decodes and caches the same folder meanwhile
            nested.append(None)
            nested[0] = data_lib.load("imagefolder", path=str(root))

    monkeypatch.setattr(np, "savez", savez)
    ds = data_lib.load("imagefolder", path=str(root))
    np.testing.assert_array_equal(ds.x_train, nested[0].x_train)
    assert len(list(tmp_path.glob("*.npz"))) == 1
    leftovers = [f for f in tmp_path.iterdir() if f.name != "imgs" and f.suffix != ".npz"]
    assert leftovers == []  # no temporary file left behind


def _zip_folder(root, path, extra=()):
    with zipfile.ZipFile(path, "w") as z:
        for f in sorted(root.rglob("*")):
            if f.is_file():
                z.write(f, "top/" + f.relative_to(root).as_posix())
        for name, payload in extra:
            z.writestr(name, payload)


def test_imagefolder_ignores_other_folders_and_macos_entries(tmp_path):
    root = tmp_path / "imgs"
    _write_images(root, "png")
    _png(root / "README" / "notes" / "a.png")  # not a split
    _png(root / "val" / "zzz" / "0.png")  # a split we do not read
    (root / "train" / "bee").mkdir()  # empty class folders: ignored, as before
    (root / "test" / "bee").mkdir()
    (root / "train" / "ant" / ".DS_Store").write_bytes(b"\0junk")
    (root / "train" / "ant" / "._0.png").write_bytes(b"\0junk")
    path = tmp_path / "imgs.zip"
    _zip_folder(root, path, [("__MACOSX/top/train/ant/._0.png", b"\0junk")])
    for p in (root, path):
        ds = data_lib.load("imagefolder", path=str(p))
        assert ds.num_classes == 2
        assert ds.x_train.shape == (6, 6, 5, 3) and ds.x_test.shape == (4, 6, 5, 3)
        np.testing.assert_array_equal(ds.y_train, [0, 0, 0, 1, 1, 1])  # ant, cat
        np.testing.assert_array_equal(ds.y_test, [0, 0, 1, 1])


def test_imagefolder_bad_images(tmp_path):
    root = tmp_path / "imgs"
    _write_images(root, "png")
    (root / "train" / "ant" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError, match="data.path: cannot decode image .*broken.png"):
        data_lib.load("imagefolder", path=str(root))
    (root / "train" / "ant" / "broken.png").unlink()
    _png(root / "test" / "cat" / "big.png", shape=(8, 7, 3))
    with pytest.raises(ConfigError, match="data.path: image .*big.png.* is 7x8 .* is 5x6"):
        data_lib.load("imagefolder", path=str(root))


def test_imagefolder_class_without_train_images(tmp_path):
    root = tmp_path / "imgs"
    _write_images(root, "png")
    _png(root / "test" / "bee" / "0.png")  # labels would shift between train and test
    (root / "train" / "bee").mkdir()
    with pytest.raises(ConfigError, match="data.path: class folder.*'bee'.*no train images"):
        data_lib.load("imagefolder", path=str(root))


def test_imagefolder_needs_both_splits(tmp_path):
    _png(tmp_path / "imgs" / "train" / "ant" / "0.png")
    with pytest.raises(ConfigError, match="data.path: .* no images in a 'test' split"):
        data_lib.load("imagefolder", path=str(tmp_path / "imgs"))
    assert not list(tmp_path.glob("*.npz"))  # nothing cached


def test_labels_must_lie_below_num_classes(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "mine.npz"
    x = rng.random((12, 4, 4)).astype(np.float32)
    np.savez(
        path, x_train=x, y_train=np.arange(12) % 6, x_test=x[:3], y_test=[0, 1, 2], num_classes=3
    )
    with pytest.raises(ConfigError, match=r"data.num_classes: .*num_classes=3.*y_train 0..5"):
        data_lib.load("arrays", path=str(path))
    with pytest.raises(ConfigError, match=r"data.num_classes: .*y_test -1..0"):
        data_lib.Dataset(
            "d",
            x[..., None],
            np.zeros(12, np.int32),
            x[:2, ..., None],
            np.array([0, -1], np.int32),
            2,
        )


def _write_leaf(root, num_labels):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        (root / split).mkdir()
        blob = {
            "users": ["u0"],
            "num_samples": [4],
            "user_data": {
                "u0": {"x": rng.random((4, 784)).round(2).tolist(), "y": [0, 1, 2, num_labels - 1]}
            },
        }
        (root / split / "all_data_0.json").write_text(json.dumps(blob))


def test_femnist_labels_checked_against_num_classes(tmp_path):
    _write_leaf(tmp_path, 62)
    assert data_lib.load("femnist", path=str(tmp_path)).num_classes == 62
    with pytest.raises(ConfigError, match=r"data.num_classes: .*num_classes=10.*0..61"):
        data_lib.load("femnist", path=str(tmp_path), num_classes=10)


def test_tfds_not_available_offline(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")

    def offline(self, *args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
    with pytest.raises(ConfigError, match="data.name: TFDS dataset 'mnist' is not available off"):
        data_lib.load("tfds", name="mnist", data_dir=str(tmp_path))
