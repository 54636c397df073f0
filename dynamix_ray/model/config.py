"""What the model is built with (``ModelConfig``) and what one forward uses
(``FeatureSet``).

The model is built once with the *union* of every attribute a feature policy may
ever ask for; a ``FeatureSet`` then picks, per forward pass, which attributes of
which source to use. One set of weights serves every policy (docs/contract.md §4), and a
narrower ``FeatureSet`` does less work: unused look-ups, projection columns and
whole source encoders are skipped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields

from dynamix_ray.schema import CANDIDATE_ATTRIBUTES, SOURCES

__all__ = [
    "CANDIDATE_ATTRIBUTES",
    "DWELL",
    "EVENT_SOURCES",
    "SOURCE_ATTRIBUTES",
    "FeatureSet",
    "ModelConfig",
]

#: The pseudo-attribute name of ln(1 + dwell_ms) in a ``FeatureSet``.
DWELL = "dwell_ms"

#: Every attribute of every EBF source (docs/contract.md §1), dwell first where it exists.
SOURCE_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    name: ((DWELL,) if src.has_dwell else ()) + tuple(src.attributes)
    for name, src in SOURCES.items()
}
EVENT_SOURCES: tuple[str, ...] = tuple(SOURCE_ATTRIBUTES)


_DEFAULT_NUM_BUCKETS = {
    "category_id": 2**12,
    "media_type": 16,
    "surface": 16,
    "position": 256,
    "kind": 8,
}


@dataclass(frozen=True)
class ModelConfig:
    """Shapes of the sequence CTR model.

    Args:
        sources: source -> attributes the model holds weights for (the union of
            every policy). ``"dwell_ms"`` is one of the attribute names.
        candidate_attrs: candidate-ad attributes the model holds weights for.
        emb_dim: width ``e`` of every attribute embedding (and of dwell).
        d_model: width ``D`` of event representations in the source encoders.
        n_heads: attention heads (self-attention, target attention, pooling).
        n_layers: encoder blocks per source.
        mlp_ratio: hidden width of a block's MLP is ``mlp_ratio * D``.
        max_seq_len: longest history per source; positions beyond share the
            last position embedding.
        user_dim: width ``E`` of the user-tower embedding.
        head_hidden: hidden width of the CTR head MLP.
        default_num_buckets: hash buckets of an id attribute not in
            ``num_buckets`` (bucket 0 is padding).
        num_buckets: per-attribute bucket counts (overrides the default).
        direct_attrs: small enums indexed by ``id mod (buckets - 1) + 1``
            instead of a hash, so that their few values never collide.
        n_decay: radial basis features on log elapsed seconds (CFEE decay).
        n_harmonics: hour-of-day harmonics (CFEE cyclic; day-of-week has one).
        rel_time_buckets: log2 buckets of ``|ts_i - ts_j|`` seconds for the
            relative-time attention bias.
        ext_dim: width of an external user embedding (ALURE's, computed
            asynchronously by another model) fed to the head as the batch's
            ``"alure"`` (B, ext_dim); 0: none.
        ad_tower: hold an ad tower (``Linear(D, E)`` over the candidate
            representation) for the user tower's contrastive objective
            (``TrainConfig.contrastive_weight``); it is not part of a CTR
            forward pass.
    """

    sources: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: dict(SOURCE_ATTRIBUTES)
    )
    candidate_attrs: tuple[str, ...] = CANDIDATE_ATTRIBUTES
    emb_dim: int = 16
    d_model: int = 32
    n_heads: int = 2
    n_layers: int = 1
    mlp_ratio: int = 2
    max_seq_len: int = 64
    user_dim: int = 32
    head_hidden: int = 64
    default_num_buckets: int = 2**14
    num_buckets: Mapping[str, int] = field(
        default_factory=lambda: dict(_DEFAULT_NUM_BUCKETS)
    )
    direct_attrs: tuple[str, ...] = ("media_type", "surface", "position", "kind")
    n_decay: int = 8
    n_harmonics: int = 2
    rel_time_buckets: int = 32
    ext_dim: int = 0
    ad_tower: bool = False

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(
                f"ModelConfig.d_model={self.d_model} must be a multiple of "
                f"n_heads={self.n_heads}"
            )
        for source, attrs in self.sources.items():
            known = SOURCE_ATTRIBUTES.get(source)
            if known is None:
                raise ValueError(
                    f"ModelConfig.sources: unknown source {source!r}; "
                    f"expected one of {EVENT_SOURCES}"
                )
            unknown = sorted(set(attrs) - set(known))
            if unknown:
                raise ValueError(
                    f"ModelConfig.sources[{source!r}]: unknown attributes "
                    f"{unknown}; {source} has {known}"
                )
        for name, n in self.num_buckets.items():
            if n < 2:
                raise ValueError(f"ModelConfig.num_buckets[{name!r}]={n}: need >= 2")

    def buckets(self, attr: str) -> int:
        """Embedding rows of ``attr`` (row 0 is the padding row)."""
        return int(self.num_buckets.get(attr, self.default_num_buckets))

    @property
    def id_attrs(self) -> tuple[str, ...]:
        """Every id/enum attribute with a table, in first-seen order (no dwell)."""
        names = [*self.candidate_attrs]
        for attrs in self.sources.values():
            names.extend(attrs)
        return tuple(dict.fromkeys(a for a in names if a != DWELL))

    @property
    def n_time_features(self) -> int:
        """Continuous CFEE features per event: decay RBFs + hour and weekday sin/cos."""
        return self.n_decay + 2 * self.n_harmonics + 2


@dataclass(frozen=True)
class FeatureSet:
    """Which attributes of which source one forward pass uses.

    A source with an empty tuple is skipped entirely (no look-ups, no encoder).
    Defaults: everything of every source and every candidate attribute.

    Example:
        >>> fs = FeatureSet(conversions=(), page_views=())
        >>> fs.enabled_sources
        ('ad_impressions', 'organic_impressions')
    """

    ad_impressions: tuple[str, ...] = SOURCE_ATTRIBUTES["ad_impressions"]
    conversions: tuple[str, ...] = SOURCE_ATTRIBUTES["conversions"]
    organic_impressions: tuple[str, ...] = SOURCE_ATTRIBUTES["organic_impressions"]
    page_views: tuple[str, ...] = SOURCE_ATTRIBUTES["page_views"]
    candidate: tuple[str, ...] = CANDIDATE_ATTRIBUTES

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, str):
                raise TypeError(
                    f"FeatureSet.{f.name} must be a tuple of attribute names, "
                    f"got the string {value!r}"
                )
            object.__setattr__(self, f.name, tuple(value))

    @classmethod
    def of(
        cls, features: FeatureSet | Mapping[str, Sequence[str]] | None
    ) -> FeatureSet:
        """Coerce a mapping ``source -> attributes`` (absent source: disabled;
        absent ``"candidate"``: every candidate attribute), or ``None`` (all)."""
        if features is None:
            return cls()
        if isinstance(features, FeatureSet):
            return features
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(features) - known)
        if unknown:
            raise ValueError(
                f"FeatureSet: unknown sources {unknown}; expected {sorted(known)}"
            )
        kwargs = {s: tuple(features.get(s, ())) for s in EVENT_SOURCES}
        return cls(
            **kwargs, candidate=tuple(features.get("candidate", CANDIDATE_ATTRIBUTES))
        )

    def attrs(self, source: str) -> tuple[str, ...]:
        """The attributes used of ``source`` (``"candidate"`` allowed)."""
        return tuple(getattr(self, source))

    @property
    def enabled_sources(self) -> tuple[str, ...]:
        return tuple(s for s in EVENT_SOURCES if self.attrs(s))
