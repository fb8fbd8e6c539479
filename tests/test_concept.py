"""Concept format: round trip through plain diffusers, gradient masking, and every load error."""

import json

import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from opad import generate
from opad.concept.folder import (
    META_NAME,
    WEIGHTS_NAME,
    add_modifier_tokens,
    cross_attention_layers,
    enable_kv_training,
    kv_parameters,
    load_concept,
    save_concept,
)
from opad.diffusion.sampling import encode_prompts, sample_student
from opad.errors import OpadError
from opad.train.token_rows import TrainableTokenRows

PROMPT = "a <new1> dog on the beach"


def _perturb_kv(unet, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in kv_parameters(unet):
            p.add_(torch.randn(p.shape, generator=g) * p.std() * 0.8)


def _make_concept(bundle, out_dir, tokens=("<new1>",), words=("dog",), seed=11):
    ids = add_modifier_tokens(bundle.tokenizer, bundle.text_encoder, list(tokens), list(words))
    _perturb_kv(bundle.student_unet, seed)
    g = torch.Generator().manual_seed(seed + 1)
    table = bundle.text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for i in ids:
            table[i] += torch.randn(table.shape[1], generator=g)
    save_concept(out_dir, bundle.student_unet, bundle.tokenizer, bundle.text_encoder, list(tokens))
    return ids


def test_cross_attention_layers_are_the_16_attn2_modules(bundle):
    layers = cross_attention_layers(bundle.student_unet)
    assert len(layers) == 16 and all(name.endswith("attn2") for name in layers)
    assert len(kv_parameters(bundle.student_unet)) == 32


def test_enable_kv_training_freezes_everything_else(bundle):
    params = enable_kv_training(bundle.student_unet)
    trainable = [p for p in bundle.student_unet.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in params}


def test_concept_files_are_custom_diffusion_safetensors(bundle, tmp_path):
    _make_concept(bundle, tmp_path / "c")
    names = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert names == sorted(["<new1>.safetensors", WEIGHTS_NAME, META_NAME])
    state = safetensors.torch.load_file(tmp_path / "c" / WEIGHTS_NAME)
    kv_keys = [k for k, v in state.items() if v.numel()]
    assert len(kv_keys) == 32
    assert all(k.endswith(("attn2.processor.to_k_custom_diffusion.weight", "attn2.processor.to_v_custom_diffusion.weight")) for k in kv_keys)
    emb = safetensors.torch.load_file(tmp_path / "c" / "<new1>.safetensors")
    assert list(emb) == ["<new1>"] and emb["<new1>"].shape == (16,)


def test_plain_diffusers_pipeline_reproduces_our_generate(bundle, tiny_dir, tmp_path):
    concept = tmp_path / "concept"
    _make_concept(bundle, concept)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir / "student", local_files_only=True)
    base = pipe(PROMPT.replace("<new1> ", ""), num_inference_steps=1, guidance_scale=0.0,
                generator=torch.Generator().manual_seed(3), output_type="np").images
    # diffusers only installs Custom Diffusion processors when given the pipeline (see docs/concepts.md).
    pipe.unet.load_attn_procs(concept, weight_name=WEIGHTS_NAME, _pipeline=pipe)
    pipe.load_textual_inversion(concept, weight_name="<new1>.safetensors")
    assert {type(p).__name__ for n, p in pipe.unet.attn_processors.items() if "attn2" in n} == {"CustomDiffusionAttnProcessor"}

    for steps in (1, 4):
        ref = pipe(PROMPT, num_inference_steps=steps, guidance_scale=0.0,
                   generator=torch.Generator().manual_seed(3), output_type="np").images
        out = tmp_path / f"gen{steps}"
        rc = generate.main(["--concept", str(concept), "--prompt", PROMPT, "--steps", str(steps),
                            "--seed", "3", "--num-images", "1", "--out", str(out)])
        assert rc == 0
        png = np.asarray(Image.open(out / "000_seed3.png")).astype(np.int16)
        assert np.abs(png - (ref[0] * 255).round().astype(np.int16)).max() <= 1
        meta = json.loads((out / "generation.json").read_text())
        assert meta["concept_tokens"] == ["<new1>"] and meta["steps"] == steps

        ours = sample_student(bundle, [PROMPT], steps=steps, generator=torch.Generator().manual_seed(3))
        assert np.abs(ours.permute(0, 2, 3, 1).numpy() - ref).max() <= 1e-4
    assert np.abs(ref - base).max() > 1e-2  # the concept really changes the image


