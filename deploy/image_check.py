"""Wait for a Cascade container to be ready, then classify through it (deploy/image.sh test).

Checks what a user of the image sees over HTTP: readiness on /v2/health/ready while the container is still
running (a crashed container fails at once instead of after the timeout), then one text through each route,
so that both runtimes (ONNX Runtime for the student, torch for the teacher) are exercised inside the image.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

PODMAN = str(Path(__file__).resolve().parent / "podman" / "podman.sh")
TEXT = "A warm, funny and beautifully acted film."


def running(container: str) -> bool:
    """Whether podman still reports the container as running."""
    state = subprocess.run([PODMAN, "inspect", "--format", "{{.State.Running}}", container],
                           capture_output=True, text=True, check=False)
    return state.stdout.strip() == "true"


def wait_ready(url: str, container: str, timeout_s: float) -> None:
    """Poll readiness until 200, the container exits, or the timeout passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not running(container):
            sys.exit(f"container {container} exited before it was ready")
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(3)
    sys.exit(f"not ready within {timeout_s:.0f} s")


def classify(url: str, registry: Path) -> None:
    """One text through the student and one through the teacher; each answer must be a label of the bundle."""
    version = (registry / "current").read_text().strip()
    labels = json.loads((registry / version / "manifest.json").read_text())["labels"]
    for route in ("student", "teacher"):
        response = httpx.post(f"{url}/v1/classify", json={"texts": [TEXT], "route": route}, timeout=120)
        if response.status_code != 200:
            sys.exit(f"classify via {route}: HTTP {response.status_code}: {response.text}")
        result = response.json()["results"][0]
        problems = []
        if result["label"] not in labels:
            problems.append(f"label {result['label']!r} is not one of {labels}")
        if result["served_by"] != route or result["degraded"]:
            problems.append(f"served by {result['served_by']} (degraded: {result['degraded']}, {result['reason']})")
        if abs(sum(result["probabilities"].values()) - 1) > 1e-3:
            problems.append(f"probabilities {result['probabilities']} do not sum to 1")
        if result["student_version"] != version:
            problems.append(f"student version {result['student_version']}, mounted bundle is {version}")
        if problems:
            sys.exit(f"classify via {route}: " + "; ".join(problems))
        print(f"image: classified via {route}: {result['label']} ({result['confidence']:.2f})", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--container", required=True)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--registry", type=Path, required=True, help="The mounted registry, to read its labels.")
    args = parser.parse_args()
    wait_ready(args.url, args.container, args.timeout)
    classify(args.url, args.registry)


if __name__ == "__main__":
    main()
