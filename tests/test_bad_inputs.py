"""Bad input, as a new user gives it: one clear line naming the problem, exit code 2, no traceback,
nothing left at the output path. Warn-rows: one warning line and a run that still works.

Each row runs the CLI's ``main`` in-process (an exception escaping it fails the row, as a traceback
would reach the user); a few rows run real subprocesses end to end. Extend the table whenever a
new class of bad input turns up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import safetensors.torch
import torch
from PIL import Image

from opad.cli import command_module

REPO = Path(__file__).resolve().parents[1]
FAST = ["--max-steps", "1", "--preview-every", "10", "--preview-teacher-steps", "2", "--swd-projections", "16",
        "--collab-start", "none", "--discriminators", "clip"]


# ---------------------------------------------------------------------------- setups (real files)
def photo(path: Path, size=(80, 72), mode="RGB", seed=0, **save) -> Path:
    g = torch.Generator().manual_seed(seed)
    channels = {"RGB": 3, "L": 1}[mode]
    arr = (torch.rand(size[1], size[0], channels, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(arr[..., 0] if channels == 1 else arr, mode).save(path, **save)
    return path


def photos(tmp: Path, n: int = 2) -> Path:
    d = tmp / "photos"
    d.mkdir(exist_ok=True)
    for i in range(n):
        photo(d / f"p{i}.png", seed=i)
    return d


def config(text: str, name: str = "c.json") -> Callable[[Path], None]:
    return lambda tmp: (tmp / name).write_text(text)


def a_file(name: str) -> Callable[[Path], None]:
    return lambda tmp: (tmp / name).write_text("I am a file")


def corrupt_model_file(part: str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        from opad.presets.tiny import write_tiny_preset

        write_tiny_preset(tmp / "models")
        path = tmp / "models" / "student" / part
        path.write_bytes(path.read_bytes()[:1000])  # truncated mid-file

    return setup


def nan_concept(key: str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        from opad.concept.folder import add_modifier_tokens, save_concept
        from opad.models.loading import load_models

        bundle = load_models(load_teacher=False)
        add_modifier_tokens(bundle.tokenizer, bundle.text_encoder, ["<new1>"], ["dog"])
        save_concept(tmp / "concept", bundle.student_unet, bundle.tokenizer, bundle.text_encoder, ["<new1>"])
        path = tmp / "concept" / ("<new1>.safetensors" if key == "token" else "pytorch_custom_diffusion_weights.safetensors")
        state = safetensors.torch.load_file(path)
        name = next(k for k, v in state.items() if v.numel())
        state[name] = state[name].clone()
        state[name].view(-1)[0] = float("nan") if key != "inf" else float("inf")
        safetensors.torch.save_file(state, path)

    return setup


def image_folder(kind: str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        d = photos(tmp)
        if kind == "directory":
            (d / "folder.jpg").mkdir()
        elif kind == "broken_link":
            (d / "gone.png").symlink_to(tmp / "nowhere.png")
        elif kind == "empty_file":
            (d / "empty.png").write_bytes(b"")
        elif kind == "truncated_jpeg":
            photo(d / "t.jpg", size=(96, 96))
            (d / "t.jpg").write_bytes((d / "t.jpg").read_bytes()[:300])
        elif kind == "text_as_png":
            (d / "notes.png").write_text("hello")
        elif kind == "bomb":
            Image.new("L", (14000, 13000)).save(d / "huge.png")  # 182 Mpx: over PIL's bomb limit
        elif kind == "small_after_exif":
            pass

    return setup


@dataclass
class Case:
    id: str
    cli: str  # train | generate | tiny
    args: list[str]
    expect: str  # words of the one error line (or of the warning for warn rows)
    setup: Callable[[Path], None] | None = None
    warn: bool = False  # the run succeeds and prints one warning line
    out: str = "{tmp}/out"  # must not exist afterwards (error rows)
    extra: list[str] = field(default_factory=list)


def T(id, args, expect, setup=None, fast=True, **kw):  # noqa: N802 - table rows read better short
    """A train row; FAST comes first so the row's own flags win (and a missed check trains 1 step, not 150)."""
    return Case(id, "train", ["--output-dir", "{tmp}/out", *(FAST if fast else []), *args], expect, setup, **kw)


