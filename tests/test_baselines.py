"""The Table-5 baselines (--method custom-diffusion|dreambooth|lora|textual-inversion): each trains
a few steps on the tiny preset through the shared loop and writes a concept that a plain diffusers
pipeline loads, and that changes its images; opad.generate loads it too."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from trainutil import make_cfg, make_trainer, write_class_images

from opad import generate
from opad.concept.folder import kv_parameters
from opad.config import BASELINES, TrainConfig, config_from_args
from opad.errors import OpadError
from opad.train.checkpoint import latest_checkpoint, load_checkpoint
from opad.train.cli import build_parser
from opad.train.methods.finetune import StudentFinetune

PROMPT = "a photo of <new1> toy on the beach"
# a learning rate high enough that 3 steps visibly move the images of every baseline
FAST = dict(max_steps=3, preview_every=10, checkpoint_every=10, student_lr=3e-3)
FORMATS = {"custom-diffusion": "custom-diffusion", "dreambooth": "unet", "lora": "lora",
           "textual-inversion": "textual-inversion"}


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory) -> dict:
    """Each baseline trained once for the module: method -> its trainer (after train())."""
    runs = {}
    for method in BASELINES:
        trainer = make_trainer(tmp_path_factory.mktemp(method) / "run", method=method, **FAST)
        trainer.train()
        runs[method] = trainer
    return runs


def _pipe(tiny_dir) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(tiny_dir / "student", local_files_only=True)


def _image(pipe: StableDiffusionPipeline, prompt: str = PROMPT) -> np.ndarray:
    return pipe(prompt, num_inference_steps=1, guidance_scale=0.0, generator=torch.Generator().manual_seed(3),
                output_type="np").images


def _load_plain(pipe: StableDiffusionPipeline, concept, fmt: str) -> StableDiffusionPipeline:
    """How a diffusers user loads each format, without opad."""
    if fmt == "custom-diffusion":
        pipe.unet.load_attn_procs(concept, weight_name="pytorch_custom_diffusion_weights.safetensors", _pipeline=pipe)
    elif fmt == "lora":
        pipe.load_lora_weights(concept)
    elif fmt == "unet":
        pipe.unet = UNet2DConditionModel.from_pretrained(concept / "unet")
    pipe.load_textual_inversion(concept / "<new1>.safetensors", token="<new1>")
    return pipe


@pytest.mark.parametrize("method", BASELINES)
def test_baseline_trains_and_its_concept_loads_in_plain_diffusers_and_generate(trained, tiny_dir, method, tmp_path):
    trainer = trained[method]
    concept = trainer.out / "concept"
    meta = json.loads((concept / "opad_concept.json").read_text())
    assert meta["format"] == FORMATS[method] and meta["method"] == method and meta["tokens"] == ["<new1>"]
    assert trainer.updates == {"student": 3}
    log = (trainer.out / "log.csv").read_text().splitlines()
    assert log[0].split(",")[:3] == ["step", "loss/denoise", "loss/student"] and len(log) == 4
    assert not (trainer.out / "teacher_concept").exists() and trainer.bundle.teacher_unet is None

    base = _pipe(tiny_dir)
    base.load_textual_inversion(concept / "<new1>.safetensors", token="<new1>")  # the token, untrained weights
    plain = _load_plain(_pipe(tiny_dir), concept, FORMATS[method])
    before, after = _image(base), _image(plain)
    if method == "textual-inversion":  # only the row trained: compare with the row it started from
        untrained = _pipe(tiny_dir)
        untrained.tokenizer.add_tokens(["<new1>"])
        untrained.text_encoder.resize_token_embeddings(len(untrained.tokenizer))
        table = untrained.text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            table[-1] = table[untrained.tokenizer.convert_tokens_to_ids("toy")]
        before = _image(untrained)
    assert np.abs(after - before).max() > 1e-3  # the concept changed the plain pipeline's image

    # opad.generate loads it too, and makes the same one-step image
    out = tmp_path / "gen"
    generate.run(generate.build_parser().parse_args(["--concept", str(concept), "--prompt", PROMPT, "--seed", "3",
                                                     "--num-images", "1", "--out", str(out)]))
    ours = np.asarray(Image.open(out / "000_seed3.png"), dtype=np.float32) / 255
    assert np.abs(after[0] - ours).max() <= 2 / 255  # both rounded to 8 bits


def test_trainable_sets(trained):
    """What each baseline trains: K/V + token, the whole UNet, LoRA adapters, the token alone."""
    unet_params = {m: sum(p.numel() for p in t.method.weights) for m, t in trained.items()}
    full = sum(p.numel() for p in trained["dreambooth"].bundle.student_unet.parameters())
    assert unet_params["dreambooth"] == full
    assert unet_params["textual-inversion"] == 0
    kv = kv_parameters(trained["custom-diffusion"].bundle.student_unet)
    assert unet_params["custom-diffusion"] == sum(p.numel() for p in kv)
    assert 0 < unet_params["lora"] < full
    tokens = {m: isinstance(t.method, StudentFinetune) and t.method.token_rows is not None for m, t in trained.items()}
    assert tokens == {"custom-diffusion": True, "dreambooth": False, "lora": False, "textual-inversion": True}
    # DreamBooth / LoRA name the subject with the frozen rare token "sks"
    for method in ("dreambooth", "lora"):
        b = trained[method].bundle
        table = b.text_encoder.get_input_embeddings().weight
        sks = b.tokenizer.encode("sks", add_special_tokens=False)[0]
        assert torch.equal(table[trained[method].token_ids[0]], table[sks])


def test_baseline_resumes_bit_exact(tiny_dir, tmp_path):
    straight = make_trainer(tmp_path / "straight", method="lora", max_steps=4, checkpoint_every=10)
    straight.train()
    first = make_trainer(tmp_path / "split", method="lora", max_steps=4, checkpoint_every=10)
    first.train(until=2)
    assert first.train_seconds > 0
    # the checkpoint carries the run's training time so far; say it was long
    _, path = latest_checkpoint(tmp_path / "split")
    state = load_checkpoint(path)
    torch.save({**state, "train_seconds": 1000.0}, path / "state.pt")
    second = make_trainer(tmp_path / "split", method="lora", max_steps=4, checkpoint_every=10, resume=True)
    start = time.perf_counter()
    second.train()
    wall = time.perf_counter() - start
    assert all(torch.equal(a, b) for a, b in zip(straight.method.weights, second.method.weights))
    assert 1000 < second.train_seconds < 1000 + wall  # the segments before, and this one


def test_baseline_config_resolves_opad_terms_off():
    def resolved(method):
        return TrainConfig(method=method).resolved()

    cfg = resolved("dreambooth")
    assert (cfg.use_teacher, cfg.discriminators, cfg.collab_start) == (False, [], None)
    assert cfg.max_steps == 1000 and cfg.student_lr == 5e-6  # the paper's iterations, DreamBooth's rate
    assert (resolved("lora").max_steps, resolved("lora").student_lr) == (800, 1e-4)
    assert resolved("textual-inversion").max_steps == 4000
    assert resolved("custom-diffusion").student_lr == pytest.approx(2e-5)  # 1e-5 x batch 2
    assert resolved("teacher-first").method == "teacher-first" and resolved("lora").lora_alpha == 4.0
    with pytest.raises(OpadError, match="--teacher-first is --method teacher-first"):
        config_from_args(build_parser().parse_args(["--output-dir", "x", "--method", "lora", "--teacher-first"]))
    with pytest.raises(OpadError, match="--method must be one of"):
        make_cfg("x", method="dreamboth").validate()


def test_cached_kv_follows_lora_adapters(bundle):
    """Sampling (no grad) caches every layer's K/V; adding a LoRA adapter to to_k/to_v, or an update
    of its weights, must recompute them (the LoRA run's previews)."""
    from peft import LoraConfig

    from opad.diffusion.sampling import sample_student

    def image():
        return sample_student(bundle, [PROMPT.replace("<new1> ", "")], generator=torch.Generator().manual_seed(1))

    base = image()
    # cross-attention only: K/V of the text, the cached ones
    bundle.student_unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=r".*attn2\.to_[kv]"))
    adapters = [p for n, p in bundle.student_unet.named_parameters() if "lora_B" in n]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapters:
            p.copy_(torch.randn(p.shape, generator=g))
    adapted = image()
    assert (adapted - base).abs().max() > 1e-2
    with torch.no_grad():
        for p in adapters:
            p.mul_(0)  # an in-place update, like the optimizer's: back to the base image
    assert torch.allclose(image(), base, atol=1e-5)


