"""CPU accounting of the benchmark: each process's CPU time is given to the component its command line names.
With real processes: tests/integration/test_cpu.py."""

from __future__ import annotations

from loadtests import cpu


def test_components_are_named_from_the_command_line() -> None:
    assert cpu.component("ray::ServeReplica:cascade:Teacher") == "teacher"
    assert cpu.component("ray::ServeReplica:cascade:Gateway") == "gateway"
    assert cpu.component("/usr/sbin/haproxy -db -f /tmp/haproxy.cfg") == "http proxy"
    assert cpu.component("/usr/bin/raylet --node_ip_address=127.0.0.1") == cpu.REST
