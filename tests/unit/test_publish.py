"""The one publish path: ``Registry.staging`` and ``distill.publish.publish_student`` (build and re-distillation).

The student and teacher here are one-layer BERTs with random weights made in the test (no model build): the
path under test is staging, export, calibration, publishing and the report, not what the models learnt.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bundle.registry import (
    CURVE_FILE,
    MANIFEST,
    REPORT_FILE,
    STAGING_PREFIX,
    STUDENT_FILE,
    STUDENT_FP32_DIR,
    TEACHER_DIR,
    TOKENIZER_DIR,
    BundleError,
    Registry,
)
from bundle.runtime import StudentRuntime
from distill import train
from distill.config import BuildConfig
from distill.data import Dataset, Splits
from distill.publish import CALIBRATION_FILE, Candidate, publish_student

LABELS = ("neg", "pos")
FIELDS = {"labels": list(LABELS), "max_length": 16, "temperatures": {}, "threshold": 0.5}


def test_a_failed_body_removes_its_staging_folder_and_registers_nothing(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    with pytest.raises(RuntimeError, match="export failed"), registry.staging() as staging:
        (staging / TOKENIZER_DIR).mkdir()
        (staging / STUDENT_FILE).write_bytes(b"half a student")
        raise RuntimeError("export failed")
    assert not staging.exists()
    assert registry.versions() == [] and registry.current_version() is None
    assert list(registry.root.iterdir()) == []


def test_a_staged_folder_is_a_version_only_once_published(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    with registry.staging() as staging:
        assert staging.parent == registry.root and staging.name.startswith(STAGING_PREFIX)
        (staging / STUDENT_FILE).write_bytes(b"student")
        (staging / MANIFEST).write_text("{}")  # publish writes the manifest before its rename: still no version
        assert registry.versions() == []
        (staging / MANIFEST).unlink()
        bundle = registry.publish(staging, FIELDS)
    assert not staging.exists()
    assert registry.versions() == [bundle.version]
    assert registry.load(bundle.version).manifest.files == {STUDENT_FILE: bundle.manifest.files[STUDENT_FILE]}


def test_a_body_that_publishes_nothing_leaves_nothing(tmp_path: Path) -> None:
    """A refused candidate (re-distillation's gate said no) leaves the registry as it was, without an error."""
    registry = Registry(tmp_path)
    with registry.staging() as staging:
        (staging / STUDENT_FILE).write_bytes(b"student")
    assert not staging.exists() and registry.versions() == []


def texts(words: list[str], count: int, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=count)
    good, bad = ["good", "great", "fine", "lovely"], ["bad", "awful", "poor", "dull"]
    rows = [" ".join(rng.choice(good if label else bad, size=3)) + " " + rng.choice(words) for label in labels]
    return Dataset(f"synthetic-{seed}", rows, labels.astype(np.int64), LABELS)


@pytest.fixture(scope="module")
def splits() -> Splits:
    words = ["film", "story", "cast", "plot", "ending"]
    return Splits(texts(words, 40, 0), texts(words, 24, 1), texts(words, 24, 2))


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return train.load_tokenizer(train.base_model_dir())  # the bundled MiniLM's: no hub access


def tiny_bert(tokenizer: Any, seed: int) -> Any:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, id2label=dict(enumerate(LABELS)),
                        label2id={name: i for i, name in enumerate(LABELS)})
    return BertForSequenceClassification(config).eval()


def teacher_logits(data: Dataset) -> np.ndarray:
    """A teacher right on five texts in six, sure of itself."""
    answers = np.where(np.arange(len(data)) % 6 == 5, 1 - data.labels, data.labels)
    return np.eye(2, dtype=np.float32)[answers] * 4.0 - 2.0


def config() -> BuildConfig:
    return BuildConfig.preset(True, None).merged({"max_length": 16, "threads": 1,
                                                  "evaluation": {"bootstrap_samples": 10, "latency_runs": 5}})


