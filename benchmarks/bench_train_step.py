"""Time each stage of one OPAD training iteration (and the whole iteration) on the current device;
with ``--method`` a baseline's (or teacher-first's) whole iteration.

Stages: teacher step (forward, backward, optimizer), student UNet + VAE decode, the alignment
target (teacher CFG x0 + decode), MS-SWD forward+backward, each discriminator's generator side
(backbone on the student image + head + backward) and discriminator side (backbone on real photos
+ head + loss + backward), and each optimizer step. Rows go to benchmarks/results/results.csv.

    python benchmarks/bench_train_step.py                 # tiny preset, CPU or the GPU there is
    python benchmarks/bench_train_step.py --teacher DIR --student DIR --backbone-weights clip=FILE,...
    python benchmarks/bench_train_step.py --method lora  # or custom-diffusion, dreambooth, textual-inversion
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import torch
from common import measure, write_rows

from opad.config import METHODS, TrainConfig
from opad.diffusion.sampling import decode_latents
from opad.diffusion.schedule import add_noise, teacher_x0
from opad.train import losses
from opad.train.loop import StepOutcome, Trainer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher")
    p.add_argument("--student")
    p.add_argument("--backbone-weights", default="", help="NAME=FILE,... (real models need them)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="auto")
    p.add_argument("--profile", default="paper", choices=["paper", "release"])
    p.add_argument("--method", default="opad", choices=METHODS, help="another method: its whole iteration only")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(teacher=args.teacher, student=args.student, output_dir=out + "/run", device=args.device,
                          batch_size=args.batch_size, resolution=args.resolution, collab_start=None,
                          profile=args.profile, method=args.method,
                          backbone_weights=[s for s in args.backbone_weights.split(",") if s])
        tr = Trainer(cfg, progress=False)
        b, dev, n = tr.bundle, tr.device, args.batch_size
        shape = f"b{n}x{tr.resolution}px,{args.profile}"
        rows = []

        def add(name, fn):
            rows.append({"name": f"train/{name}", "provider": "torch", "shape": shape,
                         **measure(fn, dev, repeats=args.repeats)})
            print(f"{name:28s} {rows[-1]['median_ms']:9.1f} ms", file=sys.stderr)

        if args.method != "opad":
            add(f"iteration[{args.method}]", tr.iteration)
            print(f"wrote {len(rows)} rows to {write_rows(rows, dev)}")
            return 0
        batch = tr.method.next_batch()
        cond = tr.context.encode(b.text_encoder, batch.prompts).detach()
        add("iteration", tr.iteration)
        m = tr.method
        add("teacher_step", lambda: m.teacher_step(batch, tr.context.encode(b.text_encoder, batch.prompts),
                                                   StepOutcome()))

        def student_image():
            return tr.method.student_one_step(cond, "student", clamp=False)  # losses see the raw output

        add("student_unet_decode", student_image)
        z_st, image = student_image()
        z_st, image = z_st.detach(), image.detach()
        tsched = b.teacher_scheduler
        t2 = torch.randint(0, 1000, (n,), device=dev)

        @torch.no_grad()
        def alignment_target():
            with tr.accelerator.autocast():
                z = add_noise(z_st, torch.randn_like(z_st), t2.cpu(), tsched.alphas_cumprod)
                z_tc = teacher_x0(b.teacher_unet, z, t2, cond, tr.method.uncond, tsched.alphas_cumprod,
                                  tsched.config.prediction_type, cfg.guidance_scale)
                return decode_latents(b, z_tc, clamp=False)

        add("alignment_target", alignment_target)
        image_tc = alignment_target()
        g = torch.Generator().manual_seed(0)

        def swd():
            x = image.clone().requires_grad_(True)
            losses.ms_swd(x, image_tc, generator=g).sum().backward()

        add("ms_swd_fwd_bwd", swd)
        real = tr.data.real_images(n, torch.Generator().manual_seed(1)).to(dev)
        for name in cfg.discriminators:
            backbone, head = tr.method.backbones[name], tr.method.heads[name]

            def g_side():
                x = image.clone().requires_grad_(True)
                with tr.accelerator.autocast():
                    loss = losses.generator_loss(head(backbone(x)).float()).mean()
                loss.backward()

            def d_side():
                with torch.no_grad(), tr.accelerator.autocast():
                    real_f, fake_f = backbone(real), backbone(image)
                with tr.accelerator.autocast():
                    loss = losses.discriminator_loss(head(real_f).float(), head(fake_f).float())
                loss.backward()

            add(f"G_{name}", g_side)
            add(f"D_{name}", d_side)
        for opt_name, opt in (("teacher", m.opt_teacher), ("student", m.opt_student), ("heads", m.opt_heads)):
            for group in opt.param_groups:
                for param in group["params"]:
                    param.grad = torch.randn_like(param) * 1e-3
            add(f"optimizer_{opt_name}", opt.step)
    path = write_rows(rows, dev)
    print(f"wrote {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
