"""The mini world: small real models trained on procedurally drawn 64x64 scenes, so that
personalization visibly learns on a CPU.

- Scenes: :mod:`opad.world.scenes` (scenes, captions, sampling, rendering, the CLI), drawing with
  :mod:`opad.world.objects` (one function per object class) and :mod:`opad.world.contexts` (one
  per background); :mod:`opad.world.pool` renders and caches them in bulk.
- Models: :mod:`opad.world.vae`, the judge :mod:`opad.world.classifier`, the clip-family towers
  :mod:`opad.world.clip` (whose text tower is the world's text encoder) and the teacher UNet
  :mod:`opad.world.teacher`, each trained by the resumable loop in :mod:`opad.world.component`,
  built in order by ``python -m opad.world.build`` and measured by ``python -m opad.world.check``;
  :mod:`opad.world.preset` assembles them into diffusers pipelines (and writes them as the ``world``
  preset every command runs on by default, :mod:`opad.presets`). The self-supervised encoders
  (dino_v1 / dino_v2 backbones, the held-out evaluation encoder) are :mod:`opad.world.encoders`.
  The shipped weights are in ``opad/world/weights`` (:mod:`opad.world.layout`).
- Concepts: :mod:`opad.world.concepts`, held-out subjects laid out like DreamBench;
  :mod:`opad.world.fidelity` scores a student's samples against a concept's photos with the
  evaluation encoder.

Nothing is imported here, so that ``python -m opad.world.<module>`` runs without a double import.
"""
