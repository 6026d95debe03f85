"""The teacher a bundle names (``Manifest.teacher``): plain settings, so the registry can hold them without
importing any client code. The clients are in ``bundle.teachers``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class RemoteTeacherSettings(BaseModel):
    """The ``remote`` teacher: a model on an Open Inference Protocol v2 REST server."""

    url: str = Field(description="Server base URL, e.g. http://127.0.0.1:8080.")
    model: str = Field(description="Model name on that server.")
    output: Literal["tensor", "labels"] = Field(
        "tensor", description="tensor: an FP32 [n, labels] output. labels: per-text label/score lists, which is "
        "what Hugging Face text-classification runtimes (mlserver-huggingface) answer; mapped by label name.")
    output_name: str | None = Field(None, description="Which output to read (default: the first).")
    scores: Literal["logits", "probabilities"] = Field("logits", description="What a `tensor` output holds.")
    input_name: str = Field("text", description="Name of the BYTES input tensor of texts (mlserver-huggingface: "
                            "`array_inputs`, which its runtime passes to the pipeline as one list).")
    extra_inputs: list[dict[str, Any]] = Field(default_factory=list, description="Further OIP input tensors sent "
                                               "as they are with every call, e.g. mlserver-huggingface's {name: "
                                               "top_k, datatype: INT32, shape: [1], data: [<labels>]} so it "
                                               "answers every label's score, not just the top one.")
    label_names: list[str] | None = Field(None, description="The server's label order for `tensor` "
                                          "(default: the bundle's labels, in order).")
    timeout_s: float = Field(5.0, gt=0.0, description="Per HTTP call.")
    batch_size: int = Field(16, ge=1, description="Texts per HTTP call.")
    max_concurrency: int = Field(4, ge=1, description="HTTP calls in flight (also the connection pool size).")
    retries: int = Field(2, ge=0, description="Retries of a failed call, with exponential backoff.")
    breaker_failures: int = Field(5, ge=1, description="Consecutive failed calls that open the circuit breaker.")
    breaker_reset_s: float = Field(5.0, gt=0.0, description="Open time before one probe call may try again.")


class TeacherSpec(BaseModel):
    """Which teacher a bundle uses (``Manifest.teacher``)."""

    kind: Literal["local", "remote"] = Field("local", description="local: weights in the bundle's teacher/ folder; "
                                             "remote: an inference server (the bundle holds no teacher weights).")
    remote: RemoteTeacherSettings | None = None

    def model_post_init(self, context: Any) -> None:
        if self.kind == "remote" and self.remote is None:
            raise ValueError("teacher kind `remote` needs a `remote` section (url and model)")
