"""The OPAD trainer on the tiny preset: artefacts, isolation, ablations, resume, robustness."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from trainutil import changed, first_losses, kv_names, make_trainer, snapshot

from opad.concept.folder import WEIGHTS_NAME
from opad.errors import OpadError
from opad.train.checkpoint import complete_checkpoints, load_checkpoint
from opad.train.runlog import read_log

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_full_run_writes_every_artefact(tiny_dir, tmp_path):
    trainer = make_trainer(tmp_path / "run")
    out = trainer.train()
    names = {p.name for p in out.iterdir()}
    assert {"concept", "teacher_concept", "samples", "log.csv", "tensorboard", "loss_curve.png",
            "checkpoints", "config.json"} <= names
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-000000.png", "step-000002.png", "step-000004.png"]
    grid = Image.open(out / "samples" / "step-000000.png")
    assert grid.size == (2 * 128, 14 + 2 * 128)  # student | teacher, two prompts; 64 px shown at 2x
    rows = read_log(out / "log.csv")
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]
    for key in ("loss/teacher", "loss/mse", "loss/id", "loss/swd", "loss/adv_dino_v1", "loss/adv_dino_v2",
                "loss/adv_clip", "loss/d_clip", "grad_norm/student", "time/step"):
        assert all(np.isfinite(float(r[key])) for r in rows), key
    assert list((out / "tensorboard").iterdir())
    assert [s for s, _ in complete_checkpoints(out)] == [2, 4]
    assert json.loads((out / "config.json").read_text())["max_steps"] == 4
    for concept in ("concept", "teacher_concept"):
        assert (out / concept / WEIGHTS_NAME).is_file() and (out / concept / "<new1>.safetensors").is_file()

    # the student concept loads into a plain diffusers pipeline and changes its output
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir / "student", local_files_only=True)
    prompt = "a photo of a <new1> toy"
    def run():
        return pipe(prompt, num_inference_steps=1, guidance_scale=0.0, generator=torch.Generator().manual_seed(0),
                    output_type="np").images
    pipe.load_textual_inversion(out / "concept", weight_name="<new1>.safetensors")
    before = run()
    pipe.unet.load_attn_procs(out / "concept", weight_name=WEIGHTS_NAME, _pipeline=pipe)
    assert np.abs(run() - before).max() > 1e-4


def test_each_step_updates_only_its_own_model(tiny_dir, tmp_path):
    trainer = make_trainer(tmp_path / "run")
    b = trainer.bundle
    batch = trainer.method.next_batch()
    cond = trainer.context.encode(b.text_encoder, batch.prompts)
    from opad.train.loop import StepOutcome

    table = b.text_encoder.get_input_embeddings().weight
    table_key = "text_encoder." + next(n for n, p in b.text_encoder.named_parameters() if p is table)
    s0 = snapshot(trainer)
    trainer.method.teacher_step(batch, cond, StepOutcome())
    s1 = snapshot(trainer)
    assert changed(s0, s1) == kv_names("teacher_unet", b.teacher_unet) | {table_key, "teacher_tokens"}
    table_before, table_after = (s[table_key] for s in (s0, s1))
    rows = torch.nonzero((table_before != table_after).any(1)).flatten().tolist()
    assert rows == trainer.token_ids  # only the modifier row

    result = trainer.method.student_step(batch.prompts, cond.detach(), cond.detach(), StepOutcome())
    s2 = snapshot(trainer)
    assert changed(s1, s2) == kv_names("student_unet", b.student_unet)

    trainer.method.discriminator_step(result.fake_features, StepOutcome())
    s3 = snapshot(trainer)
    assert changed(s2, s3) == {k for k in s3 if k.startswith("heads.")}


def test_alignment_target_has_no_gradient_and_adversarial_terms_ignore_c(tiny_dir, tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path / "run")
    b = trainer.bundle
    prompts = ["a photo of a <new1> toy", "a <new1> toy on the beach"]
    cond = trainer.context.encode(b.text_encoder, prompts).detach()
    states = {k: g.get_state() for k, g in trainer.generators.items()}
    result = trainer.method.student_forward(prompts, cond, cond)
    assert result.z_tc is not None and not result.z_tc.requires_grad and not result.image_tc.requires_grad
    assert result.z_st.requires_grad and result.terms["mse"].requires_grad
    (grad,) = torch.autograd.grad(result.terms["mse"], result.z_st, retain_graph=True)
    assert grad.abs().sum() > 0

    import opad.train.methods.opad as opad_method

    monkeypatch.setattr(opad_method, "c_weight", lambda t, ac: torch.zeros(len(t)))
    for k, g in trainer.generators.items():
        g.set_state(states[k])
    zero_c = trainer.method.student_forward(prompts, cond, cond)
    for name in ("mse", "id", "swd"):
        assert result.terms[name] > 0 and zero_c.terms[name] == 0
    for name in ("dino_v1", "dino_v2", "clip"):
        assert torch.equal(zero_c.terms[f"adv_{name}"], result.terms[f"adv_{name}"])


ABLATIONS = {
    "no_teacher": (dict(use_teacher=False), {"loss/teacher", "loss/mse", "loss/id", "loss/swd"}),
    "no_discriminators": (dict(discriminators=[]), {f"loss/{p}_{n}" for p in ("adv", "d") for n in ("dino_v1", "dino_v2", "clip")}),
    "no_dino_v1": (dict(discriminators=["dino_v2", "clip"]), {"loss/adv_dino_v1", "loss/d_dino_v1"}),
    "no_dino_v2": (dict(discriminators=["dino_v1", "clip"]), {"loss/adv_dino_v2", "loss/d_dino_v2"}),
    "no_clip": (dict(discriminators=["dino_v1", "dino_v2"]), {"loss/adv_clip", "loss/d_clip"}),
    "no_identity": (dict(id_weight=0.0), {"loss/id"}),
    "no_mse": (dict(mse_weight=0.0), {"loss/mse"}),
    "no_swd": (dict(swd_weight=0.0), {"loss/swd"}),
    "no_shared_text_encoder": (dict(shared_text_encoder=False), set()),
}


@pytest.fixture(scope="module")
def baseline_losses(tiny_dir, tmp_path_factory):
    return first_losses(make_trainer(tmp_path_factory.mktemp("base") / "run"))


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_ablation_switch_removes_exactly_its_terms(baseline_losses, tmp_path, name):
    overrides, removed = ABLATIONS[name]
    values = first_losses(make_trainer(tmp_path / "run", **overrides))
    assert removed <= set(baseline_losses)
    assert set(values) == set(baseline_losses) - removed
    for key, value in values.items():
        assert value == baseline_losses[key], key


def test_one_shot_uses_a_single_photo(tiny_dir, tmp_path):
    trainer = make_trainer(tmp_path / "run", one_shot=True)
    assert len(trainer.data.images) == 1
    assert all(np.isfinite(v) for v in trainer.iteration().values.values())


def _final_state(out):
    state = load_checkpoint(complete_checkpoints(out)[-1][1])
    return state


def _assert_same_state(a, b):
    for key in ("teacher_kv", "student_kv"):
        assert all(torch.equal(x, y) for x, y in zip(a[key], b[key])), key
    assert torch.equal(a["teacher_tokens"], b["teacher_tokens"])
    assert all(torch.equal(a["heads"][k], b["heads"][k]) for k in a["heads"])
    assert a["collab_prompts"] == b["collab_prompts"] and torch.equal(a["collab_images"], b["collab_images"])
    for k in a["generators"]:
        assert torch.equal(a["generators"][k], b["generators"][k]), k


def _losses_by_step(out):
    return [{k: v for k, v in r.items() if k.startswith("loss/")} for r in read_log(out / "log.csv")]


RESUME = dict(max_steps=6, checkpoint_every=10, collab_start=0.5, collab_refresh=2, collab_buffer=2)


def test_resume_is_bit_exact(tiny_dir, tmp_path):
    straight = make_trainer(tmp_path / "straight", **RESUME)
    straight.train()
    first = make_trainer(tmp_path / "split", **RESUME)
    first.train(until=3)
    assert first.step == 3
    second = make_trainer(tmp_path / "split", resume=True, **RESUME)
    assert second.step == 0
    second.train()
    assert second.step == 6
    _assert_same_state(_final_state(tmp_path / "straight"), _final_state(tmp_path / "split"))
    assert _losses_by_step(tmp_path / "straight") == _losses_by_step(tmp_path / "split")
    assert len(straight.method.collab_prompts) == 2  # the collaborative stage ran and was resumed


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import opad.train.checkpoint as ck
    real_save = ck.torch.save
    def save_then_die(obj, path):
        if int(obj["step"]) == 4:  # die half-way through writing the step-4 checkpoint
            with open(path, "wb") as f:
                f.write(b"partial")
            os.kill(os.getpid(), signal.SIGKILL)
        real_save(obj, path)
    ck.torch.save = save_then_die
    from opad.train.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_sigkill_during_checkpoint_write_resumes_from_previous(tiny_dir, tmp_path, capfd):
    out = tmp_path / "run"
    args = ["--output-dir", str(out), "--max-steps", "6", "--checkpoint-every", "2", "--preview-every", "10",
            "--preview-teacher-steps", "2", "--swd-projections", "16", "--collab-start", "none",
            "--discriminators", "clip"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", KILL_SCRIPT, *args], capture_output=True, text=True, env=env, cwd=REPO)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert [s for s, _ in complete_checkpoints(out)] == [0, 2]
    assert any(p.name.startswith(".") for p in (out / "checkpoints").iterdir())  # the half-written one

    from opad.train.cli import main  # the resume in this process (a second interpreter start costs ~15 s here)

    capfd.readouterr()
    assert main([*args, "--resume"]) == 0
    err = capfd.readouterr().err
    assert "resuming from" in err and "step 2" in err, err[-2000:]
    assert not any(p.name.startswith(".") for p in (out / "checkpoints").iterdir())
    assert [int(row["step"]) for row in read_log(out / "log.csv")] == list(range(6))
    assert (out / "concept" / WEIGHTS_NAME).is_file()


def test_planted_nan_is_skipped_then_rolled_back(tiny_dir, tmp_path, monkeypatch):
    import opad.train.losses

    real_mse, calls = opad.train.losses.latent_mse, {"n": 0}

    def nan_for_three_calls(a, b):
        calls["n"] += 1
        value = real_mse(a, b)
        return value * float("nan") if 2 <= calls["n"] <= 4 else value

    monkeypatch.setattr(opad.train.losses, "latent_mse", nan_for_three_calls)
    trainer = make_trainer(tmp_path / "run", max_steps=6, checkpoint_every=10)
    trainer.train()
    events = [(int(r["step"]), r["event"]) for r in read_log(tmp_path / "run" / "log.csv") if r["event"]]
    assert [s for s, e in events if e.startswith("skipped non-finite student:loss")] == [1, 2, 3]
    assert events[-1] == (3, "rollback to step 0 with lr x0.5")
    assert trainer.lr_scale == 0.5 and trainer.rollbacks == 1 and trainer.step == 6
    assert trainer.method.opt_student.param_groups[0]["lr"] == pytest.approx(0.5 * trainer.cfg.student_lr)


def test_persistent_nan_stops_with_a_clear_message(tiny_dir, tmp_path, monkeypatch):
    import opad.train.losses

    monkeypatch.setattr(opad.train.losses, "latent_mse", lambda a, b: (a - b).pow(2).flatten(1).mean(1) * float("nan"))
    trainer = make_trainer(tmp_path / "run", max_steps=20, checkpoint_every=10, max_bad_steps=2, max_rollbacks=1)
    with pytest.raises(OpadError, match="training diverged at step .*2 non-finite steps in a row.*after 1 rollback"):
        trainer.train()


def test_interrupt_writes_a_checkpoint_and_resume_finishes(tiny_dir, tmp_path):
    out = tmp_path / "run"
    args = ["--output-dir", str(out), "--max-steps", "40", "--checkpoint-every", "100", "--preview-every", "100",
            "--preview-teacher-steps", "2", "--swd-projections", "16", "--collab-start", "none",
            "--discriminators", "clip"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "opad.train", *args], stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    seen = ""
    while "opad:" not in seen or " 2/40" not in seen:  # wait until a couple of steps ran
        chunk = proc.stderr.read(64)
        assert chunk, seen[-2000:]
        seen += chunk
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, (seen + rest)[-2000:]
    steps = [s for s, _ in complete_checkpoints(out)]
    assert steps[0] == 0 and 2 <= steps[-1] < 40
    from opad.train.cli import main  # the resume in this process (a second interpreter start costs ~15 s here)

    assert main(["--output-dir", str(out), "--resume", "--max-steps", str(steps[-1] + 2)]) == 0
    assert (out / "concept" / WEIGHTS_NAME).is_file()


def test_two_processes_train_in_step_and_only_the_main_one_writes(tiny_dir, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "opad.train",
                        "--output-dir", str(out), "--max-steps", "2", "--checkpoint-every", "1", "--preview-every", "10",
                        "--preview-teacher-steps", "2", "--swd-projections", "16", "--collab-start", "none",
                        "--discriminators", "clip"], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]  # a replica mismatch at any checkpoint would fail the run
    assert r.stdout.count("done in") == 1
    assert [int(row["step"]) for row in read_log(out / "log.csv")] == [0, 1]
    assert [s for s, _ in complete_checkpoints(out)] == [1, 2]
