"""The sequence CTR model, its user tower, and its analytic FLOPs.

::

    candidate attrs ──emb──► cand_proj ─────────────────────────────┐ (B, D)
    per enabled source s:                                           │
      history ──emb + dwell──► proj ─+ CFEE─► blocks ─► h_s (B, L, D)
        h_s ── TargetAttention(query = candidate) ───────────────────┤ (B, D) each
        h_s ── AttentionPool(learned query) ─► user_proj ─► user ────┤ (B, E)
        candidate ⊙ target.s ─► cross.s (B, D) each ─────────────────┤
        mean_l <emb_a(history_l), emb_a(candidate)> / e ─► match.s.a ─┤ (B, 1) each
    head: SlicedLinear([candidate, target.s, cross.s..., user]) ─► GELU ─► Linear ─► logit

The model holds weights for the union of attributes in ``ModelConfig``; each
forward does only the work of its ``FeatureSet``. Disabled sources are not
encoded at all, and the head's first layer is a :class:`SlicedLinear`: it
multiplies only the columns of the sources that ran (no zero padding).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch.nn.functional as F
from torch import Tensor, nn

from dynamix_ray.model.batch import ModelBatch
from dynamix_ray.model.config import DWELL, FeatureSet, ModelConfig
from dynamix_ray.model.embeddings import AttributeEmbeddings
from dynamix_ray.model.encoders import SourceEncoder
from dynamix_ray.model.layers import AttentionPool, SlicedLinear, TargetAttention

__all__ = [
    "DynamixCTR",
    "Features",
    "PartsLoss",
    "flops_per_sample",
    "in_batch_softmax",
]

#: A ``FeatureSet``, a mapping ``source -> attributes``, or ``None`` (all).
Features = FeatureSet | Mapping[str, Any] | None


def match_pairs(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(source, attribute) pairs whose history values can be compared with the
    candidate's (same attribute, hence the same embedding table)."""
    return [
        (s, a)
        for s, attrs in cfg.sources.items()
        for a in attrs
        if a != DWELL and a in cfg.candidate_attrs
    ]


