"""One ranking request at the prod shape (every source L = 256), forward with
``user_index`` as the rankers run it, timed; prints the median ms of 30 calls
(one torch thread). Prints what it measured; never asserts.

The first argument is the root of a checkout whose ``dynamix_ray`` to time,
so that two versions can be run side by side, e.g. before and after the
per-user K/V change (docs/experiments.md):

    git worktree add /tmp/old 335c7d3
    for i in 1 2 3; do
        python benchmarks/request_kv.py /tmp/old 100; python benchmarks/request_kv.py . 100
    done
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", help="checkout whose dynamix_ray to time")
    p.add_argument("candidates", type=int, nargs="?", default=100)
    p.add_argument("--calls", type=int, default=30)
    args = p.parse_args(argv)
    sys.path.insert(0, args.root)  # before the import: that checkout's code

    import torch

    torch.set_num_threads(1)
    model_mod = importlib.import_module("dynamix_ray.model")
    batch_mod = importlib.import_module("dynamix_ray.model.batch")
    config = importlib.import_module("dynamix_ray.model.config")
    cfg = model_mod.ModelConfig(
        d_model=64, n_heads=4, n_layers=2, head_hidden=128, emb_dim=16, max_seq_len=256
    )
    torch.manual_seed(0)
    model = model_mod.DynamixCTR(cfg).eval()
    n, c = 256, args.candidates
    g = torch.Generator().manual_seed(0)
    hist = {}
    for s, attrs in config.SOURCE_ATTRIBUTES.items():
        hist[s] = batch_mod.SourceBatch(
            mask=torch.ones(1, n, dtype=torch.bool),
            ts_ms=torch.arange(n)[None] * 60_000 + 1_700_000_000_000,
            attrs={
                a: torch.randint(1, 10**6, (1, n), generator=g)
                for a in attrs
                if a != config.DWELL
            },
            dwell=torch.rand(1, n) if config.DWELL in attrs else None,
        )
    batch = batch_mod.ModelBatch(
        t_ms=torch.tensor([1_700_000_000_000 + n * 60_000]),
        cand={
            a: torch.randint(1, 10**6, (c,), generator=g)
            for a in config.CANDIDATE_ATTRIBUTES
        },
        hist=hist,
        label=None,
        alure=None,
    )
    index = torch.zeros(c, dtype=torch.int64)
    times = []
    with torch.inference_mode():
        for _ in range(5):  # warm-up
            model(batch, None, user_index=index)
        for _ in range(args.calls):
            t0 = time.perf_counter()
            model(batch, None, user_index=index)
            times.append(time.perf_counter() - t0)
    print(f"{statistics.median(times) * 1000:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
