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

    A statically quantized student (activation scales are constants; the export writes ``PADDED_KEY = "true"``
    into the model's metadata once a padded batch gave each checked text its one-text answer) runs a list of
    texts as padded batches, one ``session.run`` each: sorted by length, then cut greedily into runs, each padded
    to its longest text with an attention mask. A run ends before a text that would take it over ``max_tokens``
    padded tokens, over ``max_padding`` of them padding, or over ``batch_size`` texts: padding costs as much as
    text, and the fixed cost a run saves is small (in ad hoc CPU-time timings of calls of 32 mixed texts on the
    2-core machine under load, these runs used about 12% less CPU per text than one text per run; runs of 8
    padded to their longest saved nothing, and one run padded to the longest of 8 random texts cost more).
    ``python -m loadtests.model_only`` measures it.

    Any other student (dynamic int8, which scales activations by the range of the whole input tensor, so that
    in a padded batch one text's answer would depend on the others; or a model without the mark) runs each
    text on its own, unpadded. ``padded`` overrides the model's mark (tests and measurements only: forcing it
    on a dynamic student changes answers).
    """

    MODE_KEY = "cascade.quantization"  # model metadata: "static" or "dynamic" (distill/export.py)
    PADDED_KEY = "cascade.padded_batches"  # model metadata: "true" when padded batches keep every text's answer

    def __init__(self, onnx_path: Path, tokenizer_dir: Path, max_length: int, threads: int = 1,
                 padded: bool | None = None, batch_size: int = 32, max_tokens: int = 256,
                 max_padding: float = 0.1) -> None:
        self.threads = threads
        self.batch_size = max(1, batch_size)
        self.max_tokens = max_tokens
        self.max_padding = max_padding
        self.tokenizer = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length)
        self.tokenizer.no_padding()
        self.pad_id = self.tokenizer.token_to_id("[PAD]") or 0  # masked out: any id gives the same answers
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        metadata = self.session.get_modelmeta().custom_metadata_map
        self.quantization = metadata.get(self.MODE_KEY)  # None: exported before the mark existed
        self.padded = metadata.get(self.PADDED_KEY) == "true" if padded is None else padded

    def logits(self, texts: list[str]) -> np.ndarray:
        encodings = self.tokenizer.encode_batch(texts)
        if not encodings:
            return np.zeros((0, 0), dtype=np.float32)
        if not self.padded:
            rows = []
            for encoding in encodings:
                ids = np.asarray([encoding.ids], dtype=np.int64)
                rows.append(self.session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0][0])
            return np.stack(rows)
        out: np.ndarray | None = None
        for run in self.runs([len(encoding.ids) for encoding in encodings]):
            width = len(encodings[run[-1]].ids)
            ids = np.full((len(run), width), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(run), width), dtype=np.int64)
            for row, i in enumerate(run):
                ids[row, : len(encodings[i].ids)] = encodings[i].ids
                mask[row, : len(encodings[i].ids)] = 1
            logits = self.session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]
            if out is None:
                out = np.empty((len(encodings), logits.shape[1]), dtype=logits.dtype)
            out[run] = logits
        return out

    def runs(self, lengths: list[int]) -> list[list[int]]:
        """Indices of ``lengths`` in padded runs: sorted by length, a run ending before the text that would take
        it past ``max_tokens`` padded tokens, ``max_padding`` padding or ``batch_size`` texts."""
        runs: list[list[int]] = []
        run: list[int] = []
        tokens = 0
        for i in sorted(range(len(lengths)), key=lengths.__getitem__):
            padded = (len(run) + 1) * lengths[i]  # sorted: the new text is the run's longest
            if run and (len(run) >= self.batch_size or padded > self.max_tokens
                        or padded - tokens - lengths[i] > self.max_padding * padded):
                runs.append(run)
                run, tokens = [], 0
            run.append(i)
            tokens += lengths[i]
        return [*runs, run] if run else runs


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
