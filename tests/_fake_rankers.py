"""A ranker stand-in for the router's failure tests: its behaviour is chosen
by the request's user id (pickled by value into Serve's replicas)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

BUG_USER = 13  # raises: a bug in the model deployment -> 500
STUCK_USER = 14  # never answers in time -> 504
SLOW_USER = 15  # holds the replica 0.5 s -> queueing, then shedding (503)


class FakeRanker:
    def __init__(self, name: str) -> None:
        self.name = name

    async def rank(self, user_id: int, ts_ms: int, cands: np.ndarray) -> dict[str, Any]:
        if user_id == BUG_USER:
            raise ValueError("an injected bug")
        if user_id == STUCK_USER:
            await asyncio.sleep(30)
        if user_id == SLOW_USER:
            await asyncio.sleep(0.5)
        return {"scores": [0.5] * len(cands), "model_version": self.name, "policy": "x"}
