"""The sequence CTR model: shapes, masks, feature subsets, FLOPs, metrics, learning.

Everything runs on tiny dimensions built here; no Ray, no files.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from dynamix_ray.model import (
    CANDIDATE_ATTRIBUTES,
    DWELL,
    SOURCE_ATTRIBUTES,
    DynamixCTR,
    FeatureSet,
    ModelConfig,
    SlicedLinear,
    auc,
    flops_per_sample,
    hash_ids,
    normalized_entropy,
)
from dynamix_ray.model.batch import ModelBatch, SourceBatch
from dynamix_ray.model.ctr import PartsLoss, in_batch_softmax
from dynamix_ray.model.embeddings import hash_ids_reference
from dynamix_ray.model.time_encoding import (
    cyclic_features,
    position_from_newest,
    relative_time_buckets,
)

T_MS = 1_700_000_000_000  # a request time (2023-11-14)
LOW_IMPORTANCE = ("campaign_id", "media_type", "surface", "position")
TINY = ModelConfig(
    emb_dim=4,
    d_model=8,
    n_heads=2,
    mlp_ratio=2,
    max_seq_len=8,
    user_dim=8,
    head_hidden=16,
    default_num_buckets=64,
    num_buckets={"media_type": 8, "surface": 8, "position": 16, "kind": 8},
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@functools.cache
def tiny_model() -> DynamixCTR:
    torch.manual_seed(0)
    return DynamixCTR(TINY).eval()


def make_batch(
    lengths: dict[str, list[int]],
    seq_len: int = 6,
    seed: int = 0,
    left_pad: bool = True,
) -> ModelBatch:
    """A batch as the loader builds it; ``lengths[source][row]`` real events."""
    g = torch.Generator().manual_seed(seed)
    b = len(next(iter(lengths.values())))
    t_ms = torch.full((b,), T_MS, dtype=torch.long)
    hist = {}
    for source, lens in lengths.items():
        n = torch.tensor(lens)[:, None]
        pos = torch.arange(seq_len)[None]
        mask = pos >= seq_len - n if left_pad else pos < n  # (B, L)
        ago_ms = torch.randint(1, 30 * 86_400_000, (b, seq_len), generator=g)
        ts_ms = t_ms[:, None] - ago_ms.sort(-1, descending=True).values
        attrs = {
            a: torch.randint(0, 10**12, (b, seq_len), generator=g)
            for a in SOURCE_ATTRIBUTES[source]
            if a != DWELL
        }
        events = SourceBatch(
            mask=mask,
            ts_ms=torch.where(mask, ts_ms, 0),
            attrs={a: torch.where(mask, v, 0) for a, v in attrs.items()},
        )
        if DWELL in SOURCE_ATTRIBUTES[source]:
            dwell = torch.log1p(torch.rand(b, seq_len, generator=g) * 60_000)
            events.dwell = torch.where(mask, dwell, 0.0)
        hist[source] = events
    cand = {
        a: torch.randint(0, 10**12, (b,), generator=g) for a in CANDIDATE_ATTRIBUTES
    }
    return ModelBatch(t_ms=t_ms, cand=cand, hist=hist)


def full_lengths(b: int = 3, n: int = 6) -> dict[str, list[int]]:
    return {s: [n, n // 2, 0][:b] + [n] * max(b - 3, 0) for s in SOURCE_ATTRIBUTES}


def to_left_padded(batch: ModelBatch) -> ModelBatch:
    """The same events moved to the end of each row (right -> left padding)."""
    hist = {}
    for s, ev in batch.hist.items():
        order = torch.argsort((~ev.mask).long() * -1, dim=1, stable=True)  # pads first

        def take(x: torch.Tensor, order: torch.Tensor = order) -> torch.Tensor:
            return torch.gather(x, 1, order)

        hist[s] = SourceBatch(
            mask=take(ev.mask),
            ts_ms=take(ev.ts_ms),
            attrs={a: take(v) for a, v in ev.attrs.items()},
            dwell=None if ev.dwell is None else take(ev.dwell),
        )
    return batch.replace(hist=hist)


# --- shapes and masks ---------------------------------------------------------


def test_shapes_and_user_tower_normalisation():
    model = tiny_model()
    batch = make_batch(full_lengths())
    logits = model(batch)
    user = model.user_tower(batch, normalize=True)
    assert logits.shape == (3,)
    assert user.shape == (3, TINY.user_dim)
    assert torch.isfinite(logits).all()
    assert torch.allclose(user.norm(dim=-1), torch.ones(3), atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 6), min_size=4 * 3, max_size=4 * 3),
    seed=st.integers(0, 2**16),
    left_pad=st.booleans(),
)
def test_padding_carries_no_information(lengths, seed, left_pad):
    """Garbage at padded slots (huge/negative ids, NaN dwell, any ts) changes nothing."""
    model = tiny_model()
    per_source = {
        s: lengths[3 * i : 3 * i + 3] for i, s in enumerate(SOURCE_ATTRIBUTES)
    }
    batch = make_batch(per_source, seed=seed, left_pad=left_pad)
    g = torch.Generator().manual_seed(seed + 1)
    hist = {}
    for s, ev in batch.hist.items():
        pad = ~ev.mask
        noise = torch.randint(-(2**62), 2**62, pad.shape, generator=g)
        hist[s] = SourceBatch(
            mask=ev.mask,
            ts_ms=torch.where(pad, noise.abs() % (2 * T_MS), ev.ts_ms),
            attrs={a: torch.where(pad, noise, v) for a, v in ev.attrs.items()},
            dwell=None
            if ev.dwell is None
            else torch.where(pad, float("nan"), ev.dwell),
        )
    dirty = batch.replace(hist=hist)
    with torch.no_grad():
        clean_logits, dirty_logits = model(batch), model(dirty)
        clean_user, dirty_user = model.user_tower(batch), model.user_tower(dirty)
    assert torch.isfinite(clean_logits).all() and torch.isfinite(clean_user).all()
    torch.testing.assert_close(dirty_logits, clean_logits, rtol=0, atol=0)
    torch.testing.assert_close(dirty_user, clean_user, rtol=0, atol=0)


def test_padding_side_does_not_matter():
    model = tiny_model()
    right = make_batch(full_lengths(), left_pad=False)
    left = to_left_padded(right)
    assert not torch.equal(
        left.hist["conversions"].mask, right.hist["conversions"].mask
    )
    with torch.no_grad():
        torch.testing.assert_close(model(left), model(right), rtol=1e-5, atol=1e-5)


def test_rows_without_events_are_finite_and_train():
    model = DynamixCTR(TINY)
    batch = make_batch({s: [0, 0] for s in SOURCE_ATTRIBUTES})
    logits = model(batch)
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_user_tower_ignores_the_candidate():
    model = tiny_model()
    batch = make_batch(full_lengths())
    other = batch.replace(cand={a: v + 12345 for a, v in batch.cand.items()})
    without = batch.replace(cand={})
    with torch.no_grad():
        user = model.user_tower(batch)
        torch.testing.assert_close(model.user_tower(other), user, rtol=0, atol=0)
        torch.testing.assert_close(model.user_tower(without), user, rtol=0, atol=0)
        assert not torch.allclose(model(other), model(batch))


@settings(max_examples=20, deadline=None)
@given(
    n_cands=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
    features=st.sampled_from([None, FeatureSet(page_views=(), organic_impressions=())]),
)
def test_shared_user_rows_equal_repeated_histories(n_cands, seed, features):
    """Serving encodes each history once (``user_index``); the logits equal the
    plain pass over the history repeated for every candidate."""
    model = tiny_model()
    users = make_batch(full_lengths(b=len(n_cands)), seed=seed)
    index = torch.repeat_interleave(torch.arange(len(n_cands)), torch.tensor(n_cands))
    g = torch.Generator().manual_seed(seed + 1)
    cand = {
        a: torch.randint(0, 10**12, (len(index),), generator=g)
        for a in CANDIDATE_ATTRIBUTES
    }

    repeated = users.rows(index).replace(cand=cand)
    with torch.no_grad():
        shared = model(users.replace(cand=cand), features, user_index=index)
        plain = model(repeated, features)
    assert shared.shape == (len(index),)
    torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-6)


def test_works_under_autocast():
    model = tiny_model()
    batch = make_batch(full_lengths())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(batch)
        user = model.user_tower(batch)
    assert logits.shape == (3,) and torch.isfinite(logits.float()).all()
    assert torch.isfinite(user.float()).all()


# --- feature sets do only their own work ----------------------------------------

SUBSETS = {
    "minus_4_ad_attrs": FeatureSet(
        ad_impressions=tuple(
            a for a in SOURCE_ATTRIBUTES["ad_impressions"] if a not in LOW_IMPORTANCE
        )
    ),
    "no_pages_no_organic": FeatureSet(organic_impressions=(), page_views=()),
    "ads_only_no_dwell": FeatureSet.of({"ad_impressions": ("ad_id", "category_id")}),
    "nothing_but_candidate": FeatureSet.of({"candidate": ("ad_id",)}),
}


@pytest.mark.parametrize("name", list(SUBSETS))
def test_feature_subsets_run_differ_and_skip_work(name):
    model = tiny_model()
    fs = SUBSETS[name]
    batch = make_batch(full_lengths())
    looked_up: list[str] = []
    encoded: list[str] = []
    hooks = [
        table.register_forward_hook(lambda *_, a=a: looked_up.append(a))
        for a, table in model.tables.tables.items()
    ]
    hooks += [
        enc.register_forward_hook(lambda *_, s=s: encoded.append(s))
        for s, enc in model.encoders.items()
    ]
    try:
        with torch.no_grad():
            full = model(batch)
            looked_up.clear()
            encoded.clear()
            sub = model(batch, fs)
    finally:
        for h in hooks:
            h.remove()
    assert torch.isfinite(sub).all()
    assert not torch.allclose(sub, full)
    assert encoded == list(fs.enabled_sources)
    wanted = {a for s in fs.enabled_sources for a in fs.attrs(s)} | set(fs.candidate)
    assert set(looked_up) == wanted - {DWELL}


def test_disabled_sources_and_unused_attributes_need_not_be_in_the_batch():
    model = tiny_model()
    batch = make_batch(full_lengths())
    ads = batch.hist["ad_impressions"]
    lean = batch.replace(hist=dict(batch.hist))
    lean.hist["ad_impressions"] = dataclasses.replace(
        ads, attrs={a: v for a, v in ads.attrs.items() if a not in LOW_IMPORTANCE}
    )
    del lean.hist["page_views"]
    fs = FeatureSet(
        ad_impressions=SUBSETS["minus_4_ad_attrs"].ad_impressions, page_views=()
    )
    with torch.no_grad():
        torch.testing.assert_close(model(lean, fs), model(batch, fs))
    with pytest.raises(KeyError, match="campaign_id"):
        model(lean)
    with pytest.raises(KeyError, match="page_views"):
        model(lean, FeatureSet(ad_impressions=fs.ad_impressions))


def test_unknown_features_are_errors_that_name_them():
    cfg = dataclasses.replace(TINY, sources={"ad_impressions": ("ad_id", DWELL)})
    model = DynamixCTR(cfg)
    batch = make_batch(full_lengths())
    with pytest.raises(ValueError, match="page_views"):
        model(batch)  # default feature set enables every source
    with pytest.raises(ValueError, match="category_id"):
        model(batch, {"ad_impressions": ("category_id",)})
    with pytest.raises(ValueError, match="bogus"):
        ModelConfig(sources={"ad_impressions": ("bogus",)})


@settings(max_examples=40, deadline=None)
@given(
    widths=st.lists(st.integers(1, 5), min_size=1, max_size=6),
    keep_bits=st.integers(1, 2**6 - 1),
    seed=st.integers(0, 2**16),
)
def test_sliced_linear_equals_full_linear_with_zeroed_inputs(widths, keep_bits, seed):
    torch.manual_seed(seed)
    names = [f"x{i}" for i in range(len(widths))]
    lin = SlicedLinear(list(zip(names, widths, strict=True)), 7)
    keep = [n for i, n in enumerate(names) if keep_bits >> i & 1] or names[:1]
    parts = {n: torch.randn(3, 2, w) for n, w in zip(names, widths, strict=True)}
    narrow = lin({n: parts[n] for n in keep})
    zeroed = torch.cat(
        [parts[n] if n in keep else torch.zeros_like(parts[n]) for n in names], -1
    )
    torch.testing.assert_close(narrow, F.linear(zeroed, lin.weight, lin.bias))
    assert sum(c.stop - c.start for c in lin.columns(keep)) == sum(
        widths[names.index(n)] for n in keep
    )


def test_removing_attributes_equals_zeroing_their_embeddings():
    """The narrower model is exactly the full one with those inputs at zero."""
    torch.manual_seed(1)
    model = DynamixCTR(TINY).eval()
    batch = make_batch(full_lengths())
    with torch.no_grad():
        for a in LOW_IMPORTANCE:  # shared tables: other sources see zeros in both runs
            model.tables[a].table.weight.zero_()
        model.encoders["ad_impressions"].dwell.weight.zero_()
        model.encoders["ad_impressions"].dwell.bias.zero_()
        drop = (*LOW_IMPORTANCE, DWELL)
        kept = tuple(a for a in SOURCE_ATTRIBUTES["ad_impressions"] if a not in drop)
        narrow = model(batch, FeatureSet(ad_impressions=kept))
        full = model(batch, FeatureSet())
    torch.testing.assert_close(narrow, full, rtol=1e-5, atol=1e-6)


# --- FLOPs ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["all", *SUBSETS])
@pytest.mark.parametrize("part", ["ctr", "user_tower"])
def test_analytic_flops_match_flop_counter(name, part):
    model = tiny_model()
    fs = FeatureSet() if name == "all" else SUBSETS[name]
    seq_lens = {"ad_impressions": 6, "conversions": 3, "organic_impressions": 5}
    seq_lens["page_views"] = 4
    lengths = {s: [min(2, n), n] for s, n in seq_lens.items()}
    hist = {}
    for s, n in seq_lens.items():  # one source at a time: its own padded length
        one = make_batch({s: lengths[s]}, seq_len=n)
        hist.update(one.hist)
    batch = one.replace(hist=hist)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.user_tower(batch, fs) if part == "user_tower" else model(batch, fs)
    measured = counter.get_total_flops() / 2
    analytic = flops_per_sample(TINY, fs, seq_lens, part=part)
    assert analytic == pytest.approx(measured, rel=0.10)


@pytest.mark.parametrize("n_cands", [(1,), (3, 5)])
def test_request_flops_match_flop_counter_on_the_shared_pass(n_cands):
    """A ranking request (``user_index``): each history and its target K/V
    once per user, the rest once per candidate, as
    ``experiments.request_flops`` counts it."""
    from dynamix_ray.experiments import request_flops

    model = tiny_model()
    seq = 6
    users = make_batch(full_lengths(b=len(n_cands)), seq_len=seq)
    index = torch.repeat_interleave(torch.arange(len(n_cands)), torch.tensor(n_cands))
    cand = {a: torch.randint(1, 10**6, (len(index),)) for a in CANDIDATE_ATTRIBUTES}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(users.replace(cand=cand), None, user_index=index)
    measured = counter.get_total_flops() / 2
    want = sum(
        request_flops(TINY, FeatureSet(), c, {s: seq for s in SOURCE_ATTRIBUTES})
        for c in n_cands
    )
    assert want / 2 == pytest.approx(measured, rel=0.10)


def test_flops_fall_with_fewer_features():
    cfg = ModelConfig()
    full = flops_per_sample(cfg, FeatureSet())
    minus_4 = flops_per_sample(cfg, SUBSETS["minus_4_ad_attrs"])
    no_organic = flops_per_sample(cfg, FeatureSet(organic_impressions=()))
    assert no_organic < minus_4 < full
    assert flops_per_sample(cfg, part="user_tower") < full


# --- pieces: hashing and time encodings -----------------------------------------


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=50))
def test_hash_matches_the_numpy_reference(ids):
    got = hash_ids(torch.tensor(ids, dtype=torch.long)).numpy()
    np.testing.assert_array_equal(got, hash_ids_reference(np.array(ids, np.int64)))


def test_time_encodings_on_known_values():
    mask = torch.tensor([[False, True, True, True], [True, True, False, False]])
    assert position_from_newest(mask).tolist() == [[0, 2, 1, 0], [1, 0, 0, 0]]
    monday_0h = 4 * 86_400_000  # 1970-01-05 00:00 UTC was a Monday
    six_pm = monday_0h + 18 * 3_600_000
    feats = cyclic_features(torch.tensor([[monday_0h, six_pm]]), n_harmonics=1)
    sin_h, sin_w, cos_h, cos_w = feats[0].T  # (angles: hour, week) x (sin, cos)
    torch.testing.assert_close(sin_h, torch.tensor([0.0, -1.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(cos_h, torch.tensor([1.0, 0.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(sin_w[0], torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(cos_w[0], torch.tensor(1.0))
    ts = torch.tensor([[0, 1_000, 3_000, 10**15]])
    buckets = relative_time_buckets(ts, n_buckets=8)
    assert buckets[0, 0].tolist() == [0, 1, 2, 7]  # log2(1 + 1), log2(1 + 3), clipped


# --- metrics --------------------------------------------------------------------


def test_normalized_entropy_matches_the_formula():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=500)
    labels = (rng.random(500) < 1 / (1 + np.exp(-logits))).astype(float)
    p = 1 / (1 + np.exp(-logits))
    log_loss = -np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))
    base = labels.mean()
    expected = log_loss / -(base * np.log(base) + (1 - base) * np.log(1 - base))
    assert normalized_entropy(logits, labels) == pytest.approx(expected, rel=1e-9)
    assert normalized_entropy(torch.tensor(logits), torch.tensor(labels)) == (
        pytest.approx(expected, rel=1e-6)
    )
    base_logit = np.full(500, math.log(base / (1 - base)))
    assert normalized_entropy(base_logit, labels) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="base rate"):
        normalized_entropy(logits, np.zeros(500))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.booleans()), min_size=2, max_size=40))
def test_auc_matches_pairwise_counting(rows):
    scores = np.array([s for s, _ in rows], float)
    labels = np.array([y for _, y in rows], float)
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        with pytest.raises(ValueError):
            auc(scores, labels)
        return
    wins = (pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()
    assert auc(scores, labels) == pytest.approx(wins / (len(pos) * len(neg)))


# --- it learns ------------------------------------------------------------------


def toy_task(n: int, seed: int, seq_len: int = 8, n_cat: int = 6) -> ModelBatch:
    """Label = 1 iff the candidate's category is the most common one in history."""
    rng = np.random.default_rng(seed)
    favourite = rng.integers(0, n_cat, n)
    lens = rng.integers(3, seq_len + 1, n)
    cats = np.where(
        rng.random((n, seq_len)) < 0.6,
        favourite[:, None],
        rng.integers(0, n_cat, (n, seq_len)),
    )
    mask = np.arange(seq_len)[None] >= seq_len - lens[:, None]
    counts = np.stack([((cats == c) & mask).sum(1) for c in range(n_cat)], 1)
    mode = counts.argmax(1)
    cand = np.where(rng.random(n) < 0.5, mode, rng.integers(0, n_cat, n))
    ts = T_MS - np.sort(rng.integers(1, 86_400_000, (n, seq_len)), 1)[:, ::-1]
    t = lambda x: torch.from_numpy(np.ascontiguousarray(x))  # noqa: E731
    return ModelBatch(
        t_ms=torch.full((n,), T_MS),
        cand={"category_id": t(cand + 100)},
        hist={
            "ad_impressions": SourceBatch(
                mask=t(mask),
                ts_ms=t(np.where(mask, ts, 0)),
                attrs={"category_id": t(np.where(mask, cats + 100, 0))},
                dwell=torch.zeros(n, seq_len),
            )
        },
        label=t((cand == mode).astype(np.float32)),
    )


