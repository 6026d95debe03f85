"""Every Cascade metric, in one place: latency and cost per path, from every replica.

Recorded through ``ray.serve.metrics``, so each replica's values reach its node's Ray metrics agent
(Serve adds the ``deployment``, ``replica`` and ``application`` labels itself) and one scrape per
node sees them all; Ray's Prometheus service-discovery file lists the nodes. Ray prefixes
application metrics with ``ray_``: ``deploy/prometheus.yml`` (and the Helm ServiceMonitor) rename
``ray_cascade_*`` to ``cascade_*`` at scrape time, so dashboards and alerts use the names below.

Labels are bounded: no text, no request id. Each text answered counts once in
``cascade_requests_total`` (a request of three texts is three inferences).
"""

from __future__ import annotations

from typing import Any

from ray.serve.metrics import Counter, Gauge, Histogram

from routing.breaker import BREAKER_STATE_VALUE, BreakerState
from serving.settings import CostSettings

LATENCY_BUCKETS_S = [0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5,
                     1.0, 2.5, 5.0]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64]
CONFIDENCE_BUCKETS = [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.99, 1.0]

# Names as Prometheus sees them after the scrape-time rename; the test of the dashboard and the
# alert rules checks against this list.
EXPORTED = (
    "cascade_requests_total", "cascade_degraded_total", "cascade_request_latency_seconds",
    "cascade_inference_latency_seconds", "cascade_batch_size", "cascade_confidence", "cascade_threshold",
    "cascade_teacher_share", "cascade_teacher_share_budget", "cascade_shadow_total", "cascade_shadow_agreed_total",
    "cascade_disagreements_total", "cascade_queue_written_total", "cascade_queue_dropped_total",
    "cascade_queue_retried_total", "cascade_queue_backlog", "cascade_cost_dollars_total",
    "cascade_teacher_only_cost_dollars_total", "cascade_model_info", "cascade_model_texts_total",
    "cascade_live_agreement", "cascade_live_accuracy", "cascade_live_evidence",
    "cascade_teacher_breaker_state", "cascade_threshold_wanted",
)


class ModelCallMetrics:
    """Per-model inference latency and batch size; the gateway records the student, the teacher itself."""

    def __init__(self, model: str) -> None:
        self.tags = {"model": model}
        self.inference = Histogram("cascade_inference_latency_seconds", description="One model call (a batch).",
                                   boundaries=LATENCY_BUCKETS_S, tag_keys=("model",))
        self.batch_size = Histogram("cascade_batch_size", description="Texts per model call.",
                                    boundaries=BATCH_BUCKETS, tag_keys=("model",))
        # Ray exports a histogram's _sum estimated from bucket midpoints (a call of one text adds 0.5),
        # so the mean batch size is this exact count over cascade_batch_size_count.
        self.texts = Counter("cascade_model_texts", description="Texts through model calls (exact; the mean batch "
                             "size is its rate over cascade_batch_size_count's).", tag_keys=("model",))

    def call(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size, tags=self.tags)
        self.texts.inc(size, tags=self.tags)
        self.inference.observe(seconds, tags=self.tags)


