"""Epsilon from small questions to partitions equals calibrate_epsilon of the
concatenation, bit for bit; the answers merge and stay small."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynamix_ray.segments import calibrate_epsilon
from dynamix_ray.segments.select import (
    KEY_END,
    MAX_BINS,
    Count,
    Histogram,
    HistogramAnswer,
    Neighbors,
    ValuesIn,
    answer,
    calibrate_epsilon_distributed,
    calibrate_epsilon_distributed_stats,
    float_keys,
    key_to_float,
    merge,
    worst_case_rounds,
)

INF = float("inf")
TINY = 5e-324  # smallest subnormal
SPECIAL = [
    0.0,
    -0.0,
    TINY,
    2 * TINY,
    2.2250738585072014e-308,  # smallest normal
    0.5,
    float(np.nextafter(0.5, 0.0)),
    float(np.nextafter(0.5, 1.0)),
    1.0,
    float(np.nextafter(1.0, 0.0)),
    1 / 3,
    2 / 3,
    1.7976931348623157e308,
    INF,
]
FRACTIONS = [1 / 3, 2 / 3, 0.5, 0.1, TINY, 1 - 2**-53, float(np.nextafter(0.5, 1))]


def ask_of(parts, counts=None):
    """The test's stand-in for one pass of Ray tasks over the partitions."""
    if counts is None:
        counts = [None] * len(parts)
    return lambda q: merge(
        q, [answer(p, q, c) for p, c in zip(parts, counts, strict=True)]
    )


def bits(x: float) -> int:
    return int(np.array([x + 0.0], dtype=np.float64).view(np.uint64)[0])  # -0 -> 0


def reference(a: np.ndarray, frac: float) -> float:
    """calibrate_epsilon itself (its midpoint of two huge floats overflows to
    inf by design: then it takes the lower value)."""
    with np.errstate(over="ignore"):
        return calibrate_epsilon(a, frac)


def concat(parts) -> np.ndarray:
    return np.concatenate([np.zeros(0), *parts])


def assert_same(got: float, expected: float) -> None:
    """Bit for bit, up to the sign of a zero (-0.0 inputs are mapped to 0.0)."""
    assert got == expected and bits(got) == bits(expected), (got, expected)


@st.composite
def partition(draw, max_size: int = 12) -> np.ndarray:
    """Values rich in ties, zeros, adjacent floats and far-apart binades."""
    kind = draw(st.sampled_from(["uniform", "special", "adjacent", "binades", "mix"]))
    m = draw(st.integers(0, max_size))
    if kind == "uniform":
        v = draw(st.lists(st.floats(0, 1), min_size=m, max_size=m))
    elif kind == "special":
        v = draw(st.lists(st.sampled_from(SPECIAL), min_size=m, max_size=m))
    elif kind == "adjacent":  # a few ulps apart: midpoints may not exist
        base = draw(st.sampled_from([0.0, TINY, 0.3, 1.0, 2 / 3, 1e300]))
        steps = draw(st.lists(st.integers(0, 4), min_size=m, max_size=m))
        v = [_ulps_above(base, k) for k in steps]
    elif kind == "binades":
        exps = draw(st.lists(st.integers(-1074, 1023), min_size=m, max_size=m))
        v = [math.ldexp(1.0, e) for e in exps]
    else:
        v = draw(
            st.lists(
                st.one_of(
                    st.sampled_from(SPECIAL),
                    st.floats(0, allow_nan=False, allow_infinity=True),
                ),
                min_size=m,
                max_size=m,
            )
        )
    a = np.array(v, dtype=np.float64)
    if draw(st.booleans()):  # ties: repeat each value 1-3 times
        a = np.repeat(a, draw(st.lists(st.integers(1, 3), min_size=m, max_size=m)))
    return a


def _ulps_above(x: float, k: int) -> float:
    for _ in range(k):
        x = float(np.nextafter(x, INF))
    return x


