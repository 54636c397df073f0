"""Tiers with hysteresis (segments/tiers.py): the vectorised scan equals the
plain per-user loop; the unequal-variance statistic is Welch's t."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamix_ray.segments.tiers import (
    cut_tiers,
    flips_per_user_day,
    hysteresis_tiers,
    reference_hysteresis_tiers,
    statistic,
)

H = 3_600_000


@st.composite
def _rows(draw):
    n = draw(st.integers(0, 80))
    users = draw(st.lists(st.integers(0, 6), min_size=n, max_size=n))
    # distinct (user, window) rows in any order
    windows = draw(st.lists(st.integers(0, 200), min_size=n, max_size=n, unique=True))
    values = draw(
        st.lists(
            st.one_of(st.just(float("nan")), st.floats(0, 2, allow_nan=False)),
            min_size=n,
            max_size=n,
        )
    )
    th = sorted(draw(st.sets(st.sampled_from([0.1, 0.3, 0.5, 0.9, 1.2]), min_size=1)))
    band = draw(st.sampled_from([0.0, 0.05, 0.2]))
    return (
        np.array(users, np.int64),
        np.array(windows, np.int64) * 6 * H,
        np.array(values, np.float64),
        np.array(th),
        band,
    )


@settings(max_examples=200, deadline=None)
@given(_rows())
def test_the_scan_equals_the_per_user_loop(rows):
    u, w, v, th, band = rows
    got = hysteresis_tiers(u, w, v, th, band)
    np.testing.assert_array_equal(got, reference_hysteresis_tiers(u, w, v, th, band))
    assert ((got >= 0) & (got <= len(th))).all()


def test_a_band_keeps_a_user_in_tier_until_crossed_by_more_than_it():
    u = np.zeros(6, np.int64)
    w = np.arange(6) * 6 * H
    v = np.array([0.35, 0.28, np.nan, 0.2, 0.33, 0.45])
    # without a band: up, down, (null: passive), down, up, up
    np.testing.assert_array_equal(cut_tiers(v, np.array([0.3])), [1, 0, 0, 0, 1, 1])
    # band 0.05 around 0.3: up only above 0.35, down only below 0.25
    got = hysteresis_tiers(u, w, v, np.array([0.3]), 0.05)
    np.testing.assert_array_equal(got, [0, 0, 0, 0, 0, 1])
    got = hysteresis_tiers(u, w, np.r_[0.4, v[1:]], np.array([0.3]), 0.05)
    np.testing.assert_array_equal(got, [1, 1, 1, 0, 0, 1])
    assert flips_per_user_day(u, w, got) == 2 / 2  # two flips over two days
    with pytest.raises(ValueError, match="increasing"):
        cut_tiers(v, np.array([0.5, 0.3]))


def test_welch_t_uses_each_labels_own_variance():
    t = pa.table(
        {
            "corr": [0.5, None, 0.2],
            "w_mle": [1.0, None, -0.4],
            "var_near": [0.04, None, 0.0],
            "var_far": [0.16, 0.1, 0.0],
            "n_near": [4, 1, 3],
            "n_far": [16, 5, 3],
        }
    )
    got = statistic(t, "welch")
    assert got[0] == pytest.approx(0.5 / np.sqrt(0.04 / 4 + 0.16 / 16))
    assert np.isnan(got[1]) and np.isnan(got[2])  # no variance: no t
    np.testing.assert_allclose(statistic(t, "w_mle"), [1.0, np.nan, 0.4])
    # Jeffreys: 0.25 (1/0.04 + 1/0.16) / 2 + (0.25 + 4) / 2 - 1
    j = statistic(t, "jeffreys")
    assert j[0] == pytest.approx(0.25 * (25 + 6.25) / 2 + 4.25 / 2 - 1)
    assert np.isnan(j[1]) and np.isnan(j[2])
    with pytest.raises(ValueError, match="unknown statistic"):
        statistic(t, "median")
