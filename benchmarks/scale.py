"""Scale ladder: the same code at growing sizes, cost per unit of work side by
side (prints what it measured and writes JSON; never asserts a time).

Sections (``--sections``, default all):

* ``segment``: ``dynamix segment`` at 20M, 80M and 320M ad impressions
  (``--segment-sizes``), from unbucketed input (the run buckets it: the event
  store, then the statistic) and from that event store (the statistic alone);
* ``shuffle``: the store's storage shuffle beside Ray Data's hash shuffle
  (``repartition(keys=["bucket"])``) on the smallest segment size;
* ``train``: compact samples plus one training epoch at 2k, 8k and 32k users x
  7 days (``--train-users``; the training benchmark's shape);
* ``loader``: the batch-time gather alone at L = 64, one thread, per policy:
  rows/s and bytes per batch;
* ``alure``: the histories snapshot, embed and u2u at 100k and 1M users
  (``--alure-users``, 2 days each);
* ``cluster``: segmentation and sample building on a local ``ray start``
  cluster of one node, then two nodes, 1 CPU each.

Every step runs in a fresh process with its own local Ray (2 CPUs), so the
driver's peak RSS is its own; a sampler thread records the peak RSS of the
driver and of the largest Ray worker process, and the object-store spill comes
from ``ray memory``. The last table is a cost model: core-hours a day at the
papers' scale from the measured per-core rates.

    python benchmarks/scale.py                       # everything (hours)
    python benchmarks/scale.py --sections loader,train --train-users 2000,8000
    python benchmarks/scale.py --quick               # small sizes: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
IMPRESSIONS_PER_USER_DAY = 30.0  # GenerateConfig's default
GIB = 1024**3


# ------------------------------------------------------------ measurement


class Sampler:
    """Peak RSS of this process and of the largest ``ray::`` process started
    after it (local workers are descendants; a ``ray start`` cluster's are
    not, so every such process on the machine is looked at)."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s = interval_s
        self.t0 = time.time()
        self.driver = 0
        self.worker = 0
        # RSS less its resident shared pages (the object store's shared
        # memory, mapped libraries): what the process holds by itself
        self.worker_private = 0
        self.total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        self.driver = max(self.driver, me.memory_info().rss)
        total = me.memory_info().rss
        for p in psutil.process_iter(["cmdline", "create_time", "memory_info"]):
            try:
                cmd = " ".join(p.info["cmdline"] or [])
                if not cmd.startswith("ray::") or p.info["create_time"] < self.t0 - 1:
                    continue
                mem = p.info["memory_info"]
                rss, private = mem.rss, mem.rss - getattr(mem, "shared", 0)
            except (psutil.Error, TypeError, AttributeError):
                continue
            self.worker = max(self.worker, rss)
            self.worker_private = max(self.worker_private, private)
            total += rss
        self.total = max(self.total, total)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval_s)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def spilled_mib() -> float:
    """Object-store bytes spilled so far in this Ray session (``ray memory``)."""
    import ray
    from ray._private.internal_api import memory_summary

    try:
        text = memory_summary(
            address=ray.get_runtime_context().gcs_address, stats_only=True
        )
    except Exception as e:  # noqa: BLE001 - report, do not fail the benchmark
        return float("nan") if e else 0.0
    m = re.search(r"Spilled (\d+) MiB", text)
    return float(m.group(1)) if m else 0.0


# ------------------------------------------------------------------ steps


def _gen(root: str, users: int, days: int, engagement: bool, chunk: int) -> dict:
    """Generate (cached) a dataset; returns its truth summary."""
    from dynamix_ray.config import GenerateConfig
    from dynamix_ray.synth import generate

    truth = Path(root) / "_truth" / "truth.json"
    if not truth.exists():
        shutil.rmtree(root, ignore_errors=True)
        cfg = GenerateConfig(
            users=users,
            days=days,
            seed=1,
            engagement=engagement,
            chunk_users=chunk,
        )
        generate(root, cfg, progress=None)
    return json.loads(truth.read_text())


def step_generate(p: dict) -> dict:
    t0 = time.perf_counter()
    truth = _gen(p["root"], p["users"], p["days"], p["engagement"], p["chunk"])
    return {"rows": truth["rows"], "wall_s": time.perf_counter() - t0}


def step_segment(p: dict) -> dict:
    from dynamix_ray.config import SegmentConfig
    from dynamix_ray.segments.pipeline import run_segment

    shutil.rmtree(p["out"], ignore_errors=True)
    t0 = time.perf_counter()
    r = run_segment(p["events"], p["out"], SegmentConfig(), progress=False)
    wall = time.perf_counter() - t0
    c = r.meta["counts"]
    return {
        "wall_s": wall,
        "events": c["impressions"] + c["conversions"] + c["rejected_total"],
        "store": r.meta["store"],
        "num_buckets": r.meta["num_buckets"],
        "epsilon_rounds": r.meta["epsilon_calibration"].get("rounds"),
        "store_wall_s": _store_wall(r.meta["store"]) if p.get("builds_store") else 0,
        "phase_s": {
            **(_store_phases(r.meta["store"]) if p.get("builds_store") else {}),
            **r.meta["phase_s"],
        },
    }


def _store_phases(url: str) -> dict:
    from dynamix_ray.events import open_store

    store = open_store(url)
    return {
        f"bucket_{k}": v
        for k, v in (store.meta.get("phase_s", {}) if store else {}).items()
    }


