"""The experiment's plain core: the epsilon sweep against its reference loop,
per-seed summaries, the throughput harnesses, FLOPs per request, the plots."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamix_ray.experiments import (
    ExperimentConfig,
    inference_qps,
    mean_std,
    paired_gain,
    predicted_gain,
    request_flops,
    summarize_arms,
    summarize_experiment,
)
from dynamix_ray.features import FeatureSet, policy_features
from dynamix_ray.model import ModelConfig, flops_per_sample
from dynamix_ray.segments.epsilon import (
    log_loss,
    ne_by_threshold,
    reference_ne_by_threshold,
    separation_epsilon,
    sweep_thresholds,
)

PNG = b"\x89PNG\r\n\x1a\n"


@st.composite
def sweep_inputs(draw):
    n = draw(st.integers(0, 40))
    levels = draw(st.sampled_from([[0.1, 0.5, 0.9], [0.0, 0.3], [0.2]]))
    corr = np.array(
        draw(
            st.lists(
                st.one_of(st.sampled_from(levels), st.floats(0, 2), st.just(math.nan)),
                min_size=n,
                max_size=n,
            )
        ),
        dtype=np.float64,
    )
    labels = np.array(
        draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=n, max_size=n))
    )
    logits = np.array(draw(st.lists(st.floats(-6, 6), min_size=n, max_size=n)))
    thresholds = np.array(
        draw(st.lists(st.one_of(st.sampled_from(levels), st.floats(0, 2)), max_size=6))
    )
    share = draw(st.sampled_from([0.0, 0.05, 0.1, 0.3]))
    return corr, labels, logits, thresholds, share


@settings(max_examples=150, deadline=None)
@given(sweep_inputs())
def test_ne_sweep_equals_the_plain_loop(inputs):
    """Ties at the threshold, NaN |corr| (always passive), empty sides, one
    class per side: the suffix-sum sweep equals the per-threshold loop."""
    corr, labels, logits, thresholds, share = inputs
    ll = log_loss(logits, labels)
    fast = ne_by_threshold(corr, ll, labels, thresholds, share)
    ref = reference_ne_by_threshold(corr, ll, labels, thresholds, share)
    for k in ("epsilon", "active_share", "ne_active", "ne_passive", "separation"):
        np.testing.assert_allclose(fast[k], ref[k], rtol=1e-9, atol=1e-12, err_msg=k)


def test_ne_sweep_side_limit_is_inclusive_like_the_loop():
    """20 rows, 2 or 18 of them active: a 10% side is large enough (float
    1 - 0.9 < 0.1 must not make the 2-row passive side 'too small')."""
    labels = np.array([1.0, 0.0] * 10)
    ll = log_loss(np.zeros(20), labels)
    for n_active in (2, 18):
        corr = np.array([0.9] * n_active + [0.0] * (20 - n_active))
        fast = ne_by_threshold(corr, ll, labels, np.array([0.05]), 0.1)
        ref = reference_ne_by_threshold(corr, ll, labels, np.array([0.05]), 0.1)
        assert fast["active_share"][0] == n_active / 20
        for side in ("ne_active", "ne_passive"):
            np.testing.assert_allclose(fast[side], ref[side])
            assert np.isfinite(fast[side][0]), (n_active, side)


def test_log_loss_matches_the_textbook_formula():
    z = np.array([-3.0, 0.0, 2.5])
    y = np.array([0.0, 1.0, 1.0])
    p = 1 / (1 + np.exp(-z))
    want = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    np.testing.assert_allclose(log_loss(z, y), want, rtol=1e-12)


def test_separation_epsilon_picks_the_widest_gap_and_none_when_undefined():
    sweep = {
        "epsilon": np.array([0.1, 0.2, 0.3]),
        "separation": np.array([0.01, np.nan, 0.05]),
    }
    assert separation_epsilon(sweep) == 0.3
    sweep["separation"] = np.array([np.nan, np.nan, np.nan])
    assert separation_epsilon(sweep) is None


def test_separation_finds_the_planted_split():
    """Rows with |corr| > 0.5 are predictable (low loss); a sweep must put
    epsilon where that split is."""
    rng = np.random.default_rng(0)
    corr = rng.uniform(0, 1, 4000)
    labels = rng.integers(0, 2, 4000).astype(float)
    good = corr > 0.5
    logits = np.where(good, np.where(labels == 1, 3.0, -3.0), 0.0)
    sweep = ne_by_threshold(
        corr, log_loss(logits, labels), labels, sweep_thresholds(corr, 41)
    )
    assert abs(separation_epsilon(sweep) - 0.5) < 0.05


def test_sweep_thresholds_span_the_eligible_shares():
    a = np.arange(1000) / 1000.0
    t = sweep_thresholds(np.append(a, np.nan), 37)
    assert np.all(np.diff(t) > 0)
    assert (a > t[0]).mean() == pytest.approx(0.975, abs=0.01)
    assert (a > t[-1]).mean() == pytest.approx(0.025, abs=0.01)
    assert len(sweep_thresholds(np.array([np.nan]))) == 0


def test_mean_std_skips_missing_values_and_reports_the_seeds():
    assert mean_std([1.0, 3.0]) == {
        "mean": 2.0,
        "std": math.sqrt(2),
        "values": [1.0, 3.0],
    }
    assert mean_std([2.0, None])["std"] is None
    assert mean_std([None])["mean"] is None


def test_summarize_arms_pairs_every_seed_with_its_baseline():
    runs = {
        "baseline": {
            0: {"ne": 0.90, "train_examples_per_s": 100.0, "inference_qps_change": 0.0},
            1: {"ne": 0.80, "train_examples_per_s": 200.0, "inference_qps_change": 0.0},
        },
        "remove-active": {
            0: {
                "ne": 0.91,
                "train_examples_per_s": 110.0,
                "inference_qps_change": 0.02,
            },
            1: {
                "ne": 0.79,
                "train_examples_per_s": 210.0,
                "inference_qps_change": 0.04,
            },
        },
    }
    s = summarize_arms(["baseline", "remove-active"], runs)
    arm = s["remove-active"]
    assert arm["seeds"] == [0, 1]
    assert arm["ne_gain"]["values"] == pytest.approx([-0.01, 0.01])
    assert arm["ne_gain_pct"]["values"] == pytest.approx(
        [-100 * 0.01 / 0.9, 100 * 0.01 / 0.8]
    )
    assert arm["train_qps_change_pct"]["values"] == pytest.approx([10.0, 5.0])
    assert arm["inference_qps_change_pct"]["mean"] == pytest.approx(3.0)
    assert s["baseline"]["ne_gain"]["mean"] == 0.0
    assert arm["ne"]["mean"] == pytest.approx(0.85)


def _check_rendered(summary, arms) -> None:
    """render_html (plain) writes one table row per arm, the figures and the
    notes, escaping what it shows."""
    from dynamix_ray.experiments import PAPER
    from dynamix_ray.report import render_html

    no_sep = {"epsilon": None}
    results = {
        "kind": "boosting",
        "seeds": [0],
        "inference_harness": "in-process <1 thread>",
        "tables": {"boosting": list(arms)},
        "arms": summary,
        "epsilon": {"calibrated": no_sep, "separation": no_sep},
        "removed": [],
        "planted_no_signal": [],
        "paper": PAPER,
    }
    page = render_html(results, 1234, [("dwell.png", "a <caption>")], ["a note"])
    # one row per arm, and the two epsilon choices (here: none)
    assert page.count("<tr><td>") == len(arms) + 2
    assert page.count("<td colspan=6>none</td>") == 2
    assert "1,234 segment rows" in page and "src='dwell.png'" in page
    assert "a &lt;caption&gt;" in page and "in-process &lt;1 thread&gt;" in page
    assert "class='note'>a note" in page and "Table 3 analog" in page
    # the separation epsilon of each seed's baseline, when there are several
    results["epsilon"]["separation_by_seed"] = {
        "mean": 0.25,
        "std": 0.05,
        "values": [0.2, 0.3, None],
    }
    page = render_html(results, 1234, [], [])
    assert "baseline: 0.2000, 0.3000, – (mean 0.2500, std 0.0500)" in page


def test_summarize_experiment_puts_measured_rounds_beside_what_flops_predict():
    cfg = ExperimentConfig(kind="boosting", seeds=(0,))
    arms = ("baseline", "boost-all", "boost-selective", "boost-selective-only")
    metrics = {
        a: {0: {"ne": 0.9, "train_examples_per_s": 100.0, "inference_qps_change": 0.0}}
        for a in arms
    }
    step = {"baseline": [100.0, 100.0], "boost-all": [80.0, 90.0]}
    step["boost-selective"] = [90.0, 95.0]
    step["boost-selective-only"] = [110.0, 105.0]
    qps = {
        0: {
            "baseline": [10.0],
            "boost-all": [8.0],
            "boost-selective": [9.0],
            "boost-selective-only": [11.0],
        }
    }
    flops = {"baseline": {0: 100, 1: 100}, "boost-all": {0: 200, 1: 200}}
    flops["boost-selective"] = {0: 120, 1: 200}
    flops["boost-selective-only"] = {0: 40, 1: 200}
    cost = {
        "flops_train": flops,
        "req_flops": flops,
        "share_train": 0.5,
        "share_inf": 0.25,
    }
    s = summarize_experiment(cfg, metrics, step, qps, cost, epsilon=0.3)
    _check_rendered(s, arms)
    sel = s["boost-selective"]
    assert sel["step_qps_change_pct"]["rounds"] == pytest.approx([-10.0, -5.0])
    assert sel["step_qps_change_pct"]["median"] == pytest.approx(-7.5)
    # FLOPs at the active share: 100 / (0.5 * 200 + 0.5 * 120) - 1
    assert sel["flop_train_change_pct"] == pytest.approx(100 * (100 / 160 - 1))
    assert sel["flop_inference_change_pct"] == pytest.approx(100 * (100 / 140 - 1))
    assert sel["mflop_per_request"] == {"passive": 120e-6, "active": 200e-6}
    assert sel["inference_qps_vs_boost_all_pct"]["mean"] == pytest.approx(12.5)
    only = s["boost-selective-only"]
    assert only["inference_qps_vs_boost_all_pct"]["mean"] == pytest.approx(37.5)
    from dynamix_ray.experiments import PAPER
    from dynamix_ray.report import render_html

    page = render_html(
        {
            "kind": "boosting",
            "seeds": [0],
            "inference_harness": "h",
            "tables": {"boosting": list(arms)},
            "arms": s,
            "epsilon": {
                "calibrated": {"epsilon": None},
                "separation": {"epsilon": None},
            },
            "removed": [],
            "planted_no_signal": [],
            "paper": PAPER,
        },
        1,
        [],
        [],
    )
    assert "boost-selective-only (the selection reading" in page
    assert "baseline: +4.2%" in page
    # the selection reading costs less than the baseline: 100 / (0.75*40 + 0.25*200)
    assert only["flop_inference_change_pct"] == pytest.approx(100 * (100 / 80 - 1))
    assert all(s[a]["epsilon"] == 0.3 for a in arms)


def test_paired_and_predicted_gains():
    assert paired_gain([110, 90, 105], [100, 100, 100]) == pytest.approx(0.05)
    # active 2/3 of the work at 9 instead of 10 FLOPs, passive unchanged
    assert predicted_gain({0: 10, 1: 9}, {0: 10, 1: 10}, 2 / 3) == pytest.approx(
        10 / (2 / 3 * 9 + 1 / 3 * 10) - 1
    )


def test_inference_harness_scores_every_request_with_every_arm_each_round():
    calls = {"a": 0, "b": 0}

    def scorer(name):
        def score(req):
            calls[name] += 1
            return np.zeros(len(req[3]))

        return score

    reqs = [(i % 2, i, 0, np.zeros((3, 2), np.int64)) for i in range(8)]
    out = inference_qps({"a": scorer("a"), "b": scorer("b")}, reqs, rounds=3)
    assert set(out) == {"a", "b"} and all(len(v) == 3 for v in out.values())
    assert all(q > 0 for v in out.values() for q in v)
    assert calls == {"a": 5 + 3 * 8, "b": 5 + 3 * 8}  # warm-up + rounds


def test_request_flops_pays_the_history_once():
    cfg = ModelConfig(max_seq_len=8)
    fs = policy_features("baseline", 1, (), FeatureSet())
    tower = flops_per_sample(cfg, fs, part="user_tower")
    # once per user: the tower and the target attention's K/V of the history
    user = flops_per_sample(cfg, fs, part="request_user")
    per = flops_per_sample(cfg, fs)
    assert tower < user < per
    assert request_flops(cfg, fs, 1) == per
    assert request_flops(cfg, fs, 100) == user + 100 * (per - user)
    boosted = policy_features("boost-all", 1, (), FeatureSet())
    assert request_flops(cfg, boosted, 100) > request_flops(cfg, fs, 100)
    assert isinstance(fs, FeatureSet)


def test_experiment_config_rejects_what_cannot_run():
    with pytest.raises(ValueError, match="kind"):
        ExperimentConfig(kind="tables")
    with pytest.raises(ValueError, match="seed"):
        ExperimentConfig(seeds=())
    with pytest.raises(ValueError, match="each seed once"):
        ExperimentConfig(seeds=(1, 1))
    with pytest.raises(ValueError, match="qps_rounds"):
        ExperimentConfig(qps_rounds=0)
    with pytest.raises(ValueError, match="other than the baseline"):
        ExperimentConfig(kind="boosting", skip_arms=("baseline",))
    with pytest.raises(ValueError, match="other than the baseline"):
        ExperimentConfig(kind="removal", skip_arms=("boost-all",))
    cfg = ExperimentConfig(kind="all", skip_arms=("boost-selective-only",))
    assert cfg.arms == (
        "baseline",
        "remove-passive",
        "remove-active",
        "boost-all",
        "boost-selective",
    )


def test_every_plot_writes_a_png(tmp_path):
    from dynamix_ray.report import (
        plot_corr_dist,
        plot_corr_hours,
        plot_curves,
        plot_dwell,
        plot_epsilon_sweep,
        plot_recovery,
        plot_timeline,
    )

    rng = np.random.default_rng(0)
    paths = [
        plot_dwell(
            {
                "active": {"near": rng.normal(9, 1, 50), "far": rng.normal(8, 1, 80)},
                "passive": {"near": np.zeros(0), "far": np.zeros(0)},
            },
            str(tmp_path / "d.png"),
            300,
        ),
        plot_corr_hours(
            {"u": (np.arange(5.0) * 6, rng.normal(0, 1, 5), np.array([0, 1, 1, 0, 1]))},
            0.3,
            str(tmp_path / "c.png"),
        ),
        plot_curves(
            {"baseline": [[[512, 1.0], [1024, 0.95], [2048, 0.9]]] * 2, "empty": [[]]},
            str(tmp_path / "k.png"),
        ),
        plot_epsilon_sweep(
            {
                "epsilon": [0.1, 0.2],
                "ne_active": [0.9, None],
                "ne_passive": [0.95, None],
                "separation": [0.05, None],
            },
            0.15,
            None,
            str(tmp_path / "e.png"),
        ),
        plot_corr_dist(rng.normal(0, 1, 100), 0.3, 0.5, str(tmp_path / "h.png")),
        plot_recovery(
            rng.uniform(0, 1, 100),
            rng.random(100) < 0.5,
            0.3,
            0.5,
            str(tmp_path / "r.png"),
        ),
        plot_timeline(
            {
                "rate_qps": 10,
                "phase_s": 2.0,
                "timeline": [
                    {"t": 0.0, "ActiveRanker": 1, "PassiveRanker": 1},
                    {"t": 3.0, "ActiveRanker": 2, "PassiveRanker": 1},
                ],
            },
            str(tmp_path / "t.png"),
        ),
    ]
    for p in paths:
        with open(p, "rb") as fh:
            assert fh.read(8) == PNG, p
