"""DreamBench metrics (``python -m opad.evaluate``): the arithmetic on hand-built embeddings, the
protocol's preprocessing, pairing modes with known answers, outputs, the cache and bad input.
The encoders are tiny random models of the real families: their numbers mean nothing, only the
relations the tests check."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from opad.evaluation import evaluate
from opad.evaluation.dreambench import read_dreambench
from opad.evaluation.encoders import ClipEncoder, DinoEncoder
from opad.evaluation.metrics import bootstrap_interval, cosine, image_scores, prompt_type, strip_modifiers, text_scores

TINY = ["--dino-weights", "tiny", "--clip-weights", "tiny"]


def _photo(path, seed, size=(150, 110)):
    """A smooth random picture (awkward size, not square) with a coloured blob."""
    g = np.random.default_rng(seed)
    h, w = size[1], size[0]
    yy, xx = np.mgrid[0:h, 0:w]
    base = g.uniform(0, 255, 3) * (xx / w)[..., None] + g.uniform(0, 255, 3) * (yy / h)[..., None]
    cx, cy, r = g.uniform(0.2, 0.8) * w, g.uniform(0.2, 0.8) * h, g.uniform(10, 40)
    blob = ((xx - cx) ** 2 + (yy - cy) ** 2 < r * r)[..., None] * g.uniform(-120, 120, 3)
    Image.fromarray(np.clip(base / 2 + blob + 60, 0, 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture()
def toy(tmp_path):
    """Real photos of two subjects and generated images: copies of real ones plus new ones."""
    real, gen = tmp_path / "real", tmp_path / "gen"
    for subject, seeds in (("mug", (1, 2, 3)), ("robot", (4, 5, 6))):
        (real / subject).mkdir(parents=True)
        for i, seed in enumerate(seeds):
            _photo(real / subject / f"{i:02d}.png", seed)
    gen.mkdir()
    (gen / "copy.png").write_bytes((real / "mug" / "00.png").read_bytes())
    _photo(gen / "new1.png", 10)
    _photo(gen / "new2.png", 11)
    rows = [("copy.png", "mug", "a <new1> mug in the snow", 0), ("new1.png", "mug", "a <new1> mug on the beach", 1),
            ("new2.png", "robot", "a red <new1> robot", 2)]
    with (tmp_path / "manifest.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "subject", "prompt", "seed"])
        writer.writerows(rows)
    return tmp_path


def _run(tmp, *extra, out="out"):
    argv = ["--generated", str(tmp / "gen"), "--real", str(tmp / "real"), "--out", str(tmp / out), *TINY, *extra]
    assert evaluate.main(argv) == 0
    per_image = {r["file"]: r for r in csv.DictReader((tmp / out / "per_image.csv").open())}
    return json.loads((tmp / out / "summary.json").read_text()), per_image


def test_cosine_arithmetic_on_hand_built_embeddings():
    gen = np.array([[1.0, 0.0], [3.0, 4.0]])
    real = np.array([[2.0, 0.0], [0.0, 5.0]])
    assert np.allclose(cosine(gen, real), [[1, 0], [0.6, 0.8]])
    assert np.allclose(image_scores(gen, real, "all"), [0.5, 0.7])
    assert np.allclose(image_scores(gen, real, "single", reference=1), [0.0, 0.8])
    assert np.allclose(text_scores(np.array([[3.0, 4.0], [1.0, 0.0]]), np.array([[4.0, 3.0], [-2.0, 0.0]])), [0.96, -1])


def test_modifier_removal_and_prompt_types(dreambench_dir):
    assert strip_modifiers("a <new1> dog in the snow") == "a dog in the snow"
    assert strip_modifiers("a sks <new1> dog", ("sks",)) == "a dog"
    bench = read_dreambench(dreambench_dir / "prompts_and_classes.txt")
    objects = [prompt_type(p, bench) for p in bench.prompts_for("backpack", "<new1>")]
    live = [prompt_type(p, bench) for p in bench.prompts_for("dog", "<new1>")]
    assert objects == ["recontextualization"] * 20 + ["property"] * 5
    assert live == ["recontextualization"] * 10 + ["accessorization"] * 10 + ["property"] * 5
    assert prompt_type("a <new1> stuffed animal wearing a red hat", bench) == "accessorization"  # two-word class
    assert prompt_type("a photo of something else", bench) == "other"


def test_bootstrap_interval():
    assert bootstrap_interval([0.3, 0.3, 0.3]) == (0.3, 0.3)
    values = list(np.random.default_rng(0).uniform(0, 1, 30))
    low, high = bootstrap_interval(values, seed=1)
    assert low < np.mean(values) < high and high - low < 0.5
    assert bootstrap_interval(values, seed=1) == (low, high)


def test_preprocessing_is_the_protocols(tmp_path):
    image = Image.open(_photo(tmp_path / "p.png", 3, size=(301, 217))).convert("RGB")

    def reference(side, mean, std):  # shorter side to `side` (bicubic; the long side truncated, as
        w, h = image.size          # torchvision's Resize and CLIP's own preprocess), centre crop 224, normalise
        scaled = image.resize((int(w * side / h), side) if h < w else (side, int(h * side / w)),
                              Image.Resampling.BICUBIC)
        left, top = (scaled.width - 224) / 2, (scaled.height - 224) / 2
        crop = scaled.crop((round(left), round(top), round(left) + 224, round(top) + 224))
        return ((np.asarray(crop, np.float32) / 255 - mean) / std).transpose(2, 0, 1)

    dino = DinoEncoder("tiny").transform(image).numpy()
    want = reference(256, np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225]))
    assert dino.shape == (3, 224, 224) and np.abs(dino - want).max() < 1e-5
    clip = ClipEncoder("tiny").transform(image).numpy()
    want = reference(224, np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711]))
    assert clip.shape == (3, 224, 224) and np.abs(clip - want).max() < 1e-5


def test_an_image_against_itself_scores_one_and_pairing_modes(toy):
    summary, rows = _run(toy, "--manifest", str(toy / "manifest.csv"), "--pairing", "single")
    copy = rows["copy.png"]  # generated == the mug's reference photo 00
    assert float(copy["dino"]) == pytest.approx(1.0, abs=1e-6) and float(copy["clip_i"]) == pytest.approx(1.0, abs=1e-6)
    _, all_rows = _run(toy, "--manifest", str(toy / "manifest.csv"), out="out_all")
    _, ref1 = _run(toy, "--manifest", str(toy / "manifest.csv"), "--pairing", "single", "--reference-index", "1",
                   out="out_ref1")
    _, ref2 = _run(toy, "--manifest", str(toy / "manifest.csv"), "--pairing", "single", "--reference-index", "2",
                   out="out_ref2")
    for metric in ("dino", "clip_i"):  # all = the mean of the three single-reference scores
        singles = [float(r["copy.png"][metric]) for r in (rows, ref1, ref2)]
        assert float(all_rows["copy.png"][metric]) == pytest.approx(np.mean(singles), abs=1e-9)
        assert float(ref1["copy.png"][metric]) < 1 - 1e-4  # another photo is not the same image
    assert summary["pairing"] == "single" and summary["comparable"] is False and "not comparable" in summary["note"]


def test_outputs_manifest_cache_and_clip_t(toy, monkeypatch):
    monkeypatch.setenv("OPAD_CACHE", str(toy / "cache"))  # an empty embedding cache
    summary, rows = _run(toy, "--manifest", str(toy / "manifest.csv"), "--extra-columns")
    out = toy / "out"
    assert {p.name for p in out.iterdir()} == {"per_image.csv", "per_subject.json", "per_prompt_type.json",
                                              "summary.json", "manifest.json"}
    per_subject = json.loads((out / "per_subject.json").read_text())
    assert per_subject["mug"]["images"] == 2 and per_subject["robot"]["images"] == 1
    for metric in ("dino", "clip_i", "clip_t"):  # the mean over subjects, each weighted equally
        mug = np.mean([float(rows[f][metric]) for f in ("copy.png", "new1.png")])
        assert summary[metric] == pytest.approx((mug + float(rows["new2.png"][metric])) / 2)
        low, high = summary["ci95"][metric]
        assert low <= summary[metric] <= high
        assert float(rows["new1.png"][f"{metric}_x100"]) == pytest.approx(100 * float(rows["new1.png"][metric]))
    clip = ClipEncoder("tiny")  # CLIP-T is scored on the prompt without its <new1>
    image = clip.images([Image.open(toy / "gen" / "new2.png").convert("RGB")])
    assert float(rows["new2.png"]["clip_t"]) == pytest.approx(float(text_scores(image, clip.texts(["a red robot"]))[0]),
                                                             abs=1e-6)
    record = json.loads((out / "manifest.json").read_text())
    assert record["models"]["dino"].startswith("timm:vit_small_patch16_224.dino@tiny")
    assert len(record["real"]) == 6 and record["seeds"] == [0, 1, 2] and record["real_embeddings_from_cache"] == 0
    again, again_rows = _run(toy, "--manifest", str(toy / "manifest.csv"), "--extra-columns", out="again")
    assert json.loads((toy / "again" / "manifest.json").read_text())["real_embeddings_from_cache"] == 12
    assert again_rows == rows and again["dino"] == summary["dino"]


def test_without_a_manifest_every_image_meets_every_real_image(toy):
    summary, rows = _run(toy)
    assert set(rows) == {"copy.png", "new1.png", "new2.png"} and "clip_t" not in summary
    assert summary["subjects"] == 1 and not (toy / "out" / "per_prompt_type.json").exists()


@pytest.mark.parametrize("change,message", [
    (lambda t: ["--real", str(t / "nowhere")], "--real folder not found"),
    (lambda t: ["--manifest", str(t / "missing.csv")], "--manifest not found"),
    (lambda t: ["--manifest", str(_write(t / "m.csv", "file,subject\nghost.png,mug\n"))], "does not exist"),
    (lambda t: ["--manifest", str(_write(t / "m.csv", "file,subject\nnew1.png,cat\n"))], "subject 'cat' has no photos"),
    (lambda t: ["--manifest", str(_write(t / "m.csv", "file,prompt\nnew1.png,x\n"))], "needs 'file' and 'subject'"),
    (lambda t: ["--manifest", str(_write(t / "m.jsonl", "{not json\n"))], "is not valid JSON lines"),
    (lambda t: ["--manifest", str(_write(t / "m.csv", "file,subject,seed\nnew1.png,mug,x\n"))], "is not an integer"),
    (lambda t: [_corrupt(t)], "corrupt or not an image"),
    (lambda t: ["--dino-weights", str(t / "no.pth")], "weights file not found"),
    (lambda t: ["--clip-arch", "ViT-Nope"], "unknown open_clip architecture"),
    (lambda t: ["--pairing", "single", "--reference-index", "7"], "--reference-index 7 is past"),
])
def test_bad_input_is_one_line_and_writes_nothing(toy, change, message, capsys):
    extra = [a for a in change(toy) if a]
    argv = ["--generated", str(toy / "gen"), "--real", str(toy / "real"), "--out", str(toy / "out"), *TINY, *extra]
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert not (toy / "out").exists()


def test_weights_must_be_named(toy, capsys):
    argv = ["--generated", str(toy / "gen"), "--real", str(toy / "real"), "--out", str(toy / "out")]
    assert evaluate.main(argv) == 2
    assert "give --dino-weights and --clip-weights" in capsys.readouterr().err


def test_cli_help_runs(capsys):
    with pytest.raises(SystemExit) as exit_:
        evaluate.main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "--manifest" in out and "--pairing" in out


def _write(path, text):
    path.write_text(text)
    return path


def _corrupt(tmp):
    (tmp / "gen" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return ""


def test_world_encoders_score_the_world(tmp_path, monkeypatch):
    """--dino-weights world / --clip-weights world: the mini world's held-out evaluation encoder and its
    clip (both towers), with the world's own preprocessing; CLIP-T matches scenes to their captions."""
    import torch
    from transformers import CLIPModel

    from opad.evaluation.encoders import clip_encoder, dino_encoder
    from opad.world.components import clip as world_clip
    from opad.world.components import encoders
    from opad.world.fidelity import read_photos
    from opad.world.layout import SHIPPED
    from opad.world.pool import to_model_range
    from opad.world.render.concepts import concepts_dir
    from opad.world.render.scenes import world_dataset

    monkeypatch.setenv("OPAD_CACHE", str(tmp_path / "cache"))
    root = concepts_dir()
    photos = read_photos(root / "checkered_mug")
    images = [Image.fromarray(p) for p in photos]
    clip, dino = clip_encoder("world"), dino_encoder("world")
    model = CLIPModel.from_pretrained(SHIPPED / "clip").eval()
    with torch.no_grad():
        own_clip = world_clip.image_features(model, to_model_range(photos)).numpy()
        own_dino = encoders.features(encoders.load_vit(SHIPPED / "eval_encoder"), photos).numpy()
    assert np.allclose(clip.images(images), own_clip, atol=1e-5)
    rows = dino.images(images)
    assert np.allclose(rows / np.linalg.norm(rows, axis=1, keepdims=True), own_dino, atol=1e-5)
    # CLIP-T: a world scene matches its own caption better than another scene's (unit rows: cosines)
    scenes = world_dataset(24, 4321)
    pictures, texts = clip.images([s[0] for s in scenes]), clip.texts([s[1] for s in scenes])
    own, other = (pictures * texts).sum(1), (pictures * np.roll(texts, 1, axis=0)).sum(1)
    assert (own > other).mean() >= 0.9 and own.mean() > other.mean() + 0.5

    # the CLI on world photos: the mug's photos are closer to the mug's set than to the car's
    gen = tmp_path / "gen"
    gen.mkdir()
    for name in ("a.png", "b.png"):  # one mug photo, scored as the mug and as the car
        (gen / name).write_bytes(sorted((root / "checkered_mug").glob("*.png"))[0].read_bytes())
    (tmp_path / "m.csv").write_text("file,subject,prompt\na.png,checkered_mug,a <new1> mug\n"
                                    "b.png,checkered_car,a <new1> car\n")
    argv = ["--generated", str(gen), "--real", str(root), "--manifest", str(tmp_path / "m.csv"),
            "--out", str(tmp_path / "out"), "--dino-weights", "world", "--clip-weights", "world"]
    assert evaluate.main(argv) == 0
    rows = {r["file"]: r for r in csv.DictReader((tmp_path / "out" / "per_image.csv").open())}
    for metric in ("dino", "clip_i"):
        assert float(rows["a.png"][metric]) > float(rows["b.png"][metric])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    record = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert summary["comparable"] and record["models"]["clip"].startswith("world-clip:64px@sha256:")
