"""Where the cores went during a load run: CPU seconds by component, read from the OS (psutil).

The benchmark shares one machine between the servers and the load generator, so a rate that misses
its objective may be short of CPU rather than slow in any one part. Counting each process's CPU
time over the run, grouped by what it is, says which. The load generator runs as a child of the
report's process and has exited by the end of a run, so it is counted from this process's
waited-for children instead.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass

import psutil

# Marker in a process's command line -> component. Ray names its replica workers
# "ray::ServeReplica:<app>:<deployment>".
COMPONENTS = (
    ("ServeReplica:cascade:Gateway", "gateway"),
    ("ServeReplica:cascade:Teacher", "teacher"),
    ("haproxy", "http proxy"),
    ("loadtests.plain_server", "plain server"),
)
LOAD_GENERATOR = "load generator"
REST = "ray and the rest"
ORDER = [name for _, name in COMPONENTS] + [LOAD_GENERATOR, REST]


def component(cmdline: str) -> str:
    return next((name for marker, name in COMPONENTS if marker in cmdline), REST)


@dataclass
class CpuSnapshot:
    wall_s: float
    busy_s: float  # machine-wide CPU seconds not idle
    by_pid: dict[int, tuple[str, float]]  # pid -> (component, CPU seconds so far)
    children_s: float  # CPU seconds of this process's children that have been waited for


def _busy_s() -> float:
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def snapshot() -> CpuSnapshot:
    by_pid: dict[int, tuple[str, float]] = {}
    for process in psutil.process_iter(["cmdline", "cpu_times"]):
        info = process.info
        if info["cpu_times"] is None:  # gone, or not ours to read
            continue
        by_pid[process.pid] = (component(" ".join(info["cmdline"] or [])),
                               info["cpu_times"].user + info["cpu_times"].system)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return CpuSnapshot(time.monotonic(), _busy_s(), by_pid, children.ru_utime + children.ru_stime)


def cpu_used(before: CpuSnapshot, after: CpuSnapshot) -> dict[str, float]:
    """CPU seconds per component between two snapshots, plus ``wall_s`` and ``busy_cores`` (machine-wide).

    A process started in between counts from zero; one that ended in between is lost unless it was
    this process's child (the load generator)."""
    used = dict.fromkeys(ORDER, 0.0)
    for pid, (name, seconds) in after.by_pid.items():
        previous = before.by_pid.get(pid)
        used[name] += seconds - (previous[1] if previous and previous[0] == name else 0.0)
    used[LOAD_GENERATOR] += after.children_s - before.children_s
    wall = after.wall_s - before.wall_s
    return used | {"wall_s": wall, "busy_cores": (after.busy_s - before.busy_s) / wall if wall > 0 else 0.0}
