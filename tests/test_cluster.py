"""Segmentation on a real two-node Ray cluster, as a Ray job; a worker and the
driver killed mid-run; the ``ray up`` config (``cluster.yaml``).

The cluster is two ``ray start`` processes on this machine (a head and a worker
node, 1 CPU each) with their own temp dir, ports and auth token, so nothing here
touches another Ray on the machine (``/tmp/ray``, default ports). It is torn down
by killing exactly its own processes: those whose command line names its temp
dir or GCS port, and their descendants (the workers).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pytest
import yaml

from dynamix_ray.config import GenerateConfig
from dynamix_ray.localcluster import LocalCluster, _free_ports, _name
from dynamix_ray.segments.pipeline import read_segments, read_segments_meta, run_segment
from dynamix_ray.synth import generate

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
JOB_TIMEOUT_S = 150
# Ray Data task names of the segmentation (process titles ``ray::<name>``).
SEGMENT_TASK = re.compile(r"^ray::\S*(MapBatches|Map\()")


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    c = LocalCluster()
    try:
        c.start()
        yield c
    finally:
        c.stop()


def _wait(proc: subprocess.Popen, log: Path, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"job did not finish in {timeout} s:\n{log.read_text()[-4000:]}")


def _sorted(t: pa.Table) -> pa.Table:
    return t.sort_by([("user_id", "ascending"), ("window_start", "ascending")])


def assert_same_table(got: pa.Table, want: pa.Table) -> None:
    """Equal after sorting by (user_id, window_start); floats within 1e-9."""
    got, want = _sorted(got), _sorted(want)
    assert got.schema == want.schema
    assert got.num_rows == want.num_rows > 0
    for name in want.column_names:
        a, b = got.column(name).combine_chunks(), want.column(name).combine_chunks()
        assert a.is_null().equals(b.is_null()), name
        if pa.types.is_floating(a.type):
            np.testing.assert_allclose(
                a.to_numpy(zero_copy_only=False),
                b.to_numpy(zero_copy_only=False),
                rtol=0,
                atol=1e-9,
                equal_nan=True,
                err_msg=name,
            )
        else:
            assert a.equals(b), name


def _meta(out: Path) -> dict:
    return read_segments_meta(str(out))


@pytest.fixture(scope="module")
def small_events(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cluster_events")
    plain, bucketed = root / "plain", root / "bucketed"
    generate(str(plain), GenerateConfig(users=200, days=2), progress=None)
    generate(
        str(bucketed), GenerateConfig(users=200, days=2, bucketed=4), progress=None
    )
    return {"plain": plain, "bucketed": bucketed}


#: `dynamix segment` as a job's entrypoint (the console script is this module).
CLI_SEGMENT = ("-m", "dynamix_ray.cli", "segment")


@pytest.mark.timeout(300)
def test_segment_job_on_two_node_cluster_equals_local_run(
    cluster, small_events, ray_session, tmp_path
):
    """`ray job submit` of pipelines/segment.py (plain input) and of the
    `dynamix segment` command itself (bucketed input) on the cluster commits
    the same table as a local run."""
    scripts = {"plain": "pipelines/segment.py", "bucketed": CLI_SEGMENT}
    for layout in ("plain", "bucketed"):
        events = small_events[layout]
        out_job, out_local = tmp_path / f"job_{layout}", tmp_path / f"local_{layout}"
        log = tmp_path / f"job_{layout}.log"
        sub_id = f"dxr-{layout}-{secrets.token_hex(4)}"
        proc = cluster.submit(
            [str(events), str(out_job)],
            log,
            submission_id=sub_id,
            script=scripts[layout],
        )
        rc = _wait(proc, log, JOB_TIMEOUT_S)
        text = log.read_text()
        assert rc == 0, text[-4000:]
        assert cluster.job_status(sub_id) == "SUCCEEDED"
        assert "dynamix segment: done" in text

        run_segment(str(events), str(out_local), progress=False)
        assert_same_table(read_segments(str(out_job)), read_segments(str(out_local)))
        job_meta, local_meta = _meta(out_job), _meta(out_local)
        assert job_meta["epsilon"] == pytest.approx(local_meta["epsilon"], abs=1e-9)
        for key in ("rows", "users", "eligible", "active_rows", "rejected_total"):
            assert job_meta["counts"][key] == local_meta["counts"][key], key
        if layout == "bucketed":
            assert job_meta["mode"] == "bucketed input"


@pytest.mark.timeout(400)
def test_train_job_on_two_node_cluster(cluster, small_events, ray_session, tmp_path):
    """`ray job submit` of pipelines/train.py joins the cluster (RAY_ADDRESS is
    set for the job), trains one epoch and writes metrics.json."""
    events = small_events["plain"]
    segs, out = tmp_path / "segs", tmp_path / "train"
    run_segment(str(events), str(segs), progress=False)
    log = tmp_path / "train_job.log"
    sub_id = f"dxr-train-{secrets.token_hex(4)}"
    args = [str(events), str(segs), str(out), "--epochs", "1", "--max-seq-len", "8"]
    args += ["--batch-size", "256", "--cpus-per-worker", "0.5"]
    proc = cluster.submit(
        args, log, submission_id=sub_id, script="pipelines/train.py", flags=()
    )
    rc = _wait(proc, log, 300)
    text = log.read_text()
    assert rc == 0, text[-4000:]
    assert cluster.job_status(sub_id) == "SUCCEEDED"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["policy"] == "baseline" and metrics["epoch"] == 0
    assert 0 < metrics["ne"] < 2 and metrics["importance"]
    # the checkpoint is named relative to OUT (a moved OUT still resolves)
    assert not os.path.isabs(metrics["checkpoint"])
    assert os.path.exists(os.path.join(out, metrics["checkpoint"], "state.pt"))


def test_serve_deploy_to_the_two_node_cluster(
    cluster, small_events, ray_session, tmp_path
):
    """`serve deploy` of a config shaped like serve_configs/dynamix.yaml to the
    `ray start` cluster; the app answers /healthz and /rank over HTTP."""
    import requests

    from dynamix_ray.histories import run_histories
    from dynamix_ray.model import DynamixCTR, ModelConfig
    from dynamix_ray.model.config import CANDIDATE_ATTRIBUTES
    from dynamix_ray.train import save_checkpoint

    events = str(small_events["plain"])
    run_segment(events, str(tmp_path / "segs"), progress=False)
    run_histories(events, str(tmp_path / "hist"), None, 8, progress=False)
    tiny = ModelConfig(emb_dim=4, d_model=8, user_dim=8, head_hidden=16, max_seq_len=8)
    save_checkpoint(str(tmp_path / "ckpt"), DynamixCTR(tiny).eval(), tiny)
    (port,) = _free_ports(1)
    config = yaml.safe_load((REPO / "serve_configs" / "dynamix.yaml").read_text())
    config["proxy_location"] = "HeadOnly"  # both nodes share this machine's ports
    config["http_options"]["port"] = port
    args = config["applications"][0]["args"]
    args["segments"], args["histories"] = str(tmp_path / "segs"), str(tmp_path / "hist")
    for r in ("active", "passive"):
        args[r]["checkpoint"] = str(tmp_path / "ckpt")
        args[r]["ray_actor_options"] = {"num_cpus": 0.1}
    args["router"]["ray_actor_options"] = {"num_cpus": 0.1}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    serve_cli = [str(VENV_BIN / "serve")]
    r = subprocess.run(
        [*serve_cli, "deploy", str(path), f"--address={cluster.dashboard}"],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    url = f"http://127.0.0.1:{port}"
    try:
        deadline, ok = time.monotonic() + 180, False
        while time.monotonic() < deadline and not ok:
            with contextlib.suppress(requests.RequestException):
                ok = requests.get(f"{url}/healthz", timeout=5).status_code == 200
            time.sleep(1)
        assert ok, "the deployed app never answered /healthz"
        cand = {a: i + 1 for i, a in enumerate(CANDIDATE_ATTRIBUTES)}
        resp = requests.post(
            f"{url}/rank", json={"user_id": 1, "candidates": [cand, cand]}, timeout=60
        )
        assert resp.status_code == 200, resp.text
        assert len(resp.json()["scores"]) == 2
    finally:
        subprocess.run(
            [*serve_cli, "shutdown", "-y", f"--address={cluster.dashboard}"],
            env=cluster.env,
            capture_output=True,
            timeout=120,
        )


@pytest.fixture(scope="module")
def larger_events(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cluster_events_large") / "plain"
    generate(str(root), GenerateConfig(users=3000, days=3, seed=3), progress=None)
    return root


def _python_cmdline(p: psutil.Process) -> str | None:
    """``p``'s command line if it is a Python process; ``None`` if not, or if
    it exited while we looked (the cluster's processes come and go)."""
    try:
        return " ".join(p.cmdline()) if _name(p).startswith("python") else None
    except psutil.Error:
        return None


def _kill_during_segmentation(
    cluster: LocalCluster, proc: subprocess.Popen, log: Path, *, driver: bool
) -> str:
    """As soon as a worker runs a segmentation task, SIGKILL that worker (or,
    with ``driver``, the job's driver process). Returns what was killed."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while proc.poll() is None and time.monotonic() < deadline:
        for p, title in cluster.workers():
            if not SEGMENT_TASK.search(title):
                continue
            if driver:
                drivers = [
                    (q, cmd)
                    for q in cluster.processes()
                    if (cmd := _python_cmdline(q)) and "pipelines/segment.py" in cmd
                ]  # not the `sh -c` around it
                assert len(drivers) <= 1, drivers
                if not drivers:  # it exited meanwhile: the loop's poll sees it
                    continue
                p, title = drivers[0]
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGKILL)
                return title.strip()
        time.sleep(0.005)
    pytest.fail(
        f"no segmentation task seen while the job ran:\n{log.read_text()[-4000:]}"
    )


def _submit_and_kill(
    cluster: LocalCluster, events: Path, out: Path, log: Path, *, driver: bool
) -> tuple[str, int, str]:
    """Submit the segmentation job, kill during it; (what was killed, the CLI's
    exit code, the job's final status)."""
    sub_id = f"dxr-kill-{secrets.token_hex(4)}"
    proc = cluster.submit([str(events), str(out)], log, submission_id=sub_id)
    try:
        killed = _kill_during_segmentation(cluster, proc, log, driver=driver)
        rc = _wait(proc, log, JOB_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            cluster.stop_job(sub_id)
    return killed, rc, cluster.job_status(sub_id)


def _assert_nothing_committed(out: Path) -> None:
    assert not (out / "segments" / "_CURRENT.json").exists()
    with pytest.raises(FileNotFoundError):
        read_segments(str(out))


@pytest.mark.timeout(300)
def test_killed_worker_retries_or_fails_cleanly(
    cluster, larger_events, ray_session, tmp_path
):
    """SIGKILL a worker running a segmentation task: the job either finishes with
    the clean run's table (Ray retries the task) or fails, then with a clear
    error and no committed table."""
    out_job, out_clean, log = tmp_path / "job", tmp_path / "clean", tmp_path / "log"
    killed, rc, status = _submit_and_kill(
        cluster, larger_events, out_job, log, driver=False
    )
    text = log.read_text()
    if rc == 0:
        assert status == "SUCCEEDED"
        run_segment(str(larger_events), str(out_clean), progress=False)
        assert_same_table(read_segments(str(out_job)), read_segments(str(out_clean)))
    else:
        assert status == "FAILED", status
        assert re.search(r"(?i)worker.*(died|crash|exit)|WorkerCrashedError", text), (
            text[-4000:]
        )
        _assert_nothing_committed(out_job)
    print(f"killed {killed!r}; job exit code {rc}")


@pytest.mark.timeout(300)
def test_killed_driver_commits_nothing(cluster, larger_events, tmp_path):
    """SIGKILL the job's driver mid-run: the job fails and no table that looks
    complete (a published segments/_CURRENT.json) is left behind."""
    out, log = tmp_path / "job", tmp_path / "log"
    killed, rc, status = _submit_and_kill(cluster, larger_events, out, log, driver=True)
    assert "pipelines/segment.py" in killed
    assert rc != 0
    assert status == "FAILED", status
    _assert_nothing_committed(out)


# ------------------------------------------------------------------ cluster.yaml


def _gpu_uncommented(text: str) -> str:
    """cluster.yaml with its commented GPU worker type switched on."""
    lines, out, in_gpu = text.splitlines(), [], False
    for line in lines:
        if line.startswith("  # gpu_worker:"):
            in_gpu = True
        if in_gpu and line.startswith("  # "):
            out.append("  " + line[4:])
            continue
        in_gpu = in_gpu and line.startswith("  #")
        out.append(line)
    return "\n".join(out)


@pytest.mark.parametrize("gpu", [False, True])
def test_cluster_yaml_is_a_valid_ray_up_config(gpu):
    import copy

    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    text = (REPO / "cluster.yaml").read_text()
    cfg = yaml.safe_load(_gpu_uncommented(text) if gpu else text)
    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    jsonschema.validate(cfg, json.loads(schema_path.read_text()))
    full = prepare_config(copy.deepcopy(cfg))  # merges the AWS defaults
    validate_config(full)

    types = cfg["available_node_types"]
    assert cfg["provider"]["type"] == "aws"
    assert cfg["head_node_type"] in types
    assert "cpu_worker" in types
    assert ("gpu_worker" in types) == gpu
    if gpu:
        assert types["gpu_worker"]["resources"]["GPU"] == 1
    assert cfg["max_workers"] >= 1 and cfg["idle_timeout_minutes"] > 0
    assert "~/dynamix_ray" in cfg["file_mounts"]
    # the dashboard (an unauthenticated job-submission API) on loopback only;
    # metrics on the documented port on every node
    from dynamix_ray.runtime import METRICS_EXPORT_PORT

    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in text
    for cmd in (head, " ".join(cfg["worker_start_ray_commands"])):
        assert f"--metrics-export-port={METRICS_EXPORT_PORT}" in cmd
        # Serve's HAProxy ingress on every node (`dynamix serve --ingress haproxy`)
        assert "RAY_SERVE_ENABLE_HA_PROXY=1 ray start" in cmd
    # train/experiment OUT (/mnt/shared in the README) is a mounted shared
    # filesystem, visible inside the container
    init = " ".join(cfg["initialization_commands"])
    assert "/mnt/shared" in init and "mount -t nfs4" in init
    assert "-v /mnt/shared:/mnt/shared" in cfg["docker"]["run_options"]
    setup = " && ".join(cfg["setup_commands"])
    assert setup.index("pip install torch==2.13.0") < setup.index(
        "pip install -e ~/dynamix_ray"
    )
