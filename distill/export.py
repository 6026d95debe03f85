"""ONNX export of the student (transformer graph fusion, int8 quantization) and of the teacher (fp32).

The student's int8 comes in two modes (``QUANTIZATION_MODES``):

- ``static`` (the default): ONNX Runtime's dynamic int8 graph (integer MatMul, QAttention, int8 embedding table),
  with each ``DynamicQuantizeLinear`` replaced by a ``QuantizeLinear`` whose scale and zero point are constants
  calibrated on the build's texts (the activation range each one saw over padded batches, real tokens only). A
  text's answer then no longer depends on the other texts of a padded batch, so StudentRuntime may batch.
- ``dynamic``: the activation scales are computed per call from the whole input tensor, so in a padded batch one
  text's answer depends on its neighbours: StudentRuntime runs such a student one text at a time, unpadded.

On the default bundle's student (v20261206-232201; 2,114 val and test texts) static int8 agreed with the fp32
student on 98.1-98.4% of labels as calibration varied, dynamic on 98.3%; static answered padded batches of 32
exactly as one text at a time (1,057 test texts), dynamic flipped 17-21 of their labels.
The mode and the padded-batch check are written into the model's metadata (``StudentRuntime.PADDED_KEY``) and
into what ``build_student_onnx`` returns (the manifest's ``metrics.quantization``).
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from transformers import PreTrainedModel

from bundle.runtime import StudentRuntime

ONNX_INPUTS = ("input_ids", "attention_mask")
ONNX_OUTPUT = "logits"
OPSET = 17

QUANTIZATION_MODES = ("static", "dynamic")
DEFAULT_QUANTIZATION = "static"
CALIBRATION_BATCH = 32  # texts per padded calibration batch
# A padded batch must give each text its one-text logits to this (absolute) tolerance before the export marks the
# student safe to batch; static int8 gave bit-identical logits on the default student.
PADDED_TOLERANCE = 1e-3
PADDED_CHECK_TEXTS = 64


class _LogitsOnly(torch.nn.Module):
    """Wraps an HF classifier so the graph has exactly two int64 inputs and one ``logits`` output."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def export_fp32(model: PreTrainedModel, path: Path, max_length: int) -> Path:
    """Export with dynamic ``[batch, seq]`` axes.

    Traced with eager attention and a padded sample: with SDPA and an all-ones mask, transformers
    skips the mask entirely and the traced graph would ignore padding.
    """
    model = copy.deepcopy(model).eval()
    model.set_attn_implementation("eager")
    seq = min(8, max_length)
    mask = torch.ones((2, seq), dtype=torch.int64)
    mask[1, seq // 2 :] = 0
    sample = {"input_ids": torch.full((2, seq), 1000, dtype=torch.int64), "attention_mask": mask}
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
            ONNX_OUTPUT: {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _LogitsOnly(model),
            (sample["input_ids"], sample["attention_mask"]),
            str(path),
            input_names=list(ONNX_INPUTS),
            output_names=[ONNX_OUTPUT],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )
    return path


# Student families this export supports -> ONNX Runtime optimizer model_type. Every student the build
# makes is a BERT encoder (the teacher's own layers or MiniLM's); another family must add its fusion here.
FUSION_MODEL_TYPES = {"bert": "bert"}


def fuse_transformer_graph(path: Path, model: PreTrainedModel) -> Path:
    """Fuse attention / layer-norm / GELU subgraphs with the ONNX Runtime optimizer of the model's family."""
    from onnxruntime.transformers.optimizer import optimize_model

    family = model.config.model_type
    if family not in FUSION_MODEL_TYPES:
        raise ValueError(f"no graph fusion for student family {family!r} (supported: {sorted(FUSION_MODEL_TYPES)})")
    optimized = optimize_model(
        str(path),
        model_type=FUSION_MODEL_TYPES[family],
        num_heads=model.config.num_attention_heads,
        hidden_size=model.config.hidden_size,
        opt_level=0,
    )
    optimized.save_model_to_file(str(path))
    return path


def quantize_int8(fp32_path: Path, int8_path: Path) -> Path:
    """Dynamic int8 quantization of weights (MatMul, Attention and the embedding table)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Fused contrib ops (com.microsoft) defeat ONNX shape inference; their outputs are float.
    # Per-channel weight scales, and the small classification head kept in fp32: per-tensor scales
    # and a quantized head moved logits by up to 1.6 and flipped 5% of labels on the full student.
    # quantize_dynamic turns each Gemm into '<name>_MatMul' + '<name>_Add' before it reads the exclusions, so
    # both names are excluded (with the Gemm name alone the head was quantized after all).
    head = [node.name for node in onnx.load(str(fp32_path), load_external_data=False).graph.node
            if "classifier" in node.name or "pooler" in node.name]
    quantize_dynamic(
        str(fp32_path),
        str(int8_path),
        weight_type=QuantType.QInt8,
        per_channel=True,
        nodes_to_exclude=head + [f"{name}_MatMul" for name in head],
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    return int8_path


Batch = tuple[np.ndarray, np.ndarray]  # input_ids, attention_mask (int64, padded to the batch's longest text)


def calibration_batches(tokenizer, texts: list[str], max_length: int, batch_size: int = CALIBRATION_BATCH,
                        ) -> list[Batch]:
    """Padded batches of ``texts`` with their attention masks, as StudentRuntime sends them."""
    batches = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                          return_tensors="np")
        batches.append((batch["input_ids"].astype(np.int64), batch["attention_mask"].astype(np.int64)))
    return batches


def activation_ranges(model, tensors: list[str], batches: list[Batch]) -> dict[str, tuple[float, float]]:
    """The smallest and largest value each float tensor of ``model`` (an onnx ModelProto) takes over ``batches``.

    A ``[batch, seq, ...]`` tensor counts real tokens only: padding is masked out of every answer, so its
    activations need no room in a scale (where they fall outside, they saturate harmlessly).
    """
    import onnx

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                              for name in tensors)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    sess = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    low = dict.fromkeys(tensors, np.inf)
    high = dict.fromkeys(tensors, -np.inf)
    for ids, mask in batches:
        for name, value in zip(tensors, sess.run(tensors, {"input_ids": ids, "attention_mask": mask}), strict=True):
            if value.ndim == 3 and value.shape[:2] == mask.shape:
                value = value[mask.astype(bool)]
            if value.size:
                low[name] = min(low[name], float(value.min()))
                high[name] = max(high[name], float(value.max()))
    return {name: (low[name], high[name]) for name in tensors}


def uint8_scale(low: float, high: float) -> tuple[np.float32, np.uint8]:
    """Scale and zero point of an asymmetric uint8 range holding 0, as DynamicQuantizeLinear computes them."""
    low, high = min(0.0, low), max(0.0, high)
    scale = (high - low) / 255.0 if high > low else 1.0
    return np.float32(scale), np.uint8(np.clip(np.round(-low / scale), 0, 255))


def freeze_activation_scales(dynamic_path: Path, out_path: Path, batches: list[Batch]) -> int:
    """Static int8 from the dynamic graph: each ``DynamicQuantizeLinear`` becomes a ``QuantizeLinear`` with the
    constant scale and zero point of the range its input took over ``batches``. The integer kernels (MatMulInteger,
    QAttention) and the weights stay as they were. Returns how many scales were frozen."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(dynamic_path))
    dynamic = [node for node in model.graph.node if node.op_type == "DynamicQuantizeLinear"]
    if not batches:
        raise ValueError("static quantization needs calibration texts")
    ranges = activation_ranges(model, [node.input[0] for node in dynamic], batches)
    constants: dict[str, str] = {}  # the dynamic scale / zero-point outputs -> their frozen initializers
    for node in dynamic:
        source = node.input[0]
        scale, zero_point = uint8_scale(*ranges[source])
        scale_name, zero_name = f"{source}_static_scale", f"{source}_static_zero_point"
        model.graph.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), scale_name),
                                        numpy_helper.from_array(np.array(zero_point, np.uint8), zero_name)])
        quantized, dynamic_scale, dynamic_zero = node.output
        constants |= {dynamic_scale: scale_name, dynamic_zero: zero_name}
        frozen = onnx.helper.make_node("QuantizeLinear", [source, scale_name, zero_name], [quantized],
                                       name=f"{node.name}_static")
        node.CopyFrom(frozen)
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in constants:
                node.input[i] = constants[name]
    onnx.save(model, str(out_path))
    return len(dynamic)


