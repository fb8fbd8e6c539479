"""The lora, unet and textual-inversion concept formats: opad loads each as a plain diffusers
pipeline does, refuses every bad file in one line with the models unchanged, and keeps the
formats that change more than the K/V out of the shared engines (server, split exports)."""

import json
import logging
import shutil

import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open

from opad.concept.folder import (
    LORA_NAME,
    META_NAME,
    add_modifier_tokens,
    concept_format,
    kv_parameters,
    load_concept,
    read_concept,
    save_concept,
)
from opad.diffusion.sampling import sample_student
from opad.errors import OpadError
from opad.generate import to_pil
from opad.models.attention import FusedKVAttnProcessor
from opad.models.loading import load_models

PROMPT = "a photo of <new1> dog"
FORMATS = ("lora", "unet", "textual-inversion")
RANK, ALPHA = 4, 8  # alpha != rank: the file must keep the scale alpha / rank


def _bundle(tiny_dir):
    return load_models(student=str(tiny_dir / "student"), load_teacher=False)


def _image(bundle) -> torch.Tensor:
    return sample_student(bundle, [PROMPT], steps=1, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def made(tiny_dir, tmp_path_factory):
    """One concept of each format from one bundle, and the 1-step image each gave before saving:
    a token row (textual-inversion), then a LoRA adapter with random non-zero A and B (lora), then,
    the adapter dropped, random changes all over the UNet (unet); and the base student's image."""
    root = tmp_path_factory.mktemp("formats")
    b = _bundle(tiny_dir)
    unet, g = b.student_unet, torch.Generator().manual_seed(5)
    images = {"base": _image(b)}
    ids = add_modifier_tokens(b.tokenizer, b.text_encoder, ["<new1>"], ["dog"])
    with torch.no_grad():
        b.text_encoder.get_input_embeddings().weight[ids[0]] += torch.randn(16, generator=g)
    images["textual-inversion"] = _image(b)
    save_concept(root / "textual-inversion", unet, b.tokenizer, b.text_encoder, ["<new1>"],
                 format="textual-inversion")

    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    # the fused K/V cache keys on the base K/V weights' versions, which a peft adapter leaves alone
    for w in kv_parameters(unet):
        torch.autograd.graph.increment_version(w)
    images["lora"] = _image(b)
    save_concept(root / "lora", unet, b.tokenizer, b.text_encoder, ["<new1>"], format="lora")

    unet.unload_lora()  # not merged: back to the base weights
    with torch.no_grad():  # the K/V too (which also refreshes the fused K/V cache after the adapter)
        for name, p in unet.named_parameters():
            if name.startswith(("conv_in", "time_embedding")) or ".attn" in name:
                p.add_(torch.randn(p.shape, generator=g) * p.std() * 0.5)
    images["unet"] = _image(b)
    save_concept(root / "unet", unet, b.tokenizer, b.text_encoder, ["<new1>"], format="unet", method="dreambooth")
    return {"root": root, "images": images, **{f: root / f for f in FORMATS}}


def _pixels(image: torch.Tensor) -> np.ndarray:
    """The uint8 image ``python -m opad.generate`` writes."""
    return np.asarray(to_pil(image)[0]).astype(int)


def test_files_and_descriptions(made):
    for fmt, files in (("lora", [LORA_NAME]), ("unet", ["unet"]), ("textual-inversion", [])):
        names = sorted(p.name for p in made[fmt].iterdir())
        assert names == sorted(["<new1>.safetensors", META_NAME, *files])
        meta = json.loads((made[fmt] / META_NAME).read_text())
        base = meta.pop("base", None)  # which base model: a probe of weights only a unet concept changes
        assert (base is None) == (fmt == "unet") and (base is None or len(base["probe"]) == 64)
        assert meta == {"tokens": ["<new1>"], "format": fmt, "method": "dreambooth" if fmt == "unet" else fmt}
        assert concept_format(made[fmt]) == fmt
    with safe_open(made["lora"] / LORA_NAME, "pt") as f:
        config = json.loads(f.metadata()["lora_adapter_metadata"])
        keys = list(f.keys())
    assert (config["unet.r"], config["unet.lora_alpha"]) == (RANK, ALPHA)
    assert all(k.startswith("unet.") and k.endswith((".lora.down.weight", ".lora.up.weight")) for k in keys)
    assert len(keys) == 2 * 4 * 32  # down + up for q, k, v, out of each of the 32 attention layers
    state = safetensors.torch.load_file(made["unet"] / "unet" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in state.values()} == {torch.float32}


def _plain_pipeline(fmt, concept, tiny_dir):
    """A plain diffusers pipeline with the concept, loaded the way diffusers documents."""
    extra = {"unet": UNet2DConditionModel.from_pretrained(concept, subfolder="unet")} if fmt == "unet" else {}
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir / "student", local_files_only=True, **extra)
    if fmt == "lora":
        pipe.load_lora_weights(concept)
    pipe.load_textual_inversion(concept, weight_name="<new1>.safetensors")
    return pipe


