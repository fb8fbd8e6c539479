"""The ONNX export (``python export/export_onnx.py``): :mod:`.graphs` (the split graphs as torch
modules), :mod:`.export` (tracing and checking them with ONNX Runtime), :mod:`.options` (the
script's option checks), :mod:`.precision` (exact fp32 for parity checks) and :mod:`.sidecar`
(``export.json``: what an export was made from)."""
