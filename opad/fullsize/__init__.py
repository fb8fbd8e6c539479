"""Full size: the published SD 2.1 / SD-Turbo architectures and the paper's backbones with random weights.

- :mod:`opad.fullsize.writer` (``python -m opad.fullsize OUT``): writes them, no download;
- :mod:`opad.fullsize.memory`: counts the memory an iteration holds, op by op, on fake tensors (the
  GPU-memory estimate of ``benchmarks/studies/estimate_gpu_memory.py``).
"""


def main(argv: list[str] | None = None) -> int:
    """``opad fullsize`` / ``python -m opad.fullsize``: the writer's CLI."""
    from opad.fullsize.writer import main as write

    return write(argv)
