"""The Table-5 harness end to end on two DreamBench subjects (tiny preset, a few steps, tiny
encoders), a failing subject recorded while the others go on, and resuming."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
from PIL import Image

from opad import reproduce

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
    assert "broken / opad: FAILED: error: could not read image" in err

    failed = json.loads((out / "runs" / "broken" / "opad" / "failed.json").read_text())
    assert "corrupt or not an image" in failed["error"]
    done = json.loads((out / "runs" / "can" / "opad" / "done.json").read_text())
    assert done["iterations"] == 2 and done["train_s"] > 0 and done["infer_s_per_image"]["1"] > 0
    assert set(done["scores"]["1"]) == {"clip_t", "clip_i", "dino"} and done["comparable"] is False
    images = sorted(p.name for p in (out / "runs" / "can" / "opad" / "images" / "steps1").glob("*.png"))
    assert images == ["00_seed0.png", "00_seed1.png", "01_seed0.png", "01_seed1.png"]

    table = list(csv.DictReader((out / "table.csv").open()))
    assert [(r["method"], r["subjects"], r["failed"]) for r in table] == [("opad", "2", "1"),
                                                                          ("lora", "2", "1")]
    markdown = (out / "table.md").read_text()
    assert "| opad | 1 |" in markdown and "(1 failed)" in markdown and "Not comparable" in markdown
    assert len(list(csv.DictReader((out / "results.csv").open()))) == 4
    lora = json.loads((out / "runs" / "candle" / "lora" / "train" / "concept" / "opad_concept.json").read_text())
    assert lora["format"] == "lora"  # a baseline's own concept format went through generate
    grid = Image.open(out / "grids" / "can.png")
    assert grid.size == (120 + 96 * 2, 96 * 2)  # a row per method, a column per prompt

    # resumable: finished jobs are skipped, nothing retrains
    stamp = (out / "runs" / "can" / "opad" / "done.json").stat().st_mtime_ns
    assert reproduce.main([*argv, "--subjects", "can,candle"]) == 0
    assert "4 done before, 0 to run" in capsys.readouterr().err
    assert (out / "runs" / "can" / "opad" / "done.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("extra,message", [
    (["--subjects", "unicorn"], "unknown DreamBench subject 'unicorn'"),
    (["--methods", "magic"], "unknown method 'magic'"),
    (["--steps", "3"], "--steps must be among 1, 2, 4"),
    (["--prompts", "26"], "--prompts must be at most 25"),
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
    failed = json.loads((out / "runs" / "broken" / "opad" / "failed.json").read_text())
    assert failed["error"].startswith("error: could not read image") and failed["exit_code"] == 2
    assert "corrupt or not an image" in (out / "runs" / "broken" / "opad" / "log.txt").read_text()
    assert "| opad | 1 | – |" in (out / "table.md").read_text()
