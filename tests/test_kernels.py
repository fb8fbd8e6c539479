"""Triton kernels against their pure-torch references, and the OPAD_KERNELS switch.

Without a GPU the kernels run in Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1):
fp32, tiny awkward shapes. With one, the same tests run the compiled kernels on CUDA tensors.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from opad.concept.folder import enable_kv_training
from opad.errors import OpadError
from opad.kernels import dispatch, kv_proj, swd
from opad.models.attention import fused_kv, install_fused_kv
from opad.train import losses

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(DEVICE.type == "cpu" and not dispatch.interpreting(),
                                reason="no GPU and TRITON_INTERPRET is not 1")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


@pytest.fixture(autouse=True)
def exact_fp32_references(monkeypatch):
    """On a GPU, cuDNN's conv and cuBLAS would use TF32 for the references; compare against fp32."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(precision)


@pytest.fixture()
def triton_mode(monkeypatch):
    monkeypatch.setenv("OPAD_KERNELS", "triton")


# ------------------------------------------------------------------ dispatch
def test_reference_mode_and_auto_on_cpu_take_the_reference(monkeypatch):
    monkeypatch.setenv("OPAD_KERNELS", "reference")
    assert dispatch.choose("swd_sorted_l1", "cuda").impl == "reference"
    monkeypatch.delenv("OPAD_KERNELS")
    choice = dispatch.choose("kv_proj", "cpu")
    assert choice.impl == "reference" and "cpu" in choice.reason  # the interpreter is never automatic


def test_auto_takes_the_kernel_for_cuda_tensors(monkeypatch):
    monkeypatch.setenv("OPAD_KERNELS", "auto")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert dispatch.choose("swd_sorted_l1", "cuda").impl == "triton"
    fallback = dispatch.choose("swd_sorted_l1", "cuda", unsupported="the kernel computes no gradient for y")
    assert fallback.impl == "reference" and "gradient for y" in fallback.reason