def publish(home: Path, splits: Splits, tokenizer: Any, **options: Any) -> Any:
    teacher = tiny_bert(tokenizer, seed=1)

    def stage_teacher(staging: Path) -> dict[str, Any]:
        teacher.save_pretrained(str(staging / TEACHER_DIR), safe_serialization=True)
        return {"teacher_check": "staged"}

    fields = {"labels": list(LABELS), "max_length": 16, "source_data": {"train": {"texts": len(splits.train)}},
              "parent_version": None, "metrics": {"teacher_val_accuracy": 0.83}, "build": {"name": "unit"}}
    return publish_student(Registry(home), student=tiny_bert(tokenizer, seed=0), tokenizer=tokenizer, cfg=config(),
                           splits=splits, teacher_val=teacher_logits(splits.val),
                           teacher_test=teacher_logits(splits.test), fields=fields, stage_teacher=stage_teacher,
                           threads=1, started=0.0, **options)


def test_publish_student_publishes_a_bundle_that_loads_and_serves(tmp_path: Path, splits: Splits,
                                                                  tokenizer: Any) -> None:
    stages: dict[str, float] = {}
    judged: list[Candidate] = []

    def judge(candidate: Candidate) -> dict[str, Any]:
        judged.append(candidate)
        return {"gate": {"passed": True}}

    bundle = publish(tmp_path, splits, tokenizer, judge=judge, stages=stages)
    registry = Registry(tmp_path)
    assert registry.versions() == [bundle.version]
    assert registry.current_version() is None  # publishing is not promoting: the caller decides
    loaded = registry.load(bundle.version)  # every checksum verified
    assert not list(registry.root.glob(STAGING_PREFIX + "*"))
    files = set(loaded.manifest.files)
    for expected in (STUDENT_FILE, CALIBRATION_FILE, CURVE_FILE, f"{TOKENIZER_DIR}/tokenizer_config.json",
                     f"{STUDENT_FP32_DIR}/model.safetensors", f"{TEACHER_DIR}/model.safetensors"):
        assert expected in files
    manifest = loaded.manifest
    assert manifest.labels == list(LABELS) and manifest.build == {"name": "unit"}
    assert 0 < manifest.threshold <= 1 and manifest.temperatures.student > 0
    # The caller's metrics first, then the export check, the teacher's and the judge's.
    assert list(manifest.metrics) == ["teacher_val_accuracy", "quantization", "teacher_check", "gate"]
    assert manifest.metrics["quantization"]["texts_checked"] == len(splits.val)
    # The judge saw the int8 candidate as served, with its answers on test.
    assert len(judged) == 1 and judged[0].test_logits.shape == (len(splits.test), 2)
    runtime = StudentRuntime(loaded.student_path, loaded.tokenizer_dir, manifest.max_length, 1)
    np.testing.assert_allclose(runtime.logits(splits.test.texts), judged[0].test_logits, rtol=1e-5, atol=1e-5)
    report = json.loads((loaded.path / REPORT_FILE).read_text())
    assert report["evaluation"]["version"] == bundle.version
    assert report["evaluation"]["test_texts"] == len(splits.test)
    assert report["calibration"]["fitted_on"] == "val"
    assert set(report["stage_seconds"]) == {"export and int8", "evaluation"}
    assert report["build_seconds"] > 0


def test_a_refused_candidate_registers_nothing(tmp_path: Path, splits: Splits, tokenizer: Any) -> None:
    result = publish(tmp_path, splits, tokenizer, judge=lambda candidate: None)
    registry = Registry(tmp_path)
    assert result is None
    assert registry.versions() == [] and list(registry.root.iterdir()) == []


def test_a_failure_while_staging_leaves_no_half_bundle(tmp_path: Path, splits: Splits) -> None:
    def broken_teacher(staging: Path) -> dict[str, Any]:
        (staging / TEACHER_DIR).mkdir()
        (staging / TEACHER_DIR / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        publish_student(Registry(tmp_path), student=None, tokenizer=None, cfg=config(), splits=splits,
                        teacher_val=teacher_logits(splits.val), teacher_test=teacher_logits(splits.test),
                        fields={}, stage_teacher=broken_teacher, threads=1, started=0.0)
    registry = Registry(tmp_path)
    assert list(registry.root.iterdir()) == []
    with pytest.raises(BundleError):
        registry.load()