def _store_wall(url: str) -> float:
    from dynamix_ray.events import open_store

    store = open_store(url)
    return float(store.meta["wall_s"]) if store else float("nan")


def step_shuffle_hash(p: dict) -> dict:
    """Ray Data's hash shuffle to the same buckets: read, validate and hash
    every row, ``repartition(keys=["bucket"])``, write each bucket sorted."""
    import numpy as np
    import pyarrow as pa
    import ray

    from dynamix_ray.io import discover, user_bucket
    from dynamix_ray.schema import SOURCES, validate

    ds = discover(p["events"], ["ad_impressions", "conversions"])
    nb = p["num_buckets"]
    out = Path(p["out"])
    shutil.rmtree(out, ignore_errors=True)

    def prep(t: pa.Table, source: str) -> pa.Table:
        v = validate(t, SOURCES[source], source).valid
        b = user_bucket(v.column("user_id").to_numpy(), nb)
        return v.append_column("bucket", pa.array(b, pa.int32()))

    def write(t: pa.Table, source: str) -> pa.Table:
        import pyarrow.parquet as pq

        for b in np.unique(t.column("bucket").to_numpy()):
            part = t.filter(pa.compute.equal(t.column("bucket"), b))
            order = np.lexsort(
                (part.column("ts_ms").to_numpy(), part.column("user_id").to_numpy())
            )
            d = out / source / f"bucket={int(b):05d}"
            d.mkdir(parents=True, exist_ok=True)
            pq.write_table(part.take(pa.array(order)), d / f"{time.time_ns()}.parquet")
        return pa.table({"rows": [t.num_rows]})

    t0 = time.perf_counter()
    rows = 0
    for source in ("ad_impressions", "conversions"):
        res = (
            ray.data.read_parquet(ds.files[source])
            .map_batches(prep, fn_args=(source,), batch_format="pyarrow")
            .repartition(nb, keys=["bucket"])
            .map_batches(
                write, fn_args=(source,), batch_format="pyarrow", batch_size=None
            )
        )
        rows += sum(int(r["rows"]) for r in res.iter_rows())
    return {"wall_s": time.perf_counter() - t0, "rows": rows}


def step_bucket(p: dict) -> dict:
    from dynamix_ray.events import run_bucket

    shutil.rmtree(p["out"], ignore_errors=True)
    t0 = time.perf_counter()
    s = run_bucket(p["events"], p["out"], p.get("num_buckets"), progress=False)
    return {
        "wall_s": time.perf_counter() - t0,
        "rows": sum(s.meta["input_rows"].values()),
        "num_buckets": s.num_buckets,
        "pieces": s.meta["pieces"],
        "shuffle_files": s.meta["shuffle_files"],
    }


def step_samples(p: dict) -> dict:
    from dynamix_ray.samples import SampleConfig, run_samples

    shutil.rmtree(Path(p["out"]) / "samples", ignore_errors=True)
    t0 = time.perf_counter()
    t = run_samples(
        p["events"], p["segments"], p["out"], SampleConfig(), progress=False
    )
    wall = time.perf_counter() - t0
    n = sum(t.meta["rows"].values())
    store = _store_bytes(t.store_url)
    return {
        "wall_s": wall,
        "samples": n,
        "bytes_per_sample_stored": t.meta["bytes_on_disk"] / n,
        "bytes_per_sample_in_memory": 89.0,  # SAMPLE_SCHEMA's fixed widths
        "event_store_bytes_per_sample": store / n,
    }


