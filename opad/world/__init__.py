"""The mini world: small real models trained on procedurally drawn 64x64 scenes, so that
personalization visibly learns on a CPU.

This slice is the scene generator: :mod:`opad.world.scenes` (scenes, captions, sampling, rendering,
the CLI), drawing with :mod:`opad.world.objects` (one function per object class) and
:mod:`opad.world.contexts` (one per background). Nothing is imported here, so that
``python -m opad.world.scenes`` runs without a double import.
"""
