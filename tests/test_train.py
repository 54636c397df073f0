"""Ray Train end to end on tiny data: metrics, checkpoints, resume, a killed
training worker."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest

from dynamix_ray.cli import main as dynamix
from dynamix_ray.config import GenerateConfig
from dynamix_ray.model import ModelConfig
from dynamix_ray.model.config import SOURCE_ATTRIBUTES
from dynamix_ray.samples import SampleConfig, read_sample_table
from dynamix_ray.segments.pipeline import run_segment
from dynamix_ray.synth import generate
from dynamix_ray.train import TrainConfig, removed_from_baseline, run_train

SMALL_MODEL = ModelConfig(
    emb_dim=8, d_model=16, user_dim=16, head_hidden=32, max_seq_len=16
)


@pytest.fixture(scope="module")
def tiny(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    events, segs = str(root / "events"), str(root / "segs")
    generate(events, GenerateConfig(users=120, days=3, seed=2), progress=None)
    run_segment(events, segs, progress=False)
    return events, segs


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(
        **{
            "epochs": 1,
            "batch_size": 256,
            "model": SMALL_MODEL,
            "samples": SampleConfig(max_seq_len=16),
            "importance_rows": 600,
            **kw,
        }
    )


def test_train_writes_metrics_and_resumes_from_its_checkpoint(tiny, tmp_path):
    events, segs = tiny
    out = str(tmp_path / "run")
    m = run_train(events, segs, out, _cfg(epochs=1))
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # a baseline records the permutation importance of every ad-impression
    # attribute, and the 4 lowest are what --removed-from hands remove-*
    assert set(saved["importance"]) == set(SOURCE_ATTRIBUTES["ad_impressions"])
    assert saved["importance_rows"] == 600
    ranked = sorted(saved["importance"], key=lambda a: (saved["importance"][a], a))
    assert removed_from_baseline(out) == tuple(ranked[:4])
    assert saved["lowest_importance"] == ranked[:4]
    assert saved["policy"] == "baseline" and saved["epoch"] == 0
    assert 0 < saved["ne"] < 2 and saved["eval_rows"] > 0
    assert saved["train_examples_per_s"] > 0
    # progressive NE: one point per curve_steps steps, examples increasing
    curve = saved["curve"]
    assert len(curve) >= 1 and all(0 < ne < 5 for _, ne in curve)
    assert [x for x, _ in curve] == sorted({x for x, _ in curve})
    assert curve[0][0] == 10 * 256 or curve[0][0] <= saved["train_steps"] * 256
    assert set(saved["flops_per_sample"]) == {"0", "1"} or set(
        saved["flops_per_sample"]
    ) == {0, 1}
    assert m["checkpoint"] and os.path.isdir(m["checkpoint"])
    # the same run name and folder with more epochs continues after epoch 0
    m2 = run_train(events, segs, out, _cfg(epochs=2))
    assert m2["epoch"] == 1 and m2["resumed_at_epoch"] == 1


def test_remove_policy_runs_and_records_what_it_removed(tiny, tmp_path):
    events, segs = tiny
    removed = ("campaign_id", "media_type", "surface", "position")
    m = run_train(
        events, segs, str(tmp_path), _cfg(policy="remove-active", removed=removed)
    )
    assert m["removed"] == list(removed)
    assert "importance" not in m  # only a baseline measures it
    flops = {int(k): v for k, v in m["flops_per_sample"].items()}
    assert flops[1] < flops[0]


def test_two_ddp_workers_train_and_agree_on_metrics(tiny, tmp_path):
    events, segs = tiny
    m = run_train(
        events,
        segs,
        str(tmp_path),
        _cfg(num_workers=2, cpus_per_worker=0.5, importance_rows=0),
    )
    one = run_train(events, segs, str(tmp_path / "one"), _cfg(importance_rows=0))
    # evaluation sums are all-reduced over both workers: every eval row counted
    assert m["eval_rows"] == one["eval_rows"] > 0
    assert 0 < m["ne"] < 2 and m["train_examples_per_s"] > 0


def test_remove_policy_needs_to_know_what_to_remove(tiny, tmp_path, capsys):
    events, segs = tiny
    with pytest.raises(ValueError, match="--removed-from"):
        run_train(events, segs, str(tmp_path), _cfg(policy="remove-passive"))
    argv = ["train", events, segs, str(tmp_path / "r"), "--policy", "remove-active"]
    assert dynamix([*argv, "--removed-from", str(tmp_path / "none")]) == 2
    assert "train a baseline" in capsys.readouterr().err
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "metrics.json").write_text('{"policy": "boost-all"}')
    assert dynamix([*argv, "--removed-from", str(tmp_path / "fake")]) == 2
    assert "no permutation importance" in capsys.readouterr().err


def _kill_a_train_worker_after_first_checkpoint(storage: str, stop: threading.Event):
    """SIGKILL this run's Ray Train worker (a process of this session's Ray started
    after the run began) once the controller has registered a checkpoint."""
    started = time.time() - 1
    deadline = time.time() + 240
    while not stop.is_set() and time.time() < deadline:
        # the controller has registered a checkpoint (not just its upload)
        done = any(
            "checkpoint_manager_snapshot.json" in files
            for _, _, files in os.walk(storage)
        )
        if done:
            for p in psutil.process_iter(["pid", "cmdline", "create_time"]):
                title = " ".join(p.info["cmdline"] or [])
                if title.startswith("ray::RayTrainWorker") and (
                    p.info["create_time"] >= started
                ):
                    os.kill(p.pid, signal.SIGKILL)
                    return p.pid
        time.sleep(0.05)
    return None


def test_killed_training_worker_resumes_from_checkpoint(tiny, tmp_path):
    events, segs = tiny
    stop = threading.Event()
    killed: list[int | None] = []
    t = threading.Thread(
        target=lambda: killed.append(
            _kill_a_train_worker_after_first_checkpoint(str(tmp_path), stop)
        )
    )
    t.start()
    try:
        m = run_train(
            events,
            segs,
            str(tmp_path),
            _cfg(epochs=1, max_failures=2, checkpoint_steps=4, importance_rows=0),
        )
    finally:
        stop.set()
        t.join()
    assert killed and killed[0] is not None, "no training worker was killed"
    assert m["epoch"] == 0
    # restarted from a checkpoint inside the epoch, not from scratch ...
    assert m["resumed_at_step"] > 0
    # ... and trained every row of the epoch exactly once: the count and the
    # sums of the unique sample ids equal those of the whole training split
    ids = [
        int(i)
        for f in read_sample_table(str(tmp_path)).files("train")
        for i in pq.read_table(f, columns=["sample_id"]).column(0).to_numpy()
    ]
    assert m["epoch_rows"] == len(ids)
    assert int(m["epoch_id_sum"]) == sum(ids)
    assert int(m["epoch_id_sq_sum"]) == sum(i * i for i in ids)


def test_relative_paths_reach_the_workers_whole(tiny, tmp_path, monkeypatch):
    """Ray Train workers run in another folder: paths given relative to the
    caller's still find the events, so histories are gathered (a batch's
    bytes per row are those of (B, L) histories, not of the compact row)."""
    events, segs = tiny
    monkeypatch.chdir(tmp_path)
    rel_events, rel_segs = os.path.relpath(events), os.path.relpath(segs)
    assert not os.path.isabs(rel_events)
    m = run_train(rel_events, rel_segs, "out", _cfg(importance_rows=0))
    assert m["loader_bytes_per_row"] > 1000
    assert 0 < m["ne"] < 2


def test_the_same_seed_gives_the_same_run(tiny, tmp_path):
    """Bitwise on CPU with one worker: the same batches in the same order,
    the same weights, the same NE; another seed differs."""
    import torch

    events, segs = tiny
    runs = [
        run_train(events, segs, str(tmp_path / name), _cfg(importance_rows=0, seed=s))
        for name, s in (("a", 3), ("b", 3), ("c", 4))
    ]
    a, b, c = runs
    assert a["ne"] == b["ne"] and a["auc"] == b["auc"]
    assert a["epoch_id_sum"] == b["epoch_id_sum"]
    wa = torch.load(f"{a['checkpoint']}/state.pt", weights_only=True)["model"]
    wb = torch.load(f"{b['checkpoint']}/state.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert c["ne"] != a["ne"]
    # the binned AUC states its own error bound
    assert 0 <= a["auc_max_error"] < 0.05


def test_ne_curve_has_a_point_per_window_and_one_for_the_partial_tail():
    from dynamix_ray.model.metrics import ne_from_sums
    from dynamix_ray.train import NECurve

    curve = NECurve(every=2, world=3)
    labels = [np.array([1.0, 0.0]), np.array([0.0, 0.0]), np.array([1.0, 1.0, 0.0])]
    losses = [0.5, 0.25, 0.75]
    for step, (loss, y) in enumerate(zip(losses, labels, strict=True), start=1):
        curve.add(step, loss, y)
    curve.close()
    # window 1: steps 1-2 (4 rows, 1 positive); window 2: step 3 (3 rows, 2)
    want_1 = ne_from_sums(0.5 * 2 + 0.25 * 2, 4, 1)
    want_2 = ne_from_sums(0.75 * 3, 3, 2)
    assert curve.points == [[12, want_1], [21, want_2]]  # rows x 3 workers
    curve.close()  # an empty window adds no point
    assert len(curve.points) == 2


def test_epoch_metrics_are_the_workers_summed_rates():
    from dynamix_ray.model.metrics import ScoreHistogram
    from dynamix_ray.train import epoch_metrics

    hist = ScoreHistogram()
    sums = {
        **{f"{g}.{k}": 0.0 for g in ("active", "passive") for k in ("n", "ll", "pos")},
        "all.n": 10.0,
        "all.ll": 5.0,
        "all.pos": 3.0,
        "steady_n": 800.0,
        "steady_s": 4.0,  # two workers, 2 s each
        "load_rows": 1000.0,
        "load_s": 2.0,
        "batch_bytes": 5000.0,
        "batches": 10.0,
        "epoch_rows": 1000.0,
    }
    m = epoch_metrics(1, (0, 5), sums, hist.to_array(), (7, 49), 10, [], world=2)
    assert m["train_examples_per_s"] == 400.0 and m["loader_rows_per_s"] == 1000.0
    assert m["loader_bytes_per_batch"] == 500.0 and m["loader_bytes_per_row"] == 5.0
    assert (m["resumed_at_epoch"], m["resumed_at_step"]) == (0, 5)
    assert m["epoch_id_sum"] == "7" and m["eval_rows"] == 10
    assert m["ne_active"] is None  # no active rows evaluated
    sums["steady_s"] = 0.0
    assert (
        epoch_metrics(1, (0, 0), sums, hist.to_array(), (0, 0), 0, [], 1)[
            "train_examples_per_s"
        ]
        is None
    )


def test_serving_cuts_histories_as_the_run_was_trained(tiny, tmp_path):
    """A run trained with a non-default sequence length and buffer is served
    with them, read from its checkpoint (also after its OUT moved)."""
    import torch

    from dynamix_ray.features import to_model_batch
    from dynamix_ray.histories import read_histories, run_histories
    from dynamix_ray.model.config import CANDIDATE_ATTRIBUTES
    from dynamix_ray.serve.ranker import Ranker

    events, segs = tiny
    samples = SampleConfig(max_seq_len=5, buffer_s=600)
    out = tmp_path / "run"
    run_train(events, segs, str(out), _cfg(samples=samples, importance_rows=0))
    moved = tmp_path / "moved"
    out.rename(moved)
    hist_out = str(tmp_path / "hist")
    run_histories(events, hist_out, None, 8, progress=False)
    hist = read_histories(hist_out)
    ranker = Ranker(str(moved), hist, 1)
    assert ranker.samples == samples and ranker.model_cfg.max_seq_len == 5
    users = hist.user_id[:3]
    t = np.full(3, hist.as_of_ms - 3_600_000, np.int64)
    cand = np.arange(len(CANDIDATE_ATTRIBUTES))[None] % 5
    got = np.concatenate(ranker.score(list(users), list(t), [cand] * 3))
    cols = hist.rows(users, t, ranker.features, 600_000, 5)
    cols["t_ms"] = t
    for j, a in enumerate(CANDIDATE_ATTRIBUTES):
        cols[f"cand.{a}"] = np.full(3, cand[0, j])
    with torch.no_grad():
        want = torch.sigmoid(ranker.model(to_model_batch(cols), ranker.features))
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)
