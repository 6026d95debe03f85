"""`cascade drift-demo` (`make drift-demo`): the gateway learns a shifted domain from its own traffic.

In one run, on a private copy of the current bundle (your `current` is never touched):

1. start a gateway (`cascade serve`) that sends every Amazon text it sees to the teacher too (shadow
   share 1.0) and keeps every teacher answer in the queue;
2. measure, over HTTP, the student's accuracy and the teacher share on a held-out Amazon slice
   (``route: student`` answers and the live threshold: the held-out texts never reach the queue);
3. stream the other Amazon texts through the gateway (``route: auto``);
4. run `cascade distill --from-queue`, which gates and promotes the new student; the running
   gateway swaps to it;
5. measure the held-out slice again, and print the before/after table with the base test accuracy
   of both students (from the gate's paired comparison).

Everything goes over HTTP to 127.0.0.1 or through the `cascade` command.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import yaml

from distill.data import load_amazon_snippets
from loadtests.bench import wait_ready

HOLDOUT_SHARE = 0.3
SPLIT_SEED = 7


def _cascade() -> str:
    return str(Path(sys.executable).with_name("cascade"))


def _private_home(home: Path) -> Path:
    """A new model home holding the current bundle (hard links: no copy of the weights)."""
    from bundle.registry import Registry, link_tree

    source = Registry(home)
    version = source.current_version()
    if version is None:
        raise SystemExit(f"no current bundle in {home}: run `make models` first")
    target = Path(tempfile.mkdtemp(prefix="cascade-drift-"))
    registry = target / "registry"
    registry.mkdir()
    link_tree(source.root / version, registry / version)
    (registry / "current").write_text(version + "\n")
    logits_cache = home / "work" / "teacher_logits"  # re-distillation's teacher logits, if computed before
    if logits_cache.is_dir():
        link_tree(logits_cache, target / "work" / "teacher_logits")
    return target


def _measure(client: httpx.Client, texts: list[str], labels: np.ndarray) -> dict[str, float | str]:
    """Student accuracy and the share the live threshold would send to the teacher, over HTTP."""
    status = client.get("/v1/status").json()
    threshold = status["threshold"]
    correct, deferred, version = 0, 0, ""
    names = None
    for start in range(0, len(texts), 32):
        body = client.post("/v1/classify", json={"texts": texts[start : start + 32], "route": "student"})
        body.raise_for_status()
        for result, label in zip(body.json()["results"], labels[start : start + 32], strict=True):
            names = names or list(result["probabilities"])
            correct += int(names.index(result["label"]) == int(label))
            deferred += int(result["confidence"] < threshold)
            version = result["student_version"]
    return {"version": version, "accuracy": correct / len(texts), "teacher_share": deferred / len(texts),
            "threshold": threshold}


def _teacher_accuracy(client: httpx.Client, texts: list[str], labels: np.ndarray) -> float:
    """The teacher's own accuracy on the held-out slice: the ceiling distillation aims at."""
    correct = 0
    for start in range(0, len(texts), 32):
        body = client.post("/v1/classify", json={"texts": texts[start : start + 32], "route": "teacher"})
        for result, label in zip(body.raise_for_status().json()["results"], labels[start : start + 32], strict=True):
            correct += int(list(result["probabilities"]).index(result["label"]) == int(label))
    return correct / len(texts)


def _serve_config(port: int) -> dict:
    """The shipped Serve config, with every teacher answer kept and every text shadowed."""
    text = subprocess.run([_cascade(), "serve-config", "--port", str(port)], capture_output=True, text=True,
                          check=True).stdout
    config = yaml.safe_load(text)
    gateway = next(d for d in config["applications"][0]["deployments"] if d["name"] == "Gateway")
    user = gateway["user_config"]
    user["shadow"]["share"] = 1.0
    user["queue"]["keep"] = "all"
    user["teacher"].update({"max_share": 1.0, "timeout_s": 30.0})
    user["model"]["poll_interval_s"] = 1.0
    return config


