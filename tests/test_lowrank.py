"""Low-rank factorization (edgekit.prune.lowrank, ``[prune.low_rank]``): the rank rule, the energy bound,
layers where it does not pay, and the two thin layers in every exported artifact (real toolchains)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from edgekit.config.recipe import InputSpec
from edgekit.errors import InputError
from edgekit.prune.lowrank import Factorized, factorize, rank_for


def _decaying(out_f: int, in_f: int, seed: int = 0) -> torch.Tensor:
    """A weight with a decaying spectrum, as trained layers have."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out_f, out_f, generator=g))
    v, _ = torch.linalg.qr(torch.randn(in_f, in_f, generator=g))
    k = min(out_f, in_f)
    return (u[:, :k] * torch.exp(-torch.arange(k) / 12.0)) @ v[:, :k].T


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.big = nn.Linear(256, 192)
        self.small = nn.Linear(192, 16)
        with torch.no_grad():
            self.big.weight.copy_(_decaying(192, 256))

    def forward(self, x):
        return self.small(torch.relu(self.big(x)))


def test_rank_rule_keeps_the_energy_and_rounds_up():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0, 0.5])
    # energies 16, 4, 1, 1, 0.25 of 22.25: cumulative 0.719, 0.899, 0.944, ...
    assert rank_for(s, 16 / 22.25, 1) == 1 and rank_for(s, 0.89, 1) == 2 and rank_for(s, 0.9, 1) == 3
    assert rank_for(s, 0.9, 2) == 4
    assert rank_for(s, 1.0, 1) == 5 and rank_for(s, 1.0, 8) == 5  # never past the full rank


def test_factorized_outputs_stay_within_the_energy_bound():
    torch.manual_seed(0)
    m = Mlp().eval()
    w, b = m.big.weight.detach().clone(), m.big.bias.detach().clone()
    rows = factorize(m, lambda name: 0.95, 8, [], ["Linear"], 1024)
    big = next(r for r in rows if r["layer"] == "big")
    assert isinstance(m.big, Factorized) and big["rank"] % 8 == 0 and big["kept_energy"] >= 0.95
    first, second = m.big
    assert (first.in_features, first.out_features, second.out_features) == (256, big["rank"], 192)
    assert first.bias is None and torch.equal(second.bias, b)
    assert big["params_after"] == big["rank"] * (256 + 192) < big["params_before"] == 256 * 192
    x = torch.randn(64, 256)
    with torch.no_grad():
        err = (m.big(x) - (x @ w.T + b)).norm(dim=1)
    # |W x - W_r x| <= s_{r+1} |x| for every input, and the weight error is the energy dropped
    assert torch.all(err <= big["sigma_next"] * x.norm(dim=1) * (1 + 1e-4) + 1e-5)
    w_r = second.weight @ first.weight
    rel = float(((w - w_r).norm() / w.norm()) ** 2)
    assert rel == pytest.approx(1 - big["kept_energy"], abs=1e-4)


def test_a_layer_where_factorization_does_not_pay_is_left_alone():
    m = Mlp().eval()
    rows = {r["layer"]: r for r in factorize(m, lambda name: 0.9999, 1, [], ["Linear"], 0)}
    assert isinstance(m.small, nn.Linear) and "does not pay" in rows["small"]["skipped"]  # 16 x 192: r*(208) >= 3072
    m2 = Mlp().eval()
    rows = {r["layer"]: r for r in factorize(m2, lambda name: 0.9, 1, [], ["Linear"], 100_000)}
    assert isinstance(m2.big, nn.Linear) and "< min_size" in rows["big"]["skipped"]
    m3 = Mlp().eval()
    rows = {r["layer"]: r for r in factorize(m3, lambda name: 0.9, 1, ["sm*"], ["Linear"], 0)}
    assert set(rows) == {"small"} and isinstance(m3.big, nn.Linear)  # include patterns choose the layers


