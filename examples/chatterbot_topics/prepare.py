"""Write the English part of the ``chatterbot-corpus`` package as a labelled JSONL file: one statement per line,
labelled with the topic file it comes from (ai, coding, emotion, trivia, ...).

The corpus ships inside its wheel (BSD licence), so the example installs offline from PyPI. A statement that
appears under two topics is dropped (its label would be a coin toss); topics with fewer than ``--min-texts``
statements are left out; the largest topic (tech support) is cut to ``--max-texts`` by a seeded draw so it does
not decide most answers alone. Both choices are printed with the resulting counts.

    python examples/chatterbot_topics/prepare.py --out examples/chatterbot_topics/topics.jsonl
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
from collections import Counter, defaultdict
from pathlib import Path

import yaml


def corpus_dir() -> Path:
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("package 'chatterbot-corpus' is not installed: pip install --no-deps chatterbot-corpus==1.3.3")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "english"


def statements(folder: Path) -> dict[str, set[str]]:
    """Topic (file stem) -> its distinct statements."""
    topics: dict[str, set[str]] = defaultdict(set)
    for path in sorted(folder.glob("*.yml")):
        for conversation in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations") or []:
            for text in conversation:
                if isinstance(text, str) and text.strip():
                    topics[path.stem].add(" ".join(text.split()))
    return topics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--min-texts", type=int, default=80)
    parser.add_argument("--max-texts", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rare", metavar="TOPIC=N", help="Keep only N statements of TOPIC (a seeded draw): an "
                        "imbalanced variant, to check that a rare label is still learnt.")
    args = parser.parse_args()
    rare_topic, rare_count = (args.rare.split("=", 1)[0], int(args.rare.split("=", 1)[1])) if args.rare else ("", 0)
    topics = statements(corpus_dir())
    seen = Counter(text for texts in topics.values() for text in texts)
    rng = random.Random(args.seed)
    rows = []
    for topic, texts in sorted(topics.items()):
        unique = sorted(text for text in texts if seen[text] == 1)
        if len(unique) < args.min_texts:
            print(f"left out {topic}: {len(unique)} statements < {args.min_texts}")
            continue
        if len(unique) > args.max_texts:
            print(f"cut {topic}: {len(unique)} -> {args.max_texts} statements (seed {args.seed})")
            unique = sorted(rng.sample(unique, args.max_texts))
        if topic == rare_topic:
            print(f"made {topic} rare: {len(unique)} -> {rare_count} statements (seed {args.seed})")
            unique = sorted(rng.sample(unique, rare_count))
        rows += [{"text": text, "label": topic} for text in unique]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    counts = Counter(row["label"] for row in rows)
    print(f"wrote {len(rows)} statements in {len(counts)} topics to {args.out}: {dict(sorted(counts.items()))}")


if __name__ == "__main__":
    main()
