"""`cascade bench --report DIR`: Cascade against the teacher alone, the student alone and a plain server.

In one run on one machine: closed-loop wrk load at several concurrencies on (a) Cascade ``auto``,
(b) ``teacher`` only, (c) ``student`` only, all through the same gateway, and (d) the plain
single-process Starlette + ONNX Runtime server of the same student. A separate pass sends the
labelled texts once per route to measure what the load cannot: teacher share, accuracy, and
agreement with teacher-only answers. Writes ``report.md``, ``report.json`` and three PNG plots.

Open-loop load, a fixed arrival rate whatever the server's answers, comes from the npm package
``loadtest`` (``--rps`` mode; installed under ``.tools/`` on first use): a rising ladder of rates per
system, stopped after two rates that miss the p99 objective. The highest offered rate that holds
the objective with no errors is the report's headline; the closed-loop sweep is shown beside it.

One run at the edge is one noisy sample: on a shared 2-core machine the verdict at the best load
point and the one above it flips from run to run. So both loops confirm their edge (``confirm_edge``):
those two points are run ``EDGE_RUNS`` times each, and a point holds when most of its runs hold.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np

from loadtests import cpu
from loadtests.bench import LoadResult, run_wrk, wait_ready

ROUTES = {"cascade (auto)": "auto", "teacher only": "teacher", "student only": "student"}
PLAIN = "plain Starlette + ORT"
RATES = [10, 20, 30, 40, 60, 80, 100, 120, 160, 200, 250, 300, 400]
EDGE_RUNS = 3  # runs of each load point at the edge; it holds when most of them hold
MAX_DEGRADED_SHARE = 0.01  # a rate held by answering with the student in the teacher's place does not count
LOADTEST_VERSION = "8.2.1"
TOOLS = Path(__file__).resolve().parents[1] / ".tools" / "loadtest"
Level = TypeVar("Level", int, float)  # a load point: a concurrency (closed loop) or an arrival rate (open loop)


@dataclass
class OpenLoopResult:
    system: str
    offered_rps: float
    achieved_rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    texts: int = 0
    teacher_texts: int = 0
    degraded: int = 0
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds by component, wall_s, busy_cores
    # answered (200), refused (503), failed (the rest): count and latency p50/p99/max in ms, kept apart
    outcomes: dict[str, dict[str, float | None]] = field(default_factory=dict)

    @property
    def degraded_share(self) -> float:
        return self.degraded / self.texts if self.texts else 0.0

    def holds(self, p99_ms: float) -> bool:
        """The rate is sustained: p99 within the objective, no errors, (nearly) all of it sent, and at most
        1% of answers degraded. Without the last condition a saturated teacher would "hold" its p99 by
        letting the student answer (its concurrency cap), and teacher-only would no longer be the teacher."""
        return (self.errors == 0 and self.p99_ms <= p99_ms and self.achieved_rps >= 0.9 * self.offered_rps
                and self.degraded_share <= MAX_DEGRADED_SHARE)


def loadtest_module() -> Path:
    """loadtest's entry point, installed from npm into .tools/ the first time."""
    module = TOOLS / "node_modules" / "loadtest" / "index.js"
    if not module.exists():
        if shutil.which("npm") is None or shutil.which("node") is None:
            raise RuntimeError("open-loop load needs Node.js and npm (Debian: `apt-get install nodejs npm`)")
        TOOLS.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund", "--no-save",
                        f"loadtest@{LOADTEST_VERSION}"], cwd=TOOLS, check=True)
    return module