def test_load_concept_restores_weights_and_tokens(bundle, tiny_dir, tmp_path):
    from opad.models.loading import load_models

    _make_concept(bundle, tmp_path / "c", tokens=("<new1>", "<new2>"), words=("dog", "toy"))
    fresh = load_models(str(tiny_dir / "teacher"), str(tiny_dir / "student"))
    tokens = load_concept(tmp_path / "c", fresh.student_unet, fresh.tokenizer, fresh.text_encoder)
    assert tokens == ["<new1>", "<new2>"]
    for a, b in zip(kv_parameters(bundle.student_unet), kv_parameters(fresh.student_unet)):
        assert torch.equal(a, b)
    prompts = ["a <new1> dog and a <new2> toy"]
    assert torch.equal(encode_prompts(bundle, prompts), encode_prompts(fresh, prompts))


@pytest.mark.parametrize("tokens", [["<new1>"], ["<new1>", "<new2>"]])
def test_only_modifier_rows_get_gradient(bundle, tokens):
    """The trainer's token rows (TrainableTokenRows): every modifier row gets a gradient, the table none."""
    te = bundle.text_encoder
    ids = add_modifier_tokens(bundle.tokenizer, te, tokens, ["dog", "toy"][: len(tokens)])
    table = te.get_input_embeddings()
    before = table.weight.detach().clone()
    rows = TrainableTokenRows(table, ids)
    prompt = "a photo of " + " and ".join(f"{t} thing" for t in tokens)
    out = encode_prompts(bundle, [prompt, "a dog"])
    (out * torch.randn_like(out)).sum().backward()
    assert table.weight.grad is None
    assert (rows.rows.grad.abs().sum(dim=1) > 0).all() and rows.rows.grad.shape[0] == len(ids)
    with torch.no_grad():
        rows.rows.add_(1.0)
    rows.sync()  # the rows go back into the table; every other row stays bitwise intact
    others = torch.ones(before.shape[0], dtype=torch.bool)
    others[ids] = False
    assert torch.equal(table.weight[others], before[others]) and not torch.equal(table.weight[ids], before[ids])
    rows.remove()


def test_add_modifier_tokens_errors(bundle):
    with pytest.raises(OpadError, match="already in the tokenizer's vocabulary"):
        add_modifier_tokens(bundle.tokenizer, bundle.text_encoder, ["dog"], ["cat"])
    with pytest.raises(OpadError, match="is 2 tokens"):
        add_modifier_tokens(bundle.tokenizer, bundle.text_encoder, ["<new1>"], ["stuffed animal"])
    with pytest.raises(OpadError, match="distinct"):
        add_modifier_tokens(bundle.tokenizer, bundle.text_encoder, ["<a>", "<a>"], ["dog", "dog"])
    assert len(bundle.tokenizer) == 49408  # nothing was added by the failed calls


def _kv_snapshot(bundle):
    return [p.clone() for p in kv_parameters(bundle.student_unet)]


def _expect_load_error(bundle, concept, match):
    before, vocab = _kv_snapshot(bundle), len(bundle.tokenizer)
    with pytest.raises(OpadError, match=match):
        load_concept(concept, bundle.student_unet, bundle.tokenizer, bundle.text_encoder)
    assert all(torch.equal(a, b) for a, b in zip(before, _kv_snapshot(bundle)))
    assert len(bundle.tokenizer) == vocab


@pytest.fixture()
def saved(tiny_dir, tmp_path):
    from opad.models.loading import load_models

    src = load_models(str(tiny_dir / "teacher"), str(tiny_dir / "student"))
    _make_concept(src, tmp_path / "good")
    return tmp_path / "good"


def _rewrite_weights(concept, edit):
    path = concept / WEIGHTS_NAME
    state = safetensors.torch.load_file(path)
    edit(state)
    safetensors.torch.save_file(state, path)


