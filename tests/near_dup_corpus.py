"""A corpus with planted near-duplicates: real documents and copies edited at several word-level rates.

The truth (exact Jaccard of word n-gram sets) is computed here independently of the library's own
normalisation and shingling, so a bug there cannot move the truth with it."""

from __future__ import annotations

import json
import random
import re
import unicodedata
from itertools import combinations
from pathlib import Path

EDIT_RATES = (0.005, 0.01, 0.02, 0.04, 0.08, 0.2, 0.5)


def edit_words(text: str, rate: float, rng: random.Random) -> str:
    """Substitute, delete or insert words, each word edited with probability `rate`."""
    vocabulary = ["alpha", "bravo", "delta", "echo", "golf", "hotel", "kilo", "lima", "oscar", "zulu"]
    out = []
    for word in text.split(" "):
        if rng.random() >= rate:
            out.append(word)
            continue
        op = rng.choice(("sub", "del", "ins"))
        if op == "sub":
            out.append(rng.choice(vocabulary))
        elif op == "ins":
            out += [word, rng.choice(vocabulary)]
    return " ".join(out)


def build(sample_dir: Path, seed: int = 7) -> list[tuple[str, str]]:
    """(doc_key, text): each sample document plus one edited copy per rate."""
    rng = random.Random(seed)
    docs = []
    for f in sorted(sample_dir.glob("*.jsonl")):
        for i, line in enumerate(f.read_text().splitlines()):
            text = json.loads(line)["text"]
            docs.append((f"cc/d{i:02d}", text))
            docs += [(f"cc/d{i:02d}-r{r:.3f}", edit_words(text, r, rng)) for r in EDIT_RATES]
    return docs


def shingles(text: str, n: int) -> set[tuple[str, ...]]:
    """Word n-grams of the text, lower-cased, with anything but letters and digits as a separator."""
    words = re.findall(r"[^\W_]+", unicodedata.normalize("NFKC", text).lower())
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def true_jaccard(docs: list[tuple[str, str]], ngram: int) -> dict[tuple[str, str], float]:
    """The exact Jaccard of every pair of documents (keys sorted within a pair)."""
    sets = {k: shingles(t, ngram) for k, t in docs}
    return {
        tuple(sorted((a, b))): len(sets[a] & sets[b]) / max(1, len(sets[a] | sets[b]))
        for a, b in combinations(sets, 2)
    }


def same_cluster_pairs(cluster_of: dict[str, str]) -> set[tuple[str, str]]:
    groups: dict[str, list[str]] = {}
    for key, cluster in cluster_of.items():
        groups.setdefault(cluster, []).append(key)
    return {tuple(sorted(p)) for members in groups.values() for p in combinations(members, 2)}
