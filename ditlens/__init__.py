"""ditlens: find where a Diffusion Transformer wastes attention compute, and remove it.

Subpackages (DESIGN.md §1):

- :mod:`ditlens.analyzer`   model adapters, capture hooks, redundancy metrics and maps
- :mod:`ditlens.traces`     the HDF5 trace format (writer, reader, merge)
- :mod:`ditlens.compress`   plans, compression runtime, FLOPs, search, validation, export
- :mod:`ditlens.kernels`    Triton kernels, dense references, dispatch
- :mod:`ditlens.dashboards` the Dash redundancy explorer
- :mod:`ditlens.zoo`        the embedded, trained tiny models
"""

__version__ = "0.1.0"

from ditlens.errors import DitlensError

__all__ = ["DitlensError", "__version__"]
