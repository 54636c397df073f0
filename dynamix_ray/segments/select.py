"""Exact epsilon calibration without gathering the data.

:func:`~dynamix_ray.segments.epsilon.calibrate_epsilon` needs every eligible
row's ``|corr|`` in one array. At scale those values live in many partitions
on many workers; this module computes the **same float, bit for bit**, from a
driver that only sends small questions to the partitions and merges their
small answers (docs/data-path.md, section 'Epsilon without gathering').

The protocol:

* a partition holds plain float64 values (``|corr| >= 0``, any order; or, run
  length encoded, distinct values and their counts) and answers a question
  with :func:`answer`, a pure numpy function of its own values;
* :func:`merge` combines the answers of several partitions (counts add,
  histograms add, value lists concatenate, neighbours take max / min), so a
  Ray job may merge in a tree;
* the driver, :func:`calibrate_epsilon_distributed`, asks through one
  injected callable ``ask(question) -> merged answer`` (one pass of tasks over
  the partitions in the pipeline, a list comprehension in the tests).

Questions work on :func:`float_keys`, the IEEE bits of a non-negative double
seen as uint64, which sort like the values. A rank is found by descending a
key histogram of at most :data:`MAX_BINS` bins a round (12 bits of the 63-bit
key a round by default), and by fetching the values of a bin once at most
``max_fetch`` rows fall in it. Whatever the data size, a run takes at most
``ceil(63 / bits_per_round) + 1`` rounds and fetches at most ``max_fetch``
values (7 rounds by default; ``2 * ceil(63 / bits_per_round) + 1`` = 13 rounds
and ``2 * max_fetch`` values in the rare tie case described in
:func:`calibrate_epsilon_distributed`), and no answer holds more than
``MAX_BINS + 2`` numbers or ``max_fetch`` values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, overload

import numpy as np

__all__ = [
    "KEY_END",
    "MAX_BINS",
    "Count",
    "EpsilonSearchStats",
    "Histogram",
    "HistogramAnswer",
    "Neighbors",
    "NeighborsAnswer",
    "Question",
    "ValuesIn",
    "answer",
    "calibrate_epsilon_distributed",
    "calibrate_epsilon_distributed_stats",
    "first_question",
    "float_keys",
    "key_to_float",
    "merge",
    "worst_case_rounds",
]

KEY_BITS = 63  # a non-negative double has sign bit 0: its key is < 2**63
KEY_END = 1 << KEY_BITS  # exclusive end of the key space
MAX_BINS = 4096  # most bins one histogram answer may hold


# ---------------------------------------------------------------- keys


def float_keys(values: np.ndarray) -> np.ndarray:
    """Order-preserving uint64 keys of non-negative float64 values.

    For ``x >= 0`` the IEEE-754 bit patterns, read as unsigned integers, sort
    like the values (``+inf`` included, above every finite value). ``-0.0`` is
    first mapped to ``0.0``, so equal values have equal keys.

    Args:
        values: (E,) float64 values, ``>= 0`` (``|corr|`` of eligible rows).

    Returns:
        (E,) uint64 keys: ``x < y`` exactly when ``key(x) < key(y)``.

    Raises:
        ValueError: when a value is NaN or negative.
    """
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    bad_nan = int(np.isnan(x).sum())
    bad_neg = int((x < 0).sum())
    if bad_nan or bad_neg:
        raise ValueError(
            f"float_keys: values must be >= 0 and not NaN (|corr| of eligible "
            f"rows); got {bad_nan} NaN and {bad_neg} negative of {x.size}"
        )
    x = np.where(x == 0.0, 0.0, x)  # -0.0 -> 0.0 (a new, contiguous array)
    return x.view(np.uint64)


def key_to_float(key: int) -> float:
    """The float64 value of one key of :func:`float_keys`."""
    return float(np.array([key], dtype=np.uint64).view(np.float64)[0])


# ---------------------------------------------------------------- questions


@dataclass(frozen=True)
class Count:
    """How many values? Answer: ``int``."""


@dataclass(frozen=True)
class Histogram:
    """How many keys fall in each bin of ``[lo_key, hi_key)``?

    Bin ``b`` holds the keys with ``(key - lo_key) >> shift == b``; there are
    ``bins = ceil((hi_key - lo_key) / 2**shift)`` of them, at most
    :data:`MAX_BINS`. Answer: :class:`HistogramAnswer`.
    """

    lo_key: int
    hi_key: int
    shift: int

    def __post_init__(self) -> None:
        if not 0 <= self.lo_key < self.hi_key <= KEY_END:
            raise ValueError(
                f"Histogram: need 0 <= lo_key < hi_key <= 2**63, got "
                f"[{self.lo_key}, {self.hi_key})"
            )
        if not 0 <= self.shift < 64 or self.bins > MAX_BINS:
            raise ValueError(
                f"Histogram: shift {self.shift} over a range of "
                f"{self.hi_key - self.lo_key} keys gives {self.bins} bins; at most "
                f"{MAX_BINS} are allowed"
            )

    @property
    def bins(self) -> int:
        """Number of bins (the last one may be narrower)."""
        return -(-(self.hi_key - self.lo_key) >> self.shift)


@dataclass(frozen=True)
class ValuesIn:
    """The values whose keys lie in ``[lo_key, hi_key)``, with repeats, in no
    order. Answer: (K,) float64 ``np.ndarray``. The driver asks it only when
    the merged count is known to be at most ``max_fetch``."""

    lo_key: int
    hi_key: int


@dataclass(frozen=True)
class Neighbors:
    """The values either side of ``x`` and the counts below and at ``x``.
    Answer: :class:`NeighborsAnswer`."""

    x: float


Question = Count | Histogram | ValuesIn | Neighbors


@dataclass(frozen=True, eq=False)
class HistogramAnswer:
    """Answer to :class:`Histogram`: keys below the range, (bins,) int64 counts
    in it, keys at or above its end (so that ``total`` is the row count)."""

    n_below: int
    counts: np.ndarray  # (bins,) int64
    n_above: int

    @property
    def total(self) -> int:
        """All the values the partition(s) hold."""
        return self.n_below + int(self.counts.sum()) + self.n_above


@dataclass(frozen=True)
class NeighborsAnswer:
    """Answer to :class:`Neighbors`: the largest value ``< x`` and the smallest
    ``> x`` (``None``: there is none), the counts ``< x`` and ``== x``."""

    prev: float | None
    next: float | None
    n_less: int
    n_equal: int


Answer = int | HistogramAnswer | np.ndarray | NeighborsAnswer


# ---------------------------------------------------------------- partition side


def _weights(counts: np.ndarray | None, size: int) -> np.ndarray | None:
    if counts is None:
        return None
    w = np.asarray(counts).reshape(-1)
    if w.shape != (size,) or not np.issubdtype(w.dtype, np.integer) or (w < 0).any():
        raise ValueError(
            f"answer: counts must be ({size},) non-negative integers (one per "
            f"value), got shape {w.shape} of {w.dtype}"
        )
    return w.astype(np.int64)


def _total(mask: np.ndarray, w: np.ndarray | None) -> int:
    return int(mask.sum()) if w is None else int(w[mask].sum())


@overload
def answer(
    values: np.ndarray, question: Count, counts: np.ndarray | None = None
) -> int: ...
@overload
def answer(
    values: np.ndarray, question: Histogram, counts: np.ndarray | None = None
) -> HistogramAnswer: ...
@overload
def answer(
    values: np.ndarray, question: ValuesIn, counts: np.ndarray | None = None
) -> np.ndarray: ...
@overload
def answer(
    values: np.ndarray, question: Neighbors, counts: np.ndarray | None = None
) -> NeighborsAnswer: ...
@overload
def answer(
    values: np.ndarray, question: Question, counts: np.ndarray | None = None
) -> Answer: ...
def answer(
    values: np.ndarray, question: Question, counts: np.ndarray | None = None
) -> Answer:
    """One partition's answer to one question (pure, O(E) numpy).

    Args:
        values: (E,) float64 values of the partition, ``>= 0``, in any order.
        question: a :class:`Count`, :class:`Histogram`, :class:`ValuesIn` or
            :class:`Neighbors`.
        counts: optional (E,) multiplicity of each value (a run-length
            encoded partition); ``None`` means one each.

    Returns:
        ``int``, :class:`HistogramAnswer`, (K,) float64 array or
        :class:`NeighborsAnswer`, by question type.

    Raises:
        ValueError: on NaN or negative values, or malformed ``counts``.
    """
    keys = float_keys(values)  # (E,) uint64
    w = _weights(counts, keys.size)  # (E,) int64 or None
    if w is not None:
        keep = w > 0
        keys, w = keys[keep], w[keep]
    vals = keys.view(np.float64)  # -0.0 already mapped to 0.0
    if isinstance(question, Count):
        return _total(np.ones(keys.size, dtype=bool), w)
    if isinstance(question, Histogram):
        lo, hi = np.uint64(question.lo_key), np.uint64(question.hi_key)
        below, above = keys < lo, keys >= hi
        inside = ~(below | above)
        bin_of = ((keys[inside] - lo) >> np.uint64(question.shift)).astype(np.intp)
        if w is None:
            hist = np.bincount(bin_of, minlength=question.bins).astype(np.int64)
        else:  # int64 sums: bincount's float weights would round huge counts
            hist = np.zeros(question.bins, dtype=np.int64)
            np.add.at(hist, bin_of, w[inside])
        return HistogramAnswer(_total(below, w), hist, _total(above, w))
    if isinstance(question, ValuesIn):
        sel = (keys >= np.uint64(question.lo_key)) & (keys < np.uint64(question.hi_key))
        return vals[sel].copy() if w is None else np.repeat(vals[sel], w[sel])
    if isinstance(question, Neighbors):
        x = float(question.x)
        less, more = vals < x, vals > x
        return NeighborsAnswer(
            prev=float(vals[less].max()) if less.any() else None,
            next=float(vals[more].min()) if more.any() else None,
            n_less=_total(less, w),
            n_equal=_total(vals == x, w),
        )
    raise TypeError(f"answer: unknown question {question!r}")


@overload
def merge(question: Count, answers: Iterable[int]) -> int: ...
@overload
def merge(
    question: Histogram, answers: Iterable[HistogramAnswer]
) -> HistogramAnswer: ...
@overload
def merge(question: ValuesIn, answers: Iterable[np.ndarray]) -> np.ndarray: ...
@overload
def merge(
    question: Neighbors, answers: Iterable[NeighborsAnswer]
) -> NeighborsAnswer: ...
@overload
def merge(question: Question, answers: Iterable[Any]) -> Answer: ...
def merge(question: Question, answers: Iterable[Any]) -> Answer:
    """Combine the answers of several partitions (or of merged groups: merging
    is associative and commutative, up to the order of fetched values).

    Args:
        question: the question they answer.
        answers: their answers (none: the answer of an empty partition).

    Returns:
        The answer the union of the partitions would give.
    """
    answers = list(answers)
    if isinstance(question, Count):
        return sum(int(a) for a in answers)
    if isinstance(question, Histogram):
        hist = np.zeros(question.bins, dtype=np.int64)
        n_below = n_above = 0
        for a in answers:
            if a.counts.shape != hist.shape:
                raise ValueError(
                    f"merge: a Histogram answer has {a.counts.shape} bins, the "
                    f"question {question} asks for {question.bins}"
                )
            hist += a.counts
            n_below += a.n_below
            n_above += a.n_above
        return HistogramAnswer(n_below, hist, n_above)
    if isinstance(question, ValuesIn):
        return np.concatenate(
            [np.zeros(0), *[np.asarray(a, np.float64) for a in answers]]
        )
    if isinstance(question, Neighbors):
        prevs = [a.prev for a in answers if a.prev is not None]
        nexts = [a.next for a in answers if a.next is not None]
        return NeighborsAnswer(
            prev=max(prevs) if prevs else None,
            next=min(nexts) if nexts else None,
            n_less=sum(a.n_less for a in answers),
            n_equal=sum(a.n_equal for a in answers),
        )
    raise TypeError(f"merge: unknown question {question!r}")


# ---------------------------------------------------------------- driver


@dataclass(frozen=True)
class EpsilonSearchStats:
    """What one run of :func:`calibrate_epsilon_distributed_stats` cost.

    Attributes:
        n: values over all partitions.
        rounds: calls of ``ask`` (passes over the partitions).
        histogram_rounds, fetch_rounds, neighbor_rounds: those calls by
            question type.
        fetched_values: values returned by all :class:`ValuesIn` answers.
        largest_answer: most numbers in one merged answer (bins + 2, or
            fetched values).
        plateau_search: whether the rare second rank search ran (see
            :func:`calibrate_epsilon_distributed`).
    """

    n: int
    rounds: int
    histogram_rounds: int
    fetch_rounds: int
    neighbor_rounds: int
    fetched_values: int
    largest_answer: int
    plateau_search: bool


def worst_case_rounds(bits_per_round: int = 12) -> int:
    """Most ``ask`` calls of one run, whatever the data: one rank search
    (``ceil(63 / bits_per_round)`` rounds) and one :class:`Neighbors` round,
    twice when the plateau search runs, minus the shared first histogram."""
    search = math.ceil(KEY_BITS / bits_per_round)
    return 2 * (search + 1) - 1


class _Asker:
    """Wraps ``ask``: checks each merged answer's type and size, counts rounds."""

    def __init__(self, ask: Callable[[Question], Any], max_fetch: int) -> None:
        self.ask, self.max_fetch = ask, max_fetch
        self.n: int | None = None
        self.rounds = {Histogram: 0, ValuesIn: 0, Neighbors: 0}
        self.fetched = self.largest = 0

    def _call(self, q: Question, kind: type) -> Any:
        got = self.ask(q)
        self.rounds[type(q)] += 1
        if not isinstance(got, kind):
            raise TypeError(
                f"ask({q}) returned {type(got).__name__}, expected {kind.__name__}: "
                f"ask must return merge(question, partition answers)"
            )
        return got

    def histogram(self, q: Histogram) -> HistogramAnswer:
        h: HistogramAnswer = self._call(q, HistogramAnswer)
        if h.counts.shape != (q.bins,):
            raise ValueError(f"ask({q}): {h.counts.shape} bins, expected {q.bins}")
        if self.n is not None and h.total != self.n:
            raise RuntimeError(
                f"ask({q}): the partitions hold {h.total} values, the first round "
                f"saw {self.n}; partitions must not change during the search"
            )
        self.n = h.total
        self.largest = max(self.largest, q.bins + 2)
        return h

    def values_in(self, lo_key: int, hi_key: int, expected: int) -> np.ndarray:
        q = ValuesIn(lo_key, hi_key)
        vals = np.asarray(self._call(q, np.ndarray), dtype=np.float64)
        if vals.size != expected:
            raise RuntimeError(
                f"ask({q}) returned {vals.size} values, the histogram counted "
                f"{expected}; partitions must not change during the search"
            )
        self.fetched += vals.size
        self.largest = max(self.largest, vals.size)
        return vals

    def neighbors(self, x: float) -> NeighborsAnswer:
        got: NeighborsAnswer = self._call(Neighbors(x), NeighborsAnswer)
        self.largest = max(self.largest, 4)
        return got