def _store_bytes(url: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(url):
        if "rejects" in dirpath:
            continue
        total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    return total


def step_train(p: dict) -> dict:
    from dynamix_ray.model import ModelConfig
    from dynamix_ray.samples import SampleConfig
    from dynamix_ray.train import TrainConfig, prepare_train_data, run_train

    seq = int(p["max_seq_len"])
    samples = SampleConfig(max_seq_len=seq)
    data = prepare_train_data(
        p["events"], p["segments"], p["out"], samples, progress=False
    )
    shutil.rmtree(Path(p["out"]) / "run", ignore_errors=True)
    t0 = time.perf_counter()
    m = run_train(
        p["events"],
        p["segments"],
        str(Path(p["out"]) / "run"),
        TrainConfig(
            epochs=1,
            batch_size=512,
            samples=samples,
            model=ModelConfig(max_seq_len=seq),
            importance_rows=0,
            curve_steps=0,
        ),
        data=data,
        progress=False,
    )
    return {
        "wall_s": time.perf_counter() - t0,
        "train_rows": m["epoch_rows"],
        "train_examples_per_s": m["train_examples_per_s"],
        "loader_rows_per_s": m["loader_rows_per_s"],
        "loader_bytes_per_row": m["loader_bytes_per_row"],
        "ne": m["ne"],
        "auc": m["auc"],
        "auc_max_error": m["auc_max_error"],
    }


def step_loader(p: dict) -> dict:
    """The gather alone: every policy over the same training rows, in file
    order with a local shuffle (as Ray Train feeds them), one thread."""
    import numpy as np
    import pyarrow.parquet as pq

    from dynamix_ray.events import open_store
    from dynamix_ray.features import POLICIES
    from dynamix_ray.loader import LoaderSpec, SegmentBatcher
    from dynamix_ray.samples import read_sample_table

    table = read_sample_table(p["out"])
    store = open_store(table.store_url)
    assert store is not None
    files = table.files("train")[: p.get("max_files", 8)]
    rows = [pq.read_table(f) for f in files]
    batch_size = 512
    out: dict[str, Any] = {}
    removed = ("campaign_id", "media_type", "surface", "position")
    for policy in POLICIES:
        spec = LoaderSpec.of(
            store, policy=policy, removed=removed, max_seq_len=int(p["max_seq_len"])
        )
        batcher = SegmentBatcher(spec)
        n, nbytes, spent, batches = 0, 0, 0.0, 0
        rng = np.random.default_rng(0)
        for t in rows:
            cols = {c: t.column(c).to_numpy() for c in t.column_names}
            perm = rng.permutation(t.num_rows)
            batcher.cache.get(int(cols["bucket"][0]))  # the load is not the gather
            for i in range(0, t.num_rows - batch_size + 1, batch_size):
                b = {k: v[perm[i : i + batch_size]] for k, v in cols.items()}
                t0 = time.perf_counter()
                batcher(b)
                spent += time.perf_counter() - t0
                n += batch_size
                nbytes += batcher.last_nbytes
                batches += 1
        out[policy] = {
            "rows_per_s": n / spent,
            "bytes_per_batch": nbytes / batches,
            "bytes_per_row": nbytes / n,
        }
    return {"policies": out, "max_seq_len": p["max_seq_len"], "rows": n}


def step_histories(p: dict) -> dict:
    """The snapshot; its in-memory size per user from bucket 0 (loading every
    user here would measure this benchmark's driver, not the pipeline's)."""
    import pyarrow.parquet as pq

    from dynamix_ray.gather import SourceEvents
    from dynamix_ray.histories import run_histories

    shutil.rmtree(Path(p["out"]) / "histories", ignore_errors=True)
    t0 = time.perf_counter()
    m = run_histories(p["events"], p["out"], None, 64, progress=False)
    wall = time.perf_counter() - t0
    users: set[int] = set()
    nbytes = 0
    for f in Path(p["out"], "histories").glob("*/bucket=00000/part-0.parquet"):
        ev = SourceEvents.from_table(pq.read_table(f))
        nbytes += ev.nbytes
        users.update(ev.user_id.tolist())
    return {
        "wall_s": wall,
        "users": m["users"],
        "bytes_per_user": nbytes / max(1, len(users)),
    }


def step_embed(p: dict) -> dict:
    from dynamix_ray.alure.embed import EmbedConfig, run_embed

    shutil.rmtree(Path(p["out"]), ignore_errors=True)
    t0 = time.perf_counter()
    m = run_embed(p["events"], p["checkpoint"], p["out"], EmbedConfig(), progress=False)
    return {"wall_s": time.perf_counter() - t0, "users": m["users"]}


def step_u2u(p: dict) -> dict:
    from dynamix_ray.alure.graph import U2UConfig, build_u2u

    shutil.rmtree(Path(p["out"]), ignore_errors=True)
    t0 = time.perf_counter()
    m = build_u2u(p["embeddings"], p["out"], U2UConfig(), progress=False)
    return {
        "wall_s": time.perf_counter() - t0,
        "users": m["users"],
        "edges": m["edges"],
        "recall_at_k2": m["recall_at_k2"],
        "build_s": m["build_s"],
        "query_s": m["query_s"],
    }


def step_checkpoint(p: dict) -> dict:
    """A small trained model for embed (trained on the smallest train size)."""
    from dynamix_ray.model import ModelConfig
    from dynamix_ray.samples import SampleConfig
    from dynamix_ray.train import TrainConfig, run_train

    out = Path(p["out"])
    if (out / "metrics.json").exists():
        return {"checkpoint": str(out)}
    run_train(
        p["events"],
        p["segments"],
        str(out),
        TrainConfig(
            epochs=1,
            samples=SampleConfig(max_seq_len=32),
            model=ModelConfig(max_seq_len=32),
            importance_rows=0,
        ),
        progress=False,
    )
    return {"checkpoint": str(out)}


STEPS = {
    "generate": step_generate,
    "segment": step_segment,
    "bucket": step_bucket,
    "shuffle_hash": step_shuffle_hash,
    "samples": step_samples,
    "train": step_train,
    "loader": step_loader,
    "histories": step_histories,
    "embed": step_embed,
    "u2u": step_u2u,
    "checkpoint": step_checkpoint,
}


def run_step_here(name: str, params: dict, result_path: str) -> None:
    """Child side: a fresh driver (joins RAY_ADDRESS when set)."""
    import ray

    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False)
    else:
        ray.init(
            address="local", num_cpus=2, include_dashboard=False, log_to_driver=False
        )
    ray.data.DataContext.get_current().enable_progress_bars = False
    with Sampler() as s:
        res = STEPS[name](params)
    res.update(
        driver_peak_rss=s.driver,
        worker_peak_rss=s.worker,
        worker_peak_private=s.worker_private,
        total_peak_rss=s.total,
        spilled_mib=spilled_mib(),
    )
    Path(result_path).write_text(json.dumps(res, default=str))
    ray.shutdown()


