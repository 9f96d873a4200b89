"""Writers of small labelled text files with a learnable signal, in the layouts ``data=text`` reads.

A review is a few neutral words and one sentiment word (``POSITIVE`` or ``NEGATIVE``) in random
order: its class is the sentiment, which a bag-of-words model learns at once. A pair is two
reviews, labelled ``same`` when their sentiments agree and ``different`` otherwise.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

POSITIVE = ("good", "great", "excellent", "wonderful", "lovely", "brilliant")
NEGATIVE = ("bad", "awful", "terrible", "boring", "poor", "dreadful")
NEUTRAL = "the movie was a story with actors and a plot that i watched on friday night at home".split()
LABELS = ("negative", "positive")


def review(rng: random.Random, positive: bool, words: int = 6) -> str:
    chosen = [*rng.sample(NEUTRAL, words), rng.choice(POSITIVE if positive else NEGATIVE)]
    rng.shuffle(chosen)
    return " ".join(chosen)


def reviews(count: int, seed: int = 0) -> list[dict[str, Any]]:
    """``count`` rows ``{"sentence", "label"}``, the two classes alternating."""
    rng = random.Random(seed)
    return [{"sentence": review(rng, i % 2 == 1), "label": LABELS[i % 2]} for i in range(count)]


def pairs(count: int, seed: int = 0) -> list[dict[str, Any]]:
    """``count`` rows ``{"sentence1", "sentence2", "label"}``: ``same`` or ``different`` sentiment."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        first, same = rng.random() < 0.5, i % 2 == 0
        rows.append(
            {
                "sentence1": review(rng, first),
                "sentence2": review(rng, first == same),
                "label": "same" if same else "different",
            }
        )
    return rows


def write(path: Path, rows: Sequence[dict[str, Any]], header: bool = True) -> Path:
    """``rows`` as CSV, TSV (GLUE's layout: tabs, no quoting) or JSON lines, by the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0])
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".tsv":
        lines = (["\t".join(columns)] if header else []) + ["\t".join(str(row[c]) for c in columns) for row in rows]
        path.write_text("\n".join(lines) + "\n")
    else:
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            if header:
                writer.writerow(columns)
            writer.writerows([[row[c] for c in columns] for row in rows])
    return path
