"""The gateway holding an agreement target itself: a slow threshold controller (numpy only, no Ray).

`cascade calibrate --from-queue` picks a threshold from recent traffic when someone runs it. With
``routing.target_agreement`` set, each Gateway replica does the same on its own beat from its live
evidence (the shadow and fallback answers behind the live agreement gauge): it finds the cheapest
threshold whose agreement holds the target at the lower end of its 95% interval (``agreement_curve``,
``threshold_for_target``; valid at any threshold, because each answer's recording probability is
known), and moves the served threshold toward it by at most ``max_step`` per update, within
``[min_threshold, max_threshold]``. Under drift the quality is held, and the teacher share shows what
that costs. Where no threshold in the bounds holds the target, it moves to ``max_threshold``: the
bounds are the operator's limit on what quality may cost.

Slow on purpose: the evidence of one beat is a few hundred answers, and a threshold that jumps with
each estimate would chase the noise; a step cap turns a run of estimates into a trend.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from routing.estimate import Evidence, agreement_curve, threshold_for_target


@dataclass(frozen=True)
class ControllerStep:
    """One update: the threshold to serve now, and why."""

    threshold: float
    wanted: float | None  # the threshold the evidence asks for (None: too little evidence to ask)
    records: int
    reason: str


@dataclass(frozen=True)
class ThresholdController:
    """Moves the deferral threshold toward the cheapest one that holds ``target`` on recent traffic."""

    target: float
    min_threshold: float = 0.0
    max_threshold: float = 1.0
    max_step: float = 0.02
    min_records: int = 200
    level: float = 0.95

    def step(self, current: float, evidence: Evidence | None) -> ControllerStep:
        """The next threshold from ``current`` and the recent answers (``None``: none yet)."""
        records = 0 if evidence is None else len(evidence)
        if evidence is None or records < self.min_records:
            held = float(np.clip(current, self.min_threshold, self.max_threshold))
            return ControllerStep(held, None, records, f"{records} recent answers (< {self.min_records}): hold")
        candidates = [point for point in agreement_curve(evidence, level=self.level)
                      if self.min_threshold <= point.threshold <= self.max_threshold]
        candidates += agreement_curve(evidence, [self.min_threshold, self.max_threshold], self.level)
        point = threshold_for_target(candidates, self.target)
        if point is None:
            wanted, reason = self.max_threshold, f"no threshold in the bounds holds {self.target:.3f}: the upper bound"
        else:
            wanted = point.threshold
            reason = (f"agreement lower bound {point.agreement.low:.4f} >= {self.target:.3f} at teacher share "
                      f"{point.teacher_share:.3f}")
        move = float(np.clip(wanted - current, -self.max_step, self.max_step))
        threshold = float(np.clip(current + move, self.min_threshold, self.max_threshold))
        return ControllerStep(threshold, wanted, records, reason)
