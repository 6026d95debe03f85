"""CPU accounting of the benchmark with real processes: their CPU time given to the right component."""

from __future__ import annotations

import subprocess
import sys

import pytest

from loadtests import cpu

pytestmark = pytest.mark.integration  # starts a server and a child process

BURN = "import sys, time\ndef burn(s):\n    end = time.process_time() + s\n    while time.process_time() < end: pass\n"
# Says "ready", burns 0.4 s of CPU on a line from stdin, says "done", then idles until killed.
SERVER = BURN + ("print('ready', flush=True)\nsys.stdin.readline()\nburn(0.4)\nprint('done', flush=True)\n"
                "time.sleep(60)\n")


def test_a_running_process_and_a_finished_child_are_each_counted_where_they_belong() -> None:
    # A live process named as the plain server, and a child (as the load generator is) that exits.
    server = subprocess.Popen([sys.executable, "-c", SERVER, "loadtests.plain_server"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        before = cpu.snapshot()
        server.stdin.write("go\n")
        server.stdin.flush()
        assert server.stdout.readline().strip() == "done"
        subprocess.run([sys.executable, "-c", BURN + "burn(0.3)"], check=True)
        used = cpu.cpu_used(before, cpu.snapshot())
    finally:
        server.kill()
        server.wait()
    assert 0.35 <= used["plain server"] <= 0.6
    assert 0.25 <= used[cpu.LOAD_GENERATOR] <= 1.0  # the burn plus the interpreter's start
    assert used["wall_s"] >= 0.6 and 0.5 <= used["busy_cores"] <= cpu.psutil.cpu_count()
