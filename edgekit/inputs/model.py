"""Load the user's model from the recipe and describe it (params, MACs, example inputs, reference outputs).

``source`` is ``path/to/file.py:callable`` (the callable returns an ``nn.Module``) or a ``torch.export``
program saved as ``.pt2``. Inputs are passed positionally in the recipe's order.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import sys
from typing import Sequence

import numpy as np
import torch
from torch import nn

from edgekit.errors import InputError
from edgekit.config.recipe import InputSpec, Recipe


def configure_torch() -> None:
    """One torch thread unless EDGEKIT_TORCH_THREADS says otherwise. Measured on the 2-core CI machine:
    with the other core busy, torch's default 2 OpenMP threads ran the tiny example at 290-416 ms a
    sample instead of 6 ms (spinning barriers). edgekit's torch work (reference outputs, export,
    calibration) is small next to that risk; the runtimes being benchmarked keep their own settings."""
    torch.set_num_threads(int(os.environ.get("EDGEKIT_TORCH_THREADS", "1")))


@contextlib.contextmanager
def _isolated(where: str, doing: str, path):
    """Run the user's code with argv reduced to the file's name, and any way out of it (an exception,
    ``sys.exit``, a raised KeyboardInterrupt, argparse printing its usage) turned into a bad input that
    names the file: the model file must never decide edgekit's exit code or read edgekit's options."""
    argv = sys.argv
    sys.argv = [str(path)]
    try:
        yield
    except SystemExit as e:
        raise InputError(f"{where}: {doing} called sys.exit({e.code!r}); a model file must define the model, "
                         f"not run a program (guard script code with `if __name__ == '__main__':`)") from None
    except KeyboardInterrupt:
        raise InputError(f"{where}: {doing} raised KeyboardInterrupt") from None
    except Exception as e:  # noqa: BLE001 - anything the user's code raises is the user's file
        raise InputError(f"{where}: {doing} failed: {type(e).__name__}: {e}") from None
    finally:
        sys.argv = argv


def load_model(recipe: Recipe) -> nn.Module:
    src = recipe.model.source
    where = f"{recipe.path}: model.source = {src!r}"
    if src.endswith(".pt2"):
        path = recipe.resolve(src)
        if not path.is_file():
            raise InputError(f"{where}: file {path} not found")
        try:
            return torch.export.load(str(path)).module()
        except Exception as e:  # noqa: BLE001 - any load failure is the user's file
            raise InputError(f"{where}: cannot load the torch.export program: {e}") from None

    file, sep, attr = src.rpartition(":")
    if not sep or not file.endswith(".py") or not attr:
        raise InputError(f"{where}: expected 'file.py:callable' or a '.pt2' file")
    path = recipe.resolve(file)
    if not path.is_file():
        raise InputError(f"{where}: file {path} not found")
    # A stable name (not hash(), which is salted per process): it ends up in exported graphs' metadata,
    # and artifacts must be byte-identical run to run (manifest.json).
    # From the file's bytes, not its path: the same model built from another checkout or on another
    # node of a cluster (edgekit.orchestrate.executor) gives the same artifact.
    mod_name = f"edgekit_user_model_{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))  # let the user's file import its neighbours
    try:
        sys.modules[mod_name] = module
        with _isolated(where, f"importing {path}", path):
            spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise InputError(f"{where}: {path} has no callable named {attr!r}")
    with _isolated(where, f"calling {attr}()", path):
        model = fn()
    if not isinstance(model, nn.Module):
        raise InputError(f"{where}: {attr}() returned {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def example_inputs(specs: Sequence[InputSpec], sample: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
    """Positional torch inputs (recipe order) from one sample of the data set."""
    return tuple(torch.from_numpy(np.ascontiguousarray(sample[s.name])) for s in specs)


def first_output(out) -> torch.Tensor:
    """The tensor the metric reads: the model's output, or its first one if it returns several."""
    while isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, dict):
        out = next(iter(out.values()))
    return out


def check_forward(model: nn.Module, specs: Sequence[InputSpec], sample: dict[str, np.ndarray]) -> None:
    """Run one forward with a real sample so a model/recipe mismatch is an input error, not a crash later."""
    try:
        with torch.inference_mode():
            out = first_output(model(*example_inputs(specs, sample)))
    except Exception as e:  # noqa: BLE001
        names = ", ".join(f"{s.name}{tuple(s.shape)}:{s.dtype}" for s in specs)
        raise InputError(f"model forward failed with the recipe's inputs ({names}) in that order: "
                         f"{type(e).__name__}: {e}") from None
    if not isinstance(out, torch.Tensor):
        raise InputError(f"model output is {type(out).__name__}; edgekit needs a tensor (or a tuple of tensors)")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, args: tuple[torch.Tensor, ...]) -> int:
    """Multiply-accumulates of one forward, from torch's FLOP counter (FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(*args)
    return counter.get_total_flops() // 2


def reference_outputs(model: nn.Module, specs: Sequence[InputSpec], samples) -> np.ndarray:
    """fp32 PyTorch outputs (first output, flattened per sample) for every sample: the ground truth
    every artifact is compared against."""
    outs = []
    with torch.inference_mode():
        for i, s in enumerate(samples):
            try:
                outs.append(first_output(model(*example_inputs(specs, s))).float().numpy().reshape(-1))
            except Exception as e:  # noqa: BLE001 - e.g. a token id past the vocabulary in one sample
                raise InputError(f"evaluation sample {i}: the fp32 PyTorch forward failed: {type(e).__name__}: "
                                 f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    return np.stack(outs)
