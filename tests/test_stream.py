"""Streamed data roots (raykfe.stream): ImageFolder trees and parquet shards read from a local folder
or the suite's loopback S3 server without copying the dataset to disk, sharded across ranks, capped
by stats.max_batches, one-line errors; and the ImageNet job spec run end to end on synthetic data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from raykfe import stream
from raykfe.data import DataSplits, load_data, make_loader
from raykfe.distributed.workers import ShardSampler, _shard_batches
from raykfe.errors import DataError

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("apple", "banana", "cherry")


def _tree(root: Path, per_class: dict[str, int], size: int = 20, seed: int = 0) -> None:
    """A random-pixel ImageFolder tree: JPEG and PNG mixed, odd sizes (resized on load)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for c in CLASSES:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 256, size=(size, size + 3, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i}.{'jpg' if i % 2 else 'png'}")
            (d / "notes.txt").write_text("not an image")


def _upload(server, local: Path, prefix: str) -> list[str]:
    client, keys = server.client(), []
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        key = f"{prefix}/{path.relative_to(local).as_posix()}"
        client.put_object(Bucket=server.bucket, Key=key, Body=path.read_bytes())
        keys.append(key)
    return keys


def _items(split) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every example of ``split``; train-split augmentation seeded per example."""
    out = []
    for i in range(len(split)):
        torch.manual_seed(i)
        out.append(split[i])
    return out


def _same(a: DataSplits, b: DataSplits) -> None:
    assert (a.num_classes, a.input_shape) == (b.num_classes, b.input_shape)
    for sa, sb in ((a.train, b.train), (a.val, b.val), (a.test, b.test)):
        assert torch.equal(sa.indices, sb.indices) and torch.equal(sa.labels, sb.labels)
        for (xa, ya), (xb, yb) in zip(_items(sa), _items(sb)):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.fixture
def no_cache(tmp_path, monkeypatch) -> Path:
    """The mirror cache points here: streaming must leave it absent."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("RAYKFE_DATA_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def trees(tmp_path_factory, s3_server):
    """One local tree (6 train + 2 val images per class), the same on S3, and parquet shards of it
    (rows of 5 per shard, 2 per row group) in a local folder and on S3."""
    base = tmp_path_factory.mktemp("stream")
    local = base / "tree"
    _tree(local, {"train": 6, "val": 2})
    prefix = f"stream/{uuid.uuid4().hex}"
    _upload(s3_server, local, f"{prefix}/tree")
    s3_tree = s3_server.uri(f"{prefix}/tree")
    s3_parquet = s3_server.uri(f"{prefix}/parquet")
    written = stream.write_parquet_shards(local, s3_parquet, rows_per_shard=5, rows_per_group=2, seed=1)
    assert written == stream.write_parquet_shards(local, str(base / "parquet"), rows_per_shard=5, rows_per_group=2, seed=1)
    assert written[0] == "train-00000-of-00004.parquet" and written[-1] == "val-00001-of-00002.parquet"
    return SimpleNamespace(local=local, s3_tree=s3_tree, local_parquet=str(base / "parquet"), s3_parquet=s3_parquet)


# --------------------------------------------------------------------------- same data, any route


def test_streamed_imagefolder_equals_local_tree(trees, no_cache) -> None:
    kw = dict(image_size=12, val_fraction=0.2, augment=True, seed=3)
    got = load_data("imagefolder", root=trees.s3_tree, **kw)
    want = load_data("imagefolder", root=str(trees.local), **kw)
    _same(got, want)
    assert got.train.remote and not want.train.remote
    assert (len(got.train), len(got.val), len(got.test)) == (14, 4, 6)
    # the train split interleaves the classes (a capped statistics pass reads a prefix)
    assert sorted(got.train.labels[:3].tolist()) == [0, 1, 2]
    # two forkserver DataLoader workers, each with its own S3 client, give the same batches
    for split in ("test", "train"):
        a = getattr(load_data("imagefolder", root=trees.s3_tree, workers=2, image_size=12, val_fraction=0.2), split)
        b = getattr(load_data("imagefolder", root=str(trees.local), image_size=12, val_fraction=0.2), split)
        xa = torch.cat([x for x, _ in make_loader(a, 4, shuffle=False)])
        assert torch.equal(xa, torch.stack([b[i][0] for i in range(len(b))]))
    assert not no_cache.exists()  # nothing was copied to disk


