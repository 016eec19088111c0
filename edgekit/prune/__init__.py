"""Structured pruning per target, before export: channels, FFN neurons and attention heads, with
hardware-aligned widths, Taylor importance from the calibration data and label-free recovery.

Kept apart, Torch-Pruning style: :mod:`.towers` (which layers each recipe input feeds),
:mod:`.attention` (heads as units), :mod:`.importance` (calibration gradients), :mod:`.pruner`
(dependency-graph groups, protection, width rounding), :mod:`.recovery` (distillation, BatchNorm).
No export toolchain is imported here: the pruned model is a plain ``nn.Module`` for any backend.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from edgekit.errors import TargetError
from edgekit.inputs.model import count_macs, count_params, example_inputs, first_output
from edgekit.progress import say, step
from edgekit.config.recipe import InputSpec, PruneSpec

IMPORTANCE_SAMPLES = 64   # calibration samples whose gradients rank channels and heads
MAX_RATIO = 0.9           # no layer loses more than this, whatever a MACs budget asks
BUDGET_TRIES = 7          # bisection steps on the ratio scale for [prune] macs_budget


def make_batches(model: nn.Module, samples: Sequence[tuple], size: int) -> list[tuple]:
    """Stack batch-1 samples into batches of ``size`` when the model accepts a batch (else size 1)."""
    if size > 1 and len(samples) > 1:
        try:
            probe = tuple(torch.cat(x) for x in zip(*samples[:2]))
            with torch.no_grad():
                ok = first_output(model(*probe)).shape[0] == 2
        except Exception:  # noqa: BLE001 - a model fixed to batch 1 is fine, just slower
            ok = False
        if not ok:
            size = 1
    return [tuple(torch.cat(x) for x in zip(*samples[i : i + size])) for i in range(0, len(samples), size)]


def outputs_of(model: nn.Module, batches: Sequence[tuple]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [first_output(model(*b)).detach().float() for b in batches]


@dataclass
class _Analysis:
    """What pruning needs to know about the model before any width changes."""

    samples: list[tuple]
    batches: list[tuple]
    teacher: list[torch.Tensor]
    towers: dict[str, set[str]]
    heads: list
    names: dict


def prune_model(model: nn.Module, specs: Sequence[InputSpec], calib, spec: PruneSpec, round_to: int,
                prefix: str = "prune", evaluate: Optional[Callable[[nn.Module], float]] = None,
                keep: Optional[dict] = None) -> tuple[nn.Module, dict]:
    """Prune ``model`` in place (and return it) per ``spec``; return the facts for the report.
    Steps: analyse (towers, attention, Taylor importance) -> choose the ratio scale (MACs budget) ->
    prune -> factorize (``spec.low_rank``) -> recover (distillation, BatchNorm) -> freeze. ``keep``: when
    both pruning and factorization run, ``keep["unfactorized"]`` gets the pruned model before
    factorization (the latency reference that isolates what factorization adds)."""
    model.eval()
    facts: dict = {"ratio": spec.ratio, "ratios": dict(spec.ratios), "round_to": round_to,
                   "recover_steps": spec.recover_steps, "params_before": count_params(model)}
    an = _analyse(model, specs, calib, spec, prefix, facts)
    # a MACs budget alone (no ratio set) scales a uniform ratio
    default = 1.0 if spec.macs_budget is not None and not (spec.ratio or any(spec.ratios.values())) else spec.ratio
    cut = _cutter(an, spec, default, round_to)
    scale = 1.0
    if spec.macs_budget is not None:
        scale = _scale_for_budget(model, cut, max([default, *spec.ratios.values()]), spec.macs_budget,
                                  facts["macs_before"], an.samples[0], prefix)
        facts["macs_budget"], facts["ratio_scale"] = spec.macs_budget, round(scale, 4)
    with step(prefix, f"prune (ratio {spec.ratio}, per tower {dict(spec.ratios) or '-'}"
                      + (f", x{scale:.3f} for a MACs budget of {spec.macs_budget:g}" if spec.macs_budget else "")
                      + f", widths to multiples of {round_to})") as s:
        from edgekit.prune.pruner import Plan

        plan = cut(model, scale) if default or any(spec.ratios.values()) else Plan()  # low rank alone: no cut
        for w in plan.widths:
            mods = an.towers.get(w["layer"], set())
            if w["kind"] == "heads":
                mods = next((an.towers[an.names[h.q]] for h in an.heads if h.name == w["layer"]), set())
            w["tower"] = "+".join(sorted(mods)) or "none"
        facts.update(params_after=count_params(model), macs_after=count_macs(model, an.samples[0]),
                     widths=plan.widths, protected=plan.protected)
        s["note"] = (f"MACs {facts['macs_before'] / 1e6:.1f}M -> {facts['macs_after'] / 1e6:.1f}M, "
                     f"params {facts['params_before'] / 1e6:.2f}M -> {facts['params_after'] / 1e6:.2f}M")
    if evaluate is not None:
        facts["metric_after_prune"] = round(evaluate(model), 6)
    factorized: set[str] = set()
    if spec.low_rank is not None:
        if keep is not None and plan.widths:
            keep["unfactorized"] = copy.deepcopy(model).eval()
            for p in keep["unfactorized"].parameters():
                p.requires_grad_(False)
        factorized = _low_rank(model, an, spec.low_rank, round_to, prefix, facts, evaluate)
    if spec.recover_steps > 0 and (plan.widths or factorized):
        _recover(model, an, plan, spec, prefix, facts, factorized)
        _forward_check(model, an, "recovery")
        if evaluate is not None:
            facts["metric_after_recovery"] = round(evaluate(model), 6)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), facts


def _analyse(model: nn.Module, specs: Sequence[InputSpec], calib, spec: PruneSpec, prefix: str,
             facts: dict) -> _Analysis:
    """Replace nn.MultiheadAttention by prunable q/k/v attention (checked equal), count MACs, find which
    tower feeds each layer, accumulate Taylor gradients on the calibration data, find the heads."""
    from edgekit.prune.attention import find_heads, replace_mha
    from edgekit.prune.importance import accumulate_gradients
    from edgekit.prune.towers import layer_modalities

    samples = [example_inputs(specs, calib.sample(i)) for i in range(len(calib))]
    batches = make_batches(model, samples, spec.batch_size)
    teacher = outputs_of(model, batches)
    with step(prefix, "prune: analyse (towers, attention, Taylor importance)") as s:
        facts["mha_replaced"] = replace_mha(model)
        if facts["mha_replaced"]:
            got = outputs_of(model, batches[:1])[0]
            if not torch.allclose(got, teacher[0], rtol=1e-3, atol=1e-4 * float(teacher[0].abs().max()) + 1e-5):
                raise TargetError("prune: replacing nn.MultiheadAttention with q/k/v attention changed the "
                                  f"outputs (max diff {float((got - teacher[0]).abs().max()):.3g})")
        # MACs counted on the q/k/v form: torch's FLOP counter misses the fused MHA kernel's matmuls.
        facts["macs_before"] = count_macs(model, samples[0])
        towers = layer_modalities(model, specs, samples[:4])
        n_imp = max(1, -(-min(IMPORTANCE_SAMPLES, len(samples)) // len(batches[0][0])))
        accumulate_gradients(model, batches[:n_imp], teacher[:n_imp])
        heads = find_heads(model)
        s["note"] = f"{len(heads)} attention blocks, towers: " + ", ".join(
            f"{m}={sum(1 for v in towers.values() if v == {m})} layers"
            for m in sorted({m for v in towers.values() for m in v}))
    return _Analysis(samples, batches, teacher, towers, heads, {m: n for n, m in model.named_modules()})


def _forward_check(m: nn.Module, an: _Analysis, what: str) -> None:
    """One forward after a pruning step: a shape break names what was pruned."""
    try:
        with torch.no_grad():
            out = first_output(m(*an.samples[0]))
    except Exception as e:  # noqa: BLE001
        raise TargetError(f"prune: the forward broke after pruning {what}: {type(e).__name__}: {e}") from None
    want = an.teacher[0][:1].shape
    if out.shape != want:
        raise TargetError(f"prune: after pruning {what} the output shape is {tuple(out.shape)}, not {tuple(want)}")


def _cutter(an: _Analysis, spec: PruneSpec, default: float, round_to: int):
    """``cut(m, scale)``: prune ``m`` (the model, or a copy of it) with every ratio multiplied by ``scale``."""
    from edgekit.prune.attention import find_heads
    from edgekit.prune.pruner import Plan, prune_channels, prune_heads_all

    def ratio_of(layer: str, scale: float) -> float:
        mods = an.towers.get(layer, set())
        r = spec.ratios.get(next(iter(mods)), default) if len(mods) == 1 else default
        return min(MAX_RATIO, r * scale)

    def cut(m: nn.Module, scale: float) -> Plan:
        plan, m_names, m_heads = Plan(), {x: n for n, x in m.named_modules()}, find_heads(m)
        ratio = lambda layer: ratio_of(layer, scale)  # noqa: E731
        check = lambda what: _forward_check(m, an, what)  # noqa: E731
        prune_heads_all(m_heads, m_names, ratio, round_to, check, plan)
        prune_channels(m, an.samples[0], m_names, ratio, round_to, {lin for h in m_heads for lin in h.linears},
                       check, plan, an.towers)
        m.zero_grad(set_to_none=True)
        return plan
    return cut


def _low_rank(model: nn.Module, an: _Analysis, spec, round_to: int, prefix: str, facts: dict,
              evaluate: Optional[Callable[[nn.Module], float]]) -> set[str]:
    """Factorize after pruning (edgekit.prune.lowrank); the facts get every layer's rank and the MACs
    and params before/after. Returns the factorized layers' names."""
    from edgekit.prune.lowrank import energies, factorize

    with step(prefix, "low-rank factorization (" + ", ".join(
            f"{k} {v:g}" for k, v in ({**({"every layer": spec.energy} if spec.energy else {}),
                                       **spec.energies}).items()) + " of the singular values' energy)") as s:
        before_m, before_p = count_macs(model, an.samples[0]), count_params(model)
        rows = factorize(model, energies(spec, an.towers), round_to, spec.include, spec.layers, spec.min_size)
        _forward_check(model, an, "low-rank factorization")
        done = [r for r in rows if r.get("params_after")]
        lr = {"energy": spec.energy, "energies": dict(spec.energies), "include": spec.include,
              "min_size": spec.min_size, "layers": rows, "factorized": len(done),
              "macs_before": before_m, "macs_after": count_macs(model, an.samples[0]),
              "params_before": before_p, "params_after": count_params(model)}
        facts["low_rank"] = lr
        facts["params_after"], facts["macs_after"] = lr["params_after"], lr["macs_after"]
        s["note"] = (f"{len(done)} of {len(rows)} layers factorized, MACs {before_m / 1e6:.1f}M -> "
                     f"{lr['macs_after'] / 1e6:.1f}M" + (f", ranks {sorted({r['rank'] for r in done})}" if done else ""))
    if evaluate is not None:
        lr["metric_after_factorization"] = round(evaluate(model), 6)
    return {r["layer"] for r in done}