def toy_model(**changes) -> tuple[DynamixCTR, FeatureSet]:
    """A model of the toy task's one attribute, and its feature set."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(
        TINY,
        sources={"ad_impressions": ("category_id",)},
        candidate_attrs=("category_id",),
        d_model=16,
        emb_dim=8,
        **changes,
    )
    fs = FeatureSet.of(
        {"ad_impressions": ("category_id",), "candidate": ("category_id",)}
    )
    return DynamixCTR(cfg), fs


def test_a_short_training_run_learns_the_toy_task():
    model, fs = toy_model()
    train, test = toy_task(2048, seed=0), toy_task(512, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    losses = []
    for _ in range(50):  # full batch
        loss = F.binary_cross_entropy_with_logits(model(train, fs), train.label)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        logits = model(test, fs)
    assert losses[-1] < 0.3 * losses[0]
    assert normalized_entropy(logits, test.label) < 0.5  # held-out users
    assert auc(logits, test.label) > 0.95


def test_external_user_embedding_is_a_head_input_with_counted_flops():
    """ModelConfig.ext_dim: the batch's "alure" (B, E) enters the head; it
    changes the logits, is required, and its FLOPs are counted."""
    cfg = dataclasses.replace(TINY, ext_dim=5)
    torch.manual_seed(0)
    model = DynamixCTR(cfg).eval()
    batch = make_batch(full_lengths())
    b = len(batch)
    with torch.no_grad():
        zero = model(batch.replace(alure=torch.zeros(b, 5)))
        ones = model(batch.replace(alure=torch.ones(b, 5)))
        assert zero.shape == (b,) and not torch.allclose(zero, ones)
        with pytest.raises(KeyError, match="alure"):
            model(batch)
        with FlopCounterMode(display=False) as counter:
            model(batch.replace(alure=torch.ones(b, 5)))
    seq = {s: 6 for s in SOURCE_ATTRIBUTES}
    assert flops_per_sample(cfg, None, seq) - flops_per_sample(TINY, None, seq) == (
        2 * 5 * cfg.head_hidden
    )
    assert flops_per_sample(cfg, None, seq) == pytest.approx(
        counter.get_total_flops() / b, rel=0.10
    )


# --- the user tower trained for retrieval ---------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(0, 7),
    seed=st.integers(0, 10**6),
    n_ads=st.integers(1, 4),
)
def test_in_batch_softmax_equals_a_plain_reference(n, seed, n_ads):
    g = torch.Generator().manual_seed(seed)
    u, a = torch.randn(n, 4, generator=g), torch.randn(n, 4, generator=g)
    ad_id = torch.randint(0, n_ads, (n,), generator=g)
    got = in_batch_softmax(u, a, ad_id, 0.1)
    want = 0.0
    if n >= 2:
        for i in range(n):
            logits = [
                float(F.cosine_similarity(u[i], a[j], dim=0)) / 0.1
                for j in range(n)
                if j == i or ad_id[j] != ad_id[i]
            ]
            own = float(F.cosine_similarity(u[i], a[i], dim=0)) / 0.1
            want += math.log(sum(math.exp(x) for x in logits)) - own
    assert float(got) == pytest.approx(want, rel=1e-4, abs=1e-4)


def test_the_contrastive_objective_pulls_users_to_their_ads():
    model, fs = toy_model(ad_tower=True)
    loss_fn = PartsLoss(
        model, contrastive_weight=1.0, temperature=0.1, ad_key="category_id"
    )
    train, test = toy_task(1024, seed=0), toy_task(512, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)

    def retrieval_accuracy() -> float:
        """Share of positive test rows whose user is nearest to their ad
        among the 6 categories (chance: 1/6)."""
        with torch.no_grad():
            pos = test.label > 0.5
            user = F.normalize(model.user_tower(test, fs)[pos], dim=-1)
            cats = torch.arange(100, 106)
            ads = model.ad_embedding(
                model.candidate({"category_id": cats}, ("category_id",), 6)
            )
            pick = (user @ F.normalize(ads, dim=-1).T).argmax(1)
            return float((cats[pick] == test.cand["category_id"][pos]).float().mean())

    before = retrieval_accuracy()
    for _ in range(60):
        loss = loss_fn([(train, fs)]) / len(train)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = retrieval_accuracy()
    assert after > 0.6 and after > before + 0.3, (before, after)
    assert model.ad_proj is not None and model.ad_proj.weight.grad is not None
    with pytest.raises(ValueError, match="no ad tower"):
        tiny_model().ad_embedding(torch.zeros(1, TINY.d_model))
