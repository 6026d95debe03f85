"""`cascade bench`: closed-loop HTTP load (wrk) on the gateway and on the plain single-process server.

Everything goes over HTTP on 127.0.0.1, bounded in time. wrk (Debian's ``wrk``) is the load
generator: a C client that leaves the CPU to the servers far better than a Python one would.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

LUA = """
local bodies = {%(bodies)s}
local i = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
%(auth)s
request = function()
  i = (i %% #bodies) + 1
  return wrk.format(nil, "/v1/classify", nil, bodies[i])
end
done = function(summary, latency, requests)
  for _, p in ipairs({1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 97.5, 99, 99.9}) do
    io.write(string.format("PCT %%g %%d\\n", p, latency:percentile(p)))
  end
end
"""


@dataclass
class LoadResult:
    system: str
    route: str
    concurrency: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    percentiles_ms: dict[float, float] | None = None


def _ms(value: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", value).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def run_wrk(url: str, texts: list[str], route: str, concurrency: int, seconds: int,
            api_key: str | None, percentiles: dict[float, float] | None = None) -> tuple[float, float, float, int]:
    """One closed-loop run: ``concurrency`` connections, each sending the next request on an answer."""
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk not found: `apt-get install wrk` (Debian) or `make system-deps`")
    bodies = ",".join(json.dumps(json.dumps({"texts": [t], "route": route})) for t in texts)
    auth = f'wrk.headers["Authorization"] = "Bearer {api_key}"' if api_key else ""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(LUA % {"bodies": bodies, "auth": auth})
    try:
        out = subprocess.run(
            ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--latency", "--timeout", "5s",
             "-s", script.name, url],
            capture_output=True, text=True, check=True, timeout=seconds + 30,
        ).stdout
    finally:
        os.unlink(script.name)
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(non_2xx.group(1)) if non_2xx else 0) + (sum(map(int, socket_errors.groups())) if socket_errors else 0)
    if percentiles is not None:
        percentiles.update({float(p): int(us) / 1000 for p, us in re.findall(r"^PCT (\S+) (\d+)$", out, re.M)})
    return rps, p50, p99, errors


def wait_ready(url: str, path: str, timeout_s: float, process: subprocess.Popen | None = None,
               ok: tuple[int, ...] = (200,)) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(url + path, timeout=2).status_code in ok:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} not ready after {timeout_s:.0f} s")


def benchmark(gateway_url: str, home: Path, texts: list[str], seconds: int, concurrencies: list[int],
              plain_port: int = 8090) -> list[LoadResult]:
    """The gateway (student route and auto) and the plain server, at each concurrency, in one run."""
    api_key = os.environ.get("CASCADE_API_KEY")
    results: list[LoadResult] = []
    run_wrk(gateway_url, texts, "student", 4, 3, api_key)  # warm-up: first batches, JIT paths, connections
    for concurrency in concurrencies:
        for route in ("student", "auto"):
            rps, p50, p99, errors = run_wrk(gateway_url, texts, route, concurrency, seconds, api_key)
            results.append(LoadResult("cascade (Ray Serve)", route, concurrency, rps, p50, p99, errors))
    env = os.environ | {"CASCADE_HOME": str(home)}
    plain = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "loadtests.plain_server:app", "--host", "127.0.0.1",
         "--port", str(plain_port), "--no-access-log", "--log-level", "warning"], env=env)
    try:
        plain_url = f"http://127.0.0.1:{plain_port}"
        wait_ready(plain_url, "/v1/classify", 120, plain, ok=(405,))  # up: GET is refused, not failed
        for concurrency in concurrencies:
            rps, p50, p99, errors = run_wrk(plain_url, texts, "student", concurrency, seconds, None)
            results.append(LoadResult("plain uvicorn + Starlette + ORT", "student", concurrency, rps, p50, p99, errors))
    finally:
        plain.terminate()
        plain.wait(timeout=30)
    return results


def format_results(results: list[LoadResult]) -> str:
    header = f"{'system':<34}{'route':<9}{'conc':>5}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(f"{r.system:<34}{r.route:<9}{r.concurrency:>5}{r.requests_per_s:>10.0f}"
                     f"{r.p50_ms:>9.2f}{r.p99_ms:>9.2f}{r.errors:>8}")
    by_key = {(r.system.startswith("plain"), r.route, r.concurrency): r for r in results}
    for concurrency in sorted({r.concurrency for r in results}):
        gateway, plain = by_key.get((False, "student", concurrency)), by_key.get((True, "student", concurrency))
        if gateway and plain:
            lines.append(f"cascade / plain throughput at concurrency {concurrency}: "
                         f"{gateway.requests_per_s / plain.requests_per_s:.2f}")
    return "\n".join(lines)


def to_json(results: list[LoadResult]) -> str:
    return json.dumps([asdict(r) for r in results], indent=2)
