"""The fused multi-backbone feature pass (opad._C) against its torch reference, and its dispatch.

The compiled op computes its resize weights in double, so in fp32 it is closer to the exact (fp64)
result than F.interpolate's own fp32 weights: fp32 parity is checked against both.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from opad.kernels import dispatch
from opad.kernels.feature_pass import BackboneInput, _FusedFeaturePass, feature_pass, feature_pass_reference
from opad.models.backbones import backbone_features, build_backbone

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
ODD_SIZES = (61, 224, 37, 5)  # from 97 x 131: shrink, grow, shrink hard, tiny
MODES = ("antialias", "area", "bilinear")


def _rand(*shape, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=g, dtype=torch.float64) * 1.6 - 0.3).to(dtype).to(device)  # overshoots [0, 1]


def _specs(k: int, mode: str | None = None) -> list[BackboneInput]:
    """k inputs of the odd sizes; with mode None each takes another mode; normalised and raw alternate."""
    specs = []
    for i in range(k):
        m = mode or MODES[i % 3]
        specs.append(BackboneInput(ODD_SIZES[i], m, *IMAGENET) if i % 2 == 0 else BackboneInput(ODD_SIZES[i], m))
    return specs


def _run(fn, images, specs, grads):
    x = images.clone().requires_grad_(True)
    outs = fn(x, specs)
    torch.autograd.backward(outs, grads)
    return [o.detach() for o in outs], x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_matches_reference_outputs_and_summed_gradient(k, mode, dtype):
    batch = 1 + k % 3  # batch 1, 2, 3 across the cases
    images = _rand(batch, 3, 97, 131, dtype=dtype, seed=k)
    specs = _specs(k, mode)
    grads = [_rand(batch, 3, s.size, s.size, dtype=dtype, seed=10 + i) - 0.5 for i, s in enumerate(specs)]
    fused, fused_grad = _run(feature_pass, images, specs, grads)
    ref, ref_grad = _run(feature_pass_reference, images, specs, grads)
    exact, exact_grad = _run(feature_pass_reference, images.double(), specs, [g.double() for g in grads])
    assert [o.shape for o in fused] == [(batch, 3, s.size, s.size) for s in specs]
    assert all(o.dtype == dtype for o in fused) and fused_grad.dtype == dtype
    tight = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=2e-6, rtol=1e-5)
    for o, r, e in zip(fused, ref, exact):
        torch.testing.assert_close(o.double(), e, **tight)
        torch.testing.assert_close(o, r, atol=1e-4, rtol=1e-4)
    grad_tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(fused_grad.double(), exact_grad, **grad_tol)
    torch.testing.assert_close(fused_grad, ref_grad, atol=2e-4, rtol=1e-4)


def test_mixed_modes_in_one_pass_and_batch_three():
    images = _rand(3, 3, 97, 131, seed=3)
    specs = _specs(4)  # antialias, area, bilinear, antialias; normalised and raw
    grads = [_rand(3, 3, s.size, s.size, seed=20 + i) - 0.5 for i, s in enumerate(specs)]
    fused, fused_grad = _run(feature_pass, images.double(), specs, [g.double() for g in grads])
    ref, ref_grad = _run(feature_pass_reference, images.double(), specs, [g.double() for g in grads])
    for o, r in zip(fused, ref):
        torch.testing.assert_close(o, r, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(fused_grad, ref_grad, atol=1e-12, rtol=1e-12)


def test_gradcheck_fp64():
    specs = [BackboneInput(5, "antialias", *IMAGENET), BackboneInput(22, "bilinear"), BackboneInput(9, "area"),
             BackboneInput(7, "bilinear", *IMAGENET)]
    x = _rand(2, 3, 13, 17, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: _FusedFeaturePass.apply(t, tuple(specs)), (x,))


def test_gradients_of_unused_outputs_are_left_out():
    images = _rand(2, 3, 97, 131, dtype=torch.float64)
    specs = _specs(3)
    x = images.clone().requires_grad_(True)
    outs = feature_pass(x, specs)
    g = _rand(*outs[1].shape, dtype=torch.float64, seed=5)
    (outs[1] * g).sum().backward()  # only the second input reaches the loss
    y = images.clone().requires_grad_(True)
    (feature_pass_reference(y, specs[1:2])[0] * g).sum().backward()
    torch.testing.assert_close(x.grad, y.grad, atol=1e-12, rtol=1e-12)


def test_backward_is_deterministic():
    images = _rand(2, 3, 97, 131)
    specs = _specs(4)
    grads = [_rand(2, 3, s.size, s.size, seed=30 + i) for i, s in enumerate(specs)]
    assert torch.equal(_run(feature_pass, images, specs, grads)[1], _run(feature_pass, images, specs, grads)[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_accumulates_in_fp32(dtype):
    images = _rand(2, 3, 97, 131, dtype=dtype)
    specs = _specs(3)
    outs = feature_pass(images, specs)
    exact = feature_pass_reference(images.double(), specs)
    eps = torch.finfo(dtype).eps
    for o, e in zip(outs, exact):
        assert o.dtype == dtype
        torch.testing.assert_close(o.double(), e, atol=4 * eps, rtol=2 * eps)  # one rounding of the result


def test_the_extension_is_built_and_used(monkeypatch):
    """Installed as the README says, opad._C exists and the op runs through it, not the fallback."""
    monkeypatch.setenv("OPAD_KERNELS", "auto")
    import opad._C as ext

    choice = dispatch.choose("feature_pass", "cpu")
    assert choice.impl == "extension" and not choice.fallback, choice.reason
    x = _rand(1, 3, 20, 30).requires_grad_(True)
    (out,) = feature_pass(x, [BackboneInput(11)])
    assert type(out.grad_fn).__name__ == "_FusedFeaturePassBackward"
    nvcc = shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc")
    if nvcc and torch.version.cuda and os.environ.get("OPAD_SKIP_CUDA_BUILD", "") != "1":
        assert ext.cuda_built(), "nvcc and a CUDA torch are here, so the CUDA kernels must have been compiled"


@pytest.mark.parametrize("forced", ["reference", "triton"])
def test_opad_kernels_forces_either_implementation(monkeypatch, forced):
    monkeypatch.setenv("OPAD_KERNELS", forced)
    x = _rand(2, 3, 40, 50, dtype=torch.float64).requires_grad_(True)
    (out,) = feature_pass(x, [BackboneInput(17, "area")])
    fused = type(out.grad_fn).__name__ == "_FusedFeaturePassBackward"
    assert fused == (forced == "triton")  # "triton" forces each op's accelerated implementation: here opad._C
    torch.testing.assert_close(out, feature_pass_reference(x, [BackboneInput(17, "area")])[0], atol=1e-12, rtol=0)


def test_missing_extension_falls_back_with_one_warning(tmp_path):
    script = (
        "import sys; sys.modules['opad._C'] = None\n"  # as if it had never been built
        "import torch\n"
        "from opad.kernels.feature_pass import BackboneInput, feature_pass, feature_pass_reference\n"
        "x = torch.rand(1, 3, 30, 20)\n"
        "for _ in range(3):\n"
        "    (out,) = feature_pass(x, [BackboneInput(9)])\n"
        "assert out.equal(feature_pass_reference(x, [BackboneInput(9)])[0])\n"
        "print('ok')\n")
    env = {**os.environ, "OPAD_KERNELS": "auto"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr
    warnings = [line for line in run.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "falls back to the torch reference" in warnings[0] and "opad._C" in warnings[0]
    forced = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**env, "OPAD_KERNELS": "triton"}, timeout=120)
    assert forced.returncode != 0 and "OPAD_KERNELS=triton but the compiled feature_pass cannot run here" in forced.stderr


def test_bad_arguments_are_one_clear_error():
    import opad._C as ext

    x = _rand(1, 3, 10, 10)
    with pytest.raises(ValueError, match="floating-point"):
        feature_pass(x[0], [BackboneInput(4)])
    with pytest.raises(RuntimeError, match="unknown resize mode 'nearest'"):
        ext.feature_pass_forward(x, [4], [4], ["nearest"], [[1.0] * 3], [[0.0] * 3])
    with pytest.raises(RuntimeError, match=r"one scale and bias per channel \(3\)"):
        ext.feature_pass_forward(x, [4], [4], ["area"], [[1.0]], [[0.0]])
    with pytest.raises(RuntimeError, match=r"gradient 0 has shape"):
        ext.feature_pass_backward([torch.zeros(1, 3, 5, 5)], 10, 10, [4], [4], ["area"], [[1.0] * 3], [[0.0] * 3])


def test_backbone_features_equal_one_backbone_at_a_time():
    """The ensemble path (one fused pass, then each encoder) gives each backbone's own forward."""
    backbones = [build_backbone("dino_v1", "tiny"), build_backbone("clip", "tiny", resize="area", normalize=False),
                 build_backbone("dino_v1", "tiny", seed=3)]
    uses = [(backbones[0], None), (backbones[1], None), (backbones[2], "bilinear")]
    images = _rand(2, 3, 97, 131)
    x = images.clone().requires_grad_(True)
    feats = backbone_features(x, uses)
    sum(f.square().sum() for f in feats).backward()
    y = images.clone().requires_grad_(True)
    one_by_one = [backbone(y, resize=resize) for backbone, resize in uses]
    sum(f.square().sum() for f in one_by_one).backward()
    for f, g in zip(feats, one_by_one):
        torch.testing.assert_close(f, g)
    torch.testing.assert_close(x.grad, y.grad)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_cuda_matches_reference(k, dtype):
    images = _rand(1 + k % 3, 3, 97, 131, dtype=dtype, seed=k, device="cuda")
    specs = _specs(k)
    grads = [_rand(images.shape[0], 3, s.size, s.size, dtype=dtype, seed=40 + i, device="cuda") for i, s in
             enumerate(specs)]
    fused, fused_grad = _run(feature_pass, images, specs, grads)
    exact, exact_grad = _run(feature_pass_reference, images.double(), specs, [g.double() for g in grads])
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=2e-5, rtol=1e-5)
    for o, e in zip(fused, exact):
        torch.testing.assert_close(o.double(), e, **tol)
    torch.testing.assert_close(fused_grad.double(), exact_grad, **tol)
    assert torch.equal(_run(feature_pass, images, specs, grads)[1], fused_grad)  # deterministic: no atomics