def _recover(model: nn.Module, an: _Analysis, plan, spec: PruneSpec, prefix: str, facts: dict,
             factorized: set[str] = frozenset()) -> None:
    """Distil the pruned (and factorized) towers from the unpruned outputs, re-estimate BatchNorm; undo if worse."""
    from edgekit.prune.recovery import distill, kd_loss, reestimate_batchnorm

    with step(prefix, f"recover: {spec.recover_steps} distillation steps + BatchNorm re-estimation") as s:
        modules = dict(model.named_modules())
        pruned_towers = {m for w in plan.widths for m in w["tower"].split("+")} | \
            {m for n in factorized for m in an.towers.get(n, set())}
        trained = sorted(n for n, mods in an.towers.items() if mods and mods <= pruned_towers and n in modules)
        # a factorized layer is a Sequential of two thin layers: its parameters are its children's
        params = [p for n in trained for p in modules[n].parameters(recurse=n in factorized)]
        # every 5th batch is held out (early stopping, and the keep-if-better judgement)
        held = [i for i in range(len(an.batches)) if i % 5 == 4] or [0]
        train = [i for i in range(len(an.batches)) if i not in held] or held
        held_b, held_t = [an.batches[i] for i in held], [an.teacher[i] for i in held]
        before = kd_loss(model, held_b, held_t)
        saved = copy.deepcopy(model.state_dict())
        facts.update(distill(model, [an.batches[i] for i in train], [an.teacher[i] for i in train],
                             spec.recover_steps, spec.recover_lr, f"[{prefix}] distill", params, held_b, held_t))
        facts["bn_reestimated"] = reestimate_batchnorm(model, an.batches, held_b, held_t)
        after = kd_loss(model, held_b, held_t)
        facts["trained_towers"] = sorted(pruned_towers)
        facts["distill_loss"] = [round(before, 6), round(after, 6)]
        facts["recovery_kept"] = after < before
        if not facts["recovery_kept"]:
            model.load_state_dict(saved)
        s["note"] = (f"held-out loss {before:.4g} -> {after:.4g}, towers trained: "
                     f"{', '.join(sorted(pruned_towers)) or 'none'}"
                     + ("" if facts["recovery_kept"] else " (worse: the pruned weights are kept)"))


