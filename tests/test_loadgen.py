"""The load generator's accounting: replica-seconds and compute shares."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from dynamix_ray.serve.loadgen import DEPLOYMENTS, compute_shares


def _row(t: float, router: int, active: int, passive: int) -> dict:
    return {"t": t, "Router": router, "ActiveRanker": active, "PassiveRanker": passive}


def test_replica_seconds_by_phase_hand_computed() -> None:
    # 0-2 s: 1 active, 1 passive; 2-4 s: 2 active; 4-6 s: 2 active, 1 router more
    tl = [_row(0, 1, 1, 1), _row(2, 1, 2, 1), _row(4, 2, 2, 1), _row(6, 2, 2, 1)]
    out = compute_shares(tl, [("first", 0, 3), ("second", 3, 6), ("all", 0, 6)])
    assert out["first"]["ActiveRanker_replica_s"] == 2 * 1 + 1 * 2
    assert out["first"]["PassiveRanker_replica_s"] == 3
    assert out["second"]["ActiveRanker_replica_s"] == 6
    assert out["second"]["Router_replica_s"] == 1 * 1 + 2 * 2
    assert out["all"]["active_replica_share"] == 10 / (10 + 6)


def test_no_rankers_no_share() -> None:
    tl = [_row(0, 1, 0, 0), _row(1, 1, 0, 0)]
    assert compute_shares(tl, [("all", 0, 1)])["all"]["active_replica_share"] is None


@given(
    st.lists(
        st.tuples(
            st.floats(0.01, 5), st.integers(0, 3), st.integers(0, 3), st.integers(0, 3)
        ),
        min_size=2,
        max_size=20,
    ),
    st.floats(0, 1),
)
def test_phases_add_up(steps: list[tuple], cut: float) -> None:
    """Two phases that split the timeline sum to the whole, deployment by
    deployment; a phase past the timeline's end adds nothing."""
    t, tl = 0.0, []
    for dt, r, a, p in steps:
        tl.append(_row(t, r, a, p))
        t += dt
    end = tl[-1]["t"]
    mid = cut * end
    out = compute_shares(
        tl, [("a", 0, mid), ("b", mid, end), ("all", 0, end), ("after", end, end + 9)]
    )
    for d in DEPLOYMENTS:
        key = f"{d}_replica_s"
        assert abs(out["a"][key] + out["b"][key] - out["all"][key]) < 1e-2
        assert out["after"][key] == 0
