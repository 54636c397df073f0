"""Shared fixtures: one Ray for the whole session, tiny generated datasets."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")

#: Markers by what a test needs, set from its fixtures and module so that no
#: test can forget one: ``make test-fast`` runs only the unmarked, plain-core
#: tests (``-m "not ray and not cluster and not http and not slow"``). A
#: plain-core test slower than ~10 s takes ``@pytest.mark.slow`` itself
#: (none does today: the slowest takes ~5 s).
_MODULE_MARKS = {
    "test_cluster": "cluster",
    "test_serve": "http",
    "test_serve_faults": "http",
}
_FIXTURE_MARKS = {"ray_session": "ray"}


def pytest_collection_modifyitems(config, items):  # noqa: ARG001 - pytest hook
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        marks = {m for f, m in _FIXTURE_MARKS.items() if f in item.fixturenames}
        if module in _MODULE_MARKS:
            marks.add(_MODULE_MARKS[module])
        for m in sorted(marks):
            item.add_marker(m)


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