def run_step(name: str, params: dict, env: dict | None = None) -> dict:
    """Parent side: the step in a fresh process; its measurements."""
    result = (
        Path(params.get("result_dir", "/tmp"))
        / f"scale-{name}-{os.getpid()}-{time.time_ns()}.json"
    )
    cmd = [
        sys.executable,
        str(HERE / "scale.py"),
        "--run-step",
        name,
        json.dumps(params),
        str(result),
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True
    )
    if proc.returncode != 0 or not result.exists():
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise RuntimeError(f"step {name} failed ({proc.returncode})")
    res = json.loads(result.read_text())
    result.unlink()
    res["process_wall_s"] = time.perf_counter() - t0
    return res


# --------------------------------------------------------------- sections


#: The field that names a row of a ladder section (a re-run of some sizes
#: replaces those rows and keeps the others).
ROW_KEY = {"segment": ("impressions", "mode"), "train": ("users",), "alure": ("users",)}


def merge_rows(name: str, old: list[dict], new: list[dict]) -> list[dict]:
    """``new`` rows, plus the ``old`` rows of sizes ``new`` does not have."""
    key = ROW_KEY[name]
    have = {tuple(r[k] for k in key) for r in new}
    kept = [r for r in old if tuple(r[k] for k in key) not in have]
    return sorted([*kept, *new], key=lambda r: tuple(r[k] for k in key))


def save_rows(out: Path, name: str, rows: list[dict]) -> None:
    """Write a ladder's rows so far into ``scale.json`` (a long ladder keeps
    its finished sizes if it is stopped)."""
    path = out / "scale.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results[name] = merge_rows(name, results.get(name) or [], rows)
    path.write_text(json.dumps(results, indent=2, default=str))


def _num(v: float | None, fmt: str, unit: str = "") -> str:
    """``v`` formatted (with its unit), or "not run" for a step that did not run."""
    return "not run" if v is None else format(v, fmt) + unit


def _fmt_gib(b: float) -> str:
    return f"{b / GIB:.2f}"


def _per_core(units: float, wall: float, cores: int = 2) -> float:
    return units / wall / cores


def section_segment(args: argparse.Namespace, out: Path) -> list[dict]:
    rows = []
    for n_imp in args.segment_sizes:
        users = max(100, round(n_imp / (IMPRESSIONS_PER_USER_DAY * 7)))
        root = out / "data" / f"seg-{n_imp // 10**6}M"
        gen = run_step(
            "generate",
            {
                "root": str(root),
                "users": users,
                "days": 7,
                "engagement": False,
                "chunk": 50_000,
            },
        )
        plain = run_step(
            "segment",
            {
                "events": str(root),
                "out": str(out / "work" / f"seg-{n_imp}"),
                "builds_store": True,
            },
        )
        bucketed = run_step(
            "segment",
            {"events": plain["store"], "out": str(out / "work" / f"seg-{n_imp}-b")},
        )
        events = plain["events"]
        for mode, r in (("unbucketed", plain), ("bucketed", bucketed)):
            rows.append(
                {
                    "impressions": gen["rows"]["ad_impressions"],
                    "events": events,
                    "mode": mode,
                    "buckets": r["num_buckets"],
                    "wall_s": r["wall_s"],
                    "events_per_s_core": _per_core(events, r["wall_s"]),
                    "store_wall_s": r.get("store_wall_s"),
                    "driver_gib": r["driver_peak_rss"] / GIB,
                    "worker_gib": r["worker_peak_rss"] / GIB,
                    "spilled_mib": r["spilled_mib"],
                    "epsilon_rounds": r["epsilon_rounds"],
                }
            )
            print(
                f"  segment {n_imp:>12,} impressions {mode:11s} {r['wall_s']:8.1f} s  "
                f"{rows[-1]['events_per_s_core']:>12,.0f} events/s/core  driver "
                f"{_fmt_gib(r['driver_peak_rss'])} GiB  worker {_fmt_gib(r['worker_peak_rss'])} GiB  "
                f"spill {r['spilled_mib']:.0f} MiB",
                flush=True,
            )
        shutil.rmtree(out / "work" / f"seg-{n_imp}", ignore_errors=True)
        shutil.rmtree(out / "work" / f"seg-{n_imp}-b", ignore_errors=True)
        if not args.keep_data:
            shutil.rmtree(root, ignore_errors=True)
    return rows


def section_shuffle(args: argparse.Namespace, out: Path) -> list[dict]:
    n_imp = args.segment_sizes[0]
    users = max(100, round(n_imp / (IMPRESSIONS_PER_USER_DAY * 7)))
    root = out / "data" / f"seg-{n_imp // 10**6}M"
    run_step(
        "generate",
        {
            "root": str(root),
            "users": users,
            "days": 7,
            "engagement": False,
            "chunk": 50_000,
        },
    )
    rows = []
    for _ in range(args.reps):
        store = run_step(
            "bucket", {"events": str(root), "out": str(out / "work" / "shuffle-store")}
        )
        hashed = run_step(
            "shuffle_hash",
            {
                "events": str(root),
                "out": str(out / "work" / "shuffle-hash"),
                "num_buckets": store["num_buckets"],
            },
        )
        rows.append({"storage": store, "hash": hashed})
        print(
            f"  shuffle {store['rows']:,} rows into {store['num_buckets']} buckets: storage "
            f"{store['wall_s']:.1f} s ({store['shuffle_files']} shuffle files for "
            f"{store['pieces']} pieces), Ray Data hash shuffle {hashed['wall_s']:.1f} s "
            f"(spill {hashed['spilled_mib']:.0f} MiB, worker {_fmt_gib(hashed['worker_peak_rss'])} GiB)",
            flush=True,
        )
    shutil.rmtree(out / "work" / "shuffle-store", ignore_errors=True)
    shutil.rmtree(out / "work" / "shuffle-hash", ignore_errors=True)
    return rows