def first_question(bits_per_round: int = 12) -> Histogram:
    """The question every calibration asks first (a histogram of the whole key
    range): a pipeline may answer it in the same pass that computes the
    values, and save a round."""
    return _next_histogram(0, KEY_END, bits_per_round)


def _next_histogram(lo_key: int, hi_key: int, bits_per_round: int) -> Histogram:
    # width <= 2**L with L = bit_length(width - 1): 2**bits bins of 2**(L - bits)
    shift = max((hi_key - lo_key - 1).bit_length() - bits_per_round, 0)
    return Histogram(lo_key, hi_key, shift)


def _select(
    asker: _Asker, rank: int, q: Histogram, h: HistogramAnswer, bits_per_round: int
) -> float:
    """The ``rank``-th smallest value (1-based) of all partitions, by descending
    the key histogram from the answer ``h`` to ``q`` (whose range holds it)."""
    while True:
        in_or_below = h.n_below + np.cumsum(h.counts)  # (bins,) values <= each bin
        b = int(np.searchsorted(in_or_below, rank, side="left"))
        if b == len(in_or_below):
            raise RuntimeError(f"rank {rank} is not in {q}: partitions changed")
        lo_key = q.lo_key + (b << q.shift)
        hi_key = min(lo_key + (1 << q.shift), q.hi_key)
        n_inside = int(h.counts[b])
        n_below = int(in_or_below[b]) - n_inside
        if hi_key - lo_key == 1:  # one key: one value
            return key_to_float(lo_key)
        if n_inside <= asker.max_fetch:
            vals = asker.values_in(lo_key, hi_key, n_inside)
            return float(np.sort(vals)[rank - n_below - 1])
        q = _next_histogram(lo_key, hi_key, bits_per_round)
        h = asker.histogram(q)


