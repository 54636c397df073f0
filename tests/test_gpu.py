"""GPU checks: a bf16 training step, and the ranker on GPU against CPU.

They need CUDA and are skipped without it (CI machines have no GPU); on a
GPU machine ``pytest tests/test_gpu.py`` runs them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_serve_core import _random_histories

from dynamix_ray.model import DynamixCTR, ModelConfig
from dynamix_ray.model.checkpoint import save_checkpoint
from dynamix_ray.model.config import CANDIDATE_ATTRIBUTES
from dynamix_ray.samples import SampleConfig
from dynamix_ray.serve.ranker import Ranker
from dynamix_ray.train import train_step

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (none on this machine)"
)

TINY = ModelConfig(emb_dim=4, d_model=8, user_dim=8, head_hidden=16, max_seq_len=8)


def _batch(store, n: int, seed: int) -> dict[str, np.ndarray]:
    """Flat sample columns: histories as the loader gathers them, a candidate,
    a label and a segment per row."""
    rng = np.random.default_rng(seed)
    users = rng.choice(store.user_id, n)
    t = np.full(n, store.as_of_ms, np.int64)
    cols = store.rows(users, t, None, 60_000, TINY.max_seq_len)
    cols["t_ms"] = t
    for a in CANDIDATE_ATTRIBUTES:
        cols[f"cand.{a}"] = rng.integers(0, 50, n)
    cols["label"] = (rng.random(n) < 0.3).astype(np.float32)
    cols["segment"] = rng.integers(0, 2, n).astype(np.int8)
    return cols


def test_a_bf16_training_step_on_gpu_is_finite_and_moves_the_weights():
    torch.manual_seed(0)
    model = DynamixCTR(TINY).cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    batch = _batch(_random_histories(6, seq=10), 64, seed=1)
    losses = [
        train_step(model, opt, batch, "boost-selective", (), "cuda", use_amp=True)
        for _ in range(3)
    ]
    assert all(np.isfinite(losses))
    moved = sum(
        not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)
    )
    assert moved > 0


def test_ranker_scores_on_gpu_equal_cpu(tmp_path):
    torch.manual_seed(0)
    model = DynamixCTR(TINY).eval()
    ckpt = save_checkpoint(
        str(tmp_path / "c"), model, TINY, samples=SampleConfig(max_seq_len=8)
    )
    store = _random_histories(5, seq=12, seed=3)
    rng = np.random.default_rng(2)
    users, ts = [10, 999, 30], [store.as_of_ms + i for i in range(3)]
    cands = [rng.integers(0, 100, (n, len(CANDIDATE_ATTRIBUTES))) for n in (3, 1, 4)]
    cpu = Ranker(ckpt, store, 1).score(users, ts, cands)
    gpu = Ranker(ckpt, store, 1, device="cuda").score(users, ts, cands)
    np.testing.assert_allclose(np.concatenate(gpu), np.concatenate(cpu), atol=1e-4)