def section_train(args: argparse.Namespace, out: Path) -> list[dict]:
    rows = []
    for users in args.train_users:
        root = out / "data" / f"train-{users}u"
        gen = run_step(
            "generate",
            {
                "root": str(root),
                "users": users,
                "days": 7,
                "engagement": True,
                "chunk": 20_000,
            },
        )
        work = out / "work" / f"train-{users}"
        seg = run_step(
            "segment",
            {"events": str(root), "out": str(work / "seg"), "builds_store": True},
        )
        smp = run_step(
            "samples",
            {"events": str(root), "segments": str(work / "seg"), "out": str(work)},
        )
        if users <= args.epoch_max_users:
            trn = run_step(
                "train",
                {
                    "events": str(root),
                    "segments": str(work / "seg"),
                    "out": str(work),
                    "max_seq_len": args.max_seq_len,
                },
            )
        else:  # the samples only: the row says the epoch did not run
            trn = dict.fromkeys(
                ("wall_s", "train_rows", "train_examples_per_s", "loader_rows_per_s"),
                None,
            )
            trn.update(
                loader_bytes_per_row=None,
                ne=None,
                driver_peak_rss=0,
                worker_peak_rss=0,
                spilled_mib=0,
            )
        row = {
            "users": users,
            "events": sum(gen["rows"].values()),
            "samples": smp["samples"],
            "segment_wall_s": seg["wall_s"],
            "samples_wall_s": smp["wall_s"],
            "samples_per_s_core": _per_core(smp["samples"], smp["wall_s"]),
            "bytes_per_sample_stored": smp["bytes_per_sample_stored"],
            "event_store_bytes_per_sample": smp["event_store_bytes_per_sample"],
            "train_wall_s": trn["wall_s"],
            "train_rows": trn["train_rows"],
            "train_examples_per_s": trn["train_examples_per_s"],
            "loader_rows_per_s": trn["loader_rows_per_s"],
            "loader_bytes_per_row": trn["loader_bytes_per_row"],
            "ne": trn["ne"],
            "driver_gib": max(smp["driver_peak_rss"], trn["driver_peak_rss"]) / GIB,
            "worker_gib": max(smp["worker_peak_rss"], trn["worker_peak_rss"]) / GIB,
            "worker_private_gib": max(
                smp.get("worker_peak_private", 0), trn.get("worker_peak_private", 0)
            )
            / GIB,
            "spilled_mib": smp["spilled_mib"] + trn["spilled_mib"],
        }
        rows.append(row)
        save_rows(out, "train", rows)
        print(
            f"  train {users:>6,} users: {row['samples']:>10,} samples  build "
            f"{row['samples_wall_s']:6.1f} s ({row['samples_per_s_core']:>9,.0f}/s/core)  epoch "
            f"{_num(row['train_wall_s'], '7.1f', ' s')} ({_num(row['train_examples_per_s'], '>7,.0f')} ex/s)  "
            f"{row['bytes_per_sample_stored']:.0f} B/sample stored  driver "
            f"{row['driver_gib']:.2f} GiB  worker {row['worker_gib']:.2f} GiB  spill "
            f"{row['spilled_mib']:.0f} MiB",
            flush=True,
        )
    return rows


def section_loader(args: argparse.Namespace, out: Path) -> dict:
    users = args.train_users[0]
    root = out / "data" / f"train-{users}u"
    work = out / "work" / f"train-{users}"
    run_step(
        "generate",
        {
            "root": str(root),
            "users": users,
            "days": 7,
            "engagement": True,
            "chunk": 20_000,
        },
    )
    if not (work / "samples" / "_meta.json").exists():
        run_step(
            "segment",
            {"events": str(root), "out": str(work / "seg"), "builds_store": True},
        )
        run_step(
            "samples",
            {"events": str(root), "segments": str(work / "seg"), "out": str(work)},
        )
    res = run_step("loader", {"out": str(work), "max_seq_len": 64})
    for policy, r in res["policies"].items():
        print(
            f"  loader L=64 {policy:16s} {r['rows_per_s']:>10,.0f} rows/s (1 thread)  "
            f"{r['bytes_per_batch'] / 1e6:6.2f} MB/batch of 512  {r['bytes_per_row']:,.0f} B/row",
            flush=True,
        )
    return res


