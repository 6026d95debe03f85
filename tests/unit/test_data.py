import json
from pathlib import Path

import numpy as np
import pytest

from distill.config import DataSettings
from distill.data import (
    DatasetError,
    load_amazon_snippets,
    load_ground_truth,
    load_movie_snippets,
    load_splits,
    load_user_file,
    snippet_dir,
    stratified_split,
)


def test_movie_snippets_drop_the_zero_ratings_and_label_by_sign() -> None:
    data = load_movie_snippets()
    raw_rows = (snippet_dir() / "movieReviewSnippets_GroundTruth.txt").read_text(errors="replace").splitlines()[1:]
    zeros = sum(1 for row in raw_rows if float(row.split("\t")[1]) == 0.0)
    assert len(raw_rows) == 10_605 and zeros == 37
    assert len(data) == 10_605 - 37
    assert data.ratings is not None
    assert np.array_equal(data.labels, (data.ratings > 0).astype(int))


def test_split_is_deterministic_stratified_and_disjoint() -> None:
    data = load_movie_snippets()
    first, second = stratified_split(data), stratified_split(data)
    assert first.test.texts == second.test.texts
    sizes = [len(first.train), len(first.val), len(first.test)]
    assert sum(sizes) == len(data)
    assert abs(len(first.val) - 0.1 * len(data)) < 3 and abs(len(first.test) - 0.1 * len(data)) < 3
    ids = [set(part.ids) for part in (first.train, first.val, first.test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    for part in (first.train, first.val, first.test):
        assert abs(part.labels.mean() - data.labels.mean()) < 0.01


def test_amazon_snippets_are_the_shifted_domain() -> None:
    amazon = load_amazon_snippets()
    assert len(amazon) > 3000 and amazon.name == "amazon-snippets"
    assert set(np.unique(amazon.labels)) == {0, 1}


def test_user_csv_and_jsonl_load_with_labels_in_a_stable_order(tmp_path: Path) -> None:
    csv_file = tmp_path / "mine.csv"
    csv_file.write_text('text,label\n"great, really",positive\nawful,negative\nmeh,neutral\nfine,positive\n')
    data = load_user_file(csv_file)
    assert data.label_names == ("negative", "neutral", "positive")
    assert data.labels.tolist() == [2, 0, 1, 2] and data.texts[0] == "great, really"
    fixed = load_user_file(csv_file, label_names=("positive", "neutral", "negative"))
    assert fixed.labels.tolist() == [0, 2, 1, 0]
    jsonl_file = tmp_path / "mine.jsonl"
    rows = [json.dumps({"body": "fine", "y": 10}), "", json.dumps({"body": "bad", "y": 2}),
            json.dumps({"body": "ok", "y": 2})]
    jsonl_file.write_text("\n".join(rows))
    numbered = load_user_file(jsonl_file, text_column="body", label_column="y")
    assert numbered.label_names == ("2", "10")  # integer labels sort by value
    assert numbered.texts == ["fine", "bad", "ok"] and numbered.labels.tolist() == [1, 0, 0]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("a.csv", "body,label\nx,1\n", r"a.csv:2: no column 'text'"),
        ("b.csv", "text,label\nx,pos\ny,neg\nz\n", r"b.csv:4: 1 fields, the header has 2"),
        ("b2.csv", "text,label\nx,pos\ny,neg,extra\n", r"b2.csv:3: 3 fields, the header has 2"),
        ("c.jsonl", '{"text": "x", "label": 1}\n{broken\n', r"c.jsonl:2: not valid JSON"),
        ("d.jsonl", '{"text": "x", "label": 1}\n{"text": "", "label": 1}\n', r"d.jsonl:2: 'text' must be a non-empty"),
        ("d2.jsonl", '{"text": "x", "label": null}\n', r"d2.jsonl:1: 'label' must be a label name"),
        ("e.txt", "x", "unsupported file type"),
        ("f.csv", "text,label\n", "f.csv: no rows"),
        ("g.csv", "text,label\nx,pos\ny,pos\n", r"g.csv: only one label \('pos'\)"),
        ("h.parquet", "not parquet", r"h.parquet: "),
    ],
)
def test_malformed_user_files_get_one_line_naming_file_and_row(tmp_path: Path, name: str, content: str,
                                                               message: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DatasetError, match=message) as caught:
        load_user_file(path)
    assert "\n" not in str(caught.value)


