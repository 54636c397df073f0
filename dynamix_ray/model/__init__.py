"""The sequence CTR model: CFEE time encodings, per-source encoders, target
attention, a user tower for ALURE, analytic FLOPs, and NE / AUC.

Read in this order: ``config`` (what the model holds, what a pass uses) ->
``embeddings`` -> ``time_encoding`` -> ``layers`` -> ``encoders`` -> ``ctr``.
"""

from dynamix_ray.model.batch import ModelBatch, SourceBatch
from dynamix_ray.model.config import (
    CANDIDATE_ATTRIBUTES,
    DWELL,
    EVENT_SOURCES,
    SOURCE_ATTRIBUTES,
    FeatureSet,
    ModelConfig,
)
from dynamix_ray.model.ctr import (
    DynamixCTR,
    Features,
    PartsLoss,
    flops_per_sample,
)
from dynamix_ray.model.embeddings import AttributeEmbeddings, HashEmbedding, hash_ids
from dynamix_ray.model.encoders import EventBlock, SourceEncoder
from dynamix_ray.model.layers import SlicedLinear
from dynamix_ray.model.metrics import auc, normalized_entropy
from dynamix_ray.model.time_encoding import CFEE, RelativeTimeBias

__all__ = [
    "CANDIDATE_ATTRIBUTES",
    "CFEE",
    "DWELL",
    "EVENT_SOURCES",
    "SOURCE_ATTRIBUTES",
    "AttributeEmbeddings",
    "DynamixCTR",
    "EventBlock",
    "FeatureSet",
    "Features",
    "HashEmbedding",
    "ModelBatch",
    "ModelConfig",
    "PartsLoss",
    "RelativeTimeBias",
    "SlicedLinear",
    "SourceBatch",
    "SourceEncoder",
    "auc",
    "flops_per_sample",
    "hash_ids",
    "normalized_entropy",
]