fractions = st.one_of(
    st.floats(0, 1, exclude_min=True, exclude_max=True), st.sampled_from(FRACTIONS)
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    parts=st.lists(partition(), max_size=5),
    frac=fractions,
    max_fetch=st.sampled_from([0, 1, 2, 7, 65536]),
    bits_per_round=st.sampled_from([1, 3, 12]),
)
def test_equals_calibrate_epsilon_of_concatenation(
    parts, frac, max_fetch, bits_per_round
):
    got, stats = calibrate_epsilon_distributed_stats(
        ask_of(parts), frac, max_fetch, bits_per_round
    )
    assert_same(got, reference(concat(parts), frac))
    assert stats.n == sum(len(p) for p in parts)
    assert stats.rounds <= worst_case_rounds(bits_per_round)
    if not stats.plateau_search:
        assert stats.rounds <= math.ceil(63 / bits_per_round) + 1
    assert stats.fetched_values <= 2 * max_fetch


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    distinct=st.lists(
        st.one_of(st.floats(0, 1), st.sampled_from(SPECIAL)),
        min_size=1,
        max_size=4,
    ),
    repeats=st.lists(st.integers(1, 60_000), min_size=4, max_size=4),
    n_parts=st.integers(1, 4),
    frac=fractions,
    seed=st.integers(0, 2**16),
)
def test_huge_n_few_distinct_values(distinct, repeats, n_parts, frac, seed):
    """np.repeat: many rows, few distinct values, split at random."""
    a = np.repeat(np.array(distinct), repeats[: len(distinct)])
    np.random.default_rng(seed).shuffle(a)
    parts = np.array_split(a, n_parts)
    got = calibrate_epsilon_distributed(ask_of(parts), frac, max_fetch=100)
    assert_same(got, reference(a, frac))


@pytest.mark.parametrize("frac", [0.0, 1.0, -0.5, 1.5, INF, -INF, float("nan")])
@settings(max_examples=30, deadline=None)
@given(parts=st.lists(partition(), max_size=3))
def test_fractions_outside_the_unit_interval_as_calibrate_epsilon(parts, frac):
    assert_same(
        calibrate_epsilon_distributed(ask_of(parts), frac),
        reference(concat(parts), frac),
    )


def test_known_values():
    a = np.arange(1, 10, dtype=float)  # 1..9: 6 of 9 active above 3.5
    parts = [a[:4], np.zeros(0), a[4:]]
    assert calibrate_epsilon_distributed(ask_of(parts), 2 / 3) == 3.5
    assert calibrate_epsilon_distributed(ask_of([]), 0.5) == 0.0
    assert calibrate_epsilon_distributed(ask_of([np.zeros(0)]), 0.5) == 0.0
    assert calibrate_epsilon_distributed(ask_of([np.array([0.25])]), 0.9) == 0.125
    assert calibrate_epsilon_distributed(ask_of([np.array([0.25])]), 0.1) == 0.25
    same = [np.full(5, 0.5), np.full(3, 0.5)]  # ties cannot be split
    assert calibrate_epsilon_distributed(ask_of(same), 2 / 3) == 0.25


# ----------------------------------------------- run-length partitions, huge n


def calibrate_from_counts(u: np.ndarray, counts: np.ndarray, frac: float) -> float:
    """Test oracle: calibrate_epsilon's formula on sorted distinct values and
    their counts, for row counts too large to materialise."""
    n = int(counts.sum())
    above = n - np.cumsum(counts)
    with np.errstate(over="ignore"):
        mid = (u[:-1] + u[1:]) / 2.0
    mid = np.where(mid < u[1:], mid, u[:-1])
    thresholds = np.append(mid, u[-1])
    shares = above / n
    if u[0] > 0:
        thresholds = np.insert(thresholds, 0, u[0] / 2.0)
        shares = np.insert(shares, 0, 1.0)
    return float(thresholds[int(np.argmin(np.abs(shares - frac)))])