def quantize_student(fp32_path: Path, int8_path: Path, mode: str, batches: list[Batch]) -> dict[str, Any]:
    """int8 of the fused fp32 student in ``mode`` (``QUANTIZATION_MODES``); returns what was done."""
    if mode not in QUANTIZATION_MODES:
        raise ValueError(f"unknown quantization mode {mode!r} (known: {', '.join(QUANTIZATION_MODES)})")
    if mode == "dynamic":
        quantize_int8(fp32_path, int8_path)
        return {"mode": mode}
    dynamic = int8_path.with_name(int8_path.stem + ".dynamic.onnx")
    try:
        quantize_int8(fp32_path, dynamic)
        frozen = freeze_activation_scales(dynamic, int8_path, batches)
    finally:
        dynamic.unlink(missing_ok=True)
    return {"mode": mode, "static_scales": frozen, "calibration_texts": int(sum(len(ids) for ids, _ in batches))}


def padded_comparison(sess: ort.InferenceSession, tokenizer, texts: list[str], max_length: int,
                      batch_size: int = CALIBRATION_BATCH) -> dict[str, float]:
    """Padded batches of ``texts`` (in their given order, so lengths mix) against each text alone, unpadded."""
    padded = np.concatenate([run_logits(sess, ids, mask)
                             for ids, mask in calibration_batches(tokenizer, texts, max_length, batch_size)])
    alone = np.stack([run_logits(sess, ids, np.ones_like(ids))[0]
                      for ids in (np.asarray([tokenizer(t, truncation=True, max_length=max_length)["input_ids"]],
                                             dtype=np.int64) for t in texts)])
    return {
        "padded_texts_checked": len(texts),
        "padded_vs_unpadded_max_abs_diff": float(np.abs(padded - alone).max()),
        "padded_vs_unpadded_label_flips": int((padded.argmax(-1) != alone.argmax(-1)).sum()),
    }