def run(home: Path, port: int = 8765, epochs: int = 2, queue_sharpen: float = 1.0) -> int:
    """The whole demonstration; returns 0 when every target is met."""
    amazon = load_amazon_snippets()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(amazon))
    cut = int(len(order) * HOLDOUT_SHARE)
    holdout, stream = order[:cut], order[cut:]
    held_texts, held_labels = [amazon.texts[i] for i in holdout], amazon.labels[holdout]
    demo_home = _private_home(home)
    config_path = demo_home / "serve.yaml"
    config_path.write_text(yaml.safe_dump(_serve_config(port)))
    env = os.environ | {"CASCADE_HOME": str(demo_home)}
    env.pop("CASCADE_API_KEY", None)
    env.pop("CASCADE_API_KEY_FILE", None)
    log = (demo_home / "serve.log").open("w")
    print(f"drift demo: model home {demo_home}; {len(stream)} Amazon texts streamed, {len(held_texts)} held out",
          flush=True)
    server = subprocess.Popen([_cascade(), "serve", "--port", str(port), "--config", str(config_path), "--no-fast",
                               "--metrics-port", str(port + 1)], stdout=log, stderr=subprocess.STDOUT, env=env,
                              start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, "/v2/health/ready", 900, server)
        with httpx.Client(base_url=url, timeout=120) as client:
            before = _measure(client, held_texts, held_labels)
            print(f"before: {before}", flush=True)
            teacher_accuracy = _teacher_accuracy(client, held_texts, held_labels)
            print(f"teacher accuracy on the held-out slice: {teacher_accuracy:.4f}", flush=True)
            started = time.monotonic()
            for start in range(0, len(stream), 16):
                batch = [amazon.texts[i] for i in stream[start : start + 16]]
                client.post("/v1/classify", json={"texts": batch}).raise_for_status()
            # Every Gateway replica writes to the one queue: ask the queue, not one replica's counters.
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                queued = json.loads(subprocess.run([_cascade(), "queue", "stats"], env=env, stdout=subprocess.PIPE,
                                                   text=True, check=True).stdout)
                if queued["backlog"] >= len(stream) * 0.95:
                    break
                time.sleep(1)
            print(f"streamed {len(stream)} texts in {time.monotonic() - started:.0f} s; queue {queued}", flush=True)
            distill = subprocess.run([_cascade(), "distill", "--from-queue", "--epochs", str(epochs),
                                      "--queue-sharpen", str(queue_sharpen)], env=env,
                                     stdout=subprocess.PIPE, text=True)
            outcome = json.loads(distill.stdout[distill.stdout.index("{"):])
            print(f"cascade distill --from-queue: {outcome['status']}: {outcome['message']}", flush=True)
            if outcome["status"] != "promoted":
                print(json.dumps(outcome["gate"], indent=2))
                return 1
            # Every replica swaps on its own beat: wait until a run of answers all come from the new student.
            deadline, in_a_row = time.monotonic() + 120, 0
            while time.monotonic() < deadline and in_a_row < 20:
                probe = client.post("/v1/classify", json={"texts": held_texts[:1], "route": "student"}).json()
                in_a_row = in_a_row + 1 if probe["results"][0]["student_version"] == outcome["version"] else 0
                time.sleep(0.1)
            after = _measure(client, held_texts, held_labels)
            print(f"after: {after}", flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
    gate = outcome["gate"]
    gain = after["accuracy"] - before["accuracy"]
    share_drop = 1 - after["teacher_share"] / before["teacher_share"] if before["teacher_share"] else 0.0
    base_drop = gate["current_test_accuracy"] - gate["new_test_accuracy"]
    rows = [
        ("student", before["version"], after["version"], ""),
        ("held-out Amazon accuracy", f"{before['accuracy']:.4f}", f"{after['accuracy']:.4f}",
         f"{'PASS' if gain >= 0.03 else 'FAIL'} ({gain * 100:+.1f} points, >= +3)"),
        ("held-out Amazon teacher share", f"{before['teacher_share']:.1%}", f"{after['teacher_share']:.1%}",
         f"{'PASS' if share_drop >= 0.25 else 'FAIL'} ({share_drop:.0%} lower, >= 25%)"),
        ("threshold", f"{before['threshold']:.4f}", f"{after['threshold']:.4f}", ""),
        ("teacher accuracy on held-out Amazon", f"{teacher_accuracy:.4f}", "", "the ceiling"),
        ("base test accuracy", f"{gate['current_test_accuracy']:.4f}", f"{gate['new_test_accuracy']:.4f}",
         f"{'PASS' if base_drop <= 0.005 else 'FAIL'} ({-base_drop * 100:+.2f} points, >= -0.5)"),
    ]
    print(f"\n{'':32}{'before':>22}{'after':>22}  check")
    for name, old, new, check in rows:
        print(f"{name:32}{old:>22}{new:>22}  {check}")
    shutil.rmtree(demo_home, ignore_errors=True)
    return 0 if gain >= 0.03 and share_drop >= 0.25 and base_drop <= 0.005 else 1