class GatewayMetrics:
    """The gateway replica's metrics (student path, routing, queue, cost): the cascade's ``MetricsSink``."""

    def __init__(self) -> None:
        self.requests = Counter("cascade_requests", description="Texts answered, by who answered and outcome.",
                                tag_keys=("served_by", "outcome"))
        self.degraded = Counter("cascade_degraded", description="Answers the student gave in the teacher's place.",
                                tag_keys=("reason",))
        self.latency = Histogram("cascade_request_latency_seconds", description="End-to-end request latency in "
                                 "the gateway, by path (teacher: any text of it went to the teacher).",
                                 boundaries=LATENCY_BUCKETS_S, tag_keys=("served_by",))
        self.student = ModelCallMetrics("student")
        self.confidence = Histogram("cascade_confidence", description="Calibrated student confidence.",
                                    boundaries=CONFIDENCE_BUCKETS)
        self.threshold = Gauge("cascade_threshold", description="Live deferral threshold.")
        self.threshold_wanted = Gauge("cascade_threshold_wanted", description="The threshold this replica's recent "
                                      "answers ask for to hold routing.target_agreement; cascade_threshold moves "
                                      "toward it by at most routing.controller.max_step per update.")
        self.teacher_share = Gauge("cascade_teacher_share", description="Share of auto-routed texts the teacher "
                                   "took over the budget window.")
        self.teacher_budget = Gauge("cascade_teacher_share_budget", description="Configured largest teacher share.")
        self.shadow = Counter("cascade_shadow", description="Student-served texts also sent to the teacher.")
        self.shadow_agreed = Counter("cascade_shadow_agreed", description="Shadowed texts where both agreed.")
        self.disagreements = Counter("cascade_disagreements", description="Teacher answers that differ from the "
                                     "student's.", tag_keys=("source",))
        self.queue_written = Counter("cascade_queue_written", description="Records durable in the queue.")
        self.queue_dropped = Counter("cascade_queue_dropped", description="Records dropped (buffer full).")
        self.queue_retried = Counter("cascade_queue_retried", description="Queue writes retried.")
        self.queue_backlog = Gauge("cascade_queue_backlog", description="Records buffered, not yet written.")
        self.cost = Counter("cascade_cost_dollars", description="Inference cost at the configured prices.",
                            tag_keys=("model",))
        self.teacher_only_cost = Counter("cascade_teacher_only_cost_dollars", description="What the same texts "
                                         "would have cost on the teacher alone.")
        self.model_info = Gauge("cascade_model_info", description="Served versions (value 1).",
                                tag_keys=("student_version", "teacher_version"))
        self.breaker_state = Gauge("cascade_teacher_breaker_state", description="The teacher circuit breaker in "
                                   "this replica: 0 closed, 1 half open (probing), 2 open (deferred texts degrade "
                                   "at once as teacher_unavailable).")
        self.live_agreement = Gauge("cascade_live_agreement", description="The cascade's agreement with the "
                                    "teacher on recent traffic (inverse-propensity estimate from this replica's "
                                    "shadow and fallback answers), with its 95% interval.", tag_keys=("stat",))
        self.live_accuracy = Gauge("cascade_live_accuracy", description="The cascade's accuracy on texts with true "
                                   "labels from /v1/feedback, with its 95% interval.", tag_keys=("stat",))
        self.live_evidence = Gauge("cascade_live_evidence", description="Teacher answers (records) and effective "
                                   "sample size behind the live agreement estimate.", tag_keys=("stat",))
        self._queue_seen = {"written": 0, "dropped": 0, "retried": 0}

    def student_call(self, texts: int, seconds: float) -> None:
        self.student.call(texts, seconds)

    def confidences(self, values: list[float]) -> None:
        for value in values:
            self.confidence.observe(value)

    def disagreed(self, texts: int, source: str) -> None:
        self.disagreements.inc(texts, tags={"source": source})

    def set_models(self, student_version: str, teacher_version: str) -> None:
        """Set on every beat: Ray exports a gauge only while it keeps being set, so a swapped-out
        version's series goes stale on its own."""
        self.model_info.set(1, tags={"student_version": student_version, "teacher_version": teacher_version})

    def answered(self, results: list[dict[str, Any]], latency_s: float, cost: CostSettings,
                 teacher_texts: int) -> None:
        """One request's answers: counts, latency by path, and cost (student on every text)."""
        path = "student"
        for result in results:
            served_by = result["served_by"]
            path = "teacher" if served_by == "teacher" else path
            self.requests.inc(tags={"served_by": served_by, "outcome": "degraded" if result["degraded"] else "ok"})
            if result["degraded"]:
                self.degraded.inc(tags={"reason": result["reason"] or "unknown"})
        self.latency.observe(latency_s, tags={"served_by": path})
        n = len(results)
        self.cost.inc(n * cost.student_per_1k / 1000, tags={"model": "student"})
        if teacher_texts:
            self.cost.inc(teacher_texts * cost.teacher_per_1k / 1000, tags={"model": "teacher"})
        self.teacher_only_cost.inc(n * cost.teacher_per_1k / 1000)

    def breaker(self, state: BreakerState) -> None:
        self.breaker_state.set(BREAKER_STATE_VALUE[state])

    def refused(self, status: int) -> None:
        self.requests.inc(tags={"served_by": "none", "outcome": "overloaded" if status == 503 else "rejected"})

    def shadowed(self, texts: int, agreed: int, cost: CostSettings) -> None:
        self.shadow.inc(texts)
        if agreed:
            self.shadow_agreed.inc(agreed)
        self.cost.inc(texts * cost.teacher_per_1k / 1000, tags={"model": "teacher"})

    def routing_state(self, threshold: float, share: float, budget: float) -> None:
        self.threshold.set(threshold)
        self.teacher_share.set(share)
        self.teacher_budget.set(budget)

    def controller(self, wanted: float | None) -> None:
        """The threshold controller's aim (None: too little evidence yet, the series goes stale)."""
        if wanted is not None:
            self.threshold_wanted.set(wanted)

    def live_estimates(self, agreement: Any, accuracy: Any) -> None:
        """``routing.estimate.Interval``s (or None: no evidence yet, nothing set, the series goes stale)."""
        for gauge, interval in ((self.live_agreement, agreement), (self.live_accuracy, accuracy)):
            if interval is not None:
                for stat in ("value", "low", "high"):
                    gauge.set(getattr(interval, stat), tags={"stat": stat})
        if agreement is not None:
            self.live_evidence.set(agreement.records, tags={"stat": "records"})
            self.live_evidence.set(agreement.effective_n, tags={"stat": "effective_n"})

    def queue_counters(self, written: int, dropped: int, retried: int, backlog: int) -> None:
        """Turn the writer's running totals into counter increments."""
        for name, value, counter in (("written", written, self.queue_written),
                                     ("dropped", dropped, self.queue_dropped),
                                     ("retried", retried, self.queue_retried)):
            seen = self._queue_seen[name]
            delta = value - seen if value >= seen else value  # a new writer starts from zero
            if delta > 0:
                counter.inc(delta)
            self._queue_seen[name] = value
        self.queue_backlog.set(backlog)
