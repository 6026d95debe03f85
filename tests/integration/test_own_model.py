"""Use your own model: a 3-label bundle built from a data file by `cascade build --data`, served by a real gateway
(Ray Serve on 127.0.0.1) that answers with those labels, on the student, the teacher and the cascade."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import run_cli
from tests.integration.conftest import API_KEY, TEST_BASE
from tests.own_model_data import THREE_LABELS, three_label_csv, tiny_config
from tests.servers import cascade_serve, free_port, serve_config_with

pytestmark = [pytest.mark.integration, pytest.mark.own_cluster]

TEXTS = ["a dull, lifeless and overlong film", "one of the best films of the year, a joy",
         "it is a movie", "the acting is fine but the plot is a mess", "I laughed, I cried, I loved it"]


@pytest.fixture(scope="module")
def own_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle from a 3-label CSV with its own column names; tiny settings come from the config file."""
    work = tmp_path_factory.mktemp("own-model")
    data = three_label_csv(work / "reviews.csv")
    config = tiny_config(work / "build.yaml", work / "unused.csv", teacher={"epochs": 2})
    home = work / "home"
    run_cli("build", "--config", str(config), "--data", str(data), "--text-column", "review",
            "--label-column", "sentiment", home=home)
    return home


@pytest.fixture(scope="module")
def own_gateway(own_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    log = tmp_path_factory.mktemp("own-gateway") / "serve.log"
    port = free_port()
    # --no-fast: Ray's Python proxy, no HAProxy, whose fixed stats ports another gateway on this host may hold.
    # The integration tests' generous teacher settings: on a loaded 2-core machine a teacher call may take longer
    # than the default timeout, and this test is about labels, not degradation.
    config = serve_config_with(port, Gateway={"user_config": TEST_BASE})
    with cascade_serve("--no-fast", "--metrics-port", str(free_port()), port=port, home=own_home, log=log,
                       config=config, env={"CASCADE_API_KEY": API_KEY}) as served, \
            httpx.Client(base_url=served.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as client:
        yield client


def _classify(client: httpx.Client, route: str) -> list[dict]:
    response = client.post("/v1/classify", json={"texts": TEXTS, "route": route})
    assert response.status_code == 200, response.text
    return response.json()["results"]


def test_the_gateway_answers_with_the_data_s_three_labels(own_home: Path, own_gateway: httpx.Client) -> None:
    from bundle.registry import Registry
    from bundle.runtime import StudentRuntime
    from bundle.teachers import open_teacher, teacher_logits_sync

    bundle = Registry(own_home).load()
    assert tuple(bundle.manifest.labels) == THREE_LABELS
    assert bundle.manifest.build["data"]["text_column"] == "review"
    student = StudentRuntime(bundle.student_path, bundle.tokenizer_dir, bundle.manifest.max_length).logits(TEXTS)
    teacher = teacher_logits_sync(open_teacher(bundle.manifest.teacher, bundle.path, bundle.manifest.labels), TEXTS)
    expected = {"student": [THREE_LABELS[i] for i in student.argmax(-1)],
                "teacher": [THREE_LABELS[i] for i in teacher.argmax(-1)]}
    for route in ("student", "teacher", "auto"):
        results = _classify(own_gateway, route)
        for result in results:
            assert set(result["probabilities"]) == set(THREE_LABELS) and result["label"] in THREE_LABELS
            assert abs(sum(result["probabilities"].values()) - 1) < 1e-6 and not result["degraded"]
            assert result["label"] == max(result["probabilities"], key=result["probabilities"].get)
        if route != "auto":
            assert [r["served_by"] for r in results] == [route] * len(TEXTS)
            assert [r["label"] for r in results] == expected[route]  # the same model and label order as offline
    body = {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": TEXTS[:2]}]}
    answer = own_gateway.post("/v2/models/student/infer", json=body).json()
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert outputs["probabilities"]["shape"] == [2, 3]
    assert np.allclose(np.asarray(outputs["probabilities"]["data"]).reshape(2, 3).sum(-1), 1.0, atol=1e-5)


def test_a_build_distils_from_a_remote_teacher_on_mlserver_and_caches_its_answers(
        tiny_home: Path, tmp_path: Path) -> None:
    """`teacher: remote`: MLServer (mlserver-huggingface) serves the tiny bundle's teacher; the build asks it for
    every text once and caches the answers, and the bundle keeps no teacher weights."""
    import csv

    from bundle.registry import Registry
    from distill.data import load_movie_snippets
    from tests.servers import MLServer, hf_model_settings, hf_teacher_folder

    source = Registry(tiny_home).load()
    movies = load_movie_snippets()
    data = tmp_path / "movies.csv"
    with data.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["review", "sentiment"])
        for index in np.random.default_rng(0).permutation(len(movies))[:200]:
            writer.writerow([movies.texts[index], movies.label_names[movies.labels[index]]])
    folder = hf_teacher_folder(source.path, tmp_path / "hf-teacher")
    server = MLServer(tmp_path / "mlserver", {"teacher": hf_model_settings("teacher", folder)})
    server.start()
    remote = {"url": server.url, "model": "teacher", "output": "labels", "input_name": "array_inputs",
              "timeout_s": 30, "retries": 1,
              "extra_inputs": [{"name": "top_k", "datatype": "INT32", "shape": [1], "data": [2]}]}
    config = tiny_config(tmp_path / "build.yaml", data, teacher={"kind": "remote", "remote": remote})
    home = tmp_path / "home"
    try:
        run_cli("build", "--config", str(config), home=home)
    finally:
        server.stop()
    bundle = Registry(home).load()
    manifest = bundle.manifest
    assert manifest.teacher.kind == "remote" and manifest.teacher.remote.url == server.url
    assert not bundle.teacher_dir.exists() and manifest.build["student_init"] == "minilm"
    assert manifest.labels == ["negative", "positive"]
    # every build text was asked once and is kept by text hash: a rebuild or an eval does not ask again
    import sqlite3

    from distill.build import splits_for
    from distill.config import BuildConfig

    splits = splits_for(BuildConfig.model_validate(manifest.build))
    asked = set(splits.train.texts) | set(splits.val.texts) | set(splits.test.texts)
    with sqlite3.connect(home / "work" / "teacher_answers" / "teacher_logits.sqlite") as cache:
        assert cache.execute("SELECT COUNT(*) FROM logits").fetchone()[0] == len(asked)
