"""The search policy (edgekit.quantize.search) against a small in-test backend.

The backend here is not a stand-in for a toolchain: it is a complete, tiny quantizer in torch (int8
fake quantization of every Linear's weights, per output channel, and of its output, per tensor, with
min/max ranges calibrated on the calibration set) that answers the questions the policy asks
(``quality_fixes``, ``units_of_modules``, ``rank_activations``, ``keep_in_float``). It lets the tests
pin the policy itself: the rung order, re-ranking after every step, the k = 1, 2, 4 ladder, broken
activations at once, the stopping rules and the choice of the shipped step. The toolchains' own
answers are tested with the real toolchains (test_weight_sensitivity.py, test_quantize_search.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgekit.backends.base import Artifact, Backend, BackendInfo, Fix, Options
from edgekit.inputs.data import SampleSet
from edgekit.quantize.search import SearchContext, search
from edgekit.quantize.sqnr import channel_sqnr


class Chain(nn.Module):
    """Six Linear layers. ``l1``'s output has one channel 300x the others (per-tensor int8 rounds the rest
    to zero); ``head`` has the weights of a folded standardisation (one huge column per row)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l0, self.l1, self.l2, self.l3, self.l4 = (nn.Linear(16, 16) for _ in range(5))
        self.head = nn.Linear(16, 4)
        with torch.no_grad():
            self.l1.weight[0] *= 300.0
            self.l2.weight[:, 0] = 0.0         # the outlier carries nothing downstream, the others do
            self.head.weight[:, 3] = 2000.0    # feature 3 of l4's output is ~constant: no effect in fp32
            self.l4.weight[3] = 0.0
            self.l4.bias[3] = 0.0

    def forward(self, x):
        for m in (self.l0, self.l1, self.l2, self.l3, self.l4):
            x = torch.tanh(m(x)) if m is not self.l1 else m(x)
        return self.head(x)


class Opts(Options):
    float_units: list[str] = []
    symmetric_ranges: bool = False