def _gaps(active: list[int], n: int, f: float) -> np.ndarray:
    """``shares - active_fraction`` exactly as calibrate_epsilon computes it
    (int64 counts / n in float64), signed."""
    return np.asarray(active, dtype=np.int64) / n - f


def _first_not_below(n: int, f: float) -> int:
    """Smallest ``a`` in [0, n] whose share is not below the target
    (``a / n - f >= 0``); ``n + 1`` when none is (or ``f`` is NaN)."""
    lo, hi = 0, n + 1
    while lo < hi:
        mid = (lo + hi) // 2
        if _gaps([mid], n, f)[0] >= 0:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _last_same_gap(n: int, f: float, a: int) -> int:
    """Largest ``a'`` in [a, n] with the same float gap as ``a``."""
    target = _gaps([a], n, f)[0]
    lo, hi = a, n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _gaps([mid], n, f)[0] <= target:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _threshold(u: float, succ: float | None) -> float:
    """calibrate_epsilon's threshold of the distinct value ``u`` whose next
    distinct value is ``succ`` (``None``: ``u`` is the largest)."""
    if succ is None:
        return u
    mid = (u + succ) / 2.0
    return mid if mid < succ else u  # adjacent floats: no midpoint


@dataclass(frozen=True)
class _Candidate:
    active: int  # rows with |corr| > threshold
    threshold: float


