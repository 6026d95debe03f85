"""An MLServer runtime that answers a sequence classifier's raw logits as one FP32 ``[n, labels]`` tensor.

Runs inside MLServer's own venv (``.tools/mlserver-venv``), never imported by the tests themselves: it is
what a team's own inference server looks like when it serves a tensor instead of label/score lists, and it
exercises the remote teacher's ``output: tensor`` path against a real server.
"""

from __future__ import annotations

import torch
from mlserver import MLModel
from mlserver.codecs import NumpyCodec, StringCodec
from mlserver.types import InferenceRequest, InferenceResponse
from transformers import AutoModelForSequenceClassification, AutoTokenizer


class LogitsRuntime(MLModel):
    """Tokenize, run, return ``logits``; ``parameters.extra.max_length`` truncates as the bundle does."""

    async def load(self) -> bool:
        path = self.settings.parameters.uri
        extra = self.settings.parameters.extra or {}
        self.max_length = int(extra.get("max_length", 512))
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True).eval()
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        texts = StringCodec.decode_input(payload.inputs[0])
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        with torch.inference_mode():
            logits = self.model(**batch).logits.float().numpy()
        return InferenceResponse(model_name=self.name, outputs=[NumpyCodec.encode_output("logits", logits)])
