"""Training: the loop (``loop``), its data, losses, checkpoints, run log and previews, and one module
per ``--method`` in ``methods/``. ``python -m opad.train`` is the command line (``cli``)."""
