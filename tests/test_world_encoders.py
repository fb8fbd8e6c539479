"""The mini world's self-supervised encoders: their objectives against loop references, the views,
the measures behind their bars, and their folders loading through opad's ordinary loaders."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from opad.errors import OpadError
from opad.evaluation.encoders import DinoEncoder
from opad.models.backbones import build_backbone
from opad.world import check, pool
from opad.world.components import encoders
from opad.world.layout import SHIPPED
from opad.world.render.scenes import render, repose, world_scenes


def test_info_nce_is_each_views_softmax_over_all_other_rows():
    torch.manual_seed(0)
    z = F.normalize(torch.randn(10, 7), dim=-1)  # 5 scenes, two views each
    expected = []
    for i in range(10):
        j = (i + 5) % 10
        logits = torch.stack([z[i] @ z[k] / 0.3 for k in range(10) if k != i])
        expected.append(-(z[i] @ z[j] / 0.3 - torch.logsumexp(logits, 0)))
    assert torch.allclose(encoders.info_nce(z, 0.3), torch.stack(expected).mean(), atol=1e-6)


def test_koleo_is_minus_the_mean_log_distance_to_the_nearest_other_feature():
    torch.manual_seed(1)
    x = torch.randn(9, 5, requires_grad=True)
    z = F.normalize(x, dim=-1)
    nearest = [min((z[i] - z[k]).norm() for k in range(9) if k != i) for i in range(9)]
    loss = encoders.koleo_loss(x)
    assert torch.allclose(loss, -torch.log(torch.stack(nearest)).mean(), atol=1e-5)
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_dino_loss_is_the_cross_view_cross_entropy_to_the_centred_sharpened_teacher():
    torch.manual_seed(2)
    student, teacher, center = torch.randn(6, 11), torch.randn(6, 11), torch.randn(11) * 0.1
    total = 0.0
    for i in range(3):  # scene i: rows i (view 1) and i + 3 (view 2)
        for t_row, s_row in ((i, i + 3), (i + 3, i)):
            q = torch.softmax((teacher[t_row] - center) / 0.04, 0)
            total += -(q * torch.log_softmax(student[s_row] / 0.1, 0)).sum()
    assert torch.allclose(encoders.dino_loss(student, teacher, center, 0.1, 0.04), total / 6, atol=1e-5)
    # multi-crop: two local crops more, each predicting both global views of the teacher
    local = torch.randn(6, 11)
    more = 0.0
    for i in range(3):
        for t_row in (i, i + 3):
            q = torch.softmax((teacher[t_row] - center) / 0.04, 0)
            for s_row in [{i: i + 3, i + 3: i}[t_row]]:
                more += -(q * torch.log_softmax(student[s_row] / 0.1, 0)).sum()
            for s_row in (i, i + 3):
                more += -(q * torch.log_softmax(local[s_row] / 0.1, 0)).sum()
    got = encoders.dino_loss(torch.cat([student, local]), teacher, center, 0.1, 0.04, views=4)
    assert torch.allclose(got, more / (3 * 6), atol=1e-5)  # 6 (teacher view, other view) pairs per scene


def test_caption_loss_is_each_images_softmax_over_every_distinct_caption():
    torch.manual_seed(4)
    z, bank = F.normalize(torch.randn(5, 6), dim=-1), F.normalize(torch.randn(9, 6), dim=-1)
    target = torch.tensor([3, 0, 3, 8, 1])  # two images of one caption: neither is the other's negative
    expected = torch.stack([-(z[i] @ bank[t] / 0.07 - torch.logsumexp(bank @ z[i] / 0.07, 0))
                            for i, t in enumerate(target)]).mean()
    assert torch.allclose(encoders.caption_loss(z, bank, target, 0.07), expected, atol=1e-5)


def test_caption_bank_embeds_each_distinct_caption_once_with_the_clip_text_tower():
    from transformers import CLIPModel

    from opad.world.components.clip import text_features
    from opad.world.layout import SHIPPED

    first = ["a photo of a red mug on the beach", "a photo of a blue car at night", "a photo of a red mug on the beach"]
    second = ["a photo of a red mug indoors", "a photo of a blue car at night", "a photo of a red mug in the snow"]
    captions = encoders.caption_bank(SHIPPED / "clip", first, second)
    assert len(captions.bank) == 4  # the four distinct captions
    model = CLIPModel.from_pretrained(SHIPPED / "clip").eval()
    with torch.no_grad():
        for rows, texts in ((captions.first, first), (captions.second, second)):
            assert torch.allclose(captions.bank[rows], text_features(model, texts), atol=1e-5)
    assert captions.first[1] == captions.second[1] and captions.first[0] == captions.first[2]


def test_views_are_reproducible_crops_that_keep_each_colour():
    torch.manual_seed(3)
    x = torch.rand(5, 3, 37, 37) * 2 - 1
    a = encoders.views(x, torch.Generator().manual_seed(7), 0.35, 0.3)
    assert torch.equal(a, encoders.views(x, torch.Generator().manual_seed(7), 0.35, 0.3))
    assert not torch.allclose(a, encoders.views(x, torch.Generator().manual_seed(8), 0.35, 0.3))
    assert a.shape == x.shape and a.min() >= -1 and a.max() <= 1
    local = encoders.views(x, torch.Generator().manual_seed(7), 0.1, 0.3, size=19, max_scale=0.35)
    assert local.shape == (5, 3, 19, 19)
    solid = torch.tensor([[0.8, -0.6, -0.2], [-0.7, 0.1, 0.6]])[:, :, None, None].expand(2, 3, 16, 16)
    out = encoders.views(solid.contiguous(), torch.Generator().manual_seed(0), 0.35, 0.3)
    pixels = out.flatten(2)
    assert torch.allclose(pixels, pixels[:, :, :1], atol=1e-5)  # a solid image stays solid
    assert torch.equal(pixels[:, :, 0].argmax(1), torch.tensor([0, 2]))  # red stays red, blue stays blue


def test_instance_ranking_and_knn_on_features_whose_answers_are_known():
    e = torch.eye(4)
    first = F.normalize(torch.stack([e[0], e[1], e[2], e[3]]), dim=-1)
    # classes a, a, b, b: first photo 1 is more like second photo 0 (0.45) than its own (0.29); the
    # other three are most like their own
    second = F.normalize(torch.stack([e[0] + 0.5 * e[1], 0.3 * e[1] + e[3], e[2], e[3]]), dim=-1)
    assert encoders.instance_ranking(first, second, ["a", "a", "b", "b"]) == 0.75
    feats = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.95, 0.05], [0.0, 1.0], [0.1, 0.9], [0.3, 0.7]]),
                        dim=-1)
    assert encoders.knn_accuracy(feats, ["x", "x", "x", "y", "y", "y"], k=2) == 1.0
    assert encoders.knn_accuracy(feats, ["x", "y", "x", "y", "x", "y"], k=1) < 0.5


def test_repose_keeps_the_object_and_changes_pose_and_context():
    scene = world_scenes(1, 1)[0]
    other = repose(scene, random.Random(0), context="night" if scene.context != "night" else "snow")
    same = ("category", "colour", "rgb", "attributes", "accent", "variant")
    assert all(getattr(other, f) == getattr(scene, f) for f in same)
    assert other.context != scene.context and (other.x, other.scale, other.seed) != (scene.x, scene.scale, scene.seed)
    assert repose(scene, random.Random(0)) == repose(scene, random.Random(0))


def test_a_reposed_pool_holds_the_same_objects_in_other_contexts(tmp_path, monkeypatch):
    monkeypatch.setattr(pool, "CHUNK", 4)
    scenes = pool.load_pool(tmp_path, 6, 0, progress=False).scenes
    reposed = pool.load_pool(tmp_path, 6, 0, reposed=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0-64", "0-64-reposed"]
    for i, (a, b) in enumerate(zip(scenes, reposed.scenes)):
        assert (a.category, a.colour, a.rgb, a.attributes, a.accent, a.variant) == \
            (b.category, b.colour, b.rgb, b.attributes, b.accent, b.variant)
        assert a.context != b.context and np.array_equal(reposed.images[i], np.asarray(render(b)))
    assert reposed.scenes == pool.pool_scenes(6, 0, reposed=True)  # what the check's second photos use


@pytest.fixture(scope="module")
def shipped_folders(tmp_path_factory):
    """A briefly trained encoder of each kind, shipped as the build ships it."""
    root = tmp_path_factory.mktemp("encoders")
    rng = np.random.default_rng(0)
    images = pool.Pool(rng.integers(0, 256, (12, 64, 64, 3), dtype=np.uint8), ["x"] * 12, [])
    # three distinct captions (the caption term's text side), the re-posed photos' differing from the first
    captions = encoders.Captions(F.normalize(torch.randn(3, 16, generator=torch.Generator().manual_seed(0)), dim=-1),
                                 torch.arange(12) % 2, torch.full((12,), 2))
    folders = {}
    for kind in encoders.KINDS:
        run = encoders.make_run(kind, root / f"run-{kind}", images, images, torch.device("cpu"), seed=5,
                                hparams={"steps": 2, "batch": 6, "prototypes": 32}, captions=captions)
        for i in range(2):
            run.step(i, torch.Generator().manual_seed(i))
        folders[kind] = (root / kind, encoders.shipped_backbone(kind, run.model))
        encoders.save_vit(folders[kind][1], root / kind, kind)
    return folders


@pytest.mark.parametrize("kind", encoders.KINDS)
def test_shipped_encoders_load_through_timm_and_opads_backbone_loader(shipped_folders, kind):
    folder, trained = shipped_folders[kind]
    assert timm.create_model(f"local-dir:{folder}", pretrained=True).pretrained_cfg["architecture"] \
        == encoders.ARCHITECTURES[kind]
    images = (np.random.default_rng(1).random((3, 64, 64, 3)) * 255).astype(np.uint8)
    reference = encoders.features(trained.float(), images)
    shipped = encoders.features(encoders.load_vit(folder), images)
    assert torch.allclose(shipped, reference, atol=2e-2)  # fp16 weights
    name = "dino_v2" if kind == "dino_v2" else "dino_v1"
    backbone = build_backbone(name, str(folder))
    assert backbone.input_size == 64 and backbone.mean_std == ((0.5,) * 3, (0.5,) * 3)  # from its config
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    assert torch.allclose(F.normalize(backbone(x), dim=-1), shipped, atol=1e-5)


def test_the_evaluation_encoder_scores_through_the_dino_metric_loader(shipped_folders):
    folder, _ = shipped_folders["eval_encoder"]
    encoder = DinoEncoder(str(folder))
    images = (np.random.default_rng(2).random((3, 64, 64, 3)) * 255).astype(np.uint8)
    rows = encoder.images([Image.fromarray(im) for im in images])
    expected = encoders.features(encoders.load_vit(folder), images)
    assert torch.allclose(F.normalize(torch.from_numpy(rows), dim=-1), expected, atol=1e-5)
    assert encoder.model_id.startswith("timm:vit_small_patch16_224@sha256:")


def test_a_folder_that_is_no_model_is_one_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(OpadError, match="has no config.json: not a timm model folder"):
        build_backbone("dino_v1", str(tmp_path / "empty"))
    with pytest.raises(OpadError, match="not a timm model folder"):
        DinoEncoder(str(tmp_path / "empty"))


def test_check_reports_each_encoder_against_its_bars(shipped_folders, monkeypatch):
    monkeypatch.setattr(check, "INSTANCES", 16)
    folder, _ = shipped_folders["dino_v1"]
    monkeypatch.setattr(check, "KNN_SCENES", 24)
    bars = check.check_encoder("dino_v1", folder)
    assert [b.measure for b in bars] == ["held-out instance ranking", "held-out kNN class accuracy"]
    assert all(0 <= b.value <= 1 for b in bars) and [b.bar for b in bars] == [check.ENCODER_INSTANCE, check.ENCODER_KNN]
    assert check.check_encoder("dino_v2", folder.parent / "none")[0].value is None


def test_the_shipped_encoders_are_what_the_build_recipe_trains_now():
    """build.json's record of each shipped encoder holds the recipe in HPARAMS (a changed recipe needs a
    rebuild), and dino_v2's LayerScale starts at the recipe's gain rather than timm's 1e-5."""
    record = json.loads((SHIPPED / "build.json").read_text())
    for kind in encoders.KINDS:
        assert record[kind]["hparams"] == encoders.HPARAMS[kind], kind
        for bar, value in record[kind]["metrics"].items():
            assert value >= {"held-out instance ranking": check.ENCODER_INSTANCE,
                             "held-out kNN class accuracy": check.ENCODER_KNN}[bar], (kind, bar)
    gain = encoders.HPARAMS["dino_v2"]["layerscale_init"]
    gammas = [p for n, p in encoders.make_vit("dino_v2", gain).named_parameters() if n.endswith(".gamma")]
    assert len(gammas) == 8 and all(torch.all(g == gain) for g in gammas)
    assert all(torch.all(p == 1e-5) for n, p in encoders.make_vit("dino_v2").named_parameters() if n.endswith("gamma"))