def G(id, args, expect, setup=None, **kw):  # noqa: N802
    return Case(id, "generate", ["--out", "{tmp}/out", "--num-images", "1", *args], expect, setup, **kw)


CASES = [
    # 1. config-file values of the wrong type ------------------------------------------------------------
    T("cfg-str-for-int", ["--config", "{tmp}/c.json"], "swd_scales", config('{"swd_scales": "5"}')),
    T("cfg-bool-for-int", ["--config", "{tmp}/c.json"], "batch_size", config('{"batch_size": true}')),
    T("cfg-float-for-int", ["--config", "{tmp}/c.json"], "resolution", config('{"resolution": 64.5}')),
    T("cfg-str-for-bool", ["--config", "{tmp}/c.json"], "flip", config('{"flip": "no"}')),
    T("cfg-yaml-quoted-bool", ["--config", "{tmp}/c.yaml"], "flip", config('flip: "no"\n', "c.yaml")),
    T("cfg-list-for-bool", ["--config", "{tmp}/c.yaml"], "scale_aug", config("scale_aug: [true]\n", "c.yaml")),
    T("cfg-int-for-list", ["--config", "{tmp}/c.json"], "discriminators", config('{"discriminators": 3}'),
      fast=False),
    T("cfg-dict-for-list", ["--config", "{tmp}/c.json"], "backbone_weights",
      config('{"backbone_weights": {"clip": "hub"}}')),
    T("cfg-list-of-ints", ["--config", "{tmp}/c.json"], "preview_prompts", config('{"preview_prompts": [1, 2]}')),
    T("cfg-list-for-float", ["--config", "{tmp}/c.json"], "teacher_lr", config('{"teacher_lr": [1]}')),
    T("cfg-str-for-float", ["--config", "{tmp}/c.json"], "swd_weight", config('{"swd_weight": "0.1"}')),
    T("cfg-int-for-str", ["--config", "{tmp}/c.json"], "token", config('{"token": 5}')),
    T("cfg-str-for-optional-float", ["--config", "{tmp}/c.json"], "collab_start", config('{"collab_start": "half"}'),
      fast=False),
    T("cfg-nan-in-yaml", ["--config", "{tmp}/c.yaml"], "--student-lr", config("student_lr: .nan\n", "c.yaml")),
    T("cfg-broken-yaml", ["--config", "{tmp}/c.yaml"], "could not be parsed", config("a: [1, 2\nb: 3\n", "c.yaml")),
    T("cfg-broken-json", ["--config", "{tmp}/c.json"], "could not be parsed", config('{"max_steps": 3,}')),
    T("cfg-binary-file", ["--config", "{tmp}/c.json"], "could not be read",
      lambda tmp: (tmp / "c.json").write_bytes(b"\xff\xfe\x00garbage\x9c")),
    T("cfg-is-a-directory", ["--config", "{tmp}"], "config file not found"),
    T("cfg-top-level-list", ["--config", "{tmp}/c.json"], "must hold a mapping", config("[1, 2]")),
    # flags outside their domain
    T("resolution-negative", ["--resolution", "-64"], "--resolution must be"),
    T("resolution-zero", ["--resolution", "0"], "--resolution must be"),
    T("beta1-one", ["--adam-beta1", "1.0"], "--adam-beta1 must be in [0, 1)"),
    T("beta2-negative", ["--adam-beta2", "-0.1"], "--adam-beta2 must be"),
    T("beta2-above-one", ["--adam-beta2", "1.5"], "--adam-beta2 must be in [0, 1)"),
    T("weight-decay-negative", ["--weight-decay", "-0.01"], "--weight-decay must be"),
    T("clip-negative", ["--max-grad-norm", "-1"], "--max-grad-norm must be"),
    T("head-clip-negative", ["--head-max-grad-norm", "-0.5"], "--head-max-grad-norm must be"),
    T("teacher-lr-nan", ["--teacher-lr", "nan"], "--teacher-lr must be"),
    T("student-lr-inf", ["--student-lr", "inf"], "--student-lr must be"),
    T("head-lr-negative", ["--head-lr=-1e-4"], "--head-lr must be"),  # argparse takes "-1e-4" for a flag
    T("guidance-nan", ["--guidance-scale", "nan"], "--guidance-scale must be"),
    T("guidance-inf", ["--guidance-scale", "inf"], "--guidance-scale must be"),
    T("mse-weight-negative", ["--mse-weight", "-1"], "--mse-weight must be"),
    T("lpips-weight-nan", ["--lpips-weight", "nan"], "--lpips-weight must be"),
    T("disc-weight-negative", ["--disc-weight", "-2"], "--disc-weight must be"),
    T("swd-patch-even", ["--swd-patch", "4"], "--swd-patch must be odd"),
    T("rollback-factor-zero", ["--rollback-lr-factor", "0"], "--rollback-lr-factor must be in (0, 1]"),
    T("max-rollbacks-negative", ["--max-rollbacks", "-1"], "--max-rollbacks must be"),
    T("preview-teacher-steps-zero", ["--preview-teacher-steps", "0"], "--preview-teacher-steps must be at least 1"),
    T("device-bogus", ["--device", "gpu7"], "--device"),
    T("device-bad-index", ["--device", "cuda:abc"], "--device"),
    T("device-meta", ["--device", "meta"], "--device"),
    T("device-cuda-without-gpu", ["--device", "cuda"], "no CUDA GPU"),
    T("max-steps-text", ["--max-steps", "ten"], "invalid"),
    T("batch-size-zero", ["--batch-size", "0"], "--batch-size must be at least 1"),
    T("max-steps-negative", ["--max-steps", "-1"], "--max-steps must be"),
    T("keep-checkpoints-zero", ["--keep-checkpoints", "0"], "--keep-checkpoints must be at least 1"),
    T("collab-mix-two", ["--collab-mix", "2"], "--collab-mix must be in [0, 1]"),
    T("collab-start-above-one", ["--collab-start", "1.5"], "--collab-start must be a fraction"),
    T("mixed-precision-fp16", ["--mixed-precision", "fp16"], "--mixed-precision must be"),
    T("profile-unknown", ["--profile", "authors"], "--profile must be one of paper, release"),
    T("crop-unknown", ["--crop", "fit"], "--crop must be one of center, stretch"),
    T("lpips-net-unknown", ["--lpips-net", "squeeze"], "--lpips-net must be one of vgg, alex"),
    T("resize-unknown", ["--backbone-resize", "nearest"], "--backbone-resize must be one of"),
    T("discriminator-unknown", ["--discriminators", "dino_v1,stylegan"], "unknown discriminator 'stylegan'"),
    T("backbone-weights-no-equals", ["--backbone-weights", "clip"], "must be NAME=FILE, NAME=DIR or NAME=hub"),
    T("backbone-weights-missing-file", ["--backbone-weights", "clip={tmp}/nope.safetensors"],
      "clip backbone weights file not found"),
    T("ip-adapter-missing-file", ["--ip-adapter", "{tmp}/nope.bin"], "IP-Adapter projection file not found"),
    T("clip-arch-unknown", ["--backbone-weights", "clip={tmp}/w.safetensors", "--clip-arch", "ViT-Z-99"],
      "unknown open_clip architecture 'ViT-Z-99'",
      setup=lambda tmp: safetensors.torch.save_file({"x": torch.zeros(1)}, tmp / "w.safetensors")),
    T("teacher-first-without-teacher", ["--teacher-first", "--use-teacher", "false"], "--teacher-first needs the teacher"),
    T("teacher-first-steps-too-many", ["--teacher-first", "--teacher-first-steps", "5"], "--teacher-first-steps (5)"),
    T("bool-flag-bad-value", ["--flip", "maybe"], "expected true/false"),
    T("instance-dir-is-a-file", ["--instance-dir", "{tmp}/f", "--class-name", "dog"], "instance folder not found",
      setup=a_file("f")),
    T("class-dir-missing", ["--class-dir", "{tmp}/nope"], "class-prior folder not found"),
    T("token-with-space", ["--token", "new one"], "must be non-empty and contain no whitespace"),
    T("token-in-vocabulary", ["--token", "dog"], "already in the tokenizer's vocabulary"),
    T("init-word-two-tokens", ["--init-word", "stuffed animal"], "is 2 tokens"),
    T("resume-without-run", ["--resume"], "nothing to resume"),
    T("teacher-folder-missing", ["--teacher", "{tmp}/nope"], "teacher model folder not found"),
    T("teacher-is-a-file", ["--teacher", "{tmp}/f", "--student", "{tmp}/f"], "is a file", setup=a_file("f")),
    # out-of-range seeds
    T("seed-negative", ["--seed", "-5"], "--seed must be"),
    T("seed-huge", ["--seed", str(2**64)], "--seed must be"),
    # user text that reaches str.format
    T("preview-stray-brace", ["--preview-prompts", "a {} on {the beach"], "", warn=True),
    T("preview-positional", ["--preview-prompts", "{1} photo"], "", warn=True),
    T("preview-named", ["--preview-prompts", "a {name} here"], "", warn=True),
    # 2./5. non-finite and odd images
    T("image-16-bit-gray", ["--instance-dir", "{tmp}/photos", "--class-name", "dog"], "", warn=True,
      setup=lambda tmp: Image.fromarray((torch.arange(64 * 64).view(64, 64) * 15).int().numpy().astype("uint16"))
      .save(photos(tmp, 1) / "g16.png")),
    T("image-animated-gif", ["--instance-dir", "{tmp}/photos", "--class-name", "dog"], "animated", warn=True,
      setup=lambda tmp: Image.new("RGB", (70, 70), "red").save(photos(tmp, 1) / "anim.gif", save_all=True,
                                                               append_images=[Image.new("RGB", (70, 70), "blue")])),
    T("image-extreme-aspect", ["--instance-dir", "{tmp}/photos", "--class-name", "dog"], "aspect ratio",
      warn=True, setup=lambda tmp: photo(photos(tmp, 1) / "wide.png", size=(1600, 80))),
    T("image-directory-named-jpg", ["--instance-dir", "{tmp}/photos", "--class-name", "dog"],
      "not a regular file", warn=True, setup=image_folder("directory")),
    T("image-broken-link", ["--instance-dir", "{tmp}/photos", "--class-name", "dog"],
      "not a regular file", warn=True, setup=image_folder("broken_link")),
    T("image-empty-file", ["--instance-dir", "{tmp}/photos", "--class-name", "dog"], "empty.png",
      setup=image_folder("empty_file")),
    T("image-truncated-jpeg", ["--instance-dir", "{tmp}/photos", "--class-name", "dog"], "t.jpg",
      setup=image_folder("truncated_jpeg")),
    T("image-text-as-png", ["--instance-dir", "{tmp}/photos", "--class-name", "dog"], "notes.png",
      setup=image_folder("text_as_png")),
    T("image-decompression-bomb", ["--instance-dir", "{tmp}/photos", "--class-name", "dog"], "huge.png",
      setup=image_folder("bomb")),
    # 3. output paths under a file or unwritable
    T("out-under-a-file", [], "is a file", setup=a_file("f"), out="{tmp}/f/run",
      extra=["--output-dir", "{tmp}/f/run"]),
    T("out-unwritable", [], "cannot write", out="/proc/opad-run", extra=["--output-dir", "/proc/opad-run"]),
    # 4. corrupt files in a model folder
    T("teacher-corrupt-unet", ["--teacher", "{tmp}/models/teacher", "--student", "{tmp}/models/student",
                               "--backbone-weights", "clip=tiny"],
      "unet/diffusion_pytorch_model.safetensors", corrupt_model_file("unet/diffusion_pytorch_model.safetensors")),
    # generate ---------------------------------------------------------------------------------------------
    G("gen-device-bogus", ["--device", "gpu7"], "--device"),
    G("gen-device-meta", ["--device", "meta"], "--device"),
    G("gen-seed-negative", ["--seed", "-1"], "--seed must be"),
    G("gen-seed-huge", ["--seed", str(2**64)], "--seed must be"),
    G("gen-num-images-negative", ["--num-images", "-3"], "--num-images must be at least 1"),
    G("gen-resolution-negative", ["--resolution", "-8"], "--resolution must be"),
    G("gen-dtype-bogus", ["--dtype", "float8"], "unknown dtype"),
    G("gen-steps-3", ["--steps", "3"], "invalid choice"),
    G("gen-empty-prompt", ["--prompt", "  "], "--prompt is empty"),
    G("gen-concept-missing", ["--concept", "{tmp}/nope"], "concept folder not found"),
    G("gen-concept-is-a-file", ["--concept", "{tmp}/f"], "concept folder not found", setup=a_file("f")),
    G("gen-concept-without-weights", ["--concept", "{tmp}"], "has no pytorch_custom_diffusion_weights.safetensors"),
    G("gen-student-missing", ["--student", "{tmp}/nope"], "student model folder not found"),
    G("gen-resolution-not-multiple", ["--resolution", "60"], "multiple of 8"),
    G("gen-out-under-a-file", [], "is a file", setup=a_file("f"), out="{tmp}/f/imgs", extra=["--out", "{tmp}/f/imgs"]),
    G("gen-out-unwritable", [], "cannot write", out="/proc/opad-imgs", extra=["--out", "/proc/opad-imgs"]),
    G("gen-corrupt-unet", ["--student", "{tmp}/models/student"], "unet/diffusion_pytorch_model.safetensors",
      corrupt_model_file("unet/diffusion_pytorch_model.safetensors")),
    G("gen-corrupt-text-encoder", ["--student", "{tmp}/models/student"], "text_encoder/model.safetensors",
      corrupt_model_file("text_encoder/model.safetensors")),
    G("gen-corrupt-vae", ["--student", "{tmp}/models/student"], "vae/diffusion_pytorch_model.safetensors",
      corrupt_model_file("vae/diffusion_pytorch_model.safetensors")),
    G("gen-corrupt-unet-config", ["--student", "{tmp}/models/student"], "unet/config.json",
      corrupt_model_file("unet/config.json")),
    G("gen-nan-concept-kv", ["--concept", "{tmp}/concept", "--prompt", "a <new1> dog"], "not finite",
      nan_concept("kv")),
    G("gen-inf-concept-kv", ["--concept", "{tmp}/concept", "--prompt", "a <new1> dog"], "not finite",
      nan_concept("inf")),
    G("gen-nan-concept-token", ["--concept", "{tmp}/concept", "--prompt", "a <new1> dog"], "not finite",
      nan_concept("token")),
    # tiny ----------------------------------------------------------------------------------------------
    Case("tiny-under-a-file", "tiny", ["{tmp}/f/models"], "is a file", a_file("f"), out="{tmp}/f/models"),
    Case("tiny-unwritable", "tiny", ["/proc/opad-tiny"], "cannot write", out="/proc/opad-tiny"),
    Case("tiny-no-argument", "tiny", [], "required"),
]


