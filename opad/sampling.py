"""The documented import path of the samplers (README "Python API"); they live in
:mod:`opad.diffusion.sampling`."""

from opad.diffusion.sampling import sample_student, sample_teacher

__all__ = ["sample_student", "sample_teacher"]
