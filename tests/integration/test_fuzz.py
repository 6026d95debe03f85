"""Schemathesis against the gateway's own /openapi.json with every check (`--checks all`): no server error; every
answer's status code, content type, headers and body as the document states them; every schema-valid request
accepted (the document states the limits, the served labels and the model names) and every invalid one refused.

Schemathesis' own runner (`st run`) in a subprocess, not its pytest plugin: the plugin reaches into pytest's
private node attributes and breaks with pytest releases (``'Function' object has no attribute '_nodeid'``).
Its JSON report is the result; its console output is shown when a check fails.

Bounded: ``CASCADE_FUZZ_EXAMPLES`` examples per operation and phase (default 25; seconds here), seed
``CASCADE_FUZZ_SEED`` (fixed by default, so a failure reproduces; set another to explore).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import API_KEY

pytestmark = pytest.mark.integration

FUZZ_EXAMPLES = int(os.environ.get("CASCADE_FUZZ_EXAMPLES", "25"))
FUZZ_SEED = int(os.environ.get("CASCADE_FUZZ_SEED", "20261130"))
SCHEMATHESIS = str(Path(sys.executable).with_name("st"))
# Every check schemathesis has: the contract (status codes, content types, headers, bodies as documented), no
# server error, schema-valid requests accepted (the document names the served bundle's labels and the model names),
# schema-invalid ones refused, authentication enforced, methods refused as documented.
CHECKS = ["all"]


def _schemathesis(url: str, report_dir: Path, checks: list[str], *selection: str) -> tuple[dict[str, Any], str]:
    """One bounded `st run` against the live gateway: (its JSON report, its console output)."""
    report = report_dir / "report.json"
    command = [SCHEMATHESIS, "run", f"{url}/openapi.json", "--header", f"Authorization: Bearer {API_KEY}",
               "--checks", ",".join(checks), "--max-examples", str(FUZZ_EXAMPLES), "--seed", str(FUZZ_SEED),
               "--workers", "1", "--request-timeout", "30", "--generation-database", "none", "--no-color",
               "--report", "json", "--report-json-path", str(report), *selection]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=report_dir)
    assert report.exists(), f"schemathesis wrote no report (exit {done.returncode}):\n{done.stdout}\n{done.stderr}"
    return json.loads(report.read_text()), done.stdout[-12000:] + done.stderr[-3000:]


def _assert_clean(result: dict[str, Any], output: str) -> None:
    operations, cases = result["operations"], result["test_cases"]
    assert operations["tested"] == operations["selected"] > 0, f"operations not tested: {operations}\n{output}"
    assert cases["generated"] > 0 and not cases["errored"], f"test cases: {cases}\n{output}"
    assert not result["failures"] and not result["errors"], (
        f"{[(f['code'], f['title'], f['operations']) for f in result['failures']]} {result['errors']}\n{output}")
    assert result["exit_code"] == 0, output


def test_api_conforms_to_its_openapi_document_under_every_check(gateway, tmp_path: Path) -> None:
    result, output = _schemathesis(gateway.url, tmp_path, CHECKS)
    _assert_clean(result, output)
    print(f"\nschemathesis --checks all: {result['operations']['tested']} operations, "
          f"{result['test_cases']['generated']} test cases, seed {result['seed']}, no failure")