def section_alure(args: argparse.Namespace, out: Path) -> list[dict]:
    base = out / "work" / f"train-{args.train_users[0]}"
    ckpt = run_step(
        "checkpoint",
        {
            "events": str(out / "data" / f"train-{args.train_users[0]}u"),
            "segments": str(base / "seg"),
            "out": str(base / "ckpt"),
        },
    )
    rows = []
    for users in args.alure_users:
        root = out / "data" / f"alure-{users}u"
        run_step(
            "generate",
            {
                "root": str(root),
                "users": users,
                "days": 2,
                "engagement": True,
                "chunk": 50_000,
            },
        )
        work = out / "work" / f"alure-{users}"
        bucket = run_step("bucket", {"events": str(root), "out": str(work / "events")})
        hist = run_step("histories", {"events": str(work / "events"), "out": str(work)})
        emb = run_step(
            "embed",
            {
                "events": str(work / "events"),
                "checkpoint": ckpt["checkpoint"],
                "out": str(work / "emb"),
            },
        )
        u2u = run_step(
            "u2u", {"embeddings": str(work / "emb"), "out": str(work / "graph")}
        )
        row = {
            "users": users,
            "bucket_wall_s": bucket["wall_s"],
            "histories_wall_s": hist["wall_s"],
            "histories_bytes_per_user": hist["bytes_per_user"],
            "embed_wall_s": emb["wall_s"],
            "embed_users_per_s_core": _per_core(emb["users"], emb["wall_s"]),
            "u2u_wall_s": u2u["wall_s"],
            "u2u_users_per_s_core": _per_core(u2u["users"], u2u["wall_s"]),
            "u2u_recall": u2u["recall_at_k2"],
            "driver_gib": max(
                hist["driver_peak_rss"], emb["driver_peak_rss"], u2u["driver_peak_rss"]
            )
            / GIB,
            "worker_gib": max(
                hist["worker_peak_rss"], emb["worker_peak_rss"], u2u["worker_peak_rss"]
            )
            / GIB,
            "spilled_mib": hist["spilled_mib"]
            + emb["spilled_mib"]
            + u2u["spilled_mib"],
            "worker_gib_by_step": {
                k: v["worker_peak_rss"] / GIB
                for k, v in (("histories", hist), ("embed", emb), ("u2u", u2u))
            },
            "u2u_build_s": u2u["build_s"],
            "u2u_query_s": u2u["query_s"],
        }
        rows.append(row)
        save_rows(out, "alure", rows)
        print(
            f"  alure {users:>9,} users: histories {hist['wall_s']:6.1f} s ({hist['bytes_per_user']:.0f} B/user)  "
            f"embed {emb['wall_s']:6.1f} s ({row['embed_users_per_s_core']:,.0f} users/s/core)  "
            f"u2u {u2u['wall_s']:6.1f} s (recall {u2u['recall_at_k2']:.3f})  driver "
            f"{row['driver_gib']:.2f} GiB  worker {row['worker_gib']:.2f} GiB  spill {row['spilled_mib']:.0f} MiB",
            flush=True,
        )
        if not args.keep_data:
            shutil.rmtree(work, ignore_errors=True)
    return rows


def section_cluster(args: argparse.Namespace, out: Path) -> dict:
    """1 vs 2 nodes of 1 CPU each (``dynamix_ray.localcluster``: a ``ray
    start`` head, then a second node), the same steps on each."""
    from dynamix_ray.localcluster import LocalCluster

    n_imp = args.cluster_impressions
    users = max(100, round(n_imp / (IMPRESSIONS_PER_USER_DAY * 7)))
    root = out / "data" / f"cluster-{n_imp // 10**6}M"
    run_step(
        "generate",
        {
            "root": str(root),
            "users": users,
            "days": 7,
            "engagement": False,
            "chunk": 50_000,
        },
    )
    res: dict[str, Any] = {}
    cluster = LocalCluster()
    try:
        cluster.start_head()
        env = {**cluster.env, "RAY_ADDRESS": cluster.address}
        for nodes in (1, 2):
            if nodes == 2:
                cluster.add_node()
            work = out / "work" / f"cluster-{nodes}"
            shutil.rmtree(work, ignore_errors=True)
            seg = run_step(
                "segment",
                {"events": str(root), "out": str(work / "seg"), "builds_store": True},
                env,
            )
            smp = run_step(
                "samples",
                {"events": str(root), "segments": str(work / "seg"), "out": str(work)},
                env,
            )
            res[str(nodes)] = {
                "segment_wall_s": seg["wall_s"],
                "samples_wall_s": smp["wall_s"],
                "segment_phase_s": seg.get("phase_s", {}),
            }
            print(
                f"  cluster {nodes} node(s) x 1 CPU: segment (bucket + statistic) "
                f"{seg['wall_s']:.1f} s, samples {smp['wall_s']:.1f} s",
                flush=True,
            )
            print(
                "    phases: "
                + ", ".join(
                    f"{k} {v:.1f} s" for k, v in seg.get("phase_s", {}).items()
                ),
                flush=True,
            )
            shutil.rmtree(work, ignore_errors=True)
    finally:
        cluster.stop()
    for k in ("segment_wall_s", "samples_wall_s"):
        res[f"speedup_{k[:-7]}"] = res["1"][k] / res["2"][k]
    print(
        f"  speed-up on 2 nodes: segment {res['speedup_segment']:.2f}x, samples "
        f"{res['speedup_samples']:.2f}x",
        flush=True,
    )
    return res


# -------------------------------------------------------------- cost model


