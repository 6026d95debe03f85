"""Model runtimes: the int8 student on ONNX Runtime, and the teacher on ONNX Runtime (fp32) or PyTorch.

The ONNX runtimes import neither torch nor transformers: the ingress replica (and a teacher replica on
ONNX Runtime) stays small and starts fast. All return raw logits; routing turns them into calibrated
probabilities.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer


class StudentRuntime:
    """Fast tokenizer (Rust) + ONNX Runtime session on the quantized student.

    Each text runs on its own, unpadded. Dynamic int8 quantization scales activations by the range
    of the whole input tensor, so in a padded batch one text's answer would depend on the others
    (labels flipped near the threshold). Short texts padded to the longest in a batch also spend
    compute on padding, which batching on this CPU did not win back in an ad hoc timing.
    """

    def __init__(self, onnx_path: Path, tokenizer_dir: Path, max_length: int, threads: int = 1) -> None:
        self.threads = threads
        self.tokenizer = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length)
        self.tokenizer.no_padding()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

    def logits(self, texts: list[str]) -> np.ndarray:
        rows = []
        for encoding in self.tokenizer.encode_batch(texts):
            ids = np.asarray([encoding.ids], dtype=np.int64)
            rows.append(self.session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0][0])
        return np.stack(rows) if rows else np.zeros((0, 0), dtype=np.float32)


TEACHER_ONNX_FILE = "model.onnx"  # inside the bundle's teacher/ folder, exported fp32 by the build


class OnnxTeacherRuntime:
    """The teacher's fp32 ONNX export on ONNX Runtime: padded batches of similar-length texts.

    fp32 with an attention mask gives each text the same answer whatever its neighbours (unlike the dynamic
    int8 student), so a deferred batch can be padded. On this 2-core CPU it answered a text in a fraction
    of PyTorch eager's time (docs/results.md).
    """

    def __init__(self, onnx_path: Path, tokenizer_dir: Path, max_length: int, threads: int = 1,
                 pad_id: int = 0) -> None:
        self.tokenizer = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length)
        self.tokenizer.no_padding()
        self.pad_id = pad_id
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

    def logits(self, texts: list[str]) -> np.ndarray:
        encodings = self.tokenizer.encode_batch(texts)
        width = max((len(e.ids) for e in encodings), default=0)
        ids = np.full((len(texts), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(texts), width), dtype=np.int64)
        for row, encoding in enumerate(encodings):
            ids[row, : len(encoding.ids)] = encoding.ids
            mask[row, : len(encoding.ids)] = 1
        return self.session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]


class TeacherRuntime:
    """The teacher as its users run it: transformers, PyTorch fp32, inference mode."""

    def __init__(self, model_dir: Path, tokenizer_dir: Path, max_length: int, threads: int = 1,
                 device: str = "cpu") -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        torch.set_num_threads(threads)
        self._torch = torch
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            str(model_dir), local_files_only=True, use_safetensors=True
        ).eval().to(device)
        self.device = device

    def logits(self, texts: list[str]) -> np.ndarray:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        with self._torch.inference_mode():
            return self.model(**batch).logits.float().cpu().numpy()
