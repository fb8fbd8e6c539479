"""The mini world: small real models trained on procedurally drawn 64x64 scenes, so that
personalization visibly learns on a CPU.

- :mod:`opad.world.render`: drawing the images. Scenes (:mod:`opad.world.render.scenes`: scenes,
  captions, sampling, rendering) drawn with :mod:`opad.world.render.objects` (one function per object
  class) and :mod:`opad.world.render.contexts` (one per background), and the held-out concepts
  (:mod:`opad.world.render.concepts`), subjects laid out like DreamBench. :mod:`opad.world.pool`
  renders scenes in bulk and caches them, as the components train on them.
- :mod:`opad.world.components`: the trained models. The VAE, the judge (``classifier``), the
  clip-family towers (``clip``, whose text tower is the world's text encoder), the teacher and student
  UNets and the self-supervised encoders (dino_v1 / dino_v2 backbones, the held-out evaluation
  encoder), each trained by the resumable loop in :mod:`opad.world.components.component`.
- The shipped weights, in ``opad/world/weights`` (:mod:`opad.world.layout`): built in order by
  ``python -m opad.world.build`` and measured by ``python -m opad.world.check``;
  :mod:`opad.world.preset` assembles them into diffusers pipelines (and writes them as the ``world``
  preset every command runs on by default, :mod:`opad.presets`); :mod:`opad.world.fidelity` scores a
  student's samples against a concept's photos with the evaluation encoder.
- Commands: ``python -m opad.world.{build,check,concepts,scenes}``; :mod:`opad.world.scenes` and
  :mod:`opad.world.concepts` hold only their command lines, over :mod:`opad.world.render`.

Nothing is imported here, so that ``python -m opad.world.<module>`` runs without a double import.
"""
