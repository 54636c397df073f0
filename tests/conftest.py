"""Shared fixtures: one Ray for the whole session, tiny generated datasets."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray (2 CPUs) for every test that needs it."""
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_events(tmp_path_factory):
    """A small generated dataset on disk (unbucketed, int64 ms timestamps)."""
    from dynamix_ray.config import GenerateConfig
    from dynamix_ray.synth import generate

    root = tmp_path_factory.mktemp("events") / "plain"
    generate(str(root), GenerateConfig(users=300, days=3, seed=7), progress=None)
    return str(root)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matmuls: on a loaded 2-core box, intra-op threads only contend."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
