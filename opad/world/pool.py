"""Rendered image pools: the first N scenes of a world as one uint8 array, cached on disk in chunks.

Drawing a scene takes about 5 ms, so models train from a pool rendered once rather than drawing on
the fly. A pool lives in ``DIR/<seed>-<size>/chunk-NNNN.npy`` (``CHUNK`` images each, HWC uint8)
with ``captions-NNNN.json`` beside each; a chunk is written to a temporary name and renamed, so a
run cut off keeps every finished chunk and redraws only the rest.
"""

from __future__ import annotations

import json
import os
import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from opad.world.render.contexts import CONTEXTS
from opad.world.render.scenes import Scene, caption, render, repose, world_scenes

CHUNK = 1000


@dataclass
class Pool:
    """``images``: (N, H, W, 3) uint8; ``captions`` and ``scenes``: N of each, in world order."""

    images: np.ndarray
    captions: list[str]
    scenes: list[Scene]

    def __len__(self) -> int:
        return len(self.captions)

    def batch(self, index: torch.Tensor) -> torch.Tensor:
        """Images ``index`` as float (B, 3, H, W) in [-1, 1], the VAE's input range."""
        return to_model_range(self.images[index.numpy()])


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 images as float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def pool_scenes(n: int, seed: int, reposed: bool = False) -> list[Scene]:
    """The first ``n`` scenes of world ``seed``; ``reposed``: each scene's object re-posed in another
    context (a second photo of the same instance, as :func:`opad.world.render.scenes.repose` draws it)."""
    scenes = world_scenes(n, seed)
    if not reposed:
        return scenes
    out = []
    for i, s in enumerate(scenes):
        rng = random.Random(f"opad-world-reposed:{seed}:{i}")
        out.append(repose(s, rng, context=rng.choice([c for c in CONTEXTS if c != s.context])))
    return out


def _render_chunk(seed: int, start: int, count: int, size: int, reposed: bool) -> tuple[np.ndarray, list[str]]:
    scenes = pool_scenes(start + count, seed, reposed)[start:]
    return np.stack([np.asarray(render(s, size)) for s in scenes]), [caption(s) for s in scenes]


def _chunk_files(folder: Path, k: int) -> tuple[Path, Path]:
    return folder / f"chunk-{k:04d}.npy", folder / f"captions-{k:04d}.json"


def load_pool(root: str | os.PathLike, n: int, seed: int, size: int = 64, *, reposed: bool = False,
              workers: int | None = None, progress: bool = True) -> Pool:
    """The first ``n`` scenes of world ``seed`` (``reposed``: their objects re-posed, see :func:`pool_scenes`),
    drawing (in ``workers`` processes) only chunks not yet on disk."""
    folder = Path(root) / f"{seed}-{size}{'-reposed' if reposed else ''}"
    folder.mkdir(parents=True, exist_ok=True)
    chunks = [(k, k * CHUNK, min(CHUNK, n - k * CHUNK)) for k in range((n + CHUNK - 1) // CHUNK)]

    def complete(k: int, count: int) -> bool:
        arr, caps = _chunk_files(folder, k)
        return arr.is_file() and caps.is_file() and np.load(arr, mmap_mode="r").shape[0] >= count

    missing = [c for c in chunks if not complete(c[0], c[2])]
    if missing:
        workers = workers or min(len(missing), os.cpu_count() or 1)
        with ProcessPoolExecutor(workers) as ex, tqdm(total=sum(c[2] for c in missing), desc=f"drawing world {seed}",
                                                       unit="image", disable=not progress) as bar:
            futures = {ex.submit(_render_chunk, seed, start, count, size, reposed): k for k, start, count in missing}
            for future, k in futures.items():
                images, caps = future.result()
                arr, cap_file = _chunk_files(folder, k)
                tmp = arr.with_suffix(".tmp.npy")
                np.save(tmp, images)
                cap_file.write_text(json.dumps(caps))
                os.replace(tmp, arr)  # the array last: a chunk counts once its array is there
                bar.update(len(caps))
    images = np.concatenate([np.load(_chunk_files(folder, k)[0])[:count] for k, _, count in chunks])
    captions = [c for k, _, count in chunks for c in json.loads(_chunk_files(folder, k)[1].read_text())[:count]]
    return Pool(images, captions, pool_scenes(n, seed, reposed))
