"""TensorRT engines from an ONNX export (``python export/build_trt.py``): :mod:`.plan` (profiles,
refit map and precision, decided without TensorRT), :mod:`.build` (building and checking the
engines) and :mod:`.execution` (running an engine on torch buffers, for the build's check and the
runner's ``tensorrt`` backend). **Unverified**: TensorRT cannot be installed where opad is developed."""
