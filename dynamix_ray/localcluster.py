"""A local multi-node Ray cluster on one machine (``ray start --head`` plus
``ray start --address`` nodes of 1 CPU each), for the tests and benchmarks
that need real nodes (docs/data-path.md: the two-node speed-up).

Each cluster has its own temp dir, ports and auth token, so nothing here
touches another Ray on the machine (``/tmp/ray``, default ports); it is torn
down by PID: the processes whose command line names its temp dir or GCS
port, and their descendants. Nothing is killed by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

__all__ = ["JOB_EXCLUDES", "LocalCluster", "MAX_NODES"]

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
# Not part of a job's working dir (.gitignore covers most; be explicit).
JOB_EXCLUDES = [".git", ".venv", "bench_out", "demo_out", ".mypy_cache", "*.parquet"]
START_TIMEOUT_S = 90
MAX_NODES = 4


def _name(p: psutil.Process) -> str:
    """``p``'s name, or "" if it exited while we looked."""
    try:
        return str(p.name())
    except psutil.Error:
        return ""


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class LocalCluster:
    """A head and a worker node (``ray start``), 1 CPU each, on this machine."""

    def __init__(self) -> None:
        # Unix socket paths under the temp dir must stay short (< 108 bytes).
        self.temp_dir = tempfile.mkdtemp(prefix="dxr-", dir="/tmp")
        (
            self.gcs_port,
            self.dashboard_port,
            self.client_port,
            *self.node_ports,
        ) = _free_ports(3 + MAX_NODES * 5)
        self.env = {
            **os.environ,
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            # `ray start --head` turns token auth on by itself when
            # ~/.ray/auth_token exists but `ray start --address` does not:
            # be explicit, with a token of our own.
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(16),
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        self.env.pop("RAY_ADDRESS", None)
        self.procs: dict[int, psutil.Process] = {}
        self.raylets: list[psutil.Process] = []
        self.nodes = 0

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _node_args(self, k: int) -> list[str]:
        p = self.node_ports[5 * k : 5 * k + 5]
        return [
            "--node-ip-address=127.0.0.1",
            "--num-cpus=1",
            "--object-store-memory=400000000",
            f"--node-manager-port={p[0]}",
            f"--object-manager-port={p[1]}",
            f"--dashboard-agent-listen-port={p[2]}",
            f"--dashboard-agent-grpc-port={p[3]}",
            f"--runtime-env-agent-port={p[4]}",
            "--min-worker-port=0",
            "--max-worker-port=0",
            "--disable-usage-stats",
        ]

    def _ray_start(self, args: list[str]) -> None:
        r = subprocess.run(
            [str(VENV_BIN / "ray"), "start", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S,
        )
        self.procs.update({p.pid: p for p in self.processes()})
        if r.returncode != 0:
            raise RuntimeError(f"ray start failed:\n{r.stdout}\n{r.stderr}")

    @property
    def address(self) -> str:
        """The GCS address a driver joins (``RAY_ADDRESS``)."""
        return f"127.0.0.1:{self.gcs_port}"

    def start(self, nodes: int = 2) -> None:
        """A head, then ``nodes - 1`` worker nodes (1 CPU each)."""
        self.start_head()
        for _ in range(nodes - 1):
            self.add_node()

    def start_head(self) -> None:
        self._ray_start(
            [
                "--head",
                f"--port={self.gcs_port}",
                f"--temp-dir={self.temp_dir}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={self.client_port}",
                *self._node_args(0),
            ]
        )
        self.nodes = 1
        self._wait_for_nodes(1)
        self.raylets = [p for p in self.processes() if _name(p) == "raylet"]

    def add_node(self) -> None:
        """One more node of 1 CPU (up to :data:`MAX_NODES`)."""
        k = self.nodes
        if k >= MAX_NODES:
            raise ValueError(f"at most {MAX_NODES} nodes")
        # Its own temp dir: nodes sharing one would share runtime_resources/, and
        # the worker node's runtime-env agent would unpack the job's working dir
        # again over the one the driver runs in (its cwd would vanish).
        self._ray_start(
            [
                f"--address=127.0.0.1:{self.gcs_port}",
                f"--temp-dir={self.temp_dir}/w{k}",
                *self._node_args(k),
            ]
        )
        self.nodes += 1
        self._wait_for_nodes(self.nodes)
        self.raylets = [p for p in self.processes() if _name(p) == "raylet"]
        if len(self.raylets) != self.nodes:
            raise RuntimeError(f"{self.nodes} nodes started, raylets: {self.raylets}")

    def _wait_for_nodes(self, n: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            r = subprocess.run(
                [
                    str(VENV_BIN / "ray"),
                    "status",
                    f"--address=127.0.0.1:{self.gcs_port}",
                ],
                env=self.env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            active = r.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
            if r.returncode == 0 and active.count("node_") >= n:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{n} nodes not up:\n{r.stdout}")
            time.sleep(1)

    def _owns(self, cmdline: list[str]) -> bool:
        gcs = f":{self.gcs_port}"
        return any(self.temp_dir in a or a.endswith(gcs) for a in cmdline)

    def processes(self) -> list[psutil.Process]:
        """This cluster's processes: daemons (by temp dir or GCS port in their
        command line) and all their descendants (workers, job drivers)."""
        found: dict[int, psutil.Process] = {}
        for p in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                if self._owns(p.info["cmdline"] or []):
                    found[p.pid] = p
                    found.update({c.pid: c for c in p.children(recursive=True)})
        found.pop(os.getpid(), None)
        return list(found.values())

    def workers(self) -> list[tuple[psutil.Process, str]]:
        """Ray worker processes of this cluster (children of its raylets) and
        their titles (``ray::IDLE``, ``ray::ReadItems->MapBatches(...)``, ...)."""
        out = []
        for raylet in self.raylets:
            with contextlib.suppress(psutil.Error):
                for p in raylet.children():
                    with contextlib.suppress(psutil.Error):
                        title = " ".join(p.cmdline())
                        if title.startswith("ray::"):
                            out.append((p, title))
        return out

    def stop(self) -> None:
        procs = {p.pid: p for p in self.processes()}
        # Recorded at start, still the same process (psutil checks create time).
        procs.update({k: p for k, p in self.procs.items() if p.is_running()})
        for p in procs.values():
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _, alive = psutil.wait_procs(list(procs.values()), timeout=5)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def submit(
        self,
        args: list[str],
        log: Path,
        *,
        submission_id: str,
        script: str | tuple[str, ...] = "pipelines/segment.py",
        flags: tuple[str, ...] = ("--no-progress",),
    ) -> subprocess.Popen:
        """``ray job submit --working-dir . -- python SCRIPT ARGS FLAGS`` from
        the repository root; waits for the job (the CLI tails its logs).
        ``script`` may also be python's arguments, e.g. ``("-m",
        "dynamix_ray.cli", "segment")``: the ``dynamix`` command itself."""
        cmd = [
            str(VENV_BIN / "ray"),
            "job",
            "submit",
            f"--address={self.dashboard}",
            f"--submission-id={submission_id}",
            "--working-dir=.",
            f"--runtime-env-json={json.dumps({'excludes': JOB_EXCLUDES})}",
            "--",
            "python",
            *((script,) if isinstance(script, str) else script),
            *args,
            *flags,
        ]
        with open(log, "w") as fh:
            return subprocess.Popen(
                cmd, cwd=REPO, env=self.env, stdout=fh, stderr=subprocess.STDOUT
            )

    def job_status(self, submission_id: str) -> str:
        """``ray job status``: ``SUCCEEDED``, ``FAILED``, ... (or its raw text)."""
        r = subprocess.run(
            [
                str(VENV_BIN / "ray"),
                "job",
                "status",
                f"--address={self.dashboard}",
                submission_id,
            ],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        text = r.stdout + r.stderr
        for status in ("SUCCEEDED", "FAILED", "STOPPED", "RUNNING", "PENDING"):
            if re.search(rf"(?i)\b{status}\b", text):
                return status
        return text

    def stop_job(self, submission_id: str) -> None:
        subprocess.run(
            [
                str(VENV_BIN / "ray"),
                "job",
                "stop",
                f"--address={self.dashboard}",
                "--no-wait",
                submission_id,
            ],
            env=self.env,
            capture_output=True,
            timeout=60,
        )