def _runs(values, counts):
    """Distinct sorted values and summed counts of run-length partitions."""
    v = np.concatenate([np.zeros(0), *values]) + 0.0
    c = np.concatenate([np.zeros(0, np.int64), *counts])
    u, inv = np.unique(v, return_inverse=True)
    total = np.zeros(len(u), np.int64)
    np.add.at(total, inv, c)
    return u[total > 0], total[total > 0]


@st.composite
def run_length_parts(draw, max_count: int):
    k = draw(st.integers(1, 3))
    values, counts = [], []
    for _ in range(k):
        m = draw(st.integers(0, 3))
        values.append(
            np.array(
                draw(st.lists(st.sampled_from(SPECIAL), min_size=m, max_size=m)),
                dtype=np.float64,
            )
        )
        counts.append(
            np.array(
                draw(
                    st.lists(
                        st.one_of(st.integers(0, 300), st.integers(0, max_count)),
                        min_size=m,
                        max_size=m,
                    )
                ),
                dtype=np.int64,
            )
        )
    return values, counts


@settings(max_examples=100, deadline=None)
@given(rl=run_length_parts(max_count=5), frac=fractions)
def test_oracle_and_run_length_answers_match_plain(rl, frac):
    values, counts = rl
    plain = [np.repeat(v, c) for v, c in zip(values, counts, strict=True)]
    u, c = _runs(values, counts)
    expected = reference(concat(plain), frac)
    if len(u):
        assert_same(calibrate_from_counts(u, c, frac), expected)
    assert_same(
        calibrate_epsilon_distributed(ask_of(values, counts), frac, max_fetch=3),
        expected,
    )


@settings(max_examples=300, deadline=None)
@given(
    rl=run_length_parts(max_count=2**58),
    frac=st.one_of(
        fractions,
        st.integers(1, 2**20).map(lambda k: 1 - k * 2**-53),  # shares near 1
        st.integers(1, 64).map(lambda k: 1 - k * 2**-53),
        st.integers(1, 2**20).map(lambda k: k * 2**-60),  # shares near 0
    ),
)
def test_exact_beyond_2_to_53_rows(rl, frac):
    """n up to ~2**61: distinct counts round to one float share, and the
    first-index tie rule reaches past the two candidates next to the rank."""
    values, counts = rl
    u, c = _runs(values, counts)
    got = calibrate_epsilon_distributed(ask_of(values, counts), frac, max_fetch=4)
    assert_same(got, calibrate_from_counts(u, c, frac) if len(u) else 0.0)


@st.composite
def sandwiches(draw):
    """Run-length partitions where a few rows lie between ~2**58-row values
    and the target is within a few ulps of an achievable share: distinct
    active counts round to one share, the first-index tie rule decides."""
    u = np.unique(
        np.array(draw(st.lists(st.sampled_from(SPECIAL), min_size=2, max_size=8))) + 0.0
    )
    c = np.array(
        draw(
            st.lists(
                st.sampled_from([1, 2, 5, 2**57, 2**58 + 1]),
                min_size=len(u),
                max_size=len(u),
            )
        ),
        dtype=np.int64,
    )
    n = int(c.sum())
    active = draw(st.sampled_from([n, *(n - np.cumsum(c)).tolist()]))
    frac = float(np.int64(active) / n)
    for _ in range(draw(st.integers(0, 3))):
        frac = float(np.nextafter(frac, draw(st.sampled_from([-INF, INF]))))
    side = np.array(draw(st.lists(st.booleans(), min_size=len(u), max_size=len(u))))
    return [u[side], u[~side]], [c[side], c[~side]], frac


@settings(max_examples=200, deadline=None)
@given(case=sandwiches())
def test_ties_of_rounded_shares_beyond_2_to_53_rows(case):
    values, counts, frac = case
    u, c = _runs(values, counts)
    got = calibrate_epsilon_distributed(ask_of(values, counts), frac, max_fetch=2)
    assert_same(got, calibrate_from_counts(u, c, frac))