def run_open_loop(url: str, texts: list[str], route: str, rate: float, seconds: int, system: str,
                  api_key: str | None) -> OpenLoopResult:
    """One open-loop run: ``rate`` requests per second for ``seconds``, one text each, from the data."""
    bodies = [json.dumps({"texts": [t], "route": route}) for t in texts]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as file:
        json.dump(bodies, file)
    try:
        env = os.environ | {"LOADTEST_MODULE": str(loadtest_module())}
        if api_key:
            env["CASCADE_API_KEY"] = api_key
        before = cpu.snapshot()
        out = subprocess.run(["node", str(Path(__file__).with_name("openloop.mjs")), f"{url}/v1/classify",
                              str(rate), str(seconds), file.name],
                             capture_output=True, text=True, check=True, timeout=seconds + 60, env=env).stdout
        used = cpu.cpu_used(before, cpu.snapshot())
    finally:
        os.unlink(file.name)
    result = json.loads(out.strip().splitlines()[-1])
    pct, answers = result["percentiles"], result["answers"]
    return OpenLoopResult(system, rate, float(result["effectiveRps"]), float(pct["50"] or 0),
                          float(pct["99"] or result["maxLatencyMs"]), int(result["totalErrors"]),
                          int(answers["texts"]), int(answers["teacher"]), int(answers["degraded"]), used,
                          result.get("outcomes", {}))


def confirm_edge(levels: Sequence[Level], best_level: Callable[[], Level | None], runs_at: Callable[[Level], int],
                 run: Callable[[Level], None]) -> None:
    """Run the best held level, then the next one up, until each has ``EDGE_RUNS`` runs, judging again
    after each: a refuted best gives way to the level below, a confirmed level above becomes the best."""
    while True:
        best = best_level()
        above = next((level for level in levels if best is None or level > best), None)
        unconfirmed = [level for level in (best, above) if level is not None and runs_at(level) < EDGE_RUNS]
        if not unconfirmed:
            return
        while runs_at(unconfirmed[0]) < EDGE_RUNS:
            run(unconfirmed[0])


def _mostly(flags: list[bool]) -> bool:
    return 2 * sum(flags) > len(flags)


def open_loop_ladder(url: str, texts: list[str], route: str, system: str, seconds: int, p99_ms: float,
                     api_key: str | None) -> list[OpenLoopResult]:
    """Rising rates until two in a row miss the objective (past saturation nothing new is learnt), then
    the edge confirmed."""
    results: list[OpenLoopResult] = []

    def run(rate: float) -> None:
        results.append(run_open_loop(url, texts, route, rate, seconds, system, api_key))

    misses = 0
    for rate in RATES:
        run(rate)
        misses = 0 if results[-1].holds(p99_ms) else misses + 1
        if misses == 2:
            break
    confirm_edge(RATES, lambda: best_open_rate(results, system, p99_ms) or None,
                 lambda rate: len(open_loop_points(results, system).get(rate, [])), run)
    return results


def open_loop_points(results: list[OpenLoopResult], system: str) -> dict[float, list[OpenLoopResult]]:
    """The system's open-loop runs by offered rate (the edge has several)."""
    points: dict[float, list[OpenLoopResult]] = {}
    for r in results:
        if r.system == system:
            points.setdefault(r.offered_rps, []).append(r)
    return dict(sorted(points.items()))


def best_open_rate(results: list[OpenLoopResult], system: str, p99_ms: float) -> float:
    """Highest offered rate most of whose runs the system sustained within the p99 objective (0 when none)."""
    return max((rate for rate, runs in open_loop_points(results, system).items()
                if _mostly([r.holds(p99_ms) for r in runs])), default=0.0)


def closed_loop_points(results: list[LoadResult], system: str) -> dict[int, list[LoadResult]]:
    """The system's closed-loop runs by concurrency (the edge has several)."""
    points: dict[int, list[LoadResult]] = {}
    for r in results:
        if r.system == system:
            points.setdefault(r.concurrency, []).append(r)
    return dict(sorted(points.items()))


def median_rps(runs: list[LoadResult]) -> float:
    return float(np.median([r.requests_per_s for r in runs]))


