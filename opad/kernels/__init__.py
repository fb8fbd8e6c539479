"""opad's accelerated ops behind one switch, installed as ``opad.kernels`` (DESIGN.md §3, §6).

One public module per op holds that op's pure-torch reference, its autograd and its dispatch:
:mod:`~opad.kernels.swd` (``swd_sorted_l1``, each MS-SWD scale), :mod:`~opad.kernels.kv_proj`
(``kv_project``, every cross-attention K/V) and :mod:`~opad.kernels.feature_pass` (every
backbone's input). Beside each sits its *accelerated* implementation: the Triton kernels in
``_swd_triton.py`` and ``_kv_proj_triton.py``, and for feature_pass the compiled C++/CUDA
extension ``opad._C`` (csrc/). Importing an op's module imports neither Triton nor ``opad._C``;
the op imports its accelerated half only when :mod:`opad.kernels.dispatch` chooses it, so
``TRITON_INTERPRET`` may be set any time before the first kernel call. ``OPAD_KERNELS`` is the one
switch: ``auto`` (each op's accelerated implementation where it can run, else the reference),
``reference``, or ``triton``, which forces the accelerated implementation of every op — for
feature_pass that is the extension, since it has no Triton kernel. ``python -m opad.kernels``
reports, per op and device, what runs and why. :mod:`~opad.kernels.aot` compiles every Triton
kernel for sm_80/sm_90 without a GPU, and :mod:`~opad.kernels.launch` makes the tensors' own
CUDA device current for a launch.
"""