def _by_path(splits: DataSplits, root: str) -> dict[str, tuple[torch.Tensor, int]]:
    """``{relative image path: (x, y)}`` over all splits of a parquet dataset (paths from the shards)."""
    import pyarrow.parquet as pq

    source = splits.train.source
    out = {}
    for split in (splits.train, splits.val, splits.test):
        paths = [
            p for f in split.index.files
            for p in pq.read_table(source.location().fs.open_input_file(source.location().path(f)), columns=["path"])
            .column("path").to_pylist()
        ]
        for i in range(len(split)):
            x, y = split[i]
            out[paths[int(split.indices[i])]] = (x, int(y))
    return out


def test_parquet_shards_local_and_s3_match_imagefolder(trees, no_cache) -> None:
    kw = dict(image_size=12, val_fraction=0.2, seed=3)
    local = load_data("parquet", root=trees.local_parquet, **kw)
    remote = load_data("parquet", root=trees.s3_parquet, **kw)
    _same(local, remote)
    assert remote.train.remote and not local.train.remote
    assert remote.num_classes == 3 and len(remote.test) == 6 and len(remote.train) + len(remote.val) == 18
    folder = load_data("imagefolder", root=str(trees.local), **kw)
    want = {}
    for split in (folder.train, folder.val, folder.test):
        for i in range(len(split)):
            x, y = split[i]
            want[split.paths[i].relative_to(trees.local).as_posix()] = (x, int(y))
    got = _by_path(remote, trees.s3_parquet)
    assert sorted(got) == sorted(want)
    for path, (x, y) in want.items():
        assert torch.equal(got[path][0], x) and got[path][1] == y, path
    assert not no_cache.exists()


# --------------------------------------------------------------------------- sharding and reads


def _cfg(max_batches, batch):
    return SimpleNamespace(stats=SimpleNamespace(max_batches=max_batches, batch_size=batch))


@pytest.mark.parametrize("workers", [0, 2])
def test_statistics_shards_partition_the_examples(trees, workers) -> None:
    splits = load_data("parquet", root=trees.local_parquet, image_size=8, val_fraction=0.2, workers=workers)
    n = len(splits.train)
    for world in (1, 2, 3):
        seen = []
        for rank in range(world):
            for x, y, idx in _shard_batches(_cfg(None, 3), rank, world, splits, None, "stats"):
                assert x.shape[0] == y.shape[0] == idx.shape[0] <= 3
                seen.extend(idx.tolist())
        assert sorted(seen) == list(range(n)), world  # every example once


