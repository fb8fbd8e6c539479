"""The mini world's trained components: :mod:`.vae`, the judge :mod:`.classifier`, :mod:`.clip`,
the :mod:`.teacher` and :mod:`.student` UNets and the self-supervised :mod:`.encoders`, each with its
model, its training run and its loader, trained by the resumable loop in :mod:`.component`.

Nothing is imported here: each component pulls in its own libraries (diffusers, transformers, timm).
"""
