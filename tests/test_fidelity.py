"""Issue-8 trainer defects, each tested so that it fails on the code before its fix."""

import pytest
import torch
from trainutil import make_trainer

from opad.diffusion.sampling import encode_prompts, sample_student
from opad.diffusion.schedule import guided_prediction, teacher_x0
from opad.train.data import ConceptData
from opad.train.loop import StepOutcome

PROMPTS = ["a photo of a <new1> toy", "a <new1> toy on the beach"]


# 1. Losses see the unclamped decoder output ------------------------------------------------------
def _push_student_pixels_out_of_range(trainer, monkeypatch) -> dict:
    """Wrap the VAE decode so the student's image has a block above 1 and one below 0."""
    vae, seen = trainer.bundle.vae, {}
    real_decode = vae.decode

    def decode(z, *args, **kwargs):
        out = real_decode(z, *args, **kwargs)
        if z.requires_grad:  # the student's decode (the teacher's target runs without grad)
            push = torch.zeros_like(out.sample)
            push[:, :, :8, :8] = 3.0  # image = sample / 2 + 0.5 -> well above 1
            push[:, :, -8:, -8:] = -3.0  # well below 0
            out.sample = out.sample + push
            seen["sample"] = out.sample
        return out

    monkeypatch.setattr(vae, "decode", decode)
    return seen


def test_out_of_range_pixels_get_gradient_from_every_loss_term(tiny_dir, tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path / "run", lpips_weight=1.0)
    seen = _push_student_pixels_out_of_range(trainer, monkeypatch)
    cond = trainer.context.encode(trainer.bundle.text_encoder, PROMPTS).detach()
    terms = trainer.method.student_forward(PROMPTS, cond, cond).terms
    image_terms = ["id", "swd", "lpips"] + [f"adv_{n}" for n in ("dino_v1", "dino_v2", "clip")]
    assert set(image_terms) <= set(terms)
    for name in image_terms:
        (grad,) = torch.autograd.grad(terms[name], seen["sample"], retain_graph=True)
        assert grad[:, :, :8, :8].abs().sum() > 0, f"{name}: no gradient above the range"
        assert grad[:, :, -8:, -8:].abs().sum() > 0, f"{name}: no gradient below the range"


def test_saved_and_buffered_images_stay_clamped(tiny_dir, tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path / "run", collab_start=0.0, collab_buffer=2)
    _push_student_pixels_out_of_range(trainer, monkeypatch)
    trainer.method.refresh_collab_buffer()  # no grad: the hook leaves it alone, so push through the sampler's decode
    assert 0 <= trainer.method.collab_images.min() and trainer.method.collab_images.max() <= 1
    images = sample_student(trainer.bundle, PROMPTS, generator=torch.Generator().manual_seed(0))
    assert 0 <= images.min() and images.max() <= 1


# 2. bf16: UNet outputs upcast before CFG / x0 ------------------------------------------------------
def test_cfg_combines_the_unet_outputs_in_fp32(bundle):
    unet = bundle.teacher_unet
    captured = {}
    unet.register_forward_hook(lambda m, i, out: captured.__setitem__("raw", out.sample))
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([911, 47])
    cond = encode_prompts(bundle, ["a red cube", "a dog"])
    uncond = encode_prompts(bundle, [""])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = guided_prediction(unet, z, t, cond, uncond, 7.5)
    assert captured["raw"].dtype == torch.bfloat16  # autocast really ran the UNet in bf16
    u, c = captured["raw"].float().chunk(2)
    assert pred.dtype == torch.float32
    torch.testing.assert_close(pred, u + 7.5 * (c - u), rtol=1e-6, atol=1e-6)


# Stated tolerances (relative L2 to the fp32 result, tiny preset, this CPU): measured 4.7% for the
# teacher's CFG x0 (bf16 UNet output error amplified 7.5x by guidance) and 0.32% for the student's
# one-step x0. The fp32 combination removes the extra rounding (see the test above); the UNet's own
# bf16 output error remains and sets these numbers.
@pytest.mark.parametrize("which, tolerance", [("teacher", 0.06), ("student", 0.01)])
def test_bf16_autocast_x0_is_close_to_fp32(bundle, which, tolerance):
    g = torch.Generator().manual_seed(5)
    cond = encode_prompts(bundle, ["a red cube", "a photo of a dog"])
    uncond = encode_prompts(bundle, [""])
    ac = bundle.teacher_scheduler.alphas_cumprod
    z = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([999, 500])

    def x0():
        if which == "teacher":
            return teacher_x0(bundle.teacher_unet, z, t, cond, uncond, ac, "v_prediction", 7.5)
        from opad.diffusion.sampling import student_denoise

        return student_denoise(bundle, cond, z, steps=1)

    with torch.no_grad():
        ref = x0()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = x0()
    assert low.dtype == torch.float32
    rel = ((low - ref).norm() / ref.norm()).item()
    assert rel < tolerance, rel


