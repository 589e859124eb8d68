"""Benchmark of the data path (issue 6): images per second from object storage (a moto S3 server on
loopback) vs from local disk, for an ImageFolder tree of JPEGs and for parquet shards of the same
images, into a DataLoader over the train split and into a Ray Train worker's statistics shard
iterator, with 0 (in-process I/O threads), 1 and 2 DataLoader decode processes.

    .venv/bin/python bench/data_path.py [--images 512] [--stored 320] [--size 224] [--batch 32] [--workers 0,1,2]

The images are smooth random colour fields plus noise, JPEG quality 90, ``--stored`` pixels square
(ImageNet's are ~400x350), decoded and resized to ``--size``; 10 classes. "first batch s" includes
starting the DataLoader processes (forkserver for object storage: each imports torch) and, for a
fresh process, listing the root; "images / s" is measured after the first batch. Prints markdown
tables; asserts nothing. Loopback S3 has no network latency: a real bucket adds ~10-50 ms per GET,
which the I/O threads and decode processes overlap.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np

CLASSES = 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_moto(log: Path) -> tuple[subprocess.Popen, int]:
    exe = Path(sys.executable).parent / "moto_server"
    port = _free_port()
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1):
                return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"moto_server did not start (log: {log})")


def _write_tree(root: Path, n: int, stored: int) -> int:
    """``n`` JPEGs in ``CLASSES`` class folders under ``root/train`` (plus 2 per class in val/)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    total = 0
    for split, count in (("train", n), ("val", 2 * CLASSES)):
        for i in range(count):
            c = i % CLASSES
            d = root / split / f"class{c:02d}"
            d.mkdir(parents=True, exist_ok=True)
            low = rng.random((4, 4, 3)) * 255
            img = np.asarray(Image.fromarray(low.astype(np.uint8)).resize((stored, stored), Image.Resampling.BICUBIC), dtype=np.float32)
            img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
            path = d / f"{i:06d}.jpg"
            Image.fromarray(img).save(path, quality=90)
            total += path.stat().st_size
    return total


def _upload(endpoint: str, bucket: str, local: Path, prefix: str) -> None:
    import boto3
    from concurrent.futures import ThreadPoolExecutor

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    files = [p for p in local.rglob("*") if p.is_file()]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda p: client.put_object(Bucket=bucket, Key=f"{prefix}/{p.relative_to(local).as_posix()}",
                                                  Body=p.read_bytes()), files))


def _measure(batches, count_from) -> tuple[float, float, int]:
    """``(first batch s, images / s after it, images)`` of an iterable of batches."""
    t0 = time.perf_counter()
    it = iter(batches)
    first = next(it)
    t1 = time.perf_counter()
    n = 0
    for batch in it:
        n += int(count_from(batch))
    t2 = time.perf_counter()
    return t1 - t0, (n / (t2 - t1)) if t2 > t1 and n else float("nan"), n + int(count_from(first))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=512, help="training images")
    ap.add_argument("--stored", type=int, default=320, help="stored JPEG size (pixels, square)")
    ap.add_argument("--size", type=int, default=224, help="decoded and resized to this (data.image_size)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", default="0,1,2", help="DataLoader decode processes to try")
    ap.add_argument("--rows-per-group", type=int, default=128)
    args = ap.parse_args()
    workers = [int(w) for w in args.workers.split(",")]

    import torch

    from raykfe import stream
    from raykfe.data import load_data, make_loader
    from raykfe.distributed.workers import _shard_batches
    from raykfe.report import format_table

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="rk-data-bench-"))
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": secrets.token_hex(8), "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    os.environ.update(env)
    proc, port = _start_moto(tmp / "moto.log")
    try:
        import boto3

        endpoint = f"http://127.0.0.1:{port}"
        bucket = "bench"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
        query = f"?endpoint_override={endpoint}&scheme=http&region=us-east-1"
        tree = tmp / "tree"
        size_bytes = _write_tree(tree, args.images, args.stored)
        _upload(endpoint, bucket, tree, "tree")
        roots = {
            ("imagefolder", "local disk"): str(tree),
            ("imagefolder", "S3 (moto, loopback)"): f"s3://{bucket}/tree{query}",
            ("parquet", "local disk"): str(tmp / "parquet"),
            ("parquet", "S3 (moto, loopback)"): f"s3://{bucket}/parquet{query}",
        }
        for (kind, where), root in roots.items():
            if kind == "parquet":
                stream.write_parquet_shards(tree, root, rows_per_shard=4 * args.rows_per_group, rows_per_group=args.rows_per_group)

        rows = []
        for (kind, where), root in roots.items():
            for w in workers:
                stream.clear_listings()
                t0 = time.perf_counter()
                splits = load_data(kind, root=root, image_size=args.size, val_fraction=0.05, augment=True, workers=w)
                t_list = time.perf_counter() - t0
                loader = make_loader(splits.train, args.batch, shuffle=False)
                first, rate, n = _measure(loader, lambda b: b[1].numel())
                cfg = SimpleNamespace(stats=SimpleNamespace(max_batches=None, batch_size=args.batch))
                s_first, s_rate, s_n = _measure(_shard_batches(cfg, 0, 2, splits, None, "stats"), lambda b: b[1].numel())
                rows.append([kind, where, w, f"{t_list:.2f}", n, f"{first:.2f}", f"{rate:.0f}", s_n, f"{s_rate:.0f}"])
                del loader
                print(f"  {kind:11s} {where:20s} workers={w}: {rate:.0f} images/s (DataLoader), {s_rate:.0f} (shard)", file=sys.stderr, flush=True)
        cmd = "python bench/data_path.py " + " ".join(sys.argv[1:])
        print(f"### Data path: {args.images} JPEGs ({size_bytes / args.images / 1024:.0f} KiB each, {args.stored}x{args.stored}) "
              f"decoded + resized to {args.size}x{args.size} + crop/flip, batch {args.batch}; "
              f"{os.cpu_count()} cores, torch threads 1\n")
        print(format_table(
            ["format", "source", "decode processes", "load + list s", "images", "first batch s", "images / s",
             "shard images (rank 0 of 2)", "shard images / s"], rows, markdown=True))
        print(f"\ncommand: `{cmd.strip()}`")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
