"""Static int8 (constant activation scales): a padded batch gives each text its one-text answer, so the student
may batch; dynamic int8 does not, and runs one text at a time. A tiny random BERT built in-process: no weights
are downloaded, no process is started."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from bundle.runtime import StudentRuntime
from distill import train
from distill.export import (
    PADDED_TOLERANCE,
    build_student_onnx,
    export_fp32,
    quantize_student,
    uint8_scale,
)

# Mixed lengths, so that a padded batch pads most of its texts.
TEXTS = ["a gripping and funny film", "dull", "the cast is wonderful", "i wanted my two hours back",
         "an overlong, overwrought and utterly predictable melodrama that never finds its feet", "fine",
         "a warm, clever story", "nothing works here at all, not the plot, not the cast, not even the music",
         "bright and moving", "a tedious mess"]
MAX_LENGTH = 32


def _tiny_bert():
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.manual_seed(0)
    config = AutoConfig.for_model("bert", vocab_size=30528, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=128, num_labels=2, max_position_embeddings=128,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # a random head answers ~0.03: scale it so logits (and their errors) are of a real size
        model.classifier.weight.mul_(100.0)
    return model


@pytest.fixture(scope="module")
def students(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The same tiny student exported static and dynamic, and its tokenizer folder."""
    root = tmp_path_factory.mktemp("static-quant")
    model, tokenizer = _tiny_bert(), train.load_tokenizer(train.base_model_dir())
    tokenizer.save_pretrained(str(root / "tokenizer"))
    made: dict[str, object] = {"root": root, "model": model, "tokenizer_dir": root / "tokenizer"}
    for mode in ("static", "dynamic"):
        made[mode] = build_student_onnx(model, tokenizer, TEXTS, MAX_LENGTH, root / f"{mode}.onnx",
                                        quantization=mode, calibration_texts=TEXTS * 3)
    return made


def _runtime(students: dict[str, object], mode: str, **kwargs) -> StudentRuntime:
    root = students["root"]
    assert isinstance(root, Path)
    return StudentRuntime(root / f"{mode}.onnx", students["tokenizer_dir"], MAX_LENGTH, **kwargs)


def _alone(runtime: StudentRuntime, texts: list[str]) -> np.ndarray:
    return np.concatenate([runtime.logits([text]) for text in texts])


def test_static_student_answers_a_padded_batch_as_each_text_alone(students: dict[str, object]) -> None:
    runtime = _runtime(students, "static")
    assert runtime.padded and runtime.quantization == "static"
    alone = _alone(runtime, TEXTS)
    assert np.abs(alone).max() > 0.5  # logits of a real size, so a tolerance of 1e-3 means something
    np.testing.assert_allclose(runtime.logits(TEXTS), alone, atol=PADDED_TOLERANCE, rtol=0)
    # Other neighbours and other runs (3 texts per session.run) change nothing either, and order is kept.
    np.testing.assert_allclose(runtime.logits(TEXTS[::-1]), alone[::-1], atol=PADDED_TOLERANCE, rtol=0)
    small_runs = _runtime(students, "static", batch_size=3)
    np.testing.assert_allclose(small_runs.logits(TEXTS), alone, atol=PADDED_TOLERANCE, rtol=0)
    assert runtime.logits([]).shape[0] == 0


def test_a_dynamic_student_would_fail_the_check_so_it_runs_one_text_at_a_time(students: dict[str, object]) -> None:
    runtime = _runtime(students, "dynamic")
    assert not runtime.padded and runtime.quantization == "dynamic"
    alone = _alone(runtime, TEXTS)
    np.testing.assert_array_equal(runtime.logits(TEXTS), alone)  # unpadded: the batch is one text per call
    # Forced to pad, its activation scales follow the whole batch and the answers move past the tolerance.
    forced = _runtime(students, "dynamic", padded=True).logits(TEXTS)
    assert np.abs(forced - alone).max() > PADDED_TOLERANCE