@pytest.mark.parametrize("fmt", FORMATS)
def test_opad_loads_it_as_a_plain_diffusers_pipeline_does(fmt, made, tiny_dir):
    b = _bundle(tiny_dir)
    assert load_concept(made[fmt], b.student_unet, b.tokenizer, b.text_encoder) == ["<new1>"]
    ours = _image(b)
    assert (ours - made["images"]["base"]).abs().max() > 1e-2  # the concept really changes the image
    # as the model made it before saving (lora: with its scale alpha / rank)
    assert (ours - made["images"][fmt]).abs().max() <= 1e-4
    unet = b.student_unet
    assert not any(isinstance(m, BaseTunerLayer) for m in unet.modules()) and not getattr(unet, "peft_config", None)
    assert all(isinstance(p, FusedKVAttnProcessor) for n, p in unet.attn_processors.items() if "attn2" in n)

    pipe = _plain_pipeline(fmt, made[fmt], tiny_dir)
    ref = pipe(PROMPT, num_inference_steps=1, guidance_scale=0.0, generator=torch.Generator().manual_seed(3),
               output_type="np").images
    assert np.abs(ours.permute(0, 2, 3, 1).numpy() - ref).max() <= 1e-4


def _snapshot(b):
    return ({k: v.clone() for k, v in b.student_unet.state_dict().items()},
            b.text_encoder.get_input_embeddings().weight.detach().clone(), len(b.tokenizer))


def _unchanged(b, before) -> bool:
    state, table, vocab = _snapshot(b)
    return (state.keys() == before[0].keys() and all(torch.equal(v, before[0][k]) for k, v in state.items())
            and torch.equal(table, before[1]) and vocab == before[2]
            and not any(isinstance(m, BaseTunerLayer) for m in b.student_unet.modules()))


def _broken(made, tmp_path, fmt, edit):
    """A copy of the ``fmt`` concept with ``edit(folder)`` applied."""
    folder = tmp_path / f"{fmt}-{len(list(tmp_path.iterdir()))}"
    shutil.copytree(made[fmt], folder)
    edit(folder)
    return folder


def _rewrite(path, edit, metadata_edit=None):
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    state = safetensors.torch.load_file(path)
    edit(state)
    if metadata_edit:
        config = json.loads(metadata["lora_adapter_metadata"])
        metadata_edit(config)
        metadata["lora_adapter_metadata"] = json.dumps(config)
    safetensors.torch.save_file(state, path, metadata=metadata)


def _first(state, suffix):
    return next(k for k in state if k.endswith(suffix))


def _lora(edit=None, metadata_edit=None):
    return lambda folder: _rewrite(folder / LORA_NAME, edit or (lambda s: None), metadata_edit)


def _unet_weights(edit):
    return lambda folder: _rewrite(folder / "unet" / "diffusion_pytorch_model.safetensors", edit)


def _unet_config(key, value):
    def edit(folder):
        path = folder / "unet" / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))
    return edit


def _truncate(name):
    def edit(folder):
        path = folder / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return edit


def _meta_format(value):
    def edit(folder):
        path = folder / META_NAME
        path.write_text(json.dumps({**json.loads(path.read_text()), "format": value}))
    return edit