def best_concurrency(results: list[LoadResult], system: str, p99_ms: float) -> int | None:
    """The concurrency with the highest median throughput among those most of whose runs held the objective."""
    held = {c: runs for c, runs in closed_loop_points(results, system).items()
            if _mostly([r.p99_ms <= p99_ms and r.errors == 0 for r in runs])}
    return max(held, key=lambda c: median_rps(held[c]), default=None)


def best_rate(results: list[LoadResult], system: str, p99_ms: float) -> float:
    """Median throughput at the best concurrency that held the p99 objective (0 when none did)."""
    best = best_concurrency(results, system, p99_ms)
    return 0.0 if best is None else median_rps(closed_loop_points(results, system)[best])


def labelled_pass(url: str, texts: list[str], labels: np.ndarray, api_key: str | None) -> dict[str, Any]:
    """Each route once over the labelled texts: answers, teacher share and accuracy."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    answers: dict[str, list[str]] = {}
    share: dict[str, float] = {}
    names: list[str] = []
    with httpx.Client(base_url=url, headers=headers, timeout=120) as client:
        prices = client.get("/v1/status").raise_for_status().json()["config"]["cost"]
        for system, route in ROUTES.items():
            results = []
            for start in range(0, len(texts), 16):
                body = client.post("/v1/classify", json={"texts": texts[start : start + 16], "route": route})
                results.extend(body.raise_for_status().json()["results"])
            names = names or list(results[0]["probabilities"])
            answers[system] = [r["label"] for r in results]
            share[system] = float(np.mean([r["served_by"] == "teacher" for r in results]))
    truth = [names[int(label)] for label in labels]
    teacher = answers["teacher only"]
    out = {}
    for system in ROUTES:
        cost = prices["student_per_1k"] * (system != "teacher only") + prices["teacher_per_1k"] * share[system]
        if system == "teacher only":
            cost = prices["teacher_per_1k"]  # what calling the teacher alone costs
        out[system] = {
            "teacher_share": share[system],
            "accuracy": float(np.mean([a == t for a, t in zip(answers[system], truth, strict=True)])),
            "agreement_with_teacher_only": float(np.mean([a == t for a, t in zip(answers[system], teacher,
                                                                                    strict=True)])),
            "cost_per_1k_requests": cost,
        }
    out[PLAIN] = dict(out["student only"])
    return out


def settle(url: str, api_key: str | None, timeout_s: float = 30.0) -> None:
    """Wait until the gateway has nothing in flight (an overloaded run leaves a backlog behind), so one
    system's load does not spill into the next one's numbers."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline, idle = time.monotonic() + timeout_s, 0
    with httpx.Client(base_url=url, headers=headers, timeout=10) as client:
        while idle < 10 and time.monotonic() < deadline:  # several answers: each replica counts its own
            idle = idle + 1 if client.get("/v1/status").json()["in_flight"] == 0 else 0
            time.sleep(0.1)
    time.sleep(1.0)


def closed_loop(url: str, texts: list[str], route: str, system: str, concurrencies: list[int], seconds: int,
                api_key: str | None, p99_ms: float, results: list[LoadResult]) -> None:
    """wrk at each concurrency, then the edge confirmed; appends to ``results``."""

    def run(concurrency: int) -> None:
        pct: dict[float, float] = {}
        rps, p50, p99, errors = run_wrk(url, texts, route, concurrency, seconds, api_key, pct)
        results.append(LoadResult(system, route, concurrency, rps, p50, p99, errors, pct))

    for concurrency in concurrencies:
        run(concurrency)
    confirm_edge(concurrencies, lambda: best_concurrency(results, system, p99_ms),
                 lambda c: len(closed_loop_points(results, system).get(c, [])), run)