def test_the_export_records_the_mode_and_the_padded_check(students: dict[str, object]) -> None:
    static, dynamic = students["static"], students["dynamic"]
    assert isinstance(static, dict) and isinstance(dynamic, dict)
    assert static["mode"] == "static" and static["padded_batches"] is True
    assert static["static_scales"] > 0 and static["calibration_texts"] == 3 * len(TEXTS)
    assert static["padded_vs_unpadded_max_abs_diff"] <= PADDED_TOLERANCE
    assert static["padded_vs_unpadded_label_flips"] == 0
    assert dynamic["mode"] == "dynamic" and dynamic["padded_batches"] is False
    assert dynamic["padded_vs_unpadded_max_abs_diff"] > PADDED_TOLERANCE
    # Both stay int8 and close to the fp32 graph; static keeps dynamic's integer kernels, with constant scales.
    for result in (static, dynamic):
        assert result["int8_bytes"] < result["fp32_bytes"] / 2
        assert result["int8_vs_fp32_label_agreement"] >= 0.9
    root = students["root"]
    assert isinstance(root, Path)
    ops = {node.op_type for node in onnx.load(str(root / "static.onnx")).graph.node}
    assert "DynamicQuantizeLinear" not in ops and {"QuantizeLinear", "MatMulInteger", "QAttention"} <= ops
    meta = {p.key: p.value for p in onnx.load(str(root / "static.onnx")).metadata_props}
    assert (meta[StudentRuntime.MODE_KEY], meta[StudentRuntime.PADDED_KEY]) == ("static", "true")


def test_the_classification_head_stays_fp32(students: dict[str, object]) -> None:
    root = students["root"]
    assert isinstance(root, Path)
    for mode in ("static", "dynamic"):
        graph = onnx.load(str(root / f"{mode}.onnx")).graph
        head = [n.op_type for n in graph.node if "classifier" in n.name or "pooler/dense" in n.name]
        assert head and "MatMulInteger" not in head, (mode, head)


def test_runs_are_length_sorted_and_cut_by_texts_tokens_and_padding() -> None:
    from types import SimpleNamespace

    def runs(lengths: list[int], **limits: float) -> list[list[int]]:
        settings = {"batch_size": 32, "max_tokens": 256, "max_padding": 0.1} | limits
        return StudentRuntime.runs(SimpleNamespace(**settings), lengths)

    lengths = [12, 10, 40, 10, 11, 41, 12]
    # 10,10,11 | 12,12 (a 12 on 10,10,11 would make 5 of 48 tokens padding, over 10%) | 40,41
    assert runs(lengths) == [[1, 3, 4], [0, 6], [2, 5]]
    assert runs(lengths, max_padding=1.0, max_tokens=100) == [[1, 3, 4, 0, 6], [2, 5]]  # 7 x 41 > 100
    assert runs(lengths, batch_size=2, max_padding=1.0) == [[1, 3], [4, 0], [6, 2], [5]]
    assert runs(lengths, max_padding=0.0) == [[1, 3], [4], [0, 6], [2], [5]]
    assert runs([70], max_tokens=64) == [[0]] and runs([]) == []
    assert sorted(i for run in runs(lengths) for i in run) == list(range(len(lengths)))


def test_a_model_without_the_mark_runs_one_text_at_a_time(students: dict[str, object], tmp_path: Path) -> None:
    path = export_fp32(students["model"], tmp_path / "plain.onnx", MAX_LENGTH)
    runtime = StudentRuntime(path, students["tokenizer_dir"], MAX_LENGTH)
    assert not runtime.padded and runtime.quantization is None
    assert runtime.logits(TEXTS).shape == (len(TEXTS), 2)


def test_frozen_scales_are_the_ones_dynamic_quantization_computes() -> None:
    import onnxruntime as ort

    node = onnx.helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "scale", "zero_point"])
    graph = onnx.helper.make_graph(
        [node], "dql", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None])],
        [onnx.helper.make_tensor_value_info("scale", onnx.TensorProto.FLOAT, []),
         onnx.helper.make_tensor_value_info("zero_point", onnx.TensorProto.UINT8, [])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for x in (np.array([-3.0, 0.5, 7.25]), np.array([0.2, 4.0]), np.array([-5.0, -1.0]), np.zeros(3)):
        scale, zero_point = sess.run(None, {"x": x.astype(np.float32)})
        ours = uint8_scale(float(x.min()), float(x.max()))
        if x.any():  # all zeros: ONNX Runtime's scale is 0; ours is 1 (any scale quantizes 0 exactly)
            assert ours[0] == pytest.approx(float(scale), rel=1e-6)
        assert ours[1] == zero_point


def test_an_unknown_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown quantization mode 'qdq'"):
        quantize_student(tmp_path / "in.onnx", tmp_path / "out.onnx", "qdq", [])
