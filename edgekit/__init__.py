"""edgekit: prune, quantize, export, verify and benchmark a multimodal PyTorch model per hardware target.

The data path, one module each::

    recipe -> model -> (prune) -> backends/<toolchain> (export, quantize) -> verify -> bench -> report

``edgekit.run.pipeline.run`` is the programmatic entry point; ``edgekit`` (``edgekit.cli``) the command line.
"""
__version__ = "0.1.0"
