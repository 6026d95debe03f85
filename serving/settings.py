"""Gateway settings: one typed model per concern, gathered in ``GatewayConfig``.

``GatewayConfig`` is the Serve ``user_config`` of the gateway deployment, so every field can be
changed in ``deploy/serve.yaml`` (or the Helm values) and applied without a restart.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from records.queue import QueueSettings, default_queue_url
from routing.confidence import ConfidenceMeasure
from routing.controller import ThresholdController


class ModelSettings(BaseModel):
    """Which bundle to serve."""

    home: str = Field(default_factory=lambda: os.environ.get("CASCADE_HOME", "models"),
                      description="Model home holding registry/ (default $CASCADE_HOME or ./models).")
    version: str | None = Field(None, description="Pinned registry version; None follows `current`.")
    poll_interval_s: float = Field(2.0, gt=0.0, description="How often a replica checks `current` for a "
                                   "promotion or rollback (then swaps without a restart).")


class ControllerSettings(BaseModel):
    """How far and how fast the gateway may move its threshold to hold ``routing.target_agreement``."""

    # The defaults are the controller's own (routing/controller.py): one source for both.
    min_threshold: float = Field(ThresholdController.min_threshold, ge=0.0, le=1.0,
                                 description="Lowest threshold it may serve.")
    max_threshold: float = Field(ThresholdController.max_threshold, ge=0.0, le=1.0,
                                 description="Highest threshold it may serve: the limit on what quality may cost in "
                                 "teacher calls.")
    max_step: float = Field(ThresholdController.max_step, gt=0.0, le=1.0,
                            description="Largest change per update: a run of estimates moves it, one noisy estimate "
                            "does not.")
    interval_s: float = Field(30.0, gt=0.0, description="Seconds between updates.")
    min_records: int = Field(ThresholdController.min_records, ge=1,
                             description="Recent teacher answers (shadow and fallback) needed before it moves at all.")

    @model_validator(mode="after")
    def _ordered(self) -> ControllerSettings:
        if self.min_threshold > self.max_threshold:
            raise ValueError(f"min_threshold {self.min_threshold} is above max_threshold {self.max_threshold}")
        return self


class RoutingSettings(BaseModel):
    """When the student defers to the teacher."""

    threshold: float | None = Field(None, ge=0.0, le=1.0, description="Overrides the bundle's threshold.")
    confidence_measure: ConfidenceMeasure | None = Field(None, description="Overrides the bundle's measure.")
    target_agreement: float | None = Field(None, gt=0.0, lt=1.0, description="Hold this agreement with the "
                                           "teacher on live traffic: each replica moves its threshold from its "
                                           "shadow and fallback answers (routing/controller.py), starting from "
                                           "the bundle's. Needs a shadow share above 0. None: the threshold is "
                                           "the bundle's (or `threshold`).")
    controller: ControllerSettings = Field(default_factory=ControllerSettings)

    @model_validator(mode="after")
    def _one_threshold_source(self) -> RoutingSettings:
        if self.threshold is not None and self.target_agreement is not None:
            raise ValueError("set routing.threshold (a fixed threshold) or routing.target_agreement (the gateway "
                             "moves it), not both")
        return self


class StudentSettings(BaseModel):
    """The int8 student inside the gateway replica (opportunistic batching, serving/batching.py)."""

    threads: int = Field(1, ge=1, description="ONNX Runtime intra-op threads per replica.")
    max_batch_size: int = Field(32, ge=1, description="Most texts one student batch takes. A static int8 student "
                                "runs them as padded, length-sorted runs (one ONNX Runtime call each); a dynamic "
                                "one runs each text unpadded.")
    batch_wait_timeout_s: float = Field(0.0, ge=0.0, description="How long a batch waits to fill. 0: take what is "
                                        "queued at once; under load the queue fills while the previous batch runs.")


class TeacherSettings(BaseModel):
    """Teacher protection: a slow, dead or busy teacher degrades answers, never fails them."""

    timeout_s: float = Field(2.0, gt=0.0, description="Longest wait for a teacher answer; past it the text is "
                             "answered by the student, degraded (teacher_timeout).")
    max_concurrency: int = Field(8, ge=0, description="Teacher calls in flight per gateway replica.")
    max_share: float = Field(0.5, ge=0.0, le=1.0, description="Largest share of auto-routed texts it may take. "
                             "Above the bundle's calibrated share (the default bundle sends about 35% of its test "
                             "texts), or ordinary traffic is degraded by the budget.")
    max_texts_per_s: float | None = Field(None, gt=0.0, description="Optional cap on texts per second.")
    budget_window_s: float = Field(10.0, gt=0.0, description="Sliding window over which max_share and "
                                   "max_texts_per_s are measured.")
    breaker_failures: int = Field(5, ge=1, description="Consecutive teacher failures or timeouts that open the "
                                  "circuit breaker; while open, deferred texts are answered degraded "
                                  "(`teacher_unavailable`) at once instead of waiting out `timeout_s`.")
    breaker_cooldown_s: float = Field(5.0, gt=0.0, description="How long the breaker stays open before one probe "
                                      "call is let through; its success closes the breaker.")


class TeacherBatchSettings(BaseModel):
    """Opportunistic batching in the teacher deployment (serving/batching.py), applied live."""

    max_batch_size: int = Field(16, ge=1, description="Most texts one teacher batch takes (padded batches).")
    batch_wait_timeout_s: float = Field(0.0, ge=0.0, description="How long a teacher batch waits to fill. 0: a "
                                        "lone deferred text starts at once; under load the next batch fills while "
                                        "the current one runs.")


class TeacherRuntimeSettings(BaseModel):
    """Where the teacher runs; its kind (local weights or a remote server) comes from the bundle's manifest."""

    device: Literal["cpu", "cuda", "auto"] = Field("cpu", description="A `local` teacher's device; `auto` takes "
                                                   "a GPU when PyTorch sees one. Give the Teacher deployment "
                                                   "`ray_actor_options.num_gpus` to place it on a GPU node.")
    remote_url: str | None = Field(None, description="A `remote` teacher's server URL, overriding the one the "
                                   "bundle recorded (the same server under this cluster's name).")
    engine: Literal["auto", "onnx", "torch"] = Field(
        "auto", description="A `local` teacher's runtime: `onnx` runs the bundle's fp32 ONNX export on ONNX "
        "Runtime (CPU), `torch` the safetensors weights on PyTorch; `auto` is ONNX Runtime on a CPU where the "
        "bundle has the export (faster there, so a deferred text waits less: docs/results.md), else PyTorch.")


