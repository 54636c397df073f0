"""Ray Serve: a router in front of separate active and passive rankers.

``build_app`` (:mod:`dynamix_ray.serve.app`) is the import path of
``serve_configs/dynamix.yaml``; :class:`~dynamix_ray.serve.ranker.Ranker` and
:class:`~dynamix_ray.serve.store.SegmentStore` are the plain cores.
"""

from dynamix_ray.serve.store import SegmentStore, read_segment_store

__all__ = ["SegmentStore", "read_segment_store"]
