"""The mini world's clip-family model: an image tower and a text tower trained contrastively on captions.

It plays OpenCLIP's two parts in SD 2.x. Its text tower, a ``CLIPTextModel`` with SD 2.x's tokenizer
and config structure at width 32, is the world's text encoder: frozen, it conditions the teacher and
the student (SD 2.1 and SD-Turbo share OpenCLIP's text encoder the same way). Both towers together
score images against prompts and images against images, the CLIP-T and CLIP-I analogues of the
evaluation. It is a transformers ``CLIPModel`` (ViT image tower, 8x8 patches of 64x64 scenes).

Training is CLIP's symmetric InfoNCE with a learned temperature. A world pool repeats captions
(about 4,900 distinct ones in 20,000 scenes), but a repeat in a batch needs no special care: both
copies get the same text embedding, so the loss cannot push them apart. Left-right flips augment
the images (no caption says left or right).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig

from opad.models.quiet import no_transformers_bars, quiet_transformers
from opad.models.tokenizer import MAX_LENGTH, VOCAB_SIZE, build_sd2_tokenizer, prompt_ids
from opad.world.components import component
from opad.world.pool import Pool, to_model_range
from opad.world.render.contexts import CONTEXTS
from opad.world.render.objects import CLASSES
from opad.world.render.scenes import caption

TEXT_WIDTH = 32
IMAGE_SIZE = 64
HPARAMS = dict(steps=2500, batch=128, lr=1e-3, warmup=100, weight_decay=0.1, checkpoint_every=250)


def text_config() -> CLIPTextConfig:
    # SD 2.1's text_encoder/config.json structure (its quirky bos/eos/pad ids too), world-sized.
    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH, num_hidden_layers=3,
        num_attention_heads=2, max_position_embeddings=MAX_LENGTH, hidden_act="gelu", projection_dim=TEXT_WIDTH,
        layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )


def make_model() -> CLIPModel:
    vision = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=8, hidden_size=64, intermediate_size=256,
                              num_hidden_layers=4, num_attention_heads=4, hidden_act="gelu", layer_norm_eps=1e-5)
    return CLIPModel(CLIPConfig(text_config=text_config().to_dict(), vision_config=vision.to_dict(),
                                projection_dim=64))


def load_text_encoder(clip_dir: Path, dtype: torch.dtype = torch.float32) -> CLIPTextModel:
    """The text tower of a saved world CLIP as the ``CLIPTextModel`` SD pipelines take."""
    with quiet_transformers():
        return CLIPTextModel.from_pretrained(clip_dir, torch_dtype=dtype)


def _image_embedding(model: CLIPModel, pixels: torch.Tensor) -> torch.Tensor:
    # the towers' projected pooled outputs, spelt out: get_*_features changed return type in transformers 5
    return model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)


def _text_embedding(model: CLIPModel, ids: torch.Tensor) -> torch.Tensor:
    return model.text_projection(model.text_model(input_ids=ids).pooler_output)


def image_features(model: CLIPModel, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Unit-norm embeddings (N, D) of float images (N, 3, 64, 64) in [-1, 1]."""
    device = next(model.parameters()).device
    out = [_image_embedding(model, images[i:i + batch].to(device)) for i in range(0, len(images), batch)]
    return F.normalize(torch.cat(out).float(), dim=-1)


def text_features(model: CLIPModel, prompts: list[str]) -> torch.Tensor:
    """Unit-norm embeddings (N, D) of prompts, tokenized as the pipelines tokenize."""
    ids = prompt_ids(build_sd2_tokenizer(), prompts).to(next(model.parameters()).device)
    return F.normalize(_text_embedding(model, ids).float(), dim=-1)


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE on unit-norm (B, D) embeddings, image i matching text i."""
    logits = logit_scale.exp().clamp(max=100) * img @ txt.t()
    target = torch.arange(len(img), device=img.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def make_run(folder: Path, pool: Pool, device: torch.device, *, seed: int, progress: bool = True,
             hparams: dict | None = None) -> component.Run:
    h = {**HPARAMS, **(hparams or {})}
    torch.manual_seed(seed)
    model = make_model().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=h["lr"], betas=(0.9, 0.98), weight_decay=h["weight_decay"])
    tokenizer = build_sd2_tokenizer()
    ids = prompt_ids(tokenizer, pool.captions)
    # The tower is causal and pools at the end token, so the padding after the longest caption cannot
    # change a caption's embedding: train on the tokens up to there (a quarter of the 77).
    ids = ids[:, :int((ids == tokenizer.eos_token_id).int().argmax(1).max()) + 1]
    bf16 = component.bf16_fast(device)

    def step(i: int, g: torch.Generator) -> dict[str, float]:
        index = torch.randint(len(pool), (h["batch"],), generator=g)
        x = pool.batch(index)
        flip = torch.rand(len(index), generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x).to(device)
        with component.autocast(device, bf16):
            img = _image_embedding(model, x)
            txt = _text_embedding(model, ids[index].to(device))
        loss = contrastive_loss(F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1), model.logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return {"loss": loss.item(), "logit_scale": model.logit_scale.exp().item(),
                "lr": optimizer.param_groups[0]["lr"]}

    return component.Run(
        name="clip", folder=folder, model=model, optimizer=optimizer, steps=h["steps"], seed=seed,
        progress=progress, lr=lambda i: component.cosine_lr(h["lr"], i, h["steps"], h["warmup"]), step=step,
        checkpoint_every=h["checkpoint_every"], hparams=h,
    )


@torch.no_grad()
def zero_shot_accuracy(model: CLIPModel, heldout: Pool) -> dict[str, float]:
    """How often, among a held-out scene's caption and its copies with the class (context) changed to
    each other one, the towers score the true caption highest: do they agree on what matters most?"""
    model.eval()
    img = image_features(model, to_model_range(heldout.images))
    result = {}
    for field, labels in (("category", list(CLASSES)), ("context", list(CONTEXTS))):
        txt = text_features(model, [caption(dataclasses.replace(s, **{field: v})) for s in heldout.scenes
                                    for v in labels]).view(len(heldout), len(labels), -1)
        guess = torch.einsum("nd,nkd->nk", img, txt).argmax(1).tolist()
        result[field] = sum(labels[j] == getattr(s, field) for j, s in zip(guess, heldout.scenes)) / len(heldout)
    return result


def save_preprocessor(out: Path) -> None:
    """The image tower's input as transformers describes it: 64 px, the world's [-1, 1] range."""
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                       image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(out)


def finish(model: CLIPModel, heldout: Pool, out: Path) -> dict:
    component.save_fp16(model, out)
    save_preprocessor(out)
    with no_transformers_bars():
        shipped = CLIPModel.from_pretrained(out, torch_dtype=torch.float32)
    shipped = shipped.to(next(model.parameters()).device)
    accuracy = zero_shot_accuracy(shipped, heldout)
    return {f"heldout_zero_shot_{k}": round(v, 4) for k, v in accuracy.items()}