class TeacherDeploymentConfig(BaseModel):
    """The teacher deployment's ``user_config``: which bundle's teacher, where it runs, and how it batches."""

    model: ModelSettings = Field(default_factory=ModelSettings)
    runtime: TeacherRuntimeSettings = Field(default_factory=TeacherRuntimeSettings)
    batch: TeacherBatchSettings = Field(default_factory=TeacherBatchSettings)


class ShadowSettings(BaseModel):
    """Shadow sampling: a share of student-served texts also goes to the teacher, after the answer."""

    share: float = Field(0.02, ge=0.0, le=1.0, description="Share of student-served texts also sent to the "
                         "teacher off the critical path; uses only spare teacher capacity (see `max_concurrency`) "
                         "and budget left by real deferrals, skipped when refused.")
    max_concurrency: int = Field(1, ge=0, description="Shadow calls in flight per replica; a shadow call also needs "
                                 "a free slot under `teacher.max_concurrency`, so it never makes a real deferral "
                                 "wait or degrade.")


class CostSettings(BaseModel):
    """Prices per 1,000 inferences, so cost and savings are one PromQL expression (defaults: illustrative)."""

    student_per_1k: float = Field(0.002, ge=0, description="Dollars per 1,000 student inferences.")
    teacher_per_1k: float = Field(0.02, ge=0, description="Dollars per 1,000 teacher inferences.")


class LimitSettings(BaseModel):
    """Request limits; beyond them a clear 4xx, beyond capacity a 503 with Retry-After."""

    max_texts: int = Field(64, ge=1, description="Most texts in one request (more: 422).")
    max_chars: int = Field(2000, ge=1, description="Most characters in one text (more: 422).")
    max_body_bytes: int = Field(256 * 1024, ge=1024, description="Largest request body (more: 413, refused "
                                "before it is read when Content-Length says so).")
    admission_headroom: int = Field(16, ge=1, description="The replica refuses with its own JSON 503 and "
                                    "`Retry-After` once `max_ongoing_requests - admission_headroom` requests are in "
                                    "flight, so it fires before Ray's queue limit (whose 503 is plain text).")
    queue_deadline_s: float = Field(2.0, gt=0.0, description="A request that waited this long in the replica "
                                    "before its student call started is answered 503 instead of run, so accepted "
                                    "requests keep a bounded latency under overload. 2 s lets a closed loop fill "
                                    "the admission limit and be served: 240 one-text requests (256 - 16) on one "
                                    "replica are 240 x 3 ms = 0.72 s of student work on the 2-core development "
                                    "machine, before any gain from batching; 0.5 s refused ordinary closed-loop load.")
    admission_wait_share: float = Field(0.5, gt=0.0, le=1.0, description="A request is refused at once when the "
                                        "oldest text queued for the student has waited more than this share of "
                                        "`queue_deadline_s` (the queue is not draining), or when the texts ahead "
                                        "of it and its own could not start within this share of its remaining wait "
                                        "even at the student's own time per text (a low quantile of its calls' own "
                                        "time, which leaves out whatever runs between batches). Half of 2 s is 1 s, "
                                        "above the 0.72 s of a full admission limit of one-text requests, so a "
                                        "closed loop queues; the other half absorbs slower batches, so a request "
                                        "admitted at the edge is seldom shed at the deadline, slowly.")
    retry_after_s: int = Field(1, ge=1, description="Retry-After seconds sent with every 503.")

    def admission_limit(self, max_ongoing_requests: int) -> int:
        """Requests in flight per replica before refusing: below the deployment's ``max_ongoing_requests``,
        derived from it so the two cannot disagree."""
        limit = max_ongoing_requests - self.admission_headroom
        if limit < 1:
            raise ValueError(f"limits.admission_headroom ({self.admission_headroom}) must be below the Gateway "
                             f"deployment's max_ongoing_requests ({max_ongoing_requests})")
        return limit