def sweep(url: str, texts: list[str], concurrencies: list[int], seconds: int, api_key: str | None,
          home: Path, p99_ms: float, plain_port: int = 8090) -> tuple[list[LoadResult], list[OpenLoopResult]]:
    """Closed-loop (wrk, by concurrency) and open-loop (loadtest, by arrival rate) load on each system."""
    results: list[LoadResult] = []
    open_results: list[OpenLoopResult] = []
    run_wrk(url, texts, "student", 4, 3, api_key)
    for system, route in ROUTES.items():
        settle(url, api_key)
        closed_loop(url, texts, route, system, concurrencies, seconds, api_key, p99_ms, results)
        settle(url, api_key)
        open_results += open_loop_ladder(url, texts, route, system, seconds, p99_ms, api_key)
    plain = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "loadtests.plain_server:app", "--host", "127.0.0.1", "--port",
         str(plain_port), "--no-access-log", "--log-level", "warning"], env=os.environ | {"CASCADE_HOME": str(home)})
    try:
        plain_url = f"http://127.0.0.1:{plain_port}"
        wait_ready(plain_url, "/v1/classify", 120, plain, ok=(405,))
        closed_loop(plain_url, texts, "student", PLAIN, concurrencies, seconds, None, p99_ms, results)
        open_results += open_loop_ladder(plain_url, texts, "student", PLAIN, seconds, p99_ms, None)
    finally:
        plain.terminate()
        plain.wait(timeout=30)
    return results, open_results


@contextmanager
def _figure(path: Path, title: str, xlabel: str, ylabel: str) -> Iterator[Any]:
    """One 6x4 plot: the caller draws on the axes; labels, legend and the PNG are done here."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    try:
        yield ax
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


def plot_latency_cdf(results: list[LoadResult], concurrency: int, path: Path) -> None:
    with _figure(path, f"Latency CDF at concurrency {concurrency}", "latency (ms)", "share of requests") as ax:
        for system in [*ROUTES, PLAIN]:
            point = next((r for r in results if r.system == system and r.concurrency == concurrency), None)
            if point and point.percentiles_ms:
                pcts = sorted(point.percentiles_ms.items())
                ax.plot([v for _, v in pcts], [p / 100 for p, _ in pcts], marker=".", label=system)
        ax.set_xscale("log")


def plot_throughput(results: list[LoadResult], path: Path) -> None:
    with _figure(path, "Throughput against concurrency", "concurrent connections (closed loop)",
                 "requests/s") as ax:
        for system in [*ROUTES, PLAIN]:
            points = [(c, median_rps(runs)) for c, runs in closed_loop_points(results, system).items()]
            ax.plot([c for c, _ in points], [v for _, v in points], marker="o", label=system)
        ax.set_xscale("log", base=2)


def plot_open_loop_p99(open_results: list[OpenLoopResult], p99_ms: float, path: Path) -> None:
    with _figure(path, "p99 latency against arrival rate", "offered requests/s (open loop)",
                 "p99 latency (ms), median of a rate's runs") as ax:
        for system in [*ROUTES, PLAIN]:
            points = [(rate, float(np.median([r.p99_ms for r in runs])))
                      for rate, runs in open_loop_points(open_results, system).items()]
            ax.plot([r for r, _ in points], [v for _, v in points], marker="o", label=system)
        ax.axhline(p99_ms, color="grey", linestyle="--", label=f"p99 objective ({p99_ms:.0f} ms)")
        ax.set_xscale("log")
        ax.set_yscale("log")


def plot_accuracy_vs_share(curve: list[dict[str, float]], operating: dict[str, float] | None,
                           live: dict[str, float], path: Path) -> None:
    with _figure(path, "Cascade accuracy against teacher share", "share of texts sent to the teacher",
                 "accuracy") as ax:
        ax.plot([p["teacher_share"] for p in curve], [p["accuracy"] for p in curve], label="cascade (test split)")
        if operating:
            ax.scatter([operating["teacher_share"]], [operating["accuracy"]], color="red", zorder=3,
                       label="operating point")
        ax.scatter([live["teacher_share"]], [live["accuracy"]], marker="x", color="black", zorder=3,
                   label="measured through the gateway")


def plots(results: list[LoadResult], open_results: list[OpenLoopResult], quality: dict[str, Any],
          curve: list[dict[str, float]], operating: dict[str, float] | None, out: Path, concurrency: int,
          p99_ms: float) -> None:
    """The report's four PNGs."""
    plot_latency_cdf(results, concurrency, out / "latency_cdf.png")
    plot_throughput(results, out / "throughput.png")
    plot_open_loop_p99(open_results, p99_ms, out / "open_loop_p99.png")
    plot_accuracy_vs_share(curve, operating, quality["cascade (auto)"], out / "accuracy_vs_share.png")