def _fmt(items: list[str], tmp: Path) -> list[str]:
    return [s.replace("{tmp}", str(tmp)) for s in items]


def run_main(cli: str, args: list[str], capsys) -> tuple[int, str]:
    """The CLI's main() in-process: (exit code, stderr). argparse errors exit via SystemExit."""
    main = command_module(cli).main
    try:
        code = main(args)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path, capsys):
    if case.setup:
        case.setup(tmp_path)
    args = _fmt(case.args + case.extra, tmp_path)
    code, err = run_main(case.cli, args, capsys)
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("opad:", "usage:", " "))]
    if case.warn:
        assert code == 0, err[-2000:]
        warnings = [line for line in lines if line.startswith("warning:")]
        assert all(case.expect in w for w in warnings[:1]) and (warnings or not case.expect), err[-2000:]
        return
    assert code == 2, err[-2000:]
    errors = [line for line in lines if line.startswith("error:") or ": error:" in line]
    assert len(errors) == 1 and case.expect in errors[0], err[-2000:]
    out = Path(_fmt([case.out], tmp_path)[0])
    assert not out.exists()


# ---------------------------------------------------------------------------- rows with their own checks
def test_16_bit_grayscale_png_keeps_its_values(tmp_path):
    from opad.train.data import load_images

    values = (torch.arange(64 * 64).view(64, 64) * 16).int()  # 0 .. 65520
    Image.fromarray(values.numpy().astype("uint16")).save(tmp_path / "g16.png")
    image = load_images(tmp_path, 64, allow_upscale=False)[0]
    torch.testing.assert_close(image[0], values.float() / 65535, atol=1 / 255, rtol=0)
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


