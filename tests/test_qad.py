"""Quantization-aware distillation (edgekit.quantize.qad) on a small real network."""
from __future__ import annotations

import torch
from torch import nn

from edgekit.quantize.qad import distill_for_int8


def _net():
    """A small conv tower whose first layer has an outlier channel: per-tensor int8 rounds the other
    channels coarsely, which the tuned weights can compensate."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                        nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 32), nn.Tanh(), nn.Linear(32, 10)).eval()
    with torch.no_grad():
        net[0].weight[0] *= 40.0
        net[2].weight[:, 0] /= 40.0
    return net


def test_weights_end_on_their_int8_grid_and_the_int8_loss_falls():
    model = _net()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    samples = [(torch.randn(1, 3, 8, 8),) for _ in range(80)]
    tuned, facts = distill_for_int8(model, samples, steps=60, lr=1e-5, batch_size=8, keep_float=["7"])
    assert facts["layers"] == 3 and facts["steps"] == 60 and facts["kept_step"] > 0
    before, after = facts["held_out_loss_int8"]
    assert after < before
    for name, m in tuned.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and name != "7":
            w = m.weight.detach()
            scale = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True) / 127
            q = w / scale
            assert torch.allclose(q, q.round(), atol=1e-3), name   # on the per-channel int8 grid
    assert not torch.allclose(tuned.get_submodule("7").weight, tuned.get_submodule("7").weight.round())
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())   # the input model is untouched
    assert not any(p.requires_grad for p in tuned.parameters())