def _scale_for_budget(model: nn.Module, cut, top_ratio: float, budget: float, macs_before: int, example: tuple,
                      prefix: str) -> float:
    """The smallest factor on the recipe's ratios (all 1.0 when none is set) whose pruned copy keeps at
    most ``macs_budget`` of the MACs, by bisection on copies (Taylor gradients copied along)."""
    def macs_at(scale: float) -> float:
        m = copy.deepcopy(model)
        for pc, p in zip(m.parameters(), model.parameters()):
            pc.grad = None if p.grad is None else p.grad.clone()
        cut(m, scale)
        return count_macs(m, example) / macs_before

    top = MAX_RATIO / top_ratio
    with step(prefix, f"prune: find the ratio scale for a MACs budget of {budget:g}") as s:
        best = macs_at(top)
        if best > budget:
            raise TargetError(f"prune: macs_budget {budget:g} cannot be met: pruning every prunable "
                              f"layer by {MAX_RATIO:g} keeps {best:.3f} of the MACs (residual streams, fusion "
                              "widths and output layers keep their width); raise macs_budget")
        lo, hi = 0.0, top
        for _ in range(BUDGET_TRIES):
            mid = (lo + hi) / 2
            got = macs_at(mid)
            if got <= budget:
                hi, best = mid, got
            else:
                lo = mid
        s["note"] = f"scale {hi:.3f}: {best:.3f} of the MACs kept"
    return hi


def torch_evaluator(specs: Sequence[InputSpec], eval_path: str, reference: np.ndarray, metric: str,
                    limit: Optional[int] = None, batch: int = 16) -> Callable[[nn.Module], float]:
    """A function scoring a torch model on the evaluation set against the fp32 reference outputs."""
    from edgekit.measure.verify import score

    with np.load(eval_path, allow_pickle=False) as z:
        n = min(len(z[specs[0].name]), limit or len(reference), len(reference))
        arrays = [torch.from_numpy(np.ascontiguousarray(z[s.name][:n])) for s in specs]
        labels = z["labels"][:n] if "labels" in z.files else None

    def evaluate(model: nn.Module) -> float:
        with torch.no_grad():
            try:
                out = np.concatenate([first_output(model(*(a[i : i + batch] for a in arrays))).float()
                                      .reshape(min(batch, n - i), -1).numpy() for i in range(0, n, batch)])
            except Exception:  # noqa: BLE001 - a model that only takes batch 1
                out = np.stack([first_output(model(*(a[i : i + 1] for a in arrays))).float().numpy()
                                .reshape(-1) for i in range(n)])
        return score(metric, out, reference[:n], labels)

    say(f"[prune] metric in torch on {n} evaluation samples")
    return evaluate