def test_training_sampler_partitions_each_epoch_and_keeps_row_groups_together(trees) -> None:
    splits = load_data("parquet", root=trees.local_parquet, image_size=8, val_fraction=0.2)
    train, n, world = splits.train, len(splits.train), 2
    assert train.blocks is not None and len(train.blocks) == n
    orders = {}
    for epoch in (1, 2):
        per_rank = []
        for rank in range(world):
            sampler = ShardSampler(n, rank, world, 7, blocks=train.blocks, batch=2, workers=2)
            sampler.set_epoch(epoch)
            per_rank.append(list(sampler))
            assert len(per_rank[-1]) == len(sampler) == n // world
        flat = [i for r in per_rank for i in r]
        assert len(set(flat)) == len(flat) == world * (n // world)  # no example twice in an epoch
        orders[epoch] = flat
        # each rank's examples come in runs of whole row groups: a group is split at most at the
        # rank boundary or between the two DataLoader workers' runs
        runs = sum(1 for r in per_rank for a, b in zip(r, r[1:]) if int(train.blocks[a]) != int(train.blocks[b]))
        groups = len(set(int(train.blocks[i]) for i in flat))
        assert runs <= groups + 2 * world
    assert orders[1] != orders[2]
    plain = ShardSampler(n, 0, world, 7)
    assert len(list(plain)) == n // world


def test_worker_local_order_gives_each_worker_one_run() -> None:
    order = list(range(23))
    out = stream.worker_local_order(order, 4, 3)
    assert sorted(out) == order
    batches = [out[i:i + 4] for i in range(0, len(out), 4)]
    per_worker = {w: [i for b in batches[w::3] for i in b] for w in range(3)}
    for run in per_worker.values():
        assert run == list(range(run[0], run[0] + len(run)))  # contiguous in the original order
    assert [len(b) for b in batches] == [4, 4, 4, 4, 4, 3]


@pytest.mark.parametrize("kind", ["imagefolder", "parquet"])
def test_max_batches_caps_what_is_read(trees, kind) -> None:
    root = trees.s3_tree if kind == "imagefolder" else trees.s3_parquet
    splits = load_data(kind, root=root, image_size=8, val_fraction=0.2)
    stream.OPENED.clear()
    batch, max_batches, world = 2, 2, 2
    seen = []
    for rank in range(world):
        seen += [int(i) for _, _, idx in _shard_batches(_cfg(max_batches, batch), rank, world, splits, None, "s") for i in idx]
    assert sorted(seen) == list(range(batch * max_batches))
    opened = dict(stream.OPENED)
    if kind == "imagefolder":  # exactly the objects of the first 4 training examples, once each
        assert sorted(opened) == sorted(splits.train.keys[:4]) and set(opened.values()) == {1}
    else:  # the row groups that hold the first 4 rows: rows 0-3 of 2-row groups, one read each
        needed = {int(g) for g in splits.train.blocks[:4]}
        assert len(opened) == len(needed) and set(opened.values()) == {1}, opened


def test_listing_is_made_once_per_process(trees) -> None:
    stream.clear_listings()
    load_data("imagefolder", root=trees.s3_tree, image_size=8, val_fraction=0.2)
    listings = stream.export_listings()
    assert len(listings) == 1
    tree = next(iter(listings.values()))
    load_data("imagefolder", root=trees.s3_tree, image_size=8, val_fraction=0.2)
    assert next(iter(stream.export_listings().values())) is tree  # the cached listing, not a new one
    # a worker process adopts the driver's listing
    stream.clear_listings()
    stream.import_listings(listings)
    assert next(iter(stream.export_listings().values())) is tree


# --------------------------------------------------------------------------- errors


def _secret() -> str:
    """The s3_server fixture's random fake secret (a placeholder when the fixture is not in use)."""
    return os.environ.get("AWS_SECRET_ACCESS_KEY") or "\0no-secret"


def _one_line(exc_info, *parts: str) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg and _secret() not in msg, msg
    for part in parts:
        assert part in msg, (part, msg)
    return msg


def test_stream_errors_are_one_line(s3_server, trees, tmp_path) -> None:
    from s3server import free_port

    for kind in ("imagefolder", "parquet", "cifar10"):
        with pytest.raises(DataError) as info:
            load_data(kind, root=s3_server.uri(f"no/such/{uuid.uuid4().hex}"))
        _one_line(info, "data.root", "no/such", "never downloads")
        with pytest.raises(DataError) as info:
            load_data(kind, root=str(tmp_path / "absent"))
        _one_line(info, "data.root", str(tmp_path / "absent"))
    with pytest.raises(DataError) as info:  # an empty split
        load_data("imagefolder", root=trees.s3_tree, val_fraction=0.01)
    _one_line(info, "data.root", "val split is empty", "val_fraction")
    with pytest.raises(DataError) as info:  # an endpoint nobody listens on
        load_data("parquet", root=f"s3://b/x?endpoint_override=http://127.0.0.1:{free_port()}&scheme=http&region=us-east-1")
    _one_line(info, "data.root", "cannot be listed", "endpoint")
    with pytest.raises(DataError) as info:  # credentials in the URI
        load_data("imagefolder", root=trees.s3_tree + f"&secret_key={_secret()}")
    _one_line(info, "data.root", "credentials")

    # an unreadable image and an image deleted after the listing: the error names the object
    prefix = f"stream/{uuid.uuid4().hex}/broken"
    local = tmp_path / "broken"
    _tree(local, {"train": 4})
    (local / "train" / "banana" / "9.jpg").write_bytes(b"not a jpeg")
    keys = _upload(s3_server, local, prefix)
    splits = load_data("imagefolder", root=s3_server.uri(prefix), image_size=8, val_fraction=0.2, test_fraction=0.2)
    everything = [splits.train, splits.val, splits.test]
    with pytest.raises(DataError) as info:
        for split in everything:
            for _ in make_loader(split, 4, shuffle=False):
                pass
    _one_line(info, "train/banana/9.jpg", prefix)
    gone = next(k for k in keys if k.endswith("train/cherry/0.png"))
    s3_server.client().delete_object(Bucket=s3_server.bucket, Key=gone)
    with pytest.raises(DataError) as info:
        for split in everything:
            for i in range(len(split)):
                if split.keys[i] != "train/banana/9.jpg":
                    split[i]
    _one_line(info, "train/cherry/0.png", "data.root")


def test_parquet_layout_errors(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"img": [b"x"], "label": [0]}), tmp_path / "train-0.parquet")
    with pytest.raises(DataError) as info:
        load_data("parquet", root=str(tmp_path))
    _one_line(info, "train-0.parquet", "'image'", "write_parquet_shards")
    other = tmp_path / "other"
    other.mkdir()
    pq.write_table(pa.table({"image": [b"not an image"] * 12, "label": [0, 1] * 6}), other / "train-0.parquet")
    splits = load_data("parquet", root=str(other), val_fraction=0.2, test_fraction=0.2)
    with pytest.raises(DataError) as info:
        splits.train[0]
    _one_line(info, "train-0.parquet row", "cannot read image")