def test_half_precision_weights_sample_at_every_step_count(tiny_dir):
    from opad.models.loading import load_models

    bundle = load_models(str(tiny_dir / "teacher"), str(tiny_dir / "student"), dtype=torch.bfloat16)
    ref = load_models(str(tiny_dir / "teacher"), str(tiny_dir / "student"))
    for steps in (1, 2, 4):
        images = sample_student(bundle, ["a red cube"], steps=steps, generator=torch.Generator().manual_seed(0))
        expected = sample_student(ref, ["a red cube"], steps=steps, generator=torch.Generator().manual_seed(0))
        assert images.dtype == torch.float32 and torch.isfinite(images).all()
        assert (images - expected).abs().mean() < 0.05, steps


# 3. Discriminator heads: no clip by default, per head when set --------------------------------------
def _head_grads(trainer, fake):
    """The gradient each head's parameters receive in one discriminator step, captured at opt.step."""
    grads = {}
    real_step = trainer.method.opt_heads.step

    def step(*a, **k):
        for name, head in trainer.method.heads.items():
            grads[name] = torch.cat([p.grad.flatten().clone() for p in head.parameters()])
        return real_step(*a, **k)

    trainer.method.opt_heads.step = step
    trainer.method.discriminator_step(fake, StepOutcome())
    trainer.method.opt_heads.step = real_step
    return grads


@pytest.mark.parametrize("limit", [0.0, 1e-3])
def test_heads_are_clipped_one_by_one_and_not_by_default(tiny_dir, tmp_path, limit):
    kw = dict(discriminators=["dino_v1", "clip"], head_lr=0.0, max_grad_norm=1e-6)
    if limit:
        kw["head_max_grad_norm"] = limit
    trainer = make_trainer(tmp_path / "run", **kw)
    assert trainer.cfg.head_max_grad_norm == limit  # 0 (off) is the default
    g = torch.Generator().manual_seed(0)
    fake = {n: 50 * torch.randn(2, trainer.method.backbones[n].feature_dim, generator=g) for n in trainer.method.heads}
    gens = {k: v.get_state() for k, v in trainer.generators.items()}
    raw = _head_grads(make_trainer(tmp_path / "ref", discriminators=["dino_v1", "clip"], head_lr=0.0,
                                   max_grad_norm=0.0), fake)
    for k, v in gens.items():
        trainer.generators[k].set_state(v)
    got = _head_grads(trainer, fake)
    for name in trainer.method.heads:
        expected = raw[name] * min(1.0, limit / raw[name].norm().item()) if limit else raw[name]
        torch.testing.assert_close(got[name], expected, rtol=1e-5, atol=1e-9)


# 4. Scale augmentation pastes onto a mid-grey canvas ---------------------------------------------
def test_shrunk_photo_is_pasted_on_grey():
    white = [torch.ones(3, 64, 64)]
    data = ConceptData(white, "<new1> toy", 64, 8, flip=False, scale_aug=True)
    batch = data.sample(40, torch.Generator().manual_seed(0))
    shrunk = batch.masks.flatten(1).mean(1) < 1
    assert shrunk.any()
    pixels = batch.pixels[shrunk]
    assert (((pixels - 1).abs() < 1e-5) | (pixels == 0)).all()  # photo (white) or canvas (0 in [-1, 1], mid-grey)
    assert (pixels == 0).any()


# 5. Without the teacher the student's loss trains the shared token -------------------------------
def test_without_the_teacher_the_student_loss_trains_the_token(tiny_dir, tmp_path):
    trainer = make_trainer(tmp_path / "run", use_teacher=False, student_lr=1e-2)
    before = trainer.method.teacher_tokens.rows.detach().clone()
    table = trainer.bundle.text_encoder.get_input_embeddings().weight
    table_before = table.detach().clone()
    trainer.iteration()
    assert not torch.equal(before, trainer.method.teacher_tokens.rows)
    changed_rows = torch.nonzero((table_before != table).any(1)).flatten().tolist()
    assert changed_rows == trainer.token_ids  # written back, and only that row


