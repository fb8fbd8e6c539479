"""python -m opad.convert: each concept format to kohya's and diffusers' LoRA files, loaded by diffusers' own
loaders (not opad's) into plain pipelines of the tiny and world students; at --rank full the image is
opad.generate's within 1/255; the key names are the ones ComfyUI and A1111 map; bad input is one line."""

import json

import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import StableDiffusionPipeline
from exportutil import generate as opad_generate
from exportutil import make_concept
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open

import opad
from opad import convert
from opad.concept.community import kohya_name
from opad.concept.folder import add_modifier_tokens, save_concept
from opad.fullsize.writer import STUDENT_UNET, build_unet
from opad.models.attention import cross_attention_layers
from opad.models.loading import load_models
from opad.presets import default_preset

PROMPT = "a photo of <new1> dog"
SEED = 3


def _convert(concept, out, *args, base=None):
    argv = [str(concept), "--out", str(out), *map(str, args)] + (["--base", str(base)] if base else [])
    assert convert.main(argv) == 0
    return out


def _lora_concept(student, out, seed):
    b = load_models(student=str(student), load_teacher=False)
    g = torch.Generator().manual_seed(seed)
    ids = add_modifier_tokens(b.tokenizer, b.text_encoder, ["<new1>"], ["dog"])
    with torch.no_grad():
        b.text_encoder.get_input_embeddings().weight[ids[0]] += torch.randn(b.text_encoder.config.hidden_size,
                                                                           generator=g)
    b.student_unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                                          target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, p in b.student_unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    save_concept(out, b.student_unet, b.tokenizer, b.text_encoder, ["<new1>"], format="lora")
    return out


def _ti_concept(student, out, seed):
    b = load_models(student=str(student), load_teacher=False)
    ids = add_modifier_tokens(b.tokenizer, b.text_encoder, ["<new1>"], ["dog"])
    with torch.no_grad():
        width = b.text_encoder.config.hidden_size
        b.text_encoder.get_input_embeddings().weight[ids[0]] += torch.randn(width, generator=torch.Generator()
                                                                           .manual_seed(seed))
    save_concept(out, b.student_unet, b.tokenizer, b.text_encoder, ["<new1>"], format="textual-inversion")
    return out


