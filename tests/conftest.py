"""Shared fixtures: one tiny preset per test session, in a private cache folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Triton kernels run in the CPU interpreter where there is no GPU; the flag must be set before a
# kernel module is imported (opad.kernels imports them lazily, at the first forced-kernel call).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Under pytest-xdist (the README's test command runs two workers) each worker takes its share of the
# cores, so that the workers' torch thread pools do not fight over the same ones.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))
# Commands run on the tiny random preset here (fast); the tests of the mini world ask for it by name.
os.environ.setdefault("OPAD_PRESET", "tiny")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DREAMBENCH = SHARED / "datasets" / "dreambooth"


@pytest.fixture(scope="session", autouse=True)
def opad_cache(tmp_path_factory) -> Path:
    """Point OPAD_CACHE (also inherited by CLI subprocesses) at a fresh folder for the session."""
    cache = tmp_path_factory.mktemp("opad-cache")
    old = os.environ.get("OPAD_CACHE")
    os.environ["OPAD_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("OPAD_CACHE", None)
    else:
        os.environ["OPAD_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_dir(opad_cache) -> Path:
    from opad.presets.tiny import tiny_preset_dir

    return tiny_preset_dir()


@pytest.fixture()
def bundle(tiny_dir):
    """A fresh teacher + student bundle (tests may modify it)."""
    from opad.models.loading import load_models

    return load_models(str(tiny_dir / "teacher"), str(tiny_dir / "student"))


@pytest.fixture(scope="session")
def dreambench_dir() -> Path:
    if not (DREAMBENCH / "prompts_and_classes.txt").is_file():
        pytest.skip(f"DreamBench data not found at {DREAMBENCH} (it lives in ../shared beside the repo)")
    return DREAMBENCH


# pytest-xdist (--dist loadfile) hands the files out in collection order; the heaviest go first, so
# that none of them starts last and leaves the other worker idle at the end (measured 2026-12-07)
HEAVY_FIRST = ("test_train.py", "test_export.py", "test_serve_ray.py", "test_jobs.py", "test_kernels.py",
               "test_compiled.py", "test_feature_pass.py", "test_world_learning.py", "test_presets.py",
               "test_serve.py", "test_kernels_aot.py", "test_convert.py", "test_gpu_suite.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order
