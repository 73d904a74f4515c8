"""A load corpus: many Dolma documents of a few KB, in several gzip files and one big one, with planted
exact and near copies. The suite's load test (tests/app/test_load.py) and `make bench-load` build it."""

from __future__ import annotations

import gzip
import json
import random
import shutil
from pathlib import Path

from tests.near_dup_corpus import edit_words

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "dolma-sample"
SMALL_FILES = 6
BIG_FILE_SHARE = 0.4
EXACT_SHARE = NEAR_SHARE = 0.05
PARAGRAPHS = 20_000


def sample_sentences() -> list[str]:
    """The sentences (four words or more) of the Dolma sample's documents, in file order."""
    return [
        s.strip()
        for f in sorted(SAMPLE.glob("*.jsonl"))
        for line in f.read_text().splitlines()
        for s in json.loads(line)["text"].replace("\n", " ").split(". ")
        if len(s.split()) >= 4
    ]


def build_corpus(n_docs: int, out: Path, seed: int = 41) -> dict[str, int]:
    """Write n_docs documents into SMALL_FILES gzip files and one big one; returns what was planted
    (exact and near copies) and the characters of text written. Documents are drawn from a pool of
    paragraphs made of the sample's sentences (fast to build at a million documents; two documents
    share few 5-grams). The same arguments write the same files."""
    rng = random.Random(seed)
    sentences = sample_sentences()
    pool = [
        ". ".join(rng.choice(sentences) for _ in range(rng.randint(3, 7))) + "." for _ in range(PARAGRAPHS)
    ]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # one gzip stream per file, closed below; level 1: the corpus is written once, then read
    big = gzip.open(tmp / "big.jsonl.gz", "wt", encoding="utf-8", compresslevel=1)  # noqa: SIM115
    small = [
        gzip.open(tmp / f"part-{i:02d}.jsonl.gz", "wt", encoding="utf-8", compresslevel=1)  # noqa: SIM115
        for i in range(SMALL_FILES)
    ]
    recent: list[str] = []
    planted = {"exact": 0, "near": 0, "text_chars": 0}
    for i in range(n_docs):
        draw = rng.random()
        if recent and draw < EXACT_SHARE:
            text = rng.choice(recent)
            planted["exact"] += 1
        elif recent and draw < EXACT_SHARE + NEAR_SHARE:
            text = edit_words(rng.choice(recent), 0.02, rng)
            planted["near"] += 1
        else:
            size, parts = rng.randint(2000, 6000), []
            while sum(len(p) for p in parts) < size:
                parts.append(rng.choice(pool))
            text = "\n\n".join(parts)
            recent.append(text)
            if len(recent) > 1000:
                recent.pop(0)
        planted["text_chars"] += len(text)
        doc = {"id": f"doc-{i:08d}", "text": text, "source": "bench", "added": "2024-01-01", "metadata": {}}
        handle = big if rng.random() < BIG_FILE_SHARE else small[i % SMALL_FILES]
        handle.write(json.dumps(doc) + "\n")
    for h in (big, *small):
        h.close()
    (tmp / "_planted.json").write_text(json.dumps(planted))
    tmp.rename(out)
    return planted


def build_long_documents(n_docs: int, chars: int, out: Path, seed: int = 43) -> dict[str, int]:
    """Write n_docs documents of about `chars` characters (one big gzip file with 40% of them, the rest
    in SMALL_FILES files; every tenth an exact copy of the one before); returns the exact copies planted
    and the characters of text written. The words are long and random, in paragraphs drawn from a
    pool: what a stage costs per byte (shingles per word, and tokens, when chunking truncates, of the
    first 200,000 characters only) stays small, so hundreds of MB run in seconds."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choices(letters, k=rng.randint(30, 60))) for _ in range(5_000)]
    pool = [" ".join(rng.choices(words, k=20)) for _ in range(5_000)]
    per_doc = max(1, chars // (sum(len(p) for p in pool) // len(pool) + 2))
    out.mkdir(parents=True)
    big = gzip.open(out / "big.jsonl.gz", "wt", encoding="utf-8", compresslevel=1)  # noqa: SIM115
    small = [
        gzip.open(out / f"part-{i:02d}.jsonl.gz", "wt", encoding="utf-8", compresslevel=1)  # noqa: SIM115
        for i in range(SMALL_FILES)
    ]
    planted = {"exact": 0, "text_chars": 0}
    text = ""
    for i in range(n_docs):
        if i % 10 == 9:
            planted["exact"] += 1
        else:
            text = "\n\n".join(rng.choices(pool, k=per_doc))
        planted["text_chars"] += len(text)
        doc = {"id": f"long-{i:05d}", "text": text, "source": "load", "metadata": {}}
        (big if i % 5 < 2 else small[i % SMALL_FILES]).write(json.dumps(doc) + "\n")
    for h in (big, *small):
        h.close()
    return planted
