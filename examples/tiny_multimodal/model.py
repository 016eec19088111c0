"""A small image + text model with a fused head: the shape of a real multimodal model, in miniature.

Image tower: a MobileNet-style conv stack (conv/BN/ReLU6, depthwise separable blocks, global pool).
Text tower: token embedding + positional embedding + a 2-layer ``nn.TransformerEncoder`` that
takes the padding mask (so the exported graph carries the ``-inf`` mask path real text towers have),
masked mean pooling.
Head: concatenation of both embeddings -> MLP -> 10 logits.

Weights are random but seeded, so every build gives the same model.  ``edgekit run`` uses it as the
quick, self-contained example; ``examples/`` also holds a real pretrained demo.
"""
from __future__ import annotations

import torch
from torch import nn

VOCAB = 1000
SEQ_LEN = 32
IMAGE_SIZE = 32
NUM_CLASSES = 10


def _conv_bn(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    )


class ImageTower(nn.Module):
    def __init__(self, width: int = 48, dim: int = 256):
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn(3, width, stride=2),
            _conv_bn(width, width, groups=width), _conv_bn(width, 2 * width),
            _conv_bn(2 * width, 2 * width, stride=2, groups=2 * width), _conv_bn(2 * width, 4 * width),
            _conv_bn(4 * width, 4 * width, stride=2, groups=4 * width), _conv_bn(4 * width, 4 * width),
        )
        self.proj = nn.Linear(4 * width, dim)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.features(image).mean(dim=(2, 3))
        return self.proj(x)


class TextTower(nn.Module):
    def __init__(self, dim: int = 256, heads: int = 4, layers: int = 2):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, dim)
        self.pos = nn.Parameter(torch.randn(1, SEQ_LEN, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.tok(input_ids) + self.pos[:, : input_ids.shape[1]]
        x = self.encoder(x, src_key_padding_mask=attention_mask == 0)
        m = attention_mask.unsqueeze(-1).to(x.dtype)
        return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


class TinyMultimodal(nn.Module):
    def __init__(self, dim: int = 256):
        super().__init__()
        self.image = ImageTower(dim=dim)
        self.text = TextTower(dim=dim)
        self.head = nn.Sequential(nn.Linear(2 * dim, 256), nn.GELU(), nn.Linear(256, NUM_CLASSES))

    def forward(self, image, input_ids, attention_mask):
        return self.head(torch.cat([self.image(image), self.text(input_ids, attention_mask)], dim=-1))


def build() -> nn.Module:
    torch.manual_seed(0)
    return TinyMultimodal().eval()
