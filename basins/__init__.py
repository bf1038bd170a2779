"""basins: the geometry of loss basins of trained PyTorch models.

The library is silent: it returns tensors and dataclasses and raises
:class:`basins.errors.BasinsError` subclasses; the ``basins`` command line formats them.
"""

from ._version import __version__
from .errors import BasinsError, ComputeError, InputError, ReportError
from .params import ParamSpace
from .problem import HVP_ROUTES, Problem

__all__ = [
    "__version__",
    "BasinsError",
    "ComputeError",
    "InputError",
    "ReportError",
    "ParamSpace",
    "Problem",
    "HVP_ROUTES",
]
