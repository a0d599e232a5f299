"""Metrics of MAZO_SPEC §5: accuracy, and SQuAD v1.1 answer normalisation with token F1 (max over gold answers).

All functions return fractions in [0, 1]; `evaluate_task` reports them × 100.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lower-case, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def token_f1(prediction: str, ground_truth: str) -> float:
    """Token-level F1 of two answers after `normalize_answer` (0 when they share no token, as in SQuAD v1.1)."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(ground_truth).split()
    num_same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, ground_truth: str) -> float:
    """1.0 when both answers are equal after `normalize_answer`, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def squad_f1(prediction: str, ground_truths: Iterable[str]) -> float:
    """SQuAD F1 of one prediction: the best `token_f1` over the gold answers (which must not be empty)."""
    ground_truths = list(ground_truths)
    if not ground_truths:
        raise ValueError("squad_f1 needs at least one gold answer.")
    return max(token_f1(prediction, gold) for gold in ground_truths)


def squad_exact_match(prediction: str, ground_truths: Iterable[str]) -> float:
    """SQuAD exact match of one prediction: 1.0 when it matches any gold answer after normalisation."""
    return max(exact_match(prediction, gold) for gold in ground_truths)


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction of `predictions` equal to `labels` (same length, not empty)."""
    if len(predictions) != len(labels):
        raise ValueError(f"accuracy: {len(predictions)} predictions for {len(labels)} labels.")
    if not labels:
        raise ValueError("accuracy of an empty set is undefined.")
    return sum(int(p) == int(y) for p, y in zip(predictions, labels, strict=True)) / len(labels)
