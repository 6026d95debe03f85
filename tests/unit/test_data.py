import json
from pathlib import Path

import numpy as np
import pytest

from distill.data import (
    DatasetError,
    load_amazon_snippets,
    load_ground_truth,
    load_movie_snippets,
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


def test_user_csv_and_jsonl_load(tmp_path: Path) -> None:
    csv_file = tmp_path / "mine.csv"
    csv_file.write_text('text,label\n"great, really",positive\nawful,0\n')
    jsonl_file = tmp_path / "mine.jsonl"
    rows = [json.dumps({"text": "fine", "label": 1}), "", json.dumps({"text": "bad", "label": "negative"})]
    jsonl_file.write_text("\n".join(rows))
    assert load_user_file(csv_file).labels.tolist() == [1, 0]
    assert load_user_file(jsonl_file).texts == ["fine", "bad"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("a.csv", "body,label\nx,1\n", "lacks column"),
        ("b.csv", "text,label\nx,maybe\n", "b.csv:2: label 'maybe'"),
        ("c.jsonl", '{"text": "x", "label": 1}\n{broken\n', "c.jsonl:2: not valid JSON"),
        ("d.jsonl", '{"text": "", "label": 1}\n', "non-empty string"),
        ("e.txt", "x", "unsupported file type"),
        ("f.csv", "text,label\n", "no rows"),
    ],
)
def test_malformed_user_files_get_a_clear_error(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DatasetError, match=message):
        load_user_file(path)


def test_malformed_ground_truth_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "gt.txt"
    path.write_text("id\tsentiment\ttext\n1\t0.5\tok\n2\tnot-a-number\tbad\n")
    with pytest.raises(DatasetError, match=r"gt.txt:3: rating 'not-a-number'"):
        load_ground_truth(path, "x")