@pytest.fixture(scope="module")
def concepts(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    world = default_preset("world").folder() / "student"
    return {
        "root": root, "tiny": tiny_dir / "student", "world": world,
        "custom-diffusion": make_concept(tiny_dir, root / "cd", seed=3),
        "lora": _lora_concept(tiny_dir / "student", root / "lora", seed=4),
        "textual-inversion": _ti_concept(tiny_dir / "student", root / "ti", seed=5),
        "world-custom-diffusion": make_concept(world.parent, root / "world-cd", seed=6),
    }


def _pixels(pipe, prompt=PROMPT) -> np.ndarray:
    image = pipe(prompt, num_inference_steps=1, guidance_scale=0.0, generator=torch.Generator().manual_seed(SEED),
                 output_type="np").images[0]
    return (image * 255).round().astype(int)


def _adapted(pipe) -> int:
    return sum(isinstance(m, BaseTunerLayer) for m in pipe.unet.modules())


def _kohya_pipeline(student, out, name, token="<new1>"):
    """A plain diffusers pipeline with the kohya LoRA and the SD 2.x embedding file, as diffusers documents."""
    pipe = StableDiffusionPipeline.from_pretrained(student, local_files_only=True)
    if (out / f"{name}.safetensors").exists():
        pipe.load_lora_weights(out, weight_name=f"{name}.safetensors")
    pipe.load_textual_inversion(out / "embeddings" / f"{name}.safetensors", token=token)
    return pipe


@pytest.mark.parametrize("student,concept", [("tiny", "custom-diffusion"), ("world", "world-custom-diffusion")])
def test_kohya_at_full_rank_gives_opad_generates_image(concepts, tmp_path, student, concept):
    out = _convert(concepts[concept], tmp_path / "k", "--to", "kohya", "--name", "sks_thing", base=concepts[student])
    ours = opad_generate(concepts[student], concepts[concept], SEED, 1)[1].astype(int)
    plain = opad_generate(concepts[student], None, SEED, 1, prompt="a photo of dog dog")[1].astype(int)
    pipe = _kohya_pipeline(concepts[student], out, "sks_thing")
    layers = 2 * len(cross_attention_layers(pipe.unet))
    assert _adapted(pipe) == layers  # diffusers read every layer of the file (no "lora key not loaded")
    theirs = _pixels(pipe)
    assert np.abs(theirs - ours).max() <= 1  # within 1/255
    assert np.abs(plain - ours).mean() > 1  # and the concept matters: without it the image differs
    report = json.loads((out / "conversion.json").read_text())
    assert len(report["layers"]) == layers and report["overall_relative_error"] < 1e-6


def test_kohya_at_a_lower_rank_reports_its_error_and_the_image_moves(concepts, tmp_path):
    """At rank 4 the tiny concept's delta is cut: measured, the image differs from opad.generate's by
    at most 14/255 (mean 2.0/255) against 1/255 at full rank; the errors printed are the file's."""
    out = _convert(concepts["custom-diffusion"], tmp_path / "k4", "--to", "kohya", "--rank", 4, "--name", "r4",
                   base=concepts["tiny"])
    report = json.loads((out / "conversion.json").read_text())
    state = safetensors.torch.load_file(out / "r4.safetensors")
    concept = safetensors.torch.load_file(concepts["custom-diffusion"] / "pytorch_custom_diffusion_weights.safetensors")
    base = load_models(student=str(concepts["tiny"]), load_teacher=False).student_unet
    errors = []
    for module, layer in report["layers"].items():
        name = kohya_name(module)
        down, up = state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"]
        assert down.shape[0] == up.shape[1] == layer["rank"] == 4 and float(state[f"{name}.alpha"]) == 4.0
        layer_name, proj = module.rsplit(".", 1)
        delta = concept[f"{layer_name}.processor.{proj}_custom_diffusion.weight"] - base.get_submodule(module).weight
        measured = float((delta - up @ down).norm() / delta.norm())
        assert measured == pytest.approx(layer["relative_error"], rel=1e-3)
        errors.append(measured)
    assert 0.05 < report["overall_relative_error"] < 1 and max(errors) < 1
    ours = opad_generate(concepts["tiny"], concepts["custom-diffusion"], SEED, 1)[1].astype(int)
    diff = np.abs(_pixels(_kohya_pipeline(concepts["tiny"], out, "r4")) - ours)
    assert 1 < diff.max() <= 40 and diff.mean() < 6  # measured: 14 and 2.0


@pytest.mark.parametrize("fmt", ["custom-diffusion", "lora", "textual-inversion"])
def test_every_format_round_trips_through_diffusers_loaders(concepts, tmp_path, fmt):
    ours = opad_generate(concepts["tiny"], concepts[fmt], SEED, 1)[1].astype(int)
    lora_dir = _convert(concepts[fmt], tmp_path / "d", "--to", "diffusers-lora", base=concepts["tiny"])
    pipe = StableDiffusionPipeline.from_pretrained(concepts["tiny"], local_files_only=True)
    if fmt != "textual-inversion":
        pipe.load_lora_weights(lora_dir)
    pipe.load_textual_inversion(lora_dir, weight_name="<new1>.safetensors")
    assert np.abs(_pixels(pipe) - ours).max() <= 1
    assert np.abs(opad_generate(concepts["tiny"], lora_dir, SEED, 1)[1].astype(int) - ours).max() <= 1  # opad too

    kohya = _convert(concepts[fmt], tmp_path / "k", "--to", "kohya", "--name", "sks", base=concepts["tiny"])
    pipe = _kohya_pipeline(concepts["tiny"], kohya, "sks")
    assert _adapted(pipe) == {"custom-diffusion": 32, "lora": 128, "textual-inversion": 0}[fmt]
    assert np.abs(_pixels(pipe) - ours).max() <= 1
    assert (kohya / "sks.safetensors").exists() == (fmt != "textual-inversion")


def test_files_carry_their_metadata_and_the_embedding_is_the_sd2_layout(concepts, tmp_path):
    out = _convert(concepts["custom-diffusion"], tmp_path / "k", "--to", "kohya", "--dtype", "float16",
                   base=concepts["tiny"])
    name = "opad_cd"  # opad_ + the concept folder's name
    with safe_open(out / f"{name}.safetensors", "pt") as f:
        meta = f.metadata()
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    recorded = json.loads((concepts["custom-diffusion"] / "opad_concept.json").read_text())["base"]["probe_id"]
    assert meta["opad_version"] == opad.__version__ and meta["opad_base_id"] == recorded
    assert meta["opad_rank"] == meta["ss_network_dim"] == meta["ss_network_alpha"] == "full"
    assert json.loads(meta["opad_tokens"]) == ["<new1>"] and meta["ss_output_name"] == name
    assert meta["ss_network_module"] == "networks.lora" and meta["opad_source_format"] == "custom-diffusion"
    embedding = safetensors.torch.load_file(out / "embeddings" / f"{name}.safetensors")
    assert list(embedding) == ["emb_params"] and embedding["emb_params"].shape == (1, 16)
    row = safetensors.torch.load_file(concepts["custom-diffusion"] / "<new1>.safetensors")["<new1>"]
    assert torch.equal(embedding["emb_params"][0], row.half())


# The names ComfyUI's LoRA loader maps, read from its source (comfyanonymous/ComfyUI at 00728eb,
# comfy/lora.py model_lora_keys_unet + comfy/utils.py unet_to_diffusers): "lora_unet_" + a diffusers
# UNet key whose transformer-block part is in TRANSFORMER_BLOCKS (attn2.to_k.weight, attn2.to_v.weight
# among them), ".weight" dropped, "." made "_". A1111's Lora extension (networks.py,
# convert_diffusers_name_to_compvis) maps lora_unet_down_blocks_B_attentions_A_* to
# input_blocks_{1 + 3B + A}_1_*, mid_block_attentions_0_* to middle_block_1_* and
# up_blocks_B_attentions_A_* to output_blocks_{3B + A}_1_*.
SD21_KOHYA_NAMES = [
    f"lora_unet_{block}_transformer_blocks_0_attn2_{proj}"
    for block in [f"down_blocks_{b}_attentions_{a}" for b in range(3) for a in range(2)]
    + ["mid_block_attentions_0"] + [f"up_blocks_{b}_attentions_{a}" for b in range(1, 4) for a in range(3)]
    for proj in ("to_k", "to_v")
]


def test_key_names_are_the_ones_comfyui_and_a1111_map_for_sd21():
    unet = build_unet(STUDENT_UNET)  # the SD-Turbo / SD 2.1 architecture, on the meta device
    names = sorted(kohya_name(f"{layer}.{proj}") for layer in cross_attention_layers(unet) for proj in ("to_k", "to_v"))
    assert names == sorted(SD21_KOHYA_NAMES) and len(names) == 32
    comfy = {"lora_unet_" + k.removesuffix(".weight").replace(".", "_") for k in unet.state_dict()
             if k.endswith((".attn2.to_k.weight", ".attn2.to_v.weight"))}
    assert set(names) == comfy
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k" in names  # A1111: input_blocks_1_1
    assert "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_v" in names  # A1111: output_blocks_11_1
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k" in names  # A1111: middle_block_1


def _refused(capsys, argv, needle):
    assert convert.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err


def test_bad_input_is_one_line_and_writes_nothing(concepts, tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    tiny = ["--base", str(concepts["tiny"])]
    (tmp_path / "empty").mkdir()
    _refused(capsys, [str(tmp_path / "nope"), "--to", "kohya", "--out", str(out)], "concept folder not found")
    _refused(capsys, [str(tmp_path / "empty"), "--to", "kohya", "--out", str(out)], "is not a concept folder")
    b = load_models(student=str(concepts["tiny"]), load_teacher=False)
    save_concept(tmp_path / "unet", b.student_unet, b.tokenizer, b.text_encoder, [], format="unet")
    _refused(capsys, [str(tmp_path / "unet"), "--to", "kohya", "--out", str(out)], "is a unet concept")
    _refused(capsys, [str(concepts["custom-diffusion"]), "--to", "kohya", "--out", str(out), "--base",
                      str(tiny_dir / "teacher")], "was trained on another base model")
    _refused(capsys, [str(concepts["world-custom-diffusion"]), "--to", "kohya", "--out", str(out), *tiny],
             "was trained on another base model")
    _refused(capsys, [str(concepts["custom-diffusion"]), "--to", "kohya", "--out", str(out), "--rank", "17", *tiny],
             "--rank 17 is larger than layer")
    _refused(capsys, [str(concepts["custom-diffusion"]), "--to", "kohya", "--out", str(out), "--rank", "0"],
             "--rank must be 'full' or a positive whole number")
    _refused(capsys, [str(concepts["custom-diffusion"]), "--to", "kohya", "--out", str(out), "--name", "<new1>"],
             "--name '<new1>' must start with a letter")
    kv = concepts["root"] / "cd" / "pytorch_custom_diffusion_weights.safetensors"
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in concepts["custom-diffusion"].iterdir():
        (broken / f.name).write_bytes(f.read_bytes() if f != kv else f.read_bytes()[:-64])
    _refused(capsys, [str(broken), "--to", "kohya", "--out", str(out), *tiny], "not a readable safetensors file")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["broken", "empty", "unet"]
    (out / "x").parent.mkdir()
    (out / "x").write_text("keep")
    _refused(capsys, [str(concepts["custom-diffusion"]), "--to", "kohya", "--out", str(out)], "is not empty")
    assert [p.name for p in out.iterdir()] == ["x"]


def test_a_concept_without_a_base_record_warns_and_converts(concepts, tmp_path, capsys):
    """diffusers' own Custom Diffusion output records no base model: only the shapes can be checked."""
    old = tmp_path / "diffusers-cd"
    old.mkdir()
    for f in concepts["custom-diffusion"].iterdir():
        if f.name != "opad_concept.json":
            (old / f.name).write_bytes(f.read_bytes())
    _convert(old, tmp_path / "k", "--to", "kohya", base=concepts["tiny"])
    assert "does not record which model it was trained on" in capsys.readouterr().err