def test_a_missing_file_and_a_label_outside_the_fixed_ones_are_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"nothere.csv: file not found"):
        load_user_file(tmp_path / "nothere.csv")
    path = tmp_path / "x.csv"
    path.write_text("text,label\na,pos\nb,neg\nc,meh\n")
    with pytest.raises(DatasetError, match=r"x.csv:4: label 'meh' is not one of \['pos', 'neg'\]"):
        load_user_file(path, label_names=("pos", "neg"))


def _write(path: Path, counts: dict[str, int]) -> Path:
    rows = [f"text {label} {i},{label}" for label, n in counts.items() for i in range(n)]
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    return path


def test_split_from_a_file_is_stratified_seeded_and_keeps_every_label_in_every_part(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", {"a": 50, "b": 20, "c": 3})
    first, second = load_splits(DataSettings(path=path)), load_splits(DataSettings(path=path))
    assert first.test.texts == second.test.texts and first.val.texts == second.val.texts
    other = load_splits(DataSettings(path=path, split_seed=1))
    assert other.test.texts != first.test.texts
    for part in (first.train, first.val, first.test):
        assert set(part.labels.tolist()) == {0, 1, 2} and part.label_names == ("a", "b", "c")
    assert len(first.train) + len(first.val) + len(first.test) == 73
    assert not set(first.train.texts) & (set(first.val.texts) | set(first.test.texts))


def test_a_label_with_too_few_examples_for_the_split_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "few.csv", {"a": 30, "b": 2})
    with pytest.raises(DatasetError, match=r"few.csv: label 'b' has 2 example\(s\); .* needs at least 3"):
        load_splits(DataSettings(path=path))
    val = _write(tmp_path / "val.csv", {"a": 3, "b": 1})
    test = _write(tmp_path / "test.csv", {"a": 3, "b": 1})
    splits = load_splits(DataSettings(path=path, val=val, test=test))  # own held-out files: 2 suffice for training
    assert len(splits.train) == 32 and len(splits.val) == 4 and splits.test.texts == load_user_file(test).texts
    absent = _write(tmp_path / "absent.csv", {"a": 30, "b": 30})
    with pytest.raises(DatasetError, match=r"absent.csv: label 'c' has 0 example"):
        load_splits(DataSettings(path=absent, labels=["a", "b", "c"]))


def test_own_val_file_with_an_unknown_label_names_its_row(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", {"a": 10, "b": 10})
    val = _write(tmp_path / "v.csv", {"a": 1, "z": 1})
    with pytest.raises(DatasetError, match=r"v.csv:3: label 'z' is not one of \['a', 'b'\]"):
        load_splits(DataSettings(path=path, val=val))


def test_default_data_is_the_movie_split_unchanged() -> None:
    splits = load_splits(DataSettings())
    reference = stratified_split(load_movie_snippets())
    assert splits.test.texts == reference.test.texts and splits.train.label_names == ("negative", "positive")
    with pytest.raises(DatasetError, match=r"give data.path \(--data\)"):
        load_splits(DataSettings(labels=["positive", "negative"]))


def test_malformed_ground_truth_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "gt.txt"
    path.write_text("id\tsentiment\ttext\n1\t0.5\tok\n2\tnot-a-number\tbad\n")
    with pytest.raises(DatasetError, match=r"gt.txt:3: rating 'not-a-number'"):
        load_ground_truth(path, "x")
