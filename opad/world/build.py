"""``python -m opad.world.build OUT``: train the mini world's models from scratch, resumably.

``OUT/data/`` holds the rendered image pools, ``OUT/<component>/`` each component's checkpoints,
log and record, and ``OUT/weights/`` what ships: one folder per component in its library's format
(diffusers, transformers or timm; fp16) and ``build.json`` (where, how long and how well each
trained). Run it again after a cut-off and it continues from each component's last checkpoint; a
finished component is skipped. The shipped weights in ``opad/world/weights/`` are a copy of
``OUT/weights/``, less the components that miss their bars.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from opad.errors import OpadError, command_main
from opad.fsutil import check_can_create, staged_dir, write_json
from opad.world import check
from opad.world.components import classifier, clip, component, encoders, student, teacher, vae
from opad.world.layout import HELDOUT_WORLD, SHIPPED, SUMMARY, TRAIN_WORLD
from opad.world.pool import Pool, load_pool

TRAIN_IMAGES, HELDOUT_IMAGES = 20_000, 512


@dataclass
class Data:
    train: Pool
    heldout: Pool


@dataclass(frozen=True)
class Component:
    name: str
    seed: int
    hparams: dict
    make_run: Callable[..., component.Run]
    finish: Callable[[component.Run, Data, Path], dict]  # saves the shipped folder, returns metrics
    needs: tuple[str, ...] = ()  # components whose shipped weights it trains or is measured with


def _finish_vae(run: component.Run, data: Data, out: Path) -> dict:
    return vae.finish(run.model, data.train, data.heldout.images, out)


def _finish_classifier(run: component.Run, data: Data, out: Path) -> dict:
    return classifier.finish(run.model, data.heldout, out)


def _finish_clip(run: component.Run, data: Data, out: Path) -> dict:
    return clip.finish(run.model, data.heldout, out)


def _teacher_run(folder: Path, pool: Pool, device: torch.device, **kw) -> component.Run:
    weights = folder.parent / "weights"
    return teacher.make_run(folder, pool, device, vae_dir=weights / "vae", clip_dir=weights / "clip", **kw)


def _finish_sampled(sampler: check.Sampler) -> Callable[[component.Run, Data, Path], dict]:
    """Ship a {live, ema} UNet component and measure its samples against its bar."""
    def finish(run: component.Run, data: Data, out: Path) -> dict:
        metrics = component.ship_ema_unet(run.model, out)
        bars = check.check_sampled(sampler, out.parent, grid_png=out / "samples.png",
                                   samples=run.hparams["check_samples"], unet_dir=out)
        return {**metrics, **{b.measure: b.value for b in bars}}
    return finish


def _encoder(kind: str, seed: int) -> Component:
    """A self-supervised world ViT: ship its backbone as timm's folder, measure it against its bars."""
    def finish(run: component.Run, data: Data, out: Path) -> dict:
        encoders.save_vit(encoders.shipped_backbone(kind, run.model), out, kind)
        bars = check.check_encoder(kind, out)
        return {b.measure: b.value for b in bars}
    def make_run(folder: Path, pool: Pool, device: torch.device, *, progress: bool = True, hparams: dict,
                 **kw) -> component.Run:
        reposed = load_pool(folder.parent / "data", len(pool), TRAIN_WORLD, reposed=True, progress=progress)
        captions = (encoders.caption_bank(folder.parent / "weights" / "clip", pool.captions, reposed.captions)
                    if hparams["caption_weight"] else None)
        return encoders.make_run(kind, folder, pool, reposed, device, progress=progress, hparams=hparams,
                                 captions=captions, **kw)
    return Component(kind, seed=seed, hparams=encoders.HPARAMS[kind], make_run=make_run, finish=finish,
                     needs=("clip",))


def _student_run(folder: Path, pool: Pool, device: torch.device, **kw) -> component.Run:
    weights = folder.parent / "weights"
    return student.make_run(folder, pool, device, clip_dir=weights / "clip", teacher_dir=weights / "teacher", **kw)


# in build order: each may use the shipped weights of those before it
COMPONENTS: dict[str, Component] = {
    "vae": Component("vae", seed=1, hparams=vae.HPARAMS, make_run=vae.make_run, finish=_finish_vae),
    "classifier": Component("classifier", seed=2, hparams=classifier.HPARAMS, make_run=classifier.make_run,
                            finish=_finish_classifier),
    "clip": Component("clip", seed=4, hparams=clip.HPARAMS, make_run=clip.make_run, finish=_finish_clip),
    "teacher": Component("teacher", seed=3, hparams=teacher.HPARAMS, make_run=_teacher_run,
                         finish=_finish_sampled(check.TEACHER),
                         needs=("vae", "classifier", "clip")),
    "student": Component("student", seed=5, hparams=student.HPARAMS, make_run=_student_run,
                         finish=_finish_sampled(check.STUDENT),
                         needs=("vae", "classifier", "clip", "teacher")),
    "dino_v1": _encoder("dino_v1", seed=6),
    "dino_v2": _encoder("dino_v2", seed=7),
    "eval_encoder": _encoder("eval_encoder", seed=8),  # another seed and objective than the backbones
}


def _check_same_hparams(folder: Path, hparams: dict) -> None:
    """Record the hyperparameters a component starts with; refuse to resume it under others (its
    checkpoints would continue a different schedule)."""
    path = folder / "hparams.json"
    if path.is_file():
        before = json.loads(path.read_text())
        changed = [f"{k}={before.get(k)} now {hparams.get(k)}" for k in sorted({*before, *hparams})
                   if before.get(k) != hparams.get(k)]
        if changed:
            raise OpadError(f"{folder} was started with other settings ({', '.join(changed)}); resume it with the "
                            f"same ones, or remove {folder} to start that component again")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(hparams, indent=2) + "\n")


