"""A small labelled text set shipped with deltakern, for the demo and for tests.

`support_intents.jsonl`: 200 short customer-support messages written for deltakern, 50 in each of
four intents (account, billing, shipping, technical); one JSON object per line: {"text", "label"}.
"""

from __future__ import annotations

import json
import random
from importlib import resources

__all__ = ["load_support_intents", "train_test_split"]


def load_support_intents() -> tuple[list[str], list[int], list[str]]:
    """(texts, label ids, label names); label ids index the sorted label names."""
    text = resources.files(__name__).joinpath("support_intents.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    names = sorted({r["label"] for r in rows})
    index = {n: i for i, n in enumerate(names)}
    return [r["text"] for r in rows], [index[r["label"]] for r in rows], names


def train_test_split(texts, labels, test_fraction: float = 0.25, seed: int = 0):
    """Stratified split: the same share of every class goes to the test set. Returns
    (train_texts, train_labels, test_texts, test_labels)."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    train, test = [], []
    for y in sorted(by_class):
        idx = by_class[y][:]
        rng.shuffle(idx)
        k = max(1, round(len(idx) * test_fraction))
        test += idx[:k]
        train += idx[k:]
    rng.shuffle(train)
    return [texts[i] for i in train], [labels[i] for i in train], [texts[i] for i in test], [labels[i] for i in test]