def _at_most(
    asker: _Asker,
    n: int,
    a_max: int,
    q0: Histogram,
    h0: HistogramAnswer,
    bits_per_round: int,
) -> _Candidate:
    """The candidate with the most active rows not above ``a_max``: the
    ``(n - a_max)``-th smallest value (the first one when ``n - a_max < 1``),
    or "everyone active" when ``a_max >= n`` and the smallest value is > 0."""
    z = _select(asker, max(n - a_max, 1), q0, h0, bits_per_round)
    if a_max >= n and z > 0:
        return _Candidate(n, z / 2.0)
    nb = asker.neighbors(z)
    return _Candidate(n - nb.n_less - nb.n_equal, _threshold(z, nb.next))


def _candidates_around(
    n: int, a0: int, y: float, nb: NeighborsAnswer
) -> tuple[_Candidate | None, _Candidate | None]:
    """calibrate_epsilon's two candidates either side of the target share.

    Args:
        n: rows.
        a0: the fewest active rows whose share is not below the target.
        y: the value of rank ``n - a0 + 1`` (clamped to [1, n]).
        nb: the merged :class:`Neighbors` answer of ``y``.

    Returns:
        ``(lo, hi)``: the candidate with the most active rows ``< a0`` and the
        one with the fewest ``>= a0`` (``None`` where there is none).
    """
    above_y = n - nb.n_less - nb.n_equal
    everyone = _Candidate(n, y / 2.0) if nb.prev is None and y > 0 else None
    if a0 == 0:  # y is the largest value: only its candidate, share 0
        return None, _Candidate(0, y)
    if a0 > n:  # y is the smallest value: the first candidate
        return everyone or _Candidate(above_y, _threshold(y, nb.next)), None
    lo = _Candidate(above_y, _threshold(y, nb.next))
    if nb.prev is not None:
        return lo, _Candidate(n - nb.n_less, _threshold(nb.prev, y))
    return lo, everyone


