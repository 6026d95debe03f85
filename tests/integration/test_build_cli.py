"""`cascade build` through the CLI in a subprocess: printed config, bad input, a non-BERT checkpoint teacher."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from distill.config import BuildConfig
from tests.conftest import run_cli
from tests.own_model_data import three_label_csv, tiny_config, tiny_distilbert_checkpoint
from tests.servers import free_port


@pytest.mark.integration  # runs the CLI in a subprocess
def test_print_config_shows_every_default_and_reads_back(tmp_path: Path) -> None:
    printed = run_cli("build", "--print-config", home=tmp_path).stdout
    assert BuildConfig.model_validate(yaml.safe_load(printed)) == BuildConfig()
    assert {"data", "teacher", "student", "distillation", "calibration", "evaluation", "seed"} <= set(
        yaml.safe_load(printed))
    flags = run_cli("build", "--tiny", "--print-config", "--data", "x.csv", "--labels", "b, a", home=tmp_path).stdout
    resolved = BuildConfig.model_validate(yaml.safe_load(flags))
    assert resolved.name == "tiny" and resolved.data.labels == ["b", "a"]
    assert resolved.data.path == (Path.cwd() / "x.csv").resolve()
    assert not (tmp_path / "registry").exists()


@pytest.mark.integration  # builds a bundle through the CLI
def test_a_non_bert_checkpoint_teacher_builds_a_bundle_with_a_minilm_student(tmp_path: Path, three_csv: Path) -> None:
    """A DistilBERT checkpoint (random weights: plumbing) whose label order is not the data's sorted order."""
    from bundle.registry import Registry
    from bundle.runtime import StudentRuntime
    from bundle.teachers import open_teacher, teacher_logits_sync

    order = ("positive", "negative", "neutral")
    checkpoint = tiny_distilbert_checkpoint(tmp_path / "ckpt", order)
    config = tiny_config(tmp_path / "build.yaml", three_csv, teacher={"kind": "checkpoint", "checkpoint": "ckpt"})
    run_cli("build", "--config", str(config), home=tmp_path / "home")
    bundle = Registry(tmp_path / "home").load()
    manifest = bundle.manifest
    assert tuple(manifest.labels) == order  # no --labels: the checkpoint's order, so its raw outputs need no mapping
    assert manifest.build["student_init"] == "minilm" and manifest.build["teacher"]["kind"] == "checkpoint"
    assert manifest.teacher.kind == "local" and (bundle.teacher_dir / "tokenizer.json").is_file()
    teacher_config = json.loads((bundle.teacher_dir / "config.json").read_text())
    student_config = json.loads((bundle.path / "student_fp32" / "config.json").read_text())
    assert teacher_config["model_type"] == "distilbert" and student_config["model_type"] == "bert"
    assert manifest.metrics["quantization"]["unpadded_texts_checked"] > 0
    texts = ["a dull, lifeless film", "a joy from start to finish"]
    student = StudentRuntime(bundle.student_path, bundle.tokenizer_dir, manifest.max_length).logits(texts)
    assert student.shape == (2, 3) and np.isfinite(student).all()
    client = open_teacher(manifest.teacher, bundle.path, manifest.labels)
    teacher = teacher_logits_sync(client, texts)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(checkpoint), use_safetensors=True).eval()
    batch = AutoTokenizer.from_pretrained(str(checkpoint))(texts, padding=True, return_tensors="pt")
    assert np.allclose(teacher, model(**batch).logits.detach().numpy(), atol=1e-4)
    report = json.loads((bundle.path / "report.json").read_text())
    assert report["evaluation"]["test_texts"] == manifest.source_data["test"]["texts"] == 3 * 6  # 10% of 60 each


def _registry_state(home: Path) -> tuple[list[str], str]:
    root = home / "registry"
    return sorted(p.name for p in root.iterdir()), (root / "current").read_text()


@pytest.fixture(scope="module")
def three_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return three_label_csv(tmp_path_factory.mktemp("data") / "three.csv")


def _bad_input(case: str, tmp: Path, three_csv: Path) -> tuple[list[str], str]:
    """The command line for one bad input and a regex the error line must match."""
    csv_file = tmp / "bad.csv"
    if case == "missing file":
        return ["--data", str(tmp / "absent.csv")], r"absent.csv: file not found"
    if case == "malformed row":
        csv_file.write_text("text,label\ngood film,pos\nbad film,neg,extra\n")
        return ["--data", str(csv_file)], r"bad.csv:3: 3 fields, the header has 2"
    if case == "unknown column":
        return ["--data", str(three_csv)], r"three.csv:2: no column 'text'"
    if case == "single label":
        csv_file.write_text("text,label\ngood film,pos\nfine film,pos\n")
        return ["--data", str(csv_file)], r"bad.csv: only one label \('pos'\)"
    if case == "too few examples":
        csv_file.write_text("text,label\n" + "".join(f"film {i},pos\n" for i in range(20)) + "a,neg\nb,neg\n")
        return ["--data", str(csv_file)], r"bad.csv: label 'neg' has 2 example\(s\)"
    if case == "checkpoint labels":
        checkpoint = tiny_distilbert_checkpoint(tmp / "ckpt", ("bad", "good", "meh"))
        config = tiny_config(tmp / "c.yaml", three_csv, teacher={"kind": "checkpoint", "checkpoint": str(checkpoint)})
        return ["--config", str(config)], (r"ckpt: the checkpoint's labels \['bad', 'good', 'meh'\] .* do not match "
                                           r"the data's labels \['negative', 'neutral', 'positive'\]")
    if case == "unreachable remote":
        url = f"http://127.0.0.1:{free_port()}"
        config = tiny_config(tmp / "r.yaml", three_csv, teacher={
            "kind": "remote", "remote": {"url": url, "model": "teacher", "timeout_s": 1, "retries": 0}})
        return ["--config", str(config)], rf"{url}: remote teacher unavailable"
    raise AssertionError(case)


@pytest.mark.integration  # the tiny bundle (a model build) and the CLI in a subprocess
@pytest.mark.parametrize("case", ["missing file", "malformed row", "unknown column", "single label", "too few examples",
                                  "checkpoint labels", "unreachable remote"])
def test_bad_input_fails_with_one_line_and_leaves_the_registry_as_it_was(
        case: str, tiny_home_copy: Path, tmp_path: Path, three_csv: Path) -> None:
    args, message = _bad_input(case, tmp_path, three_csv)
    before = _registry_state(tiny_home_copy)
    result = run_cli("build", *args, home=tiny_home_copy, check=False)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert re.search(message, errors[0]), errors[0]
    assert _registry_state(tiny_home_copy) == before  # no new version, no .staging-* folder, same current
