"""`dynamix serve --ingress haproxy`: Serve's HAProxy ingress, end to end in
its own local Ray (a subprocess, as a user runs it), the exposure rule it
implies, and the refusal on a cluster that was not started with it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

from dynamix_ray.cli import build_parser, check_cluster_haproxy, serve_app_config
from dynamix_ray.localcluster import _free_ports

FLAGS = ["serve", "--segments", "s", "--histories", "h", "--active-checkpoint", "a"]


def test_haproxy_needs_a_key_or_an_opt_out_even_on_loopback(monkeypatch):
    with pytest.raises(ValueError, match="every interface.*--api-key-env"):
        serve_app_config(build_parser().parse_args([*FLAGS, "--ingress", "haproxy"]))
    serve_app_config(
        build_parser().parse_args(
            [*FLAGS, "--ingress", "haproxy", "--allow-unauthenticated"]
        )
    )
    monkeypatch.setenv("DX_KEY", "k")
    serve_app_config(
        build_parser().parse_args(
            [*FLAGS, "--ingress", "haproxy", "--api-key-env", "DX_KEY"]
        )
    )
    serve_app_config(build_parser().parse_args(FLAGS))  # the proxy: loopback is fine


def test_a_cluster_started_without_haproxy_is_refused(ray_session):
    with pytest.raises(ValueError, match="RAY_SERVE_ENABLE_HA_PROXY=1"):
        check_cluster_haproxy()


def _haproxy_listening(port: int) -> bool:
    for c in psutil.net_connections("tcp"):
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid:
            with contextlib.suppress(psutil.Error):
                if "haproxy" in psutil.Process(c.pid).name():
                    return True
    return False


def test_dynamix_serve_answers_through_haproxy(ray_session, tiny_events, tmp_path):
    from dynamix_ray.histories import run_histories
    from dynamix_ray.model import DynamixCTR, ModelConfig
    from dynamix_ray.model.checkpoint import save_checkpoint
    from dynamix_ray.model.config import CANDIDATE_ATTRIBUTES
    from dynamix_ray.segments.pipeline import run_segment

    run_segment(tiny_events, str(tmp_path / "segs"), progress=False)
    run_histories(tiny_events, str(tmp_path / "hist"), None, 8, progress=False)
    cfg = ModelConfig(emb_dim=4, d_model=8, user_dim=8, head_hidden=16, max_seq_len=8)
    save_checkpoint(str(tmp_path / "ckpt"), DynamixCTR(cfg).eval(), cfg)
    (port,) = _free_ports(1)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    exe = str(Path(sys.executable).with_name("dynamix"))
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                exe, "serve", "--segments", str(tmp_path / "segs"),
                "--histories", str(tmp_path / "hist"),
                "--active-checkpoint", str(tmp_path / "ckpt"),
                "--ingress", "haproxy", "--allow-unauthenticated",
                "--port", str(port),
            ],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline, ok = time.monotonic() + 240, False
        while time.monotonic() < deadline and not ok:
            assert proc.poll() is None, log.read_text()[-3000:]
            with contextlib.suppress(requests.RequestException):
                ok = requests.get(f"{url}/healthz", timeout=5).status_code == 200
            time.sleep(1)
        assert ok, log.read_text()[-3000:]
        assert _haproxy_listening(port), "the port is not HAProxy's"
        cand = {a: i + 1 for i, a in enumerate(CANDIDATE_ATTRIBUTES)}
        r = requests.post(
            f"{url}/rank", json={"user_id": 1, "candidates": [cand, cand]}, timeout=60
        )
        assert r.status_code == 200, r.text
        assert len(r.json()["scores"]) == 2
        bad = requests.post(f"{url}/rank", data=b"{", timeout=30)
        assert bad.status_code in (400, 422) and "error" in bad.json()
    finally:
        proc.send_signal(signal.SIGINT)  # the command's own Ctrl-C path
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