def build_component(c: Component, out: Path, data: Data, device: torch.device, *, steps: int | None = None,
                    progress: bool = True, overrides: dict | None = None) -> dict:
    """Train (or resume) one component and ship it; returns its record. A finished one is only read."""
    folder = out / c.name
    if component.is_finished(folder):
        return component.read_record(folder)
    hparams = {**c.hparams, **(overrides or {}), **({"steps": steps} if steps else {})}
    _check_same_hparams(folder, hparams)
    run = c.make_run(folder, data.train, device, seed=c.seed, progress=progress, hparams=hparams)
    timing = component.train(run)
    with staged_dir(out / "weights" / c.name, replace=True) as tmp:
        metrics = c.finish(run, data, tmp)
    record = {"component": c.name, "device": str(device), "bf16_autocast": component.bf16_fast(device),
              "seed": c.seed, "hparams": hparams, **timing, **(run.prepare or {}), "metrics": metrics,
              "where": component.where()}
    component.write_record(folder, record)
    return record


def _adopt_shipped(out: Path, name: str) -> None:
    """Take the shipped ``name`` as a finished component of ``out``: its weights, and its record from the
    shipped build.json (so the build.json this build writes says how that component was trained)."""
    shipped = json.loads((SHIPPED / SUMMARY).read_text()).get(name)
    if shipped is None or not (SHIPPED / name).is_dir():
        raise OpadError(f"{name} is not shipped, so --from-shipped cannot provide it: build it into {out}")
    target = out / "weights" / name
    with staged_dir(target, replace=True) as tmp:
        shutil.copytree(SHIPPED / name, tmp, dirs_exist_ok=True)
    (out / name).mkdir(parents=True, exist_ok=True)
    component.write_record(out / name, {**shipped, "adopted_from": str(SHIPPED / name)})


def build(out: str | Path, names: list[str] | None = None, *, device: str = "auto", steps: int | None = None,
          train_images: int = TRAIN_IMAGES, heldout_images: int = HELDOUT_IMAGES, progress: bool = True,
          overrides: dict[str, dict] | None = None, from_shipped: bool = False) -> dict:
    """Build ``names`` (default: all components) into ``out``; returns ``out/weights/build.json``'s content.
    ``overrides`` replaces hyperparameters per component (``{"teacher": {"batch": 8}}``); ``from_shipped``
    takes the components they need and ``out`` lacks from the shipped weights instead of refusing."""
    out = Path(out)
    names = names or list(COMPONENTS)
    check_can_create(out, "the world build to")
    for name in names:
        for need in COMPONENTS[name].needs:
            if need in names or component.is_finished(out / need):
                continue
            if not from_shipped:
                raise OpadError(f"{name} needs {need}, which {out} has not built: add it to --only, build it first, "
                                "or pass --from-shipped to use the shipped one")
            _adopt_shipped(out, need)
    dev = component.pick_device(device)
    data = Data(load_pool(out / "data", train_images, TRAIN_WORLD, progress=progress),
                load_pool(out / "data", heldout_images, HELDOUT_WORLD, progress=progress))
    summary_path = out / "weights" / SUMMARY
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary["data"] = {"train_world": TRAIN_WORLD, "train_images": train_images,
                       "heldout_world": HELDOUT_WORLD, "heldout_images": heldout_images}
    for name in sorted(names, key=list(COMPONENTS).index):
        summary[name] = build_component(COMPONENTS[name], out, data, dev, steps=steps, progress=progress,
                                        overrides=(overrides or {}).get(name))
        write_json(summary_path, summary)
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m opad.world.build",
        description="Train the mini world's models from scratch into OUT: renders the training and held-out image "
        "pools (OUT/data), trains each component with checkpoints (OUT/<component>), and writes the fp16 "
        "folders that ship (diffusers, transformers or timm format) plus build.json (OUT/weights). Deterministic "
        "for a given device and thread count. Run it again after a cut-off to continue from the last checkpoints.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("out", metavar="OUT", help="build folder (created; an existing one is resumed)")
    p.add_argument("--only", nargs="+", choices=list(COMPONENTS), default=None,
                   help="components to build (default: all, in order)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--steps", type=int, default=None,
                   help="override every component's training steps (a quick trial build; not the shipped one)")
    p.add_argument("--train-images", type=int, default=TRAIN_IMAGES, help="scenes of the training world to render")
    p.add_argument("--heldout-images", type=int, default=HELDOUT_IMAGES, help="held-out scenes to measure on")
    p.add_argument("--from-shipped", action="store_true",
                   help="components that --only's need and OUT lacks are taken from the shipped weights (retrain one "
                   "component against the shipped others) instead of refused")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def run(args: argparse.Namespace) -> dict:
    for flag, value, least in (("--steps", args.steps, 1), ("--train-images", args.train_images, 1),
                               ("--heldout-images", args.heldout_images, 1)):
        if value is not None and value < least:
            raise OpadError(f"{flag} must be at least {least}, got {value}")
    component.pick_device(args.device)  # refuses a device this machine lacks before anything is written
    return build(args.out, args.only, device=args.device, steps=args.steps, train_images=args.train_images,
                 heldout_images=args.heldout_images, progress=not args.no_progress, from_shipped=args.from_shipped)


@command_main()
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = run(args)
    except KeyboardInterrupt:
        print(f"\ninterrupted; run the same command again to continue from the last checkpoints in {args.out}",
              file=sys.stderr)
        return 130
    for name in args.only or COMPONENTS:
        r = summary[name]
        print(f"{name}: {r['steps']} steps in {r['train_seconds'] / 60:.1f} min on {r['device']}; {r['metrics']}")
    print(f"weights in {Path(args.out) / 'weights'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