def test_dreambooth_prior_preservation(tiny_dir, tmp_path):
    """--class-dir adds the class-prior loss (class prompts on the class photos) to the baseline's."""
    trainer = make_trainer(tmp_path / "run", method="dreambooth", class_dir=write_class_images(tmp_path / "class"))
    values = trainer.iteration().values
    assert values["loss/student"] == pytest.approx(values["loss/denoise"] + values["loss/prior"], rel=1e-5)
    assert "loss/prior" in trainer.log_columns()


def test_custom_diffusion_on_the_teacher(tiny_dir, tmp_path):
    """--finetune teacher: Custom Diffusion personalizes the teacher (Table 5's SD 2.1 row). Its concept
    is teacher_concept/ (no concept/ a student could wrongly load), fits the teacher and changes the
    teacher's multi-step images; the previews sample the teacher."""
    from opad.concept.tokens import add_modifier_tokens
    from opad.diffusion.sampling import sample_teacher
    from opad.models.loading import load_models, teacher_view

    trainer = make_trainer(tmp_path / "run", method="custom-diffusion", finetune="teacher", **FAST)
    trainer.train()
    assert trainer.bundle.student_source == str(tiny_dir / "teacher")  # the teacher trained in the student's seat
    assert not (trainer.out / "concept").exists() and (trainer.out / "teacher_concept").is_dir()
    assert json.loads((trainer.out / "config.json").read_text())["finetune"] == "teacher"
    preview = Image.open(trainer.out / "samples" / "step-000003.png")
    assert preview.width < 2 * 64 * 2  # one column: the teacher's samples, no one-step student

    def teacher_image(concept):
        bundle, _ = generate.load_student(str(tiny_dir / "teacher"), concept)
        view = teacher_view(bundle)
        assert view.teacher_unet is bundle.student_unet and type(view.teacher_scheduler).__name__ == "DDIMScheduler"
        return sample_teacher(view, [PROMPT], steps=3, generator=torch.Generator().manual_seed(0))

    plain = load_models(str(tiny_dir / "teacher"), str(tiny_dir / "student"))
    trained_kv, original_kv = kv_parameters(trainer.bundle.student_unet), kv_parameters(plain.teacher_unet)
    assert all(not torch.equal(a, b) for a, b in zip(trained_kv, original_kv))  # the teacher's K/V trained
    add_modifier_tokens(plain.tokenizer, plain.text_encoder, ["<new1>"], ["toy"])  # the token as it started
    before = sample_teacher(plain, [PROMPT], steps=3, generator=torch.Generator().manual_seed(0))
    assert (teacher_image(str(trainer.out / "teacher_concept")) - before).abs().max() > 1e-3

    with pytest.raises(OpadError, match="--finetune teacher is for the baselines"):
        make_cfg("x", method="opad", finetune="teacher").validate()