def _first_best(
    lo: _Candidate | None, hi: _Candidate | None, n: int, f: float
) -> _Candidate:
    """calibrate_epsilon's rule on the two: smallest ``|share - f|``, ``hi``
    first (more active rows come first in its order)."""
    if hi is None or lo is None:
        best = hi or lo
        assert best is not None  # a0 in [0, n + 1] always leaves one
        return best
    gaps = np.abs(_gaps([hi.active, lo.active], n, f))
    return (hi, lo)[int(np.argmin(gaps))]


def calibrate_epsilon_distributed_stats(
    ask: Callable[[Question], Any],
    active_fraction: float,
    max_fetch: int = 65536,
    bits_per_round: int = 12,
) -> tuple[float, EpsilonSearchStats]:
    """:func:`calibrate_epsilon_distributed` and what it cost (for the log)."""
    if max_fetch < 0 or not 1 <= bits_per_round <= 12:
        raise ValueError(
            f"need max_fetch >= 0 and 1 <= bits_per_round <= 12 (4096 bins), got "
            f"{max_fetch} and {bits_per_round}"
        )
    f = float(active_fraction)
    asker = _Asker(ask, max_fetch)
    q0 = first_question(bits_per_round)
    h0 = asker.histogram(q0)  # also counts the rows
    n = h0.total
    plateau = False
    if n == 0:
        eps = 0.0
    else:
        a0 = _first_not_below(n, f)
        y = _select(asker, min(max(n - a0 + 1, 1), n), q0, h0, bits_per_round)
        lo, hi = _candidates_around(n, a0, y, asker.neighbors(y))
        best = _first_best(lo, hi, n, f)
        if best is hi:
            a_max = _last_same_gap(n, f, hi.active)
            if a_max > hi.active:  # equal gaps further up: the first one wins
                plateau = True
                best = _at_most(asker, n, a_max, q0, h0, bits_per_round)
        eps = best.threshold
    r = asker.rounds
    stats = EpsilonSearchStats(
        n=n,
        rounds=sum(r.values()),
        histogram_rounds=r[Histogram],
        fetch_rounds=r[ValuesIn],
        neighbor_rounds=r[Neighbors],
        fetched_values=asker.fetched,
        largest_answer=asker.largest,
        plateau_search=plateau,
    )
    return eps, stats