def _set(suffix, make):
    return lambda s: s.__setitem__(_first(s, suffix), make(s[_first(s, suffix)]))


BAD = [
    ("lora", _truncate(LORA_NAME), "pytorch_lora_weights.safetensors is not a readable safetensors file"),
    ("lora", lambda f: (f / LORA_NAME).unlink(), "is a lora concept but has no pytorch_lora_weights"),
    ("lora", _lora(lambda s: s.__setitem__("unet.down_blocks.7.attentions.0.proj_in.lora.down.weight",
                                           torch.randn(4, 16))),
     "'down_blocks.7.attentions.0.proj_in', which is no module"),
    ("lora", _lora(lambda s: s.__setitem__("unet.conv_in.lora.down.weight", torch.randn(4, 4))),
     "'conv_in', a Conv2d; only linear layers"),
    ("lora", _lora(_set("attn2.to_k.lora.down.weight", lambda v: v[:, :-1].contiguous())), r"needs \(rank, 16\)"),
    ("lora", _lora(_set("attn1.to_q.lora.up.weight", lambda v: v[:, :-1].contiguous())), r"with rank 4 needs"),
    ("lora", _lora(_set("attn1.to_v.lora.up.weight", lambda v: torch.full_like(v, float("nan")))), "not finite"),
    ("lora", _lora(_set("to_out.0.lora.up.weight", lambda v: v.to(torch.int32))), "dtype torch.int32"),
    ("lora", _lora(lambda s: s.pop(_first(s, "attn2.to_v.lora.up.weight"))), "has a LoRA down weight but no up"),
    ("lora", _lora(lambda s: s.__setitem__("text_encoder.x.lora.down.weight", torch.randn(4, 16))),
     "is not a UNet LoRA weight"),
    ("lora", _lora(metadata_edit=lambda c: c.__setitem__("unet.r", 8)), "have rank 4 but its metadata says r=8"),
    # configs that fail inside peft, after the adapter went in (rank) or while merging (DoRA): undone
    ("lora", _lora(metadata_edit=lambda c: c.update({"unet.r": 8, "unet.rank_pattern": {"^nothing$": 2}})),
     "could not load the LoRA adapter"),
    ("lora", _lora(metadata_edit=lambda c: c.__setitem__("unet.use_dora", True)),
     "could not load the LoRA adapter .*needs weights the file does not have"),
    ("lora", _lora(metadata_edit=lambda c: c.__setitem__("unet.no_such_option", 1)), "could not load the LoRA"),
    ("unet", _unet_config("layers_per_block", 3), "layers_per_block is 3 but this UNet's is 2"),
    ("unet", _truncate("unet/diffusion_pytorch_model.safetensors"), "is not a readable safetensors file"),
    ("unet", _unet_weights(lambda s: s.pop("conv_in.weight")), "weight 'conv_in.weight' is missing"),
    ("unet", _unet_weights(_set("conv_out.bias", lambda v: v[:-1].contiguous())), "'conv_out.bias' has shape"),
    ("unet", _unet_weights(lambda s: s.__setitem__("conv_in.lora.weight", torch.randn(2))),
     "'conv_in.lora.weight' is not a weight of this UNet"),
    ("unet", lambda f: shutil.rmtree(f / "unet"), "is a unet concept but has no unet/config.json"),
    ("textual-inversion", _meta_format("kohya"), "unknown concept format 'kohya'"),
]


def test_bad_concepts_are_one_line_and_change_nothing(made, tiny_dir, tmp_path):
    b = _bundle(tiny_dir)
    before = _snapshot(b)
    for fmt, edit, message in BAD:
        folder = _broken(made, tmp_path, fmt, edit)
        with pytest.raises(OpadError, match=message) as error:
            load_concept(folder, b.student_unet, b.tokenizer, b.text_encoder)
        assert "\n" not in str(error.value), str(error.value)
        assert _unchanged(b, before), message
    assert torch.equal(_image(b), made["images"]["base"])  # nothing stale either (the fused K/V cache)


