"""Tests for raykfe.data: digits, fake CIFAR trees, image folders, synthetic data, loaders."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from raykfe.data import DataSplits, list_datasets, load_data, make_loader
from raykfe.errors import ConfigError, DataError

CIFAR10_MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
CIFAR10_STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def _all_indices(splits: DataSplits) -> list[np.ndarray]:
    return [s.indices.numpy() for s in (splits.train, splits.val, splits.test)]


# --------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits() -> DataSplits:
    return load_data("digits", seed=0)


def test_digits_splits_partition_the_data(digits: DataSplits) -> None:
    train, val, test = _all_indices(digits)
    assert len(train) + len(val) + len(test) == 1797
    assert (len(test), len(val)) == (359, 180)  # 20 % and 10 % of the whole
    assert np.array_equal(np.sort(np.concatenate([train, val, test])), np.arange(1797))
    assert digits.num_classes == 10
    assert digits.input_shape == (3, 32, 32)
    assert digits.name == "digits"


def test_digits_split_is_stratified(digits: DataSplits) -> None:
    counts_all = np.bincount(
        np.concatenate([s.labels.numpy() for s in (digits.train, digits.val, digits.test)]),
        minlength=10,
    )
    counts_test = np.bincount(digits.test.labels.numpy(), minlength=10)
    assert np.all(np.abs(counts_test - 0.2 * counts_all) <= 1.5)


def test_digits_split_depends_only_on_seed(digits: DataSplits) -> None:
    again = load_data("digits", seed=0)
    for a, b in zip(_all_indices(digits), _all_indices(again)):
        assert np.array_equal(a, b)
    other = load_data("digits", seed=1)
    assert not np.array_equal(_all_indices(digits)[2], _all_indices(other)[2])


def test_digits_items_and_normalisation(digits: DataSplits) -> None:
    x, y = digits.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert y.shape == () and y.dtype == torch.int64
    assert 0 <= int(y) < 10
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])  # grey replicated
    train_x = torch.stack([digits.train[i][0] for i in range(len(digits.train))])
    assert train_x.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (train_x.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-3
    assert int(digits.test[5][1]) == int(digits.test.labels[5])


def test_digits_matches_sklearn_source(digits: DataSplits) -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    i = 7
    src = int(digits.test.indices[i])
    assert int(digits.test[i][1]) == int(bunch.target[src])
    small = load_data("digits", image_size=8, seed=0)
    j = int(np.flatnonzero(small.test.indices.numpy() == src)[0])
    x = small.test[j][0][0].numpy()
    raw = bunch.images[src] / 16.0
    # normalisation is affine with a positive scale: the pixel order is preserved exactly
    corr = np.corrcoef(x.ravel(), raw.ravel())[0, 1]
    assert corr > 0.9999


def test_digits_image_size_and_augment() -> None:
    splits = load_data("digits", image_size=16, augment=True, seed=3)
    assert splits.input_shape == (3, 16, 16)
    assert splits.train[0][0].shape == (3, 16, 16)
    torch.manual_seed(0)
    stored = splits.train.images[0]
    draws = [splits.train[0][0] for _ in range(20)]
    assert any(not torch.equal(d, stored) for d in draws)
    assert all(torch.equal(splits.val[0][0], splits.val.images[0]) for _ in range(3))


def test_empty_split_is_a_data_error() -> None:
    with pytest.raises(DataError, match="val"):
        load_data("digits", val_fraction=0.0)
    with pytest.raises(DataError):
        load_data("synthetic", synthetic_size=3, val_fraction=0.1, test_fraction=0.1)


def test_bad_fractions_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        load_data("digits", val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ConfigError):
        load_data("digits", test_fraction=-0.1)


def test_unknown_dataset() -> None:
    with pytest.raises(ConfigError) as info:
        load_data("mnist")
    msg = str(info.value)
    assert "'mnist'" in msg and "\n" not in msg
    for name in list_datasets():
        assert name in msg


def test_num_classes_mismatch() -> None:
    with pytest.raises(ConfigError, match="10 classes"):
        load_data("digits", num_classes=5)


# --------------------------------------------------------------------------- synthetic


def test_synthetic_is_seeded_and_learnable() -> None:
    splits = load_data("synthetic", synthetic_size=300, num_classes=5, image_size=16, seed=4)
    assert splits.num_classes == 5 and splits.input_shape == (3, 16, 16)
    assert sum(len(s) for s in (splits.train, splits.val, splits.test)) == 300
    assert set(splits.train.labels.tolist()) == set(range(5))
    again = load_data("synthetic", synthetic_size=300, num_classes=5, image_size=16, seed=4)
    assert torch.equal(splits.test.images, again.test.images)
    # nearest class mean (fit on train) classifies the test split well above chance (0.2)
    tx, ty = splits.train.images.flatten(1), splits.train.labels
    means = torch.stack([tx[ty == c].mean(0) for c in range(5)])
    pred = torch.cdist(splits.test.images.flatten(1), means).argmin(1)
    assert (pred == splits.test.labels).float().mean() > 0.9


# --------------------------------------------------------------------------- CIFAR


def _write_pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _fake_cifar10(root: Path, per_batch: int = 6, n_test: int = 5) -> dict[str, np.ndarray]:
    """The python-pickle layout of the official archive, with tiny batches."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_data, train_labels = [], []
    for i in range(1, 6):
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        _write_pickle(
            folder / f"data_batch_{i}",
            {"batch_label": f"training batch {i} of 5", "labels": labels, "data": data},
        )
        train_data.append(data)
        train_labels += labels
    test = rng.integers(0, 256, size=(n_test, 3072), dtype=np.uint8)
    test_labels = [int(v) for v in rng.integers(0, 10, size=n_test)]
    _write_pickle(folder / "test_batch", {"labels": test_labels, "data": test})
    _write_pickle(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    return {
        "train": np.concatenate(train_data),
        "train_labels": np.array(train_labels),
        "test": test,
        "test_labels": np.array(test_labels),
    }


def test_fake_cifar10(tmp_path: Path) -> None:
    truth = _fake_cifar10(tmp_path)
    splits = load_data("cifar10", root=str(tmp_path), val_fraction=0.2, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (24, 6, 5)
    assert splits.num_classes == 10 and splits.input_shape == (3, 32, 32)
    train_idx, val_idx, test_idx = _all_indices(splits)
    assert np.array_equal(np.sort(np.concatenate([train_idx, val_idx])), np.arange(30))
    assert np.array_equal(test_idx, np.arange(5))
    # the official test set, in order, normalised with the CIFAR-10 statistics
    for i in range(5):
        x, y = splits.test[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert int(y) == truth["test_labels"][i]
        raw = torch.from_numpy(truth["test"][i].reshape(3, 32, 32)).float() / 255
        assert torch.allclose(x * CIFAR10_STD + CIFAR10_MEAN, raw, atol=1e-5)
    # a val example is the train image with the same source index
    j = int(splits.val.indices[0])
    x, y = splits.val[0]
    raw = torch.from_numpy(truth["train"][j].reshape(3, 32, 32)).float() / 255
    assert torch.allclose(x * CIFAR10_STD + CIFAR10_MEAN, raw, atol=1e-5)
    assert int(y) == truth["train_labels"][j]
    # the root may also be the batches folder itself
    direct = load_data("cifar10", root=str(tmp_path / "cifar-10-batches-py"), val_fraction=0.2)
    assert torch.equal(direct.test[0][0], splits.test[0][0])


def test_fake_cifar10_augment_only_on_train(tmp_path: Path) -> None:
    _fake_cifar10(tmp_path)
    splits = load_data("cifar10", root=str(tmp_path), val_fraction=0.2, augment=True)
    torch.manual_seed(0)
    draws = [splits.train[0][0] for _ in range(10)]
    assert all(d.shape == (3, 32, 32) for d in draws)
    assert any(not torch.equal(d, draws[0]) for d in draws[1:])
    assert torch.equal(splits.val[0][0], splits.val[0][0])
    assert torch.equal(splits.test[0][0], splits.test[0][0])


def test_fake_cifar100(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, size=(20, 3072), dtype=np.uint8)
    fine = [int(v) for v in rng.integers(0, 100, size=20)]
    _write_pickle(folder / "train", {"data": train, "fine_labels": fine, "coarse_labels": fine})
    _write_pickle(folder / "test", {"data": train[:4], "fine_labels": fine[:4]})
    _write_pickle(folder / "meta", {"fine_label_names": [str(i) for i in range(100)]})
    splits = load_data("cifar100", root=str(tmp_path), val_fraction=0.25, image_size=16)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (15, 5, 4)
    assert splits.num_classes == 100 and splits.input_shape == (3, 16, 16)
    x, y = splits.test[2]
    assert x.shape == (3, 16, 16) and int(y) == fine[2]


def test_cifar_missing_root(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        load_data("cifar10", root=str(missing))
    msg = str(info.value)
    assert str(missing) in msg and "cifar-10-batches-py" in msg and "\n" not in msg
    with pytest.raises(DataError, match="root"):
        load_data("cifar100", root=None)


def test_cifar_missing_files(tmp_path: Path) -> None:
    _fake_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DataError) as info:
        load_data("cifar10", root=str(tmp_path))
    assert "test_batch" in str(info.value) and str(tmp_path) in str(info.value)


def test_cifar_corrupt_file(tmp_path: Path) -> None:
    _fake_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_3"):
        load_data("cifar10", root=str(tmp_path))


class _RunsCode:
    """Unpickling this writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_cifar_batches_of_every_pickle_protocol_and_numpy_spelling(tmp_path: Path, protocol: int) -> None:
    """The restricted unpickler reads what real archives hold (Python 2 pickles of numpy 1 arrays,
    protocol 2) and what numpy 2 writes at any protocol."""
    truth = _fake_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    for path in folder.iterdir():
        data = pickle.dumps(pickle.loads(path.read_bytes()), protocol=protocol)
        if protocol <= 3:  # text GLOBAL opcodes: spell them as numpy 1 did
            data = data.replace(b"numpy._core", b"numpy.core")
        path.write_bytes(data)
    splits = load_data("cifar10", root=str(tmp_path), val_fraction=0.2, seed=0)
    raw = torch.from_numpy(truth["test"][0].reshape(3, 32, 32)).float() / 255
    assert torch.allclose(splits.test[0][0] * CIFAR10_STD + CIFAR10_MEAN, raw, atol=1e-5)


@pytest.mark.parametrize("where", ["bare", "in the dict", "object array"])
def test_cifar_pickle_that_runs_code_is_refused_never_run(tmp_path: Path, where: str) -> None:
    _fake_cifar10(tmp_path)
    marker = tmp_path / "PWNED"
    payload = {"bare": _RunsCode(marker), "in the dict": {"data": _RunsCode(marker), "labels": [0]},
               "object array": {"data": np.array([_RunsCode(marker)], dtype=object), "labels": [0]}}[where]
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(pickle.dumps(payload))
    with pytest.raises(DataError) as info:
        load_data("cifar10", root=str(tmp_path))
    msg = str(info.value)
    assert "data_batch_2" in msg and "never loads" in msg and "\n" not in msg
    assert ("builtins.exec" in msg) or ("object array" in msg)
    assert not marker.exists()


# --------------------------------------------------------------------------- imagefolder

COLOURS = {"apple": (255, 0, 0), "banana": (255, 255, 0), "cherry": (0, 0, 255)}


def _image_tree(root: Path, split: str, per_class: int, ext: str = "png") -> None:
    from PIL import Image

    for cls, colour in COLOURS.items():
        d = root / split / cls
        d.mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (12, 10), colour).save(d / f"{i}.{ext}")
        (d / "notes.txt").write_text("not an image")


def _denorm(x: torch.Tensor) -> torch.Tensor:
    return x * IMAGENET_STD + IMAGENET_MEAN


def test_imagefolder_without_val(tmp_path: Path) -> None:
    _image_tree(tmp_path, "train", per_class=10)
    splits = load_data("imagefolder", root=str(tmp_path), image_size=16, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (21, 3, 6)
    assert splits.num_classes == 3 and splits.input_shape == (3, 16, 16)
    train_idx, val_idx, test_idx = _all_indices(splits)
    assert np.array_equal(np.sort(np.concatenate([train_idx, val_idx, test_idx])), np.arange(30))
    for split in (splits.train, splits.test):
        for i in range(len(split)):
            x, y = split[i]
            assert x.shape == (3, 16, 16) and y.dtype == torch.int64
            cls = sorted(COLOURS)[int(y)]  # classes are the sorted folder names
            want = torch.tensor(COLOURS[cls], dtype=torch.float32).view(3, 1, 1) / 255
            assert torch.allclose(_denorm(x), want.expand(3, 16, 16), atol=1e-5)


def test_imagefolder_with_val_folder_as_test(tmp_path: Path) -> None:
    _image_tree(tmp_path, "train", per_class=10)
    _image_tree(tmp_path, "val", per_class=2, ext="jpg")
    splits = load_data("imagefolder", root=str(tmp_path), image_size=8, val_fraction=0.2)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (24, 6, 6)
    assert splits.test.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert all(p.parent.parent.name == "val" for p in splits.test.paths)
    x, y = splits.test[4]
    assert x.shape == (3, 8, 8) and int(y) == 2
    assert torch.allclose(_denorm(x)[2], torch.ones(8, 8), atol=0.03)  # blue, via JPEG


def test_imagefolder_errors(tmp_path: Path) -> None:
    missing = tmp_path / "absent"
    with pytest.raises(DataError) as info:
        load_data("imagefolder", root=str(missing))
    assert str(missing) in str(info.value)
    (tmp_path / "train" / "empty_class").mkdir(parents=True)
    with pytest.raises(DataError) as info:
        load_data("imagefolder", root=str(tmp_path))
    assert str(tmp_path / "train") in str(info.value)


# --------------------------------------------------------------------------- loaders


def test_make_loader_batches_and_seeding() -> None:
    splits = load_data("synthetic", synthetic_size=100, image_size=8, seed=0)
    loader = make_loader(splits.train, 16, shuffle=True, seed=5)
    x, y = next(iter(loader))
    assert x.shape == (16, 3, 8, 8) and y.shape == (16,) and y.dtype == torch.int64

    def epoch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        batches = list(make_loader(splits.train, 7, shuffle=True, seed=seed))
        return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])

    xa, ya = epoch(5)
    xb, yb = epoch(5)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(xa, epoch(6)[0])
    n = len(splits.train)
    assert len(make_loader(splits.train, 16, shuffle=False, drop_last=True)) == n // 16
    plain = torch.cat([y for _, y in make_loader(splits.train, 16, shuffle=False)])
    assert torch.equal(plain, splits.train.labels)
    with pytest.raises(ConfigError):
        make_loader(splits.train, 0, shuffle=False)


# --------------------------------------------------------------------------- object storage
# data.root as an s3:// URI on the suite's loopback moto server with data.access=mirror: the loader's
# files are mirrored into a local cache (RAYKFE_DATA_CACHE) and loaded from there exactly as from a
# local root. Streaming (the default) is tested in tests/test_stream.py.


def _upload_tree(server, local: Path, prefix: str) -> list[str]:
    """Upload every file under ``local`` to ``<bucket>/<prefix>/<relative path>``; the keys."""
    client = server.client()
    keys = []
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        key = f"{prefix}/{path.relative_to(local).as_posix()}"
        client.put_object(Bucket=server.bucket, Key=key, Body=path.read_bytes())
        keys.append(key)
    return keys


def _same_splits(a: DataSplits, b: DataSplits) -> None:
    assert (a.num_classes, a.input_shape, a.name) == (b.num_classes, b.input_shape, b.name)
    for sa, sb in ((a.train, b.train), (a.val, b.val), (a.test, b.test)):
        assert len(sa) == len(sb)
        assert torch.equal(sa.indices, sb.indices) and torch.equal(sa.labels, sb.labels)
        for i in range(len(sa)):
            if sa is a.train:  # augmentation draws at random: compare the stored examples
                torch.manual_seed(i)
                xa = sa[i][0]
                torch.manual_seed(i)
                xb = sb[i][0]
            else:
                xa, xb = sa[i][0], sb[i][0]
            assert torch.equal(xa, xb)


@pytest.fixture
def data_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("RAYKFE_DATA_CACHE", str(cache))
    return cache


def _no_secret_in(*texts: str) -> None:
    import os

    secret = os.environ["AWS_SECRET_ACCESS_KEY"]  # the s3_server fixture's random fake secret
    for text in texts:
        assert secret not in text


def test_cifar10_from_s3_is_mirrored_and_cached(s3_server, tmp_path: Path, data_cache: Path, caplog) -> None:
    import uuid

    from raykfe.data import data_cache_dir

    local = tmp_path / "local"
    _fake_cifar10(local)
    prefix = f"datasets/{uuid.uuid4().hex}"
    keys = _upload_tree(s3_server, local, prefix)
    uri = s3_server.uri(prefix)

    want = load_data("cifar10", root=str(local), val_fraction=0.2, augment=True, seed=3)
    got = load_data("cifar10", root=uri, access="mirror", val_fraction=0.2, augment=True, seed=3)
    _same_splits(got, want)

    cache = data_cache_dir(uri)
    assert cache.parent == data_cache
    folder = cache / "cifar-10-batches-py"
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(p.name for p in (local / "cifar-10-batches-py").iterdir())  # no temp files
    for name in names:
        assert (folder / name).read_bytes() == (local / "cifar-10-batches-py" / name).read_bytes()
    _no_secret_in(str(cache), *(p.read_text(errors="replace") for p in cache.glob(".*")))

    # a second load copies nothing: every cached file has the remote's size
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}
    _same_splits(load_data("cifar10", root=uri, access="mirror", val_fraction=0.2, augment=True, seed=3), want)
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()} == before

    # the remote loses a file: the complete earlier mirror is used, with a warning
    s3_server.client().delete_object(Bucket=s3_server.bucket, Key=next(k for k in keys if k.endswith("test_batch")))
    with caplog.at_level("WARNING", logger="raykfe.data"):
        again = load_data("cifar10", root=uri, access="mirror", val_fraction=0.2, augment=True, seed=3)
    _same_splits(again, want)
    assert any("test_batch" in r.getMessage() and str(cache) in r.getMessage() for r in caplog.records)

    # ... but without that mirror the missing file is a one-line error naming data.root
    import shutil

    shutil.rmtree(cache)
    with pytest.raises(DataError) as info:
        load_data("cifar10", root=uri, access="mirror", val_fraction=0.2)
    msg = str(info.value)
    assert "data.root" in msg and prefix in msg and "test_batch" in msg and "\n" not in msg
    _no_secret_in(msg)


def test_cifar100_from_s3_batches_folder_itself(s3_server, tmp_path: Path, data_cache: Path) -> None:
    import uuid

    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(2)
    data = rng.integers(0, 256, size=(12, 3072), dtype=np.uint8)
    fine = [int(v) for v in rng.integers(0, 100, size=12)]
    _write_pickle(folder / "train", {"data": data, "fine_labels": fine})
    _write_pickle(folder / "test", {"data": data[:3], "fine_labels": fine[:3]})
    _write_pickle(folder / "meta", {"fine_label_names": [str(i) for i in range(100)]})
    prefix = f"datasets/{uuid.uuid4().hex}/cifar-100-python"  # the URI names the batches folder
    _upload_tree(s3_server, folder, prefix)
    got = load_data("cifar100", root=s3_server.uri(prefix), access="mirror", val_fraction=0.25)
    _same_splits(got, load_data("cifar100", root=str(folder), val_fraction=0.25))


def test_imagefolder_from_s3_follows_the_remote(s3_server, tmp_path: Path, data_cache: Path) -> None:
    import uuid

    from raykfe.data import data_cache_dir

    local = tmp_path / "local"
    _image_tree(local, "train", per_class=5)
    _image_tree(local, "val", per_class=2, ext="jpg")
    prefix = f"datasets/{uuid.uuid4().hex}/tiny-imagenet"
    keys = _upload_tree(s3_server, local, prefix)
    uri = s3_server.uri(prefix)
    got = load_data("imagefolder", root=uri, access="mirror", image_size=8, val_fraction=0.2)
    _same_splits(got, load_data("imagefolder", root=str(local), image_size=8, val_fraction=0.2))
    cache = data_cache_dir(uri)
    assert not list(cache.rglob("notes.txt"))  # only what the loader reads is copied
    assert all(cache in p.parents for p in got.test.paths)

    # an image deleted on the remote leaves the mirror as well
    gone = next(k for k in keys if k.endswith("train/banana/0.png"))
    s3_server.client().delete_object(Bucket=s3_server.bucket, Key=gone)
    (local / "train" / "banana" / "0.png").unlink()
    again = load_data("imagefolder", root=uri, access="mirror", image_size=8, val_fraction=0.2)
    assert not (cache / "train" / "banana" / "0.png").exists()
    _same_splits(again, load_data("imagefolder", root=str(local), image_size=8, val_fraction=0.2))


def test_s3_root_errors_are_one_line_and_keep_secrets(s3_server, data_cache: Path) -> None:
    import os

    with pytest.raises(DataError) as info:
        load_data("cifar10", root=s3_server.uri("no/such/folder"))
    msg = str(info.value)
    assert "data.root" in msg and "no/such/folder" in msg and "cifar-10-batches-py" in msg
    assert "never downloads" in msg and "\n" not in msg
    with pytest.raises(DataError) as info:
        load_data("imagefolder", root=s3_server.uri("no/such/tree"))
    assert "data.root" in str(info.value) and "train/<class>" in str(info.value)

    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    uri = f"s3://KEYID:{secret}@{s3_server.bucket}/x"
    with pytest.raises(DataError, match="credentials") as info:
        load_data("cifar10", root=uri)
    with pytest.raises(DataError, match="credentials") as info2:
        load_data("cifar10", root=s3_server.uri("x") + f"&secret_key={secret}")
    _no_secret_in(str(info.value), str(info2.value), *(str(p) for p in data_cache.rglob("*")))


def test_unreachable_endpoint_is_a_data_error(data_cache: Path) -> None:
    from s3server import free_port

    uri = f"s3://bucket/cifar?endpoint_override=http://127.0.0.1:{free_port()}&scheme=http&region=us-east-1"
    with pytest.raises(DataError) as info:
        load_data("cifar10", root=uri)
    msg = str(info.value)
    assert "data.root" in msg and "cannot be listed" in msg and "\n" not in msg


def test_concurrent_loads_share_one_mirror(s3_server, tmp_path: Path, data_cache: Path) -> None:
    """Train workers of one node load at the same time: one copy, no temporary files left."""
    import uuid
    from concurrent.futures import ThreadPoolExecutor

    from raykfe.data import data_cache_dir

    local = tmp_path / "local"
    _fake_cifar10(local)
    prefix = f"datasets/{uuid.uuid4().hex}"
    _upload_tree(s3_server, local, prefix)
    uri = s3_server.uri(prefix)
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: load_data("cifar10", root=uri, access="mirror", val_fraction=0.2), range(3)))
    want = load_data("cifar10", root=str(local), val_fraction=0.2)
    for got in results:
        _same_splits(got, want)
    leftovers = [p.name for p in data_cache_dir(uri).rglob("*") if ".part-" in p.name]
    assert leftovers == []