def calibrate_epsilon_distributed(
    ask: Callable[[Question], Any],
    active_fraction: float,
    max_fetch: int = 65536,
    bits_per_round: int = 12,
) -> float:
    """:func:`~dynamix_ray.segments.epsilon.calibrate_epsilon` of all the
    partitions' values, bit for bit, without gathering them.

    Why the answer sits next to the order statistic of rank about
    ``n * (1 - active_fraction)``: calibrate_epsilon lists one candidate per
    distinct value ``u_j`` (``a_j`` = rows above it active; plus "everyone
    active", ``a = n``, when ``u_0 > 0``) in decreasing ``a``, scores each by
    ``d(a) = |g(a)|`` with ``g(a) = float(a) / n - f`` in float64, and takes
    the first minimum. ``g`` is non-decreasing in ``a`` (each float operation
    rounds monotonically), so ``d`` falls with ``a`` while ``g < 0`` and rises
    while ``g >= 0``. With ``a0`` the smallest integer ``a`` with ``g(a) >= 0``
    (found by bisection over integers: the formula itself, no data), the
    minimum is at one of two candidates: ``lo``, the most active rows below
    ``a0``, and ``hi``, the fewest at or above it. ``lo`` is the value ``y`` of
    rank ``n - a0 + 1`` (about ``n * (1 - f) + 1``), ``hi`` the distinct value
    just below ``y`` (or everyone active); one rank search and one
    :class:`Neighbors` round give both, with their exact ``a`` and the
    successors their midpoints need. They are compared with calibrate_epsilon's
    own formula, ``hi`` first (it comes first in its order).

    The one subtlety is the first-index tie rule: when ``hi`` wins, earlier
    candidates with the *same* float gap win over it. Those have
    ``a in (a_hi, a_max]``, ``a_max`` again found by bisection on the formula;
    when ``a_max > a_hi`` (distinct counts that round to one gap: only when
    ``1 / n`` is below the float spacing of the shares, about ``n > 2**52``,
    or a share far from ``f``) a second rank search finds the candidate with
    the most active rows up to ``a_max``. No fixed window of candidates around
    the rank would be exact there.

    Args:
        ask: ``ask(question)`` returns ``merge(question, answers)`` of all
            partitions (see the module docstring); the partitions must not
            change during the call.
        active_fraction: target active share (in (0, 1); any float is handled
            as calibrate_epsilon handles it).
        max_fetch: fetch a histogram bin's values once it holds at most this
            many (0: never fetch, descend to single keys).
        bits_per_round: key bits resolved per histogram round (``2**bits``
            bins; 1 to 12).

    Returns:
        The threshold ``calibrate_epsilon(np.concatenate(parts), f)`` returns;
        0.0 when there are no values.

    Raises:
        ValueError: on NaN or negative values (from the partitions' answers) or
            bad parameters.
        RuntimeError: when the partitions' answers disagree between rounds.
    """
    eps, _ = calibrate_epsilon_distributed_stats(
        ask, active_fraction, max_fetch, bits_per_round
    )
    return eps
