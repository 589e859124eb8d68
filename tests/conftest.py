"""Shared fixtures: ONE local Ray cluster for the whole session (a TorchTrainer fit costs ~20 s;
starting clusters per test would cost minutes)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # helper modules beside the tests (s3server)

from s3server import s3_server  # noqa: E402,F401  (session fixture: a moto S3 server on loopback)


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """Started after the S3 server so that Train workers inherit its credentials from the
    environment, as they would on a real cluster."""
    import ray

    if not ray.is_initialized():
        # 4 logical CPUs on 2 cores: Train workers + actors + a driver must fit without deadlock
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def one_thread():
    """Threaded LAPACK eigh is pathologically slow (100x) when the 2 cores are shared; use one."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def tiny_job_overrides(tmp_path):
    """A digits job small enough for tests (resnet8 at 16x16, one epoch each)."""
    return [
        "model.name=resnet8", "data.image_size=16", "base.epochs=1", "finetune.epochs=1",
        "stats.max_batches=3", "stats.batch_size=32", "prune.target=flops:0.5", "progress=false",
        f"output.uri={tmp_path / 'out'}",
    ]


def pytest_collection_modifyitems(config, items):
    """Every test that uses the shared Ray cluster is a ``ray`` test, whatever its decorators say
    (so ``-m "not ray"`` never starts Ray)."""
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)
