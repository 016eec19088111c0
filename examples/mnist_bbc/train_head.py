"""Train the two linear probes of model.py on frozen tower features; write head.pt.

Training samples: the "train" split of common.py (3,744 MNIST images, 869 BBC documents), disjoint
from calibration and evaluation. Features come from the frozen pretrained towers (model.py);
each probe is an L2-regularised multinomial logistic regression fitted full-batch with L-BFGS from
zero weights, so the result depends only on the features (no random init; the seed is set anyway).
Run: python examples/mnist_bbc/train_head.py   (about 2-3 minutes on 2 cores, mostly features)
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402
import model as M  # noqa: E402

SEED = 0
L2 = 1e-3          # weight decay on the probes' weights (per sample-mean loss)
STEPS = 200


def fit_probe(x: np.ndarray, y: np.ndarray, n_classes: int, l2: float = L2, seed: int = SEED) -> dict:
    """Multinomial logistic regression, standardisation folded into the weights. Deterministic."""
    torch.manual_seed(seed)
    x = torch.as_tensor(x, dtype=torch.float64)
    y = torch.as_tensor(y, dtype=torch.int64)
    mu, sd = x.mean(0), x.std(0).clamp(min=1e-6)
    z = (x - mu) / sd
    w = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=STEPS, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        weight = (w / sd[:, None]).T.contiguous()            # [classes, dim] on raw features
        bias = b - (mu / sd) @ w
    return {"weight": weight.float(), "bias": bias.float()}


def fit_head(img_feats, digits, txt_feats, topics) -> dict:
    d = fit_probe(img_feats, digits, M.NUM_DIGITS)
    t = fit_probe(txt_feats, topics, M.NUM_TOPICS)
    return {"digit.weight": d["weight"], "digit.bias": d["bias"],
            "topic.weight": t["weight"], "topic.bias": t["bias"]}


@torch.no_grad()
def features(images: np.ndarray, ids: np.ndarray, mask: np.ndarray, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    model = M.build(with_head=False)
    img = torch.cat([model.image(torch.from_numpy(images[k:k + batch])) for k in range(0, len(images), batch)])
    txt = torch.cat([model.text(torch.from_numpy(ids[k:k + batch]), torch.from_numpy(mask[k:k + batch]))
                     for k in range(0, len(ids), batch)])
    return img.numpy(), txt.numpy()


def training_set():
    x, digits = common.mnist()
    docs, topics = common.bbc()
    ii, di = common.splits()["train"]
    ids, mask = common.tokenize(M.load_tokenizer(), [docs[i] for i in di], M.SEQ_LEN)
    return x[ii], digits[ii], ids, mask, topics[di]


def main() -> None:
    t0 = time.time()
    images, digits, ids, mask, topics = training_set()
    img, txt = features(images, ids, mask)
    print(f"features: {len(img)} images, {len(txt)} documents ({time.time() - t0:.0f} s)")
    head = fit_head(img, digits, txt, topics)
    for name, f, y, key in (("digit", img, digits, "digit"), ("topic", txt, topics, "topic")):
        pred = (torch.from_numpy(f) @ head[f"{key}.weight"].T + head[f"{key}.bias"]).argmax(1).numpy()
        print(f"{name} probe train accuracy: {(pred == y).mean():.4f}")
    torch.save(head, HERE / "head.pt")
    print(f"wrote {HERE / 'head.pt'} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
