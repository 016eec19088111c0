"""edgekit: prune, quantize, export, verify and benchmark a multimodal PyTorch model per hardware target.

The data path, one module each::

    recipe -> model -> (prune) -> backends/<toolchain> (export, quantize) -> verify -> bench -> report

The Python API (``edgekit.api``): ``edgekit.run(recipe_or_dict, targets=..., out=...)`` returns the typed
report; ``edgekit.bench(artifact, ...)`` times one artifact; ``edgekit.render(out_dir)`` re-renders
report.md/html; ``edgekit.recipe_schema()`` is the recipe's JSON schema. ``edgekit`` (``edgekit.cli``) is
the command line. Imports are lazy: ``import edgekit`` loads no toolchain.
"""
__version__ = "0.1.0"
__all__ = ["__version__", "bench", "recipe_schema", "render", "run"]


def __getattr__(name: str):
    if name in ("run", "bench", "render", "recipe_schema"):
        from edgekit import api

        return getattr(api, name)
    raise AttributeError(f"module 'edgekit' has no attribute {name!r}")