def mark_student(path: Path, mode: str, padded_batches: bool) -> None:
    """Write the quantization mode and whether padded batches are safe into the model's metadata."""
    import onnx

    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    onnx.helper.set_model_props(model, props | {StudentRuntime.MODE_KEY: mode,
                                                StudentRuntime.PADDED_KEY: "true" if padded_batches else "false"})
    onnx.save(model, str(path))


def session(path: Path, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_logits(sess: ort.InferenceSession, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    return sess.run([ONNX_OUTPUT], {"input_ids": input_ids, "attention_mask": attention_mask})[0]


def build_student_onnx(model: PreTrainedModel, tokenizer, check_texts: list[str], max_length: int,
                       out_path: Path, quantization: str = DEFAULT_QUANTIZATION,
                       calibration_texts: list[str] | None = None) -> dict[str, Any]:
    """Export, fuse, quantize (``quantization``: ``QUANTIZATION_MODES``), and compare int8 logits with the fp32
    graph and with PyTorch; static scales are calibrated on ``calibration_texts`` (default ``check_texts``).

    Returns the comparison, which goes into the manifest: a quantization that changed many answers
    would show here before it shows in accuracy. ``mode`` and ``padded_batches`` say how the student was
    quantized and whether a padded batch gave every checked text its one-text answer (written into the model's
    metadata too: StudentRuntime batches padded only then).
    """
    model.eval()
    calibration = calibration_texts if calibration_texts is not None else check_texts
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_fp32(model, Path(tmp) / "student.fp32.onnx", max_length)
        fuse_transformer_graph(fp32, model)
        done = quantize_student(fp32, out_path, quantization,
                                calibration_batches(tokenizer, calibration, max_length)
                                if quantization == "static" else [])
        batch = tokenizer(check_texts, padding=True, truncation=True, max_length=max_length, return_tensors="np")
        ids = batch["input_ids"].astype(np.int64)
        mask = batch["attention_mask"].astype(np.int64)
        fp32_logits = run_logits(session(fp32), ids, mask)
        fp32_size = fp32.stat().st_size
    int8 = session(out_path)
    padded = padded_comparison(int8, tokenizer, check_texts[:PADDED_CHECK_TEXTS], max_length)
    safe = quantization == "static" and padded["padded_vs_unpadded_max_abs_diff"] <= PADDED_TOLERANCE
    mark_student(out_path, quantization, safe)
    int8_logits = run_logits(int8, ids, mask)
    with torch.inference_mode():
        torch_logits = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    unpadded = unpadded_comparison(model, tokenizer, int8, check_texts[:64], max_length)
    return done | {"padded_batches": safe} | padded | unpadded | {
        "texts_checked": len(check_texts),
        "fp32_vs_torch_max_abs_diff": float(np.abs(fp32_logits - torch_logits).max()),
        "int8_vs_fp32_max_abs_diff": float(np.abs(int8_logits - fp32_logits).max()),
        "int8_vs_fp32_mean_abs_diff": float(np.abs(int8_logits - fp32_logits).mean()),
        "int8_vs_fp32_label_agreement": float((int8_logits.argmax(-1) == fp32_logits.argmax(-1)).mean()),
        "fp32_bytes": fp32_size,
        "int8_bytes": out_path.stat().st_size,
    }


def unpadded_comparison(model: PreTrainedModel, tokenizer, int8: ort.InferenceSession, texts: list[str],
                        max_length: int) -> dict[str, float]:
    """int8 against PyTorch one text at a time, unpadded: the path serving runs (StudentRuntime)."""
    int8_rows, torch_rows = [], []
    for text in texts:
        ids = np.asarray([tokenizer(text, truncation=True, max_length=max_length)["input_ids"]], dtype=np.int64)
        mask = np.ones_like(ids)
        int8_rows.append(run_logits(int8, ids, mask)[0])
        with torch.inference_mode():
            torch_rows.append(model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits[0]
                              .numpy())
    int8_logits, torch_logits = np.stack(int8_rows), np.stack(torch_rows)
    return {
        "unpadded_texts_checked": len(texts),
        "unpadded_int8_vs_torch_max_abs_diff": float(np.abs(int8_logits - torch_logits).max()),
        "unpadded_int8_vs_torch_label_agreement": float((int8_logits.argmax(-1) == torch_logits.argmax(-1)).mean()),
    }


def build_teacher_onnx(model: PreTrainedModel, tokenizer, check_texts: list[str], max_length: int,
                       out_path: Path) -> dict[str, float]:
    """The teacher in fp32 ONNX, for ONNX Runtime serving and for timing both models in one runtime;
    returns how far its logits are from PyTorch's on ``check_texts`` (padded, as the teacher is served)."""
    model.eval()
    export_fp32(model, out_path, max_length)
    batch = tokenizer(check_texts, padding=True, truncation=True, max_length=max_length, return_tensors="np")
    ids, mask = batch["input_ids"].astype(np.int64), batch["attention_mask"].astype(np.int64)
    onnx_logits = run_logits(session(out_path, threads=2), ids, mask)
    with torch.inference_mode():
        torch_logits = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    return {
        "texts_checked": len(check_texts),
        "onnx_vs_torch_max_abs_diff": float(np.abs(onnx_logits - torch_logits).max()),
        "onnx_vs_torch_label_agreement": float((onnx_logits.argmax(-1) == torch_logits.argmax(-1)).mean()),
        "onnx_bytes": out_path.stat().st_size,
    }
