"""The fault suite: each fault under steady open-loop load on 127.0.0.1, bounded in time, one table row each.

The gateway is the integration suite's (`cascade serve` on the tiny bundle). Faults that take longer than
`make test` allows are skipped unless ``CASCADE_FAULTS=all`` (set by `make faults`).
"""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest

from loadtests.faults import FaultRow, append_row, table
from tests.integration.conftest import API_KEY, apply_config

# Both under loadtests/reports/, which git ignores (a run leaves the checkout clean): `make faults` writes the full
# table there, the subset in `make test` writes to latest/ so it never overwrites a full run's table.
_REPORTS = Path(__file__).resolve().parents[2] / "loadtests" / "reports"
ROWS = (_REPORTS if os.environ.get("CASCADE_FAULTS") == "all" else _REPORTS / "latest") / "faults.jsonl"
REPORT = ROWS.with_suffix(".md")
if ROWS.parent.name == "latest":
    ROWS.unlink(missing_ok=True)  # this run's rows only
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
_recorded: list[FaultRow] = []


def long_fault(test):
    """A fault that needs more than a minute or two: only `make faults` runs it."""
    return pytest.mark.skipif(os.environ.get("CASCADE_FAULTS") != "all",
                              reason="long fault: `make faults` (CASCADE_FAULTS=all) runs it")(test)


def record(row: FaultRow) -> None:
    """Print the row and keep it for the table (faults.md beside ``ROWS``)."""
    print(f"\n{row.markdown()}")
    append_row(ROWS, row)
    _recorded.append(row)


def replica_pids(deployment: str) -> list[int]:
    """Worker pids of a deployment's replicas, from Ray's process title ``ray::ServeReplica:cascade:<name>``."""
    title = f"ray::ServeReplica:cascade:{deployment}"
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if (p.info["cmdline"] or [""])[0].startswith(title)]


@pytest.fixture(autouse=True)
def _base_config(gateway) -> None:
    """Every fault starts from the integration suite's base settings (a generous teacher timeout)."""
    apply_config(gateway)


def pytest_terminal_summary(terminalreporter) -> None:
    if _recorded:
        REPORT.write_text("# Fault suite\n\nWritten by `make faults` (tests/faults); each fault under open-loop "
                          "load on 127.0.0.1 against `cascade serve` on the tiny bundle.\n\n" + table(ROWS) + "\n")
        terminalreporter.write_line("\n" + table(ROWS))
        terminalreporter.write_line(f"(written to {REPORT})")
