"""The tiny bundle made by the real pipeline: export, quantization, manifest, checksums, pointer."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from bundle.registry import BundleError, Registry
from bundle.runtime import StudentRuntime, TeacherRuntime
from distill.config import BuildConfig
from tests.conftest import run_cli

pytestmark = pytest.mark.integration  # the tiny bundle (a model build); several run the CLI in a subprocess


def test_bundle_layout_and_manifest(tiny_home: Path) -> None:
    bundle = Registry(tiny_home).load()
    for name in ("student.onnx", "teacher/model.safetensors", "teacher/config.json", "tokenizer/tokenizer.json",
                 "manifest.json", "report.json", "operating_curve.png", "calibration.npz"):
        assert (bundle.path / name).is_file(), name
    manifest = bundle.manifest
    assert manifest.labels == ["negative", "positive"]
    assert set(manifest.files) >= {"student.onnx", "teacher/model.safetensors", "tokenizer/tokenizer.json"}
    assert manifest.temperatures.student > 0 and 0.0 <= manifest.threshold <= 1.0
    assert manifest.source_data["train"]["texts"] == BuildConfig.preset(tiny=True).data.train_limit
    assert len(manifest.source_data["test"]["sha256"]) == 64
    assert not list(bundle.path.rglob("*.bin")) and not list(bundle.path.rglob("*.pt"))


def test_onnx_contract_and_int8_weights(tiny_home: Path) -> None:
    bundle = Registry(tiny_home).load()
    graph = onnx.load(str(bundle.student_path)).graph
    inputs = {i.name: i.type.tensor_type for i in graph.input}
    assert set(inputs) == {"input_ids", "attention_mask"}
    for tensor_type in inputs.values():
        assert tensor_type.elem_type == onnx.TensorProto.INT64
        assert [d.dim_param for d in tensor_type.shape.dim] == ["batch", "seq"]
    assert [o.name for o in graph.output] == ["logits"]
    quantization = bundle.manifest.metrics["quantization"]
    # static int8 (the default): constant activation scales, so padded batches keep each text's answer
    assert quantization["mode"] == "static" and quantization["padded_batches"] is True
    ops = {n.op_type for n in graph.node}
    assert {"MatMulInteger", "QuantizeLinear"} <= ops and "DynamicQuantizeLinear" not in ops
    assert quantization["fp32_vs_torch_max_abs_diff"] < 1e-3
    assert quantization["int8_vs_fp32_label_agreement"] >= 0.95
    assert quantization["int8_bytes"] < quantization["fp32_bytes"] / 3


def test_int8_student_tracks_the_fp32_teacher_runtime_shapes(tiny_home: Path) -> None:
    bundle = Registry(tiny_home).load()
    texts = ["a wonderful, moving film", "dull", "the plot is a mess and the acting is worse"]
    student = StudentRuntime(bundle.student_path, bundle.tokenizer_dir, bundle.manifest.max_length)
    teacher = TeacherRuntime(bundle.teacher_dir, bundle.tokenizer_dir, bundle.manifest.max_length)
    s_logits, t_logits = student.logits(texts), teacher.logits(texts)
    assert s_logits.shape == t_logits.shape == (3, 2)
    assert np.isfinite(s_logits).all()
    # batch results equal single-text results: padding is masked, not read
    single = np.concatenate([student.logits([t]) for t in texts])
    assert np.allclose(single, s_logits, atol=0.05)


def test_corrupted_file_is_refused(tiny_home_copy: Path) -> None:
    registry = Registry(tiny_home_copy)
    bundle = registry.load()
    data = bytearray(bundle.student_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bundle.student_path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"checksum mismatch for student\.onnx"):
        registry.load()
    result = run_cli("eval", home=tiny_home_copy, check=False)
    assert result.returncode == 1 and "checksum mismatch for student.onnx" in result.stderr


def test_missing_file_is_refused(tiny_home_copy: Path) -> None:
    registry = Registry(tiny_home_copy)
    (registry.load().path / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match=r"tokenizer/tokenizer\.json is missing"):
        registry.load()


def test_promote_and_rollback_switch_the_pointer(tiny_home_copy: Path) -> None:
    registry = Registry(tiny_home_copy)
    first = registry.current_version()
    assert first is not None
    import shutil
    second = "v-copy"
    shutil.copytree(registry.root / first, registry.root / second)
    manifest = json.loads((registry.root / second / "manifest.json").read_text())
    manifest["version"] = second
    (registry.root / second / "manifest.json").write_text(json.dumps(manifest))
    run_cli("promote", second, home=tiny_home_copy)
    assert registry.current_version() == second
    run_cli("rollback", home=tiny_home_copy)
    assert registry.current_version() == first
    assert run_cli("promote", "no-such-version", home=tiny_home_copy, check=False).returncode == 1


def test_calibrate_writes_the_threshold_for_serving(tiny_home_copy: Path) -> None:
    result = run_cli("calibrate", "--teacher-share", "0.2", home=tiny_home_copy)
    chosen = json.loads(result.stdout)
    assert chosen["val_teacher_share"] <= 0.2
    bundle = Registry(tiny_home_copy).load()  # checksums still hold after the manifest rewrite
    assert bundle.manifest.threshold == pytest.approx(chosen["threshold"])


def test_eval_prints_the_report_table(tiny_home_copy: Path) -> None:
    out = run_cli("eval", home=tiny_home_copy).stdout
    assert "teacher accuracy [95% CI]" in out and "student file / teacher weights" in out
    assert "speed-up vs ONNX Runtime fp32 teacher (p50)" in out and "speed-up vs PyTorch fp32 teacher (p50)" in out
    assert "macro-F1 TF-IDF / teacher / student / cascade" in out and "recall 'positive'" in out
    report = json.loads((Registry(tiny_home_copy).load().path / "report.json").read_text())
    evaluation = report["evaluation"]
    assert evaluation["test_texts"] == 160
    assert evaluation["teacher"]["ci_low"] <= evaluation["teacher"]["accuracy"] <= evaluation["teacher"]["ci_high"]
    assert evaluation["size_ratio"] < 1.0
    assert set(evaluation["teacher_runtimes"]) == {"onnx", "torch"}
    assert evaluation["teacher_bytes"] == sum(p.stat().st_size for p in
                                              (Registry(tiny_home_copy).load().teacher_dir).glob("*.safetensors"))
