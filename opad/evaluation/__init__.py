"""Evaluation: DreamBench's metrics (DINO, CLIP-I, CLIP-T) and their encoders (``evaluate`` is
``python -m opad.evaluate``), and the Table-5 harness (``reproduce``, ``python -m opad.reproduce``)."""