class GatewayConfig(BaseModel):
    """Everything the gateway replica reads, one model per concern (Serve ``user_config``)."""

    model: ModelSettings = Field(default_factory=ModelSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    student: StudentSettings = Field(default_factory=StudentSettings)
    teacher: TeacherSettings = Field(default_factory=TeacherSettings)
    shadow: ShadowSettings = Field(default_factory=ShadowSettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    cost: CostSettings = Field(default_factory=CostSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)

    @model_validator(mode="after")
    def _controller_has_evidence(self) -> GatewayConfig:
        # Without shadow answers the only evidence is deferred texts, which agree with the teacher by
        # construction: the estimate would read 100% and the controller would lower the threshold blindly.
        if self.routing.target_agreement is not None and self.shadow.share <= 0:
            raise ValueError("routing.target_agreement needs shadow.share above 0: the shadow answers are the "
                             "controller's evidence about the texts the student serves")
        return self


# HAProxy keeps this much of its buffer free for header rewrites (its tune.maxrewrite default, 1 KiB), so a
# request's line and headers must fit in the rest: the buffer is the header limit plus this.
HAPROXY_REWRITE_RESERVE_BYTES = 1024
# HAProxy's own wait for a replica outlasts the end-to-end timeout by this much, so the replica's 408 comes first.
HAPROXY_SERVER_TIMEOUT_MARGIN_S = 2


class ProcessLimits(BaseModel):
    """Limits that protect the serving processes from clients: slow or silent connections, huge headers, too many
    connections, requests that never end.

    Not a live ``user_config``: Ray Serve 2.60 reads HAProxy's limits only from environment variables when its
    proxy starts, and ``http_options`` only when Serve starts. `cascade serve` reads this model from the Serve
    config's ``process_limits`` section (default: these defaults) and sets both before Ray starts; the Helm chart
    sets the same variables on every Ray pod. Changing a value means restarting Serve. Ray's Python proxy
    (`cascade serve --no-fast`) honours only the two ``http_options`` fields: its uvicorn accepted a 1 MB header when
    tried and has no timeout for a half-sent request. The same holds for the replicas' own ports (from 30000,
    HAProxy's backends): only HAProxy's port should be reachable by clients.
    """

    model_config = ConfigDict(extra="forbid")

    request_timeout_s: float = Field(
        30.0, gt=0, description="End-to-end limit on one request, so a stuck request cannot hold a replica slot "
        "and a connection for ever. Serve's `http_options.request_timeout_s`: enforced by the replica's own HTTP "
        "server on the fast path (by Ray's proxy with --no-fast), answered 408. HAProxy's wait for a replica "
        "(RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S) is set 2 s longer, a backstop for a replica that hangs or a client "
        "that turns Serve's timeout off with the `x-request-timeout-seconds` header.")
    client_timeout_s: int = Field(
        10, ge=1, description="How long a client may stay silent before its request is complete: before its first "
        "byte, between header or body chunks, and while it reads the answer. Closes half-open and stalled "
        "connections (HAProxy answers 408, or 400 mid-body) so they stop holding connection slots. "
        "HAProxy's `timeout client` (RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S). It bounds silence, not the total "
        "time: Ray 2.60 cannot set HAProxy's `timeout http-request`, so a client trickling a header line every "
        "few seconds is bounded only by `max_connections`. Ray's Python proxy has no equivalent.")
    keep_alive_timeout_s: int = Field(
        30, ge=5, description="How long an idle keep-alive connection is kept between requests, after which it "
        "is closed and its connection slot freed. Serve's `http_options.keep_alive_timeout_s`: HAProxy's "
        "`timeout http-keep-alive` and the replicas' (or Ray's proxy's) uvicorn keep-alive.")
    max_header_bytes: int = Field(
        15 * 1024, ge=1024, le=1024 * 1024, description="Largest request line plus headers; a larger one is "
        "answered 400 by HAProxy and never reaches a replica (memory per connection is bounded by it). HAProxy's "
        "buffer (RAY_SERVE_HAPROXY_TUNE_BUFSIZE) is this plus the 1 KiB HAProxy reserves for rewrites; HAProxy "
        "counts its own encoding, so the usable size is a little smaller. Ray's Python proxy has no equivalent.")
    max_connections: int = Field(
        4096, ge=1, description="Concurrent client connections per HAProxy (one per Ray node); beyond it new "
        "connections wait in the kernel's accept queue instead of taking memory and file descriptors. HAProxy's "
        "`maxconn` (RAY_SERVE_HAPROXY_MAXCONN). Requests in flight per replica are bounded separately by the "
        "Gateway's `max_ongoing_requests` and `limits.admission_headroom`. Ray's Python proxy has no equivalent.")

    @classmethod
    def from_serve_config(cls, config: dict[str, Any]) -> ProcessLimits:
        """The ``process_limits`` section of a Serve config; refuses ``http_options`` that say otherwise, so each
        value has one place."""
        limits = cls.model_validate(config.get("process_limits") or {})
        http_options = config.get("http_options") or {}
        for key, value in limits.http_options().items():
            if key in http_options and http_options[key] != value:
                raise ValueError(f"http_options.{key} is {http_options[key]!r} but process_limits.{key} is "
                                 f"{value!r}: set it in process_limits only")
        return limits

    def http_options(self) -> dict[str, Any]:
        """The Serve config's ``http_options`` these limits set (read by Serve when it starts)."""
        return {"request_timeout_s": self.request_timeout_s, "keep_alive_timeout_s": self.keep_alive_timeout_s}

    def haproxy_env(self) -> dict[str, str]:
        """The environment Ray's HAProxy manager reads once, when the proxy starts (fast path only)."""
        return {
            "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S": str(self.client_timeout_s),
            "RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S": str(math.ceil(self.request_timeout_s)
                                                      + HAPROXY_SERVER_TIMEOUT_MARGIN_S),
            "RAY_SERVE_HAPROXY_TUNE_BUFSIZE": str(self.max_header_bytes + HAPROXY_REWRITE_RESERVE_BYTES),
            "RAY_SERVE_HAPROXY_MAXCONN": str(self.max_connections),
        }


class AuthSettings(BaseModel):
    """Optional API key, from ``CASCADE_API_KEY`` or the file named by ``CASCADE_API_KEY_FILE``."""

    api_key: SecretStr | None = None

    @classmethod
    def from_env(cls) -> AuthSettings:
        key = os.environ.get("CASCADE_API_KEY")
        key_file = os.environ.get("CASCADE_API_KEY_FILE")
        if not key and key_file:
            key = Path(key_file).read_text().strip()
        return cls(api_key=SecretStr(key) if key else None)


def queue_url(configured: str | None, home: str | Path) -> str:
    """The distillation queue, resolved the same way by the gateway and the CLI: ``CASCADE_QUEUE_URL``,
    then the configured URL (``queue.url``), then SQLite beside the registry (one file, for one node)."""
    return os.environ.get("CASCADE_QUEUE_URL") or configured or default_queue_url(home)


# Every environment variable the product reads or sets, for the README's generated reference.
ENVIRONMENT: dict[str, str] = {
    "CASCADE_HOME": "Model home holding `registry/` (and the SQLite queue unless one is configured); default "
                    "`./models`.",
    "CASCADE_API_KEY": "When set, every endpoint but health and docs requires `Authorization: Bearer <key>`.",
    "CASCADE_API_KEY_FILE": "A file holding the API key (read when `CASCADE_API_KEY` is unset), e.g. a mounted "
                            "Kubernetes secret.",
    "CASCADE_QUEUE_URL": "The distillation queue (`sqlite:///path.db` or `redis://host:port/db`) for the gateway "
                         "and the CLI alike, over `queue.url`; default SQLite in the model home.",
    "HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE": "Set to 1 by the CLI and the Makefile: nothing is fetched from a model "
                                             "hub; models load from local folders only.",
    "RAY_SERVE_ENABLE_HA_PROXY / RAY_SERVE_THROUGHPUT_OPTIMIZED": "Set by `cascade serve` (its default fast mode): "
                                                                  "HAProxy ingress and Serve's throughput mode; "
                                                                  "`--no-fast` leaves them unset.",
    "RAY_SERVE_HAPROXY_RETRY_ON / RAY_SERVE_HAPROXY_RETRIES": "Set by `cascade serve` and the chart with the fast "
                                                              "path: a request whose replica died before answering "
                                                              "(`empty-response`) goes to another replica, at most "
                                                              "twice; 503s and timeouts are not retried.",
    "CASCADE_TEST_TINY_HOME": "Development only: the test suite copies this prebuilt tiny model home instead of "
                              "building one.",
}
