"""The compiled runner's variants against dynamo's recompile limit, with a compile backend that
counts (dynamo's tracing and guards are real; the backend runs the captured graph eagerly), on a
micro student (tracing costs per module: the tiny one takes about 3x longer)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from exportutil import micro_student
from opad.export.runtime import Runner, compiled

from opad.errors import OpadError


@pytest.fixture(scope="module")
def micro(tiny_dir, tmp_path_factory):
    return micro_student(tiny_dir, tmp_path_factory.mktemp("micro") / "student")


class Counting:
    """A torch.compile backend: dynamo's ``eager`` one, counting the graphs it is given."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs += 1
        return gm.forward


def _images(n: int) -> list:
    return [(None, "a photo of a dog", 60 + i) for i in range(n)]


def test_every_variant_compiles_once_and_none_runs_eager(micro):
    """The 12 variants (steps 1/2/4 x batches padded to 1/2/4/8) a server with --max-batch 8 warms up
    each compile exactly once, then run compiled: the 9th-12th do not fall back to eager as they did
    through one compiled module (dynamo's limit of 8 per code object, all variants sharing one)."""
    backend = Counting()
    runner = Runner("compiled", student=str(micro), compile_backend=backend)
    plan = runner.warm_up_plan(8)
    assert plan == [(steps, batch) for steps in (1, 2, 4) for batch in (1, 2, 4, 8)]
    for steps, batch in plan:
        before = backend.graphs
        runner.run_batch(_images(batch), steps)
        assert backend.graphs == before + 1, (steps, batch)  # compiled, in one graph (fullgraph)
    assert sorted(runner._impl.variants) == sorted(plan)
    for steps, batch in plan:  # compiled once: no recompilation, no eager fall back
        runner.run_batch(_images(batch), steps)
    assert backend.graphs == 12 and torch._dynamo.config.recompile_limit == 8  # the global limit untouched
    got, stages = runner.run_batch(_images(3), 2)  # 3 images run as the batch-4 variant
    want, _ = Runner("eager", student=str(micro)).run_batch(_images(3), 2)
    assert backend.graphs == 12 and list(stages) == ["conditioning", "denoise_decode"]
    assert got.shape == want.shape and np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_without_isolated_regions_the_shared_limit_covers_every_variant(micro, monkeypatch):
    """torch before 2.14 (the GPU image's 2.11) has no isolate_recompiles: all variants then share
    the code object's limit of 8, and the runner lifts it while they run, so 9 variants still each
    compile once and none falls back to eager; the global setting is left as it was."""
    monkeypatch.setattr(compiled, "ISOLATED_RECOMPILES", False)
    torch._dynamo.reset()  # no compiled entries of other tests on the shared code object
    backend = Counting()
    runner = Runner("compiled", student=str(micro), compile_backend=backend)
    plan = [(steps, batch) for steps in (1, 2, 4) for batch in (1, 2, 4)]
    for steps, batch in plan:
        runner.run_batch(_images(batch), steps)
    for steps, batch in plan:
        runner.run_batch(_images(batch), steps)
    assert backend.graphs == 9 and torch._dynamo.config.recompile_limit == 8


@pytest.mark.parametrize("isolated", [True, False], ids=["isolated", "shared"])
def test_a_variant_past_its_recompile_limit_is_an_error(micro, monkeypatch, isolated):
    """Were a variant's guards to keep failing (here: every batch size sent through the batch-1
    variant's region), the compilation past its limit is one clear error, not a silent eager run:
    with isolated regions (torch >= 2.14) RECOMPILE_LIMIT of its own; without (the GPU image's torch
    2.11) RECOMPILE_LIMIT for each variant made, shared (here one variant, the global floor set low)."""
    if isolated and not compiled.ISOLATED_RECOMPILES:
        pytest.skip(f"torch {torch.__version__} has no isolate_recompiles")
    monkeypatch.setattr(compiled, "ISOLATED_RECOMPILES", isolated)
    if not isolated:
        torch._dynamo.reset()  # nothing of other tests on the shared code object
        monkeypatch.setattr(compiled, "_variants_made", 0)
        monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    backend = Counting()
    runner = Runner("compiled", student=str(micro), compile_backend=backend)
    shared = runner._impl.variant(1, 1)
    monkeypatch.setattr(runner._impl, "variant", lambda steps, batch: shared)
    for batch in range(1, compiled.RECOMPILE_LIMIT + 1):
        runner.run_batch(_images(batch), 1)
    assert backend.graphs == compiled.RECOMPILE_LIMIT
    allowed = "2" if isolated else "the 2 all variants share"
    with pytest.raises(OpadError, match=f"the compiled 1-step graph for batch 4 needed more than {allowed} compil"):
        runner.run_batch(_images(3), 1)
