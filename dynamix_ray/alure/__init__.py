"""ALURE on Ray: asynchronous user embeddings, the user-to-user graph, and u2u
ad candidates (``dynamix embed`` / ``dynamix u2u``)."""

from dynamix_ray.alure.candidates import (
    CandidateConfig,
    u2u_candidates,
)
from dynamix_ray.alure.embed import EmbedConfig, run_embed, user_histories
from dynamix_ray.alure.graph import U2UConfig, build_u2u, exact_neighbors

__all__ = [
    "CandidateConfig",
    "EmbedConfig",
    "U2UConfig",
    "build_u2u",
    "exact_neighbors",
    "run_embed",
    "u2u_candidates",
    "user_histories",
]