def cost_model(results: dict) -> dict:
    """Core-hours a day at the papers' scale from the measured per-core rates."""
    seg = [r for r in results.get("segment", []) if r["mode"] == "bucketed"]
    unb = [r for r in results.get("segment", []) if r["mode"] == "unbucketed"]
    trn = results.get("train", [])
    alu = results.get("alure", [])
    rate = {}
    if seg:
        rate["statistic_events_per_s_core"] = min(r["events_per_s_core"] for r in seg)
    if unb:
        # bucketing's share of the unbucketed run
        rate["bucket_events_per_s_core"] = min(
            r["events"] / r["store_wall_s"] / 2 for r in unb if r.get("store_wall_s")
        )
    if trn:
        rate["samples_per_s_core"] = min(r["samples_per_s_core"] for r in trn)
        rate["train_examples_per_s_core_cpu"] = min(
            (r["train_examples_per_s"] for r in trn if r["train_examples_per_s"]),
            default=0,
        )  # one worker = one CPU
    if "loader" in results:
        rate["loader_rows_per_s_core"] = results["loader"]["policies"]["baseline"][
            "rows_per_s"
        ]
    if alu:
        rate["embed_users_per_s_core"] = min(r["embed_users_per_s_core"] for r in alu)
        rate["u2u_users_per_s_core"] = min(r["u2u_users_per_s_core"] for r in alu)
    samples_day = 40e9 / 30  # 40B samples a month
    events_day = samples_day * (1 + 0.05)  # + conversions (5% of impressions)
    users = 1e9
    refreshes = 4  # 6-hour windows
    day: dict[str, float] = {}
    if "bucket_events_per_s_core" in rate:
        day["bucket the day's events once"] = (
            events_day / rate["bucket_events_per_s_core"] / 3600
        )
    if "statistic_events_per_s_core" in rate:
        # each refresh reads the window's events (a quarter of the day) once
        day[f"segment refreshes ({refreshes}/day, each its window)"] = (
            events_day / rate["statistic_events_per_s_core"] / 3600
        )
    if "samples_per_s_core" in rate:
        day["compact samples"] = samples_day / rate["samples_per_s_core"] / 3600
    if "loader_rows_per_s_core" in rate:
        day["batch-time gather (loader CPUs)"] = (
            samples_day / rate["loader_rows_per_s_core"] / 3600
        )
    if rate.get("train_examples_per_s_core_cpu"):
        day["training, CPU only (this model)"] = (
            samples_day / rate["train_examples_per_s_core_cpu"] / 3600
        )
    if "embed_users_per_s_core" in rate:
        day["daily embeddings of every user"] = (
            users / rate["embed_users_per_s_core"] / 3600
        )
    if "u2u_users_per_s_core" in rate:
        day["daily u2u graph"] = users / rate["u2u_users_per_s_core"] / 3600
    return {
        "assumptions": {
            "samples_per_day": samples_day,
            "events_per_day": events_day,
            "users": users,
            "segment_refreshes_per_day": refreshes,
        },
        "rates_per_core": rate,
        "core_hours_per_day": day,
    }


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _header(line: str) -> list[str]:
    """A table's header line and its separator (one ``---`` per column)."""
    return [line, "|" + "---|" * (line.count("|") - 1)]


