"""Export and serving, installed as ``opad.export`` (DESIGN.md §3, §5): the split ONNX graphs
(:mod:`opad.export.graphs`, ``python export/export_onnx.py``) and the inference runner
(:mod:`opad.export.runtime`)."""
