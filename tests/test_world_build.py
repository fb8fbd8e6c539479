"""The mini world's build: image pools, the resumable component loop, the VAE, and the shipped VAE
against its quality bar (PSNR on held-out scenes)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline
from safetensors import safe_open
from transformers import CLIPModel, CLIPTextModel

from opad.diffusion import schedulers
from opad.models.tokenizer import build_sd2_tokenizer, prompt_ids
from opad.world import build, check, layout, pool, preset
from opad.world.components import clip, component, student, teacher, vae
from opad.world.components.classifier import WorldClassifier
from opad.world.render.scenes import render, world_scenes


@pytest.fixture()
def small_chunks(monkeypatch):
    monkeypatch.setattr(pool, "CHUNK", 8)


def test_pool_matches_the_scenes_and_redraws_only_missing_chunks(tmp_path, small_chunks):
    p = pool.load_pool(tmp_path, 20, seed=3, workers=1, progress=False)
    assert p.images.shape == (20, 64, 64, 3) and p.images.dtype == np.uint8 and len(p) == 20
    scenes = world_scenes(20, 3)
    assert p.scenes == scenes
    for i in (0, 9, 19):  # one per chunk
        assert np.array_equal(p.images[i], np.asarray(render(scenes[i])))
    folder = tmp_path / "3-64"
    (folder / "chunk-0001.npy").unlink()  # as if cut off while drawing chunk 1
    (folder / "chunk-0002.tmp.npy").write_bytes(b"half a file")
    kept = (folder / "chunk-0000.npy").stat().st_mtime_ns
    again = pool.load_pool(tmp_path, 20, seed=3, workers=1, progress=False)
    assert np.array_equal(again.images, p.images) and again.captions == p.captions
    assert (folder / "chunk-0000.npy").stat().st_mtime_ns == kept
    x = again.batch(torch.tensor([0, 19]))
    assert x.shape == (2, 3, 64, 64) and x.min() >= -1 and x.max() <= 1


def _vae_run(folder, data, steps):
    return vae.make_run(folder, data, torch.device("cpu"), seed=5, progress=False,
                        hparams={"steps": steps, "batch": 2, "warmup": 2, "checkpoint_every": 2})


def test_a_cut_off_vae_run_resumes_to_the_same_weights(tmp_path, small_chunks):
    data = pool.load_pool(tmp_path / "data", 6, seed=0, workers=1, progress=False)
    straight = _vae_run(tmp_path / "straight", data, 4)
    component.train(straight)

    cut = _vae_run(tmp_path / "cut", data, 4)
    step = cut.step

    def dies_at_step_3(i, g):
        if i == 3:
            raise KeyboardInterrupt
        return step(i, g)

    cut.step = dies_at_step_3
    with pytest.raises(KeyboardInterrupt):
        component.train(cut)
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()] == ["step-000002"]
    resumed = _vae_run(tmp_path / "cut", data, 4)  # a fresh process's view: new model, same folder
    component.train(resumed)
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    steps = [int(r.split(",")[0]) for r in (tmp_path / "cut" / "log.csv").read_text().split()[1:]]
    assert steps == sorted(set(steps))  # the redone steps are logged once


def test_build_ships_every_component_loadable_and_skips_finished_ones(tmp_path, small_chunks, capsys):
    build.build(tmp_path / "b", steps=2, train_images=10, heldout_images=6, progress=False,
                overrides={"teacher": {"batch": 4, "check_samples": 3},
                           "student": {"batch": 4, "pairs": 6, "pair_batch": 4, "teacher_steps": 2,
                                       "check_samples": 3}})
    weights = tmp_path / "b" / "weights"
    summary = json.loads((weights / "build.json").read_text())
    assert list(summary) == ["data", "vae", "classifier", "clip", "teacher", "student", "dino_v1", "dino_v2",
                             "eval_encoder"]
    record = summary["vae"]
    assert record["steps"] == 2 and record["device"] == "cpu" and record["metrics"]["heldout_images"] == 6
    shipped = AutoencoderKL.from_pretrained(weights / "vae")  # the ordinary loaders read every part
    assert shipped.config.scaling_factor == record["metrics"]["scaling_factor"]
    stored = safe_open(weights / "vae" / "diffusion_pytorch_model.safetensors", "pt")
    assert {stored.get_slice(k).get_dtype() for k in stored.keys()} == {"F16"}
    assert set(WorldClassifier.load(weights / "classifier").labels) == {"category", "context", "colour"}
    pipe = preset.teacher_pipeline(weights)
    assert pipe.unet.config.upcast_attention and pipe.scheduler.config.prediction_type == "v_prediction"
    towers = CLIPModel.from_pretrained(weights / "clip")  # the teacher is conditioned on its text tower
    assert all(torch.equal(v, towers.text_model.state_dict()[k.removeprefix("text_model.")])
               for k, v in pipe.text_encoder.state_dict().items())
    assert 0 <= summary["clip"]["metrics"]["heldout_zero_shot_category"] <= 1
    turbo = preset.student_pipeline(weights)  # SD-Turbo-shaped: Euler, trailing, epsilon, no upcast
    assert turbo.scheduler.config.timestep_spacing == "trailing" and not turbo.unet.config.upcast_attention
    assert sorted(p.name for p in (tmp_path / "b" / "student" / "pairs").iterdir()) == ["chunk-0000.npz",
                                                                                        "chunk-0001.npz"]
    assert 0 <= summary["student"]["metrics"]["class of 1-step samples"] <= 1
    assert summary["student"]["pair_chunks"] == summary["student"]["pair_chunks_timed"] == 2  # drawn here, timed
    for kind in ("dino_v1", "dino_v2", "eval_encoder"):  # timm folders, with their bars' measures
        assert (weights / kind / "config.json").is_file()
        assert 0 <= summary[kind]["metrics"]["held-out instance ranking"] <= 1
    teacher_metrics = summary["teacher"]["metrics"]
    assert 0 <= teacher_metrics["class of 25-step CFG samples"] <= 1 and (weights / "teacher" / "samples.png").is_file()
    capsys.readouterr()
    args = [str(tmp_path / "b"), "--steps", "2", "--train-images", "10", "--heldout-images", "6", "--no-progress"]
    assert build.main(args) == 0  # finished: read back, not retrained
    assert "vae: 2 steps" in capsys.readouterr().out
    (tmp_path / "b" / "teacher" / "record.json").unlink()  # as if cut off before it finished
    assert build.main([*args[:2], "3", *args[3:]]) == 2  # resuming under another schedule: refused
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "teacher" in err and "steps=2 now 3" in err and err.count("\n") == 1


def test_clip_loss_is_transformers_clip_loss():
    torch.manual_seed(7)
    model = clip.make_model()
    captions = [f"a photo of a {c} {k}" for c in ("red mug", "blue bird", "white car") for k in ("indoors", "at night")]
    images = torch.rand(len(captions), 3, 64, 64) * 2 - 1
    with torch.no_grad():
        out = model(input_ids=prompt_ids(build_sd2_tokenizer(), captions), pixel_values=images, return_loss=True)
        ours = clip.contrastive_loss(out.image_embeds, out.text_embeds, model.logit_scale)
    assert torch.allclose(ours, out.loss, atol=1e-5)


def test_clip_text_embeddings_do_not_depend_on_padding_past_the_end_token():
    """The clip run trains on captions cut after their longest end token; its text tower is causal and
    pools there, so the cut must leave every embedding as the 77-token pipelines see it."""
    torch.manual_seed(3)
    model = clip.make_model().eval()
    tok = build_sd2_tokenizer()
    ids = prompt_ids(tok, ["a photo of a shiny red mug with white stripes on the beach", "a photo of a bird at night"])
    cut = ids[:, :int((ids == tok.eos_token_id).int().argmax(1).max()) + 1]
    assert cut.shape[1] < 20
    with torch.no_grad():
        assert torch.allclose(clip._text_embedding(model, ids), clip._text_embedding(model, cut), atol=1e-6)


def test_distillation_pairs_and_student_outputs_are_what_the_diffusers_pipelines_sample():
    """The student learns teacher latents drawn by opad.diffusion.schedule; they must be the latents the
    check's pipelines (diffusers' own DDIM and Euler loops) produce from the same noise."""
    torch.manual_seed(11)
    text_encoder = CLIPTextModel(clip.text_config()).eval()
    tok = build_sd2_tokenizer()
    with torch.no_grad():
        cond = text_encoder(prompt_ids(tok, ["a photo of a red mug indoors", "a photo of a bird at night"]))[0]
        uncond = text_encoder(prompt_ids(tok, [""]))[0]
    noise = torch.randn(2, 4, 16, 16)
    for unet, scheduler, ours, kw in (
        (teacher.make_unet(), schedulers.teacher_scheduler(),
         lambda u: student.teacher_x0(u, noise, cond, uncond, steps=3, guidance=7.5),
         dict(num_inference_steps=3, guidance_scale=7.5, negative_prompt_embeds=uncond.expand_as(cond))),
        (student.make_unet(), schedulers.student_scheduler(), lambda u: student.student_x0(u, noise, cond),
         dict(num_inference_steps=1, guidance_scale=0.0)),
    ):
        unet.eval()
        pipe = StableDiffusionPipeline(vae=vae.make_vae(), text_encoder=text_encoder, tokenizer=tok, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        want = pipe(prompt_embeds=cond, latents=noise.clone(), height=64, width=64, output_type="latent", **kw).images
        with torch.no_grad():
            got = ours(unet)
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_build_refuses_a_component_whose_inputs_are_missing(tmp_path, capsys):
    assert build.main([str(tmp_path / "b"), "--only", "teacher"]) == 2
    err = capsys.readouterr().err
    assert "teacher needs vae" in err and not (tmp_path / "b").exists()


def test_from_shipped_retrains_one_component_against_the_shipped_others(tmp_path, small_chunks):
    out = tmp_path / "b"
    summary = build.build(out, ["eval_encoder"], steps=2, train_images=10, heldout_images=6, progress=False,
                          from_shipped=True)
    assert list(summary) == ["data", "eval_encoder"] and (out / "weights" / "eval_encoder" / "config.json").is_file()
    shipped = layout.SHIPPED / "clip" / "model.safetensors"
    assert (out / "weights" / "clip" / "model.safetensors").read_bytes() == shipped.read_bytes()
    adopted = component.read_record(out / "clip")  # the shipped record, saying where it came from
    assert adopted["adopted_from"] == str(layout.SHIPPED / "clip")
    assert adopted["train_seconds"] == json.loads((layout.SHIPPED / "build.json").read_text())["clip"]["train_seconds"]


@pytest.mark.parametrize("flag, value", [("--steps", "0"), ("--train-images", "-3"), ("--device", "cuda:7")])
def test_build_refuses_bad_values_in_one_line(tmp_path, capsys, flag, value):
    if flag == "--device" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    assert build.main([str(tmp_path / "b"), flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and flag in err and "\n" not in err
    assert not (tmp_path / "b").exists()


def test_shipped_world_meets_its_bars_on_heldout_scenes(tmp_path, capsys):
    """`python -m opad.world.check` on a slice of its default sample (it measures 512 scenes, 96 samples)."""
    folder = layout.SHIPPED / "vae"
    vae_model = AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32)
    assert vae_model.config.down_block_types == ["DownEncoderBlock2D"] * 3  # SD's block classes, 3 of them
    assert all(f.stat().st_size <= 5 * 2**20 for f in layout.SHIPPED.rglob("*") if f.is_file())
    record = json.loads((layout.SHIPPED / "build.json").read_text())
    assert all(r["train_seconds"] <= 3600 for k, r in record.items() if k != "data")
    report = tmp_path / "report.json"
    assert check.main(["--images", "48", "--per-pair", "1", "--out", str(report)]) == 0, capsys.readouterr().out
    bars = json.loads(report.read_text())
    assert all(b["value"] is not None and b["met"] for b in bars)  # every component ships and meets its bars
    assert {b["component"] for b in bars} >= {"dino_v1", "dino_v2", "eval_encoder", "clip", "teacher", "student"}


def test_check_fails_a_missed_bar(tmp_path, capsys):
    weak = tmp_path / "weights" / "vae"
    torch.manual_seed(0)
    component.save_fp16(vae.make_vae(), weak)  # untrained: far below the bar
    out = tmp_path / "report.json"
    assert check.main(["--weights", str(tmp_path / "weights"), "--images", "8", "--out", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "MISSED" in printed and "not built yet" in printed  # the teacher and judge are absent
    assert json.loads(out.read_text())[0]["met"] is False
    assert check.main(["--weights", str(tmp_path / "none")]) == 2