def markdown(results: dict) -> str:
    """The README's tables from ``scale.json``."""
    out: list[str] = []
    seg = results.get("segment") or []
    if seg:
        out += _header(
            "| ad impressions | input | buckets | wall | events/s per core | driver peak RSS | largest worker | spill |"
        )
        for r in seg:
            out.append(
                _row(
                    [
                        f"{r['impressions'] / 1e6:.0f}M",
                        r["mode"],
                        r["buckets"],
                        f"{r['wall_s']:.1f} s",
                        f"{r['events_per_s_core']:,.0f}",
                        f"{r['driver_gib']:.2f} GiB",
                        f"{r['worker_gib']:.2f} GiB",
                        f"{r['spilled_mib']:.0f} MiB",
                    ]
                )
            )
        out.append("")
    sh = results.get("shuffle") or []
    if sh:
        out += _header(
            "| shuffle of the smallest size | wall | files | largest worker | spill |"
        )
        for r in sh:
            st, hs = r["storage"], r["hash"]
            out.append(
                _row(
                    [
                        "storage (the store's map + reduce)",
                        f"{st['wall_s']:.1f} s",
                        f"{st['shuffle_files']} for {st['pieces']} pieces",
                        f"{st['worker_peak_rss'] / GIB:.2f} GiB",
                        f"{st['spilled_mib']:.0f} MiB",
                    ]
                )
            )
            out.append(
                _row(
                    [
                        "Ray Data hash shuffle (`repartition(keys=...)`)",
                        f"{hs['wall_s']:.1f} s",
                        "(object store)",
                        f"{hs['worker_peak_rss'] / GIB:.2f} GiB",
                        f"{hs['spilled_mib']:.0f} MiB",
                    ]
                )
            )
        out.append("")
    ld = results.get("loader")
    if ld:
        out += _header(
            f"| policy (L = {ld['max_seq_len']}, batch 512, 1 thread) | rows/s | MB per batch | bytes per row |"
        )
        for pol, r in ld["policies"].items():
            out.append(
                _row(
                    [
                        pol,
                        f"{r['rows_per_s']:,.0f}",
                        f"{r['bytes_per_batch'] / 1e6:.2f}",
                        f"{r['bytes_per_row']:,.0f}",
                    ]
                )
            )
        out.append("")
    tr = results.get("train") or []
    if tr:
        out += _header(
            "| users x 7 days | samples | build | samples/s per core | stored B/sample | event store B/sample | epoch (1 worker) | examples/s | loader rows/s | NE | driver | largest worker (RSS) | its private memory | spill |"
        )
        for r in tr:
            out.append(
                _row(
                    [
                        f"{r['users']:,}",
                        f"{r['samples']:,}",
                        f"{r['samples_wall_s']:.1f} s",
                        f"{r['samples_per_s_core']:,.0f}",
                        f"{r['bytes_per_sample_stored']:.0f}",
                        f"{r['event_store_bytes_per_sample']:.0f}",
                        _num(r["train_wall_s"], ".0f", " s"),
                        _num(r["train_examples_per_s"], ",.0f"),
                        _num(r["loader_rows_per_s"], ",.0f"),
                        _num(r["ne"], ".4f"),
                        f"{r['driver_gib']:.2f} GiB",
                        f"{r['worker_gib']:.2f} GiB",
                        (
                            f"{r['worker_private_gib']:.2f} GiB"
                            if r.get("worker_private_gib")
                            else "-"
                        ),
                        f"{r['spilled_mib']:.0f} MiB",
                    ]
                )
            )
        out.append("")
    al = results.get("alure") or []
    if al:
        out += _header(
            "| users x 2 days | bucket | histories | B/user in memory | embed | users/s per core | u2u | recall@15 | driver | largest worker | spill |"
        )
        for r in al:
            out.append(
                _row(
                    [
                        f"{r['users']:,}",
                        f"{r['bucket_wall_s']:.1f} s",
                        f"{r['histories_wall_s']:.1f} s",
                        f"{r['histories_bytes_per_user']:,.0f}",
                        f"{r['embed_wall_s']:.1f} s",
                        f"{r['embed_users_per_s_core']:,.0f}",
                        f"{r['u2u_wall_s']:.1f} s",
                        f"{r['u2u_recall']:.3f}",
                        f"{r['driver_gib']:.2f} GiB",
                        f"{r['worker_gib']:.2f} GiB",
                        f"{r['spilled_mib']:.0f} MiB",
                    ]
                )
            )
        out.append("")
    cl = results.get("cluster")
    if cl:
        out += [
            *_header("| nodes x 1 CPU | segment (bucket + statistic) | samples |"),
            _row(
                [
                    "1",
                    f"{cl['1']['segment_wall_s']:.1f} s",
                    f"{cl['1']['samples_wall_s']:.1f} s",
                ]
            ),
            _row(
                [
                    "2",
                    f"{cl['2']['segment_wall_s']:.1f} s",
                    f"{cl['2']['samples_wall_s']:.1f} s",
                ]
            ),
            _row(
                [
                    "speed-up",
                    f"{cl['speedup_segment']:.2f}x",
                    f"{cl['speedup_samples']:.2f}x",
                ]
            ),
            "",
        ]
    cm = results.get("cost_model")
    if cm:
        out += _header("| at 40B samples a month, 1e9 users | core-hours a day |")
        for k, v in cm["core_hours_per_day"].items():
            out.append(_row([k, f"{v:,.1f}"]))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--run-step":
        run_step_here(sys.argv[2], json.loads(sys.argv[3]), sys.argv[4])
        return 0
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--sections", default="segment,shuffle,loader,train,alure,cluster")
    p.add_argument(
        "--segment-sizes", default="20000000,80000000,320000000", help="ad impressions"
    )
    p.add_argument("--train-users", default="2000,8000,32000")
    p.add_argument(
        "--epoch-max-users",
        type=int,
        default=10**9,
        help="train sizes above this build their samples but run no epoch",
    )
    p.add_argument("--alure-users", default="100000,1000000")
    p.add_argument("--cluster-impressions", type=int, default=20_000_000)
    p.add_argument("--max-seq-len", type=int, default=32, help="the training epoch's L")
    p.add_argument("--reps", type=int, default=1, help="shuffle rounds")
    p.add_argument("--keep-data", action="store_true", help="keep generated data")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    p.add_argument("--out", default="bench_out/scale")
    p.add_argument(
        "--markdown",
        action="store_true",
        help="print the tables of OUT/scale.json and stop",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.segment_sizes, args.train_users = "500000,2000000", "200,800"
        args.alure_users, args.cluster_impressions = "5000,20000", 500_000
    args.segment_sizes = [int(x) for x in str(args.segment_sizes).split(",")]
    args.train_users = [int(x) for x in str(args.train_users).split(",")]
    args.alure_users = [int(x) for x in str(args.alure_users).split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "scale.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    if args.markdown:
        print(markdown(results))
        return 0
    sections = {
        "segment": section_segment,
        "shuffle": section_shuffle,
        "loader": section_loader,
        "train": section_train,
        "alure": section_alure,
        "cluster": section_cluster,
    }
    for name in args.sections.split(","):
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        got = sections[name](args, out)
        results[name] = (
            merge_rows(name, results.get(name) or [], got) if name in ROW_KEY else got
        )
        results.setdefault("wall_s", {})[name] = time.perf_counter() - t0
        results["cost_model"] = cost_model(results)
        path.write_text(json.dumps(results, indent=2, default=str))
    cm = results["cost_model"]
    print("== cost model at 40B samples/month, 1e9 users (core-hours a day)")
    for k, v in cm["core_hours_per_day"].items():
        print(f"  {k:48s} {v:>12,.1f}")
    print(f"figures: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