def cpu_table(open_results: list[OpenLoopResult], systems: list[str], p99_ms: float) -> list[str]:
    """CPU per request by component at each system's highest held open-loop rate (its first run there)."""
    lines = ["", f"Where the cores went ({os.cpu_count()} here): open loop at each system's highest rate with p99 <= "
             f"{p99_ms:.0f} ms (its first run there; the lowest rate where none held), CPU ms per request by "
             "component, read from the OS over the run.", "",
             "| system | req/s | machine busy (cores) | teacher replica busy (cores) | "
             + " | ".join(cpu.ORDER) + " | total CPU ms per request |",
             "|---" * (len(cpu.ORDER) + 5) + "|"]
    for system in systems:
        measured = [r for r in open_results if r.cpu]
        points = open_loop_points(measured, system)
        if not points:
            continue
        rate = best_open_rate(measured, system, p99_ms) or min(points)
        run = points[rate][0]
        per_request = [run.cpu.get(name, 0.0) * 1000 / max(run.texts, 1) for name in cpu.ORDER]
        lines.append(f"| {system} | {rate:.0f} | {run.cpu['busy_cores']:.2f} | "
                     f"{run.cpu.get('teacher', 0.0) / run.cpu['wall_s']:.2f} | "
                     + " | ".join(f"{v:.1f}" for v in per_request) + f" | {sum(per_request):.1f} |")
    return lines