def test_forced_triton_on_cpu_without_the_interpreter_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("OPAD_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(OpadError, match="TRITON_INTERPRET=1"):
        dispatch.choose("kv_proj", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.choose("kv_proj", "cpu").impl == "triton"
    with pytest.raises(OpadError, match="gradient for y"):
        dispatch.choose("swd_sorted_l1", "cpu", unsupported="the kernel computes no gradient for y")


def test_a_bad_mode_is_refused(monkeypatch):
    monkeypatch.setenv("OPAD_KERNELS", "fast")
    with pytest.raises(OpadError, match="OPAD_KERNELS must be one of auto, triton, reference"):
        dispatch.choose("kv_proj", "cpu")


@pytest.mark.parametrize("mode", ["auto", "reference", "triton"])
def test_python_m_opad_kernels_reports_every_op(mode):
    env = {**os.environ, "OPAD_KERNELS": mode}
    run = subprocess.run([sys.executable, "-m", "opad.kernels"], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    for op in dispatch.OPS:
        assert f"{op}:" in run.stdout
    expected = {"auto": "reference (auto: cpu tensors", "reference": "reference (OPAD_KERNELS=reference)",
                "triton": "triton    (OPAD_KERNELS=triton)"}[mode]
    assert expected in run.stdout


def test_python_m_opad_kernels_with_a_bad_mode_prints_one_error():
    env = {**os.environ, "OPAD_KERNELS": "fastest"}
    run = subprocess.run([sys.executable, "-m", "opad.kernels"], env=env, capture_output=True, text=True)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("error: OPAD_KERNELS must be one of")


# ------------------------------------------------------------------ sliced Wasserstein
def _swd_inputs(batch, height, width, num, patch, seed, lattice=False):
    """Lab-range images and directions. ``lattice``: integer pixels and directions in steps of 1/8,
    so every projection is exact in fp32 and both implementations see the same ties exactly;
    otherwise random floats and unit directions, where a near-tie may flip one sign."""
    g = torch.Generator().manual_seed(seed)
    if lattice:
        x, y = (torch.randint(-60, 61, (2, batch, 3, height, width), generator=g).float())
        proj = torch.randint(-8, 9, (num, 3, patch, patch), generator=g).float() / 8
    else:
        x, y = torch.rand(2, batch, 3, height, width, generator=g) * 100 - 30
        proj = losses.random_projections(num, 3, patch, generator=g)
    return x.to(DEVICE).requires_grad_(True), y.to(DEVICE), proj.to(DEVICE)


def _swd_both(x, y, proj):
    weights = torch.rand(x.shape[0], device=DEVICE) + 0.5  # a different upstream gradient per item
    loss = swd.swd_sorted_l1(x, y, proj)
    (grad,) = torch.autograd.grad((loss * weights).sum(), x)
    ref = swd.swd_sorted_l1_reference(x, y, proj)
    (ref_grad,) = torch.autograd.grad((ref * weights).sum(), x)
    assert loss.shape == (x.shape[0],) and ref.abs().min() > 0 and ref_grad.abs().max() > 0
    return loss, grad, ref, ref_grad


# (batch, H, W, directions, patch): non-powers of two; 40 directions span two chunks of 32;
# 6x9 with 11x11 patches pads by 5 of 6 rows
SWD_SHAPES = [(1, 23, 37, 24, 5), (2, 64, 48, 16, 5), (3, 19, 26, 40, 3), (2, 6, 9, 8, 11)]


@pytest.fixture(autouse=True)
def small_register_sorts(monkeypatch):
    """The interpreter's tl.sort is slow (about 1 s a direction at 1024 values): sort only tiny
    levels in registers there. On a GPU the module's own threshold stands."""
    if dispatch.interpreting():
        from opad.kernels import _swd_triton

        monkeypatch.setattr(_swd_triton, "REGISTER_SORT_MAX", 256)


@pytest.fixture(params=["registers", "torch"])
def sort_path(request, monkeypatch):
    """Run a test once with every level sorted in registers and once with torch's sort."""
    from opad.kernels import _swd_triton

    monkeypatch.setattr(_swd_triton, "REGISTER_SORT_MAX", 1 << 20 if request.param == "registers" else 0)
    return request.param


@pytest.mark.parametrize("shape", SWD_SHAPES)
def test_swd_forward_and_x_gradient_equal_the_reference(shape, triton_mode, monkeypatch):
    from opad.kernels import _swd_triton

    monkeypatch.setattr(_swd_triton, "REGISTER_SORT_MAX", 0)  # torch's sort; the next test sorts in registers
    loss, grad, ref, ref_grad = _swd_both(*_swd_inputs(*shape, seed=sum(shape), lattice=True))
    assert rel_err(loss, ref) <= 1e-5
    assert rel_err(grad, ref_grad) <= 1e-5


# small enough for the interpreter's in-register sort; 33 directions span two chunks
@pytest.mark.parametrize("shape", [(1, 13, 17, 6, 5), (2, 6, 9, 8, 11), (1, 5, 7, 33, 3)])
@pytest.mark.parametrize("lattice", [True, False])
def test_swd_sorted_in_registers_equals_the_reference(shape, lattice, triton_mode, monkeypatch):
    from opad.kernels import _swd_triton

    monkeypatch.setattr(_swd_triton, "REGISTER_SORT_MAX", 1 << 20)
    loss, grad, ref, ref_grad = _swd_both(*_swd_inputs(*shape, seed=sum(shape), lattice=lattice))
    assert rel_err(loss, ref) <= 1e-5
    assert rel_err(grad, ref_grad) <= 1e-5


@pytest.mark.parametrize("shape", SWD_SHAPES[:2])
def test_swd_with_unit_directions_equals_the_reference(shape, triton_mode):
    loss, grad, ref, ref_grad = _swd_both(*_swd_inputs(*shape, seed=sum(shape)))
    assert rel_err(loss, ref) <= 1e-5
    assert rel_err(grad, ref_grad) <= 1e-5


def test_swd_of_identical_images_is_zero_with_zero_gradient(sort_path, triton_mode):
    x, _, proj = _swd_inputs(2, 9, 14, 12, 5, seed=3)
    loss = swd.swd_sorted_l1(x, x.detach().clone(), proj)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    assert torch.equal(loss, torch.zeros_like(loss)) and torch.equal(grad, torch.zeros_like(grad))


def test_swd_kernel_gives_y_no_gradient_and_keeps_only_int8_signs(triton_mode):
    x, y, proj = _swd_inputs(2, 13, 21, 10, 3, seed=5)
    y.requires_grad_(True)
    loss = swd.swd_sorted_l1_triton(x, y, proj)
    saved = loss.grad_fn.saved_tensors
    assert {t.dtype for t in saved} == {torch.int8, torch.float32}
    assert all(t.numel() < 2 * 10 * 13 * 21 for t in saved if t.dtype != torch.int8)  # no fp32 projections
    loss.sum().backward()
    assert y.grad is None and x.grad is not None and x.grad.abs().sum() > 0


def test_swd_through_the_switch_falls_back_when_y_wants_a_gradient(monkeypatch):
    x, y, proj = _swd_inputs(1, 11, 14, 6, 3, seed=7)
    y.requires_grad_(True)
    monkeypatch.setenv("OPAD_KERNELS", "auto")
    swd.swd_sorted_l1(x, y, proj).sum().backward()
    assert y.grad is not None  # the reference took it
    monkeypatch.setenv("OPAD_KERNELS", "triton")
    with pytest.raises(OpadError, match="no gradient for y"):
        swd.swd_sorted_l1(x, y, proj)


@pytest.mark.parametrize("batch", [1, 2])
def test_ms_swd_with_the_kernel_equals_the_reference(batch, monkeypatch):
    # levels 29x21 (torch's sort), then 15x11 ... 2x2 (in registers, under the fixture's 256)
    # 5 levels of 29x21 go down to 2x2, where the padding turns to replicate
    x, y, _ = _swd_inputs(batch, 29, 21, 1, 1, seed=11 + batch)
    x, y = (x.detach() / 100 + 0.3).requires_grad_(True), y / 100 + 0.3  # sRGB around [0, 1]
    g = torch.Generator().manual_seed(batch)
    projections = [losses.random_projections(7, 3, 5, generator=g).to(DEVICE) for _ in range(5)]
    results = {}
    for mode in ("reference", "triton"):
        monkeypatch.setenv("OPAD_KERNELS", mode)
        value = losses.ms_swd(x, y, projections=projections)
        results[mode] = (value, *torch.autograd.grad(value.sum(), x))
    (v, g_), (rv, rg) = results["triton"], results["reference"]
    assert rel_err(v, rv) <= 1e-5 and rel_err(g_, rg) <= 1e-5


# ------------------------------------------------------------------ NaN and inf in the sort
POISON = 77  # no sign the kernels write (-1, 0, 1): a position still holding it was never written
NAN = float("nan")


def _signed_nan(negative: bool) -> float:
    bits = torch.tensor([0x7FC00000 | (-0x80000000 if negative else 0)], dtype=torch.int32)
    return bits.view(torch.float32).item()


def _projections_with_nans(batch, n, length, seed):
    """Distinct random projections (no ties), with +NaN, -NaN and +/-inf at awkward places: x's last
    direction of item 0 (where a stray padding index would write past the row), first and last
    positions, y alone, x alone; item 2 holds only infinities, the last item nothing."""
    g = torch.Generator().manual_seed(seed)
    px, py = (torch.randperm(2 * batch * n * length, generator=g)[:batch * n * length].float().view(batch, n, length)
              / 7 - 300 for _ in range(2))
    pos_nan, neg_nan = _signed_nan(False), _signed_nan(True)
    assert pos_nan != pos_nan and torch.tensor(neg_nan).view(torch.int32) < 0  # a -NaN indeed
    px[0, n - 1, 0], px[0, n - 1, length - 1], px[0, 1, length // 2] = pos_nan, neg_nan, float("inf")
    py[0, 0, 3], py[1, 0, length - 1] = neg_nan, pos_nan
    px[1, 1, 5], px[1, 1, 6], py[1, 1, 7] = pos_nan, pos_nan, neg_nan
    px[2, 0, 2], py[2, n - 1, length - 2], px[2, 1, 0] = float("inf"), float("-inf"), float("-inf")
    return px.to(DEVICE), py.to(DEVICE)


def _sorted_diff_reference(px, py, p0, total_directions):
    """Per-item sum of |sorted x - sorted y| and the signs at x's indices (torch.sort: NaNs last)."""
    sx, idx = px.sort(dim=2)
    d = sx - py.sort(dim=2).values
    sign = torch.zeros(px.shape[0], total_directions, px.shape[2], dtype=torch.int8, device=px.device)
    sign[:, p0:p0 + px.shape[1]].scatter_(2, idx, torch.sign(d).to(torch.int8))  # sign(NaN) = 0
    return d.abs().sum(dim=(1, 2), dtype=torch.float64), sign


@pytest.mark.parametrize("length", [37, 64])  # padded to 64, and exactly a power of two
def test_sort_with_nan_and_inf_writes_every_sign_once_and_nothing_outside(length, sort_path):
    from opad.kernels import _swd_triton

    batch, n, p0, guard = 4, 3, 1, 256
    px, py = _projections_with_nans(batch, n, length, seed=length)
    total = n + 2  # directions p0 - 1 and p0 + n belong to other chunks: the kernel must not touch them
    buffer = torch.full((2 * guard + batch * total * length,), POISON, dtype=torch.int8, device=DEVICE)
    sign = buffer[guard:guard + batch * total * length].view(batch, total, length)
    got = _swd_triton._sorted_diff(px, py, sign, p0, _swd_triton.REGISTER_SORT_MAX)
    want, want_sign = _sorted_diff_reference(px, py, p0, total)
    assert torch.all(buffer[:guard] == POISON) and torch.all(buffer[-guard:] == POISON)  # nothing outside
    assert torch.all(sign[:, :p0] == POISON) and torch.all(sign[:, p0 + n:] == POISON)  # nor in other chunks
    assert not torch.any(sign[:, p0:p0 + n] == POISON)  # every real position written
    assert torch.equal(sign[:, p0:p0 + n], want_sign[:, p0:p0 + n])
    assert got.isnan().tolist() == [True, True, False, False]
    assert got[2].isinf() and want[2].isinf()
    torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-6, atol=0)  # fp32 partial sums


def test_swd_loss_with_nan_and_inf_pixels_is_nan_exactly_where_the_reference_is(sort_path, triton_mode):
    x, y, proj = _swd_inputs(4, 7, 9, 12, 3, seed=21)
    x, y = x.detach().clone(), y.clone()
    x[0, 1, 3, 4], y[1, 2, 5, 2] = NAN, _signed_nan(True)  # NaN in x (item 0), -NaN in y (item 1)
    x[2, 0, 3, 4] = float("inf")  # inside, so that no patch holds it twice: +/-inf projections, no NaN
    x.requires_grad_(True)
    weights = torch.rand(x.shape[0], device=DEVICE) + 0.5
    loss = swd.swd_sorted_l1(x, y, proj)
    (grad,) = torch.autograd.grad((loss * weights).sum(), x)
    ref = swd.swd_sorted_l1_reference(x, y, proj)
    (ref_grad,) = torch.autograd.grad((ref * weights).sum(), x)
    assert ref.isnan().tolist() == [True, True, False, False] and ref[2].isinf()
    torch.testing.assert_close(loss, ref, equal_nan=True, rtol=1e-5, atol=0)
    # sign(NaN) = 0 in both: the gradient is finite everywhere and equals the reference's
    assert torch.isfinite(ref_grad).all() and torch.isfinite(grad).all()
    assert rel_err(grad, ref_grad) <= 1e-5


def test_trainer_guard_skips_the_update_when_the_swd_kernel_gives_nan(tmp_path, monkeypatch):
    """A NaN reaching MS-SWD's kernel (and nothing else) makes the student's loss NaN, which the
    trainer's non-finite guard skips: no update, recorded as student:loss."""
    from tests.trainutil import make_trainer

    monkeypatch.setenv("OPAD_KERNELS", "triton")
    trainer = make_trainer(tmp_path, max_steps=1, swd_projections=8, swd_patch=3, swd_scales=3,
                           discriminators=["clip"], batch_size=1, device=DEVICE.type)
    to_lab, calls = losses.srgb_to_lab, []

    def poisoned_to_lab(rgb):  # the student's image (the one with a gradient) gets one NaN pixel
        lab = to_lab(rgb)
        return lab.index_put((torch.tensor([0]),) * 4, torch.tensor(NAN)) if rgb.requires_grad else lab

    apply = swd.SwdSortedL1.apply
    monkeypatch.setattr(losses, "srgb_to_lab", poisoned_to_lab)
    monkeypatch.setattr(swd.SwdSortedL1, "apply", lambda *a: calls.append(a) or apply(*a))
    before = [p.detach().clone() for p in trainer.method.student_params]
    out = trainer.iteration()
    assert len(calls) == 3  # every scale through the kernel
    assert out.values["loss/swd"] != out.values["loss/swd"] and "student:loss" in out.nonfinite
    assert trainer.updates["student"] == 0
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.method.student_params))


# ------------------------------------------------------------------ K/V projections
# (width, heads) pairs like SD 2.1's 320/640/1280 at 64-wide heads, scaled down; K and V each
LAYERS = [(24, 3), (48, 6), (80, 5), (48, 6)]


def _kv_inputs(batch, seq, dim, x_grad, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, dim, generator=g).to(DEVICE).requires_grad_(x_grad)
    weights = [(torch.randn(n, dim, generator=g) / dim**0.5).to(DEVICE).requires_grad_(True)
               for n, _ in LAYERS for _ in (0, 1)]
    heads = [h for _, h in LAYERS for _ in (0, 1)]
    return x, weights, heads


@pytest.mark.parametrize("x_grad", [True, False])
@pytest.mark.parametrize("batch,seq,dim", [(1, 7, 40), (3, 11, 24)])
def test_kv_proj_outputs_and_every_gradient_equal_per_layer_linear(batch, seq, dim, x_grad, triton_mode):
    x, weights, heads = _kv_inputs(batch, seq, dim, x_grad, seed=batch * seq + dim)
    outs = kv_proj.kv_project(x, weights, heads)
    refs = [torch.nn.functional.linear(x, w).view(batch, seq, h, -1).transpose(1, 2) for w, h in zip(weights, heads)]
    g = torch.Generator().manual_seed(1)
    upstream = [torch.randn(r.shape, generator=g).to(DEVICE) for r in refs]
    inputs = [x, *weights] if x_grad else weights
    got = torch.autograd.grad(outs, inputs, upstream)
    want = torch.autograd.grad(refs, inputs, upstream)
    for o, r in zip(outs, refs):
        assert o.shape == r.shape and o.is_contiguous() and rel_err(o, r) <= 1e-5
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-5


def test_kv_proj_with_some_outputs_unused(triton_mode):
    x, weights, heads = _kv_inputs(2, 5, 24, True, seed=9)
    outs = kv_proj.kv_project(x, weights, heads)
    loss = outs[0].square().sum() + outs[5].sum()  # other layers get no gradient
    got = torch.autograd.grad(loss, [x, *weights])
    refs = kv_proj.kv_project_reference(x, weights, heads)
    want = torch.autograd.grad(refs[0].square().sum() + refs[5].sum(), [x, *weights], allow_unused=True)
    for a, b in zip(got, want):
        if b is None:  # a layer no output of which is used: exactly no gradient
            assert torch.count_nonzero(a) == 0
        else:  # summed over batch x sequence in another order: fp32 rounding, relative to the whole tensor
            assert rel_err(a, b) <= 1e-5


@pytest.fixture()
def int64_tables(monkeypatch):
    """Counts the int64 tables made from Python lists (each a host-to-device copy on a GPU)."""
    made = []
    tensor = torch.tensor

    def counting(data, *args, **kwargs):
        if kwargs.get("dtype") is torch.int64:
            made.append(len(data))
        return tensor(data, *args, **kwargs)

    monkeypatch.setattr(torch, "tensor", counting)
    return made


def _kv_step(x, weights, heads, seed):
    """Outputs and every gradient of the kernel, checked against per-layer F.linear."""
    outs = kv_proj.kv_project(x, weights, heads)
    g = torch.Generator().manual_seed(seed)
    upstream = [torch.randn(o.shape, generator=g).to(DEVICE) for o in outs]
    got = torch.autograd.grad(outs, [x, *weights], upstream)
    refs = kv_proj.kv_project_reference(x, weights, heads)
    want = torch.autograd.grad(refs, [x, *weights], upstream)
    for o, r in zip(outs, refs):
        assert rel_err(o, r) <= 1e-5
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-5
    return outs


def test_kv_proj_builds_its_tables_once_per_weight_set(triton_mode, int64_tables):
    from opad.kernels import _kv_proj_triton

    x, weights, heads = _kv_inputs(2, 5, 24, True, seed=13)
    _kv_step(x, weights, heads, seed=1)
    for step in range(2):  # the same weights, other contexts: no table is built again
        int64_tables.clear()
        x = torch.randn(2, 5, 24, device=DEVICE, requires_grad=True)
        outs = kv_proj.kv_project(x, weights, heads)
        assert int64_tables == []  # a warm forward copies nothing to the device
        torch.autograd.grad(outs, [x, *weights], [torch.ones_like(o) for o in outs])
        assert len(int64_tables) == 1  # backward: the new gradients' pointers, one table
    cache = _kv_proj_triton.TABLES
    builds = cache.builds
    with torch.no_grad():  # an in-place update (an optimizer step) keeps the pointers: no rebuild
        weights[0].add_(0.5)
    outs = _kv_step(x, weights, heads, seed=2)
    assert cache.builds == builds
    weights[3] = weights[3].detach().clone().mul_(-1).requires_grad_(True)  # new storage: a new table
    _kv_step(x, weights, heads, seed=3)
    assert cache.builds == builds + 1
    assert all(o._base is outs[0]._base for o in outs)  # the outputs share one buffer


def test_kv_proj_table_cache_stays_bounded(triton_mode):
    from opad.kernels import _kv_proj_triton

    cache = _kv_proj_triton.TABLES
    cache.clear()
    weights = [torch.randn(8, 16, device=DEVICE) for _ in range(cache.capacity + 5)]
    x = torch.randn(1, 3, 16, device=DEVICE)
    for w in weights:  # as many weight sets as would overflow it
        (out,) = kv_proj.kv_project(x, [w], [2])
        assert rel_err(out, kv_proj.kv_project_reference(x, [w], [2])[0]) <= 1e-5
    assert len(cache) == cache.capacity and cache.builds == len(weights)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kv_proj_makes_no_host_sync_once_its_tables_are_built(monkeypatch):
    """The old wrapper copied every table from a Python list (a blocking copy) on every call."""
    monkeypatch.setenv("OPAD_KERNELS", "triton")
    x, weights, heads = _kv_inputs(2, 77, 64, True, seed=3)

    def step():
        outs = kv_proj.kv_project(x, weights, heads)
        return torch.autograd.grad(outs, [x, *weights], [torch.ones_like(o) for o in outs])

    step()  # builds the weight set's tables: one blocking copy
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call now raises
    try:
        grads = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    refs = kv_proj.kv_project_reference(x, weights, heads)
    want = torch.autograd.grad(refs, [x, *weights], [torch.ones_like(r) for r in refs])
    assert all(rel_err(a, b) <= 1e-5 for a, b in zip(grads, want))


# ------------------------------------------------------------------ the launch device
def test_on_device_makes_a_cuda_device_current_and_leaves_cpu_tensors_alone(monkeypatch):
    from opad.kernels.launch import on_device

    with on_device(torch.device("cpu")):  # torch.cuda.device would refuse a CPU device
        pass
    entered = []

    class Recorder:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", Recorder)
    with on_device(torch.device("cuda", 1)):
        assert entered == [torch.device("cuda", 1)]


def test_every_kernel_launch_runs_on_its_tensors_device(triton_mode, monkeypatch):
    import contextlib

    from opad.kernels import _kv_proj_triton, _swd_triton, aot

    current, launches, warps = [], [], []

    @contextlib.contextmanager
    def recording(device):
        current.append(device)
        try:
            yield
        finally:
            current.pop()

    for module in (_swd_triton, _kv_proj_triton):
        monkeypatch.setattr(module, "on_device", recording, raising=False)
    for name, kernel in aot.kernels().items():
        def run(*args, _run=kernel.run, _name=name, **kwargs):
            launches.append((_name, current[-1] if current else None))
            warps.append((_name, kwargs.get("BLOCK"), str(kwargs.get("DTYPE")), kwargs.get("num_warps")))
            return _run(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", run)
    for limit in (0, 1 << 20):  # both sort paths
        x, y, proj = _swd_inputs(1, 5, 6, 3, 3, seed=limit % 7)
        swd.swd_sorted_l1_triton(x, y, proj, register_sort_max=limit).sum().backward()
    x, weights, heads = _kv_inputs(1, 3, 24, True, seed=2)
    outs = kv_proj.kv_project(x, weights, heads)
    torch.autograd.grad(outs, [x, *weights], [torch.ones_like(o) for o in outs])
    assert {name for name, _ in launches} == set(aot.kernels())  # every kernel launched ...
    assert {device for _, device in launches} == {x.device}  # ... each on its tensors' device
    def context(dtype):  # the K/V kernels' DTYPE constant as launched (Triton's dtype), else None
        return str(_kv_proj_triton._TL[dtype]) if dtype is not None else "None"

    compiled = {(v.kernel, v.constexprs.get("BLOCK"), context(v.constexprs.get("DTYPE"))): v.num_warps
                for v in aot.variants()}
    for name, block, dtype, num_warps in warps:  # with the block size and warp count the AOT compile checked
        assert num_warps == compiled[name, block, dtype], (name, block, dtype, num_warps)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_kernels_on_the_second_gpu_while_the_first_is_current(monkeypatch):
    monkeypatch.setenv("OPAD_KERNELS", "triton")
    second = torch.device("cuda", 1)
    with torch.cuda.device(0):
        x, y, proj = (t.detach().to(second) for t in _swd_inputs(2, 23, 37, 40, 5, seed=1, lattice=True))
        x.requires_grad_(True)
        for limit in (0, 1 << 20):
            from opad.kernels import _swd_triton

            monkeypatch.setattr(_swd_triton, "REGISTER_SORT_MAX", limit)
            loss = swd.swd_sorted_l1(x, y, proj)
            (grad,) = torch.autograd.grad(loss.sum(), x)
            ref = swd.swd_sorted_l1_reference(x, y, proj)
            (ref_grad,) = torch.autograd.grad(ref.sum(), x)
            assert loss.device == second and rel_err(loss, ref) <= 1e-5 and rel_err(grad, ref_grad) <= 1e-5
        x, weights, heads = _kv_inputs(3, 11, 24, True, seed=5)
        x = x.detach().to(second).requires_grad_(True)
        weights = [w.detach().to(second).requires_grad_(True) for w in weights]
        outs = kv_proj.kv_project(x, weights, heads)
        refs = kv_proj.kv_project_reference(x, weights, heads)
        upstream = [torch.randn_like(r) for r in refs]
        got = torch.autograd.grad(outs, [x, *weights], upstream)
        want = torch.autograd.grad(refs, [x, *weights], upstream)
        torch.cuda.synchronize(second)
        assert all(o.device == second and rel_err(o, r) <= 1e-5 for o, r in zip(outs, refs))
        assert all(rel_err(a, b) <= 1e-5 for a, b in zip(got, want))
        assert torch.cuda.current_device() == 0


# ------------------------------------------------------------------ the attention processor
def _unet_pair(bundle):
    fused = bundle.student_unet.to(DEVICE)
    assert fused_kv(fused) is not None  # load_models installs it
    plain = copy.deepcopy(fused)
    plain.set_attn_processor(AttnProcessor2_0())
    for unet in (fused, plain):
        enable_kv_training(unet)
    return fused, plain


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("mode", ["reference", "triton"])
def test_fused_processor_equals_diffusers_in_outputs_and_all_gradients(bundle, mode, checkpointing, monkeypatch):
    monkeypatch.setenv("OPAD_KERNELS", mode)
    fused, plain = _unet_pair(bundle)
    if checkpointing:  # blocks recompute in backward and must find the same K/V
        for unet in (fused, plain):
            unet.train()
            unet.enable_gradient_checkpointing()
    g = torch.Generator().manual_seed(4)
    z = torch.randn(2, 4, 8, 8, generator=g).to(DEVICE)
    cond = torch.randn(2, 77, fused.config.cross_attention_dim, generator=g).to(DEVICE)
    results = []
    for unet in (fused, plain):
        c = cond.clone().requires_grad_(True)
        out = unet(z, 999, encoder_hidden_states=c).sample
        params = [p for p in unet.parameters() if p.requires_grad]
        grads = torch.autograd.grad(out.square().mean(), [c, *params])
        results.append((out, grads))
    (out, grads), (ref, ref_grads) = results
    assert len(ref_grads) == 1 + 2 * 16
    assert rel_err(out, ref) <= 1e-5
    for a, b in zip(grads, ref_grads):
        assert rel_err(a, b) <= 1e-5


def test_kv_is_computed_once_per_unet_call_and_reused_while_sampling(bundle):
    unet = bundle.teacher_unet
    kv = fused_kv(unet)
    g = torch.Generator().manual_seed(2)
    z, cond = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    enable_kv_training(unet)
    start = kv.computations
    unet(z, 500, encoder_hidden_states=cond).sample.sum().backward()
    assert kv.computations == start + 1  # one for all 16 layers
    unet(z, 500, encoder_hidden_states=cond)
    assert kv.computations == start + 2  # recording autograd: a fresh graph per call
    with torch.no_grad():
        first = unet(z, 900, encoder_hidden_states=cond).sample
        unet(z, 800, encoder_hidden_states=cond)
        unet(z, 700, encoder_hidden_states=cond.clone())  # CFG concatenates anew every step
        assert kv.computations == start + 3  # sampler steps share one context
        cond.mul_(2)  # changed in place
        unet(z, 900, encoder_hidden_states=cond)
        assert kv.computations == start + 4
        cond.div_(2)
        for p in kv._weights()[:1]:
            p.add_(0.1)
        changed = unet(z, 900, encoder_hidden_states=cond).sample
        assert kv.computations == start + 5 and not torch.equal(first, changed)


def test_an_equal_but_other_context_gets_its_own_gradient(bundle):
    kv = fused_kv(bundle.student_unet)
    enable_kv_training(bundle.student_unet)
    first = torch.randn(1, 77, bundle.student_unet.config.cross_attention_dim, requires_grad=True)
    second = first.detach().clone().requires_grad_(True)
    kv.get(0, first)
    key, _ = kv.get(0, second)  # equal values, but recorded K/V of `first` would misroute
    key.sum().backward()
    assert second.grad is not None and first.grad is None


def test_install_is_idempotent_and_other_processors_survive(bundle):
    unet = bundle.student_unet
    kv = fused_kv(unet)
    assert install_fused_kv(unet) is kv
    self_attn = [p for n, p in unet.attn_processors.items() if n.endswith("attn1.processor")]
    assert self_attn and not any(type(p).__name__ == "FusedKVAttnProcessor" for p in self_attn)


# ------------------------------------------------------------------ the trainer
def test_trainer_with_the_kernels_matches_the_reference(tmp_path, monkeypatch):
    from tests.trainutil import make_trainer

    losses_by_mode = {}
    for mode in ("reference", "triton"):
        monkeypatch.setenv("OPAD_KERNELS", mode)
        # one discriminator: the kernels (MS-SWD, K/V) are what differs between the modes
        trainer = make_trainer(tmp_path / mode, max_steps=2, swd_projections=8, swd_patch=3, swd_scales=3,
                               discriminators=["clip"], batch_size=1, device=DEVICE.type)
        losses_by_mode[mode] = [trainer.iteration().values for _ in range(2)]
    for ref, got in zip(losses_by_mode["reference"], losses_by_mode["triton"]):
        keys = [k for k in ref if k.startswith("loss/")]
        assert "loss/swd" in keys and "loss/teacher" in keys
        for k in keys:
            assert got[k] == pytest.approx(ref[k], rel=1e-4, abs=1e-6), k


def test_kv_proj_under_autocast_computes_in_the_autocast_dtype(triton_mode):
    # fp16 here (the interpreter has no bf16); bf16 is what the trainer's CUDA autocast uses
    x, weights, heads = _kv_inputs(2, 9, 24, True, seed=12)
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        outs = kv_proj.kv_project(x, weights, heads)
    refs = [torch.nn.functional.linear(x.half(), w.half()).view(2, 9, h, -1).transpose(1, 2).float()
            for w, h in zip(weights, heads)]
    assert all(o.dtype == torch.float16 for o in outs)
    for o, r in zip(outs, refs):
        assert rel_err(o.float(), r) <= 2e-3
    got = torch.autograd.grad([o.float().square().sum() for o in outs], [x, *weights])
    want = torch.autograd.grad([r.square().sum() for r in refs], [x, *weights])
    assert all(g.dtype == torch.float32 for g in got)  # dW in the weights' dtype, dX back to x's
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-2
