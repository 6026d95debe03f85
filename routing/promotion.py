"""The promotion gate: does a candidate student beat the current one on recent traffic? (numpy/scipy only)

Two paired tests, each on the same texts answered by both int8 students:

- recent traffic: held-out records of the shadow sample (a uniform sample of student-served texts,
  never trained on), target = the true label where a person gave one, else the teacher's answer.
  Only discordant pairs carry evidence: ``b`` texts the candidate gets right and the current
  student wrong, ``c`` the reverse. An exact McNemar test (one-sided binomial test of b out of b + c
  at 1/2) asks "better" and, the other way round, "worse".
- the base test set: one-sided paired non-inferiority with a margin: the 95% lower confidence bound
  of the accuracy difference (Wald on paired proportions, (b - c) / n with variance
  ((b + c) / n - d^2) / n) must lie above ``-margin``.

Three outcomes: ``promote`` (better at the look's level and non-inferior at 95%), ``reject`` (worse
on recent traffic at the look's level, or worse than the margin on the base set at 95%), ``wait``
(neither: not enough evidence yet; nothing changes and the records go back to the queue).

Repeated looks. Held-out membership is fixed by record id, so each run after a ``wait`` sees the
same held-out records plus new ones. To keep the chance of ever promoting a candidate that is no
better at or below ``alpha`` however many runs look, the k-th look against one current student
spends alpha_k = alpha * 6 / (pi^2 k^2) (these sum to alpha: a union bound that needs no assumption
about how looks depend on each other), and a new look is only taken once the held-out set has grown
(distill/redistill.py keeps the count per current student).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
from scipy.stats import binomtest, norm

Outcome = Literal["promote", "reject", "wait"]


def look_alpha(alpha: float, look: int) -> float:
    """Significance spent on the ``look``-th test (1-based) against the same current student."""
    if look < 1:
        raise ValueError("looks count from 1")
    return alpha * 6 / (np.pi**2 * look**2)


@dataclass(frozen=True)
class Paired:
    """Discordant counts of two models on the same texts."""

    n: int
    new_only: int  # b: the candidate right, the current student wrong
    old_only: int  # c: the current student right, the candidate wrong

    @classmethod
    def of(cls, target: np.ndarray, old: np.ndarray, new: np.ndarray) -> Paired:
        old_ok, new_ok = old == target, new == target
        return cls(len(target), int((new_ok & ~old_ok).sum()), int((old_ok & ~new_ok).sum()))

    @property
    def difference(self) -> float:
        """Candidate accuracy minus current accuracy."""
        return (self.new_only - self.old_only) / self.n if self.n else 0.0

    def difference_bounds(self, level: float = 0.95) -> tuple[float, float]:
        """Two-sided interval of the paired difference (Wald); one-sided bounds at (1 + level) / 2."""
        if not self.n:
            return -1.0, 1.0
        d = self.difference
        se = np.sqrt(max((self.new_only + self.old_only) / self.n - d * d, 0.0) / self.n)
        z = float(norm.ppf(0.5 + level / 2))
        return d - z * se, d + z * se


def mcnemar_p(paired: Paired, alternative: Literal["greater", "less"]) -> float:
    """Exact one-sided McNemar p-value: candidate better ("greater") or worse ("less")."""
    discordant = paired.new_only + paired.old_only
    if discordant == 0:
        return 1.0
    return float(binomtest(paired.new_only, discordant, 0.5, alternative=alternative).pvalue)


def noninferiority_p(paired: Paired, margin: float) -> float:
    """One-sided p-value of H0: candidate accuracy <= current - margin (normal, paired)."""
    if not paired.n:
        return 1.0
    d = paired.difference
    se = np.sqrt(max((paired.new_only + paired.old_only) / paired.n - d * d, 0.0) / paired.n)
    if se == 0:
        return 0.0 if d > -margin else 1.0
    return float(norm.sf((d + margin) / se))


@dataclass(frozen=True)
class GateDecision:
    outcome: Outcome
    reasons: list[str]
    look: int
    alpha: float
    holdout: dict[str, float]
    base: dict[str, float]
    false_promotion: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def decide(holdout: Paired, base: Paired, *, margin: float = 0.005, alpha: float = 0.05, look: int = 1,
           base_alpha: float = 0.05) -> GateDecision:
    """Promote, reject or wait on the two paired comparisons (see the module docstring)."""
    level = look_alpha(alpha, look)
    p_better, p_worse = mcnemar_p(holdout, "greater"), mcnemar_p(holdout, "less")
    p_noninferior = noninferiority_p(base, margin)
    base_low, base_high = base.difference_bounds(1 - 2 * base_alpha)  # one-sided 95% bounds
    reasons = []
    if p_worse < level:
        reasons.append(f"worse on held-out traffic: {holdout.old_only} vs {holdout.new_only} discordant, "
                       f"exact McNemar p={p_worse:.3g} < {level:.3g}")
    if base_high < -margin:
        reasons.append(f"base test accuracy {base.difference * 100:+.2f} points, upper bound "
                       f"{base_high * 100:+.2f} below -{margin * 100:.2f}")
    if reasons:
        outcome: Outcome = "reject"
    elif p_better < level and p_noninferior < base_alpha:
        outcome = "promote"
        reasons.append(f"better on held-out traffic ({holdout.new_only} vs {holdout.old_only} discordant, "
                       f"p={p_better:.3g} < {level:.3g}) and not worse on the base set beyond "
                       f"{margin * 100:.2f} points (p={p_noninferior:.3g})")
    else:
        outcome = "wait"
        if p_better >= level:
            reasons.append(f"not yet better on held-out traffic: {holdout.new_only} vs {holdout.old_only} "
                           f"discordant of {holdout.n}, p={p_better:.3g} >= {level:.3g}")
        if p_noninferior >= base_alpha:
            reasons.append(f"base set non-inferiority not shown: lower bound {base_low * 100:+.2f} points, "
                           f"p={p_noninferior:.3g}")
    hold_low, hold_high = holdout.difference_bounds()
    return GateDecision(
        outcome=outcome, reasons=reasons, look=look, alpha=level,
        holdout={"records": holdout.n, "new_only": holdout.new_only, "old_only": holdout.old_only,
                 "difference": holdout.difference, "difference_low95": hold_low, "difference_high95": hold_high,
                 "p_better": p_better, "p_worse": p_worse},
        base={"texts": base.n, "new_only": base.new_only, "old_only": base.old_only, "difference": base.difference,
              "difference_low95_one_sided": base_low, "margin": margin, "p_noninferior": p_noninferior},
    )


def false_promotion_rate(holdout: Paired, base: Paired, *, margin: float = 0.005, alpha: float = 0.05,
                         look: int = 1, resamples: int = 2000, seed: int = 0) -> dict[str, float]:
    """Share of gate decisions that promote when the candidate carries no new information.

    Null by resampling, no retraining: which of the two students answers each text is swapped at
    random (a paired permutation), so the candidate is exchangeable with the current student while
    the data keep their own discordance. Only discordant pairs change under a swap, so a resample is
    a binomial draw of b out of b + c at 1/2, on both comparisons.
    """
    rng = np.random.default_rng(seed)
    hold_d, base_d = holdout.new_only + holdout.old_only, base.new_only + base.old_only
    hold_b, base_b = rng.binomial(hold_d, 0.5, resamples), rng.binomial(base_d, 0.5, resamples)
    promoted = 0
    cache: dict[tuple[int, int], bool] = {}
    for hb, bb in zip(hold_b.tolist(), base_b.tolist(), strict=True):
        key = (hb, bb)
        if key not in cache:
            cache[key] = decide(Paired(holdout.n, hb, hold_d - hb), Paired(base.n, bb, base_d - bb), margin=margin,
                                alpha=alpha, look=look).outcome == "promote"
        promoted += cache[key]
    rate = promoted / resamples
    se = np.sqrt(rate * (1 - rate) / resamples)
    return {"rate": rate, "resamples": resamples, "standard_error": float(se), "alpha": alpha}
