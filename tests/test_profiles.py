"""``--profile {paper,release}``: every point of the release profile observable, flags still win."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from trainutil import make_cfg, make_trainer

import opad.train.methods.base as method_base
import opad.train.methods.opad as opad_method
from opad.config import FROM_PROFILE, TrainConfig
from opad.config.profiles import POINTS, markdown_table, profile_defaults
from opad.errors import OpadError
from opad.presets import PRESETS
from opad.train import losses
from opad.train.data import RELEASE_TEMPLATES, TEMPLATES, ConceptData, load_images
from opad.train.loop import StepOutcome

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a photo of a <new1> toy", "a <new1> toy on the beach"]


def test_docs_table_is_the_profile_table():
    assert markdown_table() in (REPO / "docs" / "training.md").read_text()


def test_profile_fills_only_unset_fields_and_config_json_records_everything(tiny_dir, tmp_path):
    release = make_cfg(tmp_path / "a", profile="release").resolved(PRESETS["tiny"])
    for point in POINTS:
        assert getattr(release, point.field) == point.release, point.field
    paper = TrainConfig(output_dir=str(tmp_path / "b")).resolved(PRESETS["tiny"])
    assert all(getattr(paper, p.field) == p.paper for p in POINTS)
    mixed = make_cfg(tmp_path / "c", profile="release", crop="center", swd_weight=0.3).resolved(PRESETS["tiny"])
    assert (mixed.crop, mixed.swd_weight, mixed.sampling) == ("center", 0.3, "epoch")  # flags win
    assert all(v is not FROM_PROFILE for v in dataclasses.asdict(mixed).values())

    trainer = make_trainer(tmp_path / "run", profile="release", max_steps=1, discriminators=["clip"])
    trainer.train()
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["profile"] == "release"
    assert {p.field: saved[p.field] for p in POINTS} == {p.field: p.release for p in POINTS}
    assert "<from profile>" not in (tmp_path / "run" / "config.json").read_text()


def test_bad_profile_and_profile_choices_are_refused(tmp_path):
    with pytest.raises(OpadError, match="--profile must be one of paper, release, got 'authors'"):
        make_cfg(tmp_path, profile="authors").validate()
    with pytest.raises(OpadError, match="--crop must be one of center, stretch, got 'fit'"):
        make_cfg(tmp_path, crop="fit").validate()


def test_swd_weights_keep_the_same_pull():
    paper, release = profile_defaults("paper"), profile_defaults("release")
    assert release["swd_weight"] == 0.1 and paper["swd_weight"] == pytest.approx(0.171)


# the same noise tensor reaches the teacher step, the student's x_T and the re-noising -------------
def _noises(trainer, monkeypatch):
    seen = []
    real_add_noise, real_denoise = opad_method.add_noise, opad_method.student_denoise

    def add_noise(x0, noise, t, ac):
        seen.append(("add_noise", noise))
        return real_add_noise(x0, noise, t, ac)

    def student_denoise(bundle, cond, noise, steps=1):
        seen.append(("x_T", noise))
        return real_denoise(bundle, cond, noise, steps)

    monkeypatch.setattr(method_base, "add_noise", add_noise)  # the teacher's loss
    monkeypatch.setattr(opad_method, "add_noise", add_noise)  # the re-noising
    monkeypatch.setattr(opad_method, "student_denoise", student_denoise)
    trainer.iteration()
    return seen


@pytest.mark.parametrize("profile", ["paper", "release"])
def test_release_shares_one_noise_tensor_between_the_three_uses(tiny_dir, tmp_path, monkeypatch, profile):
    trainer = make_trainer(tmp_path / "run", profile=profile, discriminators=["clip"])
    seen = _noises(trainer, monkeypatch)
    assert [name for name, _ in seen] == ["add_noise", "x_T", "add_noise"]  # teacher, student, re-noising
    teacher, student, renoise = (n for _, n in seen)
    same = torch.equal(teacher, student) and torch.equal(student, renoise)
    assert same == (profile == "release")
    if profile == "paper":
        assert not torch.equal(teacher, student) and not torch.equal(student, renoise)


# templates, caption form, canvas, crop, sampling ---------------------------------------------------
def test_release_prompts_have_25_templates_and_the_hint_as_second_word():
    img = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))]
    release = ConceptData(img, "<new1> toy", 64, 8, prompt_style="release")
    assert release.templates == RELEASE_TEMPLATES and len(RELEASE_TEMPLATES) == 25
    assert not any("close" in t for t in RELEASE_TEMPLATES)
    assert ConceptData(img, "<new1> toy", 64, 8, prompt_style="release", scale_aug=False).templates == TEMPLATES
    paper = ConceptData(img, "<new1> toy", 64, 8)
    assert paper.templates == TEMPLATES and len(TEMPLATES) == 27
    hints = ("a far away", "very small", "zoomed in", "close up")
    r = release.sample(80, torch.Generator().manual_seed(1)).prompts
    p = paper.sample(80, torch.Generator().manual_seed(1)).prompts
    hinted_r = [q for q in r if any(f" {h} " in f" {q} " for h in hints)]
    assert hinted_r and all(q.split()[0] in ("a", "the") and any(q.split(" ", 1)[1].startswith(h) for h in hints)
                            for q in hinted_r)  # "a zoomed in photo of a <new1> toy"
    assert any(q.startswith(hints) for q in p)  # Custom Diffusion: "zoomed in a photo of ..."


def test_scale_augmentation_canvas_is_grey_in_both_profiles():
    white = [torch.ones(3, 64, 64)]
    for style in ("custom_diffusion", "release"):
        batch = ConceptData(white, "x", 64, 8, flip=False, prompt_style=style).sample(30, torch.Generator().manual_seed(0))
        assert (((batch.pixels - 1).abs() < 1e-5) | (batch.pixels == 0)).all() and (batch.pixels == 0).any()


def test_stretch_keeps_the_whole_photo_and_center_crops(tmp_path):
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    bands = Image.new("RGB", (192, 64))
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        bands.paste(colour, (64 * i, 0, 64 * (i + 1), 64))
    bands.save(folder / "wide.png")
    center = load_images(folder, 64, allow_upscale=False, crop="center")[0]
    stretch = load_images(folder, 64, allow_upscale=False, crop="stretch")[0]
    assert center.shape == stretch.shape == (3, 64, 64)
    assert center[1].mean() > 0.95 and center[0].mean() < 0.05  # only the green middle
    assert stretch[0, :, :10].mean() > 0.9 and stretch[2, :, -10:].mean() > 0.9  # red left, blue right


def test_epoch_sampling_visits_every_pair_once_per_epoch_and_reshuffles():
    images = [torch.full((3, 64, 64), i / 3) for i in range(3)]
    data = ConceptData(images, "<new1> toy", 64, 8, flip=False, scale_aug=False, sampling="epoch", seed=5)
    g = torch.Generator().manual_seed(0)
    n = 3 * len(TEMPLATES)

    def epoch():
        batch = data.sample(n, g)
        return [(round(float(px.mean()), 3), prompt) for px, prompt in zip(batch.pixels, batch.prompts)]

    first, second = epoch(), epoch()
    expected = {(round(i / 3 * 2 - 1, 3), t.format("<new1> toy")) for i in range(3) for t in TEMPLATES}
    assert set(first) == expected and len(first) == n  # each pair exactly once
    assert set(second) == expected and first != second  # reshuffled
    assert data.cursor == 2 * n


# loss scale, discriminator inputs, LPIPS net, MS-SWD range, remove-STE ------------------------------
def test_release_teacher_loss_is_the_channel_sum(tiny_dir, tmp_path):
    paper = make_trainer(tmp_path / "a", discriminators=["clip"])
    release = make_trainer(tmp_path / "b", discriminators=["clip"], teacher_loss_channels="sum")
    batch = paper.method.next_batch()
    cond = paper.context.encode(paper.bundle.text_encoder, batch.prompts)
    mean = paper.method._teacher_loss(batch, cond)
    total = release.method._teacher_loss(batch, cond)
    assert total.item() == pytest.approx(4 * mean.item(), rel=1e-5)


def test_release_discriminators_take_the_augmented_batch_as_real(tiny_dir, tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path / "run", profile="release", discriminators=["dino_v1"])
    assert trainer.method.backbones["dino_v1"].normalize is False and trainer.method.backbones["dino_v1"].resize == "area"
    monkeypatch.setattr(trainer.data, "real_images", lambda *a: pytest.fail("release must not draw photos"))
    inputs = []
    trainer.method.backbones["dino_v1"].encoder.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    batch = trainer.method.next_batch()
    fake = {"dino_v1": torch.randn(2, trainer.method.backbones["dino_v1"].feature_dim)}
    trainer.method.discriminator_step(fake, StepOutcome(), batch)
    expected = torch.nn.functional.interpolate((batch.pixels + 1) / 2, size=(224, 224), mode="area") * 2 - 1
    torch.testing.assert_close(inputs[-1], expected)


def test_release_lpips_is_alexnet_and_paper_vgg(tiny_dir, tmp_path):
    import lpips.pretrained_networks as nets

    release = make_trainer(tmp_path / "a", profile="release", lpips_weight=1.0, discriminators=["clip"])
    paper = make_trainer(tmp_path / "b", lpips_weight=1.0, discriminators=["clip"])
    assert isinstance(release.method.lpips.net, nets.alexnet) and isinstance(paper.method.lpips.net, nets.vgg16)


@pytest.mark.parametrize("profile", ["paper", "release"])
def test_mswd_sees_signed_images_only_in_release(tiny_dir, tmp_path, monkeypatch, profile):
    trainer = make_trainer(tmp_path / "run", profile=profile, discriminators=["clip"])
    seen = {}
    real = losses.ms_swd
    monkeypatch.setattr(losses, "ms_swd", lambda x, y, **kw: seen.update(x=x, y=y) or real(x, y, **kw))
    cond = trainer.context.encode(trainer.bundle.text_encoder, PROMPTS).detach()
    result = trainer.method.student_forward(PROMPTS, cond, cond)
    scale = (2, -1) if profile == "release" else (1, 0)
    torch.testing.assert_close(seen["x"].detach(), result.image * scale[0] + scale[1])
    torch.testing.assert_close(seen["y"], result.image_tc * scale[0] + scale[1])


def test_release_identity_input_is_resized_on_its_own(tiny_dir, tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path / "run", profile="release")
    modes = []
    clip = trainer.method.backbones["clip"]
    real_spec = clip.input_spec
    monkeypatch.setattr(clip, "input_spec", lambda resize=None: modes.append(resize) or real_spec(resize))
    cond = trainer.context.encode(trainer.bundle.text_encoder, PROMPTS).detach()
    trainer.method.student_forward(PROMPTS, cond, cond)
    assert modes == [None, "bilinear", "bilinear"]  # the discriminator pass (area), student id, teacher id


@pytest.mark.parametrize("profile, trains", [("paper", True), ("release", False)])
def test_remove_ste_student_token(tiny_dir, tmp_path, profile, trains):
    trainer = make_trainer(tmp_path / "run", profile=profile, shared_text_encoder=False, student_lr=1e-2,
                           discriminators=["clip"])
    before = trainer.method.student_tokens.rows.detach().clone()
    trainer.iteration()
    assert (not torch.equal(before, trainer.method.student_tokens.rows)) == trains


RESUME = dict(max_steps=5, checkpoint_every=10, discriminators=["clip"], profile="release")


def test_release_profile_resumes_bit_exact(tiny_dir, tmp_path):
    straight = make_trainer(tmp_path / "straight", **RESUME)
    straight.train()
    first = make_trainer(tmp_path / "split", **RESUME)
    first.train(until=2)
    second = make_trainer(tmp_path / "split", resume=True, **RESUME)
    second.train()
    assert second.data.cursor == straight.data.cursor == 10
    a = [p.detach() for p in straight.method.student_kv] + [straight.method.teacher_tokens.rows.detach()]
    b = [p.detach() for p in second.method.student_kv] + [second.method.teacher_tokens.rows.detach()]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