def test_exif_orientation_is_honoured(tmp_path):
    from opad.train.data import load_images

    img = Image.new("RGB", (120, 80), "white")
    img.paste((255, 0, 0), (0, 0, 60, 80))  # left half red, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the red half ends up on top
    img.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    image = load_images(tmp_path, 64, allow_upscale=False)[0]
    top, bottom = image[:, :20].mean((1, 2)), image[:, -20:].mean((1, 2))
    assert top[0] > 0.9 and top[1] < 0.2 and bottom[1] > 0.9


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(tiny_dir, tmp_path, capsys):
    from opad.train import cli as train
    from opad.train.checkpoint import complete_checkpoints

    out = tmp_path / "run"
    args = ["--output-dir", str(out), *FAST, "--max-steps", "2", "--checkpoint-every", "1"]
    assert train.main(args) == 0
    newest = complete_checkpoints(out)[-1][1] / "state.pt"
    newest.write_bytes(newest.read_bytes()[:200])
    capsys.readouterr()
    assert train.main(["--output-dir", str(out), "--resume", "--max-steps", "3"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "step-000002" in err and "unreadable" in err and "step 1" in err


def test_every_checkpoint_truncated_is_one_clear_error(tiny_dir, tmp_path, capsys):
    from opad.train import cli as train
    from opad.train.checkpoint import complete_checkpoints

    out = tmp_path / "run"
    assert train.main(["--output-dir", str(out), *FAST, "--checkpoint-every", "1"]) == 0
    for _, path in complete_checkpoints(out):
        (path / "state.pt").write_bytes(b"garbage")
    capsys.readouterr()
    assert train.main(["--output-dir", str(out), "--resume", "--max-steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: no readable checkpoint" in err


def test_saving_a_non_finite_concept_is_refused(bundle, tmp_path):
    from opad.concept.folder import add_modifier_tokens, save_concept
    from opad.errors import OpadError

    add_modifier_tokens(bundle.tokenizer, bundle.text_encoder, ["<new1>"], ["dog"])
    next(iter(bundle.student_unet.attn_processors))
    layer = next(m for n, m in bundle.student_unet.named_modules() if n.endswith("attn2"))
    with torch.no_grad():
        layer.to_k.weight[0, 0] = float("inf")
    with pytest.raises(OpadError, match="not finite"):
        save_concept(tmp_path / "c", bundle.student_unet, bundle.tokenizer, bundle.text_encoder, ["<new1>"])
    assert not (tmp_path / "c").exists()


def _subprocess(*args, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)


def test_fifo_in_the_instance_folder_does_not_hang(tiny_dir, tmp_path):
    d = photos(tmp_path)
    os.mkfifo(d / "pipe.png")
    r = _subprocess("-m", "opad.train", "--output-dir", str(tmp_path / "out"), "--instance-dir", str(d),
                    "--class-name", "dog", *FAST, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "warning:" in r.stderr and "pipe.png" in r.stderr and "not a regular file" in r.stderr


@pytest.mark.parametrize("cli, args, words", [
    ("opad.train", ["--config", "{tmp}/c.json"], "flip"),
    ("opad.generate", ["--device", "gpu7"], "--device"),
    ("opad.tiny", ["{tmp}/f/x"], "is a file"),
])
def test_end_to_end_no_traceback_reaches_the_terminal(tmp_path, cli, args, words):
    (tmp_path / "c.json").write_text(json.dumps({"flip": "no"}))
    (tmp_path / "f").write_text("a file")
    r = _subprocess("-m", cli, *_fmt(args, tmp_path))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error:") and words in r.stderr
