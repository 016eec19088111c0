"""Structured pruning (edgekit.prune): heads, per-tower ratios, width rounding, protected widths,
recipe/profile errors, and a pruned model through every exporter (slow)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import DATA, EXAMPLE, recipe_text
from edgekit.errors import InputError, TargetError

sys.path.insert(0, str(Path(__file__).parent))
import prune_models  # noqa: E402

PY = sys.executable


def _setup(tmp_path: Path, n_calib: int = 8):
    from edgekit.inputs.data import load_calibration
    from edgekit.config.recipe import load_recipe

    (tmp_path / "edgekit.toml").write_text(recipe_text(
        f"{EXAMPLE}/model.py:build", f"{DATA}/calib.npz", f"{DATA}/eval.npz",
        extra=f"max_calibration_samples = {n_calib}"))
    r = load_recipe(tmp_path / "edgekit.toml")
    return r, load_calibration(r)


def _prune(model, tmp_path, round_to=8, **spec):
    from edgekit.prune import prune_model
    from edgekit.config.recipe import PruneSpec

    r, calib = _setup(tmp_path)
    return prune_model(model, r.model.inputs, calib, PruneSpec(**spec), round_to)


def test_rounded_widths():
    from edgekit.prune.pruner import rounded_heads, rounded_width

    assert rounded_width(96, 0.3, 16) == 64      # 67.2 -> nearest multiple of 16
    assert rounded_width(96, 0.3, 8) == 64       # 67.2 -> 64 (8·8)
    assert rounded_width(100, 0.3, 8) == 72      # 70 -> 72
    assert rounded_width(48, 0.9, 16) == 16      # never below one multiple
    assert rounded_width(12, 0.5, 16) == 12      # narrower than round_to: left alone
    assert rounded_width(64, 0.0, 16) == 64
    assert rounded_heads(12, 32, 0.3, 16) == 8   # 8.4 heads -> 8 (any count works: 32 % 16 == 0)
    assert rounded_heads(4, 8, 0.3, 16) == 2     # 2.8 -> 3 heads = 24 wide, not a multiple of 16 -> 2
    assert rounded_heads(4, 64, 0.9, 16) == 1


def test_mha_heads_pruned_and_widths_rounded(tmp_path):
    """nn.MultiheadAttention heads are removed (not silently kept), every width is a multiple of round_to,
    the fusion (concat) and output widths stay, and the pruned model still runs at the same output shape."""
    from edgekit.inputs.model import count_macs, load_model

    r, calib = _setup(tmp_path)
    model = load_model(r)
    args = tuple(torch.from_numpy(calib.sample(0)[s.name]) for s in r.model.inputs)
    ref = model(*args)
    pruned, facts = _prune(model, tmp_path, round_to=16, ratio=0.5)
    assert facts["mha_replaced"] == 2
    attn = [pruned.text.encoder.layers[i].self_attn for i in range(2)]
    assert [a.num_heads for a in attn] == [2, 2]
    assert attn[0].q_proj.out_features == 2 * 64
    heads = [w for w in facts["widths"] if w["kind"] == "heads"]
    assert [(w["before"], w["after"]) for w in heads] == [(4, 2), (4, 2)]
    for w in facts["widths"]:
        assert w["after"] < w["before"]
        assert w.get("width_after", w["after"]) % 16 == 0, w
    assert pruned.head[0].in_features == 512            # concat of the two 256-d towers untouched
    assert pruned(*args).shape == ref.shape
    assert facts["macs_after"] < facts["macs_before"]
    assert facts["macs_after"] == count_macs(pruned, args)
    assert facts["protected"]["concatenation (fusion)"] >= 1


def test_per_tower_ratios(tmp_path):
    """Towers come from which recipe inputs feed them: image pruned, text (ratio 0) untouched."""
    pruned, facts = _prune(prune_models.build(), tmp_path, ratio=0.5, ratios={"image": 0.5, "text": 0.0})
    towers = {w["layer"]: w["tower"] for w in facts["widths"]}
    assert towers == {"head.0": "image+text", "image.3": "image", "image.0": "image"}
    assert pruned.image[0].out_channels == 16 and pruned.image[3].out_channels == 32
    assert pruned.block.attn.num_heads == 4 and pruned.block.ff[0].out_features == 256
    assert pruned.head[0].out_features == 32            # fusion layer: the global ratio


def test_hand_written_attention_and_fusion_protected(tmp_path):
    """q/k/v attention loses whole heads; the residual stream, the concat fusion and the output keep
    their widths."""
    pruned, facts = _prune(prune_models.build(), tmp_path, ratio=0.5)
    m = pruned
    assert m.block.attn.num_heads == 2 and m.block.attn.q.out_features == 32 and m.block.attn.o.in_features == 32
    assert m.block.attn.o.out_features == 64 and m.tok.embedding_dim == 64 and m.block.ff[2].out_features == 64
    assert m.image[-1].out_features == 64 and m.head[0].in_features == 128 and m.head[2].out_features == 10
    assert {"residual addition", "concatenation (fusion)", "model output"} <= set(facts["protected"])


def test_broken_forward_names_the_layer(tmp_path, monkeypatch):
    """Without the attention protection, channel pruning of a q/k/v projection breaks the head reshape:
    the forward check after that step fails with the layer named."""
    import edgekit.prune.pruner as pruner

    real = pruner.blocker
    monkeypatch.setattr(pruner, "blocker", lambda g, p: None if real(g, p) == "attention projection (pruned by "
                                                                              "heads)" else real(g, p))
    monkeypatch.setattr(pruner, "prune_heads_all", lambda *a, **k: None)
    with pytest.raises(TargetError, match=r"forward broke after pruning output channels of block\.attn\.[qkv]"):
        _prune(prune_models.build(), tmp_path, ratio=0.5)


@pytest.mark.parametrize("name, fusion_layer, why", [
    ("stacked_tokens", "mix", "fusion: token features flattened"),
    ("bilinear", "p[it]", "fusion: image and text channels coupled"),
])
def test_fusion_that_breaks_without_protection(tmp_path, monkeypatch, name, fusion_layer, why):
    """Two fusions Torch-Pruning alone gets wrong: the tower embeddings stacked as two tokens, mixed and
    flattened into the head; bilinear pooling (outer product). With the protection the towers are
    pruned and the fusion widths kept; without it the forward breaks at the fusion, and the error
    names that layer."""
    import edgekit.prune.pruner as pruner

    model = prune_models.fusion(name)
    r, calib = _setup(tmp_path)
    args = tuple(torch.from_numpy(calib.sample(0)[s.name]) for s in r.model.inputs)
    ref, head_in = model(*args), model.head.in_features
    pruned, facts = _prune(model, tmp_path, ratio=0.5)
    assert pruned(*args).shape == ref.shape
    assert facts["protected"][why] >= 1
    towers = {w["tower"] for w in facts["widths"]}
    assert {"image", "text"} <= towers                  # both towers still lose width
    assert pruned.image[0].out_channels == 16 and pruned.text[0].out_features == 48
    assert pruned.head.in_features == head_in

    monkeypatch.setattr(pruner, "fusion_blocker", lambda *a: None)
    with pytest.raises(TargetError, match=rf"forward broke after pruning output channels of {fusion_layer} "):
        _prune(prune_models.fusion(name), tmp_path, ratio=0.5)


def test_recovery_distills_towards_teacher(tmp_path):
    from edgekit.prune import make_batches, outputs_of
    from edgekit.prune.recovery import kd_loss

    r, calib = _setup(tmp_path)
    model = prune_models.build()
    samples = [tuple(torch.from_numpy(calib.sample(i)[s.name]) for s in r.model.inputs) for i in range(len(calib))]
    batches = make_batches(model, samples, 4)
    teacher = outputs_of(model, batches)
    pruned, facts = _prune(model, tmp_path, ratio=0.5, recover_steps=30, recover_lr=1e-3)
    assert facts["distill_loss"][1] < facts["distill_loss"][0]
    assert kd_loss(pruned, batches, teacher) < facts["distill_loss"][0]


def test_recovery_trains_only_pruned_towers_and_keeps_the_better_weights(tmp_path):
    """Only the pruned tower is trained (an untouched pretrained tower must not drift), and distillation
    steps that make the model follow the teacher worse on held-out batches (a learning rate far too
    high) are undone."""
    model = prune_models.build()
    text_before = {k: v.clone() for k, v in model.block.state_dict().items()}
    pruned, facts = _prune(model, tmp_path, ratio=0.0, ratios={"image": 0.5}, recover_steps=5, recover_lr=1e-3)
    assert facts["trained_towers"] == ["image"]
    assert all(torch.equal(v, pruned.block.state_dict()[k]) for k, v in text_before.items())

    _, facts = _prune(prune_models.build(), tmp_path, ratio=0.5, recover_steps=5, recover_lr=10.0)
    assert facts["kept_step"] == 0          # early stopping: every step made the held-out loss worse


def test_macs_budget(tmp_path):
    """[prune] macs_budget scales the ratios until the pruned model keeps at most that share of MACs;
    a budget no pruning can meet fails naming it."""
    pruned, facts = _prune(prune_models.build(), tmp_path, ratios={"image": 0.5, "text": 0.25}, macs_budget=0.6)
    assert facts["macs_after"] <= 0.6 * facts["macs_before"]
    assert facts["ratio_scale"] > 0
    _, light = _prune(prune_models.build(), tmp_path, ratios={"image": 0.5, "text": 0.25}, macs_budget=0.95)
    assert facts["macs_after"] < light["macs_after"] <= 0.95 * light["macs_before"]
    with pytest.raises(TargetError, match=r"macs_budget 0\.01 cannot be met: pruning every prunable layer by 0\.9 "
                                          r"keeps 0\.\d+ of the MACs"):
        _prune(prune_models.build(), tmp_path, macs_budget=0.01)


def test_recipe_prune_errors(write_recipe):
    from edgekit.config.recipe import load_recipe

    assert load_recipe(write_recipe()).prune is None       # off unless the recipe has [prune]
    with pytest.raises(InputError, match=r"prune\.ratios: audio is not a modality of \[model\] inputs"):
        load_recipe(write_recipe(extra="[prune]\nratio = 0.2\nratios = { audio = 0.3 }"))
    with pytest.raises(InputError, match=r"prune\.ratio"):
        load_recipe(write_recipe(extra="[prune]\nratio = 1.5"))
    with pytest.raises(InputError, match=r"prune\.ratios.*must be >= 0 and < 1"):
        load_recipe(write_recipe(extra="[prune]\nratios = { image = 1.0 }"))
    with pytest.raises(InputError, match=r"prune\.macs_budget"):
        load_recipe(write_recipe(extra="[prune]\nmacs_budget = 1.2"))


def test_profile_round_to(tmp_path):
    from edgekit.config.profiles import load_profile

    assert load_profile("ort-cpu").prune.round_to == 16
    assert load_profile("openvino-x86").prune.round_to == 16
    assert load_profile("tflite-mobile").prune.round_to == 8
    text = (Path(load_profile("ort-cpu").path).read_text().replace("round_to = 16", "round_to = 0"))
    (tmp_path / "bad.toml").write_text(text)
    with pytest.raises(InputError, match=r"bad\.toml: prune\.round_to"):
        load_profile(str(tmp_path / "bad.toml"))


def _quick_profiles(folder: Path) -> list[str]:
    """Copies of the three implemented targets' profiles with a short benchmark (this test checks
    the artifacts, not their speed)."""
    from edgekit.config.profiles import load_profile

    paths = []
    for name in ("ort-cpu", "openvino-x86", "tflite-mobile"):
        text = Path(load_profile(name).path).read_text()
        text = text.split("[bench]")[0] + "[bench]\nwarmup = 1\nruns = 3\n"
        (folder / f"{name}.toml").write_text(text)
        paths.append(f"{name}.toml")
    return paths


@pytest.mark.slow
def test_pruned_model_through_every_exporter(write_recipe, workdir):
    """`edgekit run` with [prune]: every target builds a pruned + quantized artifact (ONNX Runtime,
    OpenVINO, LiteRT), verified and timed next to the unpruned int8 one, with the facts in the report."""
    import subprocess

    targets = json.dumps(_quick_profiles(workdir))
    recipe = write_recipe(targets=targets,
                          extra="max_calibration_samples = 16\nmax_evaluation_samples = 8\n\n"
                                "[prune]\nratio = 0.3\nrecover_steps = 3")
    out = workdir / "out"
    p = subprocess.run([PY, "-m", "edgekit", "run", str(recipe), "--out", str(out)], capture_output=True,
                       text=True, timeout=1200)
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads((out / "report.json").read_text())
    assert len(doc["targets"]) == 3
    for row in doc["targets"]:
        assert row["status"] == "ok", row["reason"]
        pr = row["prune"]
        assert pr["macs_after"] < pr["macs_before"] and pr["params_after"] < pr["params_before"]
        assert "/pruned/" in row["optimized"]["artifact"]
        assert row["extras"]["int8_unpruned"]["metric"] is not None
        assert pr["metric_after_quantize"] == row["optimized"]["metric"]
        assert {"metric_after_prune", "metric_after_recovery", "speedup_vs_int8_unpruned"} <= set(pr)
        step = {"ort-cpu": 16, "openvino-x86": 16, "tflite-mobile": 8}[row["name"]]
        assert all(w.get("width_after", w["after"]) % step == 0 for w in pr["widths"])
    md = (out / "report.md").read_text()
    assert md.count("**pruning**") == 3 and "pruning's latency effect" in md