def test_save_refuses_what_it_cannot_write(tiny_dir, tmp_path):
    b = _bundle(tiny_dir)
    add_modifier_tokens(b.tokenizer, b.text_encoder, ["<new1>"], ["dog"])
    args = (b.student_unet, b.tokenizer, b.text_encoder, ["<new1>"])
    with pytest.raises(OpadError, match="unknown concept format 'dora'"):
        save_concept(tmp_path / "c", *args, format="dora")
    with pytest.raises(OpadError, match="the UNet carries 0"):
        save_concept(tmp_path / "c", *args, format="lora")
    with pytest.raises(OpadError, match="at least one token"):
        save_concept(tmp_path / "c", b.student_unet, b.tokenizer, b.text_encoder, [], format="textual-inversion")
    with torch.no_grad():
        b.student_unet.conv_in.weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(OpadError, match="'conv_in.weight' holds values that are not finite"):
        save_concept(tmp_path / "c", *args, format="unet")
    assert list(tmp_path.iterdir()) == []


def test_read_concept_refuses_lora_and_unet_and_serves_textual_inversion(made, tiny_dir):
    b = _bundle(tiny_dir)
    for fmt in ("lora", "unet"):
        with pytest.raises(OpadError, match=f"is a {fmt} concept: it changes UNet weights outside the "
                           "cross-attention K/V, so it cannot share an engine .*python -m opad.generate --concept "
                           "DIR.*export/export_onnx.py --concept DIR"):
            read_concept(made[fmt], b.student_unet, b.tokenizer, b.text_encoder)
    ti = read_concept(made["textual-inversion"], b.student_unet, b.tokenizer, b.text_encoder)
    assert ti.tokens == ["<new1>"]
    saved = safetensors.torch.load_file(made["textual-inversion"] / "<new1>.safetensors")["<new1>"]
    assert torch.equal(ti.rows[0], saved)
    assert all(torch.equal(a, w) for a, w in zip(ti.kv, kv_parameters(b.student_unet)))


def test_server_store_serves_textual_inversion_and_skips_lora_in_one_line(made, tiny_dir, tmp_path, caplog):
    from opad.export.runtime import Runner
    from opad.export.server.concept_store import ConceptStore

    shutil.copytree(made["textual-inversion"], tmp_path / "ti" / "concept")  # a whole trainer output folder
    shutil.copytree(made["lora"], tmp_path / "lo")
    runner = Runner("eager", student=str(tiny_dir / "student"))
    with caplog.at_level(logging.WARNING, logger="opad.serve"):
        assert ConceptStore(tmp_path, runner).scan() == ["base", "ti"]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("concept 'lo' skipped: ") and "is a lora concept" in lines[0]
    got = runner.generate(PROMPT, "ti", seed=3)[0]
    assert np.abs(got.astype(int) - _pixels(made["images"]["textual-inversion"])).max() <= 1


def test_an_export_bakes_a_lora_concept_in_and_serves_it_alone(made, tiny_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    from exportutil import export
    from opad.export.exporter.sidecar import concept_id, read_sidecar
    from opad.export.runtime import Runner

    out = export(tmp_path / "onnx", tiny_dir / "student", made["lora"], no_single=True)
    record = read_sidecar(out)
    assert record["concept_format"] == "lora" and record["concept_tokens"] == ["<new1>"]
    assert record["denoiser_concept"] == record["concept_id"] == concept_id(made["lora"])
    runner = Runner("onnxruntime", onnx={"lo": str(out)}, concepts={"lo": str(made["lora"])})
    got = runner.generate(PROMPT, "lo", seed=3)[0]  # the LoRA's image: it is in the denoise graph too
    assert np.abs(got.astype(int) - _pixels(made["images"]["lora"])).max() <= 1
    with pytest.raises(OpadError, match="bakes its lora concept into its denoise graph, so it serves that concept"):
        Runner("onnxruntime", onnx={None: str(out), "lo": str(out)})
    with pytest.raises(OpadError, match="bakes concept .* into its denoise graph, so it cannot serve other"):
        Runner("onnxruntime", student=str(tiny_dir / "student"), onnx={None: str(out)}, torch_conditioning=True)