def markdown(results: list[LoadResult], open_results: list[OpenLoopResult], quality: dict[str, Any],
             p99_ms: float, machine: str) -> str:
    systems = [*ROUTES, PLAIN]
    concurrencies = sorted({r.concurrency for r in results})
    lines = [f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine}.", "",
             f"| system | open loop: highest rate with p99 <= {p99_ms:.0f} ms | "
             + " | ".join(f"req/s @{c}" for c in concurrencies)
             + " | p50 / p95 / p99 ms @32 | closed loop: best req/s with p99 <= "
             f"{p99_ms:.0f} ms | teacher share | accuracy | agrees with teacher-only | $ per 1k requests |",
             "|---" * (len(concurrencies) + 8) + "|"]
    for system in systems:
        runs = closed_loop_points(results, system)
        at32 = (runs.get(32) or runs[max(runs)])[0]
        pct = at32.percentiles_ms or {}
        q = quality[system]
        lines.append(
            f"| {system} | {best_open_rate(open_results, system, p99_ms):.0f} | "
            + " | ".join(f"{median_rps(runs[c]):.0f}" for c in concurrencies)
            + f" | {at32.p50_ms:.1f} / {pct.get(95.0, float('nan')):.1f} / {at32.p99_ms:.1f}"
            + f" | {best_rate(results, system, p99_ms):.0f} | {q['teacher_share']:.1%} | {q['accuracy']:.4f}"
            + f" | {q['agreement_with_teacher_only']:.1%} | {q['cost_per_1k_requests']:.4f} |")
    qc, qt = quality["cascade (auto)"], quality["teacher only"]
    checks = []
    for loop, best in (("open loop", lambda system: best_open_rate(open_results, system, p99_ms)),
                       ("closed loop", lambda system: best_rate(results, system, p99_ms))):
        cascade, teacher = best("cascade (auto)"), best("teacher only")
        checks.append((f"highest rate under p99 objective ({loop}), cascade / teacher-only",
                       f"{cascade:.0f} / {teacher:.0f} = {cascade / teacher:.2f}x" if teacher
                       else "teacher never met it", teacher > 0 and cascade >= 4 * teacher, ">= 4x"))
    checks += [
        ("agreement with teacher-only answers", f"{qc['agreement_with_teacher_only']:.1%}",
         qc["agreement_with_teacher_only"] >= 0.96, ">= 96%"),
        ("accuracy, cascade - teacher-only", f"{(qc['accuracy'] - qt['accuracy']) * 100:+.2f} points",
         abs(qc["accuracy"] - qt["accuracy"]) <= 0.01, "within 1 point"),
        ("cost per 1k requests, cascade / teacher-only",
         f"{qc['cost_per_1k_requests'] / qt['cost_per_1k_requests']:.2f}",
         qc["cost_per_1k_requests"] <= qt["cost_per_1k_requests"] / 3, "<= 1/3"),
    ]
    lines += ["", "| check | measured | target | |", "|---|---|---|---|"]
    lines += [f"| {name} | {value} | {target} | {'PASS' if ok else 'FAIL'} |" for name, value, ok, target in checks]
    lines += cpu_table(open_results, systems, p99_ms)
    lines += ["", "Open loop: loadtest (npm) at fixed arrival rates, each held for the same seconds as a closed-loop "
              "point; a rate counts when p99 holds, nothing fails, at least 90% of it was sent and at most 1% of the "
              "answers are degraded (the student answering in the teacher's place). Closed loop: wrk "
              "(one client thread); req/s is the median of a point's runs. In both loops the best point and the one "
              f"above it are run {EDGE_RUNS} times and hold when most of their runs hold (one run at the edge is "
              "one noisy sample); report.json keeps every run. Both share the machine's cores with the servers. "
              "With route `teacher`, a "
              "saturated teacher (its concurrency cap) answers with the student, degraded: closed-loop teacher-only "
              "points at high concurrency are mostly such answers. Labelled traffic: the bench texts from the "
              "test split, each route once."]
    return "\n".join(lines)


@dataclass(frozen=True)
class BundleFacts:
    """What the report needs from the served bundle, read by the caller (the load tests speak HTTP only)."""

    version: str
    threshold: float
    report: dict[str, Any]


def run_report(url: str, home: Path, texts: list[str], labels: np.ndarray, out: Path, seconds: int,
               concurrencies: list[int], bundle: BundleFacts, p99_ms: float = 100.0) -> str:
    """Run every load point and write the report; ``bundle`` is what the CLI read from the registry."""
    out.mkdir(parents=True, exist_ok=True)
    api_key = os.environ.get("CASCADE_API_KEY")
    quality = labelled_pass(url, texts, labels, api_key)
    results, open_results = sweep(url, texts, concurrencies, seconds, api_key, home, p99_ms)
    curve = bundle.report["evaluation"]["test_curve"]
    operating = next((p for p in curve if abs(p["threshold"] - bundle.threshold) < 1e-12), None)
    if operating is None:
        ev = bundle.report["evaluation"]["cascade"]
        operating = {"teacher_share": ev["teacher_share"], "accuracy": ev["accuracy"]}
    plots(results, open_results, quality, curve, operating, out, 32 if 32 in concurrencies else max(concurrencies),
          p99_ms)
    machine = f"{os.cpu_count()} CPU cores, {os.uname().sysname} {os.uname().machine}, bundle {bundle.version}"
    text = markdown(results, open_results, quality, p99_ms, machine)
    (out / "report.md").write_text(text + "\n")
    (out / "report.json").write_text(json.dumps({"quality": quality, "load": [r.__dict__ for r in results],
                                                 "open_loop": [asdict(r) for r in open_results]},
                                                indent=2, default=str))
    return text