# 6. The teacher-first baseline (paper §12, Table 6) -----------------------------------------------
TEACHER_FIRST = dict(method="teacher-first", max_steps=4, teacher_first_steps=2, teacher_first_samples=3,
                     teacher_first_sample_steps=2, checkpoint_every=10)


def test_teacher_first_trains_the_teacher_then_the_student_on_its_samples(tiny_dir, tmp_path):
    from trainutil import changed, kv_names, snapshot

    from opad.train.checkpoint import complete_checkpoints, load_checkpoint
    from opad.train.runlog import read_log

    trainer = make_trainer(tmp_path / "run", **TEACHER_FIRST)
    assert trainer.cfg.discriminators == [] and trainer.cfg.collab_start is None and not trainer.method.heads
    b = trainer.bundle
    s0 = snapshot(trainer)
    trainer.iteration()  # step 0: the teacher alone
    s1 = snapshot(trainer)
    teacher = kv_names("teacher_unet", b.teacher_unet)
    assert teacher <= changed(s0, s1) and not changed(s0, s1) & kv_names("student_unet", b.student_unet)

    out = trainer.train()  # resumes the loop at step 0 of a fresh run folder
    rows = read_log(out / "log.csv")
    assert [bool(r["loss/teacher"]) for r in rows] == [True, True, False, False]
    assert [bool(r["loss/id"]) for r in rows] == [False, False, True, True]
    state = load_checkpoint(complete_checkpoints(out)[-1][1])
    images = state["teacher_set_images"]
    assert images.shape == (3, 3, 64, 64) and 0 <= images.min() and images.max() <= 1
    assert len(state["teacher_set_prompts"]) == 3 and all("<new1> toy" in p for p in state["teacher_set_prompts"])
    assert (out / "concept").is_dir() and (out / "teacher_concept").is_dir()


def test_teacher_first_student_phase_moves_only_the_student(tiny_dir, tmp_path):
    from trainutil import changed, kv_names, snapshot

    trainer = make_trainer(tmp_path / "run", **TEACHER_FIRST)
    trainer.step = 2
    trainer.method.sample_teacher_set()
    s0 = snapshot(trainer)
    values = trainer.iteration().values
    assert set(values) >= {"loss/id", "loss/student", "grad_norm/student"} and "loss/teacher" not in values
    assert changed(s0, snapshot(trainer)) == kv_names("student_unet", trainer.bundle.student_unet)


def test_teacher_first_resumes_bit_exact_across_the_phase_boundary(tiny_dir, tmp_path):
    straight = make_trainer(tmp_path / "straight", **TEACHER_FIRST)
    straight.train()
    make_trainer(tmp_path / "split", **TEACHER_FIRST).train(until=3)
    resumed = make_trainer(tmp_path / "split", resume=True, **TEACHER_FIRST)
    resumed.train()
    assert torch.equal(straight.method.teacher_set_images, resumed.method.teacher_set_images)
    assert all(torch.equal(a, b) for a, b in zip(straight.method.student_kv, resumed.method.student_kv))


@pytest.mark.parametrize("overrides, message", [
    (dict(use_teacher=False), "--teacher-first needs the teacher"),
    (dict(teacher_first_steps=4), r"--teacher-first-steps \(4\) must be below --max-steps \(4\)"),
])
def test_teacher_first_bad_settings(tmp_path, overrides, message):
    from opad.errors import OpadError

    with pytest.raises(OpadError, match=message):
        make_trainer(tmp_path / "run", **{**TEACHER_FIRST, **overrides})
    assert not (tmp_path / "run").exists()


# A run whose every update was skipped must not end as a success ------------------------------------
def test_a_run_whose_every_student_update_was_skipped_fails(tiny_dir, tmp_path, monkeypatch):
    import opad.train.losses
    from opad.errors import OpadError

    monkeypatch.setattr(opad.train.losses, "latent_mse", lambda a, b: (a - b).pow(2).flatten(1).mean(1) * float("nan"))
    trainer = make_trainer(tmp_path / "run", max_steps=2, max_bad_steps=5, discriminators=["clip"])
    with pytest.raises(OpadError, match=r"no update of the student was applied in 2 step\(s\)"):
        trainer.train()
    assert not (tmp_path / "run" / "concept").exists()
