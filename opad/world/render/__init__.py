"""Drawing the mini world's images: :mod:`.objects` (one function per object class),
:mod:`.contexts` (one per background), :mod:`.scenes` (a scene, its caption, sampling and rendering)
and :mod:`.concepts` (the held-out subjects). Pure functions of a seed; no models.

Nothing is imported here, so that importing one module does not draw in the others.
"""
