"""Calibrated probabilities and confidence scores (numpy only: used on the request path and offline)."""

from __future__ import annotations

from enum import StrEnum

import numpy as np


class ConfidenceMeasure(StrEnum):
    """How sure the student is; higher is surer for all three."""

    MAX_PROB = "max_prob"
    MARGIN = "margin"
    NEG_ENTROPY = "neg_entropy"


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Temperature-scaled softmax over the last axis, stable for large logits."""
    scaled = np.asarray(logits, dtype=np.float64) / float(temperature)
    scaled -= scaled.max(axis=-1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=-1, keepdims=True)


def confidence(probabilities: np.ndarray, measure: ConfidenceMeasure = ConfidenceMeasure.MAX_PROB) -> np.ndarray:
    """One score per row. Margin is top-1 minus top-2; negative entropy is normalised to [-1, 0]."""
    probs = np.asarray(probabilities, dtype=np.float64)
    if measure is ConfidenceMeasure.MAX_PROB:
        return probs.max(axis=-1)
    if measure is ConfidenceMeasure.MARGIN:
        top2 = np.sort(probs, axis=-1)[..., -2:]
        return top2[..., 1] - top2[..., 0]
    if measure is ConfidenceMeasure.NEG_ENTROPY:
        entropy = -(probs * np.log(np.clip(probs, 1e-12, 1.0))).sum(axis=-1)
        return -entropy / np.log(probs.shape[-1])
    raise ValueError(f"unknown confidence measure {measure!r}")
