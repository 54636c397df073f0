"""An independent load client: ``wrk`` (Debian's package, C, its own event
loop) posting prepared JSON bodies round-robin, so the measured rate is not
bounded by this project's own Python client (docs/serving.md, "The knee").

wrk is closed-loop: ``connections`` requests are in flight at all times. It
reports throughput and the latency of the answers; its summary and the count
of each status code come back as one JSON line that the Lua script prints.
Loopback only; each run is bounded by ``duration_s``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["WRK_SCRIPT", "parse_wrk", "run_wrk"]

#: Posts the bodies of the file named by the first script argument, one JSON
#: per line, round-robin; counts status codes per thread and prints one line
#: ``DX-WRK {json}`` when done (latency percentiles in microseconds).
WRK_SCRIPT = r"""
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  bodies = {}
  for line in io.lines(args[1]) do
    bodies[#bodies + 1] = line
  end
  if #bodies == 0 then
    error("no bodies in " .. args[1])
  end
  i = 0
  codes = {}
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  i = i % #bodies + 1
  return wrk.format(nil, nil, nil, bodies[i])
end

function response(status, headers, body)
  codes[status] = (codes[status] or 0) + 1
end

function done(summary, latency, requests)
  local all = {}
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("codes")) do
      all[k] = (all[k] or 0) + v
    end
  end
  local parts = {}
  for k, v in pairs(all) do
    parts[#parts + 1] = string.format('"%d": %d', k, v)
  end
  local e = summary.errors
  io.write(string.format(
    'DX-WRK {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "timeout": %d, "status": %d}, ' ..
    '"latency_us": {"p50": %d, "p90": %d, "p99": %d, "p999": %d, "max": %d}, ' ..
    '"codes": {%s}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, table.concat(parts, ", ")))
end
"""


def parse_wrk(stdout: str) -> dict[str, Any]:
    """The ``DX-WRK`` line of a run as figures: requests/s, p50/p99 ms,
    answers by status, socket errors.

    Raises:
        RuntimeError: no such line (wrk failed; its output is in the message).
    """
    line = next((x for x in stdout.splitlines() if x.startswith("DX-WRK ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary:\n{stdout[-2000:]}")
    raw = json.loads(line[len("DX-WRK ") :])
    seconds = raw["duration_us"] / 1e6
    lat = raw["latency_us"]
    answered = sum(raw["codes"].values())
    return {
        "requests": raw["requests"],
        "seconds": round(seconds, 3),
        "qps": round(raw["requests"] / seconds, 1) if seconds else 0.0,
        "p50_ms": lat["p50"] / 1000,
        "p90_ms": lat["p90"] / 1000,
        "p99_ms": lat["p99"] / 1000,
        "p999_ms": lat["p999"] / 1000,
        "max_ms": lat["max"] / 1000,
        "codes": raw["codes"],
        "answered": answered,
        "ok": raw["codes"].get("200", 0),
        "socket_errors": {k: v for k, v in raw["errors"].items() if k != "status"},
    }


def run_wrk(
    url: str,
    bodies: Sequence[bytes],
    connections: int,
    duration_s: float,
    threads: int = 1,
    timeout_s: float = 10.0,
    binary: str = "wrk",
) -> dict[str, Any]:
    """``wrk`` against ``url`` (127.0.0.1 only) with ``connections`` open
    connections for ``duration_s`` seconds, posting ``bodies`` in turn.

    Raises:
        FileNotFoundError: no ``wrk`` (``apt-get install wrk``; ``make
            services`` does).
        ValueError: ``url`` is not on loopback, or a body spans lines.
    """
    from urllib.parse import urlparse

    if urlparse(url).hostname not in ("127.0.0.1", "localhost"):
        raise ValueError(f"{url}: load goes to loopback only")
    exe = shutil.which(binary)
    if exe is None:
        raise FileNotFoundError(f"{binary}: not found (apt-get install wrk)")
    if any(b"\n" in b for b in bodies):
        raise ValueError("a body spans lines: wrk's script reads one per line")
    with tempfile.TemporaryDirectory(prefix="dx-wrk-") as work:
        script, data = Path(work, "post.lua"), Path(work, "bodies.jsonl")
        script.write_text(WRK_SCRIPT)
        data.write_bytes(b"\n".join(bodies) + b"\n")
        cmd = [
            exe,
            f"-t{max(1, min(threads, connections))}",
            f"-c{connections}",
            f"-d{max(1, round(duration_s))}s",
            f"--timeout={max(1, round(timeout_s))}s",
            "-s",
            str(script),
            url,
            "--",
            str(data),
        ]
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=duration_s + timeout_s + 30
        )
    out = parse_wrk(done.stdout + done.stderr)
    out["connections"] = connections
    return out
