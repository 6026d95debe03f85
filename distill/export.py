"""ONNX export of the student (transformer graph fusion, int8 dynamic quantization) and of the teacher (fp32)."""

from __future__ import annotations

import copy
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from transformers import PreTrainedModel

ONNX_INPUTS = ("input_ids", "attention_mask")
ONNX_OUTPUT = "logits"
OPSET = 17


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
    """Dynamic int8 quantization of weights (MatMul, Attention and the embedding Gather)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Fused contrib ops (com.microsoft) defeat ONNX shape inference; their outputs are float.
    # Per-channel weight scales, and the small classification head kept in fp32: per-tensor scales
    # and a quantized head moved logits by up to 1.6 and flipped 5% of labels on the full student.
    head = [node.name for node in onnx.load(str(fp32_path), load_external_data=False).graph.node
            if "classifier" in node.name or "pooler" in node.name]
    quantize_dynamic(
        str(fp32_path),
        str(int8_path),
        weight_type=QuantType.QInt8,
        per_channel=True,
        nodes_to_exclude=head,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    return int8_path


def session(path: Path, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_logits(sess: ort.InferenceSession, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    return sess.run([ONNX_OUTPUT], {"input_ids": input_ids, "attention_mask": attention_mask})[0]


def build_student_onnx(model: PreTrainedModel, tokenizer, check_texts: list[str], max_length: int,
                       out_path: Path) -> dict[str, float]:
    """Export, fuse, quantize, and compare int8 logits with the fp32 graph and with PyTorch.

    Returns the comparison, which goes into the manifest: a quantization that changed many answers
    would show here before it shows in accuracy.
    """
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_fp32(model, Path(tmp) / "student.fp32.onnx", max_length)
        fuse_transformer_graph(fp32, model)
        quantize_int8(fp32, out_path)
        batch = tokenizer(check_texts, padding=True, truncation=True, max_length=max_length, return_tensors="np")
        ids = batch["input_ids"].astype(np.int64)
        mask = batch["attention_mask"].astype(np.int64)
        fp32_logits = run_logits(session(fp32), ids, mask)
        fp32_size = fp32.stat().st_size
    int8 = session(out_path)
    int8_logits = run_logits(int8, ids, mask)
    with torch.inference_mode():
        torch_logits = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    unpadded = unpadded_comparison(model, tokenizer, int8, check_texts[:64], max_length)
    return unpadded | {
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