class DynamixCTR(nn.Module):
    """Sequence CTR model over the four EBF sources with CFEE time encodings.

    Args:
        cfg: shapes and the union of attributes to hold weights for.

    Example::

        model = DynamixCTR(ModelConfig())
        logits = model(batch, FeatureSet(page_views=()))  # (B,)
        user = model.user_tower(batch, normalize=True)  # (B, E)
    """

    def __init__(self, cfg: ModelConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or ModelConfig()
        self.cfg = cfg
        d = cfg.d_model
        self.tables = AttributeEmbeddings(cfg)
        self.encoders = nn.ModuleDict(
            {s: SourceEncoder(s, a, cfg) for s, a in cfg.sources.items() if a}
        )
        self.target = nn.ModuleDict(
            {s: TargetAttention(d, cfg.n_heads) for s in self.encoders}
        )
        self.pool = nn.ModuleDict(
            {s: AttentionPool(d, cfg.n_heads) for s in self.encoders}
        )
        self.cand_proj = SlicedLinear(
            [(a, cfg.emb_dim) for a in cfg.candidate_attrs], d, label="candidate"
        )
        self.user_proj = SlicedLinear(
            [(s, d) for s in self.encoders], cfg.user_dim, label="user tower"
        )
        self.head_in = SlicedLinear(
            [("candidate", d)]
            + [(f"{k}.{s}", d) for s in self.encoders for k in ("target", "cross")]
            + [(f"match.{s}.{a}", 1) for s, a in match_pairs(cfg)]
            + [("user", cfg.user_dim)]
            + ([("alure", cfg.ext_dim)] if cfg.ext_dim else []),
            cfg.head_hidden,
            label="head",
        )
        self.head_out = nn.Sequential(nn.GELU(), nn.Linear(cfg.head_hidden, 1))
        self.ad_proj = nn.Linear(d, cfg.user_dim) if cfg.ad_tower else None

    def _enabled(self, fs: FeatureSet) -> tuple[str, ...]:
        missing = [s for s in fs.enabled_sources if s not in self.encoders]
        if missing:
            raise ValueError(
                f"feature set enables {missing}, but the model has no weights for "
                f"them (ModelConfig.sources has {list(self.encoders)})"
            )
        return fs.enabled_sources

    def encode(
        self,
        batch: ModelBatch,
        features: Features = None,
        embedded: dict[str, dict[str, Tensor]] | None = None,
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """Encoded histories of the enabled sources: ``{s: (h (B, L, D), mask)}``.

        Sources disabled by ``features`` are neither read nor encoded.
        ``embedded``, when given, receives ``{s: {attr: (B, L, e)}}``.
        """
        fs = FeatureSet.of(features)
        hist = batch.hist
        out: dict[str, tuple[Tensor, Tensor]] = {}
        for s in self._enabled(fs):
            if s not in hist:
                raise KeyError(
                    f"batch.hist lacks source {s!r} that the feature set enables; "
                    f"it has {sorted(hist)}"
                )
            sink = embedded.setdefault(s, {}) if embedded is not None else None
            out[s] = self.encoders[s](
                hist[s], fs.attrs(s), self.tables, batch.t_ms, sink
            )
        return out

    def _user(
        self, encoded: Mapping[str, tuple[Tensor, Tensor]], batch_size: int
    ) -> Tensor:
        """(B, E) from the encoded histories (bias only if no source ran)."""
        if not encoded:
            return self.user_proj.bias[None].repeat(batch_size, 1)  # (B, E)
        pooled = {s: self.pool[s](h, m) for s, (h, m) in encoded.items()}  # (B, D)
        return self.user_proj(pooled)  # (B, E)

    def user_tower(
        self, batch: ModelBatch, features: Features = None, normalize: bool = False
    ) -> Tensor:
        """The user embedding, without the candidate (ALURE's async part).

        Args:
            batch: the batch; ``batch.cand`` is not read.
            features: which sources / attributes to use.
            normalize: L2-normalise each row.
        Returns:
            (B, E).
        """
        u = self._user(self.encode(batch, features), len(batch))
        return F.normalize(u, dim=-1) if normalize else u

    def candidate(
        self,
        cand: Mapping[str, Tensor],
        attrs: tuple[str, ...],
        batch_size: int,
        embedded: dict[str, Tensor] | None = None,
    ) -> Tensor:
        """The candidate ad, (B, D), from its used attributes (bias if none);
        ``embedded`` receives each attribute's (B, e) embedding."""
        used = self.cand_proj.ordered(attrs)
        missing = [a for a in used if a not in cand]
        if missing:
            raise KeyError(f"batch.cand lacks {missing}; it has {sorted(cand)}")
        if not used:
            return self.cand_proj.bias[None].repeat(batch_size, 1)  # (B, D)
        emb = {a: self.tables[a](cand[a]) for a in used}  # (B, e) each
        if embedded is not None:
            embedded.update(emb)
        return self.cand_proj(emb)  # (B, D)

    def ad_embedding(self, cand: Tensor) -> Tensor:
        """The ad tower: (B, D) candidate representations -> (B, E), for the
        contrastive objective (needs ``ModelConfig.ad_tower``)."""
        if self.ad_proj is None:
            raise ValueError("the model has no ad tower: ModelConfig(ad_tower=True)")
        return self.ad_proj(cand)

    def forward(
        self,
        batch: ModelBatch,
        features: Features = None,
        user_index: Tensor | None = None,
        towers: dict[str, Tensor] | None = None,
    ) -> Tensor:
        """CTR logits.

        Args:
            batch: a :class:`~dynamix_ray.model.batch.ModelBatch` (its
                ``label`` is ignored). Events are newest last; a row may have
                no events.
            features: which attributes of which source to use (default: all).
            user_index: serving's shared user part: ``batch.hist`` and
                ``batch.t_ms`` then hold U user rows, ``batch.cand`` B
                candidate rows, and ``user_index`` (B,) int64 names each
                candidate's user row. Each history is encoded once per user,
                not once per candidate; the logits equal those of the same
                history repeated per candidate.
            towers: when given, receives ``"user"`` (B, E) and
                ``"candidate"`` (B, D) of this pass (the contrastive loss
                reads them; nothing is computed twice).
        Returns:
            (B,) logits.
        """
        fs = FeatureSet.of(features)
        embedded: dict[str, dict[str, Tensor]] = {}
        encoded = self.encode(batch, fs, embedded)
        user = self._user(encoded, len(batch))  # (U, E)

        def per_candidate(x: Tensor) -> Tensor:  # user rows -> candidate rows
            return x if user_index is None else x[user_index]

        user = per_candidate(user)
        b = user.shape[0]
        cand_emb: dict[str, Tensor] = {}
        cand = self.candidate(batch.cand, fs.candidate, b, cand_emb)  # (B, D)
        parts = {"candidate": cand, "user": user}
        if towers is not None:
            towers.update(parts)
        if self.cfg.ext_dim:
            if batch.alure is None:
                raise KeyError(
                    f"the model takes an external user embedding (ext_dim="
                    f"{self.cfg.ext_dim}) but the batch has no alure"
                )
            ext = batch.alure.to(cand.dtype)  # (U, ext_dim)
            parts["alure"] = ext[user_index] if user_index is not None else ext
        e = self.cfg.emb_dim
        for s, attrs in embedded.items():
            m = encoded[s][1]  # (U, L)
            count = m.sum(-1, keepdim=True).clamp(min=1).to(cand.dtype)  # (U, 1)
            for a, h in attrs.items():
                if a in cand_emb:  # mean similarity of the candidate's value to
                    # the history's (~1 per identical id at init; padding rows
                    # are 0): sum_l h_l . c = (sum_l h_l) . c, the history's
                    # sum once per user row
                    pooled = per_candidate(h.sum(1) / (e * count))  # (B, e)
                    dots = pooled[:, None, :] @ cand_emb[a][:, :, None]  # (B, 1, 1)
                    parts[f"match.{s}.{a}"] = dots[:, 0]  # (B, 1)
        for s, (h, m) in encoded.items():
            t = self.target[s](cand, h, m, user_index)  # (B, D)
            parts[f"target.{s}"] = t
            parts[f"cross.{s}"] = cand * t  # (B, D): DIN-style interaction
        return self.head_out(self.head_in(parts))[:, 0]  # (B,)


class PartsLoss(nn.Module):
    """The summed log loss of a batch's parts, each part run with its own
    ``FeatureSet``, in ONE forward call.

    A segment-conditional batch is several model passes (one per segment
    present). Wrapped in DDP, this module makes them one forward per step on
    every rank, whatever segments a rank's batch holds, so the ranks' buffer
    broadcasts and gradient all-reduces always pair up.

    With ``contrastive_weight`` > 0 the loss also has the user tower's
    sampled softmax against the ad tower over the batch's positive rows
    (:func:`in_batch_softmax`), times that weight.

    Shapes: ``forward([(batch, features), ...])`` -> () summed binary cross
    entropy over every row of every part (each batch needs its ``label`` (B,)).
    """

    def __init__(
        self,
        ctr: DynamixCTR,
        use_amp: bool = False,
        contrastive_weight: float = 0.0,
        temperature: float = 0.05,
        ad_key: str = "ad_id",
    ) -> None:
        super().__init__()
        self.ctr = ctr
        self.use_amp = use_amp
        self.contrastive_weight = contrastive_weight
        self.temperature = temperature
        self.ad_key = ad_key  # the candidate attribute that names the ad

    def forward(self, parts: list[tuple[ModelBatch, Features]]) -> Tensor:
        import torch

        total = None
        users, ads, ad_ids = [], [], []
        for batch, features in parts:
            if batch.label is None:
                raise ValueError("PartsLoss needs batches with a label")
            dev = batch.label.device
            towers: dict[str, Tensor] = {}
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.use_amp):
                logits = self.ctr(batch, features, towers=towers)
            loss = F.binary_cross_entropy_with_logits(
                logits.float(), batch.label, reduction="sum"
            )
            total = loss if total is None else total + loss
            if self.contrastive_weight > 0:
                pos = batch.label > 0.5
                users.append(towers["user"][pos].float())
                ads.append(towers["candidate"][pos].float())
                ad_ids.append(batch.cand[self.ad_key][pos])
        assert total is not None, "PartsLoss needs at least one part"
        if self.contrastive_weight > 0:
            u, a = torch.cat(users), torch.cat(ads)
            total = total + self.contrastive_weight * in_batch_softmax(
                u, self.ctr.ad_embedding(a), torch.cat(ad_ids), self.temperature
            )
        return total


def in_batch_softmax(
    user: Tensor, ad: Tensor, ad_id: Tensor, temperature: float
) -> Tensor:
    """Summed sampled-softmax loss with in-batch negatives: row i's user
    should pick its own ad among the batch's (cosine / temperature). Another
    row with the same ad is not a negative (masked). Fewer than 2 rows: 0.

    Shapes: user (P, E), ad (P, E), ad_id (P,) -> ().
    """
    import torch

    if user.shape[0] < 2:
        return ad.sum() * 0.0  # keeps the ad tower in the graph
    u, a = F.normalize(user, dim=-1), F.normalize(ad, dim=-1)
    logits = u @ a.T / temperature  # (P, P)
    same = ad_id[:, None] == ad_id[None, :]
    eye = torch.eye(len(ad_id), dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(same & ~eye, float("-inf"))
    target = torch.arange(len(ad_id), device=logits.device)
    return F.cross_entropy(logits, target, reduction="sum")


def flops_per_sample(
    cfg: ModelConfig,
    features: Features = None,
    seq_lens: Mapping[str, int] | None = None,
    part: Literal["ctr", "user_tower", "request_user"] = "ctr",
) -> int:
    """Analytic FLOPs (2 x multiply-accumulates) of one sample's forward pass.

    Counts what ``torch.utils.flop_counter.FlopCounterMode`` counts: the matrix
    products of projections, attention and MLPs. Embedding look-ups (memory
    ops), softmax, norms, activations and the CFEE feature arithmetic are 0.

    Args:
        cfg: the model's shapes.
        features: the feature set of the pass (default: all).
        seq_lens: padded history length per source (default ``cfg.max_seq_len``).
        part: ``"ctr"`` (the whole model), ``"user_tower"``, or
            ``"request_user"``: what a ranking request computes once per user
            (``forward(user_index=...)``): the user tower and the target
            attention's K/V projection of each history.
    """
    fs = FeatureSet.of(features)
    seq_lens = seq_lens or {}
    d, e, m = cfg.d_model, cfg.emb_dim, cfg.mlp_ratio * cfg.d_model
    macs = 0
    enabled = fs.enabled_sources
    for s in enabled:
        length = seq_lens.get(s, cfg.max_seq_len)
        used = fs.attrs(s)
        macs += length * e if DWELL in used else 0  # dwell: Linear(1, e)
        macs += length * len(used) * e * d  # attribute projection
        macs += length * cfg.n_time_features * d  # CFEE projection
        per_layer = length * d * 3 * d + 2 * length * length * d + length * d * d
        per_layer += 2 * length * d * m  # MLP
        macs += cfg.n_layers * per_layer
        macs += 2 * length * d  # attention pooling: scores + weighted sum
        if part != "user_tower":  # target attention's K/V of the history
            macs += length * 2 * d * d
        if part == "ctr":  # target attention: q, scores, mix, out
            macs += d * d + 2 * length * d + d * d
            n_match = sum(1 for a in used if a != DWELL and a in fs.candidate)
            macs += n_match * e  # match: the history's sum . the candidate
    if enabled:
        macs += len(enabled) * d * cfg.user_dim  # user_proj
    if part == "ctr":
        macs += len(fs.candidate) * e * d  # cand_proj
        n_match_all = sum(
            1 for s in enabled for a in fs.attrs(s) if a != DWELL and a in fs.candidate
        )
        head_in = d + 2 * len(enabled) * d + n_match_all + cfg.user_dim + cfg.ext_dim
        macs += head_in * cfg.head_hidden
        macs += cfg.head_hidden  # head_out
    return 2 * macs
