"""The binned AUC of ScoreHistogram is within its bound of the exact AUC, and
its counts merge like rows."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamix_ray.model.metrics import ScoreHistogram, auc

LOGIT_EDGES = [-20.0, 20.0, -25.0, 25.0, 0.0, float("inf"), -float("inf")]


@st.composite
def rows(draw, max_rows: int = 60):
    """Logits rich in ties, shared bins, edges and clipped values; 0/1 labels."""
    n = draw(st.integers(0, max_rows))
    bins = draw(st.sampled_from([1, 4, 64, 2**14]))
    logit = st.one_of(
        st.floats(-30, 30),
        st.sampled_from(LOGIT_EDGES),
        st.integers(-3, 3).map(lambda k: k * 0.001),  # a few bins, many ties
    )
    z = np.array(draw(st.lists(logit, min_size=n, max_size=n)), dtype=np.float64)
    y = np.array(draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)))
    return z, y, bins


@settings(max_examples=300, deadline=None)
@given(data=rows())
def test_binned_auc_within_bound_of_exact(data):
    """Exact ``auc`` counts a tied (equal-logit) pos-neg pair 1/2, a pair in one
    bin counts 1/2 here: each shared-bin pair is off by 0 or 1/2, so the gap is
    at most half the share of pairs sharing a bin."""
    z, y, bins = data
    h = ScoreHistogram(bins).add(z, y)
    binned, bound = h.auc()
    if y.sum() == 0 or y.sum() == len(y):
        assert binned is None and bound == 0.0
        return
    exact = auc(z, y)
    assert binned is not None
    assert abs(binned - exact) <= bound + 1e-12
    assert 0.0 <= bound <= 0.5 and 0.0 <= binned <= 1.0
    pairs_sharing = sum(int(p) * int(n) for p, n in zip(h.pos, h.neg, strict=True)) / (
        y.sum() * (len(y) - y.sum())
    )
    assert bound == pytest.approx(0.5 * pairs_sharing, abs=1e-15)


@settings(max_examples=200, deadline=None)
@given(data=rows(), seed=st.integers(0, 2**16))
def test_merge_of_halves_equals_whole(data, seed):
    z, y, bins = data
    half = np.random.default_rng(seed).random(len(z)) < 0.5
    a = ScoreHistogram(bins).add(z[half], y[half])
    b = ScoreHistogram(bins).add(z[~half], y[~half])
    whole = ScoreHistogram(bins).add(z, y)
    for merged in (a.merge(b), a + b, b + a):
        np.testing.assert_array_equal(merged.to_array(), whole.to_array())
        assert merged.auc() == whole.auc()


@settings(max_examples=100, deadline=None)
@given(data=rows())
def test_array_round_trip_and_summed_arrays(data):
    z, y, bins = data
    h = ScoreHistogram(bins, -20.0, 20.0).add(z, y)
    arr = h.to_array()
    assert arr.dtype == np.int64 and arr.shape == (2 * bins,)
    back = ScoreHistogram.from_array(arr)
    np.testing.assert_array_equal(back.to_array(), arr)
    assert back.bins == bins and back.auc() == h.auc()
    # what all_reduce gives: the sum of the workers' arrays (int64 or float64)
    summed = ScoreHistogram.from_array(arr.astype(np.float64) + arr)
    np.testing.assert_array_equal(summed.to_array(), (h + h).to_array())


@settings(max_examples=100, deadline=None)
@given(
    ks=st.lists(st.integers(0, 2**14 - 1), min_size=2, max_size=50, unique=True),
    labels=st.lists(st.integers(0, 1), min_size=50, max_size=50),
)
def test_separated_scores_give_exact_auc_and_zero_bound(ks, labels):
    """Every row in its own bin (bin centres): no pair shares a bin."""
    y = np.array(labels[: len(ks)])
    if y.sum() in (0, len(y)):
        y[0] = 1 - y[-1]
    width = 40.0 / 2**14
    z = -20.0 + (np.array(ks) + 0.5) * width
    binned, bound = ScoreHistogram().add(z, y).auc()
    assert bound == 0.0
    assert binned == pytest.approx(auc(z, y), abs=1e-15)


@settings(max_examples=100, deadline=None)
@given(
    ks=st.lists(st.integers(0, 2**14 - 1), min_size=1, max_size=8, unique=True),
    picks=st.lists(st.tuples(st.integers(0, 7), st.integers(0, 1)), min_size=2),
)
def test_ties_within_a_bin_count_half_in_both(ks, picks):
    """Equal logits share a bin and count 1/2 in the exact AUC too: with one
    distinct logit per bin the binned AUC is exact although the bound is not 0."""
    z = np.array([-20.0 + (ks[i % len(ks)] + 0.5) * 40.0 / 2**14 for i, _ in picks])
    y = np.array([label for _, label in picks])
    binned, bound = ScoreHistogram().add(z, y).auc()
    if y.sum() in (0, len(y)):
        assert binned is None
        return
    assert binned == pytest.approx(auc(z, y), abs=1e-15)


def test_no_positive_or_no_negative_gives_none():
    assert ScoreHistogram().auc() == (None, 0.0)
    assert ScoreHistogram().add([0.1, 2.0], [0, 0]).auc() == (None, 0.0)
    assert ScoreHistogram().add([0.1, 2.0], [1, 1]).auc() == (None, 0.0)
    with pytest.raises(ValueError, match="both classes"):
        auc([0.1, 2.0], [0, 0])


def test_known_values_and_clipping():
    h = ScoreHistogram().add([2.0, -1.0, 0.5], [1, 0, 0])
    assert h.auc() == (1.0, 0.0)
    # clipped into the end bins: one shared pair of two, counted 1/2 +- 1/2
    h = ScoreHistogram().add([50.0, 30.0, -40.0], [1, 0, 0])
    assert h.auc() == (0.75, 0.25)
    assert auc([50.0, 30.0, -40.0], [1, 0, 0]) == 1.0


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="NaN"):
        ScoreHistogram().add([0.1, float("nan")], [0, 1])
    with pytest.raises(ValueError, match="labels"):
        ScoreHistogram().add([0.1, 0.2], [0, 1, 1])
    with pytest.raises(ValueError, match="differ"):
        ScoreHistogram(64).merge(ScoreHistogram(32))
    with pytest.raises(ValueError, match="whole numbers"):
        ScoreHistogram.from_array(np.array([0.5, 1.0]))
    with pytest.raises(ValueError, match="lo < hi"):
        ScoreHistogram(16, 1.0, -1.0)