def fq(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    scale = max(hi - lo, 1e-8) / 255
    zero = round(-lo / scale)
    return (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale


def fq_weight(w: torch.Tensor) -> torch.Tensor:
    s = (w.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-12)
    return torch.round(w / s).clamp(-127, 127) * s


class TorchInt8(Backend):
    """int8 fake quantization of a torch model's Linear layers; artifacts are that model, by path."""

    ExportOptions = Options
    QuantizeOptions = Opts
    RuntimeOptions = Options

    def __init__(self):
        super().__init__(BackendInfo("torch-int8", "tests:TorchInt8", ".pt", (), (), "none"))
        self.built: dict[str, nn.Module] = {}
        self.ranked: list[str] = []  # the artifacts rank_activations was asked about, in order

    def export_fp32(self, model, args, inputs, out: Path, opts) -> Artifact:
        path = out / "model_fp32.pt"
        path.write_bytes(b"fp32")
        self.built[str(path)] = model
        return Artifact(path=path, precision="fp32", state=model)

    def quantize(self, fp32: Artifact, calibration, out: Path, opts: Opts) -> Artifact:
        model = fp32.state
        layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        ranges: dict[str, list[float]] = {}
        hooks = [m.register_forward_hook(lambda m, a, y, n=n: ranges.setdefault(n, []).extend(
            [float(y.min()), float(y.max())])) for n, m in layers.items()]
        with torch.no_grad():
            for s in calibration:
                model(torch.from_numpy(s["x"]))
        for h in hooks:
            h.remove()
        quant = {}
        for n, m in layers.items():
            if n in opts.float_units:
                continue
            lo, hi = min(ranges[n]), max(ranges[n])
            if opts.symmetric_ranges:
                lo, hi = -max(-lo, hi), max(-lo, hi)
            quant[n] = (fq_weight(m.weight.detach()), lo, hi)

        def run(x: torch.Tensor, probe: dict | None = None) -> torch.Tensor:
            saved = {n: layers[n].weight.data for n in quant}
            hs = []
            for n, (w, lo, hi) in quant.items():
                layers[n].weight.data = w

                def hook(m, a, y, n=n, lo=lo, hi=hi):
                    q = fq(y, lo, hi)
                    if probe is not None:
                        probe[n] = (y.detach().numpy(), q.detach().numpy())
                    return q
                hs.append(layers[n].register_forward_hook(hook))
            try:
                with torch.no_grad():
                    return model(x)
            finally:
                for h in hs:
                    h.remove()
                for n, w in saved.items():
                    layers[n].weight.data = w

        path = out / "model_int8.pt"
        path.write_bytes(repr(sorted(quant)).encode())
        self.built[str(path)] = run
        return Artifact(path=path, precision="int8", details={"float": sorted(opts.float_units)}, state=run)

    def load(self, path: Path, runtime):
        fn = self.built[str(path)]

        class Runner:
            device = "torch"

            def run(self, feeds):
                return [fn(torch.from_numpy(feeds["x"])).numpy()]

            def signature(self):
                return {"inputs": [{"name": "x"}], "outputs": [{"name": "y"}]}

            def synthetic_feed(self):
                return {"x": np.zeros((1, 16), np.float32)}
        return Runner()

    # the search's questions
    def quality_fixes(self, fp32, opts):
        return [] if opts.symmetric_ranges else [Fix("symmetric ranges", {"symmetric_ranges": True})]

    def units_of_modules(self, fp32, modules):
        return list(modules)

    def rank_activations(self, art, calibration, samples):
        self.ranked.append(Path(art.path).parent.name)
        pre: dict[str, list] = {}
        post: dict[str, list] = {}
        for i in range(min(samples, len(calibration))):
            probe: dict = {}
            art.state(torch.from_numpy(calibration.sample(i)["x"]), probe)
            for n, (a, b) in probe.items():
                pre.setdefault(n, []).append(a)
                post.setdefault(n, []).append(b)
        return sorted((([n], channel_sqnr(pre[n], post[n])) for n in pre), key=lambda t: t[1])

    def float_units(self, opts):
        return list(opts.float_units)

    def keep_in_float(self, opts, units):
        return opts.model_copy(update={"float_units": sorted(set(opts.float_units) | set(units))})


def _mk(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _sets(tmp_path: Path):
    rng = np.random.default_rng(0)
    calib = SampleSet(tmp_path / "c.npz", {"x": rng.standard_normal((32, 16)).astype(np.float32)}, None)
    evals = [{"x": rng.standard_normal((1, 16)).astype(np.float32)} for _ in range(24)]
    return calib, evals


def _run(tmp_path: Path, max_drop: float, budget: float = 60.0, max_steps: int = 12, model=None,
         rewrites: bool = False, distill_steps: int = 0, profile_opts=None):
    """The build worker's flow: quality methods, first quantization, then the search."""
    from edgekit.quantize.quality import prepare

    model = model or Chain().eval()
    backend = TorchInt8()
    calib, evals = _sets(tmp_path)
    with torch.no_grad():
        ref = np.stack([model(torch.from_numpy(s["x"])).numpy().reshape(-1) for s in evals])
    fp32 = backend.export_fp32(model, (), [], tmp_path, Options())
    export = (lambda m, name: backend.export_fp32(m, (), [], _mk(tmp_path / name), Options())) if rewrites else None
    start = prepare(backend, fp32, Opts(), model, calib, export)
    first = backend.quantize(start.source or fp32, calib, tmp_path, start.opts)
    ctx = SearchContext(target="t", backend=backend, runtime=Options(), calibration=calib, samples=evals,
                        reference=ref, labels=None, metric="cosine", max_drop=max_drop, time_budget_s=budget,
                        max_steps=max_steps, timing_runs=3, model=model, export=export, distill_steps=distill_steps,
                        profile_opts=profile_opts)
    art, outcome = search(ctx, fp32, first, start, tmp_path)
    return ctx, backend, art, outcome


def test_first_build_within_budget_is_shipped_without_a_search(tmp_path):
    ctx, backend, art, outcome = _run(tmp_path, max_drop=1.0)
    assert outcome.status == "ok" and len(outcome.steps) == 1 and outcome.chosen == 0
    assert outcome.stopped == "first quantization within budget" and backend.ranked == []


def test_first_build_has_the_quality_fixes_and_the_weak_weight_layers_handled(tmp_path):
    ctx, backend, art, outcome = _run(tmp_path, max_drop=1e-6, max_steps=1)
    first = outcome.steps[0]
    assert first.step.startswith("profile's quantization + symmetric ranges + ") and "weight SQNR" in first.step
    assert first.kept_float == ["head"]          # the folded-standardisation layer, found on the torch model
    assert backend.ranked == [tmp_path.name]     # ranked once, on the first build, for the first fallback


def test_fallback_reranks_the_latest_build_after_every_step_and_doubles_k(tmp_path):
    ctx, backend, art, outcome = _run(tmp_path, max_drop=1e-6, max_steps=6)
    fallback = outcome.steps[1:]
    assert len(fallback) >= 2
    # ranked once per fallback step: first on the first build, then each time on the previous step's build
    assert backend.ranked[0] == tmp_path.name
    assert backend.ranked[1:] == [f"step{i}" for i in range(1, len(backend.ranked))]
    sizes = [len(s.kept_float) for s in outcome.steps]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)    # cumulative, growing
    assert outcome.stopped in ("no more candidates", "max_steps 6 reached", "within budget")


def test_the_outlier_activation_goes_first_and_the_search_meets_a_reachable_budget(tmp_path):
    ctx, backend, art, outcome = _run(tmp_path, max_drop=0.002)
    assert outcome.steps[0].drop > 0.002
    assert outcome.status == "ok" and outcome.after["drop"] <= 0.002 and outcome.stopped == "within budget"
    first_fallback = outcome.steps[1]
    assert "l1" in first_fallback.kept_float   # the 300x channel's layer is ranked worst
    assert outcome.chosen == len(outcome.steps) - 1 and Path(art.path).parent == tmp_path
    assert not (tmp_path / "search").exists()


def test_a_budget_smaller_than_any_step_runs_at_most_one_step_and_fails_honestly(tmp_path):
    ctx, backend, art, outcome = _run(tmp_path, max_drop=1e-6, budget=1e-4)
    assert len(outcome.steps) <= 2 and "time budget" in outcome.stopped
    assert outcome.status == "failed" and outcome.reason.startswith("accuracy budget not met (best drop ")


def test_everything_in_float_ends_the_ladder(tmp_path):
    ctx, backend, art, outcome = _run(tmp_path, max_drop=-1.0)  # unreachable: never within budget
    assert outcome.stopped == "no more candidates"
    assert set(outcome.steps[-1].kept_float) == {"l0", "l1", "l2", "l3", "l4", "head"}
    assert outcome.status == "failed"


@pytest.mark.parametrize("drops, lat, want", [
    ([0.5, 0.001, 0.002], [1.0, 3.0, 2.0], 2),    # the fastest within budget
    ([0.5, 0.3, 0.4], [1.0, 3.0, 2.0], 1),        # none within: the lowest drop
])
def test_choose_best(drops, lat, want):
    from edgekit.quantize.search import Candidate, Scored, choose_best

    hist = [Scored(Candidate(str(i), None), None, 0.0, d, t, 0.0) for i, (d, t) in enumerate(zip(drops, lat))]
    assert hist.index(choose_best(hist, 0.01)) == want


def test_a_subset_pass_is_checked_on_the_whole_evaluation_set(tmp_path):
    """A step within budget on the scoring subset counts only if the whole set agrees."""
    from edgekit.quantize.search import Candidate

    backend, model = TorchInt8(), Chain().eval()
    calib, evals = _sets(tmp_path)
    fp32 = backend.export_fp32(model, (), [], tmp_path, Options())
    art = backend.quantize(fp32, calib, tmp_path, Opts())
    outs = np.stack([art.state(torch.from_numpy(s["x"])).numpy().reshape(-1) for s in evals])
    ref = outs.copy()
    ref[8:] = np.random.default_rng(1).standard_normal(ref[8:].shape)  # the subset agrees, the rest does not

    def ctx(subset):
        return SearchContext(target="t", backend=backend, runtime=Options(), calibration=calib, samples=evals,
                             reference=ref, labels=None, metric="cosine", max_drop=0.01, time_budget_s=60,
                             timing_runs=2, model=model, subset=subset)

    c = ctx(8)
    scored = c.evaluate(Candidate("x", Opts()), art, 0.0)
    assert scored.scored_on == 24 and scored.drop > 0.5        # re-scored on all 24: not within budget
    assert c.fp32_metric == pytest.approx(1.0) and c.subset == 8
    far = ctx(4)
    ref[:] = outs                                               # now every sample agrees
    scored = far.evaluate(Candidate("x", Opts()), art, 0.0)
    assert scored.scored_on == 24 and scored.drop == pytest.approx(0.0, abs=1e-6)
    ref[4:] = -outs[4:]
    scored = ctx(4).evaluate(Candidate("x", Opts()), art, 0.0)
    assert scored.scored_on == 24 and scored.drop > 1.0


def test_with_rewrites_the_weak_linear_is_standardized_instead_of_kept_in_float(tmp_path):
    """The scale of a folded standardisation moves into the activation (edgekit.quantize.rewrite): the
    layer stays int8, only its tiny elementwise input transform is kept float, and it quantizes about as
    well as the layer kept in float (the remaining drop is l1's outlier channel)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _, _, _, in_float = _run(tmp_path / "a", max_drop=1.0)
    _, backend, _, rewritten = _run(tmp_path / "b", max_drop=1.0, rewrites=True)
    first = rewritten.steps[0]
    assert "1 standardized" in first.step and first.kept_float == ["head.0"]
    assert abs(first.drop - in_float.steps[0].drop) < 0.002


def test_quantization_aware_distillation_is_the_rung_before_float_fallback(tmp_path):
    ctx, backend, art, outcome = _run(tmp_path, max_drop=1e-6, max_steps=2, rewrites=True, distill_steps=30)
    labels = [s.step for s in outcome.steps]
    assert "standardized" in labels[0] and labels[1].startswith("quantization-aware distillation (30 steps")
    assert labels[2].startswith("float fallback")
    # the distilled model was exported and quantized with the options of the best step before it
    distilled = ctx.history[1].candidate
    assert distilled.model is not None and Path(distilled.source.path).parent.name == "distilled"
    assert distilled.opts == ctx.history[0].candidate.opts


def test_fallback_order_prefers_the_most_noise_removed_per_mac():
    from edgekit.quantize.search import by_gain_per_cost

    fresh = [({"big"}, 12.0), ({"small"}, 14.0), ({"eltwise"}, 20.0), ({"broken"}, 3.0)]
    macs = {"big": 10_000_000, "small": 100_000, "eltwise": 0, "broken": 50_000_000}
    order = [next(iter(u)) for u, _, _ in by_gain_per_cost(fresh, macs)]
    assert order[0] == "broken"                     # broken first, whatever it costs
    assert order.index("small") < order.index("big")  # 1.6x the noise of "small" is not worth 100x the MACs
    assert order.index("eltwise") < order.index("big")
    # no costs known: the SQNR ranking's order
    assert [next(iter(u)) for u, _, _ in by_gain_per_cost(fresh, {})] == ["broken", "big", "small", "eltwise"]


def test_the_profiles_own_quantization_is_tried_when_the_quality_methods_miss(tmp_path):
    """Rung 0: edgekit is never worse off than the vendor flow its quality methods improve on."""
    ctx, backend, art, outcome = _run(tmp_path, max_drop=1e-6, max_steps=2, profile_opts=Opts())
    assert outcome.steps[0].step.startswith("profile's quantization + ")
    assert outcome.steps[1].step == "profile's quantization (without the quality methods)"
    assert ctx.history[1].candidate.opts == Opts() and outcome.steps[1].kept_float == []
    assert outcome.steps[2].step.startswith("float fallback")