def test_load_errors_name_the_problem(bundle, saved, tmp_path):
    key = next(k for k in safetensors.torch.load_file(saved / WEIGHTS_NAME) if k.endswith("to_k_custom_diffusion.weight"))
    _expect_load_error(bundle, tmp_path / "nope", "concept folder not found")
    (tmp_path / "empty").mkdir()
    _expect_load_error(bundle, tmp_path / "empty", f"no {WEIGHTS_NAME}")

    _rewrite_weights(saved, lambda s: s.__setitem__(key, s[key][:, :-1].contiguous()))
    _expect_load_error(bundle, saved, "has shape")
    _rewrite_weights(saved, lambda s: s.__setitem__(key, torch.ones(s[key].shape[0], 16, dtype=torch.int32)))
    _expect_load_error(bundle, saved, f"{key!r} has dtype torch.int32")
    _rewrite_weights(saved, lambda s: s.pop(key))
    _expect_load_error(bundle, saved, f"{key!r} is missing")
    _rewrite_weights(saved, lambda s: s.__setitem__("mid_block.attentions.0.proj_in.weight", torch.randn(3, 3)))
    _expect_load_error(bundle, saved, "'mid_block.attentions.0.proj_in.weight' is not a cross-attention")

    (saved / WEIGHTS_NAME).write_bytes(b"not a safetensors file at all")
    _expect_load_error(bundle, saved, "not a readable safetensors file")


def test_token_file_errors(bundle, saved):
    tok = saved / "<new1>.safetensors"
    safetensors.torch.save_file({"<other>": torch.randn(16)}, tok)
    _expect_load_error(bundle, saved, "expected one key '<new1>'")
    safetensors.torch.save_file({"<new1>": torch.randn(24)}, tok)
    _expect_load_error(bundle, saved, r"needs \(16,\)")
    tok.unlink()
    _expect_load_error(bundle, saved, "has no <new1>.safetensors")
    (saved / META_NAME).write_text("{broken")
    _expect_load_error(bundle, saved, "not a valid concept description")


def test_loading_twice_is_refused(bundle, saved):
    load_concept(saved, bundle.student_unet, bundle.tokenizer, bundle.text_encoder)
    _expect_load_error(bundle, saved, "already in the tokenizer's vocabulary")


def test_failed_save_leaves_nothing(bundle, tmp_path, monkeypatch):
    add_modifier_tokens(bundle.tokenizer, bundle.text_encoder, ["<new1>"], ["dog"])
    with pytest.raises(OpadError, match="never added"):
        save_concept(tmp_path / "c", bundle.student_unet, bundle.tokenizer, bundle.text_encoder, ["<zzz>"])
    real_save = safetensors.torch.save_file

    def fail_on_token(state, path, metadata=None):
        if str(path).endswith("<new1>.safetensors"):
            raise OSError("disk full")
        return real_save(state, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", fail_on_token)
    with pytest.raises(OSError):
        save_concept(tmp_path / "c", bundle.student_unet, bundle.tokenizer, bundle.text_encoder, ["<new1>"])
    assert list(tmp_path.iterdir()) == []


def test_detach_start_token_kv_blocks_only_the_start_tokens_gradient(bundle):
    from opad.concept.folder import detach_start_token_kv

    unet = bundle.student_unet
    params = enable_kv_training(unet)
    g = torch.Generator().manual_seed(21)
    z, cond = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 16, generator=g)
    ref = unet(z, 999, encoder_hidden_states=cond).sample

    def grads(c):
        for p in params:
            p.grad = None
        unet(z, 999, encoder_hidden_states=c).sample.square().sum().backward()
        return [p.grad.clone() for p in params]

    only_start = cond.clone()
    only_start[:, 1:] = 0  # then every K/V gradient comes through the start token
    assert all(gr.abs().sum() > 0 for gr in grads(only_start))
    handles = detach_start_token_kv(unet)
    assert torch.equal(unet(z, 999, encoder_hidden_states=cond).sample, ref)  # values unchanged
    assert all(gr.abs().sum() == 0 for gr in grads(only_start))
    assert all(gr.abs().sum() > 0 for gr in grads(cond))
    for h in handles:
        h.remove()
