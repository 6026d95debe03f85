"""Inputs for "use your own model" tests: a real 3-label data file, a tiny build configuration, a tiny
checkpoint teacher of a non-BERT family. Shared by the unit and the integration tests."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import yaml

THREE_LABELS = ("negative", "neutral", "positive")


def three_label_csv(path: Path, per_label: int = 60) -> Path:
    """Movie snippets rated by people, in three classes by their mean rating: below -1, -1 to 1, above 1.

    Columns are ``review`` and ``sentiment`` (not the defaults) so the column options are exercised.
    """
    from distill.data import load_movie_snippets

    data = load_movie_snippets()
    assert data.ratings is not None
    counts = dict.fromkeys(THREE_LABELS, 0)
    rows = []
    for text, rating in zip(data.texts, data.ratings.tolist(), strict=True):
        label = "negative" if rating < -1.0 else "positive" if rating > 1.0 else "neutral"
        if counts[label] < per_label:
            counts[label] += 1
            rows.append((text, label))
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["review", "sentiment"])
        writer.writerows(rows)
    return path


def tiny_config(path: Path, data: Path, **sections: dict[str, Any]) -> Path:
    """A build configuration for a build of well under a minute: one teacher epoch, a one-layer student."""
    config: dict[str, Any] = {
        "name": "tiny-own", "max_length": 32,
        "data": {"path": str(data), "text_column": "review", "label_column": "sentiment"},
        "teacher": {"epochs": 1},
        "student": {"layers": 1, "epochs": 1},
        "distillation": {"augment": False},
        "evaluation": {"bootstrap_samples": 20, "latency_runs": 3},
    }
    for name, values in sections.items():
        config[name] = config.get(name, {}) | values
    path.write_text(yaml.safe_dump(config))
    return path


def tiny_distilbert_checkpoint(path: Path, labels: tuple[str, ...]) -> Path:
    """A DistilBERT classifier with random weights and the MiniLM tokenizer: plumbing for a non-BERT teacher."""
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertForSequenceClassification

    from distill.train import base_model_dir

    config = DistilBertConfig(vocab_size=30522, dim=32, hidden_dim=64, n_layers=1, n_heads=2,
                              max_position_embeddings=64, id2label=dict(enumerate(labels)),
                              label2id={name: i for i, name in enumerate(labels)})
    DistilBertForSequenceClassification(config).save_pretrained(str(path), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(base_model_dir()), local_files_only=True).save_pretrained(str(path))
    return path
