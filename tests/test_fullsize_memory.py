"""opad.fullsize.memory.LiveMemory, the counter behind benchmarks/studies/estimate_gpu_memory.py: exact on work whose
memory is known, and the same on fake tensors as on real ones."""

from __future__ import annotations

import contextlib
import gc

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from opad.fullsize.memory import LiveMemory


def test_counts_each_storage_once_until_freed_rounded_like_cuda():
    mem = LiveMemory()  # 512-byte blocks
    with mem:
        a = torch.randn(1000)  # 4000 bytes -> 4096
        view = a[10:20].view(2, 5)  # a view: no new storage
        a.mul_(2)  # in place: no new storage
        b = a * 3  # 4096 more
        assert mem.current == 2 * 4096
        del a
        gc.collect()
        assert mem.current == 2 * 4096  # the view still holds a's storage
        del view
        gc.collect()
        assert mem.current == 4096
        c = torch.empty(3, 7, dtype=torch.float16)  # 42 bytes -> one 512-byte block
        assert mem.current == 4096 + 512
    assert mem.peak == 2 * 4096 + 0 and b.numel() == 1000 and c.numel() == 21
    exact = LiveMemory(block=1)
    with exact:
        torch.empty(3, 7, dtype=torch.float16)
    assert exact.peak == 42


def _adamw_step(fake: bool) -> tuple[LiveMemory, int, int]:
    """Two AdamW steps of a small MLP (awkward sizes), counted; returns the counter, the weights' bytes and
    the bytes held after the steps beyond the weights and the input."""
    mode = FakeTensorMode() if fake else contextlib.nullcontext()
    with mode:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(301, 1703), torch.nn.GELU(), torch.nn.LayerNorm(1703),
                                    torch.nn.Linear(1703, 517))
        x = torch.randn(257, 301)
    weights = sum(p.numel() * 4 for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), foreach=True)
    mem = LiveMemory(block=1)
    mem.add(model.parameters(), "weights")
    mem.add([x], "input")
    mem.label_gradients(model.parameters())
    with mode, mem:
        for _ in range(2):
            with mem.phase("forward/backward"):
                model(x).square().mean().backward()
            with mem.phase("optimizer"):
                opt.step()
                opt.zero_grad(set_to_none=True)
    return mem, weights, mem.current - weights - x.numel() * 4


def test_adamw_step_counts_weights_gradients_and_state_exactly():
    mem, weights, state = _adamw_step(fake=False)
    report = mem.report()
    assert report.at_peak["weights"] == weights
    assert report.at_peak["gradients"] == weights  # one gradient per weight, live until zero_grad
    # AdamW keeps two moments per weight (and a step counter per tensor): exactly 2x the weights after it
    assert 2 * weights <= state <= 2 * weights + 8 * 4 * 8
    # the peak is in the second step: weights, gradients, both moments and the update's one weight-sized
    # temporary (foreach AdamW's denominator), plus the per-tensor step counters
    assert 3 * weights <= report.at_peak["optimizer"] <= 3 * weights + 64
    assert report.peak == sum(report.at_peak.values())


def test_fake_tensors_count_the_same_as_real_ones():
    real, _, real_state = _adamw_step(fake=False)
    fake, _, fake_state = _adamw_step(fake=True)
    assert fake.report() == real.report() and fake_state == real_state


def test_item_under_fake_tensors_takes_the_ordinary_path():
    mem = LiveMemory()
    with FakeTensorMode(), mem:
        loss = torch.randn(3).square().mean()
        assert bool(torch.isfinite(loss)) is True
        assert loss.item() == 0.5
        assert int(torch.randint(0, 10, ())) == 1


def test_relabel_and_reset_peak():
    mem = LiveMemory(block=1)
    w = torch.randn(100)
    mem.add([w], "setup")
    mem.relabel([w], "weights")
    with mem:
        tmp = torch.randn(1000)
        del tmp
        gc.collect()
        mem.reset_peak()
        keep = torch.randn(10)
    report = mem.report()
    assert report.peak == 440 and report.at_peak == {"weights": 400, "setup": 40} and keep.numel() == 10


def _student_step_grads(trainer) -> tuple[list[torch.Tensor], int]:
    """The student's K/V gradients of one student forward + backward (fixed draws), and its peak memory."""
    method = trainer.method
    states = {k: g.get_state() for k, g in trainer.generators.items()}
    cond = trainer.context.encode(trainer.bundle.text_encoder, ["a photo of a <new1> toy"] * 2).detach()
    mem = LiveMemory(block=1)
    with mem:
        terms = method.student_forward(["a photo"] * 2, cond, cond).terms
        sum(terms.values()).backward()
    for k, g in trainer.generators.items():
        g.set_state(states[k])
    grads = [p.grad.clone() for p in method.student_kv]
    for p in method.student_kv:
        p.grad = None
    return grads, mem.report().peak


def test_gradient_checkpointing_covers_the_vae_decoder_and_the_backbones(tmp_path):
    """The student's image backpropagates through the VAE decoder and every backbone: with
    --gradient-checkpointing on their blocks are recomputed too (at 512 px the decoder holds more than the
    checkpointed UNets, docs/fullsize.md), with the same gradients and less memory held."""
    from trainutil import make_trainer

    # without the teacher the student's loss is the adversarial terms alone: decoder + backbones, the parts at stake
    trainer = make_trainer(tmp_path / "run", gradient_checkpointing="on", resolution=32, device="cpu",
                           use_teacher=False)
    b, backbones = trainer.bundle, trainer.method.backbones
    assert b.vae.decoder.gradient_checkpointing
    assert backbones["dino_v1"].encoder.grad_checkpointing and backbones["dino_v2"].encoder.grad_checkpointing
    assert backbones["clip"].encoder.transformer.grad_checkpointing
    trainer.cfg.discriminators = ["dino_v1", "clip"]  # a timm and an open_clip backbone (DINOv2's 518 px: 3x the time)
    checkpointed, peak_checkpointed = _student_step_grads(trainer)
    b.vae.disable_gradient_checkpointing()
    for backbone in backbones.values():
        backbone.set_grad_checkpointing(False)
    kept, peak_kept = _student_step_grads(trainer)
    for a, c in zip(checkpointed, kept):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-7)
    assert peak_checkpointed < peak_kept
