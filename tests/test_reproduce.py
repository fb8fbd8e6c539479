"""The Table-5 harness end to end on two DreamBench subjects (tiny preset, a few steps, tiny
encoders), a failing subject recorded while the others go on, and resuming."""

from __future__ import annotations

import csv
import json
import os
import shutil

import pytest
from PIL import Image

from opad.evaluation import reproduce
from opad.evaluation.reproduce import tables
from opad.world.render.concepts import CONCEPTS

# OPAD and one baseline (another concept format through generate); teacher-first is a method like them
FAST = ["--max-steps", "2", "--prompts", "2", "--seeds", "2", "--dino-weights", "tiny", "--clip-weights", "tiny",
        "--train-arg=--preview-teacher-steps=2"]


@pytest.fixture()
def bench(dreambench_dir, tmp_path):
    """Two DreamBench subjects plus one whose only photo is corrupt, in DreamBench's layout."""
    root = tmp_path / "dreambench"
    root.mkdir()
    for subject in ("can", "candle"):
        shutil.copytree(dreambench_dir / subject, root / subject)
    (root / "broken").mkdir()
    (root / "broken" / "00.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    text = (dreambench_dir / "prompts_and_classes.txt").read_text()
    (root / "prompts_and_classes.txt").write_text(text.replace("can,can\n", "can,can\nbroken,toy\n"))
    return root


def test_harness_end_to_end_with_a_failure_and_resume(bench, tmp_path, capsys):
    out = tmp_path / "repro"  # in this process: each job's own process would import torch again (~7 s here)
    argv = ["--out", str(out), "--dreambench", str(bench), "--methods", "opad,lora", "--in-process", *FAST]
    assert reproduce.main([*argv, "--subjects", "can,candle,broken"]) == 0
    err = capsys.readouterr().err
    assert "broken / opad / seed 0: FAILED: error: could not read image" in err

    failed = json.loads((out / "runs" / "broken" / "opad" / "seed0" / "failed.json").read_text())
    assert "corrupt or not an image" in failed["error"]
    done = json.loads((out / "runs" / "can" / "opad" / "seed0" / "done.json").read_text())
    assert done["iterations"] == 2 and done["train_s"] > 0 and done["infer_s_per_image"]["1"] > 0
    assert set(done["scores"]["1"]) == {"clip_t", "clip_i", "dino"} and done["comparable"] is False
    images = sorted(p.name for p in (out / "runs" / "can" / "opad" / "seed0" / "images" / "steps1").glob("*.png"))
    assert images == ["00_seed0.png", "00_seed1.png", "01_seed0.png", "01_seed1.png"]

    table = list(csv.DictReader((out / "table.csv").open()))
    assert [(r["method"], r["subjects"], r["failed"]) for r in table] == [("opad", "2", "1"),
                                                                          ("lora", "2", "1")]
    markdown = (out / "table.md").read_text()
    assert "| opad | 1 |" in markdown and "| 2 (2, 1 failed) |" in markdown and "Not comparable" in markdown
    assert len(list(csv.DictReader((out / "results.csv").open()))) == 4
    assert "| opad − lora | " in markdown  # paired by subject (test_paired_differences has the arithmetic)
    lora = json.loads((out / "runs" / "candle" / "lora" / "seed0" / "train" / "concept" / "opad_concept.json").read_text())
    assert lora["format"] == "lora"  # a baseline's own concept format went through generate
    grid = Image.open(out / "grids" / "can.png")
    assert grid.size == (170 + 96 * 2, 96 * 2)  # a row per method, a column per prompt

    # resumable: finished jobs are skipped, nothing retrains
    stamp = (out / "runs" / "can" / "opad" / "seed0" / "done.json").stat().st_mtime_ns
    assert reproduce.main([*argv, "--subjects", "can,candle"]) == 0
    assert "4 done before, 0 to run" in capsys.readouterr().err
    assert (out / "runs" / "can" / "opad" / "seed0" / "done.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("extra,message", [
    (["--subjects", "unicorn"], "unknown DreamBench subject 'unicorn'"),
    (["--methods", "magic"], "unknown method 'magic'"),
    (["--steps", "3"], "--steps must be among 1, 2, 4"),
    (["--prompts", "26"], "--prompts must be at most 25"),
    (["--train-seeds", "0,x"], "--train-seeds must be seeds like 0 or 0,1,2"),
    (["--methods", "opad-no-magic"], "unknown method 'opad-no-magic'"),
    (["--train-arg=--seed=3"], "give training seeds with --train-seeds"),
])
def test_bad_arguments_fail_before_any_job(bench, tmp_path, extra, message, capsys):
    argv = ["--out", str(tmp_path / "repro"), "--dreambench", str(bench), "--subjects", "can", *FAST, *extra]
    assert reproduce.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "repro").exists()


def test_a_job_in_its_own_process_records_its_error(bench, tmp_path, capsys):
    """The default: each job a subprocess (its log kept); the first error line is recorded."""
    out = tmp_path / "repro"
    argv = ["--out", str(out), "--dreambench", str(bench), "--subjects", "broken", *FAST]
    assert reproduce.main(argv) == 0
    failed = json.loads((out / "runs" / "broken" / "opad" / "seed0" / "failed.json").read_text())
    assert failed["error"].startswith("error: could not read image") and failed["exit_code"] == 2
    assert "corrupt or not an image" in (out / "runs" / "broken" / "opad" / "seed0" / "log.txt").read_text()
    assert "| opad | 1 | – |" in (out / "table.md").read_text()