@pytest.mark.parametrize("backend_name", ["onnxruntime", "openvino", "litert"])
def test_exported_artifacts_carry_the_two_thin_layers(backend_name, tmp_path):
    from edgekit.backends import get_backend

    backend = get_backend(backend_name)
    spec = [InputSpec(name="x", shape=[1, 256], dtype="float32")]
    x = torch.randn(1, 256)
    counts = []
    for tag, energy in (("plain", None), ("factorized", 0.9)):
        m = Mlp().eval()
        if energy:
            factorize(m, lambda name: energy, 8, ["big"], ["Linear"], 0)
        (tmp_path / tag).mkdir()
        art = backend.export_fp32(m, (x,), spec, tmp_path / tag, backend.ExportOptions())
        counts.append(_matmuls(backend_name, art.path))
    assert counts[1] == counts[0] + 1, counts  # big: one Linear became two


def _matmuls(backend_name: str, path) -> int:
    if backend_name == "onnxruntime":
        import onnx

        return sum(n.op_type in ("MatMul", "Gemm") for n in onnx.load(str(path)).graph.node)
    if backend_name == "openvino":
        import openvino as ov

        return sum(op.get_type_name() == "MatMul" for op in ov.Core().read_model(str(path)).get_ops())
    from ai_edge_litert.interpreter import Interpreter

    ops = Interpreter(model_path=str(path))._get_ops_details()
    return sum(o["op_name"] in ("FULLY_CONNECTED", "BATCH_MATMUL") for o in ops)


def test_energies_must_name_a_tower(write_recipe):
    from edgekit.config.recipe import load_recipe

    path = write_recipe(extra="[prune.low_rank]\nenergies = { audio = 0.9 }\n")
    with pytest.raises(InputError, match=r"prune\.low_rank\.energies: audio is not a modality"):
        load_recipe(path)
    path = write_recipe(extra="[prune.low_rank]\nenergies = { text = 1.5 }\n")
    with pytest.raises(InputError, match=r"each energy must be > 0 and <= 1"):
        load_recipe(path)


@pytest.mark.slow
def test_quick_example_with_low_rank_reports_ranks_macs_and_the_latency_effect(tmp_path):
    import json

    from tests.test_remote_and_gpu_arm import edgekit, recipe

    rec = recipe(tmp_path, ["ort-cpu"])
    rec.write_text(rec.read_text() + '\n[prune]\nratios = { text = 0.25 }\nrecover_steps = 10\n\n[prune.low_rank]\n'
                                      'energies = { text = 0.8 }\ninclude = ["*.linear1", "*.linear2"]\nmin_size = 4096\n')
    p = edgekit("run", rec, "--out", tmp_path / "run")
    assert p.returncode in (0, 1), p.stderr[-3000:]  # 1: a gate (speed-up) may fail on a tiny model
    t = json.loads((tmp_path / "run" / "report.json").read_text())["targets"][0]
    assert t["status"] == "ok", t["reason"]
    lr = t["prune"]["low_rank"]
    done = [r for r in lr["layers"] if r.get("params_after")]
    assert len(done) == len(lr["layers"]) == 4 and lr["factorized"] == 4  # linear1/linear2 of both layers
    assert all(r["rank"] % 16 == 0 and r["kept_energy"] >= 0.8 for r in done)  # ort-cpu's round_to
    assert lr["macs_after"] < lr["macs_before"] and lr["params_after"] < lr["params_before"]
    assert "metric_after_factorization" in lr and "metric_after_recovery" in t["prune"]
    assert t["extras"]["int8_unpruned"]["latency_ms"]["p50"] > 0 and t["prune"]["speedup_vs_int8_unpruned"] > 0
    # pruned, then factorized: the pruned unfactorized int8 is timed in the same rounds, to isolate factorization
    assert t["extras"]["int8_unfactorized"]["latency_ms"]["p50"] > 0 and lr["reference"] == "int8_unfactorized"
    lo, hi = lr["speedup_vs_unfactorized_int8_ci"]
    assert lo <= lr["speedup_vs_unfactorized_int8"] <= hi and lr["reference_metric"] > 0.9
    md = (tmp_path / "run" / "report.md").read_text()
    assert "**low-rank factorization**" in md and "→ rank" in md and "factorization's latency effect here" in md
