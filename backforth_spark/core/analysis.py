"""The paper's analyses of an exported set (pure Python and numpy): lengths, diversity, how close the
responses stay to their source, and how far rewritten responses are from distilled ones.

The two-sample figure replaces the paper's embedding comparison with a classifier test: a logistic
regression on hashed word n-grams learns to tell the two sets apart, and its accuracy on held-out pairs is
reported (0.5: indistinguishable; 1.0: always told apart).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence

import numpy as np

from backforth_spark.core.curate import unique_trigram_share, word_trigrams


def _words(text: str) -> list[str]:
    return text.lower().split()


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct word n-grams over all word n-grams of the set (distinct-n)."""
    total, seen = 0, set()
    for text in texts:
        words = _words(text)
        grams = list(zip(*(words[i:] for i in range(n)), strict=False))
        total += len(grams)
        seen.update(grams)
    return round(len(seen) / total, 4) if total else 0.0


def describe(values: Sequence[float]) -> dict[str, float]:
    """mean, median, 90th percentile and max (zeros for an empty set)."""
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "max": 0.0}
    arr = np.asarray(values, dtype=float)
    return {
        "mean": round(float(arr.mean()), 2),
        "p50": round(float(np.median(arr)), 2),
        "p90": round(float(np.percentile(arr, 90)), 2),
        "max": round(float(arr.max()), 2),
    }


def analyse(
    instructions: Sequence[str],
    responses: Sequence[str],
    source_copy: Sequence[float],
    count_tokens: Callable[[str], int] | None = None,
) -> dict[str, dict[str, float]]:
    """The analyses of one exported set, as {group: {name: value}}."""
    out = {
        "instruction_words": describe([len(_words(t)) for t in instructions]),
        "response_words": describe([len(_words(t)) for t in responses]),
        "diversity": {
            "distinct_1": distinct_n(responses, 1),
            "distinct_2": distinct_n(responses, 2),
            "distinct_3": distinct_n(responses, 3),
            "unique_trigrams_per_response": round(
                float(np.mean([unique_trigram_share(r) for r in responses])) if responses else 0.0, 4
            ),
        },
        "source_copy": describe(list(source_copy)),
    }
    if count_tokens is not None:
        out["instruction_tokens"] = describe([count_tokens(t) for t in instructions])
        out["response_tokens"] = describe([count_tokens(t) for t in responses])
    return out


def _features(texts: Sequence[str], dims: int) -> np.ndarray:
    """Hashed, L2-normalised counts of word unigrams, bigrams and trigrams."""
    x = np.zeros((len(texts), dims), dtype=np.float64)
    for i, text in enumerate(texts):
        words = _words(text)
        grams = [*words, *zip(words, words[1:], strict=False), *word_trigrams(text)]
        for g in grams:
            x[i, zlib.crc32(repr(g).encode()) % dims] += 1.0
        norm = np.linalg.norm(x[i])
        if norm:
            x[i] /= norm
    return x


def two_sample_accuracy(
    a: Sequence[str], b: Sequence[str], dims: int = 4096, seed: int = 0, min_per_set: int = 5
) -> float | None:
    """Held-out accuracy of a logistic regression telling set `a` from set `b` (balanced by taking as
    many of each; 5-fold cross-validation). None when either set has fewer than `min_per_set` texts."""
    n = min(len(a), len(b))
    if n < min_per_set:
        return None
    rng = np.random.default_rng(seed)
    texts = [
        *rng.permutation(np.asarray(a, dtype=object))[:n],
        *rng.permutation(np.asarray(b, dtype=object))[:n],
    ]
    x = _features([str(t) for t in texts], dims)
    y = np.array([0.0] * n + [1.0] * n)
    order = rng.permutation(2 * n)
    folds = np.array_split(order, 5)
    correct = 0
    for k, test in enumerate(folds):
        train = np.concatenate([f for j, f in enumerate(folds) if j != k])
        w = _fit_logistic(x[train], y[train])
        correct += int(((x[test] @ w[:-1] + w[-1] > 0) == (y[test] == 1)).sum())
    return round(correct / (2 * n), 4)


def _fit_logistic(
    x: np.ndarray, y: np.ndarray, steps: int = 300, lr: float = 0.5, l2: float = 1e-3
) -> np.ndarray:
    """Weights (bias last) by full-batch gradient descent on the L2-regularised log loss."""
    w = np.zeros(x.shape[1] + 1)
    for _ in range(steps):
        z = np.clip(x @ w[:-1] + w[-1], -30, 30)
        p = 1 / (1 + np.exp(-z))
        grad = p - y
        w[:-1] -= lr * (x.T @ grad / len(y) + l2 * w[:-1])
        w[-1] -= lr * grad.mean()
    return w