# --------------------------------------------------------------------------- the ImageNet job spec, end to end


# the transformer specs skip their 3072-wide factors here (stats.max_factor_dim): eigendecompositions
# of that size cost minutes on the suite's one-CPU actors; BENCHMARKS.md times them at full size
IMAGENET_SPECS = {
    "resnet50": ([], {}),
    "vit_b_16": (["stats.max_factor_dim=1024", "prune.target=flops:0.25"], {"image_size": 32}),  # attention + patch conv
    "convnext_tiny": (["stats.max_factor_dim=1024"], {}),
}


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("arch", list(IMAGENET_SPECS))
def test_imagenet_job_end_to_end_on_s3(ray_cluster, s3_server, tmp_path, arch) -> None:
    """jobs/imagenet-<arch>.yaml through the CLI on the suite's Ray cluster: a synthetic 3-class
    JPEG ImageFolder, the base weights (a plain torchvision state_dict: the ViT's is an
    nn.MultiheadAttention one) and the output all on the loopback S3 server."""
    import torchvision
    from safetensors.torch import save

    import raykfe

    extra, build = IMAGENET_SPECS[arch]
    prefix = f"imagenet-job/{uuid.uuid4().hex}"
    local = tmp_path / "imagenet"
    _tree(local, {"train": 8, "val": 3}, size=32)
    _upload(s3_server, local, f"{prefix}/data")
    torch.manual_seed(0)
    base = torchvision.models.get_model(arch, weights=None, num_classes=3, **build)
    s3_server.client().put_object(
        Bucket=s3_server.bucket, Key=f"{prefix}/base.safetensors",
        Body=save({k: v.contiguous() for k, v in base.state_dict().items()}),
    )
    out = s3_server.uri(f"{prefix}/out")
    gcs = ray_cluster.get_runtime_context().gcs_address
    overrides = [
        "device=cpu", "ray.use_gpu=false", f"ray.address={gcs}", "ray.workers=2", "ray.cpus_per_worker=1",
        "ray.actor_cpus=1", f"data.root={s3_server.uri(prefix + '/data')}", "data.num_classes=3",
        "data.image_size=32", "data.val_fraction=0.25", "latency.repeats=0",
        f"model.weights={s3_server.uri(prefix + '/base.safetensors')}", "stats.max_batches=2",
        "stats.batch_size=4", "finetune.epochs=1", "finetune.batch_size=8", "progress=false", f"output.uri={out}", *extra,
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RAYKFE_DEBUG", "RAY_ADDRESS")}
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "raykfe"), "prune", "-c", f"jobs/imagenet-{arch}.yaml", *overrides],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _secret() not in proc.stdout + proc.stderr
    result = raykfe.load(out)
    metrics = json.loads(s3_server.objects(f"{prefix}/out/metrics.json")[f"{prefix}/out/metrics.json"])
    target = next((e.split("=", 1)[1] for e in extra if e.startswith("prune.target=")), "flops:0.5")
    assert result.plan.target == target and metrics["backend"] == "ray"
    assert abs(metrics["macs_reduction"] - float(target.split(":")[1])) <= 0.02, metrics["macs_reduction"]
    x = torch.randn(2, 3, 32, 32)
    result.model.eval()
    with torch.no_grad():
        assert result.model(x).shape == (2, 3)
    if arch == "vit_b_16":  # the attention's projections are pruned, not left dense
        assert any(n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "out_proj") and lp.action == "kfe"
                   for n, lp in result.plan.layers.items())
    assert not any(_secret().encode() in body for body in s3_server.objects(f"{prefix}/out").values())
