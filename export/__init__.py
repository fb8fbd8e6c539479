"""Export and serving, installed as ``opad.export`` (DESIGN.md §3, §5), one subpackage per job:

- :mod:`opad.export.exporter`: the split ONNX graphs and their export (``python export/export_onnx.py``);
- :mod:`opad.export.engines`: TensorRT engines built from an export (``python export/build_trt.py``);
- :mod:`opad.export.runtime`: the inference runner and its backends (eager, compiled, onnxruntime, tensorrt);
- :mod:`opad.export.server`: the OpenAI-compatible image server (``python export/serve.py``).

The three scripts beside them are their command lines. (The subpackages are not named ``onnx`` or
``tensorrt``: a script run as ``python export/X.py`` has export/ first on ``sys.path``, where such a
folder would shadow the library of that name.)"""