def test_ablation_arms_and_training_seeds(bench, tmp_path):
    """The arms train what they name, the teacher arm is sampled at 25 DDIM steps; a subject's value is
    the mean over its training seeds."""
    out = tmp_path / "repro"
    argv = ["--out", str(out), "--dreambench", str(bench), "--subjects", "can", "--in-process", *FAST,
            "--prompts", "1", "--seeds", "1"]
    assert reproduce.main([*argv, "--methods", "opad-no-teacher", "--train-seeds", "0,1"]) == 0

    def config(arm, seed=0):
        return json.loads((out / "runs" / "can" / arm / f"seed{seed}" / "train" / "config.json").read_text())

    assert config("opad-no-teacher")["use_teacher"] is False and config("opad-no-teacher")["discriminators"]
    assert [config("opad-no-teacher", seed)["seed"] for seed in (0, 1)] == [0, 1]
    table = {r["method"]: r for r in csv.DictReader((out / "table.csv").open())}
    assert table["opad-no-teacher"]["runs"] == "2" and table["opad-no-teacher"]["subjects"] == "1"
    runs = [json.loads((out / "runs" / "can" / "opad-no-teacher" / f"seed{s}" / "done.json").read_text())
            for s in (0, 1)]
    assert runs[0]["scores"]["1"]["dino"] != runs[1]["scores"]["1"]["dino"]  # the seeds trained differently
    mean = sum(r["scores"]["1"]["dino"] for r in runs) / 2
    assert float(table["opad-no-teacher"]["dino"]) == pytest.approx(mean, abs=1e-9)
    assert [r["seed"] for r in csv.DictReader((out / "results.csv").open())] == ["0", "1"]

    assert reproduce.main([*argv, "--methods", "custom-diffusion-teacher"]) == 0
    assert (config("custom-diffusion-teacher")["method"], config("custom-diffusion-teacher")["finetune"]) == \
        ("custom-diffusion", "teacher")
    teacher_job = out / "runs" / "can" / "custom-diffusion-teacher" / "seed0"
    assert (teacher_job / "images" / "steps25" / "00_seed0.png").is_file()
    assert set(json.loads((teacher_job / "done.json").read_text())["scores"]) == {"25"}
    table = {r["method"]: r for r in csv.DictReader((out / "table.csv").open())}
    assert table["custom-diffusion-teacher"]["steps"] == "25"


def test_arm_flags_survive_the_worlds_defaults():
    """An arm's flags win over the preset's training defaults (the world sets discriminators)."""
    from opad.config import config_from_args
    from opad.presets import PRESETS
    from opad.train.cli import build_parser

    def resolved(arm):
        spec = reproduce.ARMS[arm]
        args = build_parser().parse_args(["--method", spec.method, *spec.flags])
        return config_from_args(args).resolved(PRESETS["world"])

    assert resolved("opad").discriminators and resolved("opad").use_teacher
    assert resolved("opad-no-discriminators").discriminators == []
    assert resolved("opad-no-teacher").use_teacher is False
    assert resolved("custom-diffusion-teacher").finetune == "teacher"


def test_world_flag_names_the_worlds_concepts_and_encoders(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPAD_PRESET", "tiny")  # restored after the test: --world sets it for its jobs
    args = reproduce.build_parser().parse_args(["--out", str(tmp_path / "w"), "--world"])
    reproduce.apply_world(args)
    assert os.environ["OPAD_PRESET"] == "world"
    assert (args.dino_weights, args.clip_weights, args.train_seeds) == ("world", "world", "0,1,2")
    assert args.methods.split(",") == list(reproduce.WORLD_ARMS)
    plan = reproduce.check_args(args)
    assert plan.subjects == sorted(c.name for c in CONCEPTS) and len(plan.jobs()) == 6 * 6 * 3
    assert plan.sample_steps("custom-diffusion-teacher") == [25] and plan.sample_steps("opad") == [1]
    # a wrong subject is named against the world's own list
    assert reproduce.main(["--out", str(tmp_path / "w"), "--world", "--subjects", "unicorn"]) == 2
    assert "unknown DreamBench subject 'unicorn'; there are checkered_car, checkered_mug" in capsys.readouterr().err


def test_paired_differences_average_seeds_then_pair_subjects(tmp_path):
    """The first arm minus another, subject by subject: each subject's seeds averaged first."""
    plan = reproduce.Plan(tmp_path, None, ["s1", "s2", "s3"], ["opad", "lora"], [0, 1], [1])
    dino = {("s1", "opad"): (0.5, 0.7), ("s1", "lora"): (0.2, 0.2), ("s2", "opad"): (0.4, 0.4), ("s2", "lora"): (0.5, 0.5),
            ("s3", "opad"): (0.9, 0.9), ("s3", "lora"): (0.1, 0.3)}
    done = {(s, a, seed): {"scores": {"1": {"dino": values[seed]}}} for (s, a), values in dino.items() for seed in (0, 1)}
    text = tables._paired(done, plan, ["dino"])
    # s1: 0.6 - 0.2, s2: 0.4 - 0.5, s3: 0.9 - 0.2 -> mean (0.4 - 0.1 + 0.7) / 3 = 0.333, above 0 in 2 of 3
    assert "| opad − lora | +0.333 [" in text and "(2/3) |" in text
    assert tables._paired({k: v for k, v in done.items() if k[0] == "s1"}, plan, ["dino"]) == ""  # one subject
