"""Triton kernels behind one dispatch switch, installed as ``opad.kernels`` (DESIGN.md §3, §6).

Each kernel file holds its kernel(s), the host wrapper and the ``torch.autograd.Function``; the
pure-torch reference stays beside it. :mod:`opad.kernels.dispatch` picks one of the two per call
(``OPAD_KERNELS=auto|triton|reference``); the kernel modules import Triton lazily, only when
chosen, so ``TRITON_INTERPRET`` may be set any time before the first kernel call.
"""
