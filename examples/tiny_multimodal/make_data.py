"""Write calibration/tiny_multimodal/{calib,eval}.npz deterministically (seeded), in the recipe contract.

Images: smooth random colour fields (sums of low-frequency sinusoids), 8-bit levels scaled to [-1, 1].
Text: token ids with a random length 6..32 and the matching attention mask (0 = padding, id 0).
Calibration and evaluation come from different seeds, so they are disjoint.
Run: python examples/tiny_multimodal/make_data.py
"""
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "calibration" / "tiny_multimodal"
SIZE, SEQ, VOCAB = 32, 32, 1000


def make(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, SIZE), np.linspace(0, 1, SIZE), indexing="ij")
    images = np.zeros((n, 3, SIZE, SIZE), np.float32)
    for i in range(n):
        for c in range(3):
            f = rng.uniform(0.5, 4.0, size=(3, 2))
            ph = rng.uniform(0, 2 * np.pi, size=3)
            images[i, c] = sum(np.sin(2 * np.pi * (f[k, 0] * xx + f[k, 1] * yy) + ph[k]) for k in range(3)) / 3
    images = (np.round((images + 1) * 127.5) / 127.5 - 1).astype(np.float32)
    lengths = rng.integers(6, SEQ + 1, size=n)
    mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int64)
    ids = rng.integers(1, VOCAB, size=(n, SEQ)).astype(np.int64) * mask
    return {"image": images, "input_ids": ids, "attention_mask": mask}


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT / "calib.npz", **make(64, seed=1))
    np.savez_compressed(OUT / "eval.npz", **make(200, seed=2))
    for f in sorted(OUT.glob("*.npz")):
        print(f, f.stat().st_size)
