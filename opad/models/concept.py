"""The documented import path of the concept API (README "Python API"); it lives in
:mod:`opad.concept`."""

from opad.concept import *  # noqa: F403 - this module is only that API's old address
from opad.concept import __all__  # noqa: F401