@pytest.mark.gpu
@cuda
def test_cuda_streams_give_the_sequential_result():
    backbones = [build_backbone(n, "tiny").cuda() for n in ("dino_v1", "dino_v2", "clip")]
    uses = [(b, None) for b in backbones]
    images = _rand(2, 3, 97, 131, device="cuda")
    x = images.clone().requires_grad_(True)
    feats = backbone_features(x, uses)
    sum(f.square().sum() for f in feats).backward()
    y = images.clone().requires_grad_(True)
    seq = [b(y) for b in backbones]
    sum(f.square().sum() for f in seq).backward()
    torch.cuda.synchronize()
    for f, g in zip(feats, seq):
        torch.testing.assert_close(f, g)
    torch.testing.assert_close(x.grad, y.grad)


# ------------------------------------------------------------------ the build switches
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


CPU_ONLY_CHECK = """
import importlib.util, sys
import pytest, torch
spec = importlib.util.spec_from_file_location("opad._C", sys.argv[1])
ext = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ext)
sys.modules["opad._C"] = ext  # this process never imports the installed build
from opad.errors import OpadError
from opad.kernels.feature_pass import BackboneInput, _op_args, feature_pass_reference
from opad.kernels import dispatch
assert not ext.cuda_built()
x = torch.rand(2, 3, 29, 23, dtype=torch.float64)
specs = [BackboneInput(11, "antialias", (0.5,) * 3, (0.25,) * 3), BackboneInput(40, "bilinear"), BackboneInput(7, "area")]
for o, r in zip(ext.feature_pass_forward(x, *_op_args(specs, 3)), feature_pass_reference(x, specs)):
    torch.testing.assert_close(o, r, atol=1e-12, rtol=1e-12)
# CUDA tensors with a CPU-only build: auto takes the reference and says why; forcing is one error
choice = dispatch.choose("feature_pass", "cuda")
assert choice.impl == "reference" and choice.fallback and "built without CUDA" in choice.reason, choice
assert dispatch.choose("feature_pass", "cpu").impl == "extension"
import os
os.environ["OPAD_KERNELS"] = "triton"
with pytest.raises(OpadError, match="built without CUDA"):
    dispatch.choose("feature_pass", "cuda")
print("ok")
"""


def test_skip_cuda_build_gives_a_working_cpu_only_extension(tmp_path):
    """OPAD_SKIP_CUDA_BUILD=1 builds opad._C without its CUDA part (here, where nvcc would be used)."""
    env = {**os.environ, "OPAD_SKIP_CUDA_BUILD": "1"}
    run = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
                          "--build-temp", str(tmp_path / "tmp")], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "building opad._C for the CPU only (OPAD_SKIP_CUDA_BUILD=1)" in run.stderr
    (path,) = (tmp_path / "lib" / "opad").glob("_C*.so")
    check = subprocess.run([sys.executable, "-c", CPU_ONLY_CHECK, str(path)], capture_output=True, text=True,
                           env={**os.environ, "OPAD_KERNELS": "auto"}, timeout=300)
    assert check.returncode == 0 and check.stdout.strip() == "ok", check.stderr[-3000:]
