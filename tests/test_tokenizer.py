"""The preset's tokenizer (built offline from open_clip's BPE file) gives open_clip's ids."""

import open_clip
import pytest
from transformers import CLIPTokenizer

from opad.evaluation.dreambench import read_dreambench

ORDINARY = [
    "a photo of a dog",
    "A Cat sitting on a Table, in the morning light.",
    "two  red   apples\tand a banana",
    "the year 1999 and 3.14 apples",
    "it's a cute dog's toy; isn't it?",
    "Café crème brûlée on a wooden table",
    "a sks backpack with a mountain in the background",
    "an extremely long prompt " + "with many repeated words " * 30,
    "",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return CLIPTokenizer.from_pretrained(tiny_dir / "teacher" / "tokenizer")


def _ids(tokenizer, prompts):
    return tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def test_vocab_and_special_tokens_are_sd2s(tokenizer):
    assert len(tokenizer) == 49408
    assert tokenizer.pad_token == "!" and tokenizer.pad_token_id == 0
    assert tokenizer.bos_token_id == 49406 and tokenizer.eos_token_id == 49407
    assert tokenizer.model_max_length == 77


def test_matches_open_clip_on_ordinary_text(tokenizer):
    ours, ref = _ids(tokenizer, ORDINARY), open_clip.tokenize(ORDINARY)
    for prompt, a, b in zip(ORDINARY, ours, ref):
        assert a.tolist() == b.tolist(), prompt


def test_matches_open_clip_on_dreambench_prompts(tokenizer, dreambench_dir):
    bench = read_dreambench(dreambench_dir / "prompts_and_classes.txt")
    prompts = [p.format("sks", cls) for p in bench.object_prompts + bench.live_prompts for cls in ("dog", "stuffed animal")]
    assert len(prompts) == 100
    assert _ids(tokenizer, prompts).tolist() == open_clip.tokenize(prompts).tolist()


def test_dreambench_prompt_lists(dreambench_dir):
    bench = read_dreambench(dreambench_dir / "prompts_and_classes.txt")
    assert len(bench.classes) == 30 and bench.classes["bear_plushie"] == "stuffed animal"
    assert bench.prompts_for("dog", "sks")[10] == "a sks dog wearing a red hat"  # live-subject list
    assert bench.prompts_for("vase", "sks")[-1] == "a cube shaped sks vase"  # object list