def test_plateau_of_equal_gaps_picks_the_first():
    """Five values of one row and 2**60 rows of 0.9: every share of five or
    more active rows rounds to 1.0, so "everyone active" (eps = 0.1 / 2) ties
    with the candidate next to the target rank and wins by coming first."""
    u = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.9])
    c = np.array([1, 1, 1, 1, 1, 2**60], dtype=np.int64)
    frac = 1 - 2**-53
    eps, stats = calibrate_epsilon_distributed_stats(
        ask_of([u[:3], u[3:]], [c[:3], c[3:]]), frac
    )
    assert stats.plateau_search
    assert eps == calibrate_from_counts(u, c, frac) == 0.05
    assert stats.rounds <= worst_case_rounds()


# ----------------------------------------------- answers stay small


@pytest.mark.parametrize("data", ["uniform", "three_values"])
def test_million_values_small_answers_bounded_rounds(data):
    rng = np.random.default_rng(0)
    n = 1_000_000
    if data == "uniform":
        a = np.abs(rng.standard_normal(n)) / 4  # |corr|-like, many binades
    else:
        a = rng.choice([0.0, 0.3, 0.7], n)
    parts = np.array_split(a, 8)
    sizes: list[tuple[str, int]] = []

    def ask(q):
        per_part = [answer(p, q) for p in parts]
        merged = merge(q, per_part)
        for got in [*per_part, merged]:
            if isinstance(q, ValuesIn):
                sizes.append(("values", len(got)))
            elif isinstance(q, Histogram):
                sizes.append(("bins", len(got.counts)))
        return merged

    eps, stats = calibrate_epsilon_distributed_stats(ask, 2 / 3, max_fetch=1000)
    assert_same(eps, reference(a, 2 / 3))
    assert all(k <= 1000 for kind, k in sizes if kind == "values")
    assert all(k <= MAX_BINS for kind, k in sizes if kind == "bins")
    assert stats.fetched_values <= 1000 and stats.largest_answer <= MAX_BINS + 2
    assert stats.rounds <= math.ceil(63 / 12) + 1 == 7
    assert not stats.plateau_search


# ----------------------------------------------- keys, answers, merging


@settings(max_examples=200, deadline=None)
@given(
    x=st.one_of(st.sampled_from(SPECIAL), st.floats(0, allow_nan=False)),
    y=st.one_of(st.sampled_from(SPECIAL), st.floats(0, allow_nan=False)),
)
def test_keys_preserve_order(x, y):
    kx, ky = (int(k) for k in float_keys(np.array([x, y])))
    assert (x < y) == (kx < ky) and (x == y) == (kx == ky)
    assert kx < KEY_END and key_to_float(kx) == x and bits(key_to_float(kx)) == bits(x)


@st.composite
def question(draw):
    kind = draw(st.sampled_from(["count", "hist", "values", "neighbors"]))
    if kind == "count":
        return Count()
    if kind == "neighbors":
        return Neighbors(draw(st.sampled_from(SPECIAL)))
    lo = draw(st.integers(0, KEY_END - 1))
    hi = draw(st.integers(lo + 1, KEY_END))
    if kind == "values":
        return ValuesIn(lo, hi)
    shift = max((hi - lo - 1).bit_length() - draw(st.integers(0, 12)), 0)
    return Histogram(lo, hi, shift)


def _same_answer(a, b) -> bool:
    if isinstance(a, HistogramAnswer):
        return (a.n_below, a.n_above) == (b.n_below, b.n_above) and np.array_equal(
            a.counts, b.counts
        )
    if isinstance(a, np.ndarray):
        return np.array_equal(np.sort(a), np.sort(b))
    return a == b


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(partition(), max_size=4), q=question())
def test_merged_answers_equal_answer_of_union(parts, q):
    assert _same_answer(
        merge(q, [answer(p, q) for p in parts]), answer(concat(parts), q)
    )


@settings(max_examples=200, deadline=None)
@given(rl=run_length_parts(max_count=4), q=question())
def test_run_length_answer_equals_repeated(rl, q):
    values, counts = rl
    for v, c in zip(values, counts, strict=True):
        assert _same_answer(answer(v, q, c), answer(np.repeat(v, c), q))


@pytest.mark.parametrize("bad", [float("nan"), -1.0, -TINY, -INF])
def test_nan_and_negative_values_raise(bad):
    a = np.array([0.1, bad, 0.5])
    with pytest.raises(ValueError, match="NaN"):
        float_keys(a)
    for q in (Count(), Histogram(0, KEY_END, 51), ValuesIn(0, 10), Neighbors(0.2)):
        with pytest.raises(ValueError, match="NaN"):
            answer(a, q)
    with pytest.raises(ValueError, match="NaN"):
        calibrate_epsilon_distributed(ask_of([np.array([0.3]), a]), 0.5)


def test_malformed_questions_and_answers_raise():
    with pytest.raises(ValueError, match="bins"):
        Histogram(0, KEY_END, 50)  # 8192 bins
    with pytest.raises(ValueError, match="lo_key"):
        Histogram(5, 5, 0)
    with pytest.raises(ValueError, match="counts"):
        answer(np.array([0.1, 0.2]), Count(), np.array([1, -1]))
    with pytest.raises(TypeError, match="expected HistogramAnswer"):
        calibrate_epsilon_distributed(lambda q: 3, 0.5)
    with pytest.raises(ValueError, match="bits_per_round"):
        calibrate_epsilon_distributed(ask_of([]), 0.5, bits_per_round=13)


def test_partitions_changing_during_the_search_raise():
    parts = [np.linspace(0, 1, 50)]

    def ask(q):
        got = merge(q, [answer(p, q) for p in parts])
        parts.append(np.array([0.5]))  # a partition arrives mid-search
        return got

    with pytest.raises(RuntimeError, match="must not change"):
        calibrate_epsilon_distributed(ask, 0.5, max_fetch=0)


# ------------------------------------------------- calibrating to ad traffic


def brute_force_traffic(a, w, total, target):
    """Every threshold calibrate_epsilon could return, scored by the traffic
    share it makes active: the smallest |share - target| is all that is
    asked of calibrate_epsilon_traffic."""
    cands = np.concatenate([[0.0], a, a / 2.0, [np.inf]])
    shares = [float(w[a > c].sum()) / total for c in cands]
    return min(abs(s - target) for s in shares)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.9, 1.5]), st.integers(0, 40)),
        min_size=1,
        max_size=30,
    ),
    st.integers(0, 500),
    st.floats(0.01, 0.99),
)
def test_traffic_calibration_reaches_the_closest_traffic_share(rows, ineligible, f):
    """Rows of equal |corr| cannot be split, ineligible traffic stays passive:
    the share of all impressions made active is still the closest one any
    threshold achieves, and the distributed search (run-length answers, one
    count per impression) returns the plain reference's float."""
    from dynamix_ray.segments.epsilon import (
        calibrate_epsilon_traffic,
        traffic_fraction,
    )

    a = np.array([r[0] for r in rows])
    w = np.array([r[1] for r in rows], dtype=np.int64)
    total = int(w.sum()) + ineligible
    if total == 0:
        return
    eps = calibrate_epsilon_traffic(a, w, total, f)
    got = float(w[a > eps].sum()) / total
    assert abs(got - f) <= brute_force_traffic(a, w, total, f) + 1e-12
    half = len(a) // 2
    parts, counts = [a[:half], a[half:]], [w[:half], w[half:]]
    frac = traffic_fraction(f, int(w.sum()), total)
    assert calibrate_epsilon_distributed(ask_of(parts, counts), frac) == eps
